//! Setting post-copy up: the checks, the userfaultfd with the features the
//! regions need, and the targets with their stale pages dropped.

use std::os::fd::{AsFd, OwnedFd};

use lmig_core::model::{RegionId, RegionPages};

use super::options::PostcopyOptions;
use crate::error::{MemError, Result};
use crate::memory::{Backing, Region};
use crate::sys::mapping::{Mapping, Share};
use crate::sys::uffd::{self, UffdOrigin};

/// How pages of one region are filled.
#[derive(Debug)]
pub(super) enum Fill {
    /// `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
    Copy,
    /// Write through `alias` (a second mapping of the memfd, not registered),
    /// then `UFFDIO_CONTINUE`.
    Continue { alias: Mapping },
}

/// One registered region.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) id: RegionId,
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) page_size: u64,
    pub(super) fill: Fill,
}

/// Every set of `missing` names one of `regions` and has its page count.
pub(super) fn check_missing(regions: &[Region], missing: &RegionPages) -> Result<()> {
    for (id, set) in missing.sets() {
        let Some(r) = regions.iter().find(|r| r.id() == id) else {
            return Err(MemError::UnknownRegion { region: id });
        };
        if set.capacity() != r.pages() {
            return Err(MemError::LayoutMismatch {
                detail: format!(
                    "post-copy set of region {id} has {} pages, the region {}",
                    set.capacity(),
                    r.pages()
                ),
            });
        }
    }
    Ok(())
}

/// Open a userfaultfd with the features `regions` need; true when memfd
/// regions are served with minor faults.
pub(super) fn open_userfaultfd(
    regions: &[Region],
    options: PostcopyOptions,
) -> Result<(OwnedFd, UffdOrigin, bool)> {
    let feature = "post-copy (userfaultfd missing-page faults)";
    let unsupported = |needs| MemError::Unsupported { feature, needs };
    let (fd, origin) =
        uffd::open_best().map_err(|e| MemError::userfaultfd_open(feature, "post-copy", e))?;
    if origin == UffdOrigin::UserModeOnly && !options.allow_user_mode_only {
        return Err(unsupported(
            "kernel-mode faults (CAP_SYS_PTRACE, vm.unprivileged_userfaultfd = 1 or /dev/userfaultfd); \
             with UFFD_USER_MODE_ONLY a system call touching a missing page fails with EFAULT \
             (PostcopyOptions::allow_user_mode_only accepts that)",
        ));
    }
    let (offered, _) =
        uffd::probe_features().map_err(|e| MemError::os("UFFDIO_API (probe)", "post-copy", e))?;
    let has_shmem = regions.iter().any(|r| r.backing().is_shmem());
    let has_memfd = regions.iter().any(|r| r.backing() == Backing::Memfd);
    let minor = options.minor_faults
        && has_memfd
        && offered & uffd::UFFD_FEATURE_MINOR_SHMEM != 0
        && offered & uffd::UFFD_FEATURE_MISSING_SHMEM != 0;
    let mut want = 0;
    if has_shmem {
        if offered & uffd::UFFD_FEATURE_MISSING_SHMEM == 0 {
            return Err(unsupported(
                "UFFD_FEATURE_MISSING_SHMEM (Linux 4.11+) for shared regions",
            ));
        }
        want |= uffd::UFFD_FEATURE_MISSING_SHMEM;
    }
    if minor {
        want |= uffd::UFFD_FEATURE_MINOR_SHMEM;
    }
    uffd::api(fd.as_fd(), want).map_err(|e| MemError::os("UFFDIO_API", "post-copy", e))?;
    Ok((fd, origin, minor))
}

impl Target {
    /// How `r` is filled (`minor`: memfd regions with minor faults), with
    /// the stale content of its `missing` pages dropped.
    pub(super) fn prepare(r: &Region, minor: bool, missing: &RegionPages) -> Result<Self> {
        let continue_fill = minor && r.backing() == Backing::Memfd;
        let fill = match (continue_fill, r.memfd()) {
            (true, Some(memfd)) => Fill::Continue {
                // At the region's own file offset: adopted regions may map
                // the file from elsewhere than its start.
                alias: Mapping::map_at_offset(
                    r.len(),
                    Share::Shared,
                    Some((memfd, r.file_offset())),
                    None,
                    false,
                )
                .map_err(|e| MemError::os("mmap (memfd alias)", r.describe(), e))?,
            },
            _ => Fill::Copy,
        };
        // Drop the stale content of the missing pages: private memory
        // loses the pages (DONTNEED), shmem punches holes (REMOVE),
        // minor-fault memfd only unmaps them (the page cache stays and
        // is overwritten through the alias before UFFDIO_CONTINUE).
        let advice = match (&fill, r.backing()) {
            (Fill::Continue { .. }, _) | (_, Backing::Private) => libc::MADV_DONTNEED,
            _ => libc::MADV_REMOVE,
        };
        let ps = r.page_size();
        if let Ok(set) = missing.get(r.id()) {
            let ranges: Vec<(usize, usize)> = set
                .runs()
                .map(|(first, count)| (first as usize * ps, count as usize * ps))
                .collect();
            r.mapping()
                .discard_many(&ranges, advice)
                .map_err(|e| MemError::os("madvise (drop stale pages)", r.describe(), e))?;
        }
        Ok(Self {
            id: r.id(),
            start: r.as_ptr() as u64,
            len: r.len() as u64,
            page_size: ps as u64,
            fill,
        })
    }
}
