//! One conformance test body, run against every dirty-tracker backend this
//! kernel supports: uffd-wp + `PAGEMAP_SCAN` on anonymous private, MAP_SHARED
//! and memfd regions, the manual tracker, the dirty-log adapter, and
//! soft-dirty when the kernel has it (here it must report `Unsupported`),
//! and the kernel trackers again over adopted memory (`Region::adopt`: an
//! anonymous area and a memfd window the test program mapped itself).
//!
//! Checked: nothing reported right after `start`; a first write to an
//! untouched page; a page written before `start`; a repeated write; writes from
//! several threads; a writer racing many collects (every write reported by a
//! collect that overlapped or followed it, up to the first collect that began
//! after it completed); `stop` and a fresh `start`.
//!
//! Tests that need userfaultfd fail loudly when it is missing;
//! `LMIG_SKIP_PRIVILEGED=1` turns that into a visible skip when not run as root.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lmig_core::model::{RegionId, RegionInfo, RegionPages};
use lmig_core::{BoxError, DirtyTracker};
use lmig_mem::{
    Backing, DirtyLogTracker, ManualTracker, MemError, RegionOptions, RegionSet, SoftDirtyTracker,
    TrackerKind, TrackerProbe, UffdWpTracker, best_tracker,
};

mod common;

const A: RegionId = RegionId(1);
const B: RegionId = RegionId(7);
const A_PAGES: u64 = 300;
const B_PAGES: u64 = 65;

/// Called by writers after each write (the manual tracker and the simulated
/// VMM need it; kernel trackers ignore it).
type Marker = Arc<dyn Fn(RegionId, u64) + Send + Sync>;

fn no_marker() -> Marker {
    Arc::new(|_, _| {})
}

fn regions(backing: Backing) -> RegionSet {
    let ps = lmig_mem::page_size() as u64;
    RegionSet::new([
        RegionOptions::new(A, A_PAGES * ps)
            .backing(backing)
            .map()
            .unwrap(),
        RegionOptions::new(B, B_PAGES * ps)
            .backing(backing)
            .map()
            .unwrap(),
    ])
    .unwrap()
}

/// Memory the test program mapped: A an anonymous private area, B the
/// middle of a memfd three times its size (declare it before the set).
struct Adopted {
    file: std::os::fd::OwnedFd,
    a: common::Area,
    b: common::Area,
}

impl Adopted {
    fn new() -> Self {
        let ps = lmig_mem::page_size();
        let file = common::memfd("conformance", 3 * B_PAGES as usize * ps, 0);
        let b = common::Area::file(
            std::os::fd::AsFd::as_fd(&file),
            B_PAGES * ps as u64,
            B_PAGES as usize * ps,
        );
        let a = common::Area::anonymous(A_PAGES as usize * ps, false);
        Self { file, a, b }
    }

    fn regions(&self) -> RegionSet {
        let offset = B_PAGES * lmig_mem::page_size() as u64;
        RegionSet::new([
            common::adopt(A, &self.a, lmig_mem::ForeignBacking::AnonymousPrivate).unwrap(),
            common::adopt(B, &self.b, common::shared_file(&self.file, offset)).unwrap(),
        ])
        .unwrap()
    }
}

fn write(set: &RegionSet, mark: &Marker, region: RegionId, page: u64, value: u64) {
    let r = set.get(region).unwrap();
    let offset = page as usize * r.page_size() + (value as usize % 64) * 8;
    r.write_at(offset, &value.to_ne_bytes()).unwrap();
    mark(region, page);
}

type Pages = BTreeSet<(u32, u64)>;

fn pages(d: &RegionPages) -> Pages {
    d.sets()
        .flat_map(|(id, s)| s.iter().map(move |p| (id.0, p)))
        .collect()
}

fn collect(t: &mut dyn DirtyTracker, set: &RegionSet) -> Pages {
    let mut d = RegionPages::empty(set.layout());
    t.collect(&mut d).unwrap();
    pages(&d)
}

/// The same through [`DirtyTracker::collect_paused`] (the freeze's final
/// collect, with the writers paused).
fn collect_paused(t: &mut dyn DirtyTracker, set: &RegionSet) -> Pages {
    let mut d = RegionPages::empty(set.layout());
    t.collect_paused(&mut d).unwrap();
    pages(&d)
}

/// The tracker, or a loud failure; without root and with
/// `LMIG_SKIP_PRIVILEGED=1`, a visible skip (the shared rule:
/// `lmig_core::testing::privileged`). As root a failure is a failure.
fn privileged<T>(what: &str, r: Result<T, MemError>) -> Option<T> {
    match r {
        Ok(t) => Some(t),
        Err(e) if !lmig_core::testing::privileged(what, &e.to_string()) => None,
        Err(e) => panic!(
            "{what} needs userfaultfd with UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (Linux >= 6.7; \
             CAP_SYS_PTRACE, /dev/userfaultfd or UFFD_USER_MODE_ONLY): {e}"
        ),
    }
}

/// The one test body.
fn conformance(
    name: &str,
    set: &RegionSet,
    t: &mut dyn DirtyTracker,
    mark: Marker,
    exact_under_race: bool,
) {
    // Some pages populated before tracking starts: they must count as clean.
    for p in 0..10 {
        write(set, &mark, A, p, 1);
    }
    t.start().unwrap();
    assert_eq!(
        collect(t, set),
        Pages::new(),
        "{name}: nothing written since start"
    );

    // First writes: untouched pages, a populated page, word edges, last pages.
    let first: Pages = [
        (A.0, 3),
        (A.0, 63),
        (A.0, 64),
        (A.0, 100),
        (A.0, A_PAGES - 1),
        (B.0, 0),
        (B.0, 64),
    ]
    .into();
    for &(r, p) in &first {
        write(set, &mark, RegionId(r), p, 2);
    }
    assert_eq!(collect(t, set), first, "{name}: first writes");

    // Repeated writes to one page, and a page written again after a collect.
    for v in 0..5 {
        write(set, &mark, A, 3, 10 + v);
    }
    write(set, &mark, B, 64, 3);
    assert_eq!(
        collect_paused(t, set),
        [(A.0, 3), (B.0, 64)].into(),
        "{name}: repeated writes, collected as if paused"
    );
    assert_eq!(
        collect(t, set),
        Pages::new(),
        "{name}: nothing since the last collect"
    );

    // Several threads writing disjoint pages.
    let threads = 4u64;
    let mut expected = Pages::new();
    std::thread::scope(|s| {
        for th in 0..threads {
            let mark = mark.clone();
            s.spawn(move || {
                for p in (th..A_PAGES)
                    .step_by(threads as usize)
                    .filter(|p| p % 3 == 0)
                {
                    write(set, &mark, A, p, th);
                }
                for p in (th..B_PAGES).step_by(threads as usize) {
                    write(set, &mark, B, p, th);
                }
            });
        }
    });
    for th in 0..threads {
        expected.extend(
            (th..A_PAGES)
                .step_by(threads as usize)
                .filter(|p| p % 3 == 0)
                .map(|p| (A.0, p)),
        );
        expected.extend((th..B_PAGES).step_by(threads as usize).map(|p| (B.0, p)));
    }
    assert_eq!(
        collect(t, set),
        expected,
        "{name}: writes from {threads} threads"
    );

    if exact_under_race {
        racing_writer(name, set, t, &mark);
    } else {
        println!(
            "{name}: racing-writer case not run: this tracker needs the writers paused during collect"
        );
    }

    // Stop (an aborted migration), write, start again: a fresh, clean start.
    t.stop().unwrap();
    write(set, &mark, A, 42, 9);
    t.start().unwrap();
    assert_eq!(collect(t, set), Pages::new(), "{name}: clean after restart");
    write(set, &mark, A, 43, 9);
    assert_eq!(
        collect(t, set),
        [(A.0, 43)].into(),
        "{name}: tracking after restart"
    );
    t.stop().unwrap();
}

/// The page written by sequence number `seq` (37 is coprime with 365, so
/// every page comes up in turn).
fn seq_page(seq: u64) -> (RegionId, u64) {
    let g = seq * 37 % (A_PAGES + B_PAGES);
    if g < A_PAGES {
        (A, g)
    } else {
        (B, g - A_PAGES)
    }
}

/// A writer thread writes sequence-numbered pages continuously (bursts and
/// pauses) while the test collects, for a bounded number of cycles and time.
/// Every write `s` must be reported by some collect between the last one
/// that began before `s` began and the first one that began after `s` ended.
fn racing_writer(name: &str, set: &RegionSet, t: &mut dyn DirtyTracker, mark: &Marker) {
    const MAX_CYCLES: usize = 1500;
    const MAX_WRITES: u64 = 2_000_000;
    let budget = Duration::from_secs(3);
    let begun = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let quit = AtomicBool::new(false);
    // Per collect j: (writes begun before it started, writes done before it started, pages).
    let mut cycles: Vec<(u64, u64, Pages)> = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut seq = 0u64;
            while !quit.load(Ordering::Acquire) && seq < MAX_WRITES {
                begun.store(seq + 1, Ordering::SeqCst);
                let (r, p) = seq_page(seq);
                write(set, mark, r, p, seq);
                done.store(seq + 1, Ordering::SeqCst);
                seq += 1;
                // Bursts of 64 writes, then a short pause: some collects see
                // a few pages, some overlap a burst.
                if seq.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(50 + seq % 300));
                } else if seq.is_multiple_of(8) {
                    std::thread::yield_now();
                }
            }
        });
        let started = Instant::now();
        for k in 0..MAX_CYCLES {
            if started.elapsed() > budget {
                break;
            }
            let a = begun.load(Ordering::SeqCst);
            let b = done.load(Ordering::SeqCst);
            let d = collect(t, set);
            cycles.push((a, b, d));
            if k % 3 == 0 {
                std::thread::sleep(Duration::from_micros(20 + (k as u64 * 7) % 200));
            }
        }
        quit.store(true, Ordering::Release);
    });
    let total = done.load(Ordering::SeqCst);
    let final_pages = collect(t, set);
    cycles.push((total, total, final_pages));

    let mut missed = Vec::new();
    let mut lo = 0usize;
    let mut hi = 0usize;
    for seq in 0..total {
        while lo + 1 < cycles.len() && cycles[lo + 1].0 <= seq {
            lo += 1;
        }
        while hi < cycles.len() - 1 && cycles[hi].1 <= seq {
            hi += 1;
        }
        let (r, p) = seq_page(seq);
        if !cycles[lo..=hi.max(lo)]
            .iter()
            .any(|c| c.2.contains(&(r.0, p)))
        {
            missed.push((seq, r, p, lo, hi));
        }
    }
    let nonempty = cycles.iter().filter(|c| !c.2.is_empty()).count();
    println!(
        "{name}: racing writer: {total} writes over {} collects ({nonempty} non-empty), {} missed",
        cycles.len(),
        missed.len()
    );
    assert!(
        total > 0 && cycles.len() > 10,
        "{name}: the race did not run"
    );
    assert!(
        missed.is_empty(),
        "{name}: {} writes missed, first: {:?}",
        missed.len(),
        &missed[..missed.len().min(10)]
    );
}

fn run_uffd(backing: Backing) {
    let name = format!("uffd-wp+pagemap-scan/{backing:?}");
    let set = regions(backing);
    let Some(mut t) = privileged(&name, UffdWpTracker::new(&set)) else {
        return;
    };
    println!("{name}: userfaultfd via {:?}", t.support().origin);
    conformance(&name, &set, &mut t, no_marker(), true);
}

#[test]
fn uffd_wp_private_anonymous() {
    run_uffd(Backing::Private);
}

#[test]
fn uffd_wp_shared_anonymous() {
    run_uffd(Backing::SharedAnonymous);
}

#[test]
fn uffd_wp_memfd() {
    run_uffd(Backing::Memfd);
}

#[test]
fn uffd_wp_adopted_memory() {
    let name = "uffd-wp+pagemap-scan/adopted";
    let memory = Adopted::new();
    let set = memory.regions();
    let Some(mut t) = privileged(name, UffdWpTracker::new(&set)) else {
        return;
    };
    conformance(name, &set, &mut t, no_marker(), true);
    drop(t);
    drop(set);
    assert!(memory.a.is_mapped() && memory.b.is_mapped());
}

#[test]
fn soft_dirty_adopted_memory_is_unsupported_here_or_conforms() {
    let memory = Adopted::new();
    let set = memory.regions();
    match SoftDirtyTracker::new(&set) {
        Err(MemError::Unsupported { feature, needs }) => {
            assert_eq!(feature, "soft-dirty");
            assert!(needs.contains("CONFIG_MEM_SOFT_DIRTY"), "{needs}");
        }
        Err(e) => panic!("soft-dirty probe failed with something other than Unsupported: {e}"),
        Ok(mut t) => {
            conformance("soft-dirty/adopted", &set, &mut t, no_marker(), false);
        }
    }
}

#[test]
fn manual_tracker() {
    let set = regions(Backing::Private);
    let mut t = ManualTracker::new(set.layout());
    let marker = t.marker();
    let mark: Marker = Arc::new(move |r, p| marker.mark(r, p).unwrap());
    conformance("manual", &set, &mut t, mark, true);
    // Marks outside a region are errors, not silently dropped.
    assert!(t.mark(A, A_PAGES).is_err());
    assert!(t.mark_range(B, 60, 6).is_err());
    assert!(t.mark(RegionId(99), 0).is_err());
}

/// A VMM's own dirty bitmap (one atomic word per 64 pages per region),
/// handed over through the dirty-log adapter with fetch-and-reset semantics.
#[test]
fn dirty_log_adapter() {
    let set = regions(Backing::Private);
    let bitmaps: Arc<Vec<(RegionId, Vec<AtomicU64>)>> = Arc::new(
        set.layout()
            .regions()
            .iter()
            .map(|r| {
                (
                    r.id,
                    (0..r.pages().div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect(),
                )
            })
            .collect(),
    );
    let vmm = Arc::clone(&bitmaps);
    let mark: Marker = Arc::new(move |r, p| {
        let (_, words) = vmm.iter().find(|(id, _)| *id == r).unwrap();
        words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
    });
    let log_maps = Arc::clone(&bitmaps);
    let log = move |region: &RegionInfo, out: &mut [u64]| -> Result<(), BoxError> {
        let (_, words) = log_maps
            .iter()
            .find(|(id, _)| *id == region.id)
            .ok_or("unknown region")?;
        for (o, w) in out.iter_mut().zip(words) {
            *o = w.swap(0, Ordering::Acquire);
        }
        Ok(())
    };
    let mut t = DirtyLogTracker::new(set.layout(), log);
    conformance("dirty-log", &set, &mut t, mark, true);
}

#[test]
fn soft_dirty_is_unsupported_here_or_conforms() {
    let set = regions(Backing::Private);
    match SoftDirtyTracker::new(&set) {
        Err(e @ MemError::Unsupported { feature, needs }) => {
            println!("soft-dirty: {e}");
            assert_eq!(feature, "soft-dirty");
            assert!(needs.contains("CONFIG_MEM_SOFT_DIRTY"), "{needs}");
        }
        Err(e) => panic!("soft-dirty probe failed with something other than Unsupported: {e}"),
        Ok(mut t) => {
            println!("soft-dirty is supported by this kernel: running the conformance body");
            conformance("soft-dirty", &set, &mut t, no_marker(), false);
        }
    }
}

#[test]
fn probe_prefers_uffd_wp_and_explains() {
    let probe = TrackerProbe::run();
    println!("{probe}");
    let text = probe.to_string();
    assert!(
        text.contains("uffd-wp+pagemap-scan") && text.contains("soft-dirty"),
        "{text}"
    );
    let set = regions(Backing::Memfd);
    let Some((t, choice)) = privileged("best_tracker", best_tracker(&set)) else {
        return;
    };
    println!("{choice}");
    assert_eq!(probe.best(), Some(TrackerKind::UffdWp), "{probe}");
    assert_eq!(choice.picked, TrackerKind::UffdWp);
    assert_eq!(t.kind(), TrackerKind::UffdWp);
    assert!(choice.rejected.is_empty());
}

/// The paused collect (one `PAGEMAP_SCAN` per region) over a region of
/// several write-protect chunks: exactly the written pages, on both sides
/// of chunk edges, and re-protected (a chunked collect right after finds
/// nothing; a page written again is found by either collect).
#[test]
fn uffd_wp_paused_collect_spans_chunks() {
    let chunk_pages = lmig_mem::track::PROTECT_CHUNK / lmig_mem::page_size() as u64;
    let pages_a = 3 * chunk_pages + 5;
    let ps = lmig_mem::page_size() as u64;
    let set = RegionSet::new([RegionOptions::new(A, pages_a * ps).map().unwrap()]).unwrap();
    let Some(mut t) = privileged("uffd-wp paused collect", UffdWpTracker::new(&set)) else {
        return;
    };
    let mark = no_marker();
    t.start().unwrap();
    let written: Pages = [
        0,
        chunk_pages - 1,
        chunk_pages,
        2 * chunk_pages + 7,
        3 * chunk_pages,
        pages_a - 1,
    ]
    .into_iter()
    .map(|p| (A.0, p))
    .collect();
    for &(_, p) in &written {
        write(&set, &mark, A, p, 5);
    }
    assert_eq!(collect_paused(&mut t, &set), written, "paused collect");
    assert_eq!(collect(&mut t, &set), Pages::new(), "re-protected");
    write(&set, &mark, A, chunk_pages, 6);
    assert_eq!(
        collect_paused(&mut t, &set),
        [(A.0, chunk_pages)].into(),
        "written again after a paused collect"
    );
    write(&set, &mark, A, 2 * chunk_pages + 7, 7);
    assert_eq!(
        collect(&mut t, &set),
        [(A.0, 2 * chunk_pages + 7)].into(),
        "a chunked collect after a paused one"
    );
    t.stop().unwrap();
}

#[test]
fn collect_before_start_is_an_error() {
    let set = regions(Backing::Private);
    let Some(mut t) = privileged("uffd-wp", UffdWpTracker::new(&set)) else {
        return;
    };
    let mut d = RegionPages::empty(set.layout());
    let err = t.collect(&mut d).unwrap_err().to_string();
    assert!(err.contains("before start"), "{err}");
}

#[test]
fn measurement_aids_find_the_written_pages() {
    let set = RegionSet::new([RegionOptions::new(A, 16 << 20).map().unwrap()]).unwrap();
    let Some(mut t) = privileged("uffd-wp", UffdWpTracker::new(&set)) else {
        return;
    };
    t.start().unwrap();
    let f = lmig_mem::track::measure_scan_cost(&mut t, &set, A, 0.01, 3).unwrap();
    assert!(f.pages_written > 30, "{f:?}");
    assert!(f.collect_ms >= 0.0 && f.raw_scan_ms >= 0.0);
    let r = set.get(A).unwrap();
    r.write_at(0, &[1]).unwrap();
    r.write_at(5 * r.page_size(), &[1]).unwrap();
    assert_eq!(lmig_mem::track::raw_pagemap_scan(r).unwrap(), 2);
    assert_eq!(t.raw_scan(A).unwrap(), 0, "the raw scan re-protects too");
    t.stop().unwrap();
    // Once stopped, the bare scan refuses (no async write-protect any more).
    assert!(lmig_mem::track::raw_pagemap_scan(r).is_err());
}

#[test]
fn backends_are_send_and_sinks_sync() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RegionSet>();
    send_sync::<lmig_mem::DestinationRegions>();
    send_sync::<lmig_mem::DirtyMarker>();
    send::<UffdWpTracker>();
    send::<SoftDirtyTracker>();
    send::<ManualTracker>();
    send::<lmig_mem::AutoTracker>();
}

/// A range can be registered with one userfaultfd only: a second tracker
/// fails with a clear error and leaves the first one tracking.
#[test]
fn second_tracker_on_the_same_regions_fails_cleanly() {
    let set = regions(Backing::Private);
    let Some(mut first) = privileged("uffd-wp", UffdWpTracker::new(&set)) else {
        return;
    };
    let mut second = UffdWpTracker::new(&set).unwrap();
    first.start().unwrap();
    let err = second.start().unwrap_err().to_string();
    assert!(err.contains("already registered"), "{err}");
    drop(second);
    write(&set, &no_marker(), B, 1, 1);
    assert_eq!(collect(&mut first, &set), [(B.0, 1)].into());
    first.stop().unwrap();
}
