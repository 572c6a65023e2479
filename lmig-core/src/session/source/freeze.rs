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
/// records.
///
/// The batches (`Sockets{last: false}`) are spread over the data lanes,
/// each lane sent by a [`BatchSenders`] thread of its own, so that with
/// megabytes of queued data their encoding and encryption run on several
/// CPUs next to the capture, and the destination's lane readers decrypt
/// them in parallel too. The rule that keeps the end last: once every
/// batch is written, one `Sockets{last: true}` (no records) goes on *each*
/// data lane (`Channel::data_lanes`, the same at both ends), behind that
/// lane's batches. The destination takes the records as done only once it
/// has one `last` from every lane, and waits for that before it ends its
/// receive loop, so it restores every batch before activation whatever
/// order the lanes deliver them in.
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
            let lanes = channel.data_lanes().max(1);
            let (mut count, mut queued) = (0u64, 0u64);
            std::thread::scope(|s| {
                let senders = BatchSenders::spawn(s, channel, lanes)?;
                let captured = sockets.capture(&mut |records| {
                    bound.check("capture sockets")?;
                    count += records.len() as u64;
                    queued += records.iter().map(queued_len).sum::<u64>();
                    senders.send(records)
                });
                // Every batch written (or the first failure) before the ends;
                // a sender's failure is the cause of the capture's.
                senders.join()?;
                captured?;
                Ok::<_, MigrationError>(())
            })?;
            for lane in 0..lanes {
                channel.send_lane(
                    lane,
                    &Message::Sockets {
                        records: Vec::new(),
                        last: true,
                    },
                )?;
            }
            channel.flush()?;
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

/// The threads sending the freeze's socket batches (`lmig-sockets<i>`),
/// one per data lane: each takes the next batch the capture hands over
/// and encodes, encrypts and writes it on its own lane.
struct BatchSenders<'scope> {
    tx: std::sync::mpsc::SyncSender<Vec<SocketRecord>>,
    /// A sender failed: the capture stops at its next batch.
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::ScopedJoinHandle<'scope, Result<()>>>,
}

impl<'scope> BatchSenders<'scope> {
    fn spawn<'env, C: Channel>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        channel: &'scope C,
        lanes: usize,
    ) -> Result<Self> {
        use std::sync::atomic::Ordering;
        // At most one batch waiting per sender: the capture runs ahead of
        // the wire by that much, no more.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<SocketRecord>>(lanes);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::with_capacity(lanes);
        for lane in 0..lanes {
            let (rx, failed) = (rx.clone(), failed.clone());
            threads.push(spawn_named(
                scope,
                format!("lmig-sockets{lane}"),
                move || {
                    // Bounded: ends when the capture drops its sender.
                    loop {
                        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(records) = next else {
                            return Ok(());
                        };
                        let msg = Message::Sockets {
                            records,
                            last: false,
                        };
                        if let Err(e) = channel.send_lane(lane, &msg) {
                            failed.store(true, Ordering::Release);
                            return Err(e);
                        }
                    }
                },
            )?);
        }
        Ok(Self {
            tx,
            failed,
            threads,
        })
    }

    /// Hand `records` to the next free sender.
    fn send(&self, records: Vec<SocketRecord>) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.failed.load(Ordering::Acquire) || self.tx.send(records).is_err() {
            return Err(MigrationError::channel_closed(
                "sending the freeze's socket records failed",
            ));
        }
        Ok(())
    }

    /// Wait for every batch to be written; the first sender's error, if
    /// any (a panic is one too).
    fn join(self) -> Result<()> {
        drop(self.tx);
        let mut first = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|p| Err(panicked("in a socket batch sender", false, &*p)));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
