//! Post-copy held with nobody serving faults (the source lost for good,
//! `MigrationError::PostcopyPaused` in lmig-core): after
//! `MemorySink::hold_missing`, every page that is not missing reads
//! without a fault handler — data pages and zero pages the sink placed as
//! "no work" (never touched) alike — and the missing pages stay missing.
//! Found by the fault-injection suite (`lmig-bench faults`): a hybrid
//! destination paused with zero pages of its pre-copy round never touched
//! blocked a reader of those pages for good.
//!
//! Needs userfaultfd (root here): fails loudly without it;
//! `LMIG_SKIP_PRIVILEGED=1` without root turns that into a visible skip.
//! Every read is bounded: a reader that blocks fails the test.

use std::sync::Arc;
use std::time::Duration;

use lmig_core::MemorySink;
use lmig_core::model::{PageRun, RegionId, RegionInfo, RegionLayout, RegionPages};
use lmig_mem::{Backing, DestinationRegions};

const R: RegionId = RegionId(1);
const PAGES: u64 = 32;

fn pattern(page: u64, ps: usize) -> Vec<u8> {
    (0..ps)
        .map(|i| (i as u64 ^ (page * 131)) as u8 | 1)
        .collect()
}

/// Read `page` on another thread, bounded: `None` if the read blocked.
fn read_bounded(dst: &Arc<DestinationRegions>, page: u64, ps: usize) -> Option<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dst.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; ps];
        if d.read_pages(&PageRun::new(R, page, 1), &mut buf).is_ok() {
            let _ = tx.send(buf);
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).ok()
}

#[test]
fn held_postcopy_reads_every_page_that_is_not_missing() {
    let ps = lmig_mem::page_size();
    for backing in [Backing::Private, Backing::SharedAnonymous, Backing::Memfd] {
        let layout = RegionLayout::new(vec![
            RegionInfo::new(R, PAGES * ps as u64, ps as u32).unwrap(),
        ])
        .unwrap();
        let dst = Arc::new(DestinationRegions::new(backing).prefault(false));
        dst.prepare(&layout).unwrap();
        // Pre-copy: data in 0..16, zeros (no work) in 16..24; 24.. missing.
        for p in 0..16 {
            dst.write_pages(&PageRun::new(R, p, 1), &pattern(p, ps))
                .unwrap();
        }
        dst.zero_pages(&PageRun::new(R, 16, 8)).unwrap();
        let mut missing = RegionPages::empty(&layout);
        missing.get_mut(R).unwrap().insert_range(24, PAGES - 24);
        if let Err(e) = dst.begin_postcopy(&missing) {
            if !lmig_core::testing::privileged(
                "postcopy_hold::held_postcopy_reads_every_page_that_is_not_missing",
                &e.to_string(),
            ) {
                return;
            }
            panic!("userfaultfd post-copy unavailable: {e}");
        }
        dst.hold_missing().unwrap();
        for p in 0..24 {
            let want = if p < 16 { pattern(p, ps) } else { vec![0; ps] };
            let got = read_bounded(&dst, p, ps)
                .unwrap_or_else(|| panic!("{backing:?}: page {p} blocked its reader"));
            assert!(got == want, "{backing:?}: page {p} reads wrong");
        }
        let set = dst.regions().expect("prepared");
        assert_eq!(
            set.postcopy_missing(),
            PAGES - 24,
            "{backing:?}: missing pages stay missing"
        );
        // The source comes back: the missing pages arrive, post-copy ends.
        for p in 24..PAGES {
            dst.write_pages(&PageRun::new(R, p, 1), &pattern(p, ps))
                .unwrap();
        }
        dst.end_postcopy().unwrap();
        for p in 24..PAGES {
            assert!(
                read_bounded(&dst, p, ps) == Some(pattern(p, ps)),
                "{backing:?}: page {p}"
            );
        }
    }
}
