//! The source's control handle while it runs: the bandwidth limit really
//! holds the pages back and can be changed (or lifted) mid-round, the
//! progress snapshot only moves forward and ends where the report ends,
//! and a cancel in the middle of round 0 leaves the source as it was.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lmig_core::model::{PageRun, RegionId, RegionLayout, RegionPages};
use lmig_core::session::{
    CancelOutcome, Destination, Progress, Source, SourceConfig, SourceControl, SourceReport,
    is_zero,
};
use lmig_core::testing::{MarkTracker, NullProgram, VecMemory, channel_pair, one_region};
use lmig_core::traits::{DirtyClearer, Phase};
use lmig_core::{DirtyTracker, MemorySource, MigrationError};

/// 4 MiB of 4 KiB pages, every page holding data (zero pages cost no bandwidth).
const PAGES: u64 = 1024;
const MIB: u64 = 1 << 20;

fn layout() -> RegionLayout {
    one_region(RegionId(1), PAGES)
}

fn full_memory(layout: &RegionLayout) -> VecMemory {
    let mem = VecMemory::new(layout);
    for p in 0..PAGES {
        mem.fill(RegionId(1), p, format!("page {p} ").repeat(200).as_bytes());
    }
    mem
}

/// What one migration did, with the snapshots a watcher took every 2 ms.
struct Run {
    source: Result<SourceReport, MigrationError>,
    destination_failed: bool,
    elapsed: Duration,
    snapshots: Vec<Progress>,
    program: NullProgram,
    memory_kept: bool,
}

/// Migrate 4 MiB over two lanes with `config`; `steer` sees every snapshot
/// (from the watcher thread) and may act on the handle.
fn migrate(config: SourceConfig, steer: impl Fn(&Progress, &SourceControl) + Sync) -> Run {
    let layout = layout();
    let src = full_memory(&layout);
    let before = src.snapshot(RegionId(1));
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(2);
    let mut tracker = MarkTracker::new(&layout);
    let mut program = NullProgram::default();
    let snapshots = Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    let t0 = Instant::now();
    let (source, destination_failed) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            let mut prog = NullProgram::default();
            Destination::new(&b, &dst, &mut prog).run()
        });
        let source = Source::new(&a, &src, &mut tracker, &mut program).with_config(config);
        let control = source.control();
        assert_eq!(control.progress().phase, None, "not started yet");
        let (done, snapshots, steer) = (&done, &snapshots, &steer);
        let watcher = s.spawn(move || {
            // Bounded by the session (at most minutes at the slowest limit).
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let p = control.progress();
                steer(&p, &control);
                snapshots.lock().unwrap().push(p);
                std::thread::sleep(Duration::from_millis(2));
            }
            snapshots.lock().unwrap().push(control.progress());
        });
        let r = source.run();
        done.store(true, std::sync::atomic::Ordering::Release);
        lmig_core::Channel::shutdown(&a);
        watcher.join().unwrap();
        (r, d.join().unwrap().is_err())
    });
    let memory_kept = src.snapshot(RegionId(1)) == before;
    Run {
        source,
        destination_failed,
        elapsed: t0.elapsed(),
        snapshots: snapshots.into_inner().unwrap(),
        program,
        memory_kept,
    }
}

#[test]
fn a_bandwidth_limit_holds_the_transfer_back() {
    // 4 MiB at 8 MiB/s: at least 0.45 s whatever the burst allowance
    // (50 ms of the rate); without a limit this takes milliseconds. A
    // lower bound only: a slow machine makes it longer, never shorter.
    let config = SourceConfig::default().with_bandwidth_limit(8 * MIB);
    let run = migrate(config, |_, _| {});
    let report = run.source.expect("migrated");
    assert!(report.bytes_sent >= 4 * MIB, "{}", report.bytes_sent);
    assert!(
        run.elapsed >= Duration::from_millis(300),
        "4 MiB at 8 MiB/s in {:?}",
        run.elapsed
    );
    let last = run.snapshots.last().expect("a snapshot");
    assert_eq!(last.bandwidth_limit, 8 * MIB);
}

#[test]
fn progress_only_moves_forward_and_ends_where_the_report_ends() {
    let config = SourceConfig::default().with_bandwidth_limit(16 * MIB);
    let run = migrate(config, |_, _| {});
    let report = run.source.expect("migrated");
    let snaps = &run.snapshots;
    for w in snaps.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(b.bytes_sent >= a.bytes_sent && b.pages_sent >= a.pages_sent);
        assert!(b.elapsed >= a.elapsed);
        assert!(b.round >= a.round);
        if a.round == b.round && matches!(b.phase, Some(Phase::Precopy(_))) {
            assert!(b.round_pages_sent >= a.round_pages_sent, "{a:?} -> {b:?}");
        }
    }
    for p in snaps {
        assert!(p.round_pages_sent <= p.round_pages, "{p:?}");
        assert!((0.0..=1.0).contains(&p.round_fraction()));
    }
    // Round 0 was seen part-way (it takes a quarter of a second).
    assert!(
        snaps.iter().any(|p| p.phase == Some(Phase::Precopy(0))
            && p.round_pages == PAGES
            && p.round_pages_sent > 0
            && p.round_pages_sent < PAGES
            && p.bandwidth > 0.0),
        "no snapshot inside round 0"
    );
    let last = snaps.last().unwrap();
    assert_eq!(last.phase, Some(Phase::Done));
    assert_eq!(last.total_pages, PAGES);
    assert_eq!(last.pages_sent, report.pages_sent);
    assert_eq!(last.bytes_sent, report.bytes_sent);
}

#[test]
fn the_limit_changes_while_the_round_runs() {
    // 16 KiB/s would take over four minutes for 4 MiB (the first message
    // alone 16 s); lifted once round 0 has run 100 ms, the migration
    // finishes at full speed. The bound below only tells "lifted" from
    // "not lifted" (30 s against 256 s).
    let config = SourceConfig::default().with_bandwidth_limit(16 << 10);
    let run = migrate(config, |p, c| {
        if p.phase == Some(Phase::Precopy(0))
            && p.elapsed > Duration::from_millis(100)
            && c.bandwidth_limit() != 0
        {
            c.set_bandwidth_limit(0);
        }
    });
    run.source.expect("migrated");
    assert!(run.elapsed < Duration::from_secs(30), "{:?}", run.elapsed);
    assert_eq!(run.snapshots.last().unwrap().bandwidth_limit, 0);
    assert!(
        run.snapshots
            .iter()
            .any(|p| p.bandwidth_limit == 16 << 10 && p.phase == Some(Phase::Precopy(0))),
        "the limit was in force at first"
    );
}

#[test]
fn a_cancel_half_way_through_round_0_leaves_the_source_as_it_was() {
    let config = SourceConfig::default().with_bandwidth_limit(8 * MIB);
    let outcome = Mutex::new(None);
    let run = migrate(config, |p, c| {
        if p.phase == Some(Phase::Precopy(0)) && p.round_fraction() >= 0.5 {
            let mut o = outcome.lock().unwrap();
            if o.is_none() {
                *o = Some(c.cancel());
            }
        }
    });
    assert_eq!(*outcome.lock().unwrap(), Some(CancelOutcome::Cancelled));
    let err = run.source.expect_err("cancelled");
    assert!(matches!(err, MigrationError::Cancelled), "{err}");
    assert!(err.source_may_run());
    assert!(!run.program.is_paused() && !run.program.committed);
    assert!(run.memory_kept, "the source's memory is untouched");
    assert!(run.destination_failed, "the destination discarded");
    let last = run.snapshots.last().unwrap();
    assert_eq!(last.phase, Some(Phase::Aborted));
    assert_eq!(last.round, 0, "stopped in round 0");
    assert!(last.pages_sent < PAGES, "round 0 did not finish");
}

/// Memory that tests zero pages in place (as lmig-mem's regions do): with
/// a tracker that clears runs before their read, round 0 sends its zero
/// pages first and its data in a second pass.
struct InPlace<'a>(&'a VecMemory);

impl MemorySource for InPlace<'_> {
    fn layout(&self) -> RegionLayout {
        self.0.layout()
    }
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        self.0.read_pages(run, dst)
    }
    fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> lmig_core::Result<bool> {
        let mut pages = vec![0u8; run.count as usize * 4096];
        self.0.read_pages(run, &mut pages)?;
        for (z, page) in zero.iter_mut().zip(pages.chunks_exact(4096)) {
            *z = is_zero(page);
        }
        Ok(true)
    }
}

/// A [`MarkTracker`] with a clearer (that forgets nothing: the test
/// program writes nothing).
struct Clearing(MarkTracker);

struct NoWrites;

impl DirtyClearer for NoWrites {
    fn clear(&self, _run: &PageRun) -> lmig_core::Result<()> {
        Ok(())
    }
}

impl DirtyTracker for Clearing {
    fn name(&self) -> &'static str {
        "clearing"
    }
    fn start(&mut self) -> lmig_core::Result<()> {
        self.0.start()
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        self.0.collect(dirty)
    }
    fn stop(&mut self) -> lmig_core::Result<()> {
        self.0.stop()
    }
    fn clearer(&self) -> Option<Box<dyn DirtyClearer>> {
        Some(Box::new(NoWrites))
    }
}

#[test]
fn a_cancel_stops_round_0_in_its_data_pass_too() {
    // Every other page holds data: the zero pass is half of round 0's
    // pages and takes no time; the data pass (2 MiB at 8 MiB/s) the rest.
    let layout = layout();
    let src = VecMemory::new(&layout);
    for p in (0..PAGES).step_by(2) {
        src.fill(RegionId(1), p, format!("page {p} ").repeat(200).as_bytes());
    }
    let before = src.snapshot(RegionId(1));
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(2);
    let mut tracker = Clearing(MarkTracker::new(&layout));
    let mut program = NullProgram::default();
    let config = SourceConfig::default().with_bandwidth_limit(8 * MIB);
    let (r, last, d_failed) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            let mut prog = NullProgram::default();
            Destination::new(&b, &dst, &mut prog).run()
        });
        let source = Source::new(&a, InPlace(&src), &mut tracker, &mut program).with_config(config);
        let control = source.control();
        let watcher = s.spawn(move || {
            // Bounded: the session ends within seconds either way.
            for _ in 0..100_000 {
                let p = control.progress();
                if p.phase == Some(Phase::Precopy(0)) && p.round_fraction() >= 0.6 {
                    assert_eq!(control.cancel(), CancelOutcome::Cancelled);
                    return control;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            panic!("round 0 never reached 60 %");
        });
        let r = source.run();
        lmig_core::Channel::shutdown(&a);
        let control = watcher.join().unwrap();
        (r, control.progress(), d.join().unwrap().is_err())
    });
    assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
    assert!(d_failed && !program.is_paused() && !program.committed);
    assert_eq!(src.snapshot(RegionId(1)), before);
    assert_eq!(last.phase, Some(Phase::Aborted));
    assert!(
        last.pages_sent < PAGES,
        "the data pass went on after the cancel: {last:?}"
    );
}
