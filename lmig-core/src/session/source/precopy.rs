//! The source's setup and pre-copy phases: announce the layout and the
//! socket plan, then send rounds of pages until the policy freezes.

use std::time::{Duration, Instant};

use super::{CANCEL_TICK, Mode, Source, SourceReport, Undo};
use crate::error::{MigrationError, Result};
use crate::model::{PageRun, RegionLayout, RegionPages};
use crate::policy::{Decision, RoundStats};
use crate::protocol::{CHUNK_PAGES, Message, RoundSummary};
use crate::session::pace::Meter;
use crate::session::pages::{PageSender, Sent, lane_of, sender_threads};
use crate::session::{spawn_named, unexpected};
mod idle;

use idle::{IdleLane, IdleLanes};

use crate::traits::{
    Channel, DirtyClearer, DirtyTracker, Event, MemorySource, Phase, SocketSource, StateSource,
};

/// What the source knows of the destination's readiness before the freeze.
pub(super) struct Readiness {
    /// `Prepared` arrived: the destination mapped its regions and prepared
    /// its sockets.
    pub prepared: bool,
    /// The most pages the destination said it placed (`Prepared{placed}`).
    pub placed: u64,
    /// `Prepared` must have arrived by then.
    pub by: Instant,
}

impl Readiness {
    /// A `Prepared{placed}` arrived.
    fn heard(&mut self, placed: u64) {
        self.prepared = true;
        self.placed = self.placed.max(placed);
    }
}

/// Where the pre-copy rounds left off: what the freeze must still send.
pub(super) struct Rounds {
    /// Pages dirtied since they were last sent.
    pub to_send: RegionPages,
    /// Scratch set the collects fill.
    pub dirty: RegionPages,
    /// Every page the tracker reported written since it started: a page
    /// declared free is skipped only if it is not in here
    /// ([`MemorySource::free_pages`]).
    pub written: RegionPages,
    /// The last round run (the freeze's pages belong to the next one).
    pub round: u32,
    /// The pages left go after `Commit` (post-copy).
    pub postcopy: bool,
    /// The next round's senders may run in the lowest CPU class
    /// ([`super::SourceConfig::idle_lanes`]): until a round does not shrink
    /// or the policy throttles.
    pub spare: bool,
}

/// What the first pre-copy round knows beyond the pages to send.
#[derive(Copy, Clone, Default)]
pub(super) struct FirstRound<'a> {
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

    /// Every page of the set sent goes as a zero run, unread (`none` is an
    /// empty set): the freeze's free pages.
    pub(super) fn all_zero(none: &'a RegionPages) -> Self {
        Self {
            populated: Some(none),
            clearer: None,
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
    /// Setup: announce the layout and the socket plan, start tracking.
    /// Returns by when the destination must say `Prepared`.
    pub(super) fn setup(&mut self, layout: &RegionLayout, undo: &mut Undo) -> Result<Readiness> {
        let _phase = phase_span!("setup");
        self.phase(Phase::Setup);
        self.cancel.check()?;
        // The network lock would hold the channel's own traffic.
        let moved = self.sockets.moved_addresses();
        if let Some(addr) = self
            .channel
            .ip_addresses()
            .into_iter()
            .find(|a| moved.contains(a))
        {
            return Err(MigrationError::ChannelOnMovedAddress { addr });
        }
        self.channel.send(&Message::Regions(layout.clone()))?;
        // Always sent (possibly empty): the destination answers it with
        // `Prepared` once regions and sockets are ready.
        let plan = self.sockets.plan()?;
        self.channel.send(&Message::SocketPlan(plan))?;
        let ready = Readiness {
            prepared: false,
            placed: 0,
            by: Instant::now() + self.config.ready_timeout,
        };
        undo.tracking = true;
        self.tracker.start()?;
        Ok(ready)
    }

    /// Pre-copy: rounds until the policy freezes (none in post-copy mode),
    /// then wait until the destination is prepared.
    pub(super) fn precopy(
        &mut self,
        layout: &RegionLayout,
        undo: &mut Undo,
        report: &mut SourceReport,
        ready: &mut Readiness,
    ) -> Result<Rounds> {
        let mode = self.config.mode;
        let mut rounds = Rounds {
            to_send: if mode == Mode::Postcopy {
                RegionPages::empty(layout)
            } else {
                RegionPages::full(layout)
            },
            dirty: RegionPages::empty(layout),
            written: RegionPages::empty(layout),
            round: 0,
            postcopy: mode == Mode::Postcopy,
            spare: self.config.idle_lanes.is_some(),
        };
        if mode != Mode::Postcopy {
            // Pages that may hold data; the others are sent as zero without
            // being read (free memory the program never touched). Asked after
            // the tracker started, so a page written from here on is its.
            let populated = self.data_pages(layout)?;
            // Round 0 marks each run clean right before reading it: a page the
            // program wrote before its read went out fresh and is not resent.
            let clearer = self.tracker.clearer();
            let mut throttle_refused = false;
            while rounds.round < u32::MAX - 1 {
                let first = FirstRound {
                    populated: populated.as_ref(),
                    clearer: clearer.as_deref(),
                }
                .only_if(rounds.round == 0);
                let (stats, shrinking) = self.round(layout, report, ready, &mut rounds, first)?;
                if rounds.spare && !shrinking {
                    // Sparing the program no longer pays: the rounds need
                    // the CPU to converge.
                    info!(
                        round = stats.round,
                        "rounds do not shrink: senders at full priority"
                    );
                    rounds.spare = false;
                }
                let decision = self.policy.decide(&stats, throttle_refused);
                report.decisions.push(decision);
                report.policy_reason = self.policy.explain();
                info!(round = stats.round, decision = ?decision, "{}", report.policy_reason);
                self.observer.event(&Event::Decision(decision));
                std::mem::swap(&mut rounds.to_send, &mut rounds.dirty);
                match decision {
                    Decision::Continue => {}
                    Decision::Throttle { percent } => {
                        undo.throttled = true;
                        rounds.spare = false;
                        throttle_refused = !self.program.throttle(percent);
                        info!(
                            percent = percent,
                            refused = throttle_refused,
                            "throttle asked"
                        );
                    }
                    Decision::Freeze | Decision::Postcopy if !ready.prepared => {
                        // Never freeze before the destination is ready (its
                        // pre-faulting would land in the freeze): keep sending
                        // what gets dirty while waiting.
                        if let Some(p) = self.wait_prepared(Duration::from_millis(10), ready.by)? {
                            ready.heard(p);
                        }
                    }
                    Decision::Freeze | Decision::Postcopy => {
                        // Right after the first, full copy: its backlog first
                        // (a no-op once a shrinking round caught up).
                        if shrinking {
                            self.catch_up(report.pages_sent, &mut ready.placed)?;
                        }
                        if decision == Decision::Postcopy {
                            rounds.postcopy = mode == Mode::Hybrid;
                            report.switched_to_postcopy = rounds.postcopy;
                        }
                        break;
                    }
                }
                rounds.round += 1;
            }
        }
        while !ready.prepared {
            ready.prepared = self
                .wait_prepared(self.config.ready_timeout, ready.by)?
                .is_some();
        }
        Ok(rounds)
    }

    /// The pages the first round reads: those that may hold data
    /// ([`MemorySource::populated`]) less those the program declared free
    /// ([`MemorySource::free_pages`]); `None` when the memory tells
    /// neither (every page is read). Asked after the tracker started: a
    /// free page written from here on is the tracker's and is sent anyway.
    fn data_pages(&self, layout: &RegionLayout) -> Result<Option<RegionPages>> {
        // Declarations made before now are all in `free_pages`.
        let mut scratch = RegionPages::empty(layout);
        self.memory.take_freed(&mut scratch)?;
        let mut pages = RegionPages::empty(layout);
        let populated = self.memory.populated(&mut pages)?;
        scratch.clear();
        if !self.memory.free_pages(&mut scratch)? {
            return Ok(populated.then_some(pages));
        }
        if !populated {
            pages = RegionPages::full(layout);
        }
        pages.subtract(&scratch);
        Ok(Some(pages))
    }

    /// One pre-copy round: send `rounds.to_send`, collect what got dirty
    /// meanwhile into `rounds.dirty`, announce the round and hear the
    /// destination. Returns the round's statistics and whether the rounds
    /// shrink.
    fn round(
        &mut self,
        layout: &RegionLayout,
        report: &mut SourceReport,
        ready: &mut Readiness,
        rounds: &mut Rounds,
        first: FirstRound<'_>,
    ) -> Result<(RoundStats, bool)> {
        let round = rounds.round;
        let _phase = phase_span!("precopy", round = round);
        self.cancel.check()?;
        self.phase(Phase::Precopy(round));
        let t0 = Instant::now();
        self.progress
            .round_begins(&self.meter, round, rounds.to_send.count());
        let cancel = &self.cancel;
        let stop = || cancel.check();
        let idle = IdleLanes::for_round(&self.config, rounds.spare, t0);
        let sent = PageLanes::new(&self.memory, &self.channel, layout, self.config.batch_pages)
            .stopping_on(&stop)
            .metered(&self.meter, true)
            .in_background(self.config.yield_to_program)
            .idle_while_sparing(idle)
            .send_set(&rounds.to_send, round, first)?;
        let (dirty_pages, dirty_bytes) = self.collect_dirty(layout, rounds)?;
        self.channel.send(&Message::RoundEnd(RoundSummary {
            round,
            pages: sent.pages,
            zero_pages: sent.zero_pages,
            dirty_pages,
        }))?;
        // Bounded: the destination sends one `Prepared` per round at most.
        for _ in 0..=round + 1 {
            match self.check_peer("pre-copy")? {
                Some(p) => ready.heard(p),
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
        if ready.prepared && shrinking && round > 0 {
            self.catch_up(report.pages_sent, &mut ready.placed)?;
        }
        let elapsed = t0.elapsed();
        report.zero_pages += sent.zero_pages;
        report.bytes_sent += sent.bytes;
        // An estimate (which also lets the socket source get ready for the
        // capture): one the sockets cannot give counts as none.
        let queued_bytes = self.sockets.queued_bytes().unwrap_or(0);
        if queued_bytes > 0 {
            // The destination gets receive memory ready for the freeze's
            // socket batches (see `Message::QueueEstimate`).
            self.channel.send(&Message::QueueEstimate {
                bytes: queued_bytes.min(crate::protocol::MAX_QUEUE_ESTIMATE),
            })?;
        }
        let stats = RoundStats {
            queued_bytes,
            round,
            pages_sent: sent.pages,
            zero_pages: sent.zero_pages,
            bytes_sent: sent.bytes,
            elapsed,
            dirty_pages,
            dirty_bytes,
        };
        debug!(
            round = round,
            pages = stats.pages_sent,
            dirty_pages = dirty_pages,
            ms = elapsed.as_secs_f64() * 1e3,
            "round done"
        );
        report.round_stats.push(stats);
        report.rounds = round + 1;
        self.progress
            .round_ends(sent.bytes, elapsed, dirty_pages, dirty_bytes);
        self.observer.event(&Event::Round(stats));
        self.observer.event(&Event::Progress {
            pages: report.pages_sent,
            bytes: report.bytes_sent,
            total_pages: layout.total_pages(),
        });
        Ok((stats, shrinking))
    }

    /// What got dirty during a round, into `rounds.dirty` (and
    /// `rounds.written`): its pages and bytes.
    fn collect_dirty(&mut self, layout: &RegionLayout, rounds: &mut Rounds) -> Result<(u64, u64)> {
        let dirty = &mut rounds.dirty;
        dirty.clear();
        self.tracker.collect(dirty)?;
        let dirty_pages = dirty.count();
        let dirty_bytes: u64 = dirty
            .sets()
            .map(|(id, s)| layout.get(id).map(|r| r.bytes(s.count())).unwrap_or(0))
            .sum();
        rounds.written.union_with(dirty);
        // Pages freed during the round were discarded: the destination may
        // hold an older copy, so they go again (as zero runs).
        self.memory.take_freed(dirty)?;
        Ok((dirty_pages, dirty_bytes))
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

    /// Before the freeze: wait (at most [`super::SourceConfig::catch_up_timeout`])
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
        self.cancel.check()?;
        // A cancel is seen within a tick.
        let wait = wait.min(deadline - now).min(CANCEL_TICK);
        match self.channel.recv(Some(wait))? {
            None => Ok(None),
            Some(Message::Prepared { placed }) => Ok(Some(placed)),
            Some(msg) => Err(unexpected("pre-copy", "Prepared", &msg)),
        }
    }
}

/// Sends sets of pages over the data lanes of a channel, one thread per
/// lane (the pre-copy rounds and the freeze).
pub(super) struct PageLanes<'a, M, C> {
    memory: &'a M,
    channel: &'a C,
    layout: &'a RegionLayout,
    /// Pages per `Pages` message.
    batch: u32,
    /// Checked before every chunk: a cancel, or the freeze's bound.
    stop: Option<&'a (dyn Fn() -> Result<()> + Sync)>,
    /// Counts what goes out; the flag: keep to its bandwidth limit.
    meter: Option<(&'a Meter, bool)>,
    /// Each lane thread calls [`MemorySource::background_thread`] first.
    background: bool,
    /// Each lane thread moves to the lowest CPU class first, for a while.
    idle: Option<IdleLanes>,
}

impl<'a, M: MemorySource, C: Channel> PageLanes<'a, M, C> {
    pub(super) fn new(memory: &'a M, channel: &'a C, layout: &'a RegionLayout, batch: u32) -> Self {
        Self {
            memory,
            channel,
            layout,
            batch: batch.clamp(1, CHUNK_PAGES),
            stop: None,
            meter: None,
            background: false,
            idle: None,
        }
    }

    /// Each lane thread moves to the lowest CPU class first (`None`: not).
    /// The calling thread is never moved: with one lane it then runs on a
    /// thread of its own.
    pub(super) fn idle_while_sparing(mut self, idle: Option<IdleLanes>) -> Self {
        self.idle = idle;
        self
    }

    /// Send from threads of their own that lower their priority first
    /// ([`MemorySource::background_thread`]), one lane included.
    pub(super) fn in_background(mut self, on: bool) -> Self {
        self.background = on;
        self
    }

    /// Count what goes out in `meter`; when `paced`, keep to its bandwidth
    /// limit (a wait that the `stop` check ends).
    pub(super) fn metered(mut self, meter: &'a Meter, paced: bool) -> Self {
        self.meter = Some((meter, paced));
        self
    }

    /// Call `stop` before every chunk; its error ends the send.
    pub(super) fn stopping_on(mut self, stop: &'a (dyn Fn() -> Result<()> + Sync)) -> Self {
        self.stop = Some(stop);
        self
    }

    /// The regions the pages belong to.
    pub(super) fn layout(&self) -> &'a RegionLayout {
        self.layout
    }

    /// The memory the pages are read from.
    pub(super) fn memory(&self) -> &'a M {
        self.memory
    }

    /// Send every page of `set`, spreading chunks over the data lanes (one
    /// thread per lane), and flush.
    pub(super) fn send_set(
        &self,
        set: &RegionPages,
        round: u32,
        first: FirstRound<'_>,
    ) -> Result<Sent> {
        let lanes = self.channel.data_lanes().max(1);
        // One lane runs on the calling thread, unless its priority is to
        // drop (a thread of its own then, whose priority dies with it).
        if lanes == 1 && !self.background && self.idle.is_none() {
            let sent = self.send_lane(set, round, first, (0, 1), 1, &IdleLane::none())?;
            self.channel.flush()?;
            return Ok(sent);
        }
        let threads = sender_threads(lanes, self.idle.map(|l| l.threads));
        let sent = std::thread::scope(|s| {
            let mut handles = Vec::with_capacity(threads);
            for thread in 0..threads {
                let job = move || {
                    let idle = IdleLane::enter(self.idle);
                    if self.background && !idle.on() {
                        self.memory.background_thread();
                    }
                    self.send_lane(set, round, first, (thread, threads), lanes, &idle)
                };
                handles.push(spawn_named(s, format!("lmig-lane{thread}"), job)?);
            }
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
        self.channel.flush()?;
        Ok(sent)
    }

    /// The part of `set` that goes on the lanes of sender `thread` (of
    /// `threads`): lane `l` (of `lanes`) is the sender's when
    /// `l % threads == thread`; each chunk goes on its own lane.
    ///
    /// With a clearer, two passes: first every zero page (tested in place
    /// right after its run was cleared), then the pages holding data, each
    /// cleared again right before it is read. The data is then read in a
    /// short window at the end of the round, so fewer of its pages are
    /// written after their read and sent again next round. Only pages about
    /// to be tested or read are cleared: a page sent as zero unread keeps
    /// what the tracker knows about it.
    fn send_lane(
        &self,
        set: &RegionPages,
        round: u32,
        first: FirstRound<'_>,
        (thread, threads): (usize, usize),
        lanes: usize,
        idle: &IdleLane,
    ) -> Result<Sent> {
        let FirstRound { populated, clearer } = first;
        // Past the round's limit in the lowest class: back to the class
        // the thread would have had.
        let keep_up = || {
            if idle.check() && self.background {
                self.memory.background_thread();
            }
            idle.rest();
            idle.place();
        };
        let stopped = || self.stop.is_some_and(|s| s().is_err());
        let mut sender = PageSender::new(self.memory, self.channel, self.layout);
        if let Some((meter, paced)) = self.meter {
            sender = sender.metered(meter, paced, Some(&stopped));
        }
        let mut total = Sent::default();
        // The data runs of the second pass, each with its chunk's lane.
        let mut data_runs: Vec<PageRun> = Vec::new();
        let mut data_lanes: Vec<usize> = Vec::new();
        let mut read = |sender: &mut PageSender<'_, M, C>, run: PageRun, lane: usize| {
            let Some(c) = clearer else {
                return sender.send_run(run, round, lane, false);
            };
            c.clear(&run)?;
            let sent = sender.send_zeros(run, round, lane, &mut data_runs)?;
            data_lanes.resize(data_runs.len(), lane);
            match sent {
                Some(sent) => Ok(sent),
                // The memory cannot test in place: one pass.
                None => sender.send_run(run, round, lane, false),
            }
        };
        for run in set.chunked_runs(self.batch) {
            let lane = lane_of(&run, lanes);
            if lane % threads != thread {
                continue;
            }
            if let Some(stop) = self.stop {
                stop()?;
            }
            keep_up();
            let Some(data) = populated.and_then(|p| p.get(run.region).ok()) else {
                total.add(read(&mut sender, run, lane)?);
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
                    lane,
                )?);
                at = first + count;
            }
            if at < run.end() {
                total.add(sender.send_zero_run(zero_run(at, run.end()), round, lane)?);
            }
        }
        if let Some(c) = clearer {
            for (run, lane) in data_runs.into_iter().zip(data_lanes) {
                // The data pass of a large first round is most of its
                // time: a cancel stops it too.
                if let Some(stop) = self.stop {
                    stop()?;
                }
                keep_up();
                c.clear(&run)?;
                total.add(sender.send_run(run, round, lane, false)?);
            }
        }
        Ok(total)
    }
}
