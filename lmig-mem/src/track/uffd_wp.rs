//! The default tracker: userfaultfd write-protect in async mode plus
//! `PAGEMAP_SCAN` (Linux 6.7+).
//!
//! `start` registers every region with a userfaultfd in `MODE_WP` (features
//! `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`, plus
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` when a region is shmem or memfd) and
//! write-protects each range once. A write to a protected page is resolved by
//! the kernel itself (no handler thread, no trip to user space) and marks the
//! page written.
//! `collect` is one `PAGEMAP_SCAN` per region with
//! `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC` and `PAGE_IS_WRITTEN` as
//! category and return mask: the kernel reports the written pages and
//! re-protects them in the same page-table walk, so a write racing the
//! collect is reported now or at the next collect, never lost.
//!
//! Both the initial write-protect and every scan go in chunks of
//! [`PROTECT_CHUNK`]: changing protection over a range (and a write-matching
//! scan) holds an MMU-notifier invalidation over the whole range of the
//! call, and a KVM vCPU faulting inside it waits until the call ends. One
//! call over 1 GiB stalled a guest for ~35 ms; per chunk a writer waits at
//! most one chunk's work. The collect made while the program is paused
//! ([`DirtyTracker::collect_paused`], the freeze's final collect) has no
//! writer to wait and scans each region in one call.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use lmig_core::model::PageRun;
#[cfg(feature = "bench-internals")]
use lmig_core::model::RegionId;
use lmig_core::model::RegionPages;
use lmig_core::{DirtyClearer, DirtyTracker};

use super::range::{TrackedRange, open_pagemap};
use crate::error::{MemError, Result};
use crate::region::RegionSet;
use crate::sys::pagemap::{
    self, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, PageRegion, ScanSpec,
};
use crate::sys::uffd::{self, UffdOrigin};

/// `page_region` slots handed to one `PAGEMAP_SCAN` call (96 KiB). Runs of
/// written pages merge into one slot; a fuller scan loops from `walk_end`.
pub const SCAN_VEC_LEN: usize = 4096;

const NAME: &str = "uffd-wp+pagemap-scan";

/// Bytes write-protected by one `UFFDIO_WRITEPROTECT` or scanned by one
/// `PAGEMAP_SCAN` call (4 MiB): a program (or vCPU) writing inside the range
/// of a call waits for that call, so no writer waits longer than one
/// chunk's work (~0.1 ms populated), while 256 calls per GiB cost little.
pub const PROTECT_CHUNK: u64 = 4 << 20;

/// The chunks `[start, end)` of `[start, start + len)`, cut at multiples of
/// [`PROTECT_CHUNK`] (addresses, so chunks line up with page tables).
pub(super) fn chunks(start: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = start + len;
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = ((at / PROTECT_CHUNK) + 1) * PROTECT_CHUNK;
        let chunk = (at, next.min(end));
        at = chunk.1;
        Some(chunk)
    })
}

/// How a scan splits its range into `PAGEMAP_SCAN` calls.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Calls {
    /// At most [`PROTECT_CHUNK`] per call: a writer waits for one chunk.
    Chunked,
    /// One call over the whole range (more only when the output vector
    /// fills up): for a paused program, where no writer waits.
    Whole,
}

pub(super) const COLLECT: ScanSpec = ScanSpec {
    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
    category_mask: PAGE_IS_WRITTEN,
    category_anyof_mask: 0,
    return_mask: PAGE_IS_WRITTEN,
};

/// What the kernel's userfaultfd offers, found by [`UffdWpTracker::probe`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UffdWpSupport {
    /// How this process can open a userfaultfd.
    pub origin: UffdOrigin,
    /// `UFFD_FEATURE_*` bits the kernel offers.
    pub features: u64,
    /// Shmem and memfd regions can be tracked too (`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`).
    pub shmem: bool,
}

/// Dirty tracking by userfaultfd async write-protect + `PAGEMAP_SCAN`.
///
/// Holds its own userfaultfd (an [`OwnedFd`]); only the source registers its
/// regions for tracking, so a destination may register the same kind of
/// regions for post-copy (missing/minor faults) with its own userfaultfd.
/// Dropping the tracker (or [`DirtyTracker::stop`]) unregisters the regions,
/// which also removes the write protection.
#[derive(Debug)]
pub struct UffdWpTracker {
    uffd: OwnedFd,
    support: UffdWpSupport,
    pagemap: File,
    ranges: Vec<TrackedRange>,
    buf: Vec<PageRegion>,
    registered: bool,
}

fn open_error(e: std::io::Error) -> MemError {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => MemError::Unsupported {
            feature: "userfaultfd",
            needs: "a kernel built with CONFIG_USERFAULTFD",
        },
        Some(libc::EPERM) | Some(libc::EACCES) => MemError::Unsupported {
            feature: "userfaultfd",
            needs: "CAP_SYS_PTRACE, vm.unprivileged_userfaultfd = 1, access to /dev/userfaultfd, \
                    or a kernel >= 5.11 for UFFD_USER_MODE_ONLY",
        },
        _ => MemError::os("userfaultfd", "a new userfaultfd", e),
    }
}

impl UffdWpTracker {
    /// Probe what the kernel offers (opens and closes a throwaway userfaultfd).
    pub fn probe() -> Result<UffdWpSupport> {
        let (features, origin) = uffd::probe_features().map_err(open_error)?;
        if features & uffd::UFFD_FEATURE_WP_ASYNC == 0 {
            return Err(MemError::Unsupported {
                feature: "UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN",
                needs: "Linux >= 6.7",
            });
        }
        Ok(UffdWpSupport {
            origin,
            features,
            shmem: features & uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM != 0,
        })
    }

    /// A tracker over every region of `regions` (not started yet).
    pub fn new(regions: &RegionSet) -> Result<Self> {
        Self::open(regions, false)
    }

    /// `new`, optionally forcing `UFFD_USER_MODE_ONLY` (tests).
    pub(crate) fn open(regions: &RegionSet, user_mode_only: bool) -> Result<Self> {
        let support = Self::probe()?;
        let wants_shmem = regions.regions().iter().any(|r| r.backing().is_shmem());
        if wants_shmem && !support.shmem {
            return Err(MemError::Unsupported {
                feature: "UFFD_FEATURE_WP_HUGETLBFS_SHMEM (tracking shmem/memfd regions)",
                needs: "Linux >= 5.19",
            });
        }
        let (fd, origin) = if user_mode_only {
            let fd = uffd::userfaultfd(uffd::UFFD_USER_MODE_ONLY).map_err(open_error)?;
            (fd, UffdOrigin::UserModeOnly)
        } else {
            uffd::open_best().map_err(open_error)?
        };
        let mut want = uffd::UFFD_FEATURE_WP_ASYNC | uffd::UFFD_FEATURE_WP_UNPOPULATED;
        if wants_shmem {
            want |= uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        }
        uffd::api(fd.as_fd(), want)
            .map_err(|e| MemError::os("UFFDIO_API", "the tracker's userfaultfd", e))?;
        let pagemap = open_pagemap()?;
        let mut tracker = Self {
            uffd: fd,
            support: UffdWpSupport { origin, ..support },
            pagemap,
            ranges: TrackedRange::of(regions),
            buf: Vec::with_capacity(SCAN_VEC_LEN),
            registered: false,
        };
        tracker.check_scan()?;
        Ok(tracker)
    }

    /// How the userfaultfd was opened and what it offers.
    pub fn support(&self) -> UffdWpSupport {
        self.support
    }

    /// A harmless read-only scan: tells `PAGEMAP_SCAN` is there (ENOTTY otherwise).
    fn check_scan(&mut self) -> Result<()> {
        let Some(r) = self.ranges.first() else {
            return Ok(());
        };
        let spec = ScanSpec {
            flags: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_WRITTEN,
        };
        let end = r.start + r.page_size;
        match pagemap::scan(self.pagemap.as_fd(), r.start, end, spec, &mut self.buf) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
                Err(MemError::Unsupported {
                    feature: "PAGEMAP_SCAN",
                    needs: "Linux >= 6.7",
                })
            }
            Err(e) => Err(MemError::os("PAGEMAP_SCAN", r.describe(), e)),
        }
    }

    fn unregister_all(&mut self) -> Result<()> {
        let mut first_err = None;
        for r in &self.ranges {
            if let Err(e) = uffd::unregister(self.uffd.as_fd(), r.start, r.len) {
                first_err.get_or_insert(MemError::os("UFFDIO_UNREGISTER", r.describe(), e));
            }
        }
        self.registered = false;
        first_err.map_or(Ok(()), Err)
    }

    fn start_tracking(&mut self) -> Result<()> {
        if self.registered {
            self.unregister_all()?;
        }
        for (i, r) in self.ranges.iter().enumerate() {
            let fd = self.uffd.as_fd();
            // Roll back only what this tracker registered: a range another
            // userfaultfd holds (EBUSY) is not ours to unregister.
            let rollback = |upto: usize| {
                for done in &self.ranges[..upto] {
                    if let Err(e) = uffd::unregister(fd, done.start, done.len) {
                        debug!(error = %e, "rolling back a failed tracker start: unregistering a range failed");
                    }
                }
            };
            if let Err(e) = uffd::register(fd, r.start, r.len, uffd::UFFDIO_REGISTER_MODE_WP) {
                rollback(i);
                let what = if e.raw_os_error() == Some(libc::EBUSY) {
                    format!(
                        "{} (already registered with another userfaultfd, e.g. post-copy or another tracker)",
                        r.describe()
                    )
                } else {
                    r.describe()
                };
                return Err(MemError::os("UFFDIO_REGISTER(MODE_WP)", what, e));
            }
            for (from, to) in chunks(r.start, r.len) {
                if let Err(e) = uffd::writeprotect(fd, from, to - from, true) {
                    rollback(i + 1);
                    return Err(MemError::os("UFFDIO_WRITEPROTECT", r.describe(), e));
                }
            }
        }
        self.registered = true;
        Ok(())
    }

    pub(super) fn collect_into(&mut self, dirty: &mut RegionPages, calls: Calls) -> Result<()> {
        if !self.registered {
            return Err(MemError::TrackerState {
                tracker: NAME,
                detail: "collect() before start()",
            });
        }
        for r in &self.ranges {
            let set = dirty
                .get_mut(r.id)
                .map_err(|_| MemError::UnknownRegion { region: r.id })?;
            scan_range(
                self.pagemap.as_fd(),
                r,
                COLLECT,
                &mut self.buf,
                calls,
                |first, count| set.insert_range(first, count),
            )?;
        }
        Ok(())
    }

    #[cfg(feature = "bench-internals")]
    /// Measurement aid: the bare `PAGEMAP_SCAN` collect loop over one region
    /// (same flags, masks and buffer as [`DirtyTracker::collect`], which it
    /// also resets), counting written pages without recording them.
    /// Benchmarks compare it with `collect` to show the tracker's overhead.
    #[doc(alias = "PAGEMAP_SCAN")]
    pub fn raw_scan(&mut self, region: RegionId) -> Result<u64> {
        let r = *self
            .ranges
            .iter()
            .find(|r| r.id == region)
            .ok_or(MemError::UnknownRegion { region })?;
        let mut pages = 0;
        scan_range(
            self.pagemap.as_fd(),
            &r,
            COLLECT,
            &mut self.buf,
            Calls::Chunked,
            |_, count| pages += count,
        )?;
        Ok(pages)
    }
}

/// Scan `r` from start to end, one [`PROTECT_CHUNK`] per call at most
/// ([`Calls::Chunked`]) or the rest of the range per call
/// ([`Calls::Whole`]), looping while the output vector fills up, calling
/// `found(first_page, count)` for every written range.
pub(super) fn scan_range(
    pagemap: std::os::fd::BorrowedFd<'_>,
    r: &TrackedRange,
    spec: ScanSpec,
    buf: &mut Vec<PageRegion>,
    calls: Calls,
    mut found: impl FnMut(u64, u64),
) -> Result<()> {
    let end = r.start + r.len;
    let mut at = r.start;
    while at < end {
        let call_end = match calls {
            Calls::Chunked => chunks(at, end - at).next().map_or(end, |c| c.1),
            Calls::Whole => end,
        };
        let walk_end = pagemap::scan(pagemap, at, call_end, spec, buf).map_err(|e| {
            if e.raw_os_error() == Some(libc::EPERM) {
                MemError::TrackerState {
                    tracker: NAME,
                    detail: "PAGEMAP_SCAN found pages without async write-protect \
                             (tracker not started, or the region was unmapped)",
                }
            } else {
                MemError::os("PAGEMAP_SCAN", r.describe(), e)
            }
        })?;
        for pr in buf.iter() {
            if pr.categories & PAGE_IS_WRITTEN != 0 && pr.end > pr.start {
                let first = (pr.start.max(r.start) - r.start) / r.page_size;
                let last = (pr.end.min(call_end) - r.start).div_ceil(r.page_size);
                found(first, last - first);
            }
        }
        if walk_end <= at {
            // No progress: never spin.
            return Err(MemError::os(
                "PAGEMAP_SCAN",
                r.describe(),
                std::io::Error::other(format!("walk stopped at {walk_end:#x}, started at {at:#x}")),
            ));
        }
        at = walk_end;
    }
    Ok(())
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        if self.registered {
            if let Err(e) = self.unregister_all() {
                debug!(error = %e, "dropping the uffd-wp tracker: unregistering its ranges failed");
            }
        }
    }
}

impl DirtyTracker for UffdWpTracker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&mut self) -> lmig_core::Result<()> {
        Ok(self.start_tracking()?)
    }

    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        Ok(self.collect_into(dirty, Calls::Chunked)?)
    }

    /// One `PAGEMAP_SCAN` per region (no writer waits while paused).
    fn collect_paused(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        Ok(self.collect_into(dirty, Calls::Whole)?)
    }

    fn stop(&mut self) -> lmig_core::Result<()> {
        if self.registered {
            self.unregister_all()?;
        }
        Ok(())
    }

    /// One `PAGEMAP_SCAN` (`PM_SCAN_WP_MATCHING`) over the run: its written
    /// pages are write-protected again and forgotten.
    fn clearer(&self) -> Option<Box<dyn DirtyClearer>> {
        let pagemap = self.pagemap.try_clone().ok()?;
        Some(Box::new(UffdWpClearer {
            pagemap,
            ranges: self.ranges.clone(),
        }))
    }
}

/// [`DirtyClearer`] of the uffd-wp tracker.
#[derive(Debug)]
struct UffdWpClearer {
    pagemap: File,
    ranges: Vec<TrackedRange>,
}

impl DirtyClearer for UffdWpClearer {
    fn clear(&self, run: &PageRun) -> lmig_core::Result<()> {
        let Some(r) = self.ranges.iter().find(|r| r.id == run.region) else {
            return Err(MemError::UnknownRegion { region: run.region }.into());
        };
        if run.end() > r.len / r.page_size {
            return Err(MemError::PageOutsideRegion {
                run: *run,
                region_pages: r.len / r.page_size,
            }
            .into());
        }
        let sub = TrackedRange {
            id: r.id,
            start: r.start + run.first * r.page_size,
            len: u64::from(run.count) * r.page_size,
            page_size: r.page_size,
        };
        let mut buf = Vec::with_capacity(CLEAR_VEC_LEN);
        Ok(scan_range(
            self.pagemap.as_fd(),
            &sub,
            COLLECT,
            &mut buf,
            Calls::Chunked,
            |_, _| {},
        )?)
    }
}

/// `page_region` slots of one clearing scan (a run of up to 64 pages has at
/// most 32 written ranges; a fuller one loops).
const CLEAR_VEC_LEN: usize = 32;

#[cfg(test)]
mod tests {
    use super::{PROTECT_CHUNK, chunks};

    #[test]
    fn chunks_cover_the_range_cut_at_chunk_multiples() {
        let c = PROTECT_CHUNK;
        let got: Vec<_> = chunks(c - 4096, 2 * c + 8192).collect();
        assert_eq!(
            got,
            vec![
                (c - 4096, c),
                (c, 2 * c),
                (2 * c, 3 * c),
                (3 * c, 3 * c + 4096)
            ]
        );
        assert_eq!(chunks(c, c).collect::<Vec<_>>(), vec![(c, 2 * c)]);
        assert_eq!(chunks(4096, 0).count(), 0);
    }
}
