//! A tracker the program feeds itself: it marks every page it writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lmig_core::DirtyTracker;
use lmig_core::model::{PageRun, RegionId, RegionLayout, RegionPages};

use crate::error::{MemError, Result};

#[derive(Debug)]
struct RegionBits {
    id: RegionId,
    pages: u64,
    words: Box<[AtomicU64]>,
}

#[derive(Debug)]
struct Marks {
    /// Sorted by id.
    regions: Vec<RegionBits>,
}

impl Marks {
    fn region(&self, id: RegionId) -> Result<&RegionBits> {
        self.regions
            .binary_search_by_key(&id, |r| r.id)
            .map(|i| &self.regions[i])
            .map_err(|_| MemError::UnknownRegion { region: id })
    }

    fn mark_range(&self, id: RegionId, first: u64, count: u64) -> Result<()> {
        let r = self.region(id)?;
        if count == 0 || first >= r.pages || count > r.pages - first {
            let run = PageRun::new(id, first, count.min(u64::from(u32::MAX)) as u32);
            return Err(MemError::PageOutsideRegion {
                run,
                region_pages: r.pages,
            });
        }
        let end = first + count;
        let mut p = first;
        while p < end {
            let lo = p % 64;
            let n = (end - p).min(64 - lo);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            r.words[(p / 64) as usize].fetch_or(mask, Ordering::Release);
            p += n;
        }
        Ok(())
    }
}

/// A cheap, cloneable handle the program's threads use to mark pages dirty.
///
/// Mark a page *after* writing it: a collect racing the write then reports
/// the page at the latest at the next collect.
#[derive(Clone, Debug)]
pub struct DirtyMarker {
    marks: Arc<Marks>,
}

impl DirtyMarker {
    /// Mark one page of `region` written.
    pub fn mark(&self, region: RegionId, page: u64) -> Result<()> {
        self.marks.mark_range(region, page, 1)
    }

    /// Mark `count` pages from `first` written.
    pub fn mark_range(&self, region: RegionId, first: u64, count: u64) -> Result<()> {
        self.marks.mark_range(region, first, count)
    }
}

/// Dirty tracking by the program's own marks: an atomic bitmap per region,
/// collected with an atomic swap per 64 pages (nothing marked is ever lost).
#[derive(Debug)]
pub struct ManualTracker {
    marks: Arc<Marks>,
}

impl ManualTracker {
    /// A tracker for the regions of `layout` (e.g. `regions.layout()`).
    pub fn new(layout: &RegionLayout) -> Self {
        let regions = layout
            .regions()
            .iter()
            .map(|r| RegionBits {
                id: r.id,
                pages: r.pages(),
                words: (0..r.pages().div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            })
            .collect();
        Self {
            marks: Arc::new(Marks { regions }),
        }
    }

    /// A handle for the program's threads.
    pub fn marker(&self) -> DirtyMarker {
        DirtyMarker {
            marks: Arc::clone(&self.marks),
        }
    }

    /// Mark one page of `region` written.
    pub fn mark(&self, region: RegionId, page: u64) -> Result<()> {
        self.marks.mark_range(region, page, 1)
    }

    /// Mark `count` pages from `first` written.
    pub fn mark_range(&self, region: RegionId, first: u64, count: u64) -> Result<()> {
        self.marks.mark_range(region, first, count)
    }
}

impl DirtyTracker for ManualTracker {
    fn name(&self) -> &'static str {
        "manual"
    }

    fn start(&mut self) -> lmig_core::Result<()> {
        for r in &self.marks.regions {
            r.words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
        }
        Ok(())
    }

    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        let mut word_buf = Vec::new();
        for r in &self.marks.regions {
            let set = dirty.get_mut(r.id)?;
            word_buf.clear();
            word_buf.extend(r.words.iter().map(|w| w.swap(0, Ordering::Acquire)));
            set.insert_bitmap(&word_buf);
        }
        Ok(())
    }

    fn stop(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
}
