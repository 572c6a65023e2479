//! Residency for event-loop programs: ask whether pages are here, and ask
//! for those that are not without touching them (so without blocking), to
//! be told through an eventfd once every page of the range is placed — as
//! KVM's asynchronous page faults let a guest run another task meanwhile.
//!
//! A page counts as resident once its placement returned (`UFFDIO_COPY`,
//! `UFFDIO_ZEROPAGE` or `UFFDIO_CONTINUE` done): a page being placed at
//! the moment of the query is not resident yet, and its waiters are told
//! once it is. Queries, requests and placements meet under the one lock of
//! the missing-page state, so no answer is half old, half new, and no
//! readiness is lost between a query and a request.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lmig_core::model::{PageRun, RegionId};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{Postcopy, lock};
use crate::error::{MemError, Result};

/// Most ranges waited for at once; a request beyond it is refused
/// ([`MemError::ResidencyWaiters`]) rather than growing without bound.
pub const MAX_RESIDENCY_WAITERS: usize = 1 << 16;

/// Most runs remembered as asked for while the queue never drains.
const MAX_ASKED_INDEX: usize = 4 * MAX_RESIDENCY_WAITERS;

/// A range someone waits for, and the token that names it.
#[derive(Copy, Clone, Debug)]
pub(super) struct Waiter {
    pub(super) run: PageRun,
    pub(super) token: u64,
}

/// Waiters not ready yet, and the tokens that became ready.
///
/// The pending ones are kept by where their range starts, so that a
/// placement looks only at the waiters whose range may touch it (those
/// starting at most the longest range's length before it ends), not at
/// every waiter: a placement happens for every pushed chunk, and kvd parks
/// a request per missing key (about a thousand right after it resumes).
#[derive(Debug, Default)]
pub(super) struct Waiters {
    pending: BTreeMap<(RegionId, u64), Vec<Waiter>>,
    /// Waiters in `pending`.
    count: usize,
    /// The longest range ever waited for (pages).
    longest: u64,
    pub(super) ready: Vec<u64>,
}

impl Waiters {
    /// Waiters not ready yet.
    pub(super) fn len(&self) -> usize {
        self.count
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Wait for `w.run`.
    pub(super) fn add(&mut self, w: Waiter) {
        self.longest = self.longest.max(u64::from(w.run.count));
        self.pending
            .entry((w.run.region, w.run.first))
            .or_default()
            .push(w);
        self.count += 1;
    }

    /// Pages `first..first + count` of `region` were placed: every waiter
    /// whose range touches them and is now wholly `resident` becomes
    /// ready. True if one did.
    pub(super) fn placed(
        &mut self,
        region: RegionId,
        first: u64,
        count: u64,
        resident: impl Fn(&PageRun) -> bool,
    ) -> bool {
        let before = self.ready.len();
        let end = first + count;
        let from = (region, first.saturating_sub(self.longest.saturating_sub(1)));
        let keys: Vec<(RegionId, u64)> = self
            .pending
            .range(from..(region, end))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(ws) = self.pending.get_mut(&key) else {
                continue;
            };
            let mut i = 0;
            while i < ws.len() {
                let w = ws[i];
                if first < w.run.end() && resident(&w.run) {
                    self.ready.push(w.token);
                    ws.swap_remove(i);
                    self.count -= 1;
                } else {
                    i += 1;
                }
            }
            if ws.is_empty() {
                self.pending.remove(&key);
            }
        }
        self.ready.len() > before
    }
}

/// An eventfd used as a level signal: readable from `signal` to `clear`.
#[derive(Debug)]
pub(super) struct Signal(EventFd);

impl Signal {
    pub(super) fn new() -> Result<Self> {
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map(Self)
            .map_err(|e| MemError::os("eventfd", "post-copy residency", e.into()))
    }

    /// Make the eventfd readable.
    pub(super) fn signal(&self) {
        // Only fails when the counter would overflow: it is readable then.
        let _ = self.0.write(1);
    }

    /// Make it unreadable again (nothing to read is fine).
    pub(super) fn clear(&self) {
        let _ = self.0.read();
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// What wakes the session's fault thread for the runs the program asked
/// for: the eventfd, and whether runs were queued without waking it
/// ([`Residency::request_deferred`]) since it was last woken.
#[derive(Debug)]
pub(super) struct Kick {
    signal: Signal,
    deferred: AtomicBool,
}

impl Kick {
    pub(super) fn new() -> Result<Self> {
        Ok(Self {
            signal: Signal::new()?,
            deferred: AtomicBool::new(false),
        })
    }

    /// Wake the fault thread (its `wait_fault` returns, or looks again).
    pub(super) fn signal(&self) {
        self.deferred.store(false, Ordering::Release);
        self.signal.signal();
    }

    /// A run was queued without a wake-up: the next [`Self::flush`] or
    /// [`Self::wake_if`] wakes the fault thread.
    fn defer(&self) {
        self.deferred.store(true, Ordering::Release);
    }

    /// Wake the fault thread if `idle` (the queue was empty before this
    /// request) or if runs queued without a wake-up are waiting.
    fn wake_if(&self, idle: bool) {
        if self.deferred.swap(false, Ordering::AcqRel) || idle {
            self.signal.signal();
        }
    }

    /// Wake the fault thread if runs were queued without a wake-up.
    fn flush(&self) {
        self.wake_if(false);
    }

    /// Make the eventfd unreadable (before the fault thread sleeps).
    pub(super) fn clear(&self) {
        self.signal.clear();
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.signal.fd()
    }

    /// Whether the eventfd is readable now (tests).
    #[cfg(test)]
    fn signalled(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).expect("poll") == 1
    }
}

/// Post-copy residency of a region set, for a program that must never
/// block its event loop on a missing page (see the [post-copy docs](crate::postcopy)).
///
/// Got from [`RegionSet::residency`](crate::RegionSet::residency) while
/// post-copy runs (and through lmig-core's
/// [`PageResidency`](lmig_core::PageResidency) in the `Resumption`). It
/// stays valid after post-copy ended: every page is resident then.
///
/// The program's loop: before it touches memory that may be missing, it
/// asks [`Self::is_resident`]; if not, it parks the work, calls
/// [`Self::request`] with a token naming it, and serves other work. The
/// [`Self::ready_fd`] eventfd (add it to the loop's epoll) becomes readable
/// when a requested range is in; [`Self::take_ready`] returns the tokens.
#[derive(Clone, Debug)]
pub struct Residency {
    pub(crate) postcopy: Arc<Postcopy>,
}

impl Residency {
    /// Every page of `run` is placed (a page being placed right now is not).
    pub fn is_resident(&self, run: &PageRun) -> Result<bool> {
        self.postcopy.is_resident(run)
    }

    /// Ask for the pages of `run` that are missing, ahead of the push and
    /// without touching them. `Ok(true)`: every page is resident already,
    /// nothing was queued. `Ok(false)`: `token` becomes ready (see
    /// [`Self::take_ready`]) once every page of `run` is placed; the
    /// missing pages are requested from the source at once. A token may
    /// name several ranges; it is returned once per request.
    pub fn request(&self, run: &PageRun, token: u64) -> Result<bool> {
        self.postcopy.request(run, token, true)
    }

    /// [`Self::request`], but the missing pages are only queued: the
    /// session's fault thread is not woken for them until
    /// [`Self::flush_requests`] (or a [`Self::request`]), and then sends
    /// every queued run in one write. For a loop that asks for many ranges
    /// in one turn: one wake-up for the turn, not one per request. Never
    /// held for good: `wait_fault` hands queued runs out whenever it next
    /// looks (the session's fault thread looks at least every
    /// `DestinationConfig::fault_poll`).
    pub fn request_deferred(&self, run: &PageRun, token: u64) -> Result<bool> {
        self.postcopy.request(run, token, false)
    }

    /// Wake the session's fault thread for the runs
    /// [`Self::request_deferred`] queued; nothing when none waits.
    pub fn flush_requests(&self) {
        self.postcopy.kick.flush();
    }

    /// Tokens whose ranges became resident since the last call, in the
    /// order they did; clears [`Self::ready_fd`]'s readiness.
    pub fn take_ready(&self) -> Vec<u64> {
        self.postcopy.take_ready()
    }

    /// The eventfd that is readable while [`Self::take_ready`] has tokens.
    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.postcopy.ready.fd()
    }

    /// The program ran the work it parked after the resume
    /// ([`lmig_core::PageResidency::settled`]): wakes the session's fault
    /// thread (its `wait_fault` returns at once), which passes it on.
    pub fn settled(&self) {
        self.postcopy.settled.store(true, Ordering::Release);
        self.postcopy.kick.signal();
    }
}

impl lmig_core::PageResidency for Residency {
    fn is_resident(&self, run: &PageRun) -> lmig_core::Result<bool> {
        Ok(Residency::is_resident(self, run)?)
    }

    fn request(&self, run: &PageRun, token: u64) -> lmig_core::Result<bool> {
        Ok(Residency::request(self, run, token)?)
    }

    fn take_ready(&self) -> Vec<u64> {
        Residency::take_ready(self)
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        Residency::ready_fd(self)
    }

    fn settled(&self) {
        Residency::settled(self);
    }

    fn request_deferred(&self, run: &PageRun, token: u64) -> lmig_core::Result<bool> {
        Ok(Residency::request_deferred(self, run, token)?)
    }

    fn flush_requests(&self) {
        Residency::flush_requests(self);
    }
}

impl Postcopy {
    /// Every page of `run` (checked against its region) is placed.
    pub(crate) fn is_resident(&self, run: &PageRun) -> Result<bool> {
        self.check_run(run)?;
        Ok(lock(&self.pages).resident(run))
    }

    /// Residency request (see [`Residency::request`]); `wake`: wake the
    /// fault thread now if needed, else leave it to a flush
    /// ([`Residency::request_deferred`]).
    pub(crate) fn request(&self, run: &PageRun, token: u64, wake: bool) -> Result<bool> {
        self.check_run(run)?;
        let wanted: Vec<PageRun> = {
            let mut st = lock(&self.pages);
            if st.resident(run) {
                return Ok(true);
            }
            if st.waiters.len() >= MAX_RESIDENCY_WAITERS {
                return Err(MemError::ResidencyWaiters {
                    waiting: st.waiters.len(),
                });
            }
            st.waiters.add(Waiter { run: *run, token });
            // Pages being placed need no request: their placement is what
            // makes the waiter ready.
            let set = st
                .missing
                .get(run.region)
                .map_err(|_| MemError::UnknownRegion { region: run.region })?;
            set.runs_in(run.first, run.end())
                .map(|(f, c)| PageRun::new(run.region, f, c as u32))
                .collect()
        };
        if !wanted.is_empty() {
            let mut asked = lock(&self.asked);
            let mut index = lock(&self.asked_index);
            // The session's fault thread drains the whole queue once woken
            // (it looks at it after clearing the signal): only a request
            // into an empty queue needs to wake it, one system call and one
            // wake-up for a burst of requests from the program's loop.
            let idle = asked.is_empty();
            // Drained: every run named in the index went to the source.
            // Kept within bounds while the queue never drains: rebuilt
            // from the runs still queued.
            if idle {
                index.clear();
            } else if index.len() >= MAX_ASKED_INDEX {
                *index = asked.iter().copied().collect();
            }
            // A run queued, or taken from the queue since it was last
            // empty (on its way to the source), is not queued again: one
            // hash look-up, not a scan of the queue (about a thousand
            // parked requests ask at once right after the resume).
            let mut queued = false;
            for r in wanted {
                if index.insert(r) {
                    asked.push_back(r);
                    queued = true;
                }
            }
            if queued && !wake {
                // Noted under the queue's lock: a flush after this call
                // wakes the fault thread for it.
                self.kick.defer();
            }
            drop(index);
            drop(asked);
            if wake {
                // Also for runs queued without a wake-up before this one:
                // they go with it.
                self.kick.wake_if(idle);
            }
        }
        Ok(false)
    }

    /// Tokens of waiters that became ready; clears the readiness signal.
    pub(crate) fn take_ready(&self) -> Vec<u64> {
        let mut st = lock(&self.pages);
        self.ready.clear();
        std::mem::take(&mut st.waiters.ready)
    }

    /// `run` lies inside a registered region.
    fn check_run(&self, run: &PageRun) -> Result<()> {
        let t = self.target(run.region)?;
        let pages = t.len / t.page_size;
        if run.count == 0 || run.end() > pages {
            return Err(MemError::OutOfBounds {
                region: run.region,
                offset: (run.first * t.page_size) as usize,
                len: (u64::from(run.count) * t.page_size) as usize,
                region_len: t.len as usize,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_is_ready_once_its_whole_run_is_in() {
        let mut w = Waiters::default();
        let r = RegionId(1);
        w.add(Waiter {
            run: PageRun::new(r, 10, 4),
            token: 7,
        });
        w.add(Waiter {
            run: PageRun::new(RegionId(2), 10, 4),
            token: 8,
        });
        // Page 12 placed, 13 still missing.
        assert!(!w.placed(r, 12, 1, |_| false));
        assert!(w.ready.is_empty());
        // Placed next to it but not touching: not even checked.
        assert!(!w.placed(r, 14, 10, |_| panic!("not touching")));
        assert!(w.placed(r, 13, 1, |_| true));
        assert_eq!(w.ready, vec![7]);
        assert_eq!(w.len(), 1, "region 2's waiter stays");
    }

    #[test]
    fn deferred_runs_wake_the_fault_thread_once_at_the_flush_or_the_next_request() {
        let kick = Kick::new().unwrap();
        // Queued without a wake-up: nothing until the flush.
        kick.defer();
        kick.defer();
        assert!(!kick.signalled());
        kick.flush();
        assert!(kick.signalled(), "the flush wakes it");
        kick.clear();
        kick.flush();
        assert!(!kick.signalled(), "nothing deferred since: no wake-up");
        // A request into a queue holding deferred runs wakes it, though
        // the queue was not empty: they go with it.
        kick.defer();
        kick.wake_if(false);
        assert!(kick.signalled());
        kick.clear();
        kick.flush();
        assert!(!kick.signalled(), "taken along: the flush has nothing left");
        // A request into an empty queue wakes it, as before.
        kick.wake_if(true);
        assert!(kick.signalled());
        kick.clear();
        kick.wake_if(false);
        assert!(!kick.signalled(), "a request behind queued ones does not");
        // The program's word wakes it and takes deferred runs along.
        kick.defer();
        kick.signal();
        kick.clear();
        kick.flush();
        assert!(!kick.signalled());
    }

    #[test]
    fn a_placement_finds_the_long_ranges_that_began_before_it() {
        let mut w = Waiters::default();
        let r = RegionId(1);
        w.add(Waiter {
            run: PageRun::new(r, 0, 100),
            token: 1,
        });
        for p in 200..1200 {
            w.add(Waiter {
                run: PageRun::new(r, p, 1),
                token: p,
            });
        }
        assert_eq!(w.len(), 1001);
        // Page 99 is the long range's last: found from 99 pages before.
        assert!(w.placed(r, 99, 1, |run| run.first == 0));
        assert_eq!(w.ready, vec![1]);
        // A placement far from the long range and ending before 200
        // touches nobody; one over 500..502 makes exactly two ready.
        assert!(!w.placed(r, 150, 50, |_| panic!("not touching")));
        assert!(w.placed(r, 500, 2, |_| true));
        let mut ready = w.ready.clone();
        ready.sort_unstable();
        assert_eq!(ready, vec![1, 500, 501]);
        assert_eq!(w.len(), 998);
    }
}
