//! Placement of received pages into the memory sink, before `Commit`
//! ([`place`]: bad input is an error) and after it ([`place_postcopy`]: bad
//! input is dropped with a warning, every page placed once).

use std::sync::Mutex;

use bytes::Bytes;

use super::Progress;
use super::postcopy::{Placement, place_postcopy};
use super::receive::place;
use crate::error::MigrationError;
use crate::model::{PageBatch, PageData, PageRun, RegionId, RegionInfo, RegionLayout, RegionPages};
use crate::testing::VecMemory;
use crate::verify::PageHashes;

const PS: usize = 4096;

fn layout() -> RegionLayout {
    RegionLayout::new(vec![
        RegionInfo::new(RegionId(1), 16 * PS as u64, PS as u32).unwrap(),
        RegionInfo::new(RegionId(2), 4 * PS as u64, PS as u32).unwrap(),
    ])
    .unwrap()
}

fn raw(region: u32, first: u64, count: u32, byte: u8) -> PageBatch {
    PageBatch {
        round: 0,
        run: PageRun::new(RegionId(region), first, count),
        data: PageData::Raw(Bytes::from(vec![byte; count as usize * PS])),
    }
}

fn zero(region: u32, first: u64, count: u32) -> PageBatch {
    PageBatch {
        round: 0,
        run: PageRun::new(RegionId(region), first, count),
        data: PageData::Zero,
    }
}

fn page(mem: &VecMemory, region: u32, page: usize) -> Vec<u8> {
    mem.snapshot(RegionId(region))[page * PS..(page + 1) * PS].to_vec()
}

#[test]
fn a_batch_lands_at_its_region_and_offset() {
    let layout = layout();
    let mem = VecMemory::new(&layout);
    let mut progress = Progress::new(layout.clone());
    place(&mem, &mut progress, &raw(1, 3, 2, 0xab)).unwrap();
    place(&mem, &mut progress, &raw(2, 0, 1, 0xcd)).unwrap();
    assert_eq!(page(&mem, 1, 2), vec![0; PS]);
    assert_eq!(page(&mem, 1, 3), vec![0xab; PS]);
    assert_eq!(page(&mem, 1, 4), vec![0xab; PS]);
    assert_eq!(page(&mem, 1, 5), vec![0; PS]);
    assert_eq!(page(&mem, 2, 0), vec![0xcd; PS]);
    assert_eq!(progress.placed_total, 3);
    assert_eq!(progress.report.pages_placed, 3);
    assert_eq!(progress.report.bytes_received, 3 * PS as u64);
    assert_eq!(progress.report.zero_pages, 0);
}

#[test]
fn a_zero_batch_clears_its_pages_and_sends_no_bytes() {
    let layout = layout();
    let mem = VecMemory::new(&layout);
    mem.fill(RegionId(1), 7, &[0xff; PS]);
    let mut progress = Progress::new(layout.clone());
    place(&mem, &mut progress, &zero(1, 6, 3)).unwrap();
    assert_eq!(page(&mem, 1, 7), vec![0; PS]);
    assert_eq!(progress.report.zero_pages, 3);
    assert_eq!(progress.report.bytes_received, 0);
    assert_eq!(progress.placed_total, 3);
}

#[test]
fn the_hashes_follow_the_last_version_placed() {
    let layout = layout();
    let mem = VecMemory::new(&layout);
    let mut progress = Progress::new(layout.clone());
    place(&mem, &mut progress, &raw(1, 0, 16, 1)).unwrap();
    place(&mem, &mut progress, &raw(1, 5, 1, 2)).unwrap();
    place(&mem, &mut progress, &zero(2, 0, 4)).unwrap();
    let placed = PageHashes::of_memory(&mem, &layout).unwrap();
    assert_eq!(progress.hashes.digests(), placed.digests());
}

#[test]
fn pages_outside_the_layout_are_an_error_before_commit() {
    let layout = layout();
    let mem = VecMemory::new(&layout);
    let before = (mem.snapshot(RegionId(1)), mem.snapshot(RegionId(2)));
    let mut progress = Progress::new(layout.clone());
    let bad = [
        // No such region.
        (raw(9, 0, 1, 1), "unknown region"),
        // Starts past the end.
        (raw(2, 4, 1, 1), "first page past the end"),
        // Ends past the end.
        (raw(2, 3, 2, 1), "last page past the end"),
        (zero(1, 15, 2), "zero run past the end"),
        // An offset whose end overflows.
        (zero(1, u64::MAX, 1), "overflowing offset"),
        (zero(1, 0, 0), "empty run"),
    ];
    for (batch, what) in bad {
        let err = place(&mem, &mut progress, &batch).expect_err(what);
        assert!(
            matches!(
                err,
                MigrationError::UnknownRegion { .. } | MigrationError::PageOutsideRegion { .. }
            ),
            "{what}: {err}"
        );
    }
    assert_eq!(
        (mem.snapshot(RegionId(1)), mem.snapshot(RegionId(2))),
        before
    );
    assert_eq!(progress.placed_total, 0);
}

#[test]
fn page_data_of_the_wrong_length_is_an_error_before_commit() {
    let layout = layout();
    let mem = VecMemory::new(&layout);
    let mut progress = Progress::new(layout.clone());
    for len in [0, PS - 1, 2 * PS + 1, 3 * PS] {
        let batch = PageBatch {
            round: 0,
            run: PageRun::new(RegionId(1), 0, 2),
            data: PageData::Raw(Bytes::from(vec![7; len])),
        };
        let err = place(&mem, &mut progress, &batch).expect_err("wrong length");
        assert!(
            matches!(err, MigrationError::Protocol { .. }),
            "{len}: {err}"
        );
    }
    assert_eq!(mem.snapshot(RegionId(1)), vec![0; 16 * PS]);
    assert_eq!(progress.placed_total, 0);
}

/// Post-copy placement with pages 2..10 of region 1 still missing.
fn postcopy_placement(layout: &RegionLayout) -> Mutex<Placement> {
    let mut missing = RegionPages::empty(layout);
    missing
        .insert_run(&PageRun::new(RegionId(1), 2, 8))
        .unwrap();
    Mutex::new(Placement::new(missing, PageHashes::new(layout)))
}

#[test]
fn postcopy_places_only_missing_pages_and_each_once() {
    let layout = layout();
    let mem = VecMemory::new(&layout);
    mem.fill(RegionId(1), 0, &[0x11; PS]);
    let shared = postcopy_placement(&layout);
    // Overlaps a placed page (0, 1) and missing ones (2, 3).
    place_postcopy(&mem, &layout, &shared, &raw(1, 0, 4, 0xaa)).unwrap();
    assert_eq!(page(&mem, 1, 0), vec![0x11; PS], "already there: untouched");
    assert_eq!(page(&mem, 1, 2), vec![0xaa; PS]);
    assert_eq!(page(&mem, 1, 3), vec![0xaa; PS]);
    // A second copy of page 3 (a resent reply) is dropped.
    place_postcopy(&mem, &layout, &shared, &raw(1, 3, 1, 0xbb)).unwrap();
    assert_eq!(page(&mem, 1, 3), vec![0xaa; PS], "placed once");
    let sh = shared.lock().unwrap();
    let left: Vec<_> = sh.missing.get(RegionId(1)).unwrap().runs().collect();
    assert_eq!(left, vec![(4, 6)]);
    assert!(sh.warnings.is_empty(), "{:?}", sh.warnings);
}

#[test]
fn postcopy_zero_pages_fill_the_missing_ones() {
    let layout = layout();
    let mem = VecMemory::new(&layout);
    mem.fill(RegionId(1), 5, &[0x22; PS]);
    let shared = postcopy_placement(&layout);
    place_postcopy(&mem, &layout, &shared, &zero(1, 2, 8)).unwrap();
    assert_eq!(page(&mem, 1, 5), vec![0; PS]);
    assert!(shared.lock().unwrap().missing.is_empty());
}

#[test]
fn bad_postcopy_input_is_dropped_with_a_warning_not_an_error() {
    let layout = layout();
    let mem = VecMemory::new(&layout);
    let shared = postcopy_placement(&layout);
    let wrong_length = PageBatch {
        round: 0,
        run: PageRun::new(RegionId(1), 2, 2),
        data: PageData::Raw(Bytes::from(vec![9; PS])),
    };
    let bad = [
        raw(9, 2, 1, 9),
        raw(1, 16, 1, 9),
        raw(1, 15, 2, 9),
        zero(1, u64::MAX, 1),
        wrong_length,
    ];
    let n = bad.len();
    for batch in bad {
        place_postcopy(&mem, &layout, &shared, &batch).unwrap();
    }
    assert_eq!(mem.snapshot(RegionId(1)), vec![0; 16 * PS]);
    let sh = shared.lock().unwrap();
    assert_eq!(sh.warnings.len(), n, "{:?}", sh.warnings);
    assert_eq!(sh.missing.count(), 8, "nothing placed");
}
