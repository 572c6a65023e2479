//! Micro-figures of the default dirty tracker, for the benchmark's
//! `collect_ms_1pct` and `raw_scan_ms_1pct`:
//!
//! ```text
//! cargo run --release -p lmig-mem --example tracker_figures -- [MIB] [ROUNDS]
//! ```
//!
//! Maps a private anonymous region of MIB MiB (default 1024), pre-faults it,
//! starts a [`UffdWpTracker`] and, for 0 %, 1 % and 10 % of the pages written
//! (fixed pseudo-random pages), times `collect` and the bare `PAGEMAP_SCAN`
//! loop ([`UffdWpTracker::raw_scan`], same flags and buffer) alternately on
//! the same pages in the same run. Prints medians as a table and one JSON line.

use std::time::Instant;

use lmig_core::DirtyTracker;
use lmig_core::model::{RegionId, RegionPages};
use lmig_mem::track::{measure_scan_cost, raw_pagemap_scan};
use lmig_mem::{RegionOptions, RegionSet, UffdWpTracker};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(21);
    let id = RegionId(1);

    let t0 = Instant::now();
    let region = RegionOptions::new(id, mib << 20).populate(true).map()?;
    let populate_ms = t0.elapsed().as_secs_f64() * 1e3;
    let regions = RegionSet::new([region])?;
    let region = regions.get(id)?;
    let pages = region.pages();
    let ps = region.page_size();

    let mut tracker = UffdWpTracker::new(&regions)?;
    let t0 = Instant::now();
    tracker.start()?;
    let wp_ms = t0.elapsed().as_secs_f64() * 1e3;

    let mut dirty = RegionPages::empty(regions.layout());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut json = Vec::new();
    println!(
        "region {mib} MiB ({pages} pages), populate {populate_ms:.1} ms, initial write-protect {wp_ms:.1} ms"
    );
    println!(
        "{:>8} {:>8} {:>12} {:>12} {:>14} {:>7}",
        "written", "pages", "collect_ms", "raw_scan_ms", "raw_static_ms", "ratio"
    );
    for permille in [0u64, 10, 100] {
        let n = pages * permille / 1000;
        let chosen: Vec<u64> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % pages
            })
            .collect();
        let touch = |v: u64| {
            for &p in &chosen {
                region
                    .write_at(p as usize * ps, &v.to_ne_bytes())
                    .expect("in bounds");
            }
        };
        let (mut collect_ms, mut raw_ms, mut raw_static_ms) = (Vec::new(), Vec::new(), Vec::new());
        let mut found = (0, 0, 0);
        for round in 0..rounds {
            // Alternate the order so neither side always runs first.
            for step in 0..3 {
                let which = (step + round) % 3;
                touch(round as u64);
                let t = Instant::now();
                match which {
                    0 => {
                        dirty.clear();
                        let t = Instant::now();
                        tracker.collect(&mut dirty)?;
                        collect_ms.push(t.elapsed().as_secs_f64() * 1e3);
                        found.0 = dirty.count();
                        continue;
                    }
                    1 => {
                        found.1 = tracker.raw_scan(id)?;
                        raw_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    _ => {
                        found.2 = raw_pagemap_scan(region)?;
                        raw_static_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }
        let (c, r, s) = (
            median(&mut collect_ms),
            median(&mut raw_ms),
            median(&mut raw_static_ms),
        );
        let distinct = {
            let mut d = chosen.clone();
            d.sort_unstable();
            d.dedup();
            d.len() as u64
        };
        assert_eq!(
            (found.0, found.1, found.2),
            (distinct, distinct, distinct),
            "every written page found"
        );
        println!(
            "{:>7.1}% {:>8} {:>12.3} {:>12.3} {:>14.3} {:>7.2}",
            permille as f64 / 10.0,
            distinct,
            c,
            r,
            s,
            c / r
        );
        json.push(format!(
            "\"collect_ms_{p}\":{c:.4},\"raw_scan_ms_{p}\":{r:.4},\"raw_static_scan_ms_{p}\":{s:.4}",
            p = match permille {
                0 => "0pct",
                10 => "1pct",
                _ => "10pct",
            }
        ));
    }
    // The same figure through the library's measurement aid (what lmig-bench uses).
    let f = measure_scan_cost(&mut tracker, &regions, id, 0.01, rounds)?;
    println!(
        "measure_scan_cost(1%): {} pages, collect {:.3} ms, raw scan {:.3} ms, ratio {:.2}",
        f.pages_written,
        f.collect_ms,
        f.raw_scan_ms,
        f.collect_ms / f.raw_scan_ms
    );
    tracker.stop()?;
    println!(
        "{{\"scenario\":\"tracker\",\"tracker\":\"{}\",\"mib\":{mib},\"rounds\":{rounds},\"populate_ms\":{populate_ms:.1},\"initial_wp_ms\":{wp_ms:.2},{}}}",
        tracker.name(),
        json.join(",")
    );
    Ok(())
}
