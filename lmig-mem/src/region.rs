//! Memory regions a program registers for migration, the [`RegionSet`] that
//! holds them (a [`MemorySource`] on the source and a [`MemorySink`] on the
//! destination) and [`DestinationRegions`], a sink that maps the source's
//! layout when the session offers it.
//!
//! Every access to region memory copies through raw pointers: the program's
//! threads keep writing while pre-copy reads, so no `&[u8]` over region
//! memory is ever formed.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use lmig_core::model::{PageRun, PageSet, RegionId, RegionInfo, RegionLayout, RegionPages};
use lmig_core::{MemorySink, MemorySource};

use crate::error::{MemError, Result};
use crate::postcopy::{Postcopy, PostcopyOptions, PostcopyStats};
use crate::sys::mapping::{MADV_HUGEPAGE, MADV_POPULATE_WRITE, Mapping, Share};

/// What memory backs a region.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum Backing {
    /// Anonymous private memory (`MAP_PRIVATE | MAP_ANONYMOUS`), like the heap.
    #[default]
    Private,
    /// Anonymous shared memory (`MAP_SHARED | MAP_ANONYMOUS`, shmem), shared
    /// with children forked after mapping.
    SharedAnonymous,
    /// A `memfd_create` file mapped `MAP_SHARED`; the fd is kept
    /// ([`Region::memfd`]) so it can be shared with other processes and, for
    /// post-copy, served with minor faults.
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

/// Zero runs of at least this many pages that hold data are given back to
/// the kernel (`madvise`) rather than cleared with a memset.
pub const DISCARD_PAGES: u64 = 16;

/// One bit per page of a region: set when the page may hold data, clear
/// when it is known to read as zero. Atomic words: placement runs on
/// several threads (distinct chunks, which may share a word).
#[derive(Debug)]
struct DataBits {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl DataBits {
    fn new(pages: u64, on: bool) -> Self {
        let bits = Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        };
        bits.fill(on);
        bits
    }

    fn fill(&self, on: bool) {
        self.set(0, self.pages, on);
    }

    /// The words and masks covering `first..first + count` (clipped to the region).
    fn masks(&self, first: u64, count: u64) -> impl Iterator<Item = (&AtomicU64, u64)> {
        let end = first.saturating_add(count).min(self.pages);
        let first = first.min(end);
        (first / 64..end.div_ceil(64)).map(move |w| {
            let lo = (w * 64).max(first) - w * 64;
            let hi = ((w + 1) * 64).min(end) - w * 64;
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            (&self.words[w as usize], mask)
        })
    }

    fn set(&self, first: u64, count: u64, on: bool) {
        for (word, mask) in self.masks(first, count) {
            if on {
                word.fetch_or(mask, Ordering::Relaxed);
            } else {
                word.fetch_and(!mask, Ordering::Relaxed);
            }
        }
    }

    /// Does any page of the range have the bit `on`?
    fn any(&self, first: u64, count: u64, on: bool) -> bool {
        self.masks(first, count).any(|(word, mask)| {
            let w = word.load(Ordering::Relaxed);
            (if on { w } else { !w }) & mask != 0
        })
    }

    /// The maximal runs `(first, count)` of the range whose bit is `on`.
    fn runs(&self, first: u64, count: u64, on: bool) -> Vec<(u64, u64)> {
        let end = first.saturating_add(count).min(self.pages);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in first..end {
            let w = self.words[(p / 64) as usize].load(Ordering::Relaxed);
            if (w >> (p % 64) & 1 == 1) != on {
                continue;
            }
            match out.last_mut() {
                Some((f, c)) if *f + *c == p => *c += 1,
                _ => out.push((p, 1)),
            }
        }
        out
    }
}

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
    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// Map at exactly `addr` (`MAP_FIXED_NOREPLACE`: fails with
    /// [`MemError::AddressInUse`] rather than replace a mapping), and ask the
    /// destination to map the region at the same address.
    pub fn at(mut self, addr: u64) -> Self {
        self.placement = Placement::Fixed(addr);
        self
    }

    /// Map wherever the kernel chooses, and ask the destination to map the
    /// region at the same address, so pointers into it stay valid.
    pub fn keep_address(mut self) -> Self {
        self.placement = Placement::KeepAddress;
        self
    }

    /// Ask for transparent huge pages (`MADV_HUGEPAGE`). Dirty tracking may
    /// then report a whole huge page when one byte of it was written.
    pub fn transparent_huge_pages(mut self, on: bool) -> Self {
        self.thp = on;
        self
    }

    /// Fault every page in at creation (`MADV_POPULATE_WRITE`).
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
        let region = Region {
            info,
            backing: self.backing,
            thp: self.thp,
            map,
            memfd,
        };
        if self.thp {
            region
                .map
                .madvise(0, len, MADV_HUGEPAGE)
                .map_err(|e| MemError::os("madvise(MADV_HUGEPAGE)", region.describe(), e))?;
        }
        if self.populate {
            region.populate()?;
        }
        Ok(region)
    }
}

/// One mapped region: a contiguous range of the program's memory with an id.
///
/// The program uses the memory through [`Region::as_ptr`] (or the copy
/// helpers); lmig reads and writes it by raw copies. Dropping the region
/// unmaps it.
#[derive(Debug)]
pub struct Region {
    info: RegionInfo,
    backing: Backing,
    thp: bool,
    map: Mapping,
    memfd: Option<OwnedFd>,
}

impl Region {
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

    /// The memfd behind a [`Backing::Memfd`] region.
    pub fn memfd(&self) -> Option<BorrowedFd<'_>> {
        self.memfd.as_ref().map(|f| f.as_fd())
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

    fn out_of_bounds(&self, offset: usize, len: usize) -> MemError {
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
                crate::sys::data_ranges(fd, self.len() as u64, &mut add)
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

/// The first difference between the regions `here` and the `offered` ones,
/// in words naming the field, or `None` when they match.
pub fn layout_difference(here: &RegionLayout, offered: &RegionLayout) -> Option<String> {
    for o in offered.regions() {
        let Ok(h) = here.get(o.id) else {
            return Some(format!("region {} is offered but not mapped here", o.id));
        };
        if h.page_size != o.page_size {
            return Some(format!(
                "region {}: page size {} bytes here, {} offered",
                o.id, h.page_size, o.page_size
            ));
        }
        if h.len != o.len {
            return Some(format!(
                "region {}: {} bytes here, {} offered",
                o.id, h.len, o.len
            ));
        }
        if let Some(want) = o.fixed_addr {
            if h.fixed_addr != Some(want) {
                return Some(format!(
                    "region {}: must be at {want:#x}, here it is {}",
                    o.id,
                    h.fixed_addr
                        .map_or("not pinned".to_string(), |a| format!("at {a:#x}"))
                ));
            }
        }
    }
    here.regions()
        .iter()
        .find(|h| offered.get(h.id).is_err())
        .map(|h| format!("region {} is mapped here but not offered", h.id))
}

/// The program's registered regions, by id.
///
/// A `RegionSet` is the [`MemorySource`] of a source session and the
/// [`MemorySink`] of a destination session whose regions the program mapped
/// itself (see [`DestinationRegions`] to map them from the source's layout).
/// Trackers are created over it (`crate::track`).
///
/// Sink methods take `&self` and may run on several threads for disjoint
/// chunks: every run is checked against its region before a byte moves.
#[derive(Debug)]
pub struct RegionSet {
    /// Post-copy state while post-copy runs (declared before `regions` so
    /// that it unregisters before they are unmapped).
    postcopy: RwLock<Option<Arc<Postcopy>>>,
    postcopy_options: PostcopyOptions,
    postcopy_stats: Mutex<PostcopyStats>,
    layout: RegionLayout,
    /// Same order as `layout.regions()` (sorted by id).
    regions: Vec<Region>,
    /// Per region, which pages may hold data (sink side): a zero run over
    /// pages known to read as zero needs no work.
    data: Vec<DataBits>,
    prefault: bool,
}

impl RegionSet {
    /// A set of regions; ids must be unique.
    pub fn new(regions: impl IntoIterator<Item = Region>) -> Result<Self> {
        let mut regions: Vec<Region> = regions.into_iter().collect();
        regions.sort_by_key(Region::id);
        if let Some(w) = regions.windows(2).find(|w| w[0].id() == w[1].id()) {
            return Err(MemError::DuplicateRegion { region: w[0].id() });
        }
        let layout =
            RegionLayout::new(regions.iter().map(|r| r.info.clone()).collect()).map_err(|e| {
                MemError::LayoutMismatch {
                    detail: e.to_string(),
                }
            })?;
        Ok(Self {
            postcopy: RwLock::new(None),
            postcopy_options: PostcopyOptions::default(),
            postcopy_stats: Mutex::new(PostcopyStats::default()),
            data: regions
                .iter()
                .map(|r| DataBits::new(r.pages(), true))
                .collect(),
            layout,
            regions,
            prefault: true,
        })
    }

    /// Map every region of `layout` with `backing` (at its fixed address when
    /// it has one): the destination's side of a migration. Page sizes other
    /// than this host's base page are refused.
    pub fn from_layout(layout: &RegionLayout, backing: Backing, thp: bool) -> Result<Self> {
        let page = crate::sys::page_size() as u32;
        let mut regions = Vec::with_capacity(layout.regions().len());
        for info in layout.regions() {
            if info.page_size != page {
                return Err(MemError::LayoutMismatch {
                    detail: format!(
                        "region {}: page size {} bytes offered, this host maps {page}-byte pages",
                        info.id, info.page_size
                    ),
                });
            }
            let mut opts = RegionOptions::new(info.id, info.len)
                .backing(backing)
                .transparent_huge_pages(thp);
            if let Some(a) = info.fixed_addr {
                opts = opts.at(a);
            }
            regions.push(opts.map()?);
        }
        let set = Self::new(regions)?;
        // Fresh mappings: every page reads as zero.
        set.data.iter().for_each(|d| d.fill(false));
        Ok(set)
    }

    /// Whether pages are pre-faulted (`MADV_POPULATE_WRITE`, run by run)
    /// just before the first data is copied into them, rather than taking
    /// one fault per page in the copy (default true). Pages that only ever
    /// receive zero runs are never faulted in. Turn it off for a post-copy
    /// destination.
    pub fn set_prefault(&mut self, on: bool) {
        self.prefault = on;
    }

    /// How post-copy handles faults (see [`crate::postcopy`]).
    pub fn set_postcopy_options(&mut self, options: PostcopyOptions) {
        self.postcopy_options = options;
    }

    /// Post-copy statistics: live while post-copy runs, final after it ended.
    pub fn postcopy_stats(&self) -> PostcopyStats {
        match self.active_postcopy() {
            Some(pc) => pc.stats(),
            None => lock(&self.postcopy_stats).clone(),
        }
    }

    /// Is post-copy running (pages registered for missing-page faults)?
    pub fn in_postcopy(&self) -> bool {
        self.active_postcopy().is_some()
    }

    fn active_postcopy(&self) -> Option<Arc<Postcopy>> {
        self.postcopy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Post-copy: drop the stale content of `missing` and register the
    /// regions for missing-page faults. See [`crate::postcopy`].
    pub fn begin_postcopy(&self, missing: &RegionPages) -> Result<()> {
        let mut slot = self.postcopy.write().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(MemError::TrackerState {
                tracker: "post-copy",
                detail: "begin_postcopy called twice",
            });
        }
        let pc = Postcopy::begin(&self.regions, missing, self.postcopy_options)?;
        *slot = Some(Arc::new(pc));
        Ok(())
    }

    /// Post-copy: wait up to `timeout` for a touch of a missing page.
    pub fn wait_fault(&self, timeout: Duration) -> Result<Option<PageRun>> {
        match self.active_postcopy() {
            Some(pc) => pc.wait_fault(timeout),
            None => {
                std::thread::sleep(timeout);
                Ok(None)
            }
        }
    }

    /// Post-copy: unregister the regions. Refuses while pages are missing
    /// ([`MemError::PostcopyIncomplete`]).
    pub fn end_postcopy(&self) -> Result<()> {
        let mut slot = self.postcopy.write().unwrap_or_else(|p| p.into_inner());
        let Some(pc) = slot.as_ref() else {
            return Ok(());
        };
        pc.end(false)?;
        *lock(&self.postcopy_stats) = pc.stats();
        *slot = None;
        Ok(())
    }

    /// Post-copy failed for good (the source is gone): unregister even
    /// though pages are missing. Threads blocked on a missing page resume
    /// and read **zeros** there; the program's memory is incomplete and it
    /// must be terminated (this only keeps it from hanging forever).
    pub fn abandon_postcopy(&self) {
        let mut slot = self.postcopy.write().unwrap_or_else(|p| p.into_inner());
        if let Some(pc) = slot.take() {
            let _ = pc.end(true);
            *lock(&self.postcopy_stats) = pc.stats();
        }
    }

    /// The layout announced to the destination.
    pub fn layout(&self) -> &RegionLayout {
        &self.layout
    }

    /// The regions, sorted by id.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region with this id.
    pub fn get(&self, id: RegionId) -> Result<&Region> {
        self.layout
            .index_of(id)
            .map(|i| &self.regions[i])
            .map_err(|_| MemError::UnknownRegion { region: id })
    }

    /// Pre-fault every region (`MADV_POPULATE_WRITE`).
    pub fn populate(&self) -> Result<()> {
        self.regions.iter().try_for_each(Region::populate)
    }

    /// Check `offered` against these regions; the error names the first difference.
    pub fn check_layout(&self, offered: &RegionLayout) -> Result<()> {
        match layout_difference(&self.layout, offered) {
            None => Ok(()),
            Some(detail) => Err(MemError::LayoutMismatch { detail }),
        }
    }

    /// Copy the pages of `run` into `dst` (checked against the region first).
    pub fn read_run(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
        self.get(run.region)?.read_pages(run, dst)
    }

    /// Write the pages of `run` (checked against the region before any byte
    /// moves). In post-copy, missing pages are filled atomically and their
    /// waiters woken.
    pub fn write_run(&self, run: &PageRun, src: &[u8]) -> Result<()> {
        let (region, data) = self.get_with_data(run.region)?;
        let (off, len) = region.check_len(run, src.len())?;
        match self.active_postcopy() {
            None => {
                if self.prefault && data.any(run.first, run.count.into(), false) {
                    // Some pages were never written here: fault the run in with
                    // one call instead of one trap per page in the copy.
                    region
                        .map
                        .madvise(off, len, MADV_POPULATE_WRITE)
                        .map_err(|e| {
                            MemError::os("madvise(MADV_POPULATE_WRITE)", region.describe(), e)
                        })?;
                }
                data.set(run.first, run.count.into(), true);
                region.write_pages(run, src)
            }
            Some(pc) => {
                data.set(run.first, run.count.into(), true);
                pc.place(region, run, Some(src))
            }
        }
    }

    /// Zero the pages of `run` (checked first). In post-copy, missing pages
    /// are filled atomically and their waiters woken.
    ///
    /// Outside post-copy only the pages that may hold data are touched:
    /// short runs of them are cleared with a memset, longer ones
    /// ([`DISCARD_PAGES`] and more) are given back to the kernel
    /// (`MADV_DONTNEED` for private memory, `MADV_REMOVE` for shared memory),
    /// after which they read as zero without occupying memory.
    pub fn zero_run(&self, run: &PageRun) -> Result<()> {
        let (region, data) = self.get_with_data(run.region)?;
        region.run_bytes(run)?;
        match self.active_postcopy() {
            None => {
                let ps = region.page_size();
                for (first, count) in data.runs(run.first, run.count.into(), true) {
                    let (off, len) = (first as usize * ps, count as usize * ps);
                    if count >= DISCARD_PAGES {
                        region
                            .map
                            .discard(off, len, region.backing.discard_advice())
                            .map_err(|e| MemError::os("madvise(discard)", region.describe(), e))?;
                    } else {
                        region.zero_at(off, len)?;
                    }
                    data.set(first, count, false);
                }
                Ok(())
            }
            Some(pc) => {
                data.set(run.first, run.count.into(), true);
                pc.place(region, run, None)
            }
        }
    }

    fn get_with_data(&self, id: RegionId) -> Result<(&Region, &DataBits)> {
        let i = self
            .layout
            .index_of(id)
            .map_err(|_| MemError::UnknownRegion { region: id })?;
        Ok((&self.regions[i], &self.data[i]))
    }

    /// Learn which pages may hold data ([`Region::populated`]) so that zero
    /// runs over the others need no work and data runs into them are
    /// pre-faulted. Called by `prepare`, before any page is placed.
    fn learn_populated(&self) -> Result<()> {
        for (r, data) in self.regions.iter().zip(&self.data) {
            let mut set = PageSet::new(r.pages());
            if r.populated(&mut set)? {
                data.fill(false);
                for (first, count) in set.runs() {
                    data.set(first, count, true);
                }
            } else {
                data.fill(true);
            }
        }
        Ok(())
    }

    /// Every page was given back to the kernel: all read as zero.
    fn forget_data(&self) {
        self.data.iter().for_each(|d| d.fill(false));
    }
}

impl MemorySource for RegionSet {
    fn layout(&self) -> RegionLayout {
        self.layout.clone()
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        Ok(self.read_run(run, dst)?)
    }

    /// Zero pages are tested in place and never copied.
    fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> lmig_core::Result<bool> {
        self.get(run.region)?.find_zero_pages(run, zero)?;
        Ok(true)
    }

    /// See [`Region::populated`]; a region that cannot tell counts as all data.
    fn populated(&self, pages: &mut RegionPages) -> lmig_core::Result<bool> {
        let mut any = false;
        for r in &self.regions {
            let set = pages.get_mut(r.id())?;
            if r.populated(set)? {
                any = true;
            } else {
                set.insert_range(0, r.pages());
            }
        }
        Ok(any)
    }
}

impl MemorySink for RegionSet {
    /// Check the offered layout against these regions and learn which
    /// pages already hold data ([`Region::populated`]). Nothing is
    /// pre-faulted up front: a page is faulted in when its first data
    /// arrives (see [`RegionSet::set_prefault`]), and free memory never is.
    fn prepare(&self, layout: &RegionLayout) -> lmig_core::Result<()> {
        self.check_layout(layout)?;
        self.learn_populated()?;
        Ok(())
    }

    fn write_pages(&self, run: &PageRun, data: &[u8]) -> lmig_core::Result<()> {
        Ok(self.write_run(run, data)?)
    }

    fn zero_pages(&self, run: &PageRun) -> lmig_core::Result<()> {
        Ok(self.zero_run(run)?)
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        Ok(self.read_run(run, dst)?)
    }

    fn begin_postcopy(&self, missing: &RegionPages) -> lmig_core::Result<()> {
        Ok(RegionSet::begin_postcopy(self, missing)?)
    }

    fn wait_fault(&self, timeout: Duration) -> lmig_core::Result<Option<PageRun>> {
        Ok(RegionSet::wait_fault(self, timeout)?)
    }

    fn end_postcopy(&self) -> lmig_core::Result<()> {
        Ok(RegionSet::end_postcopy(self)?)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A destination [`MemorySink`] that maps the source's layout in `prepare`
/// (each region at its fixed address when it has one) and pre-faults it.
///
/// After the migration, [`DestinationRegions::into_regions`] hands the
/// regions to the program.
#[derive(Debug)]
pub struct DestinationRegions {
    backing: Backing,
    thp: bool,
    prefault: bool,
    postcopy_options: PostcopyOptions,
    set: OnceLock<RegionSet>,
    preparing: Mutex<()>,
}

impl DestinationRegions {
    /// Map regions with `backing` when `prepare` is called; pre-fault them.
    pub fn new(backing: Backing) -> Self {
        Self {
            backing,
            thp: false,
            prefault: true,
            postcopy_options: PostcopyOptions::default(),
            set: OnceLock::new(),
            preparing: Mutex::new(()),
        }
    }

    /// Ask for transparent huge pages.
    pub fn transparent_huge_pages(mut self, on: bool) -> Self {
        self.thp = on;
        self
    }

    /// Pre-fault pages run by run when their first data arrives (default
    /// true; false for a post-copy destination). See [`RegionSet::set_prefault`].
    pub fn prefault(mut self, on: bool) -> Self {
        self.prefault = on;
        self
    }

    /// How post-copy handles faults (see [`crate::postcopy`]).
    pub fn postcopy_options(mut self, options: PostcopyOptions) -> Self {
        self.postcopy_options = options;
        self
    }

    /// Post-copy statistics (empty before `prepare`).
    pub fn postcopy_stats(&self) -> PostcopyStats {
        self.set
            .get()
            .map(RegionSet::postcopy_stats)
            .unwrap_or_default()
    }

    /// The regions, once `prepare` mapped them.
    pub fn regions(&self) -> Option<&RegionSet> {
        self.set.get()
    }

    /// Take the regions (after the migration).
    pub fn into_regions(self) -> Option<RegionSet> {
        self.set.into_inner()
    }

    fn set(&self) -> Result<&RegionSet> {
        self.set.get().ok_or(MemError::NotPrepared)
    }
}

impl MemorySink for DestinationRegions {
    fn prepare(&self, layout: &RegionLayout) -> lmig_core::Result<()> {
        let _one_at_a_time = self.preparing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = self.set.get() {
            set.check_layout(layout)?;
            return Ok(set.learn_populated()?);
        }
        // Fresh mappings read as zero: nothing to learn, nothing faulted in
        // until data arrives.
        let mut set = RegionSet::from_layout(layout, self.backing, self.thp)?;
        set.set_prefault(self.prefault);
        set.set_postcopy_options(self.postcopy_options);
        let _ = self.set.set(set);
        Ok(())
    }

    fn write_pages(&self, run: &PageRun, data: &[u8]) -> lmig_core::Result<()> {
        Ok(self.set()?.write_run(run, data)?)
    }

    fn zero_pages(&self, run: &PageRun) -> lmig_core::Result<()> {
        Ok(self.set()?.zero_run(run)?)
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        Ok(self.set()?.read_run(run, dst)?)
    }

    fn begin_postcopy(&self, missing: &RegionPages) -> lmig_core::Result<()> {
        Ok(self.set()?.begin_postcopy(missing)?)
    }

    fn wait_fault(&self, timeout: Duration) -> lmig_core::Result<Option<PageRun>> {
        Ok(self.set()?.wait_fault(timeout)?)
    }

    fn end_postcopy(&self) -> lmig_core::Result<()> {
        Ok(self.set()?.end_postcopy()?)
    }

    /// The migration failed: give the received pages back to the kernel
    /// (private memory loses them, shared memory gets holes punched). The
    /// mappings stay, empty (zero), so a new attempt with the same layout
    /// can use them.
    fn discard(&self) {
        let Some(set) = self.set.get() else { return };
        // Before `Commit` nothing runs here: no thread waits on a missing page.
        set.abandon_postcopy();
        let mut all = true;
        for r in set.regions() {
            all &= r
                .mapping()
                .discard(0, r.len(), r.backing().discard_advice())
                .is_ok();
        }
        if all {
            set.forget_data();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmig_core::MigrationError;

    const P: usize = 4096;

    fn set(backing: Backing) -> RegionSet {
        RegionSet::new([
            RegionOptions::new(RegionId(1), 8 * P as u64)
                .backing(backing)
                .map()
                .unwrap(),
            RegionOptions::new(RegionId(2), 4 * P as u64)
                .backing(backing)
                .map()
                .unwrap(),
        ])
        .unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn snapshot(s: &RegionSet) -> Vec<Vec<u8>> {
        s.regions()
            .iter()
            .map(|r| {
                let mut v = vec![0; r.len()];
                r.read_at(0, &mut v).unwrap();
                v
            })
            .collect()
    }

    #[test]
    fn source_to_sink_round_trip() {
        for backing in [Backing::Private, Backing::SharedAnonymous, Backing::Memfd] {
            let src = set(backing);
            src.get(RegionId(1))
                .unwrap()
                .write_at(P, &pattern(3 * P, 7))
                .unwrap();
            let dst = DestinationRegions::new(backing);
            assert!(matches!(
                dst.write_pages(&PageRun::new(RegionId(1), 0, 1), &[0; P]),
                Err(MigrationError::Backend { .. })
            ));
            dst.prepare(&MemorySource::layout(&src)).unwrap();
            let run = PageRun::new(RegionId(1), 1, 3);
            let mut buf = vec![0; 3 * P];
            MemorySource::read_pages(&src, &run, &mut buf).unwrap();
            dst.write_pages(&run, &buf).unwrap();
            dst.zero_pages(&PageRun::new(RegionId(2), 0, 4)).unwrap();
            assert_eq!(
                snapshot(dst.regions().unwrap()),
                snapshot(&src),
                "{backing:?}"
            );
            // Idempotent prepare with the same layout.
            dst.prepare(&MemorySource::layout(&src)).unwrap();
        }
    }

    #[test]
    fn page_outside_region_writes_nothing() {
        let s = set(Backing::Private);
        let before = snapshot(&s);
        let data = vec![0xAB; 2 * P];
        for run in [
            PageRun::new(RegionId(1), 7, 2),
            PageRun::new(RegionId(1), 8, 1),
            PageRun::new(RegionId(1), u64::MAX, 1),
            PageRun::new(RegionId(3), 0, 2),
        ] {
            let err = MemorySink::write_pages(&s, &run, &data).unwrap_err();
            assert!(
                matches!(
                    err,
                    MigrationError::PageOutsideRegion { .. } | MigrationError::UnknownRegion { .. }
                ),
                "{run}: {err}"
            );
            assert!(MemorySink::zero_pages(&s, &run).is_err());
        }
        // A buffer of the wrong length: refused too.
        let err = MemorySink::write_pages(&s, &PageRun::new(RegionId(1), 0, 1), &data).unwrap_err();
        assert!(err.to_string().contains("8192"), "{err}");
        let err = MemorySink::zero_pages(&s, &PageRun::new(RegionId(2), 0, 0)).unwrap_err();
        assert!(
            matches!(err, MigrationError::PageOutsideRegion { .. }),
            "{err}"
        );
        assert_eq!(snapshot(&s), before, "nothing may be written");
    }

    #[test]
    fn layout_mismatch_names_the_difference() {
        let s = set(Backing::Private);
        let before = snapshot(&s);
        let info = |id, pages: u64, ps: u32| {
            RegionInfo::new(RegionId(id), pages * u64::from(ps), ps).unwrap()
        };
        let cases = [
            (
                vec![info(1, 8, 4096)],
                "region #2 is mapped here but not offered",
            ),
            (
                vec![info(1, 8, 4096), info(2, 4, 4096), info(3, 1, 4096)],
                "region #3 is offered",
            ),
            (
                vec![info(1, 9, 4096), info(2, 4, 4096)],
                "region #1: 32768 bytes here, 36864 offered",
            ),
            (
                vec![info(1, 4, 8192), info(2, 4, 4096)],
                "page size 4096 bytes here, 8192 offered",
            ),
            (
                vec![
                    info(1, 8, 4096).at_fixed_addr(0x7000_0000_0000).unwrap(),
                    info(2, 4, 4096),
                ],
                "must be at 0x700000000000",
            ),
        ];
        for (regions, want) in cases {
            let offered = RegionLayout::new(regions).unwrap();
            let err = MemorySink::prepare(&s, &offered).unwrap_err();
            assert!(
                matches!(err, MigrationError::LayoutMismatch { .. }),
                "{err}"
            );
            assert!(err.to_string().contains(want), "{err} / want {want}");
        }
        MemorySink::prepare(&s, s.layout()).unwrap();
        assert_eq!(snapshot(&s), before);
    }

    #[test]
    fn destination_refuses_foreign_page_size() {
        let offered = RegionLayout::new(vec![
            RegionInfo::new(RegionId(1), 1 << 21, 1 << 21).unwrap(),
        ])
        .unwrap();
        let dst = DestinationRegions::new(Backing::Private);
        let err = dst.prepare(&offered).unwrap_err().to_string();
        assert!(err.contains("page size 2097152"), "{err}");
        assert!(dst.regions().is_none());
    }

    #[test]
    fn fixed_address_is_kept_and_never_replaces() {
        // Other tests map and unmap concurrently in this process, so an address the
        // kernel picked could be taken again between `drop(src)` and `prepare`. Use one
        // far below the top-down mmap area, where nothing else lands.
        let addr = 0x2000_0000_0000u64 + (u64::from(std::process::id()) << 24);
        let src = RegionOptions::new(RegionId(5), 4 * P as u64)
            .at(addr)
            .map()
            .unwrap();
        assert_eq!(src.as_ptr() as u64, addr);
        assert_eq!(src.info().fixed_addr, Some(addr));
        // Mapping at the same address in the same process must fail cleanly.
        let err = RegionOptions::new(RegionId(5), 4 * P as u64)
            .at(addr)
            .map()
            .unwrap_err();
        assert!(matches!(err, MemError::AddressInUse { .. }), "{err}");
        let layout = RegionLayout::new(vec![src.info().clone()]).unwrap();
        drop(src);
        let dst = DestinationRegions::new(Backing::Private);
        dst.prepare(&layout).unwrap();
        assert_eq!(
            dst.regions().unwrap().get(RegionId(5)).unwrap().as_ptr() as u64,
            addr
        );
    }

    #[test]
    fn transparent_huge_pages_and_populate() {
        let r = RegionOptions::new(RegionId(9), 4 << 20)
            .transparent_huge_pages(true)
            .populate(true)
            .map()
            .unwrap();
        assert!(r.transparent_huge_pages());
        r.write_at((4 << 20) - 8, &[1; 8]).unwrap();
        assert_eq!(r.page_of(r.as_ptr() as usize + (4 << 20) - 1), Some(1023));
        assert_eq!(r.page_of(r.as_ptr() as usize + (4 << 20)), None);
        assert!(r.write_at((4 << 20) - 7, &[1; 8]).is_err());
    }

    #[test]
    fn duplicate_ids_rejected() {
        let a = RegionOptions::new(RegionId(1), P as u64).map().unwrap();
        let b = RegionOptions::new(RegionId(1), P as u64).map().unwrap();
        assert!(matches!(
            RegionSet::new([a, b]),
            Err(MemError::DuplicateRegion { .. })
        ));
        assert!(RegionOptions::new(RegionId(1), 100).map().is_err());
    }
}
