//! The destination after `Commit`: post-copy placement (pushed pages,
//! requested pages, the program's faults) and recovery of a broken link.
//!
//! Post-copy runs two or three threads: the fault path (`roles.rs`) turns
//! the program's faults into `PageRequest`s on the urgent lane and places
//! the replies as they arrive (with [`Channel::recv_urgent`], so a
//! requested page never queues behind pushed ones, nor waits while the
//! session's thread copies a pushed chunk), in one thread that waits for
//! both or in two; the session's thread places the pushed pages. Both placing threads claim the
//! pages still missing under a short lock and place them outside it
//! ([`place_postcopy`]), so every page is placed once. A channel without
//! `recv_urgent` delivers the replies to the session's thread instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use self::roles::FaultThreads;
use super::settle::SettleFlag;
use super::{Destination, DestinationReport, Progress};
use crate::error::{MigrationError, Result};
use crate::model::{PageRun, RegionLayout, RegionPages};
use crate::protocol::{Handover, Message, PageBatch, PageData, RegionDigest};
use crate::session::pages::runs_of;
use crate::session::reconnect_within;
use crate::traits::{Channel, Event, MemorySink, Phase, SocketSink, StateSink};
use crate::verify::{PageHashes, page_hash};

mod roles;

/// How long the post-copy receive loop waits per `recv` before it checks
/// the link and its idle time.
pub(super) const RECV_TICK: Duration = Duration::from_millis(20);
/// Silence on the control lane, counted in [`RECV_TICK`]s: an error once
/// it lasted the idle timeout.
pub(super) struct Quiet {
    quiet: Duration,
    idle: Duration,
    waiting_for: &'static str,
}

impl Quiet {
    pub(super) fn new(idle: Duration, waiting_for: &'static str) -> Self {
        Self {
            quiet: Duration::ZERO,
            idle,
            waiting_for,
        }
    }

    /// A tick passed without a message.
    pub(super) fn tick(&mut self) -> Result<()> {
        self.quiet += RECV_TICK;
        if self.quiet >= self.idle {
            return Err(MigrationError::Timeout {
                waiting_for: self.waiting_for,
                after: self.idle,
            });
        }
        Ok(())
    }

    /// A message arrived (or the link was re-established).
    pub(super) fn reset(&mut self) {
        self.quiet = Duration::ZERO;
    }
}

/// Unanswered fault requests remembered for repetition after a reconnect.
const MAX_OUTSTANDING: usize = 256;
/// Most page requests sent in one write: after one fault, those already
/// waiting too (see `roles.rs`); as many as are remembered for
/// repetition. kvd parks about a thousand requests in its first pass after
/// resuming: at 64 a write, its clients' p99 was over 10 ms in 3 of 6 runs,
/// at 256 in none.
const REQUEST_BATCH: usize = MAX_OUTSTANDING;
/// Most warnings kept about bad post-copy input.
const MAX_WARNINGS: usize = 64;

/// State shared by the post-copy threads of the destination.
#[derive(Default)]
pub(super) struct PostcopyLink {
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
    /// A ring: the oldest goes when a new one comes and it is full.
    outstanding: Mutex<VecDeque<PageRun>>,
    /// The program's word that its parked work has run, for the source.
    settle: Arc<SettleFlag>,
}

impl PostcopyLink {
    /// A link that is up; `settle` is the program's word (see `settle.rs`).
    pub(super) fn new(settle: Arc<SettleFlag>) -> Self {
        let link = Self {
            settle,
            ..Self::default()
        };
        link.up.store(true, Ordering::Release);
        link
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Post-copy placement state shared by the thread placing pushed pages and
/// the one placing requested pages.
pub(super) struct Placement {
    /// Pages neither placed nor claimed by a placement in progress.
    pub missing: RegionPages,
    /// Pages claimed from `missing` whose placement is in progress.
    placing: u64,
    pub hashes: PageHashes,
    counts: Counts,
    pub warnings: Vec<String>,
}

impl Placement {
    /// Nothing placed yet; `missing` are the pages to come.
    pub(super) fn new(missing: RegionPages, hashes: PageHashes) -> Self {
        Self {
            missing,
            placing: 0,
            hashes,
            counts: Counts::default(),
            warnings: Vec::new(),
        }
    }

    /// Every page is in place.
    fn complete(&self) -> bool {
        self.placing == 0 && self.missing.is_empty()
    }

    /// Pages not in place yet (missing, or being placed).
    fn outstanding(&self) -> u64 {
        self.missing.count() + self.placing
    }

    fn warn(&mut self, warning: String) {
        if self.warnings.len() < MAX_WARNINGS {
            // Logged as kept: a peer's flood of bad input does not flood the log.
            warn!("{warning}");
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
pub(super) fn place_postcopy<M: MemorySink + ?Sized>(
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

/// What the post-copy threads of the destination share.
struct Service<'s, M, C> {
    memory: &'s M,
    channel: &'s C,
    layout: &'s RegionLayout,
    shared: &'s Mutex<Placement>,
    link: &'s PostcopyLink,
    /// How often the fault and urgent threads check whether post-copy ended.
    poll: Duration,
}

impl<'s, M: MemorySink, C: Channel> Service<'s, M, C> {
    fn place(&self, batch: &PageBatch) -> Result<()> {
        place_postcopy(self.memory, self.layout, self.shared, batch)
    }

    /// After a reconnect in post-copy: place the whole messages the channel
    /// read before the link broke and still holds, and return the pages still
    /// missing. Asked for again in the `Resync`, those pages would arrive twice.
    /// (The source pushes nothing new before the `Resync`.) A reply the urgent
    /// thread places meanwhile may still be asked for again; it is then dropped
    /// as a duplicate.
    fn drain_queued(&self, digests: &mut Option<Vec<RegionDigest>>) -> Result<RegionPages> {
        // Bounded: what was queued before the break, and the source sends
        // nothing until it has the `Resync`.
        while let Ok(Some(msg)) = self.channel.recv(Some(Duration::ZERO)) {
            match msg {
                Message::Pages(batch) => self.place(&batch)?,
                Message::Digests(d) => *digests = Some(d),
                other => lock(self.shared).warn(format!(
                    "post-copy: ignored an unexpected {} from the source",
                    other.name()
                )),
            }
        }
        Ok(lock(self.shared).missing.clone())
    }
}

impl<'a, C, M, P, K> Destination<'a, C, M, P, K>
where
    C: Channel,
    M: MemorySink,
    P: StateSink,
    K: SocketSink,
{
    /// Post-copy: place every page the handover left for after `Commit`
    /// (the early ones first), digests that arrive meanwhile into
    /// `digests`. Returns the pages still missing (none unless it failed).
    pub(super) fn postcopy(
        &mut self,
        progress: &mut Progress,
        handover: &Handover,
        link: &PostcopyLink,
        digests: &mut Option<Vec<RegionDigest>>,
    ) -> Result<RegionPages> {
        let mut missing = RegionPages::empty(&progress.layout);
        for run in &handover.postcopy {
            missing.insert_run(run)?;
        }
        let hashes = std::mem::replace(
            &mut progress.hashes,
            PageHashes::new(&RegionLayout::default()),
        );
        let shared = Mutex::new(Placement::new(missing, hashes));
        let layout = &progress.layout.clone();
        let service = Service {
            memory: &self.memory,
            channel: &self.channel,
            layout,
            shared: &shared,
            link,
            poll: self.config.fault_poll,
        };
        let mut result = std::mem::take(&mut progress.early)
            .iter()
            .try_for_each(|batch| service.place(batch));
        if result.is_ok() && !lock(&shared).complete() {
            self.phase(Phase::Postcopy);
            let one =
                (self.config.one_fault_thread).unwrap_or_else(|| self.memory.fault_wait_spins());
            result = std::thread::scope(|s| -> Result<()> {
                let threads = match FaultThreads::spawn(s, &service, one) {
                    Ok(threads) => threads,
                    Err(e) => {
                        link.stop.store(true, Ordering::Release);
                        return Err(e);
                    }
                };
                let placed = self.place_pushed(progress, &service, digests);
                link.stop.store(true, Ordering::Release);
                placed.and(threads.join())
            });
            progress.report.network_faults = link.faults.load(Ordering::Relaxed);
        }
        let placement = shared.into_inner().unwrap_or_else(|p| p.into_inner());
        progress.hashes = placement.hashes;
        placement.counts.add_to(&mut progress.report);
        progress.report.warnings.extend(placement.warnings);
        match result {
            // Every page arrived after all (placed by the other thread while
            // the link was down): nothing is missing, the digests decide.
            Err(MigrationError::PostcopyPaused { reason, .. }) if placement.missing.is_empty() => {
                warn!(reason = %reason, "post-copy: every page placed, then the source was lost");
                progress.report.warnings.push(format!(
                    "post-copy: every page placed, then the source was lost ({reason})"
                ));
                Ok(placement.missing)
            }
            // The count once every placing thread stopped: what stays missing.
            Err(MigrationError::PostcopyPaused {
                paused_for, reason, ..
            }) => Err(MigrationError::PostcopyPaused {
                missing_pages: placement.missing.count(),
                paused_for,
                reason,
            }),
            Err(e) => Err(e),
            Ok(()) => Ok(placement.missing),
        }
    }

    /// The session's thread in post-copy: place pushed pages (and replies
    /// of a channel without an urgent lane) until every page is in,
    /// recovering when the link breaks.
    fn place_pushed(
        &self,
        progress: &mut Progress,
        service: &Service<'_, M, C>,
        digests: &mut Option<Vec<RegionDigest>>,
    ) -> Result<()> {
        let (link, shared) = (service.link, service.shared);
        let mut quiet = Quiet::new(self.config.idle_timeout, "post-copy pages");
        while !lock(shared).complete() && !link.failed.load(Ordering::Acquire) {
            let outstanding = lock(shared).outstanding();
            if !link.up.load(Ordering::Acquire) {
                self.recover(progress, link, "a page request failed", outstanding, || {
                    service.drain_queued(digests)
                })?;
                quiet.reset();
            }
            let msg = match self.channel.recv(Some(RECV_TICK)) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    if let Err(silent) = quiet.tick() {
                        // Silence with pages missing: the source is treated
                        // as lost (it re-dials after a partition).
                        let why = silent.to_string();
                        self.recover(progress, link, &why, outstanding, || {
                            service.drain_queued(digests)
                        })?;
                        quiet.reset();
                    }
                    continue;
                }
                Err(e) => {
                    self.recover(progress, link, &e.to_string(), outstanding, || {
                        service.drain_queued(digests)
                    })?;
                    quiet.reset();
                    continue;
                }
            };
            quiet.reset();
            match msg {
                Message::Pages(batch) => service.place(&batch)?,
                Message::Digests(d) => *digests = Some(d),
                other => lock(shared).warn(format!(
                    "post-copy: ignored an unexpected {} from the source",
                    other.name()
                )),
            }
        }
        Ok(())
    }

    /// The channel broke during post-copy: reconnect (within
    /// `idle_timeout`; past it post-copy is paused, see [`Self::pause`]),
    /// take what `still_missing` says after the reconnect (it places what
    /// arrived before the break first), tell the source every page still
    /// missing, repeat the requests of unanswered faults. `outstanding`:
    /// the pages missing when the link broke.
    pub(super) fn recover(
        &self,
        progress: &mut Progress,
        link: &PostcopyLink,
        why: &str,
        outstanding: u64,
        still_missing: impl FnOnce() -> Result<RegionPages>,
    ) -> Result<()> {
        link.up.store(false, Ordering::Release);
        let attempts = match reconnect_within(&self.channel, self.config.idle_timeout, why) {
            Ok(attempts) => attempts,
            Err(lost) => self.pause(progress, why, outstanding, &lost)?,
        };
        let missing = &still_missing()?;
        let count = missing.count();
        self.channel.send(&Message::Resync(runs_of(missing)))?;
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
        warn!(
            why = why,
            attempts = attempts,
            resynced = count,
            "post-copy: the channel broke and was reconnected"
        );
        progress.report.warnings.push(format!(
            "post-copy: the channel broke ({why}); reconnected after {attempts} attempt(s), {count} pages resynced"
        ));
        Ok(())
    }

    /// The source stayed unreachable for `idle_timeout`: post-copy is
    /// paused. No page is filled in its place: threads touching a missing
    /// page stay blocked in the kernel. The observer hears
    /// [`Event::PostcopyPaused`]; reconnection goes on (a source, or a
    /// link, that comes back is taken up again) until
    /// [`DestinationConfig::pause_limit`](super::DestinationConfig::pause_limit).
    /// Returns the attempts it took, or [`MigrationError::PostcopyPaused`]
    /// (at once when nothing is missing, or the channel cannot reconnect).
    fn pause(
        &self,
        progress: &mut Progress,
        why: &str,
        missing_pages: u64,
        lost: &MigrationError,
    ) -> Result<u32> {
        let since = Instant::now();
        let reason = format!("{why}; {lost}");
        let paused = |reason: String| MigrationError::PostcopyPaused {
            missing_pages,
            paused_for: since.elapsed(),
            reason,
        };
        // Nobody answers faults while paused (nor after a pause that ends
        // in `PostcopyPaused`): the pages that are not missing must read
        // without a handler, so that only the touchers of missing pages
        // wait. A failure here costs availability, never a wrong page.
        if missing_pages > 0 {
            if let Err(e) = self.memory.hold_missing() {
                progress.report.warnings.push(format!(
                    "post-copy: making the placed pages readable for the pause: {e}"
                ));
            }
        }
        if missing_pages == 0 || matches!(lost, MigrationError::Unsupported { .. }) {
            return Err(paused(reason));
        }
        warn!(missing_pages = missing_pages, reason = %reason, "post-copy paused: the source is lost");
        self.observer.event(&Event::PostcopyPaused {
            missing_pages,
            reason: reason.clone(),
            at: since,
        });
        let mut attempts = 0u32;
        // Bounded by `pause_limit` (unbounded only when asked for).
        loop {
            if self
                .config
                .pause_limit
                .is_some_and(|limit| since.elapsed() >= limit)
            {
                return Err(paused(reason));
            }
            attempts += 1;
            match self.channel.reconnect() {
                Ok(()) => break,
                Err(e @ MigrationError::Unsupported { .. }) => return Err(paused(e.to_string())),
                Err(e) => {
                    debug!(attempt = attempts, error = %e, "paused post-copy: reconnection failed");
                    std::thread::sleep(PAUSED_RETRY)
                }
            }
        }
        let paused_for = since.elapsed();
        warn!(
            missing_pages = missing_pages,
            paused_ms = paused_for.as_secs_f64() * 1e3,
            "post-copy resumed: a source came back"
        );
        self.observer.event(&Event::PostcopyResumed {
            missing_pages,
            paused_for,
        });
        progress.report.warnings.push(format!(
            "post-copy: paused {paused_for:?} with {missing_pages} pages missing (source lost: {reason}); a source came back"
        ));
        Ok(attempts)
    }
}

/// Time between reconnection attempts while post-copy is paused.
const PAUSED_RETRY: Duration = Duration::from_millis(100);
