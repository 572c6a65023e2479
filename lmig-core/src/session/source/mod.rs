//! The source side: pre-copy rounds, the freeze, the commit, post-copy service.
//!
//! [`Source::run`] runs the phases in order, each a function in its own file:
//! `setup` and `precopy` ([`precopy`]), `freeze` (up to `Ready`), the commit
//! (here), `after_commit` ([`postcopy`]: the post-copy threads, digests,
//! `Done`). [`push`] holds the post-copy push order.

mod control;
mod freeze;
mod postcopy;
mod precopy;
mod progress;
mod push;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use self::control::{CancelHandle, CancelOutcome, SourceControl};
pub use self::progress::Progress;
use self::progress::ProgressState;
use super::pace::Meter;
use super::{contain, send_abort};
use crate::error::{MigrationError, Result};
use crate::model::{RegionLayout, RegionPages};
use crate::policy::{ConvergencePolicy, Decision, Fallback, Policy, PolicyConfig, RoundStats};
use crate::protocol::{CHUNK_PAGES, Message, Verification};
use crate::traits::{
    Channel, DirtyTracker, Event, MemorySource, NoObserver, NoSockets, Observer, Phase,
    SocketSource, StateSource,
};

/// How the source moves memory.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Pre-copy rounds until the policy freezes; a `Postcopy` decision is
    /// treated as `Freeze`.
    #[default]
    Precopy,
    /// Pre-copy rounds; when the policy says `Postcopy` (rounds stop
    /// converging), switch to post-copy for the pages still dirty. The
    /// default policy then falls back to post-copy
    /// ([`Fallback::Postcopy`](crate::policy::Fallback::Postcopy)), which
    /// it does as soon as its estimate says the rounds cannot reach the
    /// target ([`PolicyConfig::switch_ratio`]).
    Hybrid,
    /// No rounds: freeze at once, resume at the destination, send every page after.
    Postcopy,
}

/// Settings of a [`Source`]: `SourceConfig::default()` and the `with_*`
/// setters (the struct is `#[non_exhaustive]`).
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub struct SourceConfig {
    /// Pre-copy, hybrid or post-copy.
    pub mode: Mode,
    /// Send digests of the frozen memory after `Commit` and have the
    /// destination check them before `Done` (costs the source one hashing
    /// pass after the commit, nothing during the freeze).
    pub verify: bool,
    /// Most time to wait for `Ready` after the freeze.
    pub ready_timeout: Duration,
    /// Most time without any message from the destination after `Commit`.
    pub done_timeout: Duration,
    /// Pages per `Pages` message of the pre-copy rounds and the freeze (at
    /// most [`CHUNK_PAGES`]).
    pub batch_pages: u32,
    /// Pages per pushed `Pages` message after `Commit` while the program
    /// catches up with the push (at most [`CHUNK_PAGES`]); otherwise the
    /// push uses `batch_pages`. A program reading its memory in order soon
    /// faults on pages already sent and waits for the message holding its
    /// page to arrive whole: smaller messages shorten that wait (it grows
    /// with the message size) for more per-message work (the whole transfer
    /// takes longer the smaller the messages), which a program faulting on
    /// pages not sent yet (answered on their own) does not need. The push
    /// switches to this size when a request names only pages already sent
    /// and back when one names a page not sent. Default 8, tuned for 4 KiB
    /// pages on a 2-vCPU virtual machine with source and destination on
    /// one host (figures in the benchmark docs).
    pub push_pages: u32,
    /// Answer a post-copy request for pages already pushed by sending them
    /// again on the urgent lane (at most 64 pages per request). The
    /// destination asks only for pages it has not placed, so such a page is
    /// still in flight behind pushed data, and its fault waits for all of
    /// that to be received and placed: milliseconds with deep queues, the
    /// post-copy fault tail. Sent again, it arrives in a round trip; the
    /// copy that comes second is dropped there (counted as a duplicate
    /// page). Default false: every page is sent exactly once.
    pub resend_in_flight: bool,
    /// Most time a shrinking pre-copy round waits for the destination to
    /// place its pages (`Prepared{placed}`) before the policy decides: the
    /// policy then sees the end-to-end bandwidth, and a freeze does not
    /// include placing a backlog. The program runs meanwhile.
    pub catch_up_timeout: Duration,
    /// The longest the freeze may last, from the pause to `Ready`
    /// (`None`, the default: no bound but `ready_timeout`). Checked after
    /// every freeze step and bounding the wait for `Ready`: past it the
    /// source aborts and resumes the program (sockets out of repair mode
    /// with every queued byte, network unlocked), the destination
    /// discards, and [`Source::run`] returns
    /// [`MigrationError::FreezeDeadline`] naming the step. A step itself
    /// is not interrupted: the freeze lasts the bound plus the step that
    /// crossed it plus the unwinding.
    pub max_freeze: Option<Duration>,
    /// Most bytes per second the pages may take over every data stream
    /// together (0, the default: no limit); changeable while the session
    /// runs through [`SourceControl::set_bandwidth_limit`], which says what
    /// it applies to. A token bucket: cheap (one atomic load per message)
    /// when there is no limit.
    pub bandwidth_limit: u64,
    /// The threads sending the pre-copy rounds ask the memory to lower
    /// their priority ([`MemorySource::background_thread`]): on a busy
    /// host the program's own threads (its event loop answering clients)
    /// then get a CPU first, and the rounds take the CPU it leaves. The
    /// freeze and post-copy are not affected. Default false.
    pub yield_to_program: bool,
    /// Run the pre-copy rounds' senders in the host's lowest CPU class
    /// while the rounds shrink (`None`, the default: not at all). The hook
    /// moves the calling thread there (`true`) or back (`false`) and says
    /// whether it did; `lmig_mem::cpu::idle_thread` is one (Linux
    /// `SCHED_IDLE`: the senders then take only CPU time the program
    /// leaves, and a program thread that wakes up, an event loop with a
    /// request, preempts them at once). Each sender thread of a round
    /// calls it first (`true`); refused, the thread goes on as
    /// [`Self::yield_to_program`] says. The session stops asking once a
    /// round does not shrink (what got dirty during a round is more than
    /// half of what it sent): the rounds then need every CPU they can get
    /// to converge (auto-converge throttles the program from there). A
    /// sender still in the lowest class after [`Self::idle_round_limit`]
    /// of one round moves back (`false`): a program that leaves no CPU
    /// never stalls the migration. The freeze and post-copy never use it.
    /// The signal is the rounds' own (pages sent, pages dirtied), which
    /// every program has; no latency figure of the program is needed.
    pub idle_lanes: Option<fn(bool) -> bool>,
    /// The longest a pre-copy round's senders stay in the lowest class
    /// ([`Self::idle_lanes`]); default 2 s.
    pub idle_round_limit: Duration,
}

impl SourceConfig {
    /// Set [`SourceConfig::bandwidth_limit`] (bytes per second, 0: none).
    #[must_use]
    pub fn with_bandwidth_limit(mut self, bytes_per_sec: u64) -> Self {
        self.bandwidth_limit = bytes_per_sec;
        self
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            verify: true,
            ready_timeout: Duration::from_secs(30),
            done_timeout: Duration::from_secs(60),
            batch_pages: CHUNK_PAGES,
            push_pages: 8,
            resend_in_flight: false,
            catch_up_timeout: Duration::from_millis(500),
            max_freeze: None,
            bandwidth_limit: 0,
            yield_to_program: false,
            idle_lanes: None,
            idle_round_limit: Duration::from_secs(2),
        }
    }
}

impl SourceConfig {
    /// Sets [`mode`](Self::mode).
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets [`verify`](Self::verify).
    #[must_use]
    pub fn with_verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Sets [`ready_timeout`](Self::ready_timeout).
    #[must_use]
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Sets [`done_timeout`](Self::done_timeout).
    #[must_use]
    pub fn with_done_timeout(mut self, timeout: Duration) -> Self {
        self.done_timeout = timeout;
        self
    }

    /// Sets [`batch_pages`](Self::batch_pages).
    #[must_use]
    pub fn with_batch_pages(mut self, pages: u32) -> Self {
        self.batch_pages = pages;
        self
    }

    /// Sets [`push_pages`](Self::push_pages).
    #[must_use]
    pub fn with_push_pages(mut self, pages: u32) -> Self {
        self.push_pages = pages;
        self
    }

    /// Sets [`catch_up_timeout`](Self::catch_up_timeout).
    #[must_use]
    pub fn with_catch_up_timeout(mut self, timeout: Duration) -> Self {
        self.catch_up_timeout = timeout;
        self
    }

    /// Sets [`max_freeze`](Self::max_freeze) (a `Duration` or `None`).
    #[must_use]
    pub fn with_max_freeze(mut self, bound: impl Into<Option<Duration>>) -> Self {
        self.max_freeze = bound.into();
        self
    }

    /// Set [`Self::resend_in_flight`].
    #[must_use]
    pub fn with_resend_in_flight(mut self, on: bool) -> Self {
        self.resend_in_flight = on;
        self
    }

    /// Set [`Self::yield_to_program`].
    #[must_use]
    pub fn with_yield_to_program(mut self, on: bool) -> Self {
        self.yield_to_program = on;
        self
    }

    /// Set [`Self::idle_lanes`].
    #[must_use]
    pub fn with_idle_lanes(mut self, hook: Option<fn(bool) -> bool>) -> Self {
        self.idle_lanes = hook;
        self
    }

    /// Set [`Self::idle_round_limit`].
    #[must_use]
    pub fn with_idle_round_limit(mut self, limit: Duration) -> Self {
        self.idle_round_limit = limit;
        self
    }
}

/// What a finished (committed) migration did, seen from the source.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SourceReport {
    /// The memory mode used.
    pub mode: Mode,
    /// Pre-copy rounds run (0 in post-copy mode).
    pub rounds: u32,
    /// Statistics of every round.
    pub round_stats: Vec<RoundStats>,
    /// The policy's decisions, one per round.
    pub decisions: Vec<Decision>,
    /// Hybrid mode switched to post-copy.
    pub switched_to_postcopy: bool,
    /// The policy's explanation of its last decision.
    pub policy_reason: String,
    /// Every page sent, zero pages included, all phases.
    pub pages_sent: u64,
    /// Zero pages sent as a flag.
    pub zero_pages: u64,
    /// Bytes put on the channel for pages (data plus a fixed per-message overhead).
    pub bytes_sent: u64,
    /// Pages sent during the freeze.
    pub freeze_pages: u64,
    /// Where the freeze went, step by step, from the pause to `Ready`. The
    /// sockets are captured while the final pages are collected and sent:
    /// "capture sockets" is only the part of the capture that outlasted them.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "freeze_steps_ms", serialize_with = "crate::serde_ms::steps")
    )]
    pub freeze_steps: Vec<(&'static str, Duration)>,
    /// Pages sent after `Commit` (post-copy).
    pub postcopy_pages: u64,
    /// Of those, pages sent because the destination asked for them.
    pub requested_pages: u64,
    /// Socket records captured.
    pub sockets: u64,
    /// Bytes in the captured sockets' queues (received and unread, sent and
    /// unacknowledged, unsent), carried in the freeze.
    pub queued_bytes: u64,
    /// Which dirty tracker ran.
    pub tracker: &'static str,
    /// When the program was paused (serialised as `paused_ms`, from the
    /// session's start: [`SourceReport::paused_after`]).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub paused_at: Instant,
    /// When `Ready` arrived (serialised as `ready_ms`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub ready_at: Instant,
    /// When the `Commit` frame was written (serialised as `commit_ms`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub commit_at: Instant,
    /// From the start of the session to the pause (`paused_at`).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "paused_ms", with = "crate::serde_ms")
    )]
    pub paused_after: Duration,
    /// From the start of the session to `Ready` (`ready_at`).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "ready_ms", with = "crate::serde_ms")
    )]
    pub ready_after: Duration,
    /// From the start of the session to `Commit` written (`commit_at`).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "commit_ms", with = "crate::serde_ms")
    )]
    pub commit_after: Duration,
    /// The freeze as the source sees it, the pause to `Commit` written:
    /// [`SourceReport::freeze`] (serialised as `freeze_ms`).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "freeze_ms", with = "crate::serde_ms")
    )]
    pub freeze_time: Duration,
    /// From the start of the session to `Done`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "total_ms", with = "crate::serde_ms")
    )]
    pub total: Duration,
    /// What the destination found when it checked the digests.
    pub verification: Verification,
    /// Errors after `Commit` that could not stop the migration (e.g. closing
    /// a socket in repair mode failed); the destination runs regardless.
    pub warnings: Vec<String>,
}

impl SourceReport {
    /// Pause to `Commit` written: the freeze as the source sees it.
    pub fn freeze(&self) -> Duration {
        self.commit_at - self.paused_at
    }

    /// A report of nothing done yet, every time at `start`.
    fn starting(mode: Mode, tracker: &'static str, start: Instant) -> Self {
        Self {
            mode,
            rounds: 0,
            round_stats: Vec::new(),
            decisions: Vec::new(),
            switched_to_postcopy: false,
            policy_reason: String::new(),
            pages_sent: 0,
            zero_pages: 0,
            bytes_sent: 0,
            freeze_pages: 0,
            freeze_steps: Vec::new(),
            postcopy_pages: 0,
            requested_pages: 0,
            sockets: 0,
            queued_bytes: 0,
            tracker,
            paused_at: start,
            ready_at: start,
            commit_at: start,
            paused_after: Duration::ZERO,
            ready_after: Duration::ZERO,
            commit_after: Duration::ZERO,
            freeze_time: Duration::ZERO,
            total: Duration::ZERO,
            verification: Verification::NotChecked,
            warnings: Vec::new(),
        }
    }
}

/// The source side of one migration. See the [module docs](super).
#[must_use = "a Source does nothing until it runs"]
pub struct Source<'a, C, M, T, P, K = NoSockets> {
    channel: C,
    memory: M,
    tracker: T,
    program: P,
    sockets: K,
    policy: Box<dyn Policy + 'a>,
    /// `policy` is the default one (no [`Source::with_policy`]): in hybrid
    /// mode it falls back to post-copy.
    default_policy: bool,
    observer: Box<dyn Observer + 'a>,
    config: SourceConfig,
    cancel: CancelHandle,
    /// Counts the pages sent and holds the bandwidth limit.
    meter: Arc<Meter>,
    progress: Arc<ProgressState>,
}

/// How often a wait of the session looks for a cancel.
const CANCEL_TICK: Duration = Duration::from_millis(20);

/// What to undo if the migration fails before `Commit`.
#[derive(Default)]
struct Undo {
    tracking: bool,
    throttled: bool,
    paused: bool,
    sockets_frozen: bool,
}

impl<'a, C, M, T, P> Source<'a, C, M, T, P, NoSockets>
where
    C: Channel,
    M: MemorySource,
    T: DirtyTracker,
    P: StateSource,
{
    /// A source with the default policy, no sockets and no observer.
    pub fn new(channel: C, memory: M, tracker: T, program: P) -> Self {
        Self {
            channel,
            memory,
            tracker,
            program,
            sockets: NoSockets,
            policy: Box::new(ConvergencePolicy::default()),
            default_policy: true,
            observer: Box::new(NoObserver),
            config: SourceConfig::default(),
            cancel: CancelHandle::default(),
            meter: Arc::default(),
            progress: Arc::default(),
        }
    }
}

impl<'a, C, M, T, P, K> Source<'a, C, M, T, P, K>
where
    C: Channel,
    M: MemorySource,
    T: DirtyTracker,
    P: StateSource,
    K: SocketSource,
{
    /// Move these sockets too.
    pub fn with_sockets<K2: SocketSource>(self, sockets: K2) -> Source<'a, C, M, T, P, K2> {
        Source {
            channel: self.channel,
            memory: self.memory,
            tracker: self.tracker,
            program: self.program,
            sockets,
            policy: self.policy,
            default_policy: self.default_policy,
            observer: self.observer,
            config: self.config,
            cancel: self.cancel,
            meter: self.meter,
            progress: self.progress,
        }
    }

    /// Use this convergence policy.
    pub fn with_policy(mut self, policy: impl Policy + 'a) -> Self {
        self.policy = Box::new(policy);
        self.default_policy = false;
        self
    }

    /// Report events to this observer.
    pub fn with_observer(mut self, observer: impl Observer + 'a) -> Self {
        self.observer = Box::new(observer);
        self
    }

    /// Use these settings (this sets the bandwidth limit to
    /// `config.bandwidth_limit`; [`SourceControl::set_bandwidth_limit`]
    /// changes it afterwards).
    pub fn with_config(mut self, config: SourceConfig) -> Self {
        self.meter.set_limit(config.bandwidth_limit);
        self.config = config;
        self
    }

    /// A handle that cancels this migration from another thread: before
    /// `Commit` the attempt aborts like a failure (the program runs on
    /// here), after it the cancel has no effect and says so.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// A handle that watches and steers this migration from another
    /// thread: its progress, its cancel, its bandwidth limit.
    pub fn control(&self) -> SourceControl {
        SourceControl {
            cancel: self.cancel.clone(),
            meter: self.meter.clone(),
            progress: self.progress.clone(),
        }
    }

    fn phase(&self, phase: Phase) {
        info!(side = "source", phase = ?phase, "phase");
        self.progress.phase(phase);
        self.observer.event(&Event::Phase {
            phase,
            at: Instant::now(),
        });
    }

    /// Run the migration. See the [module docs](super) for what `Ok` and `Err` mean.
    ///
    /// The steps: refuse a program handed over before, everything up to
    /// `Ready` (`before_commit`), the commit point (`commit`), the
    /// hand-over to the destination (`hand_over`), post-copy and `Done`
    /// (`after_commit`), the tracker's teardown, the outcome (`finish`).
    pub fn run(mut self) -> Result<SourceReport> {
        let start = Instant::now();
        let _session =
            phase_span!("source", mode = ?self.config.mode, tracker = self.tracker.name());
        info!(tracker = self.tracker.name(), mode = ?self.config.mode, "migration out starts");
        let layout = self.memory.layout();
        self.progress.started(layout.total_pages());
        let mut report = SourceReport::starting(self.config.mode, self.tracker.name(), start);
        // A program handed over before never migrates again: it may run on
        // that destination. The destination hears `Abort` and discards.
        if let Some(confirmed) = self.memory.handed_over() {
            let err = MigrationError::HandedOverBefore { confirmed };
            send_abort(&self.channel, &err);
            return Err(err);
        }
        let mut undo = Undo::default();
        // A panic in a trait implementation before `Commit` fails the
        // attempt like any error: the abort resumes the program.
        let postcopy = match contain("before Commit", false, || {
            self.before_commit(&layout, &mut undo, &mut report)
        }) {
            Ok(postcopy) => postcopy,
            Err(e) => return Err(self.abort(&undo, e)),
        };
        let commit_span = phase_span!("commit");
        if let Err(e) = self.commit(&mut report, start) {
            return Err(self.abort(&undo, e));
        }
        self.hand_over(&mut report);
        drop(commit_span);
        let outcome = contain("after Commit", true, || {
            self.after_commit(&layout, postcopy, &mut report)
        });
        if let Err(e) = contain("stopping the dirty tracker", true, || self.tracker.stop()) {
            warn!(error = %e, "after Commit: stopping the dirty tracker failed");
            report
                .warnings
                .push(format!("stopping the dirty tracker: {e}"));
        }
        report.total = start.elapsed();
        self.finish(outcome, report)
    }

    /// The commit point: if the `Commit` frame cannot be written
    /// completely, the destination cannot have it and we may still resume
    /// here (the error). A cancel that arrived first wins; from here on,
    /// none has effect. Records the commit's timestamps in `report`.
    fn commit(&mut self, report: &mut SourceReport, start: Instant) -> Result<()> {
        contain("sending Commit", false, || {
            self.cancel.commit()?;
            self.channel.send(&Message::Commit)
        })?;
        report.commit_at = Instant::now();
        report.paused_after = report.paused_at - start;
        report.ready_after = report.ready_at - start;
        report.commit_after = report.commit_at - start;
        report.freeze_time = report.freeze();
        // Remembered by a memory that outlives this session: a later
        // attempt says the program was handed over (unconfirmed until `Done`).
        self.memory.mark_handed_over(false);
        self.phase(Phase::Committed);
        Ok(())
    }

    /// Right after `Commit`: the destination owns the program, so a failure
    /// or a panic here is reported in `report.warnings`, never undone.
    fn hand_over(&mut self, report: &mut SourceReport) {
        if let Err(e) = contain("in the program's `committed`", true, || {
            self.program.committed();
            Ok(())
        }) {
            warn!(error = %e, "after Commit: the program's `committed` failed");
            report.warnings.push(e.to_string());
        }
        // The clients wait for the handoff (held packets, the service
        // address). Nobody waits for the tracker, whose teardown (write
        // protection off over every region) takes tens of ms per GiB: it
        // comes after `Done`, so on a shared host it does not compete with
        // the destination activating its sockets and resuming.
        if let Err(e) = contain("releasing the source sockets", true, || {
            self.sockets.release()
        }) {
            warn!(error = %e, "after Commit: releasing the source sockets failed");
            report
                .warnings
                .push(format!("releasing the source sockets: {e}"));
        }
    }

    /// The session's outcome once `after_commit` returned: `Done` came
    /// (the source memory is released), or the commit stays unconfirmed.
    fn finish(
        &mut self,
        outcome: Result<Verification>,
        mut report: SourceReport,
    ) -> Result<SourceReport> {
        match outcome {
            Ok(verification) => {
                report.verification = verification;
                info!(
                    freeze_ms = report.freeze().as_secs_f64() * 1e3,
                    pages = report.pages_sent,
                    verification = ?verification,
                    warnings = report.warnings.len(),
                    "migration out done"
                );
                self.memory.mark_handed_over(true);
                self.memory.release();
                self.phase(Phase::Done);
                Ok(report)
            }
            Err(e @ MigrationError::Panicked { .. }) => {
                error!(error = %e, "after Commit: a panic ended the session");
                Err(e)
            }
            Err(e) => {
                error!(error = %e, "after Commit: Done never came (the program runs on the destination)");
                Err(MigrationError::CommitUnconfirmed {
                    detail: e.to_string(),
                })
            }
        }
    }

    /// Everything up to `Ready`: setup, pre-copy, the freeze. Returns the
    /// pages left for post-copy.
    fn before_commit(
        &mut self,
        layout: &RegionLayout,
        undo: &mut Undo,
        report: &mut SourceReport,
    ) -> Result<RegionPages> {
        if self.default_policy && self.config.mode == Mode::Hybrid {
            let config = PolicyConfig::default().with_fallback(Fallback::Postcopy);
            self.policy = Box::new(ConvergencePolicy::new(config));
        }
        let mut ready = self.setup(layout, undo)?;
        let rounds = self.precopy(layout, undo, report, &mut ready)?;
        self.freeze(layout, undo, report, rounds)
    }

    /// Undo everything and resume the program here. Returns the error to report.
    fn abort(&mut self, undo: &Undo, err: MigrationError) -> MigrationError {
        warn!(error = %err, "migration failed before Commit: resuming the program here");
        self.cancel.ended();
        send_abort(&self.channel, &err);
        // Undo everything even if one step fails or panics; report the
        // first failure.
        let mut failed: Option<(&'static str, MigrationError)> = None;
        if undo.sockets_frozen {
            if let Err(e) = contain("in the socket abort", false, || self.sockets.abort()) {
                failed.get_or_insert(("socket abort", e));
            }
        }
        if undo.throttled {
            if let Err(e) = contain("lifting the throttle", false, || {
                self.program.throttle(100);
                Ok(())
            }) {
                warn!(error = %e, "abort: lifting the throttle failed");
            }
        }
        if undo.paused {
            if let Err(e) = contain("in the program's resume", false, || self.program.resume()) {
                failed.get_or_insert(("program resume", e));
            }
        }
        // The program runs here again (the tracker's teardown does not hold it).
        self.phase(Phase::Aborted);
        if undo.tracking {
            if let Err(e) = contain("stopping the dirty tracker", false, || self.tracker.stop()) {
                warn!(error = %e, "abort: stopping the dirty tracker failed");
            }
        }
        match failed {
            None => err,
            Some((what, e)) => {
                MigrationError::backend(what, format!("{e} (after the migration failed: {err})"))
            }
        }
    }
}
