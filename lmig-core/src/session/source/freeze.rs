//! The source's freeze: pause the program, freeze and capture the sockets
//! while the last dirty pages go out, send the state and the handover, and
//! wait for `Ready`.

use std::time::{Duration, Instant};

use super::control::FreezeBound;
use super::precopy::{FirstRound, PageLanes, Rounds};
use super::{CANCEL_TICK, Mode, Source, SourceReport, Undo};
use crate::error::{MigrationError, Result};
use crate::model::{PageRun, RegionLayout, RegionPages, SocketRecord};
use crate::protocol::{Handover, Message};
use crate::session::pages::runs_of;
use crate::session::{panicked, spawn_named, unexpected};
use crate::traits::{Channel, DirtyTracker, MemorySource, Phase, SocketSource, StateSource};

/// Times the steps of the freeze for [`SourceReport::freeze_steps`] and
/// holds them to the freeze's bound.
struct FreezeClock {
    lap: Instant,
    bound: FreezeBound,
}

impl FreezeClock {
    /// The step `name` ended now: `Err` if the freeze outlasted its bound
    /// ([`super::SourceConfig::max_freeze`]) or a cancel arrived.
    fn step(
        &mut self,
        name: &'static str,
        steps: &mut Vec<(&'static str, Duration)>,
    ) -> Result<()> {
        let now = Instant::now();
        debug!(
            step = name,
            ms = (now - self.lap).as_secs_f64() * 1e3,
            "freeze step"
        );
        steps.push((name, now - self.lap));
        self.lap = now;
        self.bound.check(name)
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
    /// The freeze, from the pause to `Ready`. Returns the pages left for
    /// post-copy.
    pub(super) fn freeze(
        &mut self,
        layout: &RegionLayout,
        undo: &mut Undo,
        report: &mut SourceReport,
        mut rounds: Rounds,
    ) -> Result<RegionPages> {
        let _phase = phase_span!("freeze", round = rounds.round + 1);
        self.phase(Phase::Frozen);
        report.paused_at = Instant::now();
        undo.paused = true;
        let bound = FreezeBound {
            paused_at: report.paused_at,
            max: self.config.max_freeze,
            cancel: self.cancel.clone(),
        };
        let mut clock = FreezeClock {
            lap: report.paused_at,
            bound: bound.clone(),
        };
        self.program.pause()?;
        clock.step("pause program", &mut report.freeze_steps)?;
        undo.sockets_frozen = true;
        self.sockets.freeze()?;
        clock.step("freeze sockets", &mut report.freeze_steps)?;
        // The sockets are captured (and restored at the destination, the
        // longest step with many connections) on their own thread while this
        // one collects and sends the last dirty pages.
        let mode = self.config.mode;
        let stop = || bound.check("final pages");
        // Counted, never held back: the program is paused.
        let lanes = PageLanes::new(&self.memory, &self.channel, layout, self.config.batch_pages)
            .stopping_on(&stop)
            .metered(&self.meter, false);
        let (channel, tracker, sockets) = (&self.channel, &mut self.tracker, &mut self.sockets);
        let (captured, postcopy_runs) =
            std::thread::scope(|scope| -> Result<((u64, u64), Vec<PageRun>)> {
                let capture = SocketCapture::spawn(scope, sockets, channel, &bound)?;
                let pages = final_pages(&lanes, tracker, mode, &mut rounds, report, &mut clock);
                let captured = capture.join();
                let runs = pages?;
                Ok((captured?, runs))
            })?;
        (report.sockets, report.queued_bytes) = captured;
        // The part of the capture that outlasted the pages.
        clock.step("capture sockets", &mut report.freeze_steps)?;
        let state = self.program.capture()?;
        state.validate()?;
        self.channel.send(&Message::State(state))?;
        self.channel.send(&Message::Handover(Handover {
            pages_total: report.pages_sent,
            postcopy: postcopy_runs,
            verify: self.config.verify,
        }))?;
        clock.step("state and handover", &mut report.freeze_steps)?;
        self.await_ready(report, &bound)?;
        clock.step("wait for Ready", &mut report.freeze_steps)?;
        Ok(rounds.to_send)
    }

    /// Wait for `Ready` (at most `ready_timeout`, and within the freeze's
    /// bound; a cancel is seen within a tick).
    fn await_ready(&self, report: &mut SourceReport, bound: &FreezeBound) -> Result<()> {
        self.phase(Phase::AwaitReady);
        let timeout = self.config.ready_timeout;
        let give_up = Instant::now() + timeout;
        // A `Prepared` the destination sent before it saw the freeze may come
        // first (at most one per round).
        let mut prepared_left = report.rounds + 1;
        // Bounded by `give_up`.
        loop {
            bound.check("wait for Ready")?;
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrationError::Timeout {
                    waiting_for: "Ready",
                    after: timeout,
                });
            }
            match self.channel.recv(Some(bound.wait(left.min(CANCEL_TICK))))? {
                None => {}
                Some(Message::Ready) => break,
                Some(Message::Prepared { .. }) if prepared_left > 0 => prepared_left -= 1,
                Some(other) => return Err(unexpected("await-ready", "Ready", &other)),
            }
        }
        report.ready_at = Instant::now();
        Ok(())
    }
}

/// The last collect, and the pages it leaves: sent now (pre-copy), or
/// named for post-copy (returned, left in `rounds.to_send`).
fn final_pages<M: MemorySource, C: Channel, T: DirtyTracker>(
    lanes: &PageLanes<'_, M, C>,
    tracker: &mut T,
    mode: Mode,
    rounds: &mut Rounds,
    report: &mut SourceReport,
    clock: &mut FreezeClock,
) -> Result<Vec<PageRun>> {
    rounds.dirty.clear();
    // The program is paused: no writer waits on the collect.
    tracker.collect_paused(&mut rounds.dirty)?;
    rounds.written.union_with(&rounds.dirty);
    lanes.memory().take_freed(&mut rounds.dirty)?;
    clock.step("final collect", &mut report.freeze_steps)?;
    rounds.to_send.union_with(&rounds.dirty);
    if mode == Mode::Postcopy {
        rounds.to_send = RegionPages::full(lanes.layout());
    }
    let postcopy_runs = if rounds.postcopy {
        send_free_pages(lanes, rounds, report)?;
        runs_of(&rounds.to_send)
    } else {
        let sent = lanes.send_set(&rounds.to_send, rounds.round + 1, FirstRound::default())?;
        report.pages_sent += sent.pages;
        report.zero_pages += sent.zero_pages;
        report.bytes_sent += sent.bytes;
        report.freeze_pages = sent.pages;
        rounds.to_send.clear();
        Vec::new()
    };
    clock.step("final pages", &mut report.freeze_steps)?;
    Ok(postcopy_runs)
}

/// Post-copy: the pages left that the program declared free and the
/// tracker never saw written go now as zero runs, unread, and leave the
/// missing set: neither the push nor a fault ever carries them.
fn send_free_pages<M: MemorySource, C: Channel>(
    lanes: &PageLanes<'_, M, C>,
    rounds: &mut Rounds,
    report: &mut SourceReport,
) -> Result<()> {
    let layout = lanes.layout();
    let mut free = RegionPages::empty(layout);
    if !lanes.memory().free_pages(&mut free)? {
        return Ok(());
    }
    free.subtract(&rounds.written);
    // free ∩ to_send, as free less what is not left to send.
    let mut not_left = RegionPages::full(layout);
    not_left.subtract(&rounds.to_send);
    free.subtract(&not_left);
    if free.is_empty() {
        return Ok(());
    }
    let none = RegionPages::empty(layout);
    let sent = lanes.send_set(&free, rounds.round + 1, FirstRound::all_zero(&none))?;
    report.pages_sent += sent.pages;
    report.zero_pages += sent.zero_pages;
    report.bytes_sent += sent.bytes;
    rounds.to_send.subtract(&free);
    Ok(())
}

/// Queue bytes a socket record carries.
fn queued_len(r: &SocketRecord) -> u64 {
    match r {
        SocketRecord::Tcp(c) => (c.send_queue.len() + c.recv_queue.len()) as u64,
        _ => 0,
    }
}

/// The thread capturing the sockets during the freeze and sending their
/// records (`Sockets{last: false}` batches, then `Sockets{last: true}`).
struct SocketCapture<'scope> {
    thread: std::thread::ScopedJoinHandle<'scope, Result<(u64, u64)>>,
}

impl<'scope> SocketCapture<'scope> {
    fn spawn<'env, K: SocketSource, C: Channel>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        sockets: &'scope mut K,
        channel: &'scope C,
        bound: &FreezeBound,
    ) -> Result<Self> {
        let bound = bound.clone();
        let thread = spawn_named(scope, "lmig-capture".into(), move || {
            let (mut count, mut queued) = (0u64, 0u64);
            sockets.capture(&mut |records| {
                bound.check("capture sockets")?;
                count += records.len() as u64;
                queued += records.iter().map(queued_len).sum::<u64>();
                channel.send(&Message::Sockets {
                    records,
                    last: false,
                })
            })?;
            channel.send(&Message::Sockets {
                records: Vec::new(),
                last: true,
            })?;
            Ok::<_, MigrationError>((count, queued))
        })?;
        Ok(Self { thread })
    }

    /// The number of records captured and the bytes in their queues; a
    /// panic in the capture is an error.
    fn join(self) -> Result<(u64, u64)> {
        self.thread
            .join()
            .unwrap_or_else(|p| Err(panicked("in the socket capture", false, &*p)))
    }
}
