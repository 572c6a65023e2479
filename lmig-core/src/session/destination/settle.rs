//! The program's word that the work it parked after the resume has run
//! ([`PageResidency::settled`]), passed on to the source as
//! `Message::DemandSettled` by the post-copy fault thread: the source's
//! push hold-off then ends at once instead of at its bound. The memory's
//! own residency is told too: lmig-mem's wakes the fault thread (its
//! `wait_fault` returns at once); with another sink the word leaves when
//! `wait_fault` next returns (within `DestinationConfig::fault_poll`).

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::Result;
use crate::model::PageRun;
use crate::traits::PageResidency;

/// Shared by the program's residency handle and the fault thread.
#[derive(Debug, Default)]
pub(super) struct SettleFlag {
    /// The program said it (once is enough).
    said: AtomicBool,
    /// The fault thread took it to send.
    taken: AtomicBool,
}

impl SettleFlag {
    /// The program said it and it was not passed on yet: the caller
    /// sends `DemandSettled` (true once at most).
    pub(super) fn take(&self) -> bool {
        self.said.load(Ordering::Acquire) && !self.taken.swap(true, Ordering::AcqRel)
    }
}

/// The memory's residency handle as the program gets it in the
/// `Resumption`: the memory's own, and [`PageResidency::settled`] noted for
/// the fault thread.
pub(super) struct SettleReporting {
    inner: Arc<dyn PageResidency>,
    flag: Arc<SettleFlag>,
}

impl SettleReporting {
    /// `inner`, reporting through `flag`.
    pub(super) fn wrap(
        inner: Option<Arc<dyn PageResidency>>,
        flag: &Arc<SettleFlag>,
    ) -> Option<Arc<dyn PageResidency>> {
        inner.map(|inner| {
            Arc::new(Self {
                inner,
                flag: flag.clone(),
            }) as Arc<dyn PageResidency>
        })
    }
}

impl PageResidency for SettleReporting {
    fn is_resident(&self, run: &PageRun) -> Result<bool> {
        self.inner.is_resident(run)
    }

    fn request(&self, run: &PageRun, token: u64) -> Result<bool> {
        self.inner.request(run, token)
    }

    fn take_ready(&self) -> Vec<u64> {
        self.inner.take_ready()
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.inner.ready_fd()
    }

    fn settled(&self) {
        // Noted before the fault thread is woken, which then finds it.
        self.flag.said.store(true, Ordering::Release);
        self.inner.settled();
    }

    fn request_deferred(&self, run: &PageRun, token: u64) -> Result<bool> {
        self.inner.request_deferred(run, token)
    }

    fn flush_requests(&self) {
        self.inner.flush_requests();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_word_is_taken_once() {
        let flag = Arc::new(SettleFlag::default());
        assert!(!flag.take(), "not said yet");
        flag.said.store(true, Ordering::Release);
        assert!(flag.take());
        assert!(!flag.take(), "passed on once");
    }
}
