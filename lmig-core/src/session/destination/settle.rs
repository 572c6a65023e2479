//! The program's word that the work it parked after the resume has run
//! ([`PageResidency::settled`]), passed on to the source as
//! `Message::DemandSettled` by the post-copy fault thread: the source's
//! push hold-off then ends at once instead of at its bound.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::Result;
use crate::model::PageRun;
use crate::traits::PageResidency;

/// How often the fault thread looks for the program's word, until it
/// passed it on (once the program asked for pages, in the first
/// [`SETTLE_LOOK`] of post-copy).
pub(super) const SETTLE_TICK: Duration = Duration::from_millis(1);
/// How long after post-copy starts the fault thread looks for it that
/// often: a source's hold-off is over long before (its bound).
pub(super) const SETTLE_LOOK: Duration = Duration::from_secs(2);

/// Shared by the program's residency handle and the fault thread.
#[derive(Debug, Default)]
pub(super) struct SettleFlag {
    /// The program asked for pages through its residency handle.
    asked: AtomicBool,
    /// The program said it (once is enough).
    said: AtomicBool,
    /// The fault thread took it to send.
    taken: AtomicBool,
}

impl SettleFlag {
    /// The program parks work (it asked for pages) and its word was not
    /// passed on yet: the fault thread looks for it often.
    pub(super) fn pending(&self) -> bool {
        self.asked.load(Ordering::Relaxed) && !self.taken.load(Ordering::Acquire)
    }

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
        if !self.flag.asked.load(Ordering::Relaxed) {
            self.flag.asked.store(true, Ordering::Relaxed);
        }
        self.inner.request(run, token)
    }

    fn take_ready(&self) -> Vec<u64> {
        self.inner.take_ready()
    }

    fn ready_fd(&self) -> BorrowedFd<'_> {
        self.inner.ready_fd()
    }

    fn settled(&self) {
        self.inner.settled();
        self.flag.said.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_word_is_taken_once() {
        let flag = Arc::new(SettleFlag::default());
        assert!(!flag.pending(), "nothing parked: not looked for");
        flag.asked.store(true, Ordering::Relaxed);
        assert!(flag.pending());
        assert!(!flag.take(), "not said yet");
        assert!(flag.pending(), "still looked for");
        flag.said.store(true, Ordering::Release);
        assert!(flag.take());
        assert!(!flag.take(), "passed on once");
        assert!(!flag.pending());
    }
}
