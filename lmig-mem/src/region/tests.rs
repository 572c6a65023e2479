//! Region set, source and sink together: round trips and refused input.

use lmig_core::model::{PageRun, RegionId, RegionInfo, RegionLayout};
use lmig_core::{MemorySink, MemorySource, MigrationError};

use super::{Backing, DestinationRegions, RegionOptions, RegionSet};
use crate::error::MemError;

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
    let info =
        |id, pages: u64, ps: u32| RegionInfo::new(RegionId(id), pages * u64::from(ps), ps).unwrap();
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
