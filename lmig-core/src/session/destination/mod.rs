//! The destination side: place pages, restore sockets and state, resume on `Commit`.
//!
//! [`Destination::run`] runs the phases in order, each a function: setup
//! and the wait for `Commit` (here), `receive` (pre-copy and the freeze,
//! [`receive`]), after `Commit` `postcopy` ([`postcopy`]) and `verify`
//! ([`verify`]).

mod commit;
mod postcopy;
mod receive;
mod settle;
#[cfg(test)]
mod tests;
mod verify;

use std::time::{Duration, Instant};

pub use self::commit::{AfterCommit, Resumption};
use self::commit::{AfterCommitWork, CommitErrors, Detached};
use self::postcopy::PostcopyLink;
use self::receive::place;
use super::{contain, recv_within, send_abort, unexpected};
use crate::error::{MigrationError, Result};
use crate::model::RegionLayout;
use crate::protocol::{Handover, Message, PageBatch, PageData, Verification};
use crate::traits::{
    Channel, Event, MemorySink, NoObserver, NoSockets, Observer, Phase, SocketSink, StateSink,
};
use crate::verify::PageHashes;

/// Settings of a [`Destination`]: `DestinationConfig::default()` and the
/// `with_*` setters (the struct is `#[non_exhaustive]`).
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub struct DestinationConfig {
    /// Most time without any message from the source before giving up.
    pub idle_timeout: Duration,
    /// Post-copy: how often the fault thread checks whether post-copy ended.
    pub fault_poll: Duration,
    /// Post-copy: once the source was unreachable for `idle_timeout`
    /// (post-copy *paused*: [`Event::PostcopyPaused`], touchers of missing
    /// pages blocked), how long to keep trying to reconnect before `run`
    /// returns [`MigrationError::PostcopyPaused`]; `None`: until the source
    /// comes back. Checked between reconnection attempts. Default 10 min.
    pub pause_limit: Option<Duration>,
    /// Receive and place the pre-copy rounds in the host's lowest CPU class
    /// (`None`, the default: not at all); see `receive.rs`'s `IdleReceive`.
    /// The hook moves every thread of this process there (`true`) or back
    /// (`false`) and says whether it did; `lmig_mem::cpu::idle_process` is
    /// one (Linux `SCHED_IDLE`). For a destination host that also serves
    /// (another migrated program, clients), or shares CPUs with the source:
    /// the first round, the full copy and most of pre-copy's work, then
    /// takes only the CPU the programs leave. Everything goes back when
    /// that round's `RoundEnd` arrives (the source waits for later rounds
    /// to be placed before its policy decides), when it lasts longer than
    /// [`Self::idle_round_limit`], at the freeze's first socket records or
    /// `Handover`, and when receiving ends either way.
    pub idle_receive: Option<fn(bool) -> bool>,
    /// The longest the first pre-copy round is received in the lowest class
    /// ([`Self::idle_receive`]); default 2 s.
    pub idle_round_limit: Duration,
    /// The most receive memory the source's socket queue estimate
    /// (`Message::QueueEstimate`) may make this side write ahead of the
    /// freeze ([`Channel::warm_receive`]; `StreamChannel` adds a quarter
    /// for the records' own fields and frame headers); a larger estimate is
    /// clamped to it, with a log line. Default 256 MiB; 0 never warms any
    /// (the freeze's large frames then get fresh memory).
    pub max_warm_receive: u64,
    /// Post-copy: one thread forwards the program's faults and places the
    /// replies, waiting for both in one `poll` (when the memory sink and
    /// the channel allow it: [`MemorySink::waits_fault_or`],
    /// [`Channel::urgent_fd`]); `false`: a fault thread and a reply thread.
    /// With the sink's fault spin (lmig-mem's `PostcopyOptions::spin`) the
    /// thread that sent a request is running when its reply comes.
    /// `None` (the default): one thread exactly when the sink spins
    /// ([`MemorySink::fault_wait_spins`]). Measured (docs/benchmarks.md,
    /// s14-fault): with a spinning sink one thread met the median-fault
    /// goal in 11 of 13 sequential runs against 5 of 13 and kept the p99
    /// lower; without the spin it gained nothing, and kvd (no spin, a
    /// thousand requests at once after the resume) came out a little later
    /// with it in most pairs.
    pub one_fault_thread: Option<bool>,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            fault_poll: Duration::from_millis(20),
            pause_limit: Some(Duration::from_secs(600)),
            idle_receive: None,
            idle_round_limit: Duration::from_secs(2),
            max_warm_receive: 256 << 20,
            one_fault_thread: None,
        }
    }
}

impl DestinationConfig {
    /// Sets [`idle_timeout`](Self::idle_timeout).
    #[must_use]
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`fault_poll`](Self::fault_poll).
    #[must_use]
    pub fn with_fault_poll(mut self, every: Duration) -> Self {
        self.fault_poll = every;
        self
    }

    /// Sets [`pause_limit`](Self::pause_limit) (a `Duration` or `None`).
    #[must_use]
    pub fn with_pause_limit(mut self, limit: impl Into<Option<Duration>>) -> Self {
        self.pause_limit = limit.into();
        self
    }

    /// Sets [`idle_receive`](Self::idle_receive).
    #[must_use]
    pub fn with_idle_receive(mut self, hook: Option<fn(bool) -> bool>) -> Self {
        self.idle_receive = hook;
        self
    }

    /// Sets [`idle_round_limit`](Self::idle_round_limit).
    #[must_use]
    pub fn with_idle_round_limit(mut self, limit: Duration) -> Self {
        self.idle_round_limit = limit;
        self
    }

    /// Sets [`max_warm_receive`](Self::max_warm_receive).
    #[must_use]
    pub fn with_max_warm_receive(mut self, bytes: u64) -> Self {
        self.max_warm_receive = bytes;
        self
    }

    /// Sets [`one_fault_thread`](Self::one_fault_thread).
    #[must_use]
    pub fn with_one_fault_thread(mut self, one: bool) -> Self {
        self.one_fault_thread = Some(one);
        self
    }

    /// The receive memory to warm for the source's queue `estimate`: at
    /// most [`max_warm_receive`](Self::max_warm_receive), clamped with a
    /// log line.
    pub(super) fn warm_bytes(&self, estimate: u64) -> u64 {
        if estimate > self.max_warm_receive {
            warn!(
                estimate = estimate,
                bound = self.max_warm_receive,
                "the source's socket queue estimate is above this destination's \
                 max_warm_receive: warming only the bound"
            );
        }
        estimate.min(self.max_warm_receive)
    }
}

/// What the destination did.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DestinationReport {
    /// Pages placed (every version, all phases).
    pub pages_placed: u64,
    /// Of which zero pages.
    pub zero_pages: u64,
    /// Page bytes received.
    pub bytes_received: u64,
    /// Socket records restored.
    pub sockets_restored: u64,
    /// Pages that arrived after `Commit` (post-copy).
    pub postcopy_pages: u64,
    /// Page requests sent because the program touched a missing page.
    pub network_faults: u64,
    /// Post-copy pages that arrived when already placed (dropped, not placed).
    pub duplicate_pages: u64,
    /// When `Handover` arrived (the source is frozen by then).
    /// Serialised as `handover_ms`, from the session's start (`handover_after`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub handover_at: Option<Instant>,
    /// When the last page sent before `Commit` was placed.
    /// Serialised as `last_page_ms`, from the session's start (`last_page_after`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub last_page_at: Option<Instant>,
    /// When `Ready` was sent.
    /// Serialised as `ready_ms`, from the session's start (`ready_after`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub ready_at: Option<Instant>,
    /// When `Commit` arrived and the program was resumed.
    /// Serialised as `resumed_ms`, from the session's start (`resumed_after`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub resumed_at: Option<Instant>,
    /// When every page was in place.
    /// Serialised as `complete_ms`, from the session's start (`complete_after`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub complete_at: Option<Instant>,
    /// From the session's start (its `run` or `start`) to `handover_at`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "handover_ms", with = "crate::serde_ms::option")
    )]
    pub handover_after: Option<Duration>,
    /// From the session's start (its `run` or `start`) to `last_page_at`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "last_page_ms", with = "crate::serde_ms::option")
    )]
    pub last_page_after: Option<Duration>,
    /// From the session's start (its `run` or `start`) to `ready_at`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "ready_ms", with = "crate::serde_ms::option")
    )]
    pub ready_after: Option<Duration>,
    /// From the session's start (its `run` or `start`) to `resumed_at`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "resumed_ms", with = "crate::serde_ms::option")
    )]
    pub resumed_after: Option<Duration>,
    /// From the session's start (its `run` or `start`) to `complete_at`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "complete_ms", with = "crate::serde_ms::option")
    )]
    pub complete_after: Option<Duration>,
    /// The digest check.
    pub verification: Verification,
    /// Errors after `Commit` that did not stop the program (e.g. a socket that
    /// could not leave repair mode).
    pub warnings: Vec<String>,
}

/// The destination side of one migration. See the [module docs](super).
#[must_use = "a Destination does nothing until it runs"]
pub struct Destination<'a, C, M, P, K = NoSockets> {
    channel: C,
    memory: M,
    program: P,
    sockets: K,
    observer: Box<dyn Observer + 'a>,
    config: DestinationConfig,
}

impl<'a, C, M, P> Destination<'a, C, M, P, NoSockets>
where
    C: Channel,
    M: MemorySink,
    P: StateSink,
{
    /// A destination without sockets or observer.
    pub fn new(channel: C, memory: M, program: P) -> Self {
        Self {
            channel,
            memory,
            program,
            sockets: NoSockets,
            observer: Box::new(NoObserver),
            config: DestinationConfig::default(),
        }
    }
}

fn emit_phase(observer: &dyn Observer, phase: Phase) {
    info!(side = "destination", phase = ?phase, "phase");
    observer.event(&Event::Phase {
        phase,
        at: Instant::now(),
    });
}

/// Pages that arrived before the control message they depend on.
#[derive(Default)]
struct EarlyPages {
    batches: Vec<PageBatch>,
    bytes: usize,
}

/// Most bytes of pages held while waiting for `Regions` or `Commit`.
const MAX_EARLY_BYTES: usize = 256 << 20;

impl EarlyPages {
    fn hold(&mut self, batch: PageBatch) -> Result<()> {
        if let PageData::Raw(d) = &batch.data {
            self.bytes += d.len();
        }
        self.bytes += 64;
        if self.bytes > MAX_EARLY_BYTES {
            return Err(MigrationError::Protocol {
                phase: "receiving",
                expected: "the control message the pages depend on",
                got: format!("over {MAX_EARLY_BYTES} bytes of pages before it"),
            });
        }
        self.batches.push(batch);
        Ok(())
    }
}

/// Mutable progress of the destination.
struct Progress {
    early: Vec<PageBatch>,
    layout: RegionLayout,
    hashes: PageHashes,
    placed_total: u64,
    report: DestinationReport,
    /// The session's start: what the report's `*_after` count from.
    started: Instant,
    /// The program's word that its parked work has run (post-copy).
    settle: std::sync::Arc<settle::SettleFlag>,
}

impl Progress {
    /// Nothing received yet into `layout`.
    fn new(layout: RegionLayout) -> Self {
        Self {
            early: Vec::new(),
            hashes: PageHashes::new(&layout),
            layout,
            placed_total: 0,
            started: Instant::now(),
            settle: Default::default(),
            report: DestinationReport {
                pages_placed: 0,
                zero_pages: 0,
                bytes_received: 0,
                sockets_restored: 0,
                postcopy_pages: 0,
                network_faults: 0,
                duplicate_pages: 0,
                handover_at: None,
                last_page_at: None,
                ready_at: None,
                resumed_at: None,
                complete_at: None,
                handover_after: None,
                last_page_after: None,
                ready_after: None,
                resumed_after: None,
                complete_after: None,
                verification: Verification::NotChecked,
                warnings: Vec::new(),
            },
        }
    }
}

impl Progress {
    /// The final report: the `*_at` instants also as durations from the start.
    fn finish(mut self) -> DestinationReport {
        info!(
            pages = self.report.pages_placed,
            network_faults = self.report.network_faults,
            verification = ?self.report.verification,
            warnings = self.report.warnings.len(),
            "migration in done"
        );
        let r = &mut self.report;
        let since = |at: Option<Instant>| at.map(|at| at.saturating_duration_since(self.started));
        r.handover_after = since(r.handover_at);
        r.last_page_after = since(r.last_page_at);
        r.ready_after = since(r.ready_at);
        r.resumed_after = since(r.resumed_at);
        r.complete_after = since(r.complete_at);
        self.report
    }
}

impl<'a, C, M, P, K> Destination<'a, C, M, P, K>
where
    C: Channel,
    M: MemorySink,
    P: StateSink,
    K: SocketSink,
{
    /// Restore sockets into this sink.
    pub fn with_sockets<K2: SocketSink>(self, sockets: K2) -> Destination<'a, C, M, P, K2> {
        Destination {
            channel: self.channel,
            memory: self.memory,
            program: self.program,
            sockets,
            observer: self.observer,
            config: self.config,
        }
    }

    /// Report events to this observer.
    pub fn with_observer(mut self, observer: impl Observer + 'a) -> Self {
        self.observer = Box::new(observer);
        self
    }

    /// Use these settings.
    pub fn with_config(mut self, config: DestinationConfig) -> Self {
        self.config = config;
        self
    }

    fn phase(&self, phase: Phase) {
        emit_phase(&*self.observer, phase);
    }

    /// Run the migration to its end: [`Destination::start_scoped`], then
    /// [`AfterCommit::join`]. `Ok` means the program was resumed here
    /// ([`StateSink::resume`]) and every page arrived. The program and the
    /// socket sink are dropped when it returns: lend them (`&mut`) to keep
    /// them, or use [`Destination::start`] to take them at `Commit`.
    pub fn run(self) -> Result<DestinationReport> {
        let Destination {
            channel,
            memory,
            program,
            sockets,
            observer,
            config,
        } = self;
        let lent = Destination {
            channel: &channel,
            memory: &memory,
            program,
            sockets,
            observer,
            config,
        };
        std::thread::scope(|scope| {
            let Resumption {
                program,
                sockets,
                after_commit,
                ..
            } = lent.start_scoped(scope)?;
            let report = after_commit.join();
            // As before this API: the sinks live until the end.
            drop((program, sockets));
            report
        })
    }

    /// Run the migration up to `Commit` and hand the program over on a
    /// thread of `scope`: like [`Destination::start`] for backends that
    /// are borrowed (the after-`Commit` thread is scoped).
    pub fn start_scoped<'scope, 'env>(
        self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
    ) -> Result<Resumption<'scope, P, K, M>>
    where
        'a: 'scope,
        C: 'scope,
        M: Clone + 'scope,
    {
        let (work, program, sockets, memory, errors) = self.commit()?;
        let settle = work.progress.settle.clone();
        let after_commit = AfterCommit::spawn_scoped(scope, work)?;
        Ok(Resumption::new(
            program,
            sockets,
            memory,
            errors,
            after_commit,
            &settle,
        ))
    }

    /// Up to `Commit` (discarding everything on a failure), then activate
    /// the sockets and resume the program. Returns what goes on after it
    /// and what goes back to the program.
    #[allow(clippy::type_complexity)]
    fn commit(mut self) -> Result<(AfterCommitWork<'a, C, M>, P, K, M, CommitErrors)>
    where
        M: Clone,
    {
        // A panic in a trait implementation before `Commit` fails the
        // attempt like any error: everything received is discarded and the
        // source told, so that it resumes.
        let (mut progress, handover) =
            match contain("before Commit", false, || self.before_commit()) {
                Ok(x) => x,
                Err(e) => {
                    self.discard(&e);
                    return Err(e);
                }
            };
        // Committed: from here on the program runs here, whatever happens;
        // a failure or a panic is reported, never undone.
        let _phase = phase_span!("commit");
        self.phase(Phase::Committed);
        let mut errors = CommitErrors::default();
        if let Err(e) = contain("activating the sockets", true, || self.sockets.activate()) {
            warn!(error = %e, "after Commit: activating the sockets failed");
            progress
                .report
                .warnings
                .push(format!("activating sockets: {e}"));
            errors.activation = Some(e);
        }
        self.say_sockets_active(&mut progress);
        if let Err(e) = contain("resuming the program", true, || self.program.resume()) {
            warn!(error = %e, "after Commit: resuming the program failed");
            progress
                .report
                .warnings
                .push(format!("resuming the program: {e}"));
            errors.resume = Some(e);
        }
        progress.report.resumed_at = Some(Instant::now());
        let Destination {
            channel,
            memory,
            program,
            sockets,
            observer,
            config,
        } = self;
        let work = AfterCommitWork {
            program_running: errors.resume.is_none(),
            session: Destination {
                channel,
                memory: memory.clone(),
                program: Detached,
                sockets: NoSockets,
                observer,
                config,
            },
            progress,
            handover,
        };
        Ok((work, program, sockets, memory, errors))
    }

    /// After the activation (whatever it returned: nothing is left to
    /// wait for): `SocketsActive`, with which the source re-injects the
    /// packets its lock held and closes its sockets now rather than while
    /// this side activates. Only when sockets came (the source waits only
    /// then); a failed send is a warning (the source's wait is bounded).
    fn say_sockets_active(&mut self, progress: &mut Progress) {
        if progress.report.sockets_restored == 0 {
            return;
        }
        if let Err(e) = self.channel.send(&Message::SocketsActive) {
            warn!(error = %e, "after Commit: telling the source the sockets are active failed");
            progress
                .report
                .warnings
                .push(format!("sending SocketsActive: {e}"));
        }
    }

    /// A failure before `Commit`: tell the source, drop what arrived.
    fn discard(&mut self, e: &MigrationError) {
        warn!(error = %e, "migration failed before Commit: discarding what arrived");
        self.phase(Phase::Aborted);
        if !matches!(e, MigrationError::PeerAborted { .. }) {
            send_abort(&self.channel, e);
        }
        // Each step even if another panics.
        if let Err(e) = contain("discarding the sockets", false, || {
            self.sockets.discard();
            Ok(())
        }) {
            warn!(error = %e, "discard: the socket sink panicked");
        }
        if let Err(e) = contain("discarding the program", false, || {
            self.program.discard();
            Ok(())
        }) {
            warn!(error = %e, "discard: the program panicked");
        }
        if let Err(e) = contain("discarding the memory", false, || {
            self.memory.discard();
            Ok(())
        }) {
            warn!(error = %e, "discard: the memory sink panicked");
        }
        self.channel.shutdown();
    }

    fn before_commit(&mut self) -> Result<(Progress, Handover)> {
        let started = Instant::now();
        let _session = phase_span!("destination");
        self.phase(Phase::Setup);
        let idle = self.config.idle_timeout;
        // Data lanes are separate streams: pages may overtake `Regions` on
        // the control lane. Hold them (bounded) until the layout is known.
        let mut early = EarlyPages::default();
        let layout = loop {
            match recv_within(&self.channel, idle, "Regions")? {
                Message::Regions(layout) => break layout,
                Message::Pages(batch) => early.hold(batch)?,
                other => return Err(unexpected("setup", "Regions", &other)),
            }
        };
        self.memory.prepare(&layout)?;
        let mut progress = Progress::new(layout);
        progress.started = started;
        for batch in std::mem::take(&mut early.batches) {
            place(&self.memory, &mut progress, &batch)?;
        }
        let handover = {
            let _phase = phase_span!("receive");
            self.receive(&mut progress)?
        };
        progress.report.last_page_at = Some(Instant::now());
        self.phase(Phase::AwaitReady);
        self.channel.send(&Message::Ready)?;
        progress.report.ready_at = Some(Instant::now());
        // Post-copy pages go out right after `Commit`, on other streams, and
        // may arrive first: hold them until `Commit` is here.
        let mut early = EarlyPages::default();
        loop {
            match recv_within(&self.channel, idle, "Commit")? {
                Message::Commit => break,
                Message::Pages(batch) if !handover.postcopy.is_empty() => early.hold(batch)?,
                other => return Err(unexpected("ready", "Commit", &other)),
            }
        }
        progress.early = early.batches;
        Ok((progress, handover))
    }

    /// After `Commit`: post-copy until every page is in, then the digest check.
    ///
    /// Recovery: when the channel breaks (a `recv` or `send` error), faulting
    /// threads simply stay blocked in the kernel; this thread calls
    /// [`Channel::reconnect`] (retried until `idle_timeout`), sends
    /// `Resync(every run still missing)` and repeats the requests of faults
    /// still unanswered; the source requeues exactly those runs. Pages that
    /// were in flight when the link broke and arrive anyway are placed once;
    /// later copies are counted in `duplicate_pages` and dropped.
    ///
    /// Bad input after `Commit` (pages outside a region, of the wrong length,
    /// not missing any more, unexpected messages) is dropped with a warning:
    /// the program already runs here, so it never aborts the migration.
    fn after_commit(
        &mut self,
        progress: &mut Progress,
        handover: &Handover,
    ) -> Result<Verification> {
        let link = PostcopyLink::new(progress.settle.clone());
        let mut digests = None;
        let missing = {
            let _phase = phase_span!("postcopy", runs = handover.postcopy.len());
            self.postcopy(progress, handover, &link, &mut digests)?
        };
        if !handover.postcopy.is_empty() {
            self.memory.end_postcopy()?;
        }
        progress.report.complete_at = Some(Instant::now());
        if !handover.verify {
            return Ok(Verification::NotChecked);
        }
        let _phase = phase_span!("verify");
        self.verify(progress, handover, &link, &missing, digests)
    }
}
