//! [`SplitOptions`]: how the running host pages.

use std::time::Duration;

use crate::split::ACK_TIMEOUT;

/// How the running host pages: `SplitOptions::default()` and the `with_*`
/// setters (the struct is `#[non_exhaustive]`).
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub struct SplitOptions {
    /// Pages fetched with a faulting page: up to this many after it and half
    /// as many before it, when the same host owns them (pre-paging). Default 8.
    pub prepage: u32,
    /// Busy-poll the userfaultfd this long before blocking. Default 0.
    pub spin: Duration,
    /// Longest wait for a gather or a partial migration. Default 120 s.
    pub timeout: Duration,
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self {
            prepage: 8,
            spin: Duration::ZERO,
            timeout: ACK_TIMEOUT,
        }
    }
}

impl SplitOptions {
    /// Sets [`prepage`](Self::prepage).
    #[must_use]
    pub fn with_prepage(mut self, prepage: u32) -> Self {
        self.prepage = prepage;
        self
    }

    /// Sets [`spin`](Self::spin).
    #[must_use]
    pub fn with_spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}
