//! What every tracker reads: the address ranges of the tracked regions and
//! `/proc/self/pagemap`.

use std::fs::File;

use lmig_core::model::RegionId;

use crate::error::{MemError, Result};
use crate::region::{Region, RegionSet};

/// The address range of one tracked region (copied from the region: a
/// tracker does not borrow the [`RegionSet`]; if the regions are unmapped
/// while tracking, `collect` fails rather than touch anything else).
#[derive(Copy, Clone, Debug)]
pub(crate) struct TrackedRange {
    pub id: RegionId,
    pub start: u64,
    pub len: u64,
    pub page_size: u64,
}

impl TrackedRange {
    pub(crate) fn from_region(r: &Region) -> Self {
        Self {
            id: r.id(),
            start: r.as_ptr() as u64,
            len: r.len() as u64,
            page_size: r.page_size() as u64,
        }
    }

    pub(crate) fn of(regions: &RegionSet) -> Vec<Self> {
        regions.regions().iter().map(Self::from_region).collect()
    }

    pub(crate) fn describe(&self) -> String {
        format!("region {} ({:#x}, {} bytes)", self.id, self.start, self.len)
    }
}

/// Open `/proc/self/pagemap` (read by `PAGEMAP_SCAN` and soft-dirty scans).
pub(crate) fn open_pagemap() -> Result<File> {
    File::open("/proc/self/pagemap").map_err(|e| MemError::os("open", "/proc/self/pagemap", e))
}
