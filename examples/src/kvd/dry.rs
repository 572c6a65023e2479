//! A dry pre-copy, an experiment (never a default): what kvd's clients feel
//! from the source's own memory work alone, with nothing sent. With
//! [`DRY_ENV`] set, `migrate` does not connect: it starts the dirty tracker
//! on kvd's region (the real one: userfaultfd write-protect + `PAGEMAP_SCAN`),
//! runs rounds as a pre-copy would (round 0 over every page, then the pages
//! dirtied since), each page read the way round 0 reads it (marked clean
//! right before, then copied into a buffer) at a paced rate, and fails with
//! "dry run" once done; kvd serves on. There is no encryption, no socket and
//! no destination: the CPU and memory bandwidth those take are left out.
//!
//! The rounds run on the calling thread in `SCHED_IDLE` for at most 2 s
//! (as the real senders do while rounds shrink). The tracker is removed after the
//! answer: its teardown (tens of ms per GiB) happens after `Commit` in a
//! real migration, when the source no longer serves.

use std::time::{Duration, Instant};

use lmig_core::model::{PageRun, RegionPages};
use lmig_core::protocol::CHUNK_PAGES;
use lmig_core::{DirtyTracker, MemorySource};
use lmig_mem::{RegionSet, best_tracker};

/// Environment variable: a dry pre-copy reading at this many MB/s (`0`:
/// the tracker and its collects only, nothing read); unset: a real
/// migration.
pub const DRY_ENV: &str = "LMIG_KVD_DRY_PRECOPY";

/// The dry run's length: about a real pre-copy's on this machine (round 0
/// of 1 GiB and its later rounds).
const DRY_LENGTH: Duration = Duration::from_millis(2000);

/// The longest the rounds stay in the lowest class (as
/// `SourceConfig::idle_round_limit`'s default): a busy host never starves them.
const IDLE_LIMIT: Duration = Duration::from_secs(2);

/// The pause between two later rounds (a real later round sends and waits
/// for its pages to be placed).
const ROUND_GAP: Duration = Duration::from_millis(50);

/// What the dry run did, for its "dry run" answer.
#[derive(Debug, Default)]
struct DryFigures {
    rounds: u32,
    pages_read: u64,
}

/// [`DRY_ENV`]'s rate, MB/s, when set.
pub fn dry_rate() -> Option<f64> {
    std::env::var(DRY_ENV).ok()?.parse().ok()
}

/// Run a dry pre-copy over `regions` reading at `mbps` (0: nothing read);
/// always an error: "dry run" and what it did, or what failed.
pub fn dry_precopy(regions: &RegionSet, mbps: f64) -> String {
    let (mut tracker, _) = match best_tracker(regions) {
        Ok(t) => t,
        Err(e) => return format!("dry run: no tracker: {e}"),
    };
    let t = Instant::now();
    let done = rounds(regions, &mut tracker, mbps);
    let took = t.elapsed();
    // The teardown after the answer (see the module docs).
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        if let Err(e) = tracker.stop() {
            eprintln!("kvd: dry run: stopping the dirty tracker: {e}");
        }
    });
    match done {
        Ok(f) => format!(
            "dry run: {} rounds, {} pages read in {:.0} ms at {mbps} MB/s",
            f.rounds,
            f.pages_read,
            took.as_secs_f64() * 1e3
        ),
        Err(e) => format!("dry run failed: {e}"),
    }
}

/// Round 0 over every page, then later rounds over what was dirtied, for
/// [`DRY_LENGTH`] at least (round 0 may take longer).
fn rounds(
    regions: &RegionSet,
    tracker: &mut impl DirtyTracker,
    mbps: f64,
) -> lmig_core::Result<DryFigures> {
    let layout = regions.layout();
    let clearer = tracker.clearer();
    tracker.start()?;
    let start = Instant::now();
    let mut figures = DryFigures::default();
    let mut pages = RegionPages::full(layout);
    let mut buf = vec![0u8; CHUNK_PAGES as usize * 4096];
    // In the lowest class for at most IDLE_LIMIT, as the real senders.
    let mut lowered = lmig_mem::cpu::idle_thread(true);
    // Bounded: DRY_LENGTH, and at most 1000 rounds.
    while figures.rounds < 1000 {
        for run in pages.chunked_runs(CHUNK_PAGES) {
            if lowered && start.elapsed() >= IDLE_LIMIT {
                lowered = !lmig_mem::cpu::idle_thread(false);
            }
            if figures.rounds == 0 {
                if let Some(c) = &clearer {
                    c.clear(&run)?;
                }
            }
            if mbps > 0.0 {
                read_paced(regions, &run, &mut buf, mbps, start, &mut figures)?;
            }
        }
        figures.rounds += 1;
        if start.elapsed() >= DRY_LENGTH {
            break;
        }
        if figures.rounds == 1 && mbps <= 0.0 {
            // Nothing read: round 0 lasts as long as reading 1 GiB at 700 MB/s.
            std::thread::sleep(Duration::from_millis(1500));
        }
        std::thread::sleep(ROUND_GAP);
        pages.clear();
        tracker.collect(&mut pages)?;
    }
    if lowered {
        lmig_mem::cpu::idle_thread(false);
    }
    Ok(figures)
}

/// Read `run` into `buf`, then wait until the pages read so far have taken
/// their time at `mbps`.
fn read_paced(
    regions: &RegionSet,
    run: &PageRun,
    buf: &mut [u8],
    mbps: f64,
    start: Instant,
    figures: &mut DryFigures,
) -> lmig_core::Result<()> {
    let len = run.count as usize * 4096;
    regions.read_pages(run, &mut buf[..len])?;
    figures.pages_read += u64::from(run.count);
    let due = Duration::from_secs_f64(figures.pages_read as f64 * 4096.0 / (mbps * 1e6));
    if let Some(wait) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
    Ok(())
}
