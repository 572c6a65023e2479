//! # lmig-mem
//!
//! The memory side of lmig: the regions a program registers for live
//! migration, reading and placing their pages, and finding the pages the
//! program wrote since the last pre-copy round.
//!
//! * [`RegionOptions`] / [`Region`]: anonymous private, `MAP_SHARED`
//!   anonymous or memfd-backed mappings, optionally at a fixed address
//!   (`MAP_FIXED_NOREPLACE`) so the destination maps them at the same address
//!   and pointers into them stay valid; transparent huge pages optional.
//! * [`RegionSet`]: the program's regions by [`RegionId`]; its
//!   [`RegionLayout`](lmig_core::model::RegionLayout) is what the source
//!   announces. It is the session's [`MemorySource`](lmig_core::MemorySource)
//!   and, on a destination whose program mapped its own regions, its
//!   [`MemorySink`](lmig_core::MemorySink). [`DestinationRegions`] is a sink
//!   that maps the source's layout itself.
//! * [`postcopy`]: the destination's post-copy half of the sink — missing
//!   pages registered with userfaultfd, faults read by `wait_fault`, pages
//!   placed with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` / `UFFDIO_CONTINUE`
//!   (kernel-mode faults need privilege, see the module docs).
//! * [`split`]: split memory (IPmigrate) — a page-host service and the
//!   running host's remote paging, eviction, partial migration and
//!   reintegration over any [`lmig_core::Channel`].
//! * [`track`]: dirty trackers behind [`lmig_core::DirtyTracker`] — uffd
//!   write-protect + `PAGEMAP_SCAN` (the default), soft-dirty, a manual
//!   tracker the program marks, an adapter for a VMM's dirty bitmap — and
//!   [`best_tracker`], which probes once and says what it picked and why.
//! * `conformance` (feature `conformance`): the kit a VMM runs against its
//!   own [`DirtyLog`]; the memory kits are `lmig_core::conformance`.
//!
//! ## Guarantees
//!
//! * Region memory is never viewed as `&[u8]`: lmig copies it through raw
//!   pointers, so the program's threads (or vCPUs) may write while pre-copy
//!   reads. A page read while being written may be torn; the tracker reports
//!   it again, and the final round runs with the program paused.
//! * A sink checks every run against its region, and the buffer against the
//!   run, before any byte is written; a layout that differs from the
//!   destination's is refused in `prepare`, naming the first difference.
//! * `prepare` pre-faults destination memory (`MADV_POPULATE_WRITE`), so no
//!   page placed during the freeze takes a first-touch fault.
//! * A tracker's `collect` reports every page written since the previous
//!   `start`/`collect`; a write racing a collect is reported by it or by the
//!   next one (except soft-dirty, see [`SoftDirtyTracker`]).
//!
//! ## Non-goals
//!
//! No wire format (lmig-transport), no session logic (lmig-core), no hugetlbfs
//! regions yet (page sizes other than the base page are refused).
//!
//! ## Kernel requirements
//!
//! * **Linux 6.7+** for `PAGEMAP_SCAN` and `UFFD_FEATURE_WP_ASYNC` (the
//!   default tracker); shmem and memfd regions also need
//!   `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (5.19+).
//! * **userfaultfd access**: `CAP_SYS_PTRACE`, or `vm.unprivileged_userfaultfd
//!   = 1`, or read/write access to `/dev/userfaultfd` (6.1+). Without any of
//!   these the tracker falls back to `UFFD_USER_MODE_ONLY` (5.11+), which is
//!   enough for async write-protect tracking: writes by the kernel on the
//!   program's behalf (`read()` into a region) are tracked too, because async
//!   faults never reach a handler.
//! * **Post-copy** needs userfaultfd with kernel-mode faults (privilege as
//!   above): with only `UFFD_USER_MODE_ONLY`, a system call that touches a
//!   missing page fails with `EFAULT` instead of waiting, so
//!   `begin_postcopy` refuses unless
//!   [`PostcopyOptions::allow_user_mode_only`] is set. Shared and memfd
//!   regions need `UFFD_FEATURE_MISSING_SHMEM` (4.11+); memfd regions use
//!   minor faults + `UFFDIO_CONTINUE` when `UFFD_FEATURE_MINOR_SHMEM` (5.13+)
//!   is there.
//! * Soft-dirty needs `CONFIG_MEM_SOFT_DIRTY`; many distribution kernels
//!   (and this project's CI) have it off, and the probe reports
//!   [`MemError::Unsupported`] there.
//! * `MAP_FIXED_NOREPLACE` (4.17+), `MADV_POPULATE_WRITE` (5.14+), `memfd_create`.
//!
//! ## Features
//!
//! * `bench-internals`: measurement hooks for benchmarks
//!   (`track::measure_scan_cost`, `track::raw_pagemap_scan`,
//!   `UffdWpTracker::raw_scan`); not for programs.
//!
//! ## Example
//!
//! ```
//! use lmig_core::model::{PageRun, RegionId, RegionPages};
//! use lmig_core::{DirtyTracker, MemorySink, MemorySource};
//! use lmig_mem::{Backing, DestinationRegions, RegionOptions, RegionSet, best_tracker};
//!
//! // Source: the program registers its memory.
//! let heap = RegionOptions::new(RegionId(1), 64 * 4096).map()?;
//! let shared = RegionOptions::new(RegionId(2), 16 * 4096).backing(Backing::Memfd).map()?;
//! let regions = RegionSet::new([heap, shared])?;
//!
//! // Probe once, take the best tracker, say which.
//! let (mut tracker, choice) = best_tracker(&regions)?;
//! println!("{choice}");
//! tracker.start()?;
//! regions.get(RegionId(1))?.write_at(5 * 4096, b"hello")?;
//! let mut dirty = RegionPages::empty(regions.layout());
//! tracker.collect(&mut dirty)?;
//! assert!(dirty.get(RegionId(1))?.contains(5));
//! tracker.stop()?;
//!
//! // Destination: map the announced layout, place the dirty pages.
//! let dest = DestinationRegions::new(Backing::Private);
//! dest.prepare(&regions.layout())?;
//! let mut page = vec![0; 4096];
//! for run in dirty.chunked_runs(64) {
//!     page.resize(run.count as usize * 4096, 0);
//!     regions.read_run(&run, &mut page)?;
//!     dest.write_pages(&run, &page)?;
//! }
//! let mut back = [0u8; 5];
//! dest.regions().unwrap().get(RegionId(1))?.read_at(5 * 4096, &mut back)?;
//! assert_eq!(&back, b"hello");
//! // A page outside a region is refused before anything is written.
//! assert!(dest.write_pages(&PageRun::new(RegionId(2), 16, 1), &page[..4096]).is_err());
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
mod memory;
pub mod postcopy;
pub mod region;
pub mod split;
mod sys;
pub mod track;

pub use error::{MemError, Result};
pub use lmig_core::model::RegionId;
pub use postcopy::{PostcopyOptions, PostcopyStats};
pub use region::{
    Backing, DestinationRegions, Region, RegionOptions, RegionSet, layout_difference,
};
pub use track::{
    AutoTracker, DirtyLog, DirtyLogTracker, DirtyMarker, ManualTracker, SoftDirtyTracker,
    TrackerChoice, TrackerKind, TrackerProbe, UffdWpTracker, best_tracker,
};

/// The system's base page size in bytes (every region's page size).
pub fn page_size() -> usize {
    sys::page_size()
}
