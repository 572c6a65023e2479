//! The session state machines end to end over an in-process channel pair,
//! including the commit rule: the channel is cut at every step on each side.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lmig_core::model::{PageRun, ProgramState, RegionId, RegionInfo, RegionLayout};
use lmig_core::policy::{ConvergencePolicy, Decision, Fallback, PolicyConfig};
use lmig_core::protocol::{Message, PageBatch, PageData, Verification};
use lmig_core::session::{Destination, Mode, Source, SourceConfig, SourceReport};
use lmig_core::testing::{Cut, CutChannel, MarkTracker, NullProgram, VecMemory, channel_pair};
use lmig_core::{Channel, MigrationError};

const PAGES: u64 = 512;

fn layout() -> RegionLayout {
    RegionLayout::new(vec![
        RegionInfo::new(RegionId(1), PAGES * 4096, 4096).unwrap(),
        RegionInfo::new(RegionId(2), 16 * 4096, 4096).unwrap(),
    ])
    .unwrap()
}

fn filled_memory(layout: &RegionLayout) -> VecMemory {
    let mem = VecMemory::new(layout);
    // Every 3rd page has content; the rest stay zero.
    for p in (0..PAGES).step_by(3) {
        mem.fill(RegionId(1), p, format!("page {p}").as_bytes());
    }
    mem.fill(RegionId(2), 15, b"last page of region 2");
    mem
}

#[test]
fn precopy_with_concurrent_writer_is_verified() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(2);
    let mut tracker = MarkTracker::new(&layout);
    let writer_tracker = tracker.clone();
    let stop = AtomicBool::new(false);
    let state = ProgramState::new(3, &b"program state"[..]);

    let (src_report, dst_report, dst_prog) = std::thread::scope(|s| {
        let dst_thread = s.spawn(|| {
            let mut prog = NullProgram::default();
            let r = Destination::new(&b, &dst, &mut prog).run();
            (r, prog)
        });
        // A writer that keeps dirtying pages while pre-copy runs, and stops
        // when the program is paused (the test program pauses by flag).
        let writer = s.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) && i < 200_000 {
                // Only pages that already hold data: the others stay zero.
                let page = (i * 7919) % (PAGES / 3) * 3;
                if writer_tracker.is_started() {
                    src.fill(RegionId(1), page, &i.to_le_bytes());
                    writer_tracker.mark(&PageRun::new(RegionId(1), page, 1));
                }
                i += 1;
                if i.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
        });
        struct Prog<'s>(
            NullProgram,
            &'s AtomicBool,
            Option<std::thread::ScopedJoinHandle<'s, ()>>,
        );
        impl lmig_core::StateSource for Prog<'_> {
            fn pause(&mut self) -> lmig_core::Result<()> {
                self.1.store(true, Ordering::Release);
                if let Some(w) = self.2.take() {
                    w.join().unwrap();
                }
                self.0.pause()
            }
            fn capture(&mut self) -> lmig_core::Result<ProgramState> {
                self.0.capture()
            }
            fn resume(&mut self) -> lmig_core::Result<()> {
                self.0.resume()
            }
        }
        let prog = Prog(NullProgram::with_state(state.clone()), &stop, Some(writer));
        let policy = ConvergencePolicy::new(
            PolicyConfig::default()
                .with_downtime_target(Duration::from_micros(1))
                .with_max_rounds(4),
        );
        let src_report = Source::new(&a, &src, &mut tracker, prog)
            .with_policy(policy)
            .run();
        let (dst_report, dst_prog) = dst_thread.join().unwrap();
        (src_report, dst_report, dst_prog)
    });
    let src_report = src_report.expect("source");
    let dst_report = dst_report.expect("destination");
    assert_eq!(src_report.verification, Verification::Verified);
    assert_eq!(dst_report.verification, Verification::Verified);
    assert!(src_report.rounds >= 1, "rounds: {}", src_report.rounds);
    let round0 = src_report.round_stats[0];
    assert!(
        round0.zero_pages > PAGES / 2,
        "zero pages are detected: {round0:?}"
    );
    assert!(
        round0.bytes_sent < (PAGES + 16) * 4096 / 2,
        "zero pages are not shipped as data: {round0:?}"
    );
    assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
    assert_eq!(dst.snapshot(RegionId(2)), src.snapshot(RegionId(2)));
    assert_eq!(dst_prog.state, Some(state));
    assert!(dst_prog.committed);
    assert!(!tracker.is_started(), "tracker stopped after commit");
}

/// Every cut point, on either side: before the commit the source runs on and
/// the destination discards; after it only the destination runs.
#[test]
fn cut_at_every_step_obeys_the_commit_rule() {
    #[derive(Copy, Clone, PartialEq, Debug)]
    enum After {
        /// Before the commit: the source runs on, the destination discarded.
        SourceRuns,
        /// After the commit: only the destination runs.
        DestinationRuns,
        /// The destination died on receiving `Commit`: the source stays
        /// stopped (it cannot know) and reports `CommitUnconfirmed`. This is
        /// the documented window where availability, not consistency, is lost.
        Neither,
    }
    use After::*;
    let steps: &[(Cut, bool, After)] = &[
        // (where, cut on the source side, outcome)
        (Cut::Send("Regions", 1), true, SourceRuns),
        (Cut::Send("Pages", 3), true, SourceRuns),
        (Cut::Send("RoundEnd", 1), true, SourceRuns),
        (Cut::Send("Sockets", 1), true, SourceRuns),
        (Cut::Send("State", 1), true, SourceRuns),
        (Cut::Send("Handover", 1), true, SourceRuns),
        (Cut::Recv("Ready", 1), true, SourceRuns),
        (Cut::Send("Commit", 1), true, SourceRuns),
        (Cut::Send("Digests", 1), true, DestinationRuns),
        (Cut::Recv("Done", 1), true, DestinationRuns),
        (Cut::Recv("Regions", 1), false, SourceRuns),
        (Cut::Recv("Pages", 5), false, SourceRuns),
        (Cut::Recv("Handover", 1), false, SourceRuns),
        (Cut::Send("Ready", 1), false, SourceRuns),
        (Cut::Recv("Commit", 1), false, Neither),
        (Cut::Recv("Digests", 1), false, DestinationRuns),
        (Cut::Send("Done", 1), false, DestinationRuns),
    ];
    for &(cut, on_source, outcome) in steps {
        let layout = layout();
        let src = filled_memory(&layout);
        let before = src.snapshot(RegionId(1));
        let dst = VecMemory::empty();
        let (a, b) = channel_pair(1);
        let (a, b): (Box<dyn Channel>, Box<dyn Channel>) = if on_source {
            (Box::new(CutChannel::new(a, cut)), Box::new(b))
        } else {
            (Box::new(a), Box::new(CutChannel::new(b, cut)))
        };
        let mut tracker = MarkTracker::new(&layout);
        let mut src_prog = NullProgram::default();
        let mut dst_prog = NullProgram::default();
        let config = SourceConfig::default()
            .with_ready_timeout(Duration::from_secs(5))
            .with_done_timeout(Duration::from_secs(5));
        let (s_res, d_res) = std::thread::scope(|s| {
            let d = s.spawn(|| Destination::new(&b, &dst, &mut dst_prog).run());
            let s_res = Source::new(&a, &src, &mut tracker, &mut src_prog)
                .with_config(config)
                .run();
            if s_res.is_err() {
                // A killed source side takes its connection with it.
                a.shutdown();
            }
            (s_res, d.join().unwrap())
        });
        let s_err = s_res.expect_err(&format!("{cut:?}: the source must see the failure"));
        assert_eq!(
            src.snapshot(RegionId(1)),
            before,
            "{cut:?}: source memory intact"
        );
        assert!(!tracker.is_started(), "{cut:?}: tracker stopped");
        if outcome != SourceRuns {
            assert!(!s_err.source_may_run(), "{cut:?}: {s_err}");
            assert!(
                src_prog.committed && src_prog.is_paused(),
                "{cut:?}: source stays stopped"
            );
            assert_eq!(
                dst_prog.committed,
                outcome == DestinationRuns,
                "{cut:?}: destination"
            );
        } else {
            assert!(s_err.source_may_run(), "{cut:?}: {s_err}");
            assert!(
                !src_prog.is_paused() && !src_prog.committed,
                "{cut:?}: source runs on"
            );
            assert!(d_res.is_err(), "{cut:?}: destination must fail");
            assert!(!dst_prog.committed, "{cut:?}: destination never resumed");
            if !matches!(cut, Cut::Send("Regions", 1) | Cut::Recv("Regions", 1)) {
                assert!(
                    dst.was_discarded() && dst_prog.discarded,
                    "{cut:?}: destination discarded"
                );
            }
        }
    }
}

#[test]
fn layout_mismatch_aborts_before_any_page() {
    let layout = layout();
    let src = filled_memory(&layout);
    let other =
        RegionLayout::new(vec![RegionInfo::new(RegionId(1), 8 * 4096, 4096).unwrap()]).unwrap();
    let dst = VecMemory::new(&other);
    let (a, b) = channel_pair(1);
    let mut tracker = MarkTracker::new(&layout);
    let mut prog = NullProgram::default();
    let (s_res, d_res) = std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
        let r = Source::new(&a, &src, &mut tracker, &mut prog).run();
        (r, d.join().unwrap())
    });
    let d_err = d_res.unwrap_err();
    assert!(
        matches!(d_err, MigrationError::LayoutMismatch { .. }),
        "{d_err}"
    );
    let s_err = s_res.unwrap_err();
    assert!(s_err.source_may_run());
    assert!(
        s_err.to_string().contains("layout"),
        "the source learns why: {s_err}"
    );
    assert!(
        dst.snapshot(RegionId(1)).iter().all(|&b| b == 0),
        "nothing placed"
    );
    assert!(!prog.is_paused());
}

#[test]
fn hostile_page_outside_region_is_rejected_before_placing() {
    let layout = layout();
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(1);
    let d = std::thread::spawn(move || {
        let mut prog = NullProgram::default();
        let r = Destination::new(&b, &dst, &mut prog).run();
        (r, dst, prog)
    });
    a.send(&Message::Regions(layout.clone())).unwrap();
    let good = PageBatch {
        round: 0,
        run: PageRun::new(RegionId(1), 0, 1),
        data: PageData::Raw(vec![7u8; 4096].into()),
    };
    a.send(&Message::Pages(good)).unwrap();
    let bad = PageBatch {
        round: 0,
        run: PageRun::new(RegionId(1), PAGES - 1, 2),
        data: PageData::Raw(vec![9u8; 8192].into()),
    };
    a.send(&Message::Pages(bad)).unwrap();
    let (r, dst, prog) = d.join().unwrap();
    assert!(
        matches!(r, Err(MigrationError::PageOutsideRegion { .. })),
        "{r:?}"
    );
    assert!(dst.was_discarded() && prog.discarded && !prog.committed);
    assert!(
        dst.snapshot(RegionId(1))[(PAGES - 1) as usize * 4096..]
            .iter()
            .all(|&b| b == 0)
    );
    // The source side learns why.
    match a.recv(Some(Duration::from_secs(5))).unwrap() {
        Some(Message::Abort { reason }) => assert!(reason.contains("outside"), "{reason}"),
        other => panic!("expected Abort, got {other:?}"),
    }
}

#[test]
fn wrong_data_length_is_rejected() {
    let layout = layout();
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(1);
    let d = std::thread::spawn(move || Destination::new(&b, &dst, NullProgram::default()).run());
    a.send(&Message::Regions(layout)).unwrap();
    a.send(&Message::Pages(PageBatch {
        round: 0,
        run: PageRun::new(RegionId(1), 0, 2),
        data: PageData::Raw(vec![1u8; 4096].into()),
    }))
    .unwrap();
    assert!(matches!(
        d.join().unwrap(),
        Err(MigrationError::Protocol { .. })
    ));
}

#[test]
fn postcopy_without_fault_support_aborts_before_commit() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(1);
    let mut tracker = MarkTracker::new(&layout);
    let mut prog = NullProgram::default();
    let config = SourceConfig::default().with_mode(Mode::Postcopy);
    let (s_res, d_res) = std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
        let r = Source::new(&a, &src, &mut tracker, &mut prog)
            .with_config(config)
            .run();
        (r, d.join().unwrap())
    });
    assert!(
        matches!(d_res, Err(MigrationError::Unsupported { .. })),
        "{d_res:?}"
    );
    let e = s_res.unwrap_err();
    assert!(e.source_may_run(), "{e}");
    assert_eq!(
        (prog.paused, prog.resumed),
        (1, 1),
        "paused for the freeze, resumed after the abort"
    );
}

/// A program that records the throttles asked of it and agrees to them
/// (`agrees`) or refuses them.
struct Throttled {
    inner: NullProgram,
    asked: Vec<u8>,
    agrees: bool,
}

impl Throttled {
    fn new(agrees: bool) -> Self {
        Self {
            inner: NullProgram::default(),
            asked: Vec::new(),
            agrees,
        }
    }
}

impl lmig_core::StateSource for Throttled {
    fn pause(&mut self) -> lmig_core::Result<()> {
        self.inner.pause()
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.inner.resume()
    }
    fn throttle(&mut self, percent: u8) -> bool {
        self.asked.push(percent);
        self.agrees
    }
}

/// Migrate the test region from a tracker that never converges
/// ([`AlwaysDirty`]) with `policy`, the source program `prog`; the
/// source's report, with the destination's checked, and the two memories.
fn migrate_never_converging(
    prog: &mut Throttled,
    policy: ConvergencePolicy,
) -> (SourceReport, VecMemory, VecMemory) {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(1);
    let tracker = MarkTracker::new(&layout);
    let r = std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
        let r = Source::new(&a, &src, AlwaysDirty(tracker, layout.clone()), prog)
            .with_policy(policy)
            .run();
        d.join().unwrap().unwrap();
        r
    })
    .unwrap();
    (r, src, dst)
}

#[test]
fn throttle_fallback_asks_the_program() {
    // Dirty the whole region after every collect: never converges.
    let mut prog = Throttled::new(true);
    let policy = ConvergencePolicy::new(
        PolicyConfig::default()
            .with_downtime_target(Duration::from_nanos(1))
            .with_max_rounds(6)
            .with_stall_rounds(1)
            .with_fallback(Fallback::Throttle),
    );
    let (r, src, dst) = migrate_never_converging(&mut prog, policy);
    assert!(!prog.asked.is_empty(), "the program was asked to throttle");
    assert!(
        prog.asked.windows(2).all(|w| w[1] < w[0]),
        "harder each time: {:?}",
        prog.asked
    );
    assert_eq!(r.verification, Verification::Verified);
    assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
}

/// Dirties every page after every collect: pre-copy never converges.
struct AlwaysDirty(MarkTracker, RegionLayout);

impl lmig_core::DirtyTracker for AlwaysDirty {
    fn name(&self) -> &'static str {
        "always dirty"
    }
    fn start(&mut self) -> lmig_core::Result<()> {
        self.0.start()
    }
    fn collect(&mut self, dirty: &mut lmig_core::model::RegionPages) -> lmig_core::Result<()> {
        *dirty = lmig_core::model::RegionPages::full(&self.1);
        Ok(())
    }
    fn stop(&mut self) -> lmig_core::Result<()> {
        self.0.stop()
    }
}

/// A program that refuses to be throttled (auto-converge): the migration
/// still ends, frozen right after the refusal, verified.
#[test]
fn refused_throttle_never_stalls_the_migration() {
    let mut prog = Throttled::new(false);
    let policy = ConvergencePolicy::new(
        PolicyConfig::default()
            .with_downtime_target(Duration::from_nanos(1))
            .with_fallback(Fallback::Throttle),
    );
    let (r, src, dst) = migrate_never_converging(&mut prog, policy);
    // Asked once (pre-copy cannot converge: every page dirty again),
    // refused, and from the next decision on the policy freezes (more
    // rounds only while the destination has not said `Prepared`), far
    // below the 30-round limit.
    assert_eq!(prog.asked, [50], "{:?}", r.decisions);
    assert_eq!(r.decisions[0], Decision::Throttle { percent: 50 });
    assert!(
        r.decisions[1..].iter().all(|d| *d == Decision::Freeze) && r.decisions.len() >= 2,
        "{:?}",
        r.decisions
    );
    assert!(r.rounds < 30, "{:?}", r.decisions);
    assert_eq!(prog.inner.paused, 1);
    assert_eq!(r.verification, Verification::Verified);
    assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
}

/// Hybrid mode with the default policy (no `with_policy`) switches to
/// post-copy when the rounds cannot converge, at once rather than after
/// three stalled rounds. The in-memory sink cannot serve faults: the
/// destination refuses post-copy and the source serves on, after the
/// `Postcopy` decision the observer saw.
#[test]
fn hybrid_with_the_default_policy_switches() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(1);
    let tracker = MarkTracker::new(&layout);
    let mut prog = NullProgram::default();
    let decisions = std::sync::Mutex::new(Vec::new());
    let observer = |e: &lmig_core::traits::Event| {
        if let lmig_core::traits::Event::Decision(d) = e {
            decisions.lock().unwrap().push(*d);
        }
    };
    // Paced at 50 MB/s: the ~4 MiB always dirty then take ~80 ms a round,
    // far above the default 2 ms target, however fast this machine copies
    // (unpaced, an in-memory round can fit the target and the policy rightly
    // freezes instead).
    let config = SourceConfig::default()
        .with_mode(Mode::Hybrid)
        .with_bandwidth_limit(50_000_000);
    let (s_res, d_res) = std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
        let r = Source::new(&a, &src, AlwaysDirty(tracker, layout.clone()), &mut prog)
            .with_config(config)
            .with_observer(observer)
            .run();
        (r, d.join().unwrap())
    });
    assert!(
        matches!(d_res, Err(MigrationError::Unsupported { .. })),
        "{d_res:?}"
    );
    assert!(s_res.unwrap_err().source_may_run());
    // From round 0 on (more rounds only while the destination has not
    // said `Prepared`).
    let decisions = decisions.into_inner().unwrap();
    assert!(
        !decisions.is_empty() && decisions.iter().all(|d| *d == Decision::Postcopy),
        "{decisions:?}"
    );
}

/// A destination that places slowly: the source waits for it to catch up
/// with the pre-copy rounds before it freezes, so the freeze does not include
/// placing the backlog.
#[test]
fn source_freezes_only_once_the_destination_caught_up() {
    use lmig_core::{MemorySink, StateSource};
    use std::sync::atomic::AtomicU64;

    /// Counts the pages placed; each batch takes a millisecond.
    struct Slow<'a> {
        inner: &'a VecMemory,
        placed: &'a AtomicU64,
    }
    impl MemorySink for Slow<'_> {
        fn prepare(&self, layout: &RegionLayout) -> lmig_core::Result<()> {
            self.inner.prepare(layout)
        }
        fn write_pages(&self, run: &PageRun, data: &[u8]) -> lmig_core::Result<()> {
            std::thread::sleep(Duration::from_millis(1));
            self.placed
                .fetch_add(u64::from(run.count), Ordering::SeqCst);
            self.inner.write_pages(run, data)
        }
        fn zero_pages(&self, run: &PageRun) -> lmig_core::Result<()> {
            std::thread::sleep(Duration::from_millis(1));
            self.placed
                .fetch_add(u64::from(run.count), Ordering::SeqCst);
            self.inner.zero_pages(run)
        }
        fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
            MemorySink::read_pages(self.inner, run, dst)
        }
    }
    /// Records how many pages the destination had placed when paused.
    struct Program<'a> {
        placed: &'a AtomicU64,
        at_pause: Option<u64>,
    }
    impl StateSource for Program<'_> {
        fn pause(&mut self) -> lmig_core::Result<()> {
            self.at_pause = Some(self.placed.load(Ordering::SeqCst));
            Ok(())
        }
        fn resume(&mut self) -> lmig_core::Result<()> {
            Ok(())
        }
    }

    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let placed = AtomicU64::new(0);
    let (a, b) = channel_pair(2);
    let mut tracker = MarkTracker::new(&layout);
    let mut program = Program {
        placed: &placed,
        at_pause: None,
    };
    let config = SourceConfig::default()
        .with_batch_pages(8)
        .with_catch_up_timeout(Duration::from_secs(10));
    let report = std::thread::scope(|s| {
        let d = s.spawn(|| {
            let sink = Slow {
                inner: &dst,
                placed: &placed,
            };
            let mut prog = NullProgram::default();
            Destination::new(&b, &sink, &mut prog).run()
        });
        let r = Source::new(&a, &src, &mut tracker, &mut program)
            .with_config(config)
            .run();
        d.join().unwrap().expect("destination");
        r.expect("source")
    });
    let before_freeze = report.pages_sent - report.freeze_pages;
    assert!(before_freeze > 0);
    assert_eq!(
        program.at_pause,
        Some(before_freeze),
        "every page of the rounds placed before the pause"
    );
    assert_eq!(report.verification, Verification::Verified);
}

/// Listener records standing in for sockets (the session does not look inside).
fn listener_records(first: u64, n: u64) -> Vec<lmig_core::model::SocketRecord> {
    (first..first + n)
        .map(|id| {
            lmig_core::model::SocketRecord::Listen(lmig_core::model::TcpListenState {
                id,
                local: "127.0.0.1:1".parse().unwrap(),
                backlog: 1,
                sock: Default::default(),
                tcp: Default::default(),
            })
        })
        .collect()
}

/// Emits `batches` batches of 16 records.
struct FakeSockets {
    batches: u64,
    released: bool,
    aborted: bool,
}

impl lmig_core::SocketSource for FakeSockets {
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<lmig_core::model::SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        for b in 0..self.batches {
            emit(listener_records(b * 16, 16))?;
        }
        Ok(())
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        self.aborted = true;
        Ok(())
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        self.released = true;
        Ok(())
    }
}

/// A slow sink (each batch takes a while, as thousands of connections do)
/// that fails at batch `fail_at` if given.
#[derive(Default)]
struct SlowSink {
    restored: Vec<u64>,
    fail_at: Option<usize>,
    batches: usize,
    /// Records restored when `activate` ran.
    at_activate: Option<usize>,
    discarded: bool,
}

impl lmig_core::SocketSink for SlowSink {
    fn restore(&mut self, batch: Vec<lmig_core::model::SocketRecord>) -> lmig_core::Result<()> {
        std::thread::sleep(Duration::from_millis(2));
        if self.fail_at == Some(self.batches) {
            return Err(MigrationError::invalid(
                "socket record",
                "refused by the test sink",
            ));
        }
        self.batches += 1;
        self.restored.extend(batch.iter().map(|r| r.id()));
        Ok(())
    }
    fn activate(&mut self) -> lmig_core::Result<()> {
        self.at_activate = Some(self.restored.len());
        Ok(())
    }
    fn discard(&mut self) {
        self.discarded = true;
    }
}

/// Migrate `src` to `dst` (memories) over a pair with two data lanes,
/// the source's sockets and the destination's sink, the source's and the
/// destination's programs, the source configured by `config`; both
/// sessions' results.
fn migrate_with_sockets<K: lmig_core::SocketSource>(
    (src, dst): (&VecMemory, &VecMemory),
    (sockets, sink): (K, &mut SlowSink),
    (src_prog, dst_prog): (&mut NullProgram, &mut NullProgram),
    config: SourceConfig,
) -> (
    lmig_core::Result<SourceReport>,
    lmig_core::Result<lmig_core::session::DestinationReport>,
) {
    let (a, b) = channel_pair(2);
    let mut tracker = MarkTracker::new(&lmig_core::MemorySource::layout(src));
    std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&b, dst, dst_prog).with_sockets(sink).run());
        let r = Source::new(&a, src, &mut tracker, src_prog)
            .with_sockets(sockets)
            .with_config(config)
            .run();
        (r, d.join().unwrap())
    })
}

#[test]
fn sockets_restore_beside_the_pages_and_are_all_in_before_commit() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let mut sockets = FakeSockets {
        batches: 8,
        released: false,
        aborted: false,
    };
    let mut sink = SlowSink::default();
    let (s_res, d_res) = migrate_with_sockets(
        (&src, &dst),
        (&mut sockets, &mut sink),
        (&mut NullProgram::default(), &mut NullProgram::default()),
        SourceConfig::default(),
    );
    let s_rep = s_res.expect("source");
    let d_rep = d_res.expect("destination");
    assert_eq!(s_rep.sockets, 128);
    assert_eq!(d_rep.sockets_restored, 128);
    assert!(sockets.released);
    // Every record restored, once, before the program could run. The
    // batches travel on both data lanes (`Channel::send_lane`), so their
    // order across batches is the lanes' interleaving, not the capture's.
    let mut restored = sink.restored.clone();
    restored.sort_unstable();
    assert_eq!(restored, (0..128).collect::<Vec<u64>>());
    assert_eq!(sink.at_activate, Some(128));
    assert_eq!(d_rep.verification, Verification::Verified);
}

/// One connection with queued bytes; `estimate` is what it says before the freeze.
struct QueuedSockets {
    estimate: u64,
    asked: u32,
}

impl lmig_core::SocketSource for QueuedSockets {
    fn queued_bytes(&mut self) -> lmig_core::Result<u64> {
        self.asked += 1;
        Ok(self.estimate)
    }
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<lmig_core::model::SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        use lmig_core::model::{SocketRecord, TcpConnState, TcpStateKind};
        emit(vec![SocketRecord::Tcp(TcpConnState {
            id: 1,
            local: "198.51.100.1:80".parse().unwrap(),
            peer: "198.51.100.2:4000".parse().unwrap(),
            state: TcpStateKind::Established,
            snd_seq: 1000,
            rcv_seq: 2000,
            send_queue: vec![7u8; 3000].into(),
            unsent_len: 1000,
            recv_queue: vec![9u8; 500].into(),
            mss: 1448,
            snd_wscale: 7,
            rcv_wscale: 7,
            wscale_ok: true,
            sack_ok: true,
            timestamps_ok: false,
            timestamp: 0,
            window: None,
            sock: Default::default(),
            tcp: Default::default(),
        })])
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
}

/// The socket source's estimate of queued bytes reaches every round's
/// statistics and the policy's reasoning; the report counts the queue bytes
/// the freeze actually captured.
#[test]
fn queued_socket_bytes_reach_the_policy_and_the_report() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let mut sockets = QueuedSockets {
        estimate: 32 << 20,
        asked: 0,
    };
    let mut sink = SlowSink::default();
    let (s_res, d_res) = migrate_with_sockets(
        (&src, &dst),
        (&mut sockets, &mut sink),
        (&mut NullProgram::default(), &mut NullProgram::default()),
        SourceConfig::default(),
    );
    let rep = s_res.expect("source");
    d_res.expect("destination");
    assert!(rep.rounds >= 1);
    assert_eq!(sockets.asked, rep.rounds, "asked once per round");
    assert!(
        rep.round_stats.iter().all(|r| r.queued_bytes == 32 << 20),
        "{:?}",
        rep.round_stats
    );
    assert!(
        rep.policy_reason.contains("33554432 queued in sockets"),
        "{}",
        rep.policy_reason
    );
    assert_eq!(rep.queued_bytes, 3500, "both queues of the captured record");
    assert_eq!(sink.restored, [1]);
}

#[test]
fn a_socket_restore_failing_mid_freeze_aborts_and_the_source_runs_on() {
    for fail_at in [0, 3, 7] {
        let layout = layout();
        let src = filled_memory(&layout);
        let before = src.snapshot(RegionId(1));
        let dst = VecMemory::empty();
        let mut sockets = FakeSockets {
            batches: 8,
            released: false,
            aborted: false,
        };
        let mut sink = SlowSink {
            fail_at: Some(fail_at),
            ..SlowSink::default()
        };
        let mut src_prog = NullProgram::default();
        let mut dst_prog = NullProgram::default();
        let config = SourceConfig::default().with_ready_timeout(Duration::from_secs(5));
        let (s_res, d_res) = migrate_with_sockets(
            (&src, &dst),
            (&mut sockets, &mut sink),
            (&mut src_prog, &mut dst_prog),
            config,
        );
        let d_err = d_res.expect_err("the destination must fail");
        assert!(
            d_err.to_string().contains("refused by the test sink"),
            "{d_err}"
        );
        let s_err = s_res.expect_err("the source must see the abort");
        assert!(s_err.source_may_run(), "batch {fail_at}: {s_err}");
        assert!(sockets.aborted && !sockets.released, "batch {fail_at}");
        assert!(
            !src_prog.is_paused() && !src_prog.committed,
            "batch {fail_at}"
        );
        assert_eq!(src.snapshot(RegionId(1)), before);
        assert!(
            sink.discarded && sink.at_activate.is_none(),
            "batch {fail_at}"
        );
        assert!(!dst_prog.committed && dst_prog.discarded, "batch {fail_at}");
    }
}

/// Where a [`Panicky`] trait implementation panics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PanicAt {
    /// The source program's `pause`.
    Pause,
    /// The source program's `capture` (its state, in the freeze).
    StateCapture,
    /// The socket source's `freeze`.
    SocketFreeze,
    /// The socket source's `capture` (on the session's capture thread).
    SocketCapture,
    /// The source memory's `read_pages` in the freeze (a page sender thread).
    FinalPages,
    /// The destination program's `restore`.
    StateRestore,
    /// The source program's `committed` (after `Commit`).
    Committed,
    /// The source memory's `read_pages` after `Commit` (the digests).
    AfterCommitRead,
}

impl PanicAt {
    const ALL: [PanicAt; 8] = [
        PanicAt::Pause,
        PanicAt::StateCapture,
        PanicAt::SocketFreeze,
        PanicAt::SocketCapture,
        PanicAt::FinalPages,
        PanicAt::StateRestore,
        PanicAt::Committed,
        PanicAt::AfterCommitRead,
    ];
}

/// A program (source or destination) and memory that panic at one point
/// and otherwise behave as [`NullProgram`] and [`VecMemory`].
struct Panicky<'a> {
    at: PanicAt,
    program: NullProgram,
    memory: &'a VecMemory,
    /// The source program paused (shared by its program and memory).
    frozen: &'a AtomicBool,
    /// `Commit` went out (shared likewise; set by `committed`).
    committed: &'a AtomicBool,
    /// The source's tracker: the program marks a page written before it
    /// pauses, so that the freeze reads memory.
    tracker: Option<MarkTracker>,
}

impl<'a> Panicky<'a> {
    fn new(
        at: PanicAt,
        memory: &'a VecMemory,
        frozen: &'a AtomicBool,
        committed: &'a AtomicBool,
    ) -> Self {
        Self {
            at,
            program: NullProgram::default(),
            memory,
            frozen,
            committed,
            tracker: None,
        }
    }
}

impl lmig_core::StateSource for Panicky<'_> {
    fn pause(&mut self) -> lmig_core::Result<()> {
        assert!(self.at != PanicAt::Pause, "the program's pause fell over");
        if let Some(t) = &self.tracker {
            t.mark(&PageRun::new(RegionId(1), 3, 2));
        }
        self.frozen.store(true, Ordering::SeqCst);
        lmig_core::StateSource::pause(&mut self.program)
    }
    fn capture(&mut self) -> lmig_core::Result<ProgramState> {
        assert!(
            self.at != PanicAt::StateCapture,
            "the state capture fell over"
        );
        lmig_core::StateSource::capture(&mut self.program)
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        lmig_core::StateSource::resume(&mut self.program)
    }
    fn committed(&mut self) {
        self.committed.store(true, Ordering::SeqCst);
        assert!(
            self.at != PanicAt::Committed,
            "the program's committed fell over"
        );
        self.program.committed();
    }
}

impl lmig_core::StateSink for Panicky<'_> {
    fn restore(&mut self, state: ProgramState) -> lmig_core::Result<()> {
        assert!(
            self.at != PanicAt::StateRestore,
            "the state restore fell over"
        );
        lmig_core::StateSink::restore(&mut self.program, state)
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        lmig_core::StateSink::resume(&mut self.program)
    }
    fn discard(&mut self) {
        self.program.discard()
    }
}

/// A [`FakeSockets`] that panics at a [`PanicAt`].
struct PanickySockets<'a> {
    at: PanicAt,
    inner: &'a mut FakeSockets,
}

impl lmig_core::SocketSource for PanickySockets<'_> {
    fn freeze(&mut self) -> lmig_core::Result<()> {
        assert!(
            self.at != PanicAt::SocketFreeze,
            "the socket freeze fell over"
        );
        Ok(())
    }
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<lmig_core::model::SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        assert!(
            self.at != PanicAt::SocketCapture,
            "the socket capture fell over"
        );
        self.inner.capture(emit)
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        self.inner.abort()
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        self.inner.release()
    }
}

impl lmig_core::MemorySource for Panicky<'_> {
    fn layout(&self) -> RegionLayout {
        self.memory.layout()
    }
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        let committed = self.committed.load(Ordering::SeqCst);
        assert!(
            !(self.at == PanicAt::FinalPages && self.frozen.load(Ordering::SeqCst) && !committed),
            "the memory read fell over in the freeze"
        );
        assert!(
            !(self.at == PanicAt::AfterCommitRead && committed),
            "the memory read fell over after Commit"
        );
        self.memory.read_pages(run, dst)
    }
}

/// A panic in a program's or backend's code before `Commit` (on the
/// session's thread or one of its helper threads, source or destination)
/// aborts the attempt like any error: the source resumes the program, its
/// sockets are given back, its memory is untouched, and the destination
/// discards everything. After `Commit` it is reported, not undone.
#[test]
fn a_panic_in_program_code_aborts_before_commit_and_is_reported_after() {
    use PanicAt::*;
    for at in PanicAt::ALL {
        let layout = layout();
        let mem = filled_memory(&layout);
        let before = mem.snapshot(RegionId(1));
        let dst = VecMemory::empty();
        let (a, b) = channel_pair(2);
        let mut tracker = MarkTracker::new(&layout);
        let mut fake = FakeSockets {
            batches: 2,
            released: false,
            aborted: false,
        };
        let (frozen, committed) = (AtomicBool::new(false), AtomicBool::new(false));
        let src_mem = Panicky::new(at, &mem, &frozen, &committed);
        let mut src_prog = Panicky::new(at, &mem, &frozen, &committed);
        src_prog.tracker = Some(tracker.clone());
        let (dst_frozen, dst_committed) = (AtomicBool::new(false), AtomicBool::new(false));
        let mut dst_prog = Panicky::new(at, &dst, &dst_frozen, &dst_committed);
        let mut sink = SlowSink::default();
        let config = SourceConfig::default().with_ready_timeout(Duration::from_secs(5));
        let (s_res, d_res) = std::thread::scope(|s| {
            let d = s.spawn(|| {
                Destination::new(&b, &dst, &mut dst_prog)
                    .with_sockets(&mut sink)
                    .run()
            });
            let r = Source::new(&a, &src_mem, &mut tracker, &mut src_prog)
                .with_sockets(PanickySockets {
                    at,
                    inner: &mut fake,
                })
                .with_config(config)
                .run();
            // The destination learns at once that no more is coming.
            a.shutdown();
            (r, d.join().expect("the destination session must not panic"))
        });
        if at == AfterCommitRead {
            // Reported as after `Commit`: the destination owns the program,
            // and the session ended instead of serving forever.
            let e = s_res.expect_err("the digests could not be taken");
            assert!(
                matches!(
                    e,
                    MigrationError::Panicked {
                        committed: true,
                        ..
                    }
                ) && !e.source_may_run(),
                "{at:?}: {e}"
            );
            assert!(e.to_string().contains("fell over after Commit"), "{e}");
            assert!(fake.released && !fake.aborted, "{at:?}");
            assert!(
                dst_prog.program.committed,
                "{at:?}: resumed at the destination"
            );
            let _ = d_res;
            continue;
        }
        if at == Committed {
            let report = s_res.unwrap_or_else(|e| panic!("{at:?}: {e}"));
            assert!(
                report
                    .warnings
                    .iter()
                    .any(|w| w.contains("committed fell over")),
                "{at:?}: {:?}",
                report.warnings
            );
            // The source shut its end down after `Done`: the destination
            // finished first.
            d_res.unwrap_or_else(|e| panic!("{at:?}: {e}"));
            assert!(fake.released && !fake.aborted, "{at:?}");
            continue;
        }
        let s_err = s_res.expect_err("the attempt fails");
        assert!(s_err.source_may_run(), "{at:?}: {s_err}");
        let text = s_err.to_string();
        assert!(
            text.contains("fell over") || (at == StateRestore && text.contains("aborted")),
            "{at:?}: {text}"
        );
        assert!(!src_prog.program.is_paused(), "{at:?}: resumed");
        assert!(!src_prog.program.committed, "{at:?}");
        if at != Pause {
            assert!(fake.aborted && !fake.released, "{at:?}: sockets given back");
        }
        assert_eq!(mem.snapshot(RegionId(1)), before, "{at:?}");
        let d_err = d_res.expect_err("the destination discards");
        if at == StateRestore {
            assert!(
                d_err.to_string().contains("state restore fell over"),
                "{d_err}"
            );
        }
        assert!(
            dst_prog.program.discarded && !dst_prog.program.committed,
            "{at:?}"
        );
        assert!(sink.at_activate.is_none(), "{at:?}");
    }
}
