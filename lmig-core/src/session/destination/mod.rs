//! The destination side: place pages, restore sockets and state, resume on `Commit`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use super::{contain, reconnect_within, recv_within, send_abort, unexpected};
use crate::error::{MigrationError, Result};
use crate::model::{PageRun, RegionLayout, RegionPages, SocketRecord};
use crate::protocol::{Handover, Message, PageBatch, PageData, RegionDigest, Verification};
use crate::traits::{
    Channel, Event, MemorySink, NoObserver, NoSockets, Observer, Phase, SocketSink, StateSink,
};
use crate::verify::{PageHashes, first_mismatch, page_hash};

/// Settings of a [`Destination`].
#[derive(Copy, Clone, Debug)]
pub struct DestinationConfig {
    /// Most time without any message from the source before giving up.
    pub idle_timeout: Duration,
    /// Post-copy: how often the fault thread checks whether post-copy ended.
    pub fault_poll: Duration,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            fault_poll: Duration::from_millis(20),
        }
    }
}

/// What the destination did.
#[derive(Clone, Debug)]
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
    pub handover_at: Option<Instant>,
    /// When the last page sent before `Commit` was placed.
    pub last_page_at: Option<Instant>,
    /// When `Ready` was sent.
    pub ready_at: Option<Instant>,
    /// When `Commit` arrived and the program was resumed.
    pub resumed_at: Option<Instant>,
    /// When every page was in place.
    pub complete_at: Option<Instant>,
    /// The digest check.
    pub verification: Verification,
    /// Errors after `Commit` that did not stop the program (e.g. a socket that
    /// could not leave repair mode).
    pub warnings: Vec<String>,
}

/// The destination side of one migration. See the [module docs](super).
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

/// How long the post-copy receive loop waits per `recv` before it checks
/// the link and its idle time.
const RECV_TICK: Duration = Duration::from_millis(20);
/// Unanswered fault requests remembered for repetition after a reconnect.
const MAX_OUTSTANDING: usize = 256;

/// State shared by the post-copy threads of the destination.
#[derive(Default)]
struct PostcopyLink {
    /// Post-copy is over: the fault and urgent threads stop.
    stop: AtomicBool,
    /// The fault or urgent thread failed: post-copy stops.
    failed: AtomicBool,
    /// Page requests sent (the program's network-bound faults).
    faults: AtomicU64,
    /// False while the channel is being re-established.
    up: AtomicBool,
    /// Reconnections done.
    reconnects: AtomicU64,
    /// Recent fault requests (repeated after a reconnect if still missing).
    outstanding: Mutex<Vec<PageRun>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Post-copy placement state shared by the thread placing pushed pages and
/// the one placing requested pages.
struct Placement {
    /// Pages neither placed nor claimed by a placement in progress.
    missing: RegionPages,
    /// Pages claimed from `missing` whose placement is in progress.
    placing: u64,
    hashes: PageHashes,
    counts: Counts,
    warnings: Vec<String>,
}

/// Most warnings kept about bad post-copy input.
const MAX_WARNINGS: usize = 64;

impl Placement {
    /// Every page is in place.
    fn complete(&self) -> bool {
        self.placing == 0 && self.missing.is_empty()
    }

    fn warn(&mut self, warning: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(warning);
        }
    }
}

/// Post-copy figures for the report.
#[derive(Default)]
struct Counts {
    pages_placed: u64,
    zero_pages: u64,
    bytes_received: u64,
    postcopy_pages: u64,
    duplicate_pages: u64,
}

impl Counts {
    fn add_to(&self, r: &mut DestinationReport) {
        r.pages_placed += self.pages_placed;
        r.zero_pages += self.zero_pages;
        r.bytes_received += self.bytes_received;
        r.postcopy_pages += self.postcopy_pages;
        r.duplicate_pages += self.duplicate_pages;
    }
}

/// Place a post-copy batch: only pages still missing, each once, claimed
/// under the lock and placed outside it (the other placing thread goes
/// on meanwhile). A batch outside the layout or of the wrong length is
/// dropped with a warning.
fn place_postcopy<M: MemorySink>(
    memory: &M,
    layout: &RegionLayout,
    shared: &Mutex<Placement>,
    batch: &PageBatch,
) -> Result<()> {
    let run = batch.run;
    let region = match layout.check_run(&run) {
        Err(e) => {
            lock(shared).warn(format!("post-copy: dropped a bad page batch: {e}"));
            return Ok(());
        }
        Ok(region) => region,
    };
    let ps = region.page_size as usize;
    if let PageData::Raw(d) = &batch.data {
        if d.len() as u64 != region.bytes(u64::from(run.count)) {
            lock(shared).warn(format!(
                "post-copy: dropped a bad page batch: {} bytes for {run}",
                d.len()
            ));
            return Ok(());
        }
    }
    let (subs, fresh) = {
        let mut sh = lock(shared);
        let set = sh.missing.get_mut(run.region)?;
        let subs: Vec<(u64, u64)> = set.runs_in(run.first, run.end()).collect();
        for &(f, c) in &subs {
            set.remove_range(f, c);
        }
        let fresh: u64 = subs.iter().map(|(_, c)| c).sum();
        sh.counts.duplicate_pages += u64::from(run.count) - fresh;
        sh.counts.postcopy_pages += fresh;
        sh.placing += fresh;
        (subs, fresh)
    };
    let placed = subs.iter().try_for_each(|&(f, c)| -> Result<()> {
        let sub = PageRun::new(run.region, f, c as u32);
        match &batch.data {
            PageData::Raw(data) => {
                let off = (f - run.first) as usize * ps;
                let bytes = &data[off..off + c as usize * ps];
                memory.write_pages(&sub, bytes)?;
                let hashes: Vec<u64> = bytes.chunks_exact(ps).map(page_hash).collect();
                let mut sh = lock(shared);
                sh.hashes.record_hashes(&sub, &hashes);
                sh.counts.bytes_received += bytes.len() as u64;
                sh.counts.pages_placed += c;
            }
            PageData::Zero => {
                memory.zero_pages(&sub)?;
                let mut sh = lock(shared);
                sh.hashes.record_zero(&sub);
                sh.counts.zero_pages += c;
                sh.counts.pages_placed += c;
            }
        }
        Ok(())
    });
    lock(shared).placing -= fresh;
    placed
}

/// After a reconnect in post-copy: place the whole messages the channel
/// read before the link broke and still holds, and return the pages still
/// missing. Asked for again in the `Resync`, those pages would arrive twice.
/// (The source pushes nothing new before the `Resync`.) A reply the urgent
/// thread places meanwhile may still be asked for again; it is then dropped
/// as a duplicate.
fn drain_queued<C: Channel, M: MemorySink>(
    channel: &C,
    memory: &M,
    layout: &RegionLayout,
    shared: &Mutex<Placement>,
    digests: &mut Option<Vec<RegionDigest>>,
) -> Result<RegionPages> {
    // Bounded: what was queued before the break, and the source sends
    // nothing until it has the `Resync`.
    while let Ok(Some(msg)) = channel.recv(Some(Duration::ZERO)) {
        match msg {
            Message::Pages(batch) => place_postcopy(memory, layout, shared, &batch)?,
            Message::Digests(d) => *digests = Some(d),
            other => lock(shared).warn(format!(
                "post-copy: ignored an unexpected {} from the source",
                other.name()
            )),
        }
    }
    Ok(lock(shared).missing.clone())
}

fn emit_phase(observer: &dyn Observer, phase: Phase) {
    observer.event(&Event::Phase {
        phase,
        at: Instant::now(),
    });
}

/// The thread restoring socket records while the session places pages.
struct Restorer<'scope> {
    batches: Option<mpsc::Sender<Vec<SocketRecord>>>,
    thread: Option<std::thread::ScopedJoinHandle<'scope, Result<()>>>,
}

impl<'scope> Restorer<'scope> {
    fn start<'env, K: SocketSink>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        sink: &'scope mut K,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Vec<SocketRecord>>();
        let thread = scope.spawn(move || {
            // Ends when the session drops the sender, or at the first error.
            for batch in rx {
                sink.restore(batch)?;
            }
            Ok(())
        });
        Self {
            batches: Some(tx),
            thread: Some(thread),
        }
    }

    fn restore(&mut self, batch: Vec<SocketRecord>) -> Result<()> {
        if let Some(tx) = &self.batches {
            if tx.send(batch).is_ok() {
                return Ok(());
            }
        }
        // The thread ended early: it failed.
        self.batches = None;
        Self::join(self.thread.take())
    }

    /// The restore's error as soon as it failed (the thread ends early only then).
    fn check(&mut self) -> Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            self.batches = None;
            return Self::join(self.thread.take());
        }
        Ok(())
    }

    /// Wait until every batch is restored.
    fn finish(mut self) -> Result<()> {
        self.batches = None;
        Self::join(self.thread.take())
    }

    fn join(thread: Option<std::thread::ScopedJoinHandle<'scope, Result<()>>>) -> Result<()> {
        let stopped = |why| MigrationError::backend("socket restore", why);
        match thread {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(stopped("the restoring thread panicked"))),
            None => Err(stopped("the restoring thread stopped")),
        }
    }
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

    /// Run the migration. `Ok` means the program was resumed here.
    pub fn run(mut self) -> Result<DestinationReport> {
        // A panic in a trait implementation before `Commit` fails the
        // attempt like any error: everything received is discarded and the
        // source told, so that it resumes.
        let (mut progress, handover) =
            match contain("before Commit", false, || self.before_commit()) {
                Ok(x) => x,
                Err(e) => {
                    self.phase(Phase::Aborted);
                    if !matches!(e, MigrationError::PeerAborted { .. }) {
                        send_abort(&self.channel, &e);
                    }
                    // Each step even if another panics.
                    let _ = contain("discarding the sockets", false, || {
                        self.sockets.discard();
                        Ok(())
                    });
                    let _ = contain("discarding the program", false, || {
                        self.program.discard();
                        Ok(())
                    });
                    let _ = contain("discarding the memory", false, || {
                        self.memory.discard();
                        Ok(())
                    });
                    self.channel.shutdown();
                    return Err(e);
                }
            };
        // Committed: from here on the program runs here, whatever happens;
        // a failure or a panic is reported, never undone.
        self.phase(Phase::Committed);
        if let Err(e) = contain("activating the sockets", true, || self.sockets.activate()) {
            progress
                .report
                .warnings
                .push(format!("activating sockets: {e}"));
        }
        if let Err(e) = contain("resuming the program", true, || self.program.resume()) {
            progress
                .report
                .warnings
                .push(format!("resuming the program: {e}"));
        }
        progress.report.resumed_at = Some(Instant::now());
        let verification = contain("after Commit", true, || {
            self.after_commit(&mut progress, &handover)
        })?;
        progress.report.verification = verification;
        self.channel.send(&Message::Done(verification))?;
        self.phase(Phase::Done);
        if let Verification::Mismatch(region) = verification {
            return Err(MigrationError::VerificationFailed { region });
        }
        Ok(progress.report)
    }

    fn before_commit(&mut self) -> Result<(Progress, Handover)> {
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
        let mut progress = Progress {
            early: Vec::new(),
            hashes: PageHashes::new(&layout),
            layout,
            placed_total: 0,
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
                verification: Verification::NotChecked,
                warnings: Vec::new(),
            },
        };
        for batch in std::mem::take(&mut early.batches) {
            Self::place(&self.memory, &mut progress, &batch, None)?;
        }
        let handover = self.receive(&mut progress)?;
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

    /// Pre-copy and the freeze: place pages, prepare and restore sockets,
    /// take the program's state, until `Handover` and every page it
    /// announced are in.
    ///
    /// Socket records are restored on their own thread from the first
    /// `Sockets` batch on, while this one places the last pages: in the
    /// freeze the two arrive together (the source captures while it sends
    /// them), and with many connections restoring is the longest step.
    fn receive(&mut self, progress: &mut Progress) -> Result<Handover> {
        let Self {
            channel,
            memory,
            program,
            sockets,
            observer,
            config,
        } = self;
        let idle = config.idle_timeout;
        let phase = |phase: Phase| emit_phase(&**observer, phase);
        let mut sockets = Some(sockets);
        std::thread::scope(|scope| -> Result<Handover> {
            let mut restorer: Option<Restorer<'_>> = None;
            let mut handover: Option<Handover> = None;
            let mut sockets_done = false;
            let mut frozen = false;
            let mut prepared = false;
            // Pages of the rounds whose `RoundEnd` arrived, and the most this
            // side has said (`Prepared`) it caught up with.
            let (mut announced, mut caught_up) = (0u64, 0u64);
            loop {
                if let Some(h) = &handover {
                    if progress.placed_total >= h.pages_total {
                        break;
                    }
                } else if prepared && announced > caught_up && progress.placed_total >= announced {
                    channel.send(&Message::Prepared {
                        placed: progress.placed_total,
                    })?;
                    caught_up = announced;
                }
                if let Some(r) = restorer.as_mut() {
                    r.check()?;
                }
                let msg = recv_within(&*channel, idle, "the source's pages")?;
                match msg {
                    Message::Pages(batch) => {
                        Self::place(memory, progress, &batch, None)?;
                        if let Some(h) = &handover {
                            if progress.placed_total > h.pages_total {
                                return Err(MigrationError::Protocol {
                                    phase: "freeze",
                                    expected: "no more pages than announced",
                                    got: format!(
                                        "{} pages, {} announced",
                                        progress.placed_total, h.pages_total
                                    ),
                                });
                            }
                        }
                    }
                    Message::RoundEnd(summary) => {
                        announced = announced.saturating_add(summary.pages);
                        phase(Phase::Precopy(summary.round));
                        observer.event(&Event::Progress {
                            pages: progress.report.pages_placed,
                            bytes: progress.report.bytes_received,
                            total_pages: progress.layout.total_pages(),
                        });
                    }
                    Message::SocketPlan(plan) if handover.is_none() && !prepared => {
                        if let Some(s) = sockets.as_mut() {
                            s.prepare(&plan)?;
                        }
                        channel.send(&Message::Prepared {
                            placed: progress.placed_total,
                        })?;
                        prepared = true;
                    }
                    Message::Sockets { records, last } if !sockets_done && handover.is_none() => {
                        if !frozen {
                            phase(Phase::Frozen);
                            frozen = true;
                        }
                        progress.report.sockets_restored += records.len() as u64;
                        // The sink validates each record and restores the
                        // valid ones; it decides whether a bad record fails
                        // the migration.
                        sockets_done = last;
                        if records.is_empty() {
                            continue;
                        }
                        let r = match (&mut restorer, sockets.take()) {
                            (Some(r), _) => r,
                            (None, Some(sink)) => restorer.insert(Restorer::start(scope, sink)),
                            (None, None) => unreachable!("the sink moves to the restorer once"),
                        };
                        r.restore(records)?;
                    }
                    Message::State(state) if handover.is_none() => {
                        state.validate()?;
                        program.restore(state)?;
                    }
                    Message::Handover(h) if handover.is_none() => {
                        progress.report.handover_at = Some(Instant::now());
                        if !h.postcopy.is_empty() {
                            let mut missing = RegionPages::empty(&progress.layout);
                            for run in &h.postcopy {
                                progress.layout.check_run(run)?;
                                missing.insert_run(run)?;
                            }
                            // Before `Ready`: the program is not running, so a
                            // failure here still aborts cleanly.
                            memory.begin_postcopy(&missing)?;
                        }
                        handover = Some(h);
                    }
                    other => {
                        return Err(unexpected(
                            "receiving",
                            "Pages, RoundEnd, SocketPlan, Sockets, State or Handover",
                            &other,
                        ));
                    }
                }
            }
            if let Some(r) = restorer {
                r.finish()?;
            }
            Ok(handover.expect("the loop ends only after Handover"))
        })
    }

    /// Place one batch. In post-copy (`missing` given), only pages still
    /// missing are placed; the others are counted as duplicates.
    fn place(
        memory: &M,
        progress: &mut Progress,
        batch: &PageBatch,
        missing: Option<&mut RegionPages>,
    ) -> Result<()> {
        let run = batch.run;
        let region = progress.layout.check_run(&run)?;
        let len = region.bytes(u64::from(run.count));
        if let PageData::Raw(data) = &batch.data {
            if data.len() as u64 != len {
                return Err(MigrationError::Protocol {
                    phase: "pages",
                    expected: "page data of the run's length",
                    got: format!("{} bytes for {run} ({len} expected)", data.len()),
                });
            }
        }
        let ps = region.page_size as usize;
        let place_run = |sub: PageRun, progress: &mut Progress| -> Result<()> {
            match &batch.data {
                PageData::Raw(data) => {
                    let off = (sub.first - run.first) as usize * ps;
                    let bytes = &data[off..off + sub.count as usize * ps];
                    memory.write_pages(&sub, bytes)?;
                    progress.hashes.record(&sub, bytes);
                    progress.report.bytes_received += bytes.len() as u64;
                }
                PageData::Zero => {
                    memory.zero_pages(&sub)?;
                    progress.hashes.record_zero(&sub);
                    progress.report.zero_pages += u64::from(sub.count);
                }
            }
            progress.report.pages_placed += u64::from(sub.count);
            Ok(())
        };
        match missing {
            None => {
                place_run(run, progress)?;
                progress.placed_total += u64::from(run.count);
            }
            Some(missing) => {
                let set = missing.get_mut(run.region)?;
                let subs: Vec<(u64, u64)> = set.runs_in(run.first, run.end()).collect();
                let fresh: u64 = subs.iter().map(|(_, c)| c).sum();
                progress.report.duplicate_pages += u64::from(run.count) - fresh;
                for (f, c) in subs {
                    let sub = PageRun::new(run.region, f, c as u32);
                    place_run(sub, progress)?;
                    set.remove_range(f, c);
                }
                progress.report.postcopy_pages += fresh;
            }
        }
        Ok(())
    }

    /// After `Commit`: post-copy until every page is in, then the digest check.
    ///
    /// Post-copy runs three threads: the fault thread turns the program's
    /// faults into `PageRequest`s on the urgent lane; the urgent thread
    /// places the replies as they arrive (with [`Channel::recv_urgent`], so a
    /// requested page never queues behind pushed ones, nor waits while this
    /// thread copies a pushed chunk); this thread places the pushed pages.
    /// Both placing threads claim the pages still missing under a short lock
    /// and place them outside it, so every page is placed once. A channel
    /// without `recv_urgent` delivers the replies here instead.
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
        let idle = self.config.idle_timeout;
        let mut missing = RegionPages::empty(&progress.layout);
        for run in &handover.postcopy {
            missing.insert_run(run)?;
        }
        let shared = Mutex::new(Placement {
            missing,
            placing: 0,
            hashes: std::mem::replace(
                &mut progress.hashes,
                PageHashes::new(&RegionLayout::default()),
            ),
            counts: Counts::default(),
            warnings: Vec::new(),
        });
        let layout = &progress.layout.clone();
        let mut digests = None;
        let placed_early = std::mem::take(&mut progress.early)
            .iter()
            .try_for_each(|batch| place_postcopy(&self.memory, layout, &shared, batch));
        let link = PostcopyLink::default();
        link.up.store(true, Ordering::Release);
        let mut result = placed_early;
        if result.is_ok() && !lock(&shared).complete() {
            self.phase(Phase::Postcopy);
            let poll = self.config.fault_poll;
            let memory = &self.memory;
            let channel = &self.channel;
            let link = &link;
            let shared = &shared;
            result = std::thread::scope(|s| -> Result<()> {
                let fault_thread = s.spawn(|| -> Result<()> {
                    let r = (|| {
                        while !link.stop.load(Ordering::Acquire) {
                            let Some(run) = memory.wait_fault(poll)? else {
                                continue;
                            };
                            link.faults.fetch_add(1, Ordering::Relaxed);
                            {
                                let mut o = lock(&link.outstanding);
                                if o.len() == MAX_OUTSTANDING {
                                    o.remove(0);
                                }
                                o.push(run);
                            }
                            if link.up.load(Ordering::Acquire)
                                && channel.send_urgent(&Message::PageRequest(run)).is_err()
                            {
                                // The main thread reconnects; the request is
                                // repeated after the resync.
                                link.up.store(false, Ordering::Release);
                            }
                        }
                        Ok(())
                    })();
                    if r.is_err() {
                        link.failed.store(true, Ordering::Release);
                    }
                    r
                });
                let urgent_thread = s.spawn(|| -> Result<()> {
                    let r = (|| {
                        while !link.stop.load(Ordering::Acquire) {
                            match channel.recv_urgent(poll) {
                                Ok(Some(Message::Pages(batch))) => {
                                    place_postcopy(memory, layout, shared, &batch)?;
                                }
                                Ok(Some(other)) => lock(shared).warn(format!(
                                    "post-copy: ignored an unexpected {} on the urgent lane",
                                    other.name()
                                )),
                                Ok(None) => {}
                                // Unsupported: replies come through `recv`;
                                // closed: the session is over.
                                Err(_) => break,
                            }
                        }
                        Ok(())
                    })();
                    if r.is_err() {
                        link.failed.store(true, Ordering::Release);
                    }
                    r
                });
                let placed = (|| -> Result<()> {
                    let mut quiet = Duration::ZERO;
                    while !lock(shared).complete() && !link.failed.load(Ordering::Acquire) {
                        if !link.up.load(Ordering::Acquire) {
                            self.recover(progress, link, "a page request failed", || {
                                drain_queued(channel, memory, layout, shared, &mut digests)
                            })?;
                            quiet = Duration::ZERO;
                        }
                        let msg = match channel.recv(Some(RECV_TICK)) {
                            Ok(Some(m)) => m,
                            Ok(None) => {
                                quiet += RECV_TICK;
                                if quiet >= idle {
                                    return Err(MigrationError::Timeout {
                                        waiting_for: "post-copy pages",
                                        after: idle,
                                    });
                                }
                                continue;
                            }
                            Err(e) => {
                                self.recover(progress, link, &e.to_string(), || {
                                    drain_queued(channel, memory, layout, shared, &mut digests)
                                })?;
                                quiet = Duration::ZERO;
                                continue;
                            }
                        };
                        quiet = Duration::ZERO;
                        match msg {
                            Message::Pages(batch) => {
                                place_postcopy(memory, layout, shared, &batch)?
                            }
                            Message::Digests(d) => digests = Some(d),
                            other => lock(shared).warn(format!(
                                "post-copy: ignored an unexpected {} from the source",
                                other.name()
                            )),
                        }
                    }
                    Ok(())
                })();
                link.stop.store(true, Ordering::Release);
                let faulted = fault_thread.join().expect("fault thread panicked");
                let urgent = urgent_thread.join().expect("urgent thread panicked");
                placed.and(urgent).and(faulted)
            });
            progress.report.network_faults = link.faults.load(Ordering::Relaxed);
        }
        let placement = shared.into_inner().unwrap_or_else(|p| p.into_inner());
        progress.hashes = placement.hashes;
        placement.counts.add_to(&mut progress.report);
        progress.report.warnings.extend(placement.warnings);
        result?;
        if !handover.postcopy.is_empty() {
            self.memory.end_postcopy()?;
        }
        let missing = placement.missing;
        progress.report.complete_at = Some(Instant::now());
        if !handover.verify {
            return Ok(Verification::NotChecked);
        }
        let theirs = match digests {
            Some(d) => d,
            None => {
                let mut quiet = Duration::ZERO;
                loop {
                    let msg = match self.channel.recv(Some(RECV_TICK)) {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            quiet += RECV_TICK;
                            if quiet >= idle {
                                return Err(MigrationError::Timeout {
                                    waiting_for: "Digests",
                                    after: idle,
                                });
                            }
                            continue;
                        }
                        Err(e) if !handover.postcopy.is_empty() => {
                            // The digests may have been lost with the link.
                            self.recover(progress, &link, &e.to_string(), || Ok(missing.clone()))?;
                            quiet = Duration::ZERO;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    quiet = Duration::ZERO;
                    match msg {
                        Message::Digests(d) => break d,
                        // Duplicates of post-copy pages may still be in flight.
                        Message::Pages(b) => {
                            progress.report.duplicate_pages += u64::from(b.run.count)
                        }
                        other => return Err(unexpected("verify", "Digests", &other)),
                    }
                }
            }
        };
        Ok(match first_mismatch(&progress.hashes.digests(), &theirs) {
            None => Verification::Verified,
            Some(region) => Verification::Mismatch(region),
        })
    }

    /// The channel broke during post-copy: reconnect (bounded by
    /// `idle_timeout`), take what `still_missing` says after the reconnect
    /// (it places what arrived before the break first), tell the source
    /// every page still missing, repeat the requests of unanswered faults.
    fn recover(
        &self,
        progress: &mut Progress,
        link: &PostcopyLink,
        why: &str,
        still_missing: impl FnOnce() -> Result<RegionPages>,
    ) -> Result<()> {
        link.up.store(false, Ordering::Release);
        let attempts = reconnect_within(&self.channel, self.config.idle_timeout, why)?;
        let missing = &still_missing()?;
        let runs: Vec<PageRun> = missing
            .sets()
            .flat_map(|(id, s)| s.runs().map(move |(f, c)| (id, f, c)))
            .flat_map(|(id, f, c)| {
                const MAX: u64 = 1 << 31;
                (0..c.div_ceil(MAX))
                    .map(move |i| PageRun::new(id, f + i * MAX, (c - i * MAX).min(MAX) as u32))
            })
            .collect();
        let count = missing.count();
        self.channel.send(&Message::Resync(runs))?;
        let again: Vec<PageRun> = lock(&link.outstanding)
            .iter()
            .filter(|r| {
                missing
                    .get(r.region)
                    .is_ok_and(|s| s.runs_in(r.first, r.end()).next().is_some())
            })
            .copied()
            .collect();
        for run in again {
            self.channel.send_urgent(&Message::PageRequest(run))?;
        }
        link.up.store(true, Ordering::Release);
        link.reconnects.fetch_add(1, Ordering::Relaxed);
        progress.report.warnings.push(format!(
            "post-copy: the channel broke ({why}); reconnected after {attempts} attempt(s), {count} pages resynced"
        ));
        Ok(())
    }
}
