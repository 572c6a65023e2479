//! The source side: pre-copy rounds, the freeze, the commit, post-copy service.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::pages::{PageSender, Sent, lane_of};
use super::{contain, panicked, reconnect_within, recv_within, send_abort, unexpected};
use crate::error::{MigrationError, Result};
use crate::model::{PageRun, PageSet, RegionId, RegionLayout, RegionPages};
use crate::policy::{ConvergencePolicy, Decision, Policy, RoundStats};
use crate::protocol::{CHUNK_PAGES, Handover, Message, RoundSummary, Verification};
use crate::traits::{
    Channel, DirtyClearer, DirtyTracker, Event, MemorySource, NoObserver, NoSockets, Observer,
    Phase, SocketSource, StateSource,
};
use crate::verify::PageHashes;

/// How the source moves memory.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Pre-copy rounds until the policy freezes; a `Postcopy` decision is
    /// treated as `Freeze`.
    #[default]
    Precopy,
    /// Pre-copy rounds; when the policy says `Postcopy` (rounds stop
    /// converging), switch to post-copy for the pages still dirty.
    Hybrid,
    /// No rounds: freeze at once, resume at the destination, send every page after.
    Postcopy,
}

/// Settings of a [`Source`].
#[derive(Copy, Clone, Debug)]
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
    /// Most time a shrinking pre-copy round waits for the destination to
    /// place its pages (`Prepared{placed}`) before the policy decides: the
    /// policy then sees the end-to-end bandwidth, and a freeze does not
    /// include placing a backlog. The program runs meanwhile.
    pub catch_up_timeout: Duration,
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
            catch_up_timeout: Duration::from_millis(500),
        }
    }
}

/// What a finished (committed) migration did, seen from the source.
#[derive(Clone, Debug)]
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
    pub freeze_steps: Vec<(&'static str, Duration)>,
    /// Pages sent after `Commit` (post-copy).
    pub postcopy_pages: u64,
    /// Of those, pages sent because the destination asked for them.
    pub requested_pages: u64,
    /// Socket records captured.
    pub sockets: u64,
    /// Which dirty tracker ran.
    pub tracker: &'static str,
    /// When the program was paused.
    pub paused_at: Instant,
    /// When `Ready` arrived.
    pub ready_at: Instant,
    /// When the `Commit` frame was written.
    pub commit_at: Instant,
    /// From the start of the session to `Done`.
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
}

/// The source side of one migration. See the [module docs](super).
pub struct Source<'a, C, M, T, P, K = NoSockets> {
    channel: C,
    memory: M,
    tracker: T,
    program: P,
    sockets: K,
    policy: Box<dyn Policy + 'a>,
    observer: Box<dyn Observer + 'a>,
    config: SourceConfig,
}

/// What to undo if the migration fails before `Commit`.
#[derive(Default)]
struct Undo {
    tracking: bool,
    throttled: bool,
    paused: bool,
    sockets_frozen: bool,
}

/// How often the post-copy urgent thread checks whether the session ended.
const URGENT_TICK: Duration = Duration::from_millis(20);

/// Round number used for pages sent after `Commit`.
const POSTCOPY_ROUND: u32 = u32::MAX;

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
            observer: Box::new(NoObserver),
            config: SourceConfig::default(),
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
            observer: self.observer,
            config: self.config,
        }
    }

    /// Use this convergence policy.
    pub fn with_policy(mut self, policy: impl Policy + 'a) -> Self {
        self.policy = Box::new(policy);
        self
    }

    /// Report events to this observer.
    pub fn with_observer(mut self, observer: impl Observer + 'a) -> Self {
        self.observer = Box::new(observer);
        self
    }

    /// Use these settings.
    pub fn with_config(mut self, config: SourceConfig) -> Self {
        self.config = config;
        self
    }

    fn phase(&self, phase: Phase) {
        self.observer.event(&Event::Phase {
            phase,
            at: Instant::now(),
        });
    }

    /// Run the migration. See the [module docs](super) for what `Ok` and `Err` mean.
    pub fn run(mut self) -> Result<SourceReport> {
        let start = Instant::now();
        let layout = self.memory.layout();
        let mut report = SourceReport {
            mode: self.config.mode,
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
            tracker: self.tracker.name(),
            paused_at: start,
            ready_at: start,
            commit_at: start,
            total: Duration::ZERO,
            verification: Verification::NotChecked,
            warnings: Vec::new(),
        };
        let mut undo = Undo::default();
        // A panic in a trait implementation before `Commit` fails the
        // attempt like any error: the abort resumes the program.
        let postcopy = match contain("before Commit", false, || {
            self.before_commit(&layout, &mut undo, &mut report)
        }) {
            Ok(postcopy) => postcopy,
            Err(e) => return Err(self.abort(&undo, e)),
        };
        // The commit point: if the frame cannot be written completely, the
        // destination cannot have it and we may still resume here.
        if let Err(e) = contain("sending Commit", false, || {
            self.channel.send(&Message::Commit)
        }) {
            return Err(self.abort(&undo, e));
        }
        report.commit_at = Instant::now();
        self.phase(Phase::Committed);
        // From here on the destination owns the program: a failure or a
        // panic is reported, never undone.
        if let Err(e) = contain("in the program's `committed`", true, || {
            self.program.committed();
            Ok(())
        }) {
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
            report
                .warnings
                .push(format!("releasing the source sockets: {e}"));
        }
        let outcome = contain("after Commit", true, || {
            self.after_commit(&layout, postcopy, &mut report)
        });
        if let Err(e) = contain("stopping the dirty tracker", true, || self.tracker.stop()) {
            report
                .warnings
                .push(format!("stopping the dirty tracker: {e}"));
        }
        report.total = start.elapsed();
        match outcome {
            Ok(verification) => {
                report.verification = verification;
                self.memory.release();
                self.phase(Phase::Done);
                Ok(report)
            }
            Err(e @ MigrationError::Panicked { .. }) => Err(e),
            Err(e) => Err(MigrationError::CommitUnconfirmed {
                detail: e.to_string(),
            }),
        }
    }

    /// Everything up to `Ready`. Returns the pages left for post-copy.
    fn before_commit(
        &mut self,
        layout: &RegionLayout,
        undo: &mut Undo,
        report: &mut SourceReport,
    ) -> Result<RegionPages> {
        self.phase(Phase::Setup);
        self.channel.send(&Message::Regions(layout.clone()))?;
        // Always sent (possibly empty): the destination answers it with
        // `Prepared` once regions and sockets are ready.
        let plan = self.sockets.plan()?;
        self.channel.send(&Message::SocketPlan(plan))?;
        let mut prepared = false;
        // Pages the destination said it placed (`Prepared{placed}`).
        let mut placed = 0u64;
        let prepared_by = Instant::now() + self.config.ready_timeout;
        undo.tracking = true;
        self.tracker.start()?;

        let mode = self.config.mode;
        let mut to_send = if mode == Mode::Postcopy {
            RegionPages::empty(layout)
        } else {
            RegionPages::full(layout)
        };
        // Pages that may hold data; the others are sent as zero without
        // being read (free memory the program never touched). Asked after
        // the tracker started, so a page written from here on is its.
        let populated = if mode != Mode::Postcopy {
            let mut pages = RegionPages::empty(layout);
            self.memory.populated(&mut pages)?.then_some(pages)
        } else {
            None
        };
        // Round 0 marks each run clean right before reading it: a page the
        // program wrote before its read went out fresh and is not resent.
        let clearer = if mode != Mode::Postcopy {
            self.tracker.clearer()
        } else {
            None
        };
        let mut dirty = RegionPages::empty(layout);
        let mut round = 0u32;
        let mut postcopy = mode == Mode::Postcopy;
        let mut throttle_refused = false;
        let precopy = mode != Mode::Postcopy;
        while precopy && round < u32::MAX - 1 {
            self.phase(Phase::Precopy(round));
            let t0 = Instant::now();
            let sent = send_set(
                &self.memory,
                &self.channel,
                self.config.batch_pages,
                layout,
                &to_send,
                round,
                FirstRound {
                    populated: populated.as_ref(),
                    clearer: clearer.as_deref(),
                }
                .only_if(round == 0),
            )?;
            dirty.clear();
            self.tracker.collect(&mut dirty)?;
            let dirty_pages = dirty.count();
            let dirty_bytes: u64 = dirty
                .sets()
                .map(|(id, s)| layout.get(id).map(|r| r.bytes(s.count())).unwrap_or(0))
                .sum();
            self.channel.send(&Message::RoundEnd(RoundSummary {
                round,
                pages: sent.pages,
                zero_pages: sent.zero_pages,
                dirty_pages,
            }))?;
            // Bounded: the destination sends one `Prepared` per round at most.
            for _ in 0..=round + 1 {
                match self.check_peer("pre-copy")? {
                    Some(p) => (prepared, placed) = (true, placed.max(p)),
                    None => break,
                }
            }
            report.pages_sent += sent.pages;
            // While the rounds shrink (less got dirty than was sent, by half),
            // a round after the first ends when the destination placed it:
            // the bandwidth the policy sees is then the one a freeze gets,
            // and the freeze does not include placing a backlog. When they do
            // not shrink, waiting would only let more pages get dirty: the
            // pipeline stays full (and after the first, full copy, unless
            // the policy freezes right then).
            let shrinking = dirty_bytes.saturating_mul(2) <= sent.bytes;
            if prepared && shrinking && round > 0 {
                self.catch_up(report.pages_sent, &mut placed)?;
            }
            let elapsed = t0.elapsed();
            report.zero_pages += sent.zero_pages;
            report.bytes_sent += sent.bytes;
            let stats = RoundStats {
                round,
                pages_sent: sent.pages,
                zero_pages: sent.zero_pages,
                bytes_sent: sent.bytes,
                elapsed,
                dirty_pages,
                dirty_bytes,
            };
            report.round_stats.push(stats);
            report.rounds = round + 1;
            self.observer.event(&Event::Round(stats));
            self.observer.event(&Event::Progress {
                pages: report.pages_sent,
                bytes: report.bytes_sent,
                total_pages: layout.total_pages(),
            });
            let decision = self.policy.decide(&stats, throttle_refused);
            report.decisions.push(decision);
            report.policy_reason = self.policy.explain();
            self.observer.event(&Event::Decision(decision));
            std::mem::swap(&mut to_send, &mut dirty);
            match decision {
                Decision::Continue => {}
                Decision::Throttle { percent } => {
                    undo.throttled = true;
                    throttle_refused = !self.program.throttle(percent);
                }
                Decision::Freeze | Decision::Postcopy if !prepared => {
                    // Never freeze before the destination is ready (its
                    // pre-faulting would land in the freeze): keep sending
                    // what gets dirty while waiting.
                    if let Some(p) = self.wait_prepared(Duration::from_millis(10), prepared_by)? {
                        (prepared, placed) = (true, placed.max(p));
                    }
                }
                Decision::Freeze | Decision::Postcopy => {
                    // Right after the first, full copy: its backlog first
                    // (a no-op once a shrinking round caught up).
                    if shrinking {
                        self.catch_up(report.pages_sent, &mut placed)?;
                    }
                    if decision == Decision::Postcopy {
                        postcopy = mode == Mode::Hybrid;
                        report.switched_to_postcopy = postcopy;
                    }
                    break;
                }
            }
            round += 1;
        }
        while !prepared {
            prepared = self
                .wait_prepared(self.config.ready_timeout, prepared_by)?
                .is_some();
        }

        // The freeze.
        self.phase(Phase::Frozen);
        report.paused_at = Instant::now();
        undo.paused = true;
        let mut lap = report.paused_at;
        let mut step = |name: &'static str, steps: &mut Vec<(&'static str, Duration)>| {
            let now = Instant::now();
            steps.push((name, now - lap));
            lap = now;
        };
        self.program.pause()?;
        step("pause program", &mut report.freeze_steps);
        undo.sockets_frozen = true;
        self.sockets.freeze()?;
        step("freeze sockets", &mut report.freeze_steps);
        // The sockets are captured (and restored at the destination, the
        // longest step with many connections) on their own thread while this
        // one collects and sends the last dirty pages.
        let (channel, memory, tracker) = (&self.channel, &self.memory, &mut self.tracker);
        let sockets = &mut self.sockets;
        let batch_pages = self.config.batch_pages;
        let (captured, pages) = std::thread::scope(|scope| {
            let capture = scope.spawn(move || {
                let mut count = 0u64;
                sockets.capture(&mut |records| {
                    count += records.len() as u64;
                    channel.send(&Message::Sockets {
                        records,
                        last: false,
                    })
                })?;
                channel.send(&Message::Sockets {
                    records: Vec::new(),
                    last: true,
                })?;
                Ok::<_, MigrationError>(count)
            });
            let pages = (|| -> Result<Vec<PageRun>> {
                dirty.clear();
                tracker.collect(&mut dirty)?;
                step("final collect", &mut report.freeze_steps);
                to_send.union_with(&dirty);
                if mode == Mode::Postcopy {
                    to_send = RegionPages::full(layout);
                }
                let postcopy_runs: Vec<PageRun> = if postcopy {
                    to_send
                        .sets()
                        .flat_map(|(id, s)| s.runs().map(move |(f, c)| (id, f, c)))
                        .flat_map(|(id, f, c)| split_u32(id, f, c))
                        .collect()
                } else {
                    let sent = send_set(
                        memory,
                        channel,
                        batch_pages,
                        layout,
                        &to_send,
                        round + 1,
                        FirstRound::default(),
                    )?;
                    report.pages_sent += sent.pages;
                    report.zero_pages += sent.zero_pages;
                    report.bytes_sent += sent.bytes;
                    report.freeze_pages = sent.pages;
                    to_send.clear();
                    Vec::new()
                };
                step("final pages", &mut report.freeze_steps);
                Ok(postcopy_runs)
            })();
            let captured = capture
                .join()
                .unwrap_or_else(|p| Err(panicked("in the socket capture", false, &*p)));
            (captured, pages)
        });
        let postcopy_runs = pages?;
        report.sockets = captured?;
        // The part of the capture that outlasted the pages.
        step("capture sockets", &mut report.freeze_steps);
        let state = self.program.capture()?;
        state.validate()?;
        self.channel.send(&Message::State(state))?;
        self.channel.send(&Message::Handover(Handover {
            pages_total: report.pages_sent,
            postcopy: postcopy_runs,
            verify: self.config.verify,
        }))?;
        step("state and handover", &mut report.freeze_steps);

        self.phase(Phase::AwaitReady);
        // A `Prepared` the destination sent before it saw the freeze may come
        // first (at most one per round).
        for left in (0..=report.rounds + 1).rev() {
            match recv_within(&self.channel, self.config.ready_timeout, "Ready")? {
                Message::Ready => break,
                Message::Prepared { .. } if left > 0 => {}
                other => return Err(unexpected("await-ready", "Ready", &other)),
            }
        }
        report.ready_at = Instant::now();
        step("wait for Ready", &mut report.freeze_steps);
        Ok(to_send)
    }

    /// During pre-copy the destination only says `Prepared`; anything else
    /// (an `Abort`) ends the migration. Returns what a `Prepared` said, if one arrived.
    fn check_peer(&self, phase: &'static str) -> Result<Option<u64>> {
        match self.channel.recv(Some(Duration::ZERO))? {
            None => Ok(None),
            Some(Message::Prepared { placed }) => Ok(Some(placed)),
            Some(msg) => Err(unexpected(phase, "Prepared or nothing", &msg)),
        }
    }

    /// Before the freeze: wait (at most [`SourceConfig::catch_up_timeout`])
    /// until the destination says it placed the `sent` pages, so the freeze
    /// does not include placing a backlog.
    fn catch_up(&self, sent: u64, placed: &mut u64) -> Result<()> {
        let deadline = Instant::now() + self.config.catch_up_timeout;
        // Bounded by the deadline.
        while *placed < sent {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.channel.recv(Some(deadline - now))? {
                None => break,
                Some(Message::Prepared { placed: p }) => *placed = (*placed).max(p),
                Some(msg) => return Err(unexpected("pre-copy", "Prepared", &msg)),
            }
        }
        Ok(())
    }

    /// Wait up to `wait` for `Prepared`; an error once `deadline` passed.
    fn wait_prepared(&self, wait: Duration, deadline: Instant) -> Result<Option<u64>> {
        let now = Instant::now();
        if now >= deadline {
            return Err(MigrationError::Timeout {
                waiting_for: "Prepared (the destination mapping its regions)",
                after: self.config.ready_timeout,
            });
        }
        match self.channel.recv(Some(wait.min(deadline - now)))? {
            None => Ok(None),
            Some(Message::Prepared { placed }) => Ok(Some(placed)),
            Some(msg) => Err(unexpected("pre-copy", "Prepared", &msg)),
        }
    }

    /// Undo everything and resume the program here. Returns the error to report.
    fn abort(&mut self, undo: &Undo, err: MigrationError) -> MigrationError {
        self.phase(Phase::Aborted);
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
            let _ = contain("lifting the throttle", false, || {
                self.program.throttle(100);
                Ok(())
            });
        }
        if undo.paused {
            if let Err(e) = contain("in the program's resume", false, || self.program.resume()) {
                failed.get_or_insert(("program resume", e));
            }
        }
        if undo.tracking {
            let _ = contain("stopping the dirty tracker", false, || self.tracker.stop());
        }
        match failed {
            None => err,
            Some((what, e)) => {
                MigrationError::backend(what, format!("{e} (after the migration failed: {err})"))
            }
        }
    }

    /// After `Commit`: post-copy service, digests, wait for `Done`.
    ///
    /// A pusher thread sends the queue ([`PushQueue`]: around recent faults
    /// first, then in address order) on the data lanes; this thread answers
    /// `PageRequest`s on the urgent lane before anything else.
    ///
    /// Recovery: when the channel breaks (a `recv` error here or a send
    /// error in the pusher), the pusher pauses, this thread calls
    /// [`Channel::reconnect`] (retried until `done_timeout`) and waits for
    /// the destination's `Resync(missing)`: exactly those runs go back into
    /// the queue (pages the destination has are never sent again), the
    /// digests are sent again if they were, and the pusher resumes.
    fn after_commit(
        &mut self,
        layout: &RegionLayout,
        unsent: RegionPages,
        report: &mut SourceReport,
    ) -> Result<Verification> {
        let postcopy = !unsent.is_empty();
        if postcopy {
            self.phase(Phase::Postcopy);
        }
        let push = Mutex::new(PushQueue::new(unsent));
        let gate = PushGate::new();
        let pushed = AtomicU64::new(0);
        let lanes = self.channel.data_lanes().max(1);
        let batch = self.config.batch_pages.clamp(1, CHUNK_PAGES);
        let small = self.config.push_pages.clamp(1, CHUNK_PAGES);
        // The last request named only pages already sent: the program
        // reads close behind the push (see `SourceConfig::push_pages`).
        let catching_up = AtomicBool::new(false);
        let verify = self.config.verify;
        let done_timeout = self.config.done_timeout;
        let memory = &self.memory;
        let channel = &self.channel;
        let observer = &self.observer;
        let total_pages = layout.total_pages();
        let mut warnings = Vec::new();

        // Requests served: counted by whichever thread serves them.
        let requested = Mutex::new(Sent::default());
        let heard = AtomicU64::new(0);
        let serving = AtomicBool::new(true);
        let serve_request = |sender: &mut PageSender<'_, M, C>, run: PageRun| {
            if layout.check_run(&run).is_err() {
                return;
            }
            let runs = push
                .lock()
                .expect("push queue poisoned")
                .take_requested(&run, batch);
            catching_up.store(runs.is_empty(), Ordering::Relaxed);
            for r in runs {
                match sender.send_run(r, POSTCOPY_ROUND, 0, true) {
                    Ok(sent) => requested
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .add(sent),
                    Err(_) => gate.broken(gate.epoch()),
                }
            }
        };
        let outcome = std::thread::scope(|s| -> Result<Verification> {
            // The memory stopped changing at the freeze: its digests are
            // taken beside the push instead of after it, where that pass
            // over all of memory came before `Done`.
            let mut digest_job =
                (verify && postcopy).then(|| s.spawn(|| PageHashes::of_memory(memory, layout)));
            let pusher = s.spawn(|| -> Result<Sent> {
                let mut sender = PageSender::new(memory, channel, layout);
                let mut total = Sent::default();
                let size = || {
                    if catching_up.load(Ordering::Relaxed) {
                        small
                    } else {
                        batch
                    }
                };
                while let Some((run, epoch)) = gate.next(&push, size()) {
                    // Flushed run by run: a faulting thread may wait for any of them.
                    match sender
                        .send_run(run, POSTCOPY_ROUND, lane_of(&run, lanes), false)
                        .and_then(|sent| channel.flush().map(|()| sent))
                    {
                        Ok(sent) => total.add(sent),
                        // Lost or not: the destination's `Resync` says.
                        Err(_) => gate.broken(epoch),
                    }
                    let n = pushed.fetch_add(u64::from(run.count), Ordering::Relaxed);
                    if n % 16384 < u64::from(run.count) {
                        observer.event(&Event::Progress {
                            pages: n,
                            bytes: total.bytes,
                            total_pages,
                        });
                    }
                }
                Ok(total)
            });

            // The urgent thread answers requests the moment they arrive,
            // never behind a message this thread is handling; with a channel
            // without `recv_urgent` this thread answers them.
            let urgent_thread = s.spawn(|| {
                let mut sender = PageSender::new(memory, channel, layout);
                while serving.load(Ordering::Acquire) {
                    match channel.recv_urgent(URGENT_TICK) {
                        Ok(Some(msg)) => {
                            heard.fetch_add(1, Ordering::Relaxed);
                            if let Message::PageRequest(run) = msg {
                                serve_request(&mut sender, run);
                            }
                        }
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            });
            let mut urgent = PageSender::new(memory, channel, layout);
            let mut digests: Option<Vec<crate::protocol::RegionDigest>> = None;
            let mut idle = Duration::ZERO;
            let mut last_heard = 0;
            let tick = Duration::from_millis(20);
            // A panic in the program's memory (read for the digests or a
            // request) must not leave the other threads serving forever:
            // it ends the service like an error, and they are stopped below.
            let serve = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                || -> Result<Verification> {
                    loop {
                        if verify && digests.is_none() && gate.pushed_all() {
                            let hashes = match digest_job.take() {
                                Some(job) => job.join().unwrap_or_else(|_| {
                                    Err(MigrationError::backend(
                                        "post-copy digests",
                                        "the hashing thread panicked",
                                    ))
                                })?,
                                None => PageHashes::of_memory(memory, layout)?,
                            };
                            let d = hashes.digests();
                            if channel.send(&Message::Digests(d.clone())).is_err() {
                                gate.broken(gate.epoch());
                            }
                            digests = Some(d);
                        }
                        if gate.is_broken() && !gate.is_reconnected() {
                            self.reconnect(&gate, &mut warnings, "a send failed")?;
                            idle = Duration::ZERO;
                        }
                        let msg = match channel.recv(Some(tick)) {
                            Ok(Some(m)) => m,
                            Ok(None) => {
                                idle += tick;
                                // Requests read by the urgent thread count as
                                // signs of life too.
                                let h = heard.load(Ordering::Relaxed);
                                if h != last_heard {
                                    last_heard = h;
                                    idle = Duration::ZERO;
                                }
                                if pusher.is_finished() {
                                    // The pusher failed; its error is reported below.
                                    return Ok(Verification::NotChecked);
                                }
                                if idle >= done_timeout {
                                    return Err(MigrationError::Timeout {
                                        waiting_for: "Done",
                                        after: done_timeout,
                                    });
                                }
                                continue;
                            }
                            Err(e) => {
                                if !postcopy {
                                    return Err(e);
                                }
                                gate.broken(gate.epoch());
                                self.reconnect(&gate, &mut warnings, &e.to_string())?;
                                idle = Duration::ZERO;
                                continue;
                            }
                        };
                        idle = Duration::ZERO;
                        match msg {
                            Message::PageRequest(run) => {
                                serve_request(&mut urgent, run);
                            }
                            Message::Resync(missing) => {
                                {
                                    let mut q = push.lock().expect("push queue poisoned");
                                    for run in missing {
                                        if layout.check_run(&run).is_ok() {
                                            q.requeue(&run);
                                        }
                                    }
                                }
                                if let Some(d) = &digests {
                                    if channel.send(&Message::Digests(d.clone())).is_err() {
                                        gate.broken(gate.epoch());
                                        continue;
                                    }
                                }
                                gate.resume();
                            }
                            Message::Done(v) => return Ok(v),
                            other => {
                                return Err(unexpected(
                                    "post-commit",
                                    "PageRequest or Done",
                                    &other,
                                ));
                            }
                        }
                    }
                },
            ))
            .unwrap_or_else(|p| Err(panicked("in the post-copy service", true, &*p)));
            gate.finish();
            serving.store(false, Ordering::Release);
            urgent_thread
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            let requested = *requested.lock().unwrap_or_else(|p| p.into_inner());
            let pushed_sent = pusher
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            report.postcopy_pages = pushed_sent.pages + requested.pages;
            report.requested_pages = requested.pages;
            report.pages_sent += pushed_sent.pages + requested.pages;
            report.zero_pages += pushed_sent.zero_pages + requested.zero_pages;
            report.bytes_sent += pushed_sent.bytes + requested.bytes;
            serve
        });
        report.warnings.extend(warnings);
        outcome
    }

    /// Re-establish a broken channel (bounded by `done_timeout`). The pusher
    /// stays paused until the destination's `Resync` arrives.
    fn reconnect(&self, gate: &PushGate, warnings: &mut Vec<String>, why: &str) -> Result<()> {
        let attempts = reconnect_within(&self.channel, self.config.done_timeout, why)?;
        gate.reconnected();
        warnings.push(format!(
            "post-copy: the channel broke ({why}); reconnected after {attempts} attempt(s)"
        ));
        Ok(())
    }
}

/// Coordinates the post-copy pusher with recovery: the pusher takes runs
/// only while the link is up, pauses when a send fails or the link breaks,
/// and resumes when the destination's `Resync` was applied.
struct PushGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Incremented at every resume; a send error of an older epoch is stale.
    epoch: u64,
    broken: bool,
    reconnected: bool,
    /// The queue ran empty (cleared by a requeue).
    pushed_all: bool,
    finished: bool,
}

impl PushGate {
    fn new() -> Self {
        Self {
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next run to push and the epoch it belongs to; waits (in bounded
    /// slices) while the link is down or the queue is empty; `None` once
    /// the session is over.
    fn next(&self, push: &Mutex<PushQueue>, max: u32) -> Option<(PageRun, u64)> {
        let mut st = self.lock();
        loop {
            if st.finished {
                return None;
            }
            if !st.broken {
                let run = push.lock().expect("push queue poisoned").next_run(max);
                match run {
                    Some(run) => return Some((run, st.epoch)),
                    None => st.pushed_all = true,
                }
            }
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// A send of `epoch` failed or the channel broke.
    fn broken(&self, epoch: u64) {
        let mut st = self.lock();
        if epoch == st.epoch && !st.broken {
            st.broken = true;
            st.reconnected = false;
        }
    }

    fn is_broken(&self) -> bool {
        self.lock().broken
    }

    fn is_reconnected(&self) -> bool {
        self.lock().reconnected
    }

    fn reconnected(&self) {
        self.lock().reconnected = true;
    }

    fn pushed_all(&self) -> bool {
        let st = self.lock();
        st.pushed_all && !st.broken
    }

    /// `Resync` applied: push again (the queue may have grown).
    fn resume(&self) {
        let mut st = self.lock();
        st.epoch += 1;
        st.broken = false;
        st.reconnected = false;
        st.pushed_all = false;
        self.cv.notify_all();
    }

    fn finish(&self) {
        self.lock().finished = true;
        self.cv.notify_all();
    }
}

/// What the first pre-copy round knows beyond the pages to send.
#[derive(Copy, Clone, Default)]
struct FirstRound<'a> {
    /// Pages that may hold data; the others read as zero
    /// ([`MemorySource::populated`]) and are sent as zero runs, unread.
    populated: Option<&'a RegionPages>,
    /// Marks a run clean right before it is read ([`DirtyTracker::clearer`]).
    clearer: Option<&'a dyn DirtyClearer>,
}

impl<'a> FirstRound<'a> {
    fn only_if(self, first: bool) -> Self {
        if first { self } else { Self::default() }
    }
}

/// Send every page of `set`, spreading chunks over the data lanes (one thread per lane).
fn send_set<M: MemorySource, C: Channel>(
    memory: &M,
    channel: &C,
    batch_pages: u32,
    layout: &RegionLayout,
    set: &RegionPages,
    round: u32,
    first: FirstRound<'_>,
) -> Result<Sent> {
    let FirstRound { populated, clearer } = first;
    let lanes = channel.data_lanes().max(1);
    let batch = batch_pages.clamp(1, CHUNK_PAGES);
    let send_lane = |lane: usize| -> Result<Sent> {
        let mut sender = PageSender::new(memory, channel, layout);
        let mut total = Sent::default();
        // With a clearer, two passes: first every zero page (tested in place
        // right after its run was cleared), then the pages holding data,
        // each cleared again right before it is read. The data is then read
        // in a short window at the end of the round, so fewer of its pages
        // are written after their read and sent again next round. Only
        // pages about to be tested or read are cleared: a page sent as zero
        // unread keeps what the tracker knows about it.
        let mut data_runs: Vec<PageRun> = Vec::new();
        let mut read = |sender: &mut PageSender<'_, M, C>, run: PageRun| -> Result<Sent> {
            let Some(c) = clearer else {
                return sender.send_run(run, round, lane, false);
            };
            c.clear(&run)?;
            match sender.send_zeros(run, round, lane, &mut data_runs)? {
                Some(sent) => Ok(sent),
                // The memory cannot test in place: one pass.
                None => sender.send_run(run, round, lane, false),
            }
        };
        for run in set.chunked_runs(batch) {
            if lane_of(&run, lanes) != lane {
                continue;
            }
            let Some(data) = populated.and_then(|p| p.get(run.region).ok()) else {
                total.add(read(&mut sender, run)?);
                continue;
            };
            let zero_run = |from: u64, to: u64| PageRun::new(run.region, from, (to - from) as u32);
            let mut at = run.first;
            for (first, count) in data.runs_in(run.first, run.end()) {
                if first > at {
                    total.add(sender.send_zero_run(zero_run(at, first), round, lane)?);
                }
                total.add(read(
                    &mut sender,
                    PageRun::new(run.region, first, count as u32),
                )?);
                at = first + count;
            }
            if at < run.end() {
                total.add(sender.send_zero_run(zero_run(at, run.end()), round, lane)?);
            }
        }
        if let Some(c) = clearer {
            for run in data_runs {
                c.clear(&run)?;
                total.add(sender.send_run(run, round, lane, false)?);
            }
        }
        Ok(total)
    };
    if lanes == 1 {
        let sent = send_lane(0)?;
        channel.flush()?;
        return Ok(sent);
    }
    let sent = std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|lane| s.spawn(move || send_lane(lane)))
            .collect();
        let mut total = Sent::default();
        let mut first_err = None;
        for h in handles {
            // A panic in the program's memory travels on with its message.
            match h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                Ok(sent) => total.add(sent),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        first_err.map_or(Ok(total), Err)
    })?;
    channel.flush()?;
    Ok(sent)
}

/// Split a run of up to 2^64 pages into runs whose count fits a `u32`.
fn split_u32(region: RegionId, first: u64, count: u64) -> impl Iterator<Item = PageRun> {
    const MAX: u64 = 1 << 31;
    (0..count.div_ceil(MAX)).map(move |i| {
        let f = first + i * MAX;
        PageRun::new(region, f, (count - i * MAX).min(MAX) as u32)
    })
}

/// Post-copy push order: pages around recent faults first ("bubbling" out
/// both ways from each pivot), then the rest in address order. Every page
/// leaves the queue exactly once.
struct PushQueue {
    unsent: RegionPages,
    pivots: Vec<Pivot>,
    cursor: (usize, u64),
}

struct Pivot {
    region: RegionId,
    fwd: u64,
    bwd: u64,
    forward_next: bool,
    limit: u64,
}

/// How far a pivot bubbles out before it is dropped.
const BUBBLE_PAGES: u64 = 8192;
/// Most pivots remembered at once.
const MAX_PIVOTS: usize = 8;

impl PushQueue {
    fn new(unsent: RegionPages) -> Self {
        Self {
            unsent,
            pivots: Vec::new(),
            cursor: (0, 0),
        }
    }

    /// Remove and return the first run of `set` inside `start..end`.
    fn take_in(
        set: &mut PageSet,
        start: u64,
        end: u64,
        max: u32,
        from_end: bool,
    ) -> Option<(u64, u64)> {
        let run = if from_end {
            set.runs_in(start, end).last()
        } else {
            set.runs_in(start, end).next()
        }?;
        let (mut f, mut c) = run;
        let max = u64::from(max);
        if from_end && c > max {
            f = f + c - max;
        }
        c = c.min(max);
        // Stay inside one chunk.
        let chunk = u64::from(CHUNK_PAGES);
        if from_end {
            let chunk_start = (f + c - 1) / chunk * chunk;
            if f < chunk_start {
                c -= chunk_start - f;
                f = chunk_start;
            }
        } else {
            c = c.min((f / chunk + 1) * chunk - f);
        }
        set.remove_range(f, c);
        Some((f, c))
    }

    fn next_run(&mut self, max: u32) -> Option<PageRun> {
        let window = u64::from(CHUNK_PAGES);
        while let Some(p) = self.pivots.last_mut() {
            let Ok(set) = self.unsent.get_mut(p.region) else {
                self.pivots.pop();
                continue;
            };
            let mut tries = 0;
            while tries < 2 * BUBBLE_PAGES / window {
                tries += 1;
                let forward = p.forward_next;
                p.forward_next = !p.forward_next;
                if forward && p.fwd < p.limit.saturating_add(BUBBLE_PAGES) && p.fwd < set.capacity()
                {
                    let end = p.fwd + window;
                    if let Some((f, c)) = Self::take_in(set, p.fwd, end, max, false) {
                        p.fwd = f + c;
                        return Some(PageRun::new(p.region, f, c as u32));
                    }
                    p.fwd = end;
                } else if !forward && p.bwd > p.limit.saturating_sub(BUBBLE_PAGES) && p.bwd > 0 {
                    let start = p.bwd.saturating_sub(window);
                    if let Some((f, c)) = Self::take_in(set, start, p.bwd, max, true) {
                        p.bwd = f;
                        return Some(PageRun::new(p.region, f, c as u32));
                    }
                    p.bwd = start;
                }
                let fwd_done =
                    p.fwd >= p.limit.saturating_add(BUBBLE_PAGES) || p.fwd >= set.capacity();
                let bwd_done = p.bwd <= p.limit.saturating_sub(BUBBLE_PAGES) || p.bwd == 0;
                if fwd_done && bwd_done {
                    break;
                }
            }
            self.pivots.pop();
        }
        // No pivot left: address order from the cursor.
        let regions: Vec<RegionId> = self.unsent.sets().map(|(id, _)| id).collect();
        while self.cursor.0 < regions.len() {
            let id = regions[self.cursor.0];
            let set = self.unsent.get_mut(id).expect("region from the same map");
            if let Some((f, c)) = Self::take_in(set, self.cursor.1, u64::MAX, max, false) {
                self.cursor.1 = f + c;
                return Some(PageRun::new(id, f, c as u32));
            }
            self.cursor = (self.cursor.0 + 1, 0);
        }
        // Pages re-queued behind the cursor (after a resync).
        self.cursor = (0, 0);
        let any = self.unsent.sets().any(|(_, s)| !s.is_empty());
        if any { self.next_run(max) } else { None }
    }

    /// The still-unsent pages of a requested run (removed from the queue),
    /// and a new pivot just after it.
    fn take_requested(&mut self, run: &PageRun, max: u32) -> Vec<PageRun> {
        let mut out = Vec::new();
        if let Ok(set) = self.unsent.get_mut(run.region) {
            while let Some((f, c)) = Self::take_in(set, run.first, run.end(), max, false) {
                out.push(PageRun::new(run.region, f, c as u32));
            }
        }
        if self.pivots.len() == MAX_PIVOTS {
            self.pivots.remove(0);
        }
        self.pivots.push(Pivot {
            region: run.region,
            fwd: run.end(),
            bwd: run.first,
            forward_next: true,
            limit: run.first,
        });
        out
    }

    /// Put pages back (the destination never received them).
    fn requeue(&mut self, run: &PageRun) {
        let _ = self.unsent.insert_run(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RegionInfo;

    fn queue(pages: u64) -> PushQueue {
        let layout = RegionLayout::new(vec![
            RegionInfo::new(RegionId(1), pages * 4096, 4096).unwrap(),
        ])
        .unwrap();
        PushQueue::new(RegionPages::full(&layout))
    }

    #[test]
    fn every_page_leaves_once() {
        let mut q = queue(1000);
        let mut seen = PageSet::new(1000);
        let mut n = 0;
        let req = q.take_requested(&PageRun::new(RegionId(1), 500, 1), 64);
        for r in &req {
            for p in r.first..r.end() {
                assert!(seen.insert(p));
            }
        }
        while let Some(r) = q.next_run(64) {
            n += 1;
            assert!(n < 10_000);
            assert!(
                r.count as u64 <= 64 && r.first / 64 == (r.end() - 1) / 64,
                "{r}"
            );
            for p in r.first..r.end() {
                assert!(seen.insert(p), "page {p} twice");
            }
        }
        assert_eq!(seen.count(), 1000);
    }

    #[test]
    fn pushes_around_the_fault_first() {
        let mut q = queue(100_000);
        q.take_requested(&PageRun::new(RegionId(1), 50_000, 1), 64);
        let first = q.next_run(64).unwrap();
        assert_eq!(first.first, 50_001);
        let second = q.next_run(64).unwrap();
        assert!(second.end() <= 50_000 && second.first >= 49_936, "{second}");
    }

    #[test]
    fn requested_pages_already_sent_are_not_resent() {
        let mut q = queue(128);
        let a = q.take_requested(&PageRun::new(RegionId(1), 10, 4), 64);
        assert_eq!(a, vec![PageRun::new(RegionId(1), 10, 4)]);
        let b = q.take_requested(&PageRun::new(RegionId(1), 8, 8), 64);
        assert_eq!(
            b,
            vec![
                PageRun::new(RegionId(1), 8, 2),
                PageRun::new(RegionId(1), 14, 2)
            ]
        );
    }
}
