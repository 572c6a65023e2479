//! The destination before `Commit`: place the pre-copy and freeze pages,
//! prepare and restore the sockets, take the program's state, until
//! `Handover` and every page it announced are in.

use std::sync::mpsc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use super::{Destination, Progress, emit_phase};
use crate::error::{MigrationError, Result};
use crate::model::{RegionPages, SocketRecord};
use crate::protocol::{Handover, Message, PageBatch, PageData, RoundSummary};
use crate::session::{recv_within, spawn_named, unexpected};
use crate::traits::{Channel, Event, MemorySink, Phase, SocketSink, StateSink};

/// Where the receive loop stands.
#[derive(Default)]
struct Receiving {
    handover: Option<Handover>,
    /// The last `Sockets` batch arrived (a `last` from every data lane).
    sockets_done: bool,
    /// `Sockets{last: true}` still to come: one per data lane, as the
    /// source's batches travel on all of them (see its `freeze.rs`).
    socket_ends_left: usize,
    /// The first `Sockets` batch arrived (the source is frozen).
    frozen: bool,
    /// `SocketPlan` was handled and `Prepared` sent.
    prepared: bool,
    /// Pages of the rounds whose `RoundEnd` arrived.
    announced: u64,
    /// The most this side has said (`Prepared`) it caught up with.
    caught_up: u64,
}

impl Receiving {
    /// `Handover` arrived, every page it announced is placed and every
    /// socket batch is in (they may trail `Handover` on the data lanes).
    fn all_in(&self, progress: &Progress) -> bool {
        self.sockets_done
            && self
                .handover
                .as_ref()
                .is_some_and(|h| progress.placed_total >= h.pages_total)
    }

    /// Before `Handover`: every page of the rounds announced so far is
    /// placed and not said yet; noted as said (`Prepared{placed}` follows).
    fn caught_up_now(&mut self, progress: &Progress) -> bool {
        let now = self.handover.is_none()
            && self.prepared
            && self.announced > self.caught_up
            && progress.placed_total >= self.announced;
        if now {
            self.caught_up = self.announced;
        }
        now
    }

    /// After `Handover`, no more pages than it announced.
    fn check_not_over(&self, progress: &Progress) -> Result<()> {
        match &self.handover {
            Some(h) if progress.placed_total > h.pages_total => Err(MigrationError::Protocol {
                phase: "freeze",
                expected: "no more pages than announced",
                got: format!(
                    "{} pages, {} announced",
                    progress.placed_total, h.pages_total
                ),
            }),
            _ => Ok(()),
        }
    }
}

impl<'a, C, M, P, K> Destination<'a, C, M, P, K>
where
    C: Channel,
    M: MemorySink,
    P: StateSink,
    K: SocketSink,
{
    /// Pre-copy and the freeze: place pages, prepare and restore sockets,
    /// take the program's state, until `Handover` and every page it
    /// announced are in.
    ///
    /// Socket records are restored on their own thread ([`Restorer`]) from
    /// the first `Sockets` batch on, while this one places the last pages:
    /// in the freeze the two arrive together (the source captures while it
    /// sends them), and with many connections restoring is the longest step.
    ///
    /// One function of ~130 lines on purpose: its body is one loop over one
    /// `match` on the protocol's messages, each arm a few lines in the order
    /// the protocol allows; the state it shares (`st`, the restorer, the
    /// scope) would otherwise pass through every helper.
    pub(super) fn receive(&mut self, progress: &mut Progress) -> Result<Handover> {
        let Self {
            channel,
            memory,
            program,
            sockets,
            observer,
            config,
        } = self;
        let idle = config.idle_timeout;
        let mut lowest = IdleReceive::new(config.idle_receive, config.idle_round_limit);
        let phase = |phase: Phase| emit_phase(&**observer, phase);
        let mut sockets = Some(sockets);
        std::thread::scope(|scope| -> Result<Handover> {
            let mut restorer: Option<Restorer<'_>> = None;
            let mut st = Receiving {
                socket_ends_left: channel.data_lanes().max(1),
                ..Receiving::default()
            };
            let mut postcopy = None;
            loop {
                if st.all_in(progress) {
                    break;
                }
                if st.caught_up_now(progress) {
                    channel.send(&Message::Prepared {
                        placed: progress.placed_total,
                    })?;
                }
                if let Some(r) = restorer.as_mut() {
                    r.check()?;
                }
                lowest.check_time();
                match recv_within(&*channel, idle, "the source's pages")? {
                    Message::Pages(batch) => {
                        place(&*memory, progress, &batch)?;
                        st.check_not_over(progress)?;
                    }
                    Message::RoundEnd(summary) => {
                        lowest.round_ended(&summary);
                        st.announced = st.announced.saturating_add(summary.pages);
                        phase(Phase::Precopy(summary.round));
                        observer.event(&Event::Progress {
                            pages: progress.report.pages_placed,
                            bytes: progress.report.bytes_received,
                            total_pages: progress.layout.total_pages(),
                        });
                    }
                    Message::SocketPlan(plan) if st.handover.is_none() && !st.prepared => {
                        if let Some(s) = sockets.as_mut() {
                            s.prepare(&plan)?;
                        }
                        channel.send(&Message::Prepared {
                            placed: progress.placed_total,
                        })?;
                        st.prepared = true;
                    }
                    // Batches travel on the data lanes: they may trail `Handover`.
                    Message::Sockets { records, last } if !st.sockets_done => {
                        lowest.leave("the freeze");
                        if !st.frozen {
                            phase(Phase::Frozen);
                            st.frozen = true;
                        }
                        progress.report.sockets_restored += records.len() as u64;
                        // The sink validates each record and restores the
                        // valid ones; it decides whether a bad record fails
                        // the migration.
                        if last {
                            st.socket_ends_left -= 1;
                            st.sockets_done = st.socket_ends_left == 0;
                        }
                        if records.is_empty() {
                            continue;
                        }
                        let r = match (&mut restorer, sockets.take()) {
                            (Some(r), _) => r,
                            (None, Some(sink)) => restorer.insert(Restorer::spawn(scope, sink)?),
                            (None, None) => unreachable!("the sink moves to the restorer once"),
                        };
                        r.restore(records)?;
                    }
                    Message::QueueEstimate { bytes } => {
                        // On the control lane it may arrive after the first
                        // socket batches (data lanes): too late to warm.
                        if !st.frozen {
                            channel.warm_receive(config.warm_bytes(bytes));
                        }
                    }
                    Message::State(state) if st.handover.is_none() => {
                        state.validate()?;
                        program.restore(state)?;
                    }
                    Message::Handover(h) if st.handover.is_none() => {
                        lowest.leave("the freeze");
                        postcopy = handover_arrived(progress, &h)?;
                        st.handover = Some(h);
                    }
                    other => {
                        return Err(unexpected(
                            "receiving",
                            "Pages, RoundEnd, QueueEstimate, SocketPlan, Sockets, State or Handover",
                            &other,
                        ));
                    }
                }
            }
            // The freeze's socket batches are in: what they left unused
            // of the warmed receive memory goes back.
            channel.warm_receive(0);
            // Registered once every page sent before `Commit` is in (and
            // while the restorer finishes): the pages that trail the
            // `Handover` (the freeze's last pages, free ones as zero runs)
            // are placed the plain way, not claimed one by one through
            // the post-copy path.
            if let Some(missing) = postcopy {
                begin_postcopy(&*memory, &missing)?;
            }
            if let Some(r) = restorer {
                let waited = Instant::now();
                r.finish()?;
                debug!(
                    waited_ms = waited.elapsed().as_secs_f64() * 1e3,
                    "receive: the socket restorer finished"
                );
            }
            Ok(st.handover.expect("the loop ends only after Handover"))
        })
    }
}

/// The first pre-copy round received in the lowest CPU class
/// ([`super::DestinationConfig::idle_receive`]): lowered when receiving
/// starts, raised for good when the first round's `RoundEnd` arrives,
/// when that round lasts longer than the limit, at the freeze, and when dropped (receiving
/// ended, an error included).
///
/// Why not every shrinking round, as the source's senders: from the
/// second round on the source
/// waits for them to be placed (`Prepared{placed}`) before its policy
/// decides, and the freeze's pages arrive before the destination can tell
/// the freeze began; placed in the lowest class on a busy host, both are
/// slower, the policy measures less bandwidth and throttles the program
/// (measured: 160–250 MB/s against 390–460, and freezes of 25–41 ms).
struct IdleReceive {
    hook: Option<fn(bool) -> bool>,
    /// The process is in the lowest class now.
    on: bool,
    limit: Duration,
    /// When the process was lowered (the first round began).
    lowered_at: Instant,
}

impl IdleReceive {
    fn new(hook: Option<fn(bool) -> bool>, limit: Duration) -> Self {
        let on = hook.is_some_and(|h| h(true));
        if on {
            debug!("receive: the pre-copy rounds in the lowest CPU class");
        }
        Self {
            hook,
            on,
            limit,
            lowered_at: Instant::now(),
        }
    }

    /// Back to the normal class for good.
    fn leave(&mut self, why: &'static str) {
        if !self.on {
            return;
        }
        self.on = false;
        if let Some(h) = self.hook {
            let back = h(false);
            debug!(
                why = why,
                back = back,
                "receive: back from the lowest CPU class"
            );
        }
    }

    /// The first round lasting longer than the limit: back.
    fn check_time(&mut self) {
        if self.on && self.lowered_at.elapsed() > self.limit {
            self.leave("a round past the limit");
        }
    }

    /// A round ended: the first full copy is in, back.
    fn round_ended(&mut self, summary: &RoundSummary) {
        debug!(round = summary.round, "receive: a round ended");
        self.leave("the first round is in");
    }
}

impl Drop for IdleReceive {
    fn drop(&mut self) {
        self.leave("receiving ended");
    }
}

/// `Handover` arrived: note when, and check the pages it leaves for
/// post-copy; returns them (`None` without post-copy) for
/// [`begin_postcopy`].
fn handover_arrived(progress: &mut Progress, handover: &Handover) -> Result<Option<RegionPages>> {
    progress.report.handover_at = Some(Instant::now());
    if handover.postcopy.is_empty() {
        return Ok(None);
    }
    let mut missing = RegionPages::empty(&progress.layout);
    for run in &handover.postcopy {
        progress.layout.check_run(run)?;
        missing.insert_run(run)?;
    }
    Ok(Some(missing))
}

/// Hand the pages left for post-copy to the memory, once every page sent
/// before `Commit` is placed (before `Ready`: the program is not running,
/// so a failure here still aborts cleanly).
fn begin_postcopy<M: MemorySink>(memory: &M, missing: &RegionPages) -> Result<()> {
    let begun = Instant::now();
    memory.begin_postcopy(missing)?;
    debug!(
        pages = missing.count(),
        took_ms = begun.elapsed().as_secs_f64() * 1e3,
        "post-copy memory registered"
    );
    Ok(())
}

/// Place one batch received before `Commit`: a batch outside the layout or
/// of the wrong length is an error (the migration aborts), never a panic.
pub(super) fn place<M: MemorySink + ?Sized>(
    memory: &M,
    progress: &mut Progress,
    batch: &PageBatch,
) -> Result<()> {
    let run = batch.run;
    let region = progress.layout.check_run(&run)?;
    let len = region.bytes(u64::from(run.count));
    match &batch.data {
        PageData::Raw(data) => {
            if data.len() as u64 != len {
                return Err(MigrationError::Protocol {
                    phase: "pages",
                    expected: "page data of the run's length",
                    got: format!("{} bytes for {run} ({len} expected)", data.len()),
                });
            }
            memory.write_pages(&run, data)?;
            progress.hashes.record(&run, data);
            progress.report.bytes_received += data.len() as u64;
        }
        PageData::Zero => {
            memory.zero_pages(&run)?;
            progress.hashes.record_zero(&run);
            progress.report.zero_pages += u64::from(run.count);
        }
    }
    progress.report.pages_placed += u64::from(run.count);
    progress.placed_total += u64::from(run.count);
    Ok(())
}

/// The thread restoring socket records while the session places pages.
pub(super) struct Restorer<'scope> {
    batches: Option<mpsc::Sender<Vec<SocketRecord>>>,
    thread: Option<ScopedJoinHandle<'scope, Result<()>>>,
}

impl<'scope> Restorer<'scope> {
    fn spawn<'env, K: SocketSink>(
        scope: &'scope Scope<'scope, 'env>,
        sink: &'scope mut K,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Vec<SocketRecord>>();
        let thread = spawn_named(scope, "lmig-restore".into(), move || {
            // Ends when the session drops the sender, or at the first error.
            for batch in rx {
                sink.restore(batch)?;
            }
            Ok(())
        })?;
        Ok(Self {
            batches: Some(tx),
            thread: Some(thread),
        })
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

    /// A panic in the sink is an error like any other (before `Commit`).
    fn join(thread: Option<ScopedJoinHandle<'scope, Result<()>>>) -> Result<()> {
        let stopped = |why| MigrationError::backend("socket restore", why);
        match thread {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(stopped("the restoring thread panicked"))),
            None => Err(stopped("the restoring thread stopped")),
        }
    }
}

#[cfg(test)]
mod idle_tests {
    use std::sync::Mutex;

    use super::*;

    /// What each test's hook was asked, by test (hooks are plain `fn`s).
    static SHRINK: Mutex<Vec<bool>> = Mutex::new(Vec::new());
    static LIMIT: Mutex<Vec<bool>> = Mutex::new(Vec::new());

    fn summary(pages: u64, zero_pages: u64, dirty_pages: u64) -> RoundSummary {
        RoundSummary {
            round: 0,
            pages,
            zero_pages,
            dirty_pages,
        }
    }

    #[test]
    fn lowered_for_the_first_round_only() {
        fn hook(idle: bool) -> bool {
            SHRINK.lock().unwrap().push(idle);
            true
        }
        let mut idle = IdleReceive::new(Some(hook), Duration::from_secs(3600));
        assert!(idle.on);
        idle.check_time();
        assert!(idle.on, "within the limit");
        // Round 0 ended (shrinking or not): back, and never lowered again.
        idle.round_ended(&summary(1200, 200, 400));
        assert!(!idle.on);
        idle.round_ended(&summary(1200, 200, 0));
        idle.leave("the freeze");
        drop(idle);
        assert_eq!(*SHRINK.lock().unwrap(), [true, false]);
    }

    #[test]
    fn a_round_past_the_limit_raises_and_drop_raises_once() {
        fn hook(idle: bool) -> bool {
            LIMIT.lock().unwrap().push(idle);
            true
        }
        let mut idle = IdleReceive::new(Some(hook), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
        idle.check_time();
        assert!(!idle.on);
        drop(idle);
        // Dropped without a raise before: it raises.
        let idle = IdleReceive::new(Some(hook), Duration::from_secs(3600));
        drop(idle);
        assert_eq!(*LIMIT.lock().unwrap(), [true, false, true, false]);
    }

    #[test]
    fn without_a_hook_or_refused_nothing_moves() {
        fn refuse(_: bool) -> bool {
            false
        }
        let mut idle = IdleReceive::new(None, Duration::ZERO);
        assert!(!idle.on);
        idle.check_time();
        let idle2 = IdleReceive::new(Some(refuse), Duration::ZERO);
        assert!(!idle2.on);
    }
}
