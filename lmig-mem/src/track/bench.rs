//! Measurement hooks for benchmarks (feature `bench-internals`): the cost of
//! a tracker's `collect` against the bare `PAGEMAP_SCAN` loop under it.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::OnceLock;

use lmig_core::model::{RegionId, RegionPages};

use super::range::{TrackedRange, open_pagemap};
use super::uffd_wp::{COLLECT, Calls, SCAN_VEC_LEN, UffdWpTracker, scan_range};
use crate::error::Result;
use crate::region::{Region, RegionSet};
use crate::sys::pagemap::PageRegion;

/// Medians of [`measure_scan_cost`], in milliseconds.
#[derive(Copy, Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ScanFigures {
    /// Distinct pages written before each timed call.
    pub pages_written: u64,
    /// [`DirtyTracker::collect`](lmig_core::DirtyTracker::collect) over the tracked regions (the benchmark's
    /// `collect_ms_*`).
    pub collect_ms: f64,
    /// The bare `PAGEMAP_SCAN` loop over the same region, same run
    /// (the benchmark's `raw_scan_ms_*`).
    pub raw_scan_ms: f64,
}

/// Measurement aid for benchmarks: write `fraction` of the pages of region
/// `id` (fixed pseudo-random pages; one `u64` at the start of each page, so
/// the region's content changes), then time `collect`, write them again and
/// time [`UffdWpTracker::raw_scan`]; `rounds` times, alternating which goes
/// first. `tracker` must be started over `regions`. Returns the medians.
pub fn measure_scan_cost(
    tracker: &mut UffdWpTracker,
    regions: &RegionSet,
    id: RegionId,
    fraction: f64,
    rounds: usize,
) -> Result<ScanFigures> {
    let region = regions.get(id)?;
    let pages = region.pages();
    let n = ((pages as f64) * fraction.clamp(0.0, 1.0)) as u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut chosen: Vec<u64> = (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % pages
        })
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    let touch = |v: u64| -> Result<()> {
        chosen
            .iter()
            .try_for_each(|&p| region.write_at(p as usize * region.page_size(), &v.to_ne_bytes()))
    };
    let mut dirty = RegionPages::empty(regions.layout());
    // Start from a clean slate.
    tracker.collect_into(&mut dirty, Calls::Chunked)?;
    let (mut collect_ms, mut raw_ms) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        for step in 0..2 {
            touch(round as u64)?;
            if (step + round) % 2 == 0 {
                dirty.clear();
                let t = std::time::Instant::now();
                tracker.collect_into(&mut dirty, Calls::Chunked)?;
                collect_ms.push(t.elapsed().as_secs_f64() * 1e3);
            } else {
                let t = std::time::Instant::now();
                tracker.raw_scan(id)?;
                raw_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(ScanFigures {
        pages_written: chosen.len() as u64,
        collect_ms: median(&mut collect_ms),
        raw_scan_ms: median(&mut raw_ms),
    })
}

/// Measurement aid: one bare `PAGEMAP_SCAN` collect-and-reprotect loop over
/// `region` (`PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, `PAGE_IS_WRITTEN`,
/// a [`SCAN_VEC_LEN`]-slot buffer), returning the number of written pages.
/// The region must be tracked by a started [`UffdWpTracker`] (else the kernel
/// refuses with EPERM). Uses a process-wide `/proc/self/pagemap` fd and a
/// per-thread buffer, so repeated calls measure the ioctl alone.
#[doc(alias = "PAGEMAP_SCAN")]
pub fn raw_pagemap_scan(region: &Region) -> Result<u64> {
    static PAGEMAP: OnceLock<File> = OnceLock::new();
    let pagemap = match PAGEMAP.get() {
        Some(f) => f,
        None => {
            let f = open_pagemap()?;
            PAGEMAP.get_or_init(|| f)
        }
    };
    thread_local! {
        // Reused across calls, like a tracker's buffer, so the figure holds
        // no allocation or first-touch faults.
        static BUF: std::cell::RefCell<Vec<PageRegion>> =
            std::cell::RefCell::new(Vec::with_capacity(SCAN_VEC_LEN));
    }
    let r = TrackedRange::from_region(region);
    BUF.with_borrow_mut(|buf| {
        let mut pages = 0;
        scan_range(
            pagemap.as_fd(),
            &r,
            COLLECT,
            buf,
            Calls::Chunked,
            |_, count| pages += count,
        )?;
        Ok(pages)
    })
}
