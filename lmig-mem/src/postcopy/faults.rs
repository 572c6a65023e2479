//! The fault side of post-copy: reading the userfaultfd, queueing faults
//! on missing pages for the session (before the runs a program asked for
//! through [`Residency`](super::Residency)), answering the others at once.

use std::io;
use std::os::fd::{AsFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lmig_core::model::PageRun;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

#[cfg(feature = "bench-internals")]
use super::FaultTrace;
use super::setup::{Fill, Target};
use super::{MAX_RECORDED_FAULTS, Postcopy, lock};
use crate::error::{MemError, Result};
use crate::sys::uffd::{self, UffdMsg};

impl Postcopy {
    /// Wait up to `timeout` for a fault on a missing page; return `None`
    /// early also when `also` (a descriptor of the caller's, not read
    /// here) turns readable: in the spin it is looked at between reads, in
    /// the sleep it is polled with the userfaultfd (the destination's one
    /// fault-path thread waits so for a fault and for the reply to its last
    /// request at once).
    pub(crate) fn wait_fault_or(
        &self,
        also: Option<RawFd>,
        timeout: Duration,
    ) -> Result<Option<PageRun>> {
        let start = Instant::now();
        let deadline = start + timeout;
        let spin_until = start + self.options.spin.min(timeout);
        let mut buf = [UffdMsg::default(); 16];
        loop {
            // Faults first: a faulting thread is blocked, a program that
            // asked ahead is not (it serves something else meanwhile).
            if let Some(run) = self.pop_fault() {
                return Ok(Some(run));
            }
            let n = uffd::read_msgs(self.uffd.as_fd(), &mut buf)
                .map_err(|e| MemError::os("read (userfaultfd)", "post-copy", e))?;
            if n > 0 {
                self.file_faults(&buf[..n])?;
                continue;
            }
            if let Some(run) = lock(&self.asked).pop_front() {
                return Ok(Some(run));
            }
            // The program's word that its parked work ran: the session
            // looks for it when this returns.
            if self.settled.swap(false, Ordering::AcqRel) {
                return Ok(None);
            }
            let now = Instant::now();
            if now < spin_until {
                // Poll, but give the CPU to any other runnable thread: on a
                // machine with few CPUs a hard spin here takes the very CPU
                // the reply to the previous fault needs (measured: +200 µs
                // per fault with 2 CPUs and a spin of 200 µs).
                if let Some(fd) = also {
                    if uffd::poll_also(&[], fd, 0).map_err(|e| {
                        MemError::os("poll (the caller's descriptor)", "post-copy", e)
                    })? {
                        self.counters.also_woke.fetch_add(1, Ordering::Relaxed);
                        return Ok(None);
                    }
                }
                std::thread::yield_now();
                continue;
            }
            if now >= deadline {
                return Ok(None);
            }
            // Cleared only before a sleep (not in every look of the spin or
            // of a zero-timeout call: one system call fewer each), then the
            // runs asked for looked at again: one asked for after the clear
            // signals again and ends the sleep.
            self.kick.clear();
            if !lock(&self.asked).is_empty() {
                continue;
            }
            let left = deadline - now;
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            if let Some(fd) = also {
                let fds = [self.uffd.as_fd(), self.kick.fd()];
                if uffd::poll_also(&fds, fd, ms)
                    .map_err(|e| MemError::os("poll (userfaultfd)", "post-copy", e))?
                {
                    self.counters.also_woke.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                continue;
            }
            let mut fds = [
                PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.kick.fd(), PollFlags::POLLIN),
            ];
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(MemError::os("poll (userfaultfd)", "post-copy", e.into())),
            }
        }
    }

    /// Append to `runs`, without waiting, up to `max` runs needed now: the
    /// faults the userfaultfd holds (read once for the whole batch, not
    /// once per run handed out) and those queued first, then the runs the
    /// program asked for. Returns how many.
    pub(crate) fn take_faults(&self, runs: &mut Vec<PageRun>, max: usize) -> Result<usize> {
        let mut buf = [UffdMsg::default(); 16];
        // Bounded: at most enough full reads for `max` faults, and one more.
        for _ in 0..=max / buf.len() {
            let n = uffd::read_msgs(self.uffd.as_fd(), &mut buf)
                .map_err(|e| MemError::os("read (userfaultfd)", "post-copy", e))?;
            self.file_faults(&buf[..n])?;
            if n < buf.len() {
                break;
            }
        }
        let before = runs.len();
        while runs.len() - before < max {
            match self.pop_fault() {
                Some(run) => runs.push(run),
                None => break,
            }
        }
        let left = max - (runs.len() - before);
        if left > 0 {
            let mut asked = lock(&self.asked);
            let n = left.min(asked.len());
            runs.extend(asked.drain(..n));
        }
        Ok(runs.len() - before)
    }

    /// The oldest fault queued for the session (counted, and recorded
    /// when the options say so).
    fn pop_fault(&self) -> Option<PageRun> {
        let run = lock(&self.queued).pop_front()?;
        self.counters.requested.fetch_add(1, Ordering::Relaxed);
        if self.options.record_faults {
            let mut f = lock(&self.faulted);
            if f.len() < MAX_RECORDED_FAULTS {
                f.push((run.region, run.first));
                #[cfg(feature = "bench-internals")]
                lock(&self.trace).push(FaultTrace {
                    region: run.region,
                    page: run.first,
                    read_at: Instant::now(),
                    place_began: None,
                    placed_at: None,
                    placed_with: 0,
                });
            }
        }
        Some(run)
    }

    /// File fault messages: missing pages are queued for the session, the
    /// others are answered at once.
    fn file_faults(&self, msgs: &[UffdMsg]) -> Result<()> {
        for m in msgs {
            if m.event != uffd::UFFD_EVENT_PAGEFAULT {
                continue;
            }
            self.counters.faults.fetch_add(1, Ordering::Relaxed);
            let addr = m.arg[1];
            let Some(t) = self
                .targets
                .iter()
                .find(|t| addr >= t.start && addr - t.start < t.len)
            else {
                continue;
            };
            let page = (addr - t.start) / t.page_size;
            let (is_missing, is_filling) = {
                let st = lock(&self.pages);
                (
                    st.missing.get(t.id).is_ok_and(|s| s.contains(page)),
                    st.filling.get(t.id).is_ok_and(|s| s.contains(page)),
                )
            };
            if is_filling {
                // The fill in progress wakes this toucher when it completes.
                self.counters.stale.fetch_add(1, Ordering::Relaxed);
            } else if is_missing {
                let run = PageRun::new(t.id, page, 1);
                let mut q = lock(&self.queued);
                if !q.contains(&run) {
                    q.push_back(run);
                }
            } else {
                self.counters.stale.fetch_add(1, Ordering::Relaxed);
                self.answer_present(t, page)?;
            }
        }
        Ok(())
    }

    /// A fault on a page that is not missing: it is there (wake the waiters),
    /// or the program dropped it itself since (fill it with zeros, as the
    /// kernel would have without us).
    pub(super) fn answer_present(&self, t: &Target, page: u64) -> Result<()> {
        let _serial = lock(&self.pages);
        let addr = t.start + page * t.page_size;
        let filled = match &t.fill {
            Fill::Copy => uffd::zeropage(self.uffd.as_fd(), addr, t.page_size),
            Fill::Continue { .. } => uffd::cont(self.uffd.as_fd(), addr, t.page_size),
        };
        match filled.error.as_ref().and_then(io::Error::raw_os_error) {
            None => Ok(()),
            Some(libc::EEXIST) | Some(libc::EAGAIN) => {
                self.counters.present.fetch_add(1, Ordering::Relaxed);
                self.wake(t, page, 1)
            }
            Some(libc::ENOENT) | Some(libc::EFAULT) => {
                // Minor-fault region whose page cache has a hole here.
                if let Fill::Continue { alias } = &t.fill {
                    let off = (page * t.page_size) as usize;
                    alias.zero(off, t.page_size as usize);
                    let again = uffd::cont(self.uffd.as_fd(), addr, t.page_size);
                    if again.error.is_some() {
                        return self.wake(t, page, 1);
                    }
                    return Ok(());
                }
                self.wake(t, page, 1)
            }
            Some(_) => Err(MemError::os(
                "UFFDIO_ZEROPAGE/CONTINUE (stale fault)",
                format!("region {} page {page}", t.id),
                filled.error.expect("matched Some"),
            )),
        }
    }

    pub(super) fn wake(&self, t: &Target, page: u64, count: u64) -> Result<()> {
        uffd::wake(
            self.uffd.as_fd(),
            t.start + page * t.page_size,
            count * t.page_size,
        )
        .map_err(|e| MemError::os("UFFDIO_WAKE", format!("region {} page {page}", t.id), e))
    }
}
