//! The tracker's re-protection raced by a writer, as a pre-copy runs it:
//! round 0 clears each run ([`DirtyTracker::clearer`]) and tests it for
//! zero pages in place, then clears each data run again right before
//! reading it (lmig-core's round 0), and the same with the first clear
//! left out (one clear per data run, tried in s13-pre); later
//! rounds collect in [`lmig_mem::PROTECT_CHUNK`] pieces and read what was
//! reported; the last collect is made with the writer stopped. A writer
//! thread writes all along, half of its writes right around the run being
//! cleared. Checked: the copy read this way equals the memory at the end,
//! page by page, so no write that raced a clear or a chunked collect was
//! lost — on private, shared and memfd memory.
//!
//! Needs userfaultfd write-protect and `PAGEMAP_SCAN` (Linux 6.7+): fails
//! loudly without; `LMIG_SKIP_PRIVILEGED=1` makes that a visible skip.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lmig_core::DirtyTracker;
use lmig_core::model::{PageRun, RegionId, RegionPages};
use lmig_mem::track::PROTECT_CHUNK;
use lmig_mem::{Backing, RegionOptions, RegionSet, UffdWpTracker};

const R: RegionId = RegionId(3);
/// Pages of the region: three [`PROTECT_CHUNK`]s and a bit, so chunked
/// collects cross chunk edges.
const PAGES: u64 = 3 * (PROTECT_CHUNK / 4096) + 100;
/// Pages per run, as a pre-copy chunk.
const RUN: u64 = 64;
const LATER_ROUNDS: usize = 4;

/// What the writer did, for the report and the check that the race ran.
#[derive(Default)]
struct Writes {
    total: AtomicU64,
    /// Writes begun while round 0 ran.
    in_round_0: AtomicU64,
}

/// Writes sequence numbers until `quit` (bounded by a count too): odd
/// writes within two runs of `cursor` (where round 0 clears and reads),
/// even ones spread over the region; bursts, then a short pause.
fn writer(
    set: &RegionSet,
    cursor: &AtomicU64,
    round_0: &AtomicBool,
    quit: &AtomicBool,
    w: &Writes,
) {
    let r = set.get(R).unwrap();
    let mut seq = 1u64;
    // Bounded: `quit`, and at most this many writes.
    while !quit.load(Ordering::Acquire) && seq < 20_000_000 {
        let page = if seq % 2 == 1 {
            (cursor.load(Ordering::Relaxed) + seq * 7 % (2 * RUN)) % PAGES
        } else {
            seq.wrapping_mul(2_654_435_761) % PAGES
        };
        if round_0.load(Ordering::Relaxed) {
            w.in_round_0.fetch_add(1, Ordering::Relaxed);
        }
        let offset = page as usize * 4096 + (seq as usize % 512) * 8;
        r.write_at(offset, &seq.to_ne_bytes()).unwrap();
        w.total.fetch_add(1, Ordering::Relaxed);
        seq += 1;
        if seq.is_multiple_of(256) {
            std::thread::sleep(Duration::from_micros(20 + seq % 100));
        }
    }
}

/// Wait until the writer made `more` writes (at most 5 s).
fn wait_for_writes(writes: &Writes, more: u64) {
    let (started, from) = (Instant::now(), writes.total.load(Ordering::Relaxed));
    // Bounded by the time.
    while writes.total.load(Ordering::Relaxed) < from + more
        && started.elapsed() < Duration::from_secs(5)
    {
        std::thread::yield_now();
    }
}

/// Read `run` into the copy.
fn read(set: &RegionSet, run: &PageRun, copy: &mut [u8]) {
    let at = run.first as usize * 4096;
    set.get(R)
        .unwrap()
        .read_pages(run, &mut copy[at..at + run.count as usize * 4096])
        .unwrap();
}

/// Round 0 as a pre-copy runs it: a zero test per run (after a clear of
/// the run when `clear_first`), then each data run cleared and read;
/// `cursor` follows it.
fn round_0(
    set: &RegionSet,
    t: &dyn DirtyTracker,
    cursor: &AtomicU64,
    copy: &mut [u8],
    clear_first: bool,
) {
    let clearer = t.clearer().expect("the uffd-wp tracker offers a clearer");
    let mut data = Vec::new();
    let mut page = [0u8; 4096];
    for first in (0..PAGES).step_by(RUN as usize) {
        cursor.store(first, Ordering::Relaxed);
        let count = RUN.min(PAGES - first);
        if clear_first {
            clearer
                .clear(&PageRun::new(R, first, count as u32))
                .unwrap();
        }
        let mut run_start = None;
        for p in first..first + count {
            set.get(R)
                .unwrap()
                .read_pages(&PageRun::new(R, p, 1), &mut page)
                .unwrap();
            let zero = page.iter().all(|&b| b == 0);
            match (zero, run_start) {
                // A zero page is "sent" as zero: the copy holds zeros.
                (true, Some(s)) => {
                    data.push(PageRun::new(R, s, (p - s) as u32));
                    run_start = None;
                }
                (false, None) => run_start = Some(p),
                _ => {}
            }
        }
        if let Some(s) = run_start {
            data.push(PageRun::new(R, s, (first + count - s) as u32));
        }
    }
    for run in &data {
        cursor.store(run.first, Ordering::Relaxed);
        clearer.clear(run).unwrap();
        read(set, run, copy);
    }
}

/// Read every page of `dirty` into the copy.
fn resend(set: &RegionSet, dirty: &RegionPages, copy: &mut [u8]) -> u64 {
    let mut n = 0;
    for run in dirty.chunked_runs(RUN as u32) {
        read(set, &run, copy);
        n += u64::from(run.count);
    }
    n
}

fn race(backing: Backing, clear_first: bool) {
    let name = format!("clear race/{backing:?}/clear before the zero test: {clear_first}");
    let set = RegionSet::new([RegionOptions::new(R, PAGES * 4096)
        .backing(backing)
        .map()
        .unwrap()])
    .unwrap();
    let mut t = match UffdWpTracker::new(&set) {
        Ok(t) => t,
        Err(e) if !lmig_core::testing::privileged(&name, &e.to_string()) => return,
        Err(e) => panic!("{name}: userfaultfd write-protect and PAGEMAP_SCAN unavailable: {e}"),
    };
    let mut copy = vec![0u8; PAGES as usize * 4096];
    let (cursor, round0, quit) = (
        AtomicU64::new(0),
        AtomicBool::new(true),
        AtomicBool::new(false),
    );
    let writes = Writes::default();
    let mut resent = Vec::new();
    t.start().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| writer(&set, &cursor, &round0, &quit, &writes));
        // Let the writer touch pages before round 0, so its zero test
        // finds data.
        wait_for_writes(&writes, 20_000);
        round_0(&set, &t, &cursor, &mut copy, clear_first);
        round0.store(false, Ordering::Relaxed);
        for _ in 0..LATER_ROUNDS {
            // Each round overlaps writes, near and far from the cursor.
            cursor.store(PAGES / 2, Ordering::Relaxed);
            wait_for_writes(&writes, 5_000);
            let mut dirty = RegionPages::empty(set.layout());
            t.collect(&mut dirty).unwrap();
            resent.push(resend(&set, &dirty, &mut copy));
        }
        quit.store(true, Ordering::Release);
    });
    // The freeze: the writer has stopped.
    let mut dirty = RegionPages::empty(set.layout());
    t.collect_paused(&mut dirty).unwrap();
    resent.push(resend(&set, &dirty, &mut copy));
    t.stop().unwrap();

    let mut now = vec![0u8; PAGES as usize * 4096];
    set.get(R)
        .unwrap()
        .read_pages(&PageRun::new(R, 0, PAGES as u32), &mut now)
        .unwrap();
    let wrong: Vec<u64> = (0..PAGES)
        .filter(|&p| {
            let at = p as usize * 4096..(p as usize + 1) * 4096;
            copy[at.clone()] != now[at]
        })
        .collect();
    let (total, in_0) = (
        writes.total.load(Ordering::Relaxed),
        writes.in_round_0.load(Ordering::Relaxed),
    );
    println!(
        "{name}: {total} writes ({in_0} during round 0), pages resent per later round {resent:?}"
    );
    assert!(in_0 > 0, "{name}: no write raced round 0");
    assert!(
        wrong.is_empty(),
        "{name}: {} pages differ from the memory (a write lost), first {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
}

#[test]
fn clears_and_chunked_collects_raced_by_a_writer_lose_nothing_private() {
    race(Backing::Private, true);
    race(Backing::Private, false);
}

#[test]
fn clears_and_chunked_collects_raced_by_a_writer_lose_nothing_shared() {
    race(Backing::SharedAnonymous, true);
    race(Backing::SharedAnonymous, false);
}

#[test]
fn clears_and_chunked_collects_raced_by_a_writer_lose_nothing_memfd() {
    race(Backing::Memfd, true);
    race(Backing::Memfd, false);
}
