//! Control of a session from outside and at its edges: the freeze's bound
//! (`max_freeze`) hit at every freeze step, the cancel handle before and
//! after `Commit`, the refusal of a channel over a moved address, and the
//! resumption value the destination hands the program at `Commit`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmig_core::model::{
    PageRun, ProgramState, RegionId, RegionLayout, RegionPages, SocketRecord, TcpListenState,
};
use lmig_core::protocol::{Message, Verification};
use lmig_core::session::{CancelOutcome, Destination, Source, SourceConfig};
use lmig_core::testing::{MarkTracker, NullProgram, PairEnd, VecMemory, channel_pair, one_region};
use lmig_core::traits::{Event, Phase};
use lmig_core::{Channel, DirtyTracker, MigrationError, SocketSink, SocketSource, StateSource};

const PAGES: u64 = 256;
/// The bound the freeze tests set, and how long a stalled step takes:
/// without a stall the freeze of this small program takes microseconds.
const BOUND: Duration = Duration::from_millis(200);
const STALL: Duration = Duration::from_millis(700);

fn layout() -> RegionLayout {
    one_region(RegionId(1), PAGES)
}

fn filled_memory(layout: &RegionLayout) -> VecMemory {
    VecMemory::labelled(layout, RegionId(1), (0..PAGES).step_by(2))
}

/// Which freeze step stalls, and whether the program is frozen now.
struct Stall {
    step: &'static str,
    frozen: AtomicBool,
}

impl Stall {
    fn at(&self, step: &'static str) {
        if self.step == step && self.frozen.load(Ordering::SeqCst) {
            std::thread::sleep(STALL);
        }
    }
}

/// The program: pauses (the freeze begins), hands its state over.
struct Program<'a> {
    stall: &'a Stall,
    inner: NullProgram,
}

impl StateSource for Program<'_> {
    fn pause(&mut self) -> lmig_core::Result<()> {
        self.stall.frozen.store(true, Ordering::SeqCst);
        self.inner.pause()?;
        self.stall.at("pause program");
        Ok(())
    }
    fn capture(&mut self) -> lmig_core::Result<ProgramState> {
        Ok(ProgramState::new(1, b"the program's state".to_vec()))
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.stall.frozen.store(false, Ordering::SeqCst);
        self.inner.resume()
    }
    fn committed(&mut self) {
        self.inner.committed();
    }
}

/// Sockets with bytes queued both ways: the freeze takes them (repair
/// mode), `abort` must put every byte back, `release` gives them away.
struct Sockets<'a> {
    stall: &'a Stall,
    /// Per connection: (receive queue, send queue) while the program owns them.
    queues: Vec<(Vec<u8>, Vec<u8>)>,
    /// Taken at the freeze, as repair mode would.
    frozen: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    moved: Vec<IpAddr>,
    aborted: bool,
    released: bool,
}

impl<'a> Sockets<'a> {
    fn new(stall: &'a Stall) -> Self {
        let queues = (0..8u8)
            .map(|i| (vec![i; 1000 + usize::from(i)], vec![!i; 700]))
            .collect();
        Self {
            stall,
            queues,
            frozen: None,
            moved: Vec::new(),
            aborted: false,
            released: false,
        }
    }
}

fn records(n: usize) -> Vec<SocketRecord> {
    (0..n as u64)
        .map(|id| {
            SocketRecord::Listen(TcpListenState {
                id,
                local: "127.0.0.1:1".parse().unwrap(),
                backlog: 1,
                sock: Default::default(),
                tcp: Default::default(),
            })
        })
        .collect()
}

impl SocketSource for Sockets<'_> {
    fn moved_addresses(&self) -> Vec<IpAddr> {
        self.moved.clone()
    }
    fn freeze(&mut self) -> lmig_core::Result<()> {
        self.frozen = Some(std::mem::take(&mut self.queues));
        self.stall.at("freeze sockets");
        Ok(())
    }
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        self.stall.at("capture sockets");
        emit(records(self.frozen.as_ref().map_or(0, Vec::len)))
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        self.aborted = true;
        if let Some(q) = self.frozen.take() {
            self.queues = q;
        }
        Ok(())
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        self.released = true;
        self.frozen = None;
        Ok(())
    }
}

/// A sink that keeps what it restored.
#[derive(Default)]
struct Sink {
    restored: usize,
    activated: bool,
    discarded: bool,
    /// Set when dropped: what it held is closed.
    closed: Arc<AtomicBool>,
}

impl SocketSink for Sink {
    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        self.restored += batch.len();
        Ok(())
    }
    fn activate(&mut self) -> lmig_core::Result<()> {
        self.activated = true;
        Ok(())
    }
    fn discard(&mut self) {
        self.discarded = true;
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

/// The tracker, whose last collect (in the freeze) may stall.
struct Tracker<'a> {
    stall: &'a Stall,
    inner: MarkTracker,
}

impl DirtyTracker for Tracker<'_> {
    fn name(&self) -> &'static str {
        "test"
    }
    fn start(&mut self) -> lmig_core::Result<()> {
        self.inner.start()
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        self.stall.at("final collect");
        self.inner.collect(dirty)?;
        if self.stall.frozen.load(Ordering::SeqCst) {
            // The program wrote a few pages just before the pause: the
            // freeze sends them.
            dirty.insert_run(&PageRun::new(RegionId(1), 0, 4))?;
        }
        Ok(())
    }
    fn stop(&mut self) -> lmig_core::Result<()> {
        self.inner.stop()
    }
}

/// A channel end that stalls sending a message named `name` in the freeze,
/// and may claim to run over IP addresses.
struct StallChannel<'a> {
    inner: PairEnd,
    stall: &'a Stall,
    step: &'static str,
    name: &'static str,
    ips: Vec<IpAddr>,
}

impl Channel for StallChannel<'_> {
    fn send(&self, msg: &Message) -> lmig_core::Result<()> {
        if msg.name() == self.name {
            self.stall.at(self.step);
        }
        self.inner.send(msg)
    }
    fn recv(&self, timeout: Option<Duration>) -> lmig_core::Result<Option<Message>> {
        self.inner.recv(timeout)
    }
    fn ip_addresses(&self) -> Vec<IpAddr> {
        self.ips.clone()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// The steps of the freeze, as `SourceReport::freeze_steps` names them, and
/// the message whose send stalls for the steps the channel makes slow.
const STEPS: &[(&str, &str)] = &[
    ("pause program", ""),
    ("freeze sockets", ""),
    ("final collect", ""),
    ("final pages", "Pages"),
    ("capture sockets", ""),
    ("state and handover", "Handover"),
    ("wait for Ready", "Ready"),
];

/// A deadline hit at any freeze step: the source aborts and serves on with
/// every byte of every socket queue, its memory and its tracker as before;
/// the destination discards what it got and never resumes.
#[test]
fn a_freeze_past_its_bound_aborts_at_every_step_and_the_source_serves_on() {
    for &(step, message) in STEPS {
        let layout = layout();
        let src = filled_memory(&layout);
        let before = src.snapshot(RegionId(1));
        let dst = VecMemory::empty();
        let stall = Stall {
            step,
            frozen: AtomicBool::new(false),
        };
        // The destination's `Ready` stalls; every other stalled message is the source's.
        let (a, b) = channel_pair(1);
        let on_dst = message == "Ready";
        let wrap = |inner, mine: bool| StallChannel {
            inner,
            stall: &stall,
            step,
            name: if mine { message } else { "" },
            ips: Vec::new(),
        };
        let (a, b) = (wrap(a, !on_dst), wrap(b, on_dst));
        let mut tracker = Tracker {
            stall: &stall,
            inner: MarkTracker::new(&layout),
        };
        let mut program = Program {
            stall: &stall,
            inner: NullProgram::default(),
        };
        let mut sockets = Sockets::new(&stall);
        let queues = sockets.queues.clone();
        let mut sink = Sink::default();
        let mut dst_prog = NullProgram::default();
        let config = SourceConfig::default().with_max_freeze(Some(BOUND));
        let (s_res, d_res) = std::thread::scope(|s| {
            let d = s.spawn(|| {
                Destination::new(&b, &dst, &mut dst_prog)
                    .with_sockets(&mut sink)
                    .run()
            });
            let r = Source::new(&a, &src, &mut tracker, &mut program)
                .with_sockets(&mut sockets)
                .with_config(config)
                .run();
            a.shutdown();
            (r, d.join().unwrap())
        });
        let err = s_res.expect_err(step);
        match &err {
            MigrationError::FreezeDeadline {
                step: at,
                max,
                after,
            } => {
                assert_eq!(*at, step, "the step that crossed the bound is named");
                assert_eq!(*max, BOUND);
                assert!(after > max, "{step}: {err}");
            }
            other => panic!("{step}: expected FreezeDeadline, got {other}"),
        }
        assert!(err.source_may_run() && !err.after_commit(), "{step}");
        // The source serves on: resumed, every byte of every queue back.
        assert!(
            !program.inner.is_paused() && !program.inner.committed,
            "{step}: program resumed"
        );
        // Paused but not yet frozen, the sockets never left the program.
        assert_eq!(sockets.aborted, step != "pause program", "{step}");
        assert!(!sockets.released, "{step}");
        assert_eq!(sockets.queues, queues, "{step}: every queued byte back");
        assert_eq!(src.snapshot(RegionId(1)), before, "{step}: memory intact");
        assert!(!tracker.inner.is_started(), "{step}: tracker stopped");
        // The destination discarded everything and never resumed.
        assert!(d_res.is_err(), "{step}: the destination fails");
        assert!(!dst_prog.committed && dst_prog.discarded, "{step}");
        assert!(dst.was_discarded(), "{step}: memory discarded");
        assert!(!sink.activated, "{step}");
    }
}

/// Without a bound (the default) the same stall only makes the freeze long.
#[test]
fn without_a_bound_a_slow_step_only_lengthens_the_freeze() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let stall = Stall {
        step: "capture sockets",
        frozen: AtomicBool::new(false),
    };
    let (a, b) = channel_pair(1);
    let mut tracker = MarkTracker::new(&layout);
    let mut program = Program {
        stall: &stall,
        inner: NullProgram::default(),
    };
    let mut sockets = Sockets::new(&stall);
    let mut sink = Sink::default();
    let (s_res, d_res) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            Destination::new(&b, &dst, NullProgram::default())
                .with_sockets(&mut sink)
                .run()
        });
        let r = Source::new(&a, &src, &mut tracker, &mut program)
            .with_sockets(&mut sockets)
            .run();
        (r, d.join().unwrap())
    });
    let report = s_res.expect("no bound, no abort");
    assert_eq!(report.verification, Verification::Verified);
    d_res.expect("destination");
    assert!(sockets.released && sink.activated && sink.restored == 8);
}

/// A cancel in the freeze aborts (the source serves on) and says so; a
/// cancel after `Commit` has no effect and says so.
#[test]
fn a_cancel_aborts_before_commit_and_is_refused_after_it() {
    // `Precopy(0)` comes after the round's own check: the send stops at
    // its next chunk.
    for at in [
        Phase::Setup,
        Phase::Precopy(0),
        Phase::Frozen,
        Phase::AwaitReady,
        Phase::Committed,
    ] {
        let layout = layout();
        let src = filled_memory(&layout);
        let before = src.snapshot(RegionId(1));
        let dst = VecMemory::empty();
        let (a, b) = channel_pair(2);
        let mut tracker = MarkTracker::new(&layout);
        let stall = Stall {
            step: "",
            frozen: AtomicBool::new(false),
        };
        let mut program = Program {
            stall: &stall,
            inner: NullProgram::default(),
        };
        let mut sockets = Sockets::new(&stall);
        let queues = sockets.queues.clone();
        let mut dst_prog = NullProgram::default();
        let outcome = Mutex::new(None);
        let (s_res, d_res) = std::thread::scope(|s| {
            let d = s.spawn(|| {
                Destination::new(&b, &dst, &mut dst_prog)
                    .with_sockets(Sink::default())
                    .run()
            });
            let source =
                Source::new(&a, &src, &mut tracker, &mut program).with_sockets(&mut sockets);
            let handle = source.cancel_handle();
            let r = source
                .with_observer(|e: &Event| {
                    if matches!(e, Event::Phase { phase, .. } if *phase == at) {
                        *outcome.lock().unwrap() = Some(handle.cancel());
                    }
                })
                .run();
            a.shutdown();
            (r, d.join().unwrap())
        });
        let outcome = outcome.into_inner().unwrap();
        if at == Phase::Committed {
            assert_eq!(outcome, Some(CancelOutcome::AfterCommit));
            s_res.expect("a cancel after Commit has no effect");
            d_res.expect("destination");
            assert!(program.inner.committed && dst_prog.committed);
            continue;
        }
        assert_eq!(outcome, Some(CancelOutcome::Cancelled), "{at:?}");
        let err = s_res.expect_err("cancelled");
        assert!(matches!(err, MigrationError::Cancelled), "{at:?}: {err}");
        assert!(err.source_may_run());
        assert!(
            !program.inner.is_paused() && !program.inner.committed,
            "{at:?}"
        );
        assert_eq!(sockets.queues, queues, "{at:?}: every queued byte back");
        assert!(!sockets.released, "{at:?}");
        assert_eq!(src.snapshot(RegionId(1)), before);
        assert!(d_res.is_err() && !dst_prog.committed, "{at:?}");
    }
}

/// The channel over a service address that moves: refused before any
/// page or socket went out.
#[test]
fn a_channel_over_a_moved_address_is_refused_before_anything_is_sent() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let stall = Stall {
        step: "",
        frozen: AtomicBool::new(false),
    };
    let service: IpAddr = "198.51.100.7".parse().unwrap();
    let (a, b) = channel_pair(1);
    let a = StallChannel {
        inner: a,
        stall: &stall,
        step: "",
        name: "",
        ips: vec!["198.51.100.2".parse().unwrap(), service],
    };
    let mut tracker = MarkTracker::new(&layout);
    let mut program = Program {
        stall: &stall,
        inner: NullProgram::default(),
    };
    let mut sockets = Sockets::new(&stall);
    sockets.moved = vec![service];
    let (s_res, d_res) = std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
        let r = Source::new(&a, &src, &mut tracker, &mut program)
            .with_sockets(&mut sockets)
            .run();
        (r, d.join().unwrap())
    });
    match s_res {
        Err(MigrationError::ChannelOnMovedAddress { addr }) => assert_eq!(addr, service),
        other => panic!("expected ChannelOnMovedAddress, got {other:?}"),
    }
    assert!(!tracker.is_started() && program.inner.paused == 0);
    let d_err = d_res.expect_err("the destination got nothing");
    assert!(
        matches!(d_err, MigrationError::PeerAborted { .. }),
        "{d_err}"
    );
    assert!(d_err.to_string().contains("198.51.100.7"), "{d_err}");
}

/// `Destination::start` returns at `Commit` with the program's state, its
/// activated sockets and its memory; the rest of the migration finishes
/// behind `after_commit`.
#[test]
fn start_hands_the_program_over_at_commit_and_join_gives_the_report() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = Arc::new(VecMemory::empty());
    let (a, b) = channel_pair(2);
    let mut tracker = MarkTracker::new(&layout);
    let state = ProgramState::new(3, b"counter=42".to_vec());
    let mut program = NullProgram::with_state(state.clone());
    let stall = Stall {
        step: "",
        frozen: AtomicBool::new(false),
    };
    let mut sockets = Sockets::new(&stall);
    let closed = Arc::new(AtomicBool::new(false));
    let mut sink = Sink::default();
    sink.closed = closed.clone();
    let dst2 = dst.clone();
    let dest = std::thread::spawn(move || {
        let r = Destination::new(b, dst2, NullProgram::default())
            .with_sockets(sink)
            .start()
            .expect("committed");
        // At `Commit`: state, sockets and memory are the program's.
        assert_eq!(r.program.state.as_ref(), Some(&state));
        assert!(r.sockets.activated && r.sockets.restored == 8);
        assert!(r.activation_error.is_none() && r.resume_error.is_none());
        let mut page = vec![0u8; 4096];
        lmig_core::MemorySink::read_pages(&r.memory, &PageRun::new(RegionId(1), 4, 1), &mut page)
            .unwrap();
        assert!(page.starts_with(b"page 4"));
        let lmig_core::session::Resumption {
            sockets,
            after_commit,
            ..
        } = r;
        let report = after_commit.join().expect("the migration ends well");
        (report, sockets.closed.load(Ordering::SeqCst))
    });
    let s_rep = Source::new(&a, &src, &mut tracker, &mut program)
        .with_sockets(&mut sockets)
        .run()
        .expect("source");
    let (d_rep, closed_early) = dest.join().unwrap();
    assert_eq!(s_rep.verification, Verification::Verified);
    assert_eq!(d_rep.verification, Verification::Verified);
    assert_eq!(d_rep.sockets_restored, 8);
    assert!(!closed_early, "the program keeps its sockets");
    assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
}

/// A resumption value dropped unused closes what it holds (its socket
/// sink here); the migration still ends well behind it.
#[test]
fn a_resumption_dropped_unused_closes_its_sockets() {
    let layout = layout();
    let src = filled_memory(&layout);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(1);
    let mut tracker = MarkTracker::new(&layout);
    let mut program = NullProgram::default();
    let stall = Stall {
        step: "",
        frozen: AtomicBool::new(false),
    };
    let mut sockets = Sockets::new(&stall);
    let closed = Arc::new(AtomicBool::new(false));
    let mut sink = Sink::default();
    sink.closed = closed.clone();
    let (s_res, closed_at_drop, d_res) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            let r = Destination::new(&b, &dst, NullProgram::default())
                .with_sockets(sink)
                .start_scoped(s)
                .expect("committed");
            assert!(!closed.load(Ordering::SeqCst), "held while the value lives");
            // Everything but the handle dropped here, unused.
            let after_commit = only_the_handle(r);
            let closed_at_drop = closed.load(Ordering::SeqCst);
            (closed_at_drop, after_commit.join())
        });
        let r = Source::new(&a, &src, &mut tracker, &mut program)
            .with_sockets(&mut sockets)
            .run();
        let (c, d) = d.join().unwrap();
        (r, c, d)
    });
    s_res.expect("source");
    assert!(closed_at_drop, "the sockets closed with the unused value");
    assert_eq!(
        d_res.expect("destination").verification,
        Verification::Verified
    );
}

/// Keep only the after-`Commit` handle of a resumption value; the rest is
/// dropped on return.
fn only_the_handle<'s, P, K, M>(
    r: lmig_core::session::Resumption<'s, P, K, M>,
) -> lmig_core::session::AfterCommit<'s> {
    r.after_commit
}
