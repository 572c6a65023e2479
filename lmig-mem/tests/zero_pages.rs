//! Free memory costs little and stays right: which pages hold data is found
//! with the kernel (`PAGEMAP_SCAN`, `SEEK_DATA`), zero pages are tested in
//! place, the destination leaves known-zero pages alone and gives long zero
//! runs back to the kernel, and a page that held data and is zero now ends
//! up zero at the destination, on private, shared and memfd memory.
//!
//! Uses userfaultfd write-protect for the migrations: fails loudly without
//! it; `LMIG_SKIP_PRIVILEGED=1` turns that into a visible skip when not run as root.

use std::os::fd::AsFd;

use lmig_core::model::{PageRun, PageSet, RegionId, RegionPages};
use lmig_core::policy::{Decision, Estimate, Policy, RoundStats};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, Source, SourceConfig};
use lmig_core::testing::{NullProgram, channel_pair};
use lmig_core::{DirtyTracker, Event, MemorySink, MemorySource};
use lmig_mem::{Backing, DestinationRegions, Region, RegionOptions, RegionSet, UffdWpTracker};

const R: RegionId = RegionId(7);
const BACKINGS: [Backing; 3] = [Backing::Private, Backing::SharedAnonymous, Backing::Memfd];

fn ps() -> usize {
    lmig_mem::page_size()
}

fn region(backing: Backing, pages: u64) -> Region {
    RegionOptions::new(R, pages * ps() as u64)
        .backing(backing)
        .map()
        .unwrap()
}

fn page(r: &Region, p: u64) -> Vec<u8> {
    let mut v = vec![0; ps()];
    r.read_at(p as usize * ps(), &mut v).unwrap();
    v
}

fn is_zero(v: &[u8]) -> bool {
    v.iter().all(|&b| b == 0)
}

fn fill(r: &Region, p: u64, seed: u8) {
    let v: Vec<u8> = (0..ps())
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect();
    r.write_at(p as usize * ps(), &v).unwrap();
}

fn set_of(pages: u64, members: &[u64]) -> PageSet {
    let mut s = PageSet::new(pages);
    for &p in members {
        s.insert(p);
    }
    s
}

/// Fail when userfaultfd write-protect is missing (a visible skip without
/// root and with `LMIG_SKIP_PRIVILEGED=1`).
fn tracker(set: &RegionSet) -> Option<UffdWpTracker> {
    match UffdWpTracker::new(set) {
        Ok(t) => Some(t),
        Err(e) => {
            if !lmig_core::testing::privileged("zero_pages", &e.to_string()) {
                return None;
            }
            panic!("userfaultfd write-protect unavailable: {e}");
        }
    }
}

#[test]
fn populated_pages_of_private_memory() {
    let r = region(Backing::Private, 64);
    fill(&r, 3, 1);
    fill(&r, 40, 2);
    // A read maps the shared zero page: still zero, left out.
    assert!(is_zero(&page(&r, 10)));
    let mut found = PageSet::new(64);
    assert!(r.populated(&mut found).unwrap());
    assert_eq!(found, set_of(64, &[3, 40]));
    // A page given back to the kernel reads as zero again.
    let set = RegionSet::new([r]).unwrap();
    let mut pages = RegionPages::empty(set.layout());
    assert!(MemorySource::populated(&set, &mut pages).unwrap());
    assert_eq!(pages.get(R).unwrap(), &set_of(64, &[3, 40]));
}

/// A region longer than one scan call (16 MiB): populated pages on both
/// sides of the call boundaries, and a run across one, are all found.
#[test]
fn populated_pages_of_private_memory_across_scan_calls() {
    // 40 MiB: calls cut after 4096 and 8192 pages.
    let n = 10_240;
    let r = region(Backing::Private, n);
    let pages = [0, 4094, 4095, 4096, 4097, 8191, 8192, 10_239];
    for (i, &p) in pages.iter().enumerate() {
        fill(&r, p, i as u8 + 1);
    }
    let mut found = PageSet::new(n);
    assert!(r.populated(&mut found).unwrap());
    assert_eq!(found, set_of(n, &pages));
}

#[test]
fn populated_pages_of_memfd_see_writes_through_the_file() {
    let r = region(Backing::Memfd, 64);
    fill(&r, 5, 3);
    // Written through the file, never mapped here: the page tables cannot
    // see it, the file can.
    let fd = r.memfd().unwrap().try_clone_to_owned().unwrap();
    let file = std::fs::File::from(fd);
    std::os::unix::fs::FileExt::write_at(&file, &[9u8; 16], 20 * ps() as u64 + 100).unwrap();
    let mut found = PageSet::new(64);
    assert!(r.populated(&mut found).unwrap());
    assert_eq!(found, set_of(64, &[5, 20]));
    assert_eq!(page(&r, 20)[100], 9);
    let _ = file.as_fd();
}

#[test]
fn shared_anonymous_memory_cannot_tell() {
    let r = region(Backing::SharedAnonymous, 16);
    fill(&r, 1, 4);
    let mut found = PageSet::new(16);
    assert!(!r.populated(&mut found).unwrap());
    assert!(found.is_empty());
    // The session then reads every page of such a region.
    let set = RegionSet::new([r]).unwrap();
    let mut pages = RegionPages::empty(set.layout());
    assert!(!MemorySource::populated(&set, &mut pages).unwrap());
    assert_eq!(pages.count(), 16);
}

#[test]
fn under_the_uffd_wp_tracker_discovery_is_a_superset() {
    let r = region(Backing::Private, 64);
    fill(&r, 3, 1);
    let set = RegionSet::new([r]).unwrap();
    let Some(mut t) = tracker(&set) else { return };
    t.start().unwrap();
    // Markers of untouched pages count as swapped: never fewer pages than
    // hold data, whatever the kernel reports.
    let mut pages = RegionPages::empty(set.layout());
    MemorySource::populated(&set, &mut pages).unwrap();
    assert!(pages.get(R).unwrap().contains(3));
    t.stop().unwrap();
}

#[test]
fn zero_pages_are_found_in_place() {
    for backing in BACKINGS {
        let r = region(backing, 6);
        let last = ps() - 1;
        r.write_at(ps() + last, &[1]).unwrap(); // page 1: last byte
        r.write_at(2 * ps(), &[1]).unwrap(); // page 2: first byte
        fill(&r, 4, 5);
        let mut zero = vec![false; 6];
        r.find_zero_pages(&PageRun::new(R, 0, 6), &mut zero)
            .unwrap();
        assert_eq!(zero, [true, false, false, true, false, true], "{backing:?}");
        // Wrong flag count or a run outside the region: an error.
        assert!(
            r.find_zero_pages(&PageRun::new(R, 0, 6), &mut [false; 5])
                .is_err()
        );
        assert!(
            r.find_zero_pages(&PageRun::new(R, 4, 3), &mut [false; 3])
                .is_err()
        );
    }
}

/// Data everywhere, then zero runs short (memset) and long (given back);
/// pages around them keep their data.
fn check_zero_runs(sink: &dyn MemorySink, regions: impl Fn() -> Vec<Vec<u8>>, what: &str) {
    let data = |p: u64| -> Vec<u8> {
        (0..ps())
            .map(|i| (i as u8).wrapping_add(p as u8) | 1)
            .collect()
    };
    sink.write_pages(
        &PageRun::new(R, 0, 64),
        &(0..64).flat_map(data).collect::<Vec<u8>>(),
    )
    .unwrap();
    sink.zero_pages(&PageRun::new(R, 2, 3)).unwrap(); // short: memset
    sink.zero_pages(&PageRun::new(R, 10, 40)).unwrap(); // long: madvise
    sink.zero_pages(&PageRun::new(R, 60, 4)).unwrap();
    let pages = regions();
    for p in 0..64u64 {
        let zero = (2..5).contains(&p) || (10..50).contains(&p) || p >= 60;
        if zero {
            assert!(is_zero(&pages[p as usize]), "{what}: page {p} not zero");
        } else {
            assert_eq!(pages[p as usize], data(p), "{what}: page {p} lost its data");
        }
    }
    // A zero page written again holds the new data.
    sink.write_pages(&PageRun::new(R, 20, 1), &data(99))
        .unwrap();
    assert_eq!(regions()[20], data(99), "{what}: rewritten page");
}

#[test]
fn zero_runs_clear_pages_that_held_data() {
    for backing in BACKINGS {
        let layout = RegionSet::new([region(backing, 64)])
            .unwrap()
            .layout()
            .clone();
        // Fresh destination regions.
        let dst = DestinationRegions::new(backing);
        dst.prepare(&layout).unwrap();
        let snapshot = || {
            let r = dst.regions().unwrap().get(R).unwrap();
            (0..64).map(|p| page(r, p)).collect()
        };
        check_zero_runs(&dst, snapshot, &format!("{backing:?} fresh"));

        // A sink over memory the program filled before `prepare`: its
        // pages hold data although nothing was placed yet.
        let own = RegionSet::new([region(backing, 64)]).unwrap();
        for p in 0..64 {
            fill(own.get(R).unwrap(), p, 7);
        }
        own.prepare(&layout).unwrap();
        own.zero_pages(&PageRun::new(R, 0, 64)).unwrap();
        for p in 0..64 {
            assert!(
                is_zero(&page(own.get(R).unwrap(), p)),
                "{backing:?}: the program's page {p} survived a zero run"
            );
        }
        let snapshot = || {
            let r = own.get(R).unwrap();
            (0..64).map(|p| page(r, p)).collect()
        };
        check_zero_runs(&own, snapshot, &format!("{backing:?} program's"));
    }
}

/// Pre-copy for `rounds` rounds, then freeze.
struct Rounds(u32);

impl Policy for Rounds {
    fn decide(&mut self, stats: &RoundStats, _: bool) -> Decision {
        if stats.round + 1 >= self.0 {
            Decision::Freeze
        } else {
            Decision::Continue
        }
    }
    fn estimate(&self) -> Estimate {
        Estimate::default()
    }
}

/// Pages that change between rounds: data → zero, zero → data, data →
/// other data → zero, and a page zeroed just before the freeze. The
/// destination's memory must equal the source's, byte for byte (the
/// digests only cover what was sent).
#[test]
fn a_page_zeroed_between_rounds_arrives_as_zero() {
    for backing in [Backing::Private, Backing::Memfd] {
        const PAGES: u64 = 256;
        let src = RegionSet::new([region(backing, PAGES)]).unwrap();
        let r = src.get(R).unwrap();
        // Data on every third page and on 90..120; the others never touched.
        for p in (0..PAGES).step_by(3).chain(90..120) {
            fill(r, p, 11);
        }
        let Some(mut tracker) = tracker(&src) else {
            return;
        };
        let zero_page = |p: u64| r.zero_at(p as usize * ps(), ps()).unwrap();
        let observer = |e: &Event| {
            let Event::Round(stats) = e else { return };
            match stats.round {
                0 => {
                    zero_page(0);
                    zero_page(30);
                    for p in 90..120 {
                        // Data → zero over a long run (given back at the sink).
                        zero_page(p);
                    }
                    fill(r, 1, 12); // zero → data
                    fill(r, 3, 13); // data → other data
                }
                1 => {
                    zero_page(3); // … → zero
                    fill(r, 2, 14);
                }
                _ => zero_page(6), // just before the freeze
            }
        };
        let (a, b) = channel_pair(2);
        let dst = DestinationRegions::new(backing);
        let mut dst_prog = NullProgram::default();
        let (s, d) = std::thread::scope(|sc| {
            let d = sc.spawn(|| Destination::new(&b, &dst, &mut dst_prog).run());
            let s = Source::new(&a, &src, &mut tracker, NullProgram::default())
                .with_policy(Rounds(3))
                .with_observer(observer)
                .with_config(SourceConfig::default().with_batch_pages(32))
                .run();
            (s, d.join().unwrap())
        });
        let s = s.unwrap();
        let d = d.unwrap();
        assert_eq!(s.verification, Verification::Verified, "{backing:?}");
        assert_eq!(d.verification, Verification::Verified, "{backing:?}");
        assert_eq!(s.rounds, 3, "{backing:?}");
        let got = dst.regions().unwrap().get(R).unwrap();
        for p in 0..PAGES {
            assert_eq!(page(got, p), page(r, p), "{backing:?}: page {p}");
        }
        for p in [0, 3, 6, 30, 90, 119] {
            assert!(is_zero(&page(got, p)), "{backing:?}: page {p}");
        }
        // Round 0 sent the untouched pages as zero runs without reading
        // them (memfd: SEEK_DATA; private memory under the uffd-wp tracker
        // cannot tell, and tests them in place).
        assert!(s.round_stats[0].zero_pages >= PAGES / 2, "{backing:?}");
    }
}

/// The tracker's clearer (through [`lmig_mem::best_tracker`], as the
/// benchmark and programs get it): writes before a clear of their run are
/// forgotten, writes after it and outside it are reported.
#[test]
fn clearing_a_run_forgets_only_the_writes_before_it() {
    let set = RegionSet::new([region(Backing::Private, 64)]).unwrap();
    if tracker(&set).is_none() {
        return;
    }
    let (mut t, choice) = lmig_mem::best_tracker(&set).unwrap();
    assert_eq!(choice.picked, lmig_mem::TrackerKind::UffdWp);
    t.start().unwrap();
    let r = set.get(R).unwrap();
    for p in [1, 2, 40] {
        fill(r, p, 1);
    }
    let c = t.clearer().expect("the uffd-wp tracker offers a clearer");
    c.clear(&PageRun::new(R, 0, 32)).unwrap();
    fill(r, 2, 2);
    let mut dirty = RegionPages::empty(set.layout());
    t.collect(&mut dirty).unwrap();
    assert_eq!(dirty.get(R).unwrap(), &set_of(64, &[2, 40]));
    assert!(c.clear(&PageRun::new(R, 60, 8)).is_err());
    assert!(c.clear(&PageRun::new(RegionId(99), 0, 1)).is_err());
    t.stop().unwrap();
}
