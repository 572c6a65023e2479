//! A region's memory and the low-level page writes every writer shares.
//!
//! This module sits below both [`crate::region`] (the set of regions, the
//! source and the sink) and [`crate::postcopy`] (which fills missing pages):
//! both use [`Region`] and [`Backing`] from here, and neither is imported by
//! this module, so there is no import circle between them.
//!
//! Every access to region memory copies through raw pointers: the program's
//! threads keep writing while pre-copy reads, so no `&[u8]` over region
//! memory is ever formed.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lmig_core::model::{PageRun, PageSet, RegionId, RegionInfo};

use crate::error::{MemError, Result};
use crate::sys::mapping::{MADV_POPULATE_WRITE, Mapping};

mod adopt;
mod data;
mod free;

pub use adopt::ForeignBacking;
pub use data::DISCARD_PAGES;
pub(crate) use data::{DataBits, write_data_run, zero_data_run};

/// What memory backs a region.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Backing {
    /// Anonymous private memory (`MAP_PRIVATE | MAP_ANONYMOUS`), like the heap.
    #[default]
    Private,
    /// Anonymous shared memory (`MAP_SHARED | MAP_ANONYMOUS`, shmem), shared
    /// with children forked after mapping.
    SharedAnonymous,
    /// A `memfd_create` file mapped `MAP_SHARED`; the fd is kept
    /// ([`Region::memfd`]) so it can be shared with other processes and, for
    /// post-copy, served with minor faults. An adopted region mapping a
    /// shmem file (memfd or tmpfs) at [`Region::file_offset`] has this
    /// backing too.
    Memfd,
}

impl Backing {
    /// Is the memory shmem (needs `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` to be tracked)?
    pub fn is_shmem(self) -> bool {
        !matches!(self, Backing::Private)
    }

    /// The `madvise` advice that gives pages back so they read as zero:
    /// `MADV_DONTNEED` for private memory, `MADV_REMOVE` (a hole punched in
    /// the shmem file) for shared memory.
    pub(crate) fn discard_advice(self) -> libc::c_int {
        match self {
            Backing::Private => libc::MADV_DONTNEED,
            _ => libc::MADV_REMOVE,
        }
    }
}

/// One mapped region: a contiguous range of the program's memory with an id.
///
/// The program uses the memory through [`Region::as_ptr`] (or the copy
/// helpers); lmig reads and writes it by raw copies. Dropping the region
/// unmaps it, unless the program mapped it ([`Region::adopt`]): adopted
/// memory is the program's to unmap.
#[derive(Debug)]
pub struct Region {
    info: RegionInfo,
    backing: Backing,
    thp: bool,
    map: Mapping,
    memfd: Option<OwnedFd>,
    /// Where the region starts in the memfd's file (0 unless adopted).
    file_offset: u64,
    /// The pages the program declared free (`free.rs`).
    free: free::FreePages,
}

impl Region {
    /// A region over `map`, as [`crate::RegionOptions::map`] created it.
    pub(crate) fn from_parts(
        info: RegionInfo,
        backing: Backing,
        thp: bool,
        map: Mapping,
        memfd: Option<OwnedFd>,
    ) -> Self {
        Self {
            info,
            backing,
            thp,
            map,
            memfd,
            file_offset: 0,
            free: free::FreePages::new(),
        }
    }

    /// The region's id.
    pub fn id(&self) -> RegionId {
        self.info.id
    }

    /// The region as it is announced to the destination.
    pub fn info(&self) -> &RegionInfo {
        &self.info
    }

    /// What backs it.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Whether transparent huge pages were asked for.
    pub fn transparent_huge_pages(&self) -> bool {
        self.thp
    }

    /// Start of the memory. Valid for [`Region::len`] bytes while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.info.page_size as usize
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.info.pages()
    }

    /// The memfd (or shmem file) behind a [`Backing::Memfd`] region.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.memfd.as_ref().map(|f| f.as_fd())
    }

    /// Where the region starts in [`Region::memfd`]'s file: 0 for regions
    /// lmig mapped, the adopted mapping's offset for adopted ones.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// Whether the program mapped this memory and handed it over with
    /// [`Region::adopt`]: lmig never unmaps it.
    pub fn is_adopted(&self) -> bool {
        !self.map.is_owned()
    }

    /// The page holding `addr`, if it lies in this region.
    pub fn page_of(&self, addr: usize) -> Option<u64> {
        let off = addr.checked_sub(self.as_ptr() as usize)?;
        (off < self.len()).then(|| (off / self.page_size()) as u64)
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "region {} ({:#x}, {} bytes)",
            self.info.id,
            self.as_ptr() as usize,
            self.len()
        )
    }

    pub(crate) fn out_of_bounds(&self, offset: usize, len: usize) -> MemError {
        MemError::OutOfBounds {
            region: self.id(),
            offset,
            len,
            region_len: self.len(),
        }
    }

    /// Copy `dst.len()` bytes at `offset` into `dst` (a raw copy: safe while
    /// other threads write the region; the bytes may then be torn).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        if self.map.copy_out(offset, dst) {
            Ok(())
        } else {
            Err(self.out_of_bounds(offset, dst.len()))
        }
    }

    /// Copy `src` into the region at `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        if self.map.copy_in(offset, src) {
            Ok(())
        } else {
            Err(self.out_of_bounds(offset, src.len()))
        }
    }

    /// Zero `len` bytes at `offset`.
    pub fn zero_at(&self, offset: usize, len: usize) -> Result<()> {
        if self.map.zero(offset, len) {
            Ok(())
        } else {
            Err(self.out_of_bounds(offset, len))
        }
    }

    /// Fault every page in, writable (`MADV_POPULATE_WRITE`), so that later
    /// writes — pages placed during the freeze — take no first-touch fault.
    #[doc(alias = "MADV_POPULATE_WRITE")]
    pub fn populate(&self) -> Result<()> {
        self.map
            .madvise(0, self.len(), MADV_POPULATE_WRITE)
            .map_err(|e| MemError::os("madvise(MADV_POPULATE_WRITE)", self.describe(), e))
    }

    /// Byte range of `run`, checked against this region.
    pub(crate) fn run_bytes(&self, run: &PageRun) -> Result<(usize, usize)> {
        if run.region != self.id() {
            return Err(MemError::UnknownRegion { region: run.region });
        }
        let pages = self.pages();
        if run.count == 0 || run.first >= pages || u64::from(run.count) > pages - run.first {
            return Err(MemError::PageOutsideRegion {
                run: *run,
                region_pages: pages,
            });
        }
        let ps = self.page_size();
        Ok((run.first as usize * ps, run.count as usize * ps))
    }

    pub(crate) fn check_len(&self, run: &PageRun, got: usize) -> Result<(usize, usize)> {
        let (off, len) = self.run_bytes(run)?;
        if got != len {
            return Err(MemError::LengthMismatch {
                run: *run,
                expected: len,
                got,
            });
        }
        Ok((off, len))
    }

    /// Copy the pages of `run` into `dst` (exactly the run's byte length).
    pub fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
        let (off, _) = self.check_len(run, dst.len())?;
        self.read_at(off, dst)
    }

    /// Test in place which pages of `run` read as zero (one flag per page
    /// in `zero`), without copying them.
    pub fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> Result<()> {
        let (off, len) = self.run_bytes(run)?;
        if zero.len() != run.count as usize {
            return Err(MemError::LengthMismatch {
                run: *run,
                expected: run.count as usize,
                got: zero.len(),
            });
        }
        if self.map.find_zero_pages(off, self.page_size(), zero) {
            Ok(())
        } else {
            Err(self.out_of_bounds(off, len))
        }
    }

    /// Add to `pages` (a set over this region) every page that may hold
    /// data now; the pages left out read as zero. False, with nothing
    /// added, when this backing cannot tell.
    ///
    /// - [`Backing::Private`]: one `PAGEMAP_SCAN` for pages present or
    ///   swapped (a page mapped to the shared zero page counts as zero).
    ///   Exact when nothing else changed the page tables; under a uffd-wp
    ///   tracker with `UFFD_FEATURE_WP_UNPOPULATED` the kernel reports the
    ///   markers of untouched pages as swapped too, so they are included (a
    ///   superset: safe, but nothing is saved).
    /// - [`Backing::Memfd`]: `lseek(SEEK_DATA / SEEK_HOLE)` over the file,
    ///   which sees every page of the file (swapped ones included), however
    ///   it was written.
    /// - [`Backing::SharedAnonymous`]: false; another process may have
    ///   written pages this one never mapped, and there is no fd to ask.
    #[doc(alias = "PAGEMAP_SCAN")]
    #[doc(alias = "SEEK_DATA")]
    pub fn populated(&self, pages: &mut PageSet) -> Result<bool> {
        self.check_set(pages)?;
        let ps = self.page_size() as u64;
        let mut add = |start: u64, end: u64| {
            let first = start / ps;
            let last = end.min(self.len() as u64).div_ceil(ps);
            if last > first {
                pages.insert_range(first, last - first);
            }
        };
        match (self.backing, self.memfd()) {
            (Backing::Memfd, Some(fd)) => {
                let from = self.file_offset;
                crate::sys::data_ranges(fd, from, self.len() as u64, |s, e| {
                    add(s - from, e - from)
                })
                .map_err(|e| MemError::os("lseek(SEEK_DATA)", self.describe(), e))?;
                Ok(true)
            }
            (Backing::Private, _) => {
                let base = self.as_ptr() as u64;
                crate::sys::pagemap::populated_ranges(base, base + self.len() as u64, |s, e| {
                    add(s - base, e - base)
                })
                .map_err(|e| MemError::os("PAGEMAP_SCAN", self.describe(), e))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// A page set over this region, or an error.
    pub(crate) fn check_set(&self, pages: &PageSet) -> Result<()> {
        if pages.capacity() != self.pages() {
            return Err(MemError::InvalidRegion {
                region: self.id(),
                detail: format!(
                    "a page set of {} pages for a region of {}",
                    pages.capacity(),
                    self.pages()
                ),
            });
        }
        Ok(())
    }

    /// Write `src` (exactly the run's byte length) into the pages of `run`.
    pub fn write_pages(&self, run: &PageRun, src: &[u8]) -> Result<()> {
        let (off, _) = self.check_len(run, src.len())?;
        self.write_at(off, src)
    }

    /// Zero the pages of `run`.
    pub fn zero_pages(&self, run: &PageRun) -> Result<()> {
        let (off, len) = self.run_bytes(run)?;
        self.zero_at(off, len)
    }
}
