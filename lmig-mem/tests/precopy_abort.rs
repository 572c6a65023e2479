//! A pre-copy cut in the middle of a round, with the real tracker
//! (userfaultfd write-protect + `PAGEMAP_SCAN`) on real regions while a
//! writer runs: the source sees the failure, its memory holds exactly what
//! the writer wrote, the tracker is stopped, and a second migration of the
//! same regions with the same tracker then completes and verifies.
//!
//! Needs userfaultfd: fails loudly without it; `LMIG_SKIP_PRIVILEGED=1`
//! turns that into a visible skip when not run as root.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lmig_core::model::RegionId;
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, Source, SourceConfig};
use lmig_core::testing::{Cut, CutChannel, NullProgram, channel_pair};
use lmig_core::traits::Event;
use lmig_core::{Channel, DirtyTracker, StateSource};
use lmig_mem::{Backing, DestinationRegions, RegionOptions, RegionSet, UffdWpTracker};

const A: RegionId = RegionId(1);
const B: RegionId = RegionId(2);
const PAGES: u64 = 512;

fn ps() -> usize {
    lmig_mem::page_size()
}

/// Word 0 of every page holds its own tag; the writer counts in word 1.
fn regions() -> RegionSet {
    let set = RegionSet::new([A, B].map(|id| {
        RegionOptions::new(id, PAGES * ps() as u64)
            .backing(Backing::Private)
            .map()
            .unwrap()
    }))
    .unwrap();
    for id in [A, B] {
        let r = set.get(id).unwrap();
        for p in 0..PAGES {
            let tag = u64::from(id.0) << 32 | p;
            r.write_at(p as usize * ps(), &tag.to_ne_bytes()).unwrap();
        }
    }
    set
}

fn word(set: &RegionSet, id: RegionId, page: u64, w: usize) -> u64 {
    let mut b = [0u8; 8];
    set.get(id)
        .unwrap()
        .read_at(page as usize * ps() + w * 8, &mut b)
        .unwrap();
    u64::from_ne_bytes(b)
}

/// Writes `page, counter` pairs (bounded: until `stop`, at most 2 s) and
/// returns what word 1 of each page of region A must hold afterwards.
fn writer(set: &RegionSet, stop: &AtomicBool, writes: &AtomicU64, done: &AtomicBool) -> Vec<u64> {
    let r = set.get(A).unwrap();
    let mut last: Vec<u64> = (0..PAGES).map(|p| word(set, A, p, 1)).collect();
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(2) {
        n += 1;
        let page = (n * 7919) % PAGES;
        r.write_at(page as usize * ps() + 8, &n.to_ne_bytes())
            .unwrap();
        last[page as usize] = n;
        writes.store(n, Ordering::Relaxed);
        if n.is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    done.store(true, Ordering::SeqCst);
    last
}

/// The program: pausing it stops the writer (and waits until it stopped).
struct Writer<'a> {
    stop: &'a AtomicBool,
    done: &'a AtomicBool,
}

impl StateSource for Writer<'_> {
    fn pause(&mut self) -> lmig_core::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while !self.done.load(Ordering::SeqCst) {
            if t.elapsed() > Duration::from_secs(5) {
                return Err(lmig_core::MigrationError::backend("writer", "did not stop"));
            }
            std::thread::yield_now();
        }
        Ok(())
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        // The writer thread has ended; the test checks what it wrote.
        Ok(())
    }
}

fn config() -> SourceConfig {
    SourceConfig::default()
        .with_ready_timeout(Duration::from_secs(5))
        .with_done_timeout(Duration::from_secs(5))
        .with_batch_pages(32)
}

/// One migration attempt over `chan` to fresh destination regions.
fn attempt(
    set: &RegionSet,
    tracker: &mut UffdWpTracker,
    program: Writer<'_>,
    src: &dyn Channel,
    dst: &dyn Channel,
) -> (
    lmig_core::Result<lmig_core::session::SourceReport>,
    lmig_core::Result<lmig_core::session::DestinationReport>,
    DestinationRegions,
) {
    let memory = DestinationRegions::new(Backing::Private);
    let mut dst_prog = NullProgram::default();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(dst, &memory, &mut dst_prog).run());
        // Every page of B written once while round 0 runs (after it, as
        // the round ends): round 1 then has at least B's 16 batches, so a
        // cut in a later round is reached however the writer thread was
        // scheduled (word 2: what the writer and the checks leave alone).
        let dirty_b_after_round_0 = move |e: &Event| {
            if let Event::Round(r) = e {
                if r.round == 0 {
                    let b = set.get(B).unwrap();
                    for p in 0..PAGES {
                        b.write_at(p as usize * ps() + 16, &p.to_ne_bytes())
                            .unwrap();
                    }
                }
            }
        };
        let s = Source::new(src, set, &mut *tracker, program)
            .with_config(config())
            .with_observer(dirty_b_after_round_0)
            .run();
        if s.is_err() {
            src.shutdown();
        }
        (s, d.join().unwrap())
    });
    (s, d, memory)
}

#[test]
fn cut_mid_round_leaves_the_source_whole_and_a_retry_works() {
    let set = regions();
    let mut tracker = match UffdWpTracker::new(&set) {
        Ok(t) => t,
        Err(e) => {
            if !lmig_core::testing::privileged("precopy_abort", &e.to_string()) {
                return;
            }
            panic!("userfaultfd write-protect unavailable: {e}");
        }
    };
    // Cuts inside the first round (its third batch), at the end of it, and
    // inside round 1 (batch 40 of at least 48: the observer in `attempt`
    // dirties every page of B after round 0).
    for cut in [
        Cut::Send("Pages", 3),
        Cut::Send("RoundEnd", 1),
        Cut::Send("Pages", 40),
    ] {
        let (stop, done) = (AtomicBool::new(false), AtomicBool::new(false));
        let writes = AtomicU64::new(0);
        let (a, b) = channel_pair(2);
        let a = CutChannel::new(a, cut);
        let (result, last) = std::thread::scope(|sc| {
            let w = sc.spawn(|| writer(&set, &stop, &writes, &done));
            // Let the writer start, so the rounds see dirty pages.
            let t = Instant::now();
            while writes.load(Ordering::Relaxed) == 0 && t.elapsed() < Duration::from_secs(2) {
                std::thread::yield_now();
            }
            let program = Writer {
                stop: &stop,
                done: &done,
            };
            let (s, d, memory) = attempt(&set, &mut tracker, program, &a, &b);
            stop.store(true, Ordering::Relaxed);
            assert!(d.is_err(), "{cut:?}: the destination must fail too");
            // What arrived is discarded: the mappings stay, empty.
            if let Some(got) = memory.regions() {
                for id in [A, B] {
                    for p in 0..PAGES {
                        assert_eq!(word(got, id, p, 0), 0, "{cut:?}: page {p} kept");
                    }
                }
            }
            (s, w.join().unwrap())
        });
        assert!(a.was_cut(), "{cut:?}: the cut happened");
        let err = result.expect_err("the source must see the cut");
        assert!(err.source_may_run(), "{cut:?}: {err}");
        // Memory: every tag intact, every page of A holds the writer's last value.
        for id in [A, B] {
            for p in 0..PAGES {
                assert_eq!(word(&set, id, p, 0), u64::from(id.0) << 32 | p);
            }
        }
        for p in 0..PAGES {
            assert_eq!(word(&set, A, p, 1), last[p as usize], "{cut:?}: page {p}");
        }
        // The tracker was stopped: starting it again works and reports
        // nothing until the next write.
        tracker.start().unwrap();
        let mut dirty = lmig_core::model::RegionPages::empty(set.layout());
        tracker.collect(&mut dirty).unwrap();
        assert!(
            dirty.is_empty(),
            "{cut:?}: stale dirty pages after the abort"
        );
        tracker.stop().unwrap();
    }
    // A second attempt with the same regions and tracker, writer running.
    let (stop, done) = (AtomicBool::new(false), AtomicBool::new(false));
    let writes = AtomicU64::new(0);
    let (a, b) = channel_pair(2);
    std::thread::scope(|sc| {
        let w = sc.spawn(|| writer(&set, &stop, &writes, &done));
        let program = Writer {
            stop: &stop,
            done: &done,
        };
        let (s, d, memory) = attempt(&set, &mut tracker, program, &a, &b);
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        let s = s.expect("the retry completes");
        let d = d.expect("the destination resumes");
        assert_eq!(s.verification, Verification::Verified);
        assert_eq!(d.verification, Verification::Verified);
        let got = memory.regions().expect("regions mapped");
        for id in [A, B] {
            for p in 0..PAGES {
                assert_eq!(word(got, id, p, 0), u64::from(id.0) << 32 | p);
            }
        }
    });
}
