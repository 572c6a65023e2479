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
//! * [`Region::declare_free`] / [`Region::declare_used`]: ranges the
//!   program does not use (self-ballooning); they are given back to the
//!   kernel, never sent, and arrive empty.
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
//! * [`probe()`]: what this kernel offers for dirty tracking and post-copy,
//!   one [`lmig_core::probe::Verdict`] each (the tracker that would be
//!   picked and why; MISSING / MINOR faults, kernel-mode or not), naming the
//!   fix when something is missing; `lmig_net::probe` gives the network part.
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
//! regions yet: page sizes other than the base page are refused in a layout,
//! and adopting hugetlbfs memory (`MAP_HUGETLB`, `MFD_HUGETLB`) is refused
//! with [`MemError::Unsupported`] naming what is missing (huge-page page
//! arithmetic, tracking and `UFFDIO_COPY` of whole huge pages). Transparent
//! huge pages work. Adopted memory must be anonymous or a shmem file (memfd,
//! tmpfs): a mapping of a file on disk is refused, since userfaultfd cannot
//! serve its missing pages.
//!
//! ## Guest memory of a VMM
//!
//! A VMM maps its guest memory itself and keeps it; lmig adopts it instead
//! of mapping its own. For each guest memory region, the VMM hands over:
//!
//! * its **host address and length** (page aligned), wrapped in a
//!   [`ForeignMemory`] — the `unsafe` step, whose `# Safety` section is the
//!   contract: the range stays mapped readable and writable while the
//!   region lives, the VMM unmaps it afterwards (lmig never does), and
//!   nothing holds a Rust reference over it;
//! * its **backing**, a [`ForeignBacking`]: `AnonymousPrivate` for
//!   anonymous memory, `AnonymousShared` for `MAP_SHARED` anonymous memory,
//!   or `SharedFile { fd, offset }` for a `MAP_SHARED` memfd or tmpfs file
//!   mapped from `offset`;
//! * a **[`RegionId`]** the destination VMM gives the same region (the
//!   guest physical address belongs to the VMM's own state, not to lmig).
//!
//! With rust-vmm's `vm-memory`, each `GuestRegionMmap` of a
//! `GuestMemoryMmap` gives these as `region.as_ptr()` (host address),
//! `region.len()`, and `region.file_offset()`: `None` for its default
//! anonymous private mapping, `Some(fo)` for a file mapping (`fo.file()`,
//! `fo.start()`), which must be a memfd or tmpfs file. [`Region::adopt`]
//! checks the range against `/proc/self/maps` (mapped, writable, that
//! backing, that file offset) and refuses bad input with
//! [`MemError::AdoptRefused`] before anything is registered; a
//! [`RegionSet`] of adopted regions refuses overlaps. The set is then the
//! session's [`MemorySource`](lmig_core::MemorySource) on the source (track
//! it with [`best_tracker`], or hand KVM's dirty log over with
//! [`DirtyLogTracker`]), and on the destination, where the VMM mapped and
//! adopted the same layout before the migration, its
//! [`MemorySink`](lmig_core::MemorySink) — pre-copy, post-copy (missing
//! faults on anonymous memory, minor faults on memfds) and [`split`] memory
//! work on adopted regions as on the ones lmig maps.
//!
//! ```
//! use std::os::fd::{AsFd, OwnedFd};
//! use lmig_mem::{ForeignBacking, ForeignMemory, Region, RegionId, RegionSet};
//!
//! /// One guest memory region as a VMM holds it (vm-memory: `as_ptr()`,
//! /// `len()`, `file_offset()`).
//! struct GuestRegion {
//!     host: *mut u8,
//!     len: usize,
//!     file: Option<(OwnedFd, u64)>,
//! }
//!
//! fn hand_over(guest: &[GuestRegion]) -> lmig_mem::Result<RegionSet> {
//!     let mut regions = Vec::new();
//!     for (i, g) in guest.iter().enumerate() {
//!         let backing = match &g.file {
//!             Some((fd, offset)) => ForeignBacking::SharedFile { fd: fd.as_fd(), offset: *offset },
//!             None => ForeignBacking::AnonymousPrivate,
//!         };
//!         // SAFETY: the VMM keeps its guest memory mapped, writable and
//!         // free of Rust references until the returned set is dropped, and
//!         // unmaps it only after that.
//!         let memory = unsafe { ForeignMemory::new(g.host, g.len) };
//!         regions.push(Region::adopt(RegionId(i as u32), memory, backing)?);
//!     }
//!     RegionSet::new(regions)
//! }
//!
//! // A guest of one memfd region, mapped by the "VMM" from offset 0.
//! let len = 256 * lmig_mem::page_size();
//! let fd = nix::sys::memfd::memfd_create("guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
//! nix::unistd::ftruncate(&fd, len as i64)?;
//! let prot = nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE;
//! // SAFETY: a fresh shared mapping of our own memfd.
//! let host = unsafe {
//!     nix::sys::mman::mmap(None, len.try_into()?, prot, nix::sys::mman::MapFlags::MAP_SHARED, &fd, 0)?
//! };
//! let guest = [GuestRegion { host: host.as_ptr().cast(), len, file: Some((fd, 0)) }];
//! let set = hand_over(&guest)?;
//! assert!(set.regions()[0].is_adopted());
//! drop(set);
//! // SAFETY: the set that used the memory is gone; the VMM unmaps it.
//! unsafe { nix::sys::mman::munmap(host, len)? };
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
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
//! * `kvm`: `track::kvm`, KVM's dirty log of a VMM's memory slots mapped
//!   onto regions (`KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG` in chunks with
//!   `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`); pulls in kvm-ioctls and kvm-bindings.
//!
//! ## Stable types
//!
//! Settings (`…Config`, `…Options`) are `#[non_exhaustive]` structs with
//! public fields: build one from `Default::default()` (or from its `new`
//! when some values are required) and chain its `#[must_use]`
//! `with_<field>` setters. Reports, statistics, events and the enums that
//! may grow (errors, phases, modes, outcomes, verdicts) are
//! `#[non_exhaustive]` too: read their fields, match them with a `_` arm.
//! A field or variant added later is then no breaking change. The
//! protocol's messages and records (lmig-core's `model`, `protocol` and
//! `split`, lmig-transport's handshake messages) stay exhaustive: a
//! variant added there is a new protocol version.
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

// First: its macros (`debug!`, `info!`, `warn!`, `error!`, `phase_span!`)
// are in scope in every module below.
#[macro_use]
mod log;

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod cpu;
pub mod error;
mod memory;
pub mod postcopy;
mod probe;
pub mod region;
pub mod split;
mod sys;
pub mod track;

pub use error::{AdoptRefusal, MemError, Result};
pub use lmig_core::model::RegionId;
pub use postcopy::{
    BACKGROUND_THREAD_NICE, PostcopyOptions, PostcopyStats, Residency, URGENT_THREAD_NICE,
    URGENT_THREAD_SLICE,
};
pub use postcopy::{
    FaultPathAffinity, fault_path_affinity, fault_path_cpu, fault_path_together_cpu,
    set_fault_path_affinity, set_fault_path_cpu,
};
pub use probe::probe;
pub use region::{
    Backing, DestinationRegions, ForeignBacking, ForeignMemory, Region, RegionOptions, RegionSet,
    layout_difference,
};
pub use track::{
    AutoTracker, DirtyLog, DirtyLogTracker, DirtyMarker, ManualTracker, SoftDirtyTracker,
    TrackerChoice, TrackerKind, TrackerProbe, UffdWpTracker, best_tracker,
};

/// The system's base page size in bytes (every region's page size).
pub fn page_size() -> usize {
    sys::page_size()
}
