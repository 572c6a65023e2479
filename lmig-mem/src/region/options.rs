//! [`RegionOptions`]: how one region is mapped.

use std::ffi::CString;
use std::os::fd::AsFd;

use lmig_core::model::{RegionId, RegionInfo};

use crate::error::{MemError, Result};
use crate::memory::{Backing, Region};
use crate::sys::mapping::{MADV_HUGEPAGE, Mapping, Share};

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Placement {
    Anywhere,
    /// Map here on both sides.
    Fixed(u64),
    /// Map anywhere here, then ask the destination for the same address.
    KeepAddress,
}

/// How to map one region; [`RegionOptions::map`] creates it.
///
/// ```
/// # use lmig_mem::{Backing, RegionOptions};
/// # use lmig_core::model::RegionId;
/// let region = RegionOptions::new(RegionId(1), 1 << 20)
///     .backing(Backing::Memfd)
///     .keep_address() // the destination maps it at the same address
///     .map()?;
/// assert_eq!(region.len(), 1 << 20);
/// assert_eq!(region.info().fixed_addr, Some(region.as_ptr() as u64));
/// # Ok::<_, lmig_mem::MemError>(())
/// ```
#[derive(Clone, Debug)]
pub struct RegionOptions {
    id: RegionId,
    len: u64,
    backing: Backing,
    placement: Placement,
    thp: bool,
    populate: bool,
}

impl RegionOptions {
    /// A region `id` of `len` bytes (a multiple of the system page size),
    /// anonymous private, mapped anywhere, base pages, not pre-faulted.
    pub fn new(id: RegionId, len: u64) -> Self {
        Self {
            id,
            len,
            backing: Backing::Private,
            placement: Placement::Anywhere,
            thp: false,
            populate: false,
        }
    }

    /// Choose the backing memory.
    #[must_use]
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// Map at exactly `addr` (`MAP_FIXED_NOREPLACE`: fails with
    /// [`MemError::AddressInUse`] rather than replace a mapping), and ask the
    /// destination to map the region at the same address.
    #[must_use]
    pub fn at(mut self, addr: u64) -> Self {
        self.placement = Placement::Fixed(addr);
        self
    }

    /// Map wherever the kernel chooses, and ask the destination to map the
    /// region at the same address, so pointers into it stay valid.
    #[must_use]
    pub fn keep_address(mut self) -> Self {
        self.placement = Placement::KeepAddress;
        self
    }

    /// Ask for transparent huge pages (`MADV_HUGEPAGE`). Dirty tracking may
    /// then report a whole huge page when one byte of it was written.
    #[must_use]
    pub fn transparent_huge_pages(mut self, on: bool) -> Self {
        self.thp = on;
        self
    }

    /// Fault every page in at creation (`MADV_POPULATE_WRITE`).
    #[must_use]
    pub fn populate(mut self, on: bool) -> Self {
        self.populate = on;
        self
    }

    /// Create the mapping.
    pub fn map(&self) -> Result<Region> {
        let page = crate::sys::page_size();
        let bad = |detail: String| MemError::InvalidRegion {
            region: self.id,
            detail,
        };
        if self.len == 0 || !self.len.is_multiple_of(page as u64) {
            return Err(bad(format!(
                "length {} is 0 or not a multiple of the page size {page}",
                self.len
            )));
        }
        let len =
            usize::try_from(self.len).map_err(|_| bad(format!("length {} too large", self.len)))?;
        let addr = match self.placement {
            Placement::Fixed(a) if a % page as u64 != 0 || a == 0 => {
                return Err(bad(format!(
                    "fixed address {a:#x} is 0 or not page aligned"
                )));
            }
            Placement::Fixed(a) => Some(a as usize),
            _ => None,
        };
        let what = || format!("region {} ({} bytes)", self.id, self.len);
        let memfd = match self.backing {
            Backing::Memfd => {
                let name =
                    CString::new(format!("lmig-region-{}", self.id.0)).expect("no NUL in name");
                let fd = nix::sys::memfd::memfd_create(
                    name.as_c_str(),
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )
                .map_err(|e| MemError::os("memfd_create", what(), e.into()))?;
                nix::unistd::ftruncate(&fd, self.len as libc::off_t)
                    .map_err(|e| MemError::os("ftruncate", what(), e.into()))?;
                Some(fd)
            }
            _ => None,
        };
        let share = if self.backing == Backing::Private {
            Share::Private
        } else {
            Share::Shared
        };
        let map = Mapping::map(len, share, memfd.as_ref().map(|f| f.as_fd()), addr, false)
            .map_err(|e| match (e.raw_os_error(), addr) {
                (Some(libc::EEXIST), Some(a)) => MemError::AddressInUse {
                    region: self.id,
                    addr: a as u64,
                    len: self.len,
                },
                _ => MemError::os("mmap", what(), e),
            })?;
        let mut info =
            RegionInfo::new(self.id, self.len, page as u32).map_err(|e| bad(e.to_string()))?;
        if self.placement != Placement::Anywhere {
            info = info
                .at_fixed_addr(map.as_ptr() as u64)
                .map_err(|e| bad(e.to_string()))?;
        }
        let region = Region::from_parts(info, self.backing, self.thp, map, memfd);
        if self.thp {
            region
                .mapping()
                .madvise(0, len, MADV_HUGEPAGE)
                .map_err(|e| MemError::os("madvise(MADV_HUGEPAGE)", region.describe(), e))?;
        }
        if self.populate {
            region.populate()?;
        }
        Ok(region)
    }
}
