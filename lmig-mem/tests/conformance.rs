//! lmig-mem's backends through the conformance kits: `RegionSet` as
//! memory source and sink, `DestinationRegions` as sink, on every backing;
//! the `DirtyLog` adapter over a VMM-style bitmap, with and without
//! start/stop of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lmig_core::BoxError;
use lmig_core::conformance::memory;
use lmig_core::model::{RegionId, RegionInfo, RegionLayout};
use lmig_mem::conformance::dirty_log;
use lmig_mem::{Backing, DestinationRegions, DirtyLog, RegionOptions, RegionSet};

const BACKINGS: [Backing; 3] = [Backing::Private, Backing::SharedAnonymous, Backing::Memfd];

/// Three regions: 300 pages, 65 (a bitmap word and one bit), 1.
fn regions(backing: Backing) -> RegionSet {
    let ps = lmig_mem::page_size() as u64;
    RegionSet::new([(1, 300), (7, 65), (9, 1)].map(|(id, pages)| {
        RegionOptions::new(RegionId(id), pages * ps)
            .backing(backing)
            .map()
            .unwrap()
    }))
    .unwrap()
}

#[test]
fn region_set_is_a_conforming_source() {
    for backing in BACKINGS {
        let set = regions(backing);
        let fill = |r: RegionId, page: u64, data: &[u8]| {
            let region = set.get(r).unwrap();
            region
                .write_at(page as usize * region.page_size(), data)
                .unwrap();
        };
        memory::check_source(&format!("RegionSet/{backing:?}"), &set, &fill).unwrap();
    }
}

#[test]
fn region_set_is_a_conforming_sink() {
    for backing in BACKINGS {
        let set = regions(backing);
        let layout = set.layout().clone();
        memory::check_sink(&format!("RegionSet/{backing:?}"), &set, &layout).unwrap();
    }
}

#[test]
fn destination_regions_are_a_conforming_sink() {
    let layout = regions(Backing::Private).layout().clone();
    for backing in BACKINGS {
        let sink = DestinationRegions::new(backing);
        memory::check_sink(&format!("DestinationRegions/{backing:?}"), &sink, &layout).unwrap();
    }
}

/// A VMM's dirty bitmap: one atomic word per 64 pages per region, set by
/// the "guest", read and reset by the log.
struct Bitmaps(Vec<(RegionId, Vec<AtomicU64>)>);

impl Bitmaps {
    fn new(layout: &RegionLayout) -> Arc<Self> {
        Arc::new(Self(
            layout
                .regions()
                .iter()
                .map(|r| {
                    let words = (0..r.pages().div_ceil(64)).map(|_| AtomicU64::new(0));
                    (r.id, words.collect())
                })
                .collect(),
        ))
    }

    fn words(&self, region: RegionId) -> &[AtomicU64] {
        &self.0.iter().find(|(id, _)| *id == region).unwrap().1
    }

    fn set(&self, region: RegionId, page: u64) {
        self.words(region)[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    fn fetch(&self, region: &RegionInfo, out: &mut [u64]) -> Result<(), BoxError> {
        let (_, words) = self
            .0
            .iter()
            .find(|(id, _)| *id == region.id)
            .ok_or("unknown region")?;
        for (o, w) in out.iter_mut().zip(words) {
            *o = w.swap(0, Ordering::Acquire);
        }
        Ok(())
    }
}

#[test]
fn closure_dirty_log_conforms() {
    let layout = regions(Backing::Private).layout().clone();
    let maps = Bitmaps::new(&layout);
    let guest = Arc::clone(&maps);
    let log = move |r: &RegionInfo, out: &mut [u64]| maps.fetch(r, out);
    dirty_log::check("closure over a bitmap", &layout, log, &|r, p| {
        guest.set(r, p)
    })
    .unwrap();
}

/// A log that records only while started, like `KVM_MEM_LOG_DIRTY_PAGES`.
struct SwitchedLog {
    maps: Arc<Bitmaps>,
    on: Arc<AtomicBool>,
}

impl DirtyLog for SwitchedLog {
    fn fetch_and_reset(&mut self, region: &RegionInfo, bitmap: &mut [u64]) -> Result<(), BoxError> {
        self.maps.fetch(region, bitmap)
    }
    fn start(&mut self, _: &RegionLayout) -> Result<(), BoxError> {
        self.on.store(true, Ordering::Release);
        Ok(())
    }
    fn stop(&mut self) -> Result<(), BoxError> {
        self.on.store(false, Ordering::Release);
        Ok(())
    }
}

#[test]
fn switched_dirty_log_conforms() {
    let layout = regions(Backing::Private).layout().clone();
    let maps = Bitmaps::new(&layout);
    let on = Arc::new(AtomicBool::new(false));
    let log = SwitchedLog {
        maps: Arc::clone(&maps),
        on: Arc::clone(&on),
    };
    let write = move |r, p| {
        if on.load(Ordering::Acquire) {
            maps.set(r, p)
        }
    };
    dirty_log::check("switched log", &layout, log, &write).unwrap();
}

/// userfaultfd with kernel-mode faults, or a loud failure; a visible skip
/// only without root and with `LMIG_SKIP_PRIVILEGED=1`.
fn postcopy_may_run(test: &str) -> bool {
    lmig_core::testing::privileged(
        test,
        "userfaultfd with kernel-mode faults (CAP_SYS_PTRACE or /dev/userfaultfd)",
    )
}

#[test]
fn region_set_is_a_conforming_postcopy_sink() {
    if !postcopy_may_run("region_set_is_a_conforming_postcopy_sink") {
        return;
    }
    for backing in BACKINGS {
        let set = regions(backing);
        let layout = set.layout().clone();
        memory::check_postcopy(&format!("RegionSet/{backing:?}"), &set, &layout).unwrap();
    }
}

#[test]
fn destination_regions_are_a_conforming_postcopy_sink() {
    if !postcopy_may_run("destination_regions_are_a_conforming_postcopy_sink") {
        return;
    }
    let layout = regions(Backing::Private).layout().clone();
    for backing in BACKINGS {
        let sink = DestinationRegions::new(backing).prefault(false);
        memory::check_postcopy(&format!("DestinationRegions/{backing:?}"), &sink, &layout).unwrap();
    }
}
