//! [`PostcopyOptions`] and [`PostcopyStats`].

use std::time::Duration;
#[cfg(feature = "bench-internals")]
use std::time::Instant;

use lmig_core::model::RegionId;

use crate::sys::uffd::UffdOrigin;

/// How post-copy handles faults: `PostcopyOptions::default()` and the
/// `with_*` setters (the struct is `#[non_exhaustive]`).
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub struct PostcopyOptions {
    /// Accept a userfaultfd that only sees user-mode faults (see the
    /// [module docs](crate::postcopy)): system calls touching a missing page then fail
    /// with `EFAULT`. Default false.
    pub allow_user_mode_only: bool,
    /// Serve memfd regions with minor faults and `UFFDIO_CONTINUE` when the
    /// kernel offers `UFFD_FEATURE_MINOR_SHMEM`. Default true.
    pub minor_faults: bool,
    /// Busy-poll the userfaultfd this long before blocking in `poll`: where
    /// waking a blocked thread is slow compared with placing a page (virtual
    /// CPUs, deep idle states) this cuts the fault latency, at the price of
    /// CPU time. The polling thread yields
    /// between reads, so it never keeps another runnable thread (the one
    /// answering the previous fault) off its CPU. Default 0.
    pub spin: Duration,
    /// Remember the pages that faulted ([`PostcopyStats::faulted`], capped
    /// at 2^20 entries). Default true.
    pub record_faults: bool,
}

impl Default for PostcopyOptions {
    fn default() -> Self {
        Self {
            allow_user_mode_only: false,
            minor_faults: true,
            spin: Duration::ZERO,
            record_faults: true,
        }
    }
}

impl PostcopyOptions {
    /// Sets [`allow_user_mode_only`](Self::allow_user_mode_only).
    #[must_use]
    pub fn with_allow_user_mode_only(mut self, allow_user_mode_only: bool) -> Self {
        self.allow_user_mode_only = allow_user_mode_only;
        self
    }

    /// Sets [`minor_faults`](Self::minor_faults).
    #[must_use]
    pub fn with_minor_faults(mut self, minor_faults: bool) -> Self {
        self.minor_faults = minor_faults;
        self
    }

    /// Sets [`spin`](Self::spin).
    #[must_use]
    pub fn with_spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// Sets [`record_faults`](Self::record_faults).
    #[must_use]
    pub fn with_record_faults(mut self, record_faults: bool) -> Self {
        self.record_faults = record_faults;
        self
    }
}

/// What post-copy did on this side.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct PostcopyStats {
    /// How the userfaultfd was opened.
    pub origin: Option<UffdOrigin>,
    /// A memfd region was served with minor faults (`UFFDIO_CONTINUE`).
    pub minor_faults: bool,
    /// Fault messages read.
    pub faults: u64,
    /// Runs `wait_fault` returned (pages the session asked the source for).
    pub requested: u64,
    /// Faults on pages that were no longer missing, answered at once.
    pub stale_faults: u64,
    /// `EEXIST` answers: the page was already there (its waiters were woken).
    pub already_present: u64,
    /// `EAGAIN` answers retried.
    pub retries: u64,
    /// Missing pages placed.
    pub placed: u64,
    /// Waits for a fault that ended because the caller's other descriptor
    /// turned readable (`wait_fault_or`: the destination's one fault-path
    /// thread, woken by a reply to its requests).
    pub also_woke: u64,
    /// Pages still missing (not placed yet): their touchers wait. Stays
    /// above zero after a post-copy whose source was lost for good.
    pub missing: u64,
    /// The pages `wait_fault` returned, in order (capped).
    pub faulted: Vec<(RegionId, u64)>,
    /// When each page of [`Self::faulted`] was read from the userfaultfd
    /// and when it was placed (capped like it): measurement for benchmarks.
    #[cfg(feature = "bench-internals")]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub fault_trace: Vec<FaultTrace>,
}

/// One network fault's way through this side (feature `bench-internals`).
#[cfg(feature = "bench-internals")]
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub struct FaultTrace {
    /// The region.
    pub region: RegionId,
    /// The page that faulted.
    pub page: u64,
    /// `wait_fault` returned it (the request leaves right after).
    pub read_at: Instant,
    /// The placement that brought it began (the reply or pushed message
    /// was read and decoded; before the claim and the fill); `None` if not
    /// placed yet.
    pub place_began: Option<Instant>,
    /// Its placement returned (its waiters woken); `None` if not yet.
    pub placed_at: Option<Instant>,
    /// Pages of the placement that brought it: a reply to a fault is one
    /// page, a pushed message more.
    pub placed_with: u64,
}
