//! The source side: pre-copy rounds, the freeze, the commit, post-copy service.
//!
//! [`Source::run`] runs the phases in order, each a function in its own file:
//! `setup` and `precopy` ([`precopy`]), `freeze` (up to `Ready`), the commit
//! (here), `after_commit` ([`postcopy`]: the post-copy threads, digests,
//! `Done`). [`push`] holds the post-copy push order.

mod config;
mod control;
mod freeze;
mod postcopy;
mod precopy;
mod progress;
mod push;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use self::config::{IDLE_MAX_REST, IDLE_WORK_SLICE, Mode, SourceConfig};
pub use self::control::{CancelHandle, CancelOutcome, SourceControl};
pub use self::progress::Progress;
use self::progress::ProgressState;
use super::pace::Meter;
use super::{contain, send_abort};
use crate::error::{MigrationError, Result};
use crate::model::{RegionLayout, RegionPages};
use crate::policy::{ConvergencePolicy, Decision, Fallback, Policy, PolicyConfig, RoundStats};
use crate::protocol::{Message, Verification};
use crate::traits::{
    Channel, DirtyTracker, Event, MemorySource, NoObserver, NoSockets, Observer, Phase,
    SocketSource, StateSource,
};

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
    /// Post-copy: the push's hold-off ended on the destination's
    /// `DemandSettled`, before its bound.
    pub holdoff_settled: bool,
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
            holdoff_settled: false,
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

/// Most report warnings the wait for `SocketsActive` adds about unexpected
/// messages.
const MAX_WAIT_WARNINGS: usize = 16;

/// The outcome of a destination that said `Done` (or `Abort`) before its
/// `SocketsActive` came: nothing is left to serve.
fn ended_early(msg: Message) -> Result<Verification> {
    match msg {
        Message::Done(v) => Ok(v),
        other => Err(crate::session::unexpected(
            "post-commit",
            "SocketsActive or Done",
            &other,
        )),
    }
}

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
        let early = self.hand_over(&mut report, !postcopy.is_empty());
        drop(commit_span);
        let outcome = match early {
            // The destination ended (or gave up) while this side waited for
            // its sockets: nothing is left to serve.
            Some(msg) => ended_early(msg),
            None => contain("after Commit", true, || {
                self.after_commit(&layout, postcopy, &mut report)
            }),
        };
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
    /// Returns a `Done` or `Abort` that arrived while this side waited for
    /// `SocketsActive` (see [`SourceConfig::activation_wait`]).
    fn hand_over(&mut self, report: &mut SourceReport, postcopy: bool) -> Option<Message> {
        if let Err(e) = contain("in the program's `committed`", true, || {
            self.program.committed();
            Ok(())
        }) {
            warn!(error = %e, "after Commit: the program's `committed` failed");
            report.warnings.push(e.to_string());
        }
        // The re-injection of the held packets, the sockets' close and the
        // digest pass wait until the destination's sockets are active: on a
        // shared host they would take CPU from that activation, and packets
        // sent earlier wait in the destination's lock anyway. Post-copy
        // serves its requests at once instead.
        let wait = self.config.activation_wait;
        let early = if postcopy || report.sockets == 0 || wait.is_zero() {
            None
        } else {
            self.await_sockets_active(report, wait)
        };
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
        early
    }

    /// Wait (at most `wait`) for the destination's `SocketsActive`. A
    /// `Done` or `Abort` ends the wait and is returned; another message is
    /// dropped with a warning (as after `Commit`); silence or a broken
    /// channel ends it with a warning (the release goes on regardless).
    fn await_sockets_active(
        &mut self,
        report: &mut SourceReport,
        wait: Duration,
    ) -> Option<Message> {
        let started = Instant::now();
        let until = started + wait;
        // Bounded by `until`.
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    wait_ms = wait.as_secs_f64() * 1e3,
                    "after Commit: no SocketsActive within the bound: releasing the sockets"
                );
                report.warnings.push(format!(
                    "the destination did not say its sockets were active within {wait:?}"
                ));
                return None;
            }
            match self.channel.recv(Some(left)) {
                Ok(Some(Message::SocketsActive)) => {
                    debug!(
                        waited_ms = started.elapsed().as_secs_f64() * 1e3,
                        "after Commit: the destination's sockets are active"
                    );
                    return None;
                }
                Ok(Some(m @ (Message::Done(_) | Message::Abort { .. }))) => return Some(m),
                // At most a few: a peer's flood must not grow the report.
                Ok(Some(other)) if report.warnings.len() < MAX_WAIT_WARNINGS => {
                    report.warnings.push(format!(
                        "after Commit: ignored an unexpected {} from the destination",
                        other.name()
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "after Commit: waiting for SocketsActive failed");
                    report
                        .warnings
                        .push(format!("waiting for SocketsActive: {e}"));
                    return None;
                }
            }
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
