//! [`RegionSet`]: the program's regions by id, with the calls the source
//! and the sink share.

use std::time::Duration;

use lmig_core::model::{PageRun, RegionId, RegionLayout, RegionPages};

use super::layout_difference;
use super::options::RegionOptions;
use super::sink::RegionSink;
use crate::error::{MemError, Result};
use crate::memory::{Backing, Region};
use crate::postcopy::{PostcopyOptions, PostcopyStats};

/// The program's registered regions, by id.
///
/// A `RegionSet` is the [`MemorySource`](lmig_core::MemorySource) of a source session and the
/// [`MemorySink`](lmig_core::MemorySink) of a destination session whose regions the program mapped
/// itself (see [`DestinationRegions`](crate::DestinationRegions) to map them from the source's layout).
/// Trackers are created over it (`crate::track`).
///
/// Sink methods take `&self` and may run on several threads for disjoint
/// chunks: every run is checked against its region before a byte moves.
#[derive(Debug)]
pub struct RegionSet {
    /// The sink state, post-copy included (declared before `regions` so
    /// that post-copy unregisters before they are unmapped).
    pub(super) sink: RegionSink,
    pub(super) layout: RegionLayout,
    /// Same order as `layout.regions()` (sorted by id).
    pub(super) regions: Vec<Region>,
}

impl RegionSet {
    /// A set of regions; ids must be unique.
    pub fn new(regions: impl IntoIterator<Item = Region>) -> Result<Self> {
        let mut regions: Vec<Region> = regions.into_iter().collect();
        regions.sort_by_key(Region::id);
        if let Some(w) = regions.windows(2).find(|w| w[0].id() == w[1].id()) {
            return Err(MemError::DuplicateRegion { region: w[0].id() });
        }
        let layout = RegionLayout::new(regions.iter().map(|r| r.info().clone()).collect())
            .map_err(|e| MemError::LayoutMismatch {
                detail: e.to_string(),
            })?;
        Ok(Self {
            sink: RegionSink::new(&regions),
            layout,
            regions,
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
        set.sink.forget_data();
        Ok(set)
    }

    /// Whether pages are pre-faulted (`MADV_POPULATE_WRITE`, run by run)
    /// just before the first data is copied into them, rather than taking
    /// one fault per page in the copy (default true). Pages that only ever
    /// receive zero runs are never faulted in. Turn it off for a post-copy
    /// destination.
    pub fn set_prefault(&mut self, on: bool) {
        self.sink.set_prefault(on);
    }

    /// How post-copy handles faults (see [`crate::postcopy`]).
    pub fn set_postcopy_options(&mut self, options: PostcopyOptions) {
        self.sink.set_postcopy_options(options);
    }

    /// Post-copy statistics: live while post-copy runs, final after it ended.
    pub fn postcopy_stats(&self) -> PostcopyStats {
        self.sink.postcopy_stats()
    }

    /// Is post-copy running (pages registered for missing-page faults)?
    pub fn in_postcopy(&self) -> bool {
        self.sink.in_postcopy()
    }

    /// Post-copy: drop the stale content of `missing` and register the
    /// regions for missing-page faults. See [`crate::postcopy`].
    pub fn begin_postcopy(&self, missing: &RegionPages) -> Result<()> {
        self.sink.begin_postcopy(&self.regions, missing)
    }

    /// Post-copy: wait up to `timeout` for a touch of a missing page.
    pub fn wait_fault(&self, timeout: Duration) -> Result<Option<PageRun>> {
        self.sink.wait_fault(timeout)
    }

    /// Post-copy: unregister the regions. Refuses while pages are missing
    /// ([`MemError::PostcopyIncomplete`]).
    pub fn end_postcopy(&self) -> Result<()> {
        self.sink.end_postcopy()
    }

    /// Post-copy failed for good (the source is gone): unregister even
    /// though pages are missing. Threads blocked on a missing page resume
    /// and read **zeros** there; the program's memory is incomplete and it
    /// must be terminated (this only keeps it from hanging forever).
    pub fn abandon_postcopy(&self) {
        self.sink.abandon_postcopy();
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
        let i = self.index_of(run.region)?;
        self.sink.write_run(i, &self.regions[i], run, src)
    }

    /// Zero the pages of `run` (checked first). In post-copy, missing pages
    /// are filled atomically and their waiters woken.
    ///
    /// Outside post-copy only the pages that may hold data are touched:
    /// short runs of them are cleared with a memset, longer ones
    /// ([`DISCARD_PAGES`](crate::region::DISCARD_PAGES) and more) are given back to the kernel
    /// (`MADV_DONTNEED` for private memory, `MADV_REMOVE` for shared memory),
    /// after which they read as zero without occupying memory.
    pub fn zero_run(&self, run: &PageRun) -> Result<()> {
        let i = self.index_of(run.region)?;
        self.sink.zero_run(i, &self.regions[i], run)
    }

    fn index_of(&self, id: RegionId) -> Result<usize> {
        self.layout
            .index_of(id)
            .map_err(|_| MemError::UnknownRegion { region: id })
    }

    /// Learn which pages may hold data; see [`RegionSink::learn_populated`].
    pub(crate) fn learn_populated(&self) -> Result<()> {
        self.sink.learn_populated(&self.regions)
    }

    /// Every page was given back to the kernel: all read as zero.
    pub(crate) fn forget_data(&self) {
        self.sink.forget_data();
    }
}
