//! Dirty trackers: backends of [`lmig_core::DirtyTracker`] over a
//! [`RegionSet`]'s regions, and the probe that picks the best one.
//!
//! | tracker | needs | exact under concurrent writes |
//! |---|---|---|
//! | [`UffdWpTracker`] (default) | Linux 6.7+, userfaultfd | yes: report and re-protect in one page-table walk |
//! | [`SoftDirtyTracker`] | `CONFIG_MEM_SOFT_DIRTY` | only with the writers paused during `collect` |
//! | [`ManualTracker`] | the program marks its writes | yes (atomic bitmap) |
//! | [`DirtyLogTracker`] | a VMM's dirty bitmap (KVM dirty log) | as exact as the log |
//! | `kvm::KvmDirtyLog` (feature `kvm`) in a [`DirtyLogTracker`] | KVM memory slots over the regions | yes, for writes made through KVM |
//!
//! [`TrackerProbe::run`] probes the kernel once; [`best_tracker`] creates the
//! best automatic tracker and says why the others were rejected.

#[cfg(feature = "bench-internals")]
mod bench;
mod dirty_log;
#[cfg(feature = "kvm")]
pub mod kvm;
mod manual;
mod range;
mod soft_dirty;
mod uffd_wp;

use std::fmt;

use lmig_core::DirtyTracker;
use lmig_core::model::RegionPages;

#[cfg(feature = "bench-internals")]
pub use bench::{ScanFigures, measure_scan_cost, raw_pagemap_scan};
pub use dirty_log::{DirtyLog, DirtyLogTracker};
pub use manual::{DirtyMarker, ManualTracker};
pub use soft_dirty::SoftDirtyTracker;
pub use uffd_wp::{PROTECT_CHUNK, SCAN_VEC_LEN, UffdWpSupport, UffdWpTracker};

pub use crate::sys::uffd::UffdOrigin;

use crate::error::{MemError, Result};
use crate::region::RegionSet;

/// The kinds of tracker.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TrackerKind {
    /// [`UffdWpTracker`].
    #[cfg_attr(feature = "serde", serde(rename = "uffd-wp+pagemap-scan"))]
    UffdWp,
    /// [`SoftDirtyTracker`].
    SoftDirty,
    /// [`ManualTracker`].
    Manual,
    /// [`DirtyLogTracker`].
    DirtyLog,
}

impl TrackerKind {
    /// The name trackers report through [`DirtyTracker::name`].
    pub fn name(self) -> &'static str {
        match self {
            Self::UffdWp => "uffd-wp+pagemap-scan",
            Self::SoftDirty => "soft-dirty",
            Self::Manual => "manual",
            Self::DirtyLog => "dirty-log",
        }
    }
}

impl fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the kernel offers for automatic tracking, probed once at start-up.
#[derive(Debug)]
#[non_exhaustive]
pub struct TrackerProbe {
    /// userfaultfd async write-protect + `PAGEMAP_SCAN`, or why not.
    pub uffd_wp: Result<UffdWpSupport>,
    /// soft-dirty, or why not.
    pub soft_dirty: Result<()>,
}

impl TrackerProbe {
    /// Probe the kernel (a throwaway userfaultfd, one test page for soft-dirty).
    pub fn run() -> Self {
        let uffd_wp = UffdWpTracker::probe();
        // The soft-dirty probe writes /proc/self/clear_refs, which resets
        // soft-dirty bits process-wide: harmless unless a SoftDirtyTracker
        // is running, which is why this runs once, at start-up.
        let soft_dirty = SoftDirtyTracker::probe();
        Self {
            uffd_wp,
            soft_dirty,
        }
    }

    /// The best automatic tracker available, if any.
    pub fn best(&self) -> Option<TrackerKind> {
        if self.uffd_wp.is_ok() {
            Some(TrackerKind::UffdWp)
        } else if self.soft_dirty.is_ok() {
            Some(TrackerKind::SoftDirty)
        } else {
            None
        }
    }
}

impl fmt::Display for TrackerProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.uffd_wp {
            Ok(s) => write!(
                f,
                "uffd-wp+pagemap-scan: available (userfaultfd via {:?}, shmem: {})",
                s.origin, s.shmem
            )?,
            Err(e) => write!(f, "uffd-wp+pagemap-scan: rejected: {e}")?,
        }
        match &self.soft_dirty {
            Ok(()) => write!(f, "; soft-dirty: available"),
            Err(e) => write!(f, "; soft-dirty: rejected: {e}"),
        }
    }
}

/// The automatic tracker [`best_tracker`] picked.
#[derive(Debug)]
#[non_exhaustive]
pub enum AutoTracker {
    /// userfaultfd async write-protect + `PAGEMAP_SCAN`.
    UffdWp(UffdWpTracker),
    /// soft-dirty bits.
    SoftDirty(SoftDirtyTracker),
}

impl AutoTracker {
    /// Which kind it is.
    pub fn kind(&self) -> TrackerKind {
        match self {
            Self::UffdWp(_) => TrackerKind::UffdWp,
            Self::SoftDirty(_) => TrackerKind::SoftDirty,
        }
    }
}

impl DirtyTracker for AutoTracker {
    fn name(&self) -> &'static str {
        self.kind().name()
    }
    fn start(&mut self) -> lmig_core::Result<()> {
        match self {
            Self::UffdWp(t) => t.start(),
            Self::SoftDirty(t) => t.start(),
        }
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        match self {
            Self::UffdWp(t) => t.collect(dirty),
            Self::SoftDirty(t) => t.collect(dirty),
        }
    }
    fn collect_paused(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        match self {
            Self::UffdWp(t) => t.collect_paused(dirty),
            Self::SoftDirty(t) => t.collect_paused(dirty),
        }
    }
    fn stop(&mut self) -> lmig_core::Result<()> {
        match self {
            Self::UffdWp(t) => t.stop(),
            Self::SoftDirty(t) => t.stop(),
        }
    }
    fn clearer(&self) -> Option<Box<dyn lmig_core::DirtyClearer>> {
        match self {
            Self::UffdWp(t) => t.clearer(),
            Self::SoftDirty(t) => t.clearer(),
        }
    }
}

/// Which tracker [`best_tracker`] picked and why it rejected the better ones.
#[derive(Debug)]
#[non_exhaustive]
pub struct TrackerChoice {
    /// The kind picked.
    pub picked: TrackerKind,
    /// Better kinds that were rejected, each with the reason (typically
    /// [`MemError::Unsupported`]).
    pub rejected: Vec<(TrackerKind, MemError)>,
}

impl fmt::Display for TrackerChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dirty tracker: {}", self.picked)?;
        for (k, e) in &self.rejected {
            write!(f, "; {k} rejected: {e}")?;
        }
        Ok(())
    }
}

/// Create the best automatic tracker for `regions`: uffd-wp + `PAGEMAP_SCAN`,
/// else soft-dirty. When neither works the error lists both reasons; the
/// program then marks its writes itself ([`ManualTracker`]) or hands over its
/// VMM's dirty log ([`DirtyLogTracker`]).
pub fn best_tracker(regions: &RegionSet) -> Result<(AutoTracker, TrackerChoice)> {
    let mut rejected = Vec::new();
    match UffdWpTracker::new(regions) {
        Ok(t) => {
            info!(
                tracker = TrackerKind::UffdWp.name(),
                "dirty tracker chosen: the best there is"
            );
            return Ok((
                AutoTracker::UffdWp(t),
                TrackerChoice {
                    picked: TrackerKind::UffdWp,
                    rejected,
                },
            ));
        }
        Err(e) => {
            info!(tracker = TrackerKind::UffdWp.name(), reason = %e, "dirty tracker rejected");
            rejected.push((TrackerKind::UffdWp, e))
        }
    }
    match SoftDirtyTracker::new(regions) {
        Ok(t) => {
            info!(
                tracker = TrackerKind::SoftDirty.name(),
                "dirty tracker chosen: uffd-wp was rejected"
            );
            return Ok((
                AutoTracker::SoftDirty(t),
                TrackerChoice {
                    picked: TrackerKind::SoftDirty,
                    rejected,
                },
            ));
        }
        Err(e) => {
            info!(tracker = TrackerKind::SoftDirty.name(), reason = %e, "dirty tracker rejected");
            rejected.push((TrackerKind::SoftDirty, e))
        }
    }
    warn!("no automatic dirty tracker: the program must mark its writes or hand over a dirty log");
    Err(MemError::NoTracker {
        reasons: rejected
            .iter()
            .map(|(k, e)| format!("{k}: {e}"))
            .collect::<Vec<_>>()
            .join("; "),
    })
}
