//! Remote paging: faults on pages held elsewhere become fetches, answers
//! are checked against the page book and copied in with the userfaultfd.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use lmig_core::model::PageRun;
use lmig_core::protocol::{Message, PageBatch, PageData};
use lmig_core::split::{HostId, SplitMessage};

use super::book::FaultDecision;
use super::shared::{Inner, State, proto};
use crate::error::MemError;
use crate::split::{Result, SplitError};
use crate::sys::uffd::{self, UffdMsg};

/// `UFFD_PAGEFAULT_FLAG_WP`: the fault is a write to a write-protected page.
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

impl Inner {
    /// Place pages `from` sent as of `epoch`, where the owner map allows it;
    /// ask the current owner again for discarded pages someone waits on.
    ///
    /// The verdict and the owner-map switch to this host happen under the
    /// state lock; the copies into the region (`UFFDIO_COPY`) happen outside
    /// it, so several channels place in parallel. While a page is being
    /// placed it is in `placing`: a fault on it waits for the copy (which
    /// wakes it), another answer for it is a duplicate, and no eviction or
    /// partial migration can take it (it is neither local nor another
    /// host's).
    pub(super) fn place_answer(&self, from: HostId, epoch: u64, batch: &PageBatch) -> Result<()> {
        let run = batch.run;
        let region = &self.region;
        region.run_bytes(&run)?;
        let ps = self.page_size as usize;
        if let PageData::Raw(d) = &batch.data {
            region.check_len(&run, d.len())?;
        }
        let claim = self.lock().book.claim_answer(from, epoch, &run)?;
        let c = &self.counters;
        c.duplicates.fetch_add(claim.duplicates, Ordering::Relaxed);
        c.stale.fetch_add(claim.stale, Ordering::Relaxed);
        c.not_owner.fetch_add(claim.not_owner, Ordering::Relaxed);
        let claimed = claim.claimed;
        let mut placed = Vec::with_capacity(claimed.len());
        let mut result = Ok(());
        for &(p, n) in &claimed {
            let data = match &batch.data {
                PageData::Raw(d) => {
                    let off = (p - run.first) as usize * ps;
                    Some(&d[off..off + n as usize * ps])
                }
                PageData::Zero => None,
            };
            let (done, r) = if result.is_ok() {
                self.fill(p, n, data, from)
            } else {
                (0, Ok(()))
            };
            placed.push(done);
            if let Err(e) = r {
                result = Err(e);
            }
        }
        let full = {
            let mut st = self.lock();
            for (&(p, n), &done) in claimed.iter().zip(&placed) {
                // Not placed: `from` still holds them.
                if st.book.placed(p, n, done, from)? {
                    if let Err(e) = uffd::wake(
                        self.uffd.as_fd(),
                        self.addr(p + done),
                        (n - done) * self.page_size,
                    ) {
                        warn!(error = %e, "waking the threads waiting on placed pages failed");
                    }
                }
                self.counters.placed.fetch_add(done, Ordering::Relaxed);
            }
            st.book.all_local()
        };
        if full {
            // Only a gather waits for placements: for every page to be here.
            self.cond.notify_all();
        }
        for p in claim.refetch {
            self.request(p, false);
        }
        result
    }

    /// Fill `count` missing pages from `first` (`UFFDIO_COPY`, or
    /// `UFFDIO_ZEROPAGE` without data), which wakes their waiters. Returns
    /// how many pages were filled, and the error that stopped it.
    ///
    /// A page the kernel reports present (`EEXIST`) although the owner map
    /// gave it to `from` is an error: this host's bookkeeping and the
    /// region disagree, and overwriting the page could hide a lost write.
    fn fill(&self, first: u64, count: u64, data: Option<&[u8]>, from: HostId) -> (u64, Result<()>) {
        let ps = self.page_size;
        let total = count * ps;
        let mut done = 0u64;
        let mut retries = 0u32;
        while done < total {
            let addr = self.addr(first) + done;
            let filled = match data {
                Some(d) => uffd::copy(self.uffd.as_fd(), addr, &d[done as usize..]),
                None => uffd::zeropage(self.uffd.as_fd(), addr, total - done),
            };
            done += filled.bytes / ps * ps;
            let Some(err) = filled.error else { continue };
            let call = if data.is_some() {
                "UFFDIO_COPY"
            } else {
                "UFFDIO_ZEROPAGE"
            };
            let page = first + done / ps;
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    return (
                        done / ps,
                        Err(SplitError::State(format!(
                            "{call}: page {page} of region {} is present here although the \
                             owner map gave it to {from}",
                            self.region.id()
                        ))),
                    );
                }
                Some(libc::EAGAIN) if filled.bytes == 0 => {
                    retries += 1;
                    if retries > crate::postcopy::MAX_FILL_RETRIES {
                        return (
                            done / ps,
                            Err(MemError::os(call, "split memory", err).into()),
                        );
                    }
                    std::thread::yield_now();
                }
                Some(libc::EAGAIN) => {}
                _ => {
                    return (
                        done / ps,
                        Err(MemError::os(call, format!("split region page {page}"), err).into()),
                    );
                }
            }
        }
        (count, Ok(()))
    }

    pub(super) fn fault_loop(self: Arc<Self>) {
        let mut buf = [UffdMsg::default(); 32];
        let mut idle_since = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let n = match uffd::read_msgs(self.uffd.as_fd(), &mut buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            if n == 0 {
                if idle_since.elapsed() < self.options.spin {
                    std::hint::spin_loop();
                } else {
                    if let Err(e) = uffd::poll_in(self.uffd.as_fd(), 100) {
                        debug!(error = %e, "polling the userfaultfd failed");
                    }
                    idle_since = Instant::now();
                }
                continue;
            }
            for m in &buf[..n] {
                if m.event != uffd::UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = m.arg[1];
                if addr < self.start || addr - self.start >= self.pages * self.page_size {
                    continue;
                }
                let page = (addr - self.start) / self.page_size;
                if m.arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0 {
                    self.on_write_fault(page);
                } else {
                    self.request(page, true);
                }
            }
            idle_since = Instant::now();
        }
    }

    /// A write to a page under eviction: keep the page here, let the write go.
    fn on_write_fault(&self, page: u64) {
        let mut st = self.lock();
        if st.book.written(page) {
            self.counters.kept_dirty.fetch_add(1, Ordering::Relaxed);
        }
        let fd = self.uffd.as_fd();
        if uffd::writeprotect(fd, self.addr(page), self.page_size, false).is_err() {
            if let Err(e) = uffd::wake(fd, self.addr(page), self.page_size) {
                warn!(error = %e, "waking the writer of a page failed");
            }
        }
        drop(st);
    }

    /// A thread needs `page`: fetch it (with neighbours) from its owner, or
    /// answer at once when it is here.
    pub(super) fn request(&self, page: u64, fault: bool) {
        let mut st = self.lock();
        let State { book, dead, .. } = &mut *st;
        let decision = book.fault(page, self.options.prepage, |h| dead.contains(&h));
        let (owner, lo, hi, epoch) = match decision {
            FaultDecision::Ignore | FaultDecision::AwaitPlacement => return,
            FaultDecision::AlreadyHere => {
                // Wake the waiters; zeros if the program dropped it.
                let fd = self.uffd.as_fd();
                let z = uffd::zeropage(fd, self.addr(page), self.page_size);
                if z.error.is_some() {
                    if let Err(e) = uffd::wake(fd, self.addr(page), self.page_size) {
                        warn!(error = %e, "waking the threads waiting on a page failed");
                    }
                }
                return;
            }
            FaultDecision::Fetch {
                owner,
                first,
                count,
                epoch,
            } => (owner, first, first + count, epoch),
        };
        drop(st);
        if fault {
            self.counters.remote_faults.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.refetched.fetch_add(1, Ordering::Relaxed);
        }
        let run = PageRun::new(self.region.id(), lo, (hi - lo) as u32);
        let sent = self.link(owner).and_then(|l| {
            l.ch.send_urgent(&Message::Split(SplitMessage::Fetch { epoch, run }))
                .map_err(proto)
        });
        if sent.is_err() {
            self.lock().book.fetch_failed(lo, hi - lo);
        }
    }
}
