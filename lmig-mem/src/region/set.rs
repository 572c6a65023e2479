//! [`RegionSet`]: the program's regions by id, with the calls the source
//! and the sink share.

use lmig_core::model::{PageRun, RegionId, RegionLayout};

use super::layout::layout_difference;
use super::options::RegionOptions;
use super::sink_state::RegionSink;
use crate::error::{MemError, Result};
use crate::memory::{Backing, Region};

/// The program's registered regions, by id.
///
/// A `RegionSet` is the [`MemorySource`](lmig_core::MemorySource) of a
/// source session and the [`MemorySink`](lmig_core::MemorySink) of a
/// destination session whose regions the program mapped itself (see
/// [`DestinationRegions`](crate::DestinationRegions) to map them from the
/// source's layout).
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
    /// `MemorySource::handed_over`: 0 none, 1 unconfirmed, 2 confirmed.
    pub(super) handed_over: std::sync::atomic::AtomicU8,
}

impl RegionSet {
    /// A set of regions; ids must be unique and no two regions may share
    /// an address ([`MemError::RegionsOverlap`]: possible only with
    /// [adopted](Region::adopt) memory).
    pub fn new(regions: impl IntoIterator<Item = Region>) -> Result<Self> {
        let mut regions: Vec<Region> = regions.into_iter().collect();
        regions.sort_by_key(Region::id);
        if let Some(w) = regions.windows(2).find(|w| w[0].id() == w[1].id()) {
            return Err(MemError::DuplicateRegion { region: w[0].id() });
        }
        let mut by_addr: Vec<&Region> = regions.iter().collect();
        by_addr.sort_by_key(|r| r.as_ptr() as usize);
        if let Some(w) = by_addr
            .windows(2)
            .find(|w| w[0].as_ptr() as usize + w[0].len() > w[1].as_ptr() as usize)
        {
            return Err(MemError::RegionsOverlap {
                first: w[0].id(),
                second: w[1].id(),
                addr: w[1].as_ptr() as u64,
            });
        }
        let layout = RegionLayout::new(regions.iter().map(|r| r.info().clone()).collect())
            .map_err(|e| MemError::LayoutMismatch {
                detail: e.to_string(),
            })?;
        Ok(Self {
            sink: RegionSink::new(&regions),
            layout,
            regions,
            handed_over: std::sync::atomic::AtomicU8::new(0),
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

    pub(super) fn index_of(&self, id: RegionId) -> Result<usize> {
        self.layout
            .index_of(id)
            .map_err(|_| MemError::UnknownRegion { region: id })
    }
}
