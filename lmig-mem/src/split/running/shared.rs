//! What the running host's threads share: the state behind the lock, the
//! links to page hosts, and the waits for their replies.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use lmig_core::model::{PageRun, PageSet};
use lmig_core::protocol::Message;
use lmig_core::split::{HostId, SplitMessage};
use lmig_core::{Channel, MigrationError};

use super::book::PageBook;
use super::options::SplitOptions;
use super::reports::HostLost;
use crate::memory::Region;
use crate::split::{Result, SplitError, lock};

/// A channel error as a split error.
pub(super) fn proto(e: MigrationError) -> SplitError {
    SplitError::Protocol(e)
}

/// One attached page host.
pub(super) struct Link {
    pub(super) ch: Arc<dyn Channel>,
    pub(super) endpoint: String,
    pub(super) seq: AtomicU64,
}

/// Replies from hosts that a wait looks for.
#[derive(Default)]
pub(super) struct Events {
    pub(super) synced: HashSet<(HostId, u64)>,
    pub(super) sent: Vec<(HostId, HostId, u64)>,
    pub(super) refused: Vec<(HostId, String)>,
}

/// Everything behind the region's lock.
pub(super) struct State {
    /// Every page's state.
    pub(super) book: PageBook,
    /// Hosts a partial migration is draining.
    pub(super) draining: HashSet<HostId>,
    /// Hosts whose link failed.
    pub(super) dead: HashSet<HostId>,
    /// The pages the dead hosts held.
    pub(super) lost: Vec<HostLost>,
    /// Answers to requests, for the waits.
    pub(super) events: Events,
}

/// The counters behind [`SplitStats`](super::SplitStats).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) remote_faults: AtomicU64,
    pub(super) placed: AtomicU64,
    pub(super) stale: AtomicU64,
    pub(super) not_owner: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) not_held: AtomicU64,
    pub(super) refetched: AtomicU64,
    pub(super) evicted: AtomicU64,
    pub(super) kept_dirty: AtomicU64,
}

/// What the region's threads share.
pub(super) struct Inner {
    pub(super) me: HostId,
    pub(super) options: SplitOptions,
    pub(super) start: u64,
    pub(super) page_size: u64,
    pub(super) pages: u64,
    pub(super) state: Mutex<State>,
    pub(super) cond: Condvar,
    pub(super) links: RwLock<HashMap<HostId, Arc<Link>>>,
    pub(super) stop: AtomicBool,
    pub(super) counters: Counters,
    pub(super) uffd: OwnedFd,
    /// Declared last: unmapped after the userfaultfd is closed.
    pub(super) region: Region,
}

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn link(&self, host: HostId) -> Result<Arc<Link>> {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host)
            .cloned()
            .ok_or(SplitError::UnknownHost { host })
    }

    /// The whole region as one run.
    pub(super) fn whole(&self) -> PageRun {
        PageRun::new(
            self.region.id(),
            0,
            self.pages.min(u64::from(u32::MAX)) as u32,
        )
    }

    pub(super) fn addr(&self, page: u64) -> u64 {
        self.start + page * self.page_size
    }

    /// Wait until `done` holds, a host in `watch` is lost or refused, or the
    /// timeout. A refusal already known is reported even when `done` holds
    /// too: it came first (the waiting thread may be late to look). A loss
    /// after `done` is not this wait's failure.
    pub(super) fn wait_for(
        &self,
        what: &'static str,
        watch: &[HostId],
        mut done: impl FnMut(&mut State) -> bool,
    ) -> Result<()> {
        let timeout = self.options.timeout;
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(i) = st
                .events
                .refused
                .iter()
                .position(|(h, _)| watch.contains(h))
            {
                let (host, reason) = st.events.refused.remove(i);
                return Err(SplitError::Refused { host, reason });
            }
            if done(&mut st) {
                return Ok(());
            }
            if let Some(l) = st.lost.iter().find(|l| watch.contains(&l.host)) {
                return Err(SplitError::HostLost {
                    host: l.host,
                    pages: l.pages,
                    runs: l.runs.clone(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SplitError::Timeout {
                    what,
                    after: timeout,
                });
            }
            st = self
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Every message sent to `host` before this call has been handled by it.
    pub(super) fn sync(&self, host: HostId) -> Result<()> {
        self.sync_all(&[host])
    }

    /// Every message sent to each of `hosts` before this call has been
    /// handled by it (all asked at once).
    pub(super) fn sync_all(&self, hosts: &[HostId]) -> Result<()> {
        let mut asked = Vec::with_capacity(hosts.len());
        for &host in hosts {
            let link = self.link(host)?;
            let seq = link.seq.fetch_add(1, Ordering::Relaxed);
            link.ch
                .send(&Message::Split(SplitMessage::Sync { seq }))
                .map_err(proto)?;
            asked.push((host, seq));
        }
        self.wait_for("Synced", hosts, |st| {
            asked.retain(|k| !st.events.synced.remove(k));
            asked.is_empty()
        })
    }
}

/// The set of the pages in `list`.
pub(super) fn set_of(pages: u64, list: &[u64]) -> PageSet {
    let mut s = PageSet::new(pages);
    for &p in list {
        s.insert(p);
    }
    s
}
