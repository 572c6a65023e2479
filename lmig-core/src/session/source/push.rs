//! The post-copy push order ([`PushQueue`]), the gate that pauses the
//! pusher while the link is down ([`PushGate`]), and the push's hold-off
//! right after the resume ([`HoldOff`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::model::{PageRun, PageSet, RegionId, RegionPages};
use crate::protocol::CHUNK_PAGES;

/// Coordinates the post-copy pusher with recovery: the pusher takes runs
/// only while the link is up, pauses when a send fails or the link breaks,
/// and resumes when the destination's `Resync` was applied.
pub(super) struct PushGate {
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
    pub(super) fn new() -> Self {
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
    pub(super) fn next(&self, push: &Mutex<PushQueue>, max: u32) -> Option<(PageRun, u64)> {
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

    pub(super) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// A send of `epoch` failed or the channel broke.
    pub(super) fn broken(&self, epoch: u64) {
        let mut st = self.lock();
        if epoch == st.epoch && !st.broken {
            st.broken = true;
            st.reconnected = false;
        }
    }

    pub(super) fn is_broken(&self) -> bool {
        self.lock().broken
    }

    pub(super) fn is_reconnected(&self) -> bool {
        self.lock().reconnected
    }

    pub(super) fn reconnected(&self) {
        self.lock().reconnected = true;
    }

    pub(super) fn pushed_all(&self) -> bool {
        let st = self.lock();
        st.pushed_all && !st.broken
    }

    /// `Resync` applied: push again (the queue may have grown).
    pub(super) fn resume(&self) {
        let mut st = self.lock();
        st.epoch += 1;
        st.broken = false;
        st.reconnected = false;
        st.pushed_all = false;
        self.cv.notify_all();
    }

    pub(super) fn finish(&self) {
        self.lock().finished = true;
        self.cv.notify_all();
    }
}

/// The push's hold-off after `Commit`
/// ([`SourceConfig::push_holdoff`](super::SourceConfig::push_holdoff)):
/// the pusher and the digests' hashing wait while the program's first
/// requests are answered. Over at `max` after the start, or earlier once
/// requests came and none came for `quiet`, or at once when the
/// destination says its program's waiting work has run
/// ([`HoldOff::settle`], `Message::DemandSettled`). Requests that keep
/// coming never extend it past `max`.
pub(super) struct HoldOff {
    start: Instant,
    max: Duration,
    quiet: Duration,
    /// When the last request was answered: ns after `start`, plus one
    /// (0: none yet).
    last: AtomicU64,
    /// The destination's `DemandSettled` arrived.
    settled: AtomicBool,
    /// ... before the bound: it ended the hold-off.
    settled_early: AtomicBool,
}

/// How long without a request ends the hold-off early.
pub(super) const HOLDOFF_QUIET: Duration = Duration::from_millis(4);
/// While the push is held off, the pusher sends one page at least this
/// often: the destination hears from the source while it waits (its
/// `DestinationConfig::idle_timeout` counts silence from the source as
/// a lost source, and a hold-off may be bounded far above it).
pub(super) const HOLDOFF_BEAT: Duration = Duration::from_millis(500);
/// The longest a waiter sleeps at a time before it looks again.
const HOLDOFF_TICK: Duration = Duration::from_millis(1);

impl HoldOff {
    pub(super) fn new(max: Duration, quiet: Duration) -> Self {
        Self {
            start: Instant::now(),
            max,
            quiet,
            last: AtomicU64::new(0),
            settled: AtomicBool::new(false),
            settled_early: AtomicBool::new(false),
        }
    }

    /// The destination's `DemandSettled` ended the hold-off before its
    /// bound (for the report).
    pub(super) fn ended_by_settle(&self) -> bool {
        self.settled_early.load(Ordering::Acquire)
    }

    /// The destination's program has run the work that waited for pages
    /// (`Message::DemandSettled`): the hold-off is over.
    pub(super) fn settle(&self) {
        if !self.over_at(self.start.elapsed()) {
            self.settled_early.store(true, Ordering::Release);
        }
        self.settled.store(true, Ordering::Release);
    }

    /// A request was answered now.
    pub(super) fn request(&self) {
        if self.max.is_zero() {
            return;
        }
        let ns = self
            .start
            .elapsed()
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64;
        self.last.store(ns + 1, Ordering::Relaxed);
    }

    /// Whether the hold-off is over `elapsed` after its start.
    fn over_at(&self, elapsed: Duration) -> bool {
        if elapsed >= self.max || self.settled.load(Ordering::Acquire) {
            return true;
        }
        match self.last.load(Ordering::Relaxed) {
            0 => false,
            last => {
                let last = Duration::from_nanos(last - 1);
                elapsed.saturating_sub(last) >= self.quiet
            }
        }
    }

    /// Wait until the hold-off is over or `stop` says the session ended.
    /// Bounded by `max` (slept in ticks of at most 1 ms).
    pub(super) fn wait(&self, stop: impl Fn() -> bool) {
        while !self.wait_at_most(&stop, Duration::MAX) {}
    }

    /// Wait as [`HoldOff::wait`] does, but at most `most`: true when the
    /// hold-off is over or `stop` said the session ended, false when `most`
    /// passed first (the pusher then sends a sign of life, see
    /// [`HOLDOFF_BEAT`]).
    pub(super) fn wait_at_most(&self, stop: impl Fn() -> bool, most: Duration) -> bool {
        let until = Instant::now().checked_add(most);
        loop {
            let elapsed = self.start.elapsed();
            if stop() || self.over_at(elapsed) {
                return true;
            }
            let mut left = self.max.saturating_sub(elapsed);
            if let Some(until) = until {
                let now = Instant::now();
                if now >= until {
                    return false;
                }
                left = left.min(until - now);
            }
            std::thread::sleep(left.min(HOLDOFF_TICK));
        }
    }
}

/// A requested run as asked, without the push queue: chunk-aligned runs
/// of at most `max` pages, the first `limit` pages at most (the pages
/// after them come with the push).
pub(super) fn requested_as_asked(run: &PageRun, max: u32, limit: u64) -> Vec<PageRun> {
    let chunk = u64::from(CHUNK_PAGES);
    let max = u64::from(max.max(1));
    let end = run.end().min(run.first.saturating_add(limit));
    let mut out = Vec::new();
    let mut p = run.first;
    // Bounded by `limit` pages.
    while p < end {
        let stop = end.min((p / chunk + 1) * chunk).min(p + max);
        out.push(PageRun::new(run.region, p, (stop - p) as u32));
        p = stop;
    }
    out
}

/// Post-copy push order: pages around recent faults first ("bubbling" out
/// both ways from each pivot), then the rest in address order. Every page
/// leaves the queue exactly once.
pub(super) struct PushQueue {
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
    pub(super) fn new(unsent: RegionPages) -> Self {
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

    pub(super) fn next_run(&mut self, max: u32) -> Option<PageRun> {
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
    pub(super) fn take_requested(&mut self, run: &PageRun, max: u32) -> Vec<PageRun> {
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

    /// The pages of a requested run that already left the queue (pushed
    /// or requested before), the first `limit` of them at most, in chunk-
    /// aligned runs of at most `max` pages. The destination asks only for
    /// pages it has not placed: those are in flight behind pushed data, and
    /// sending them again on the urgent lane answers the fault in one round
    /// trip instead of after everything pushed before them.
    pub(super) fn sent_before(&self, run: &PageRun, max: u32, limit: u64) -> Vec<PageRun> {
        let Ok(set) = self.unsent.get(run.region) else {
            return Vec::new();
        };
        let end = run.end().min(set.capacity());
        let chunk = u64::from(CHUNK_PAGES);
        let max = u64::from(max.max(1));
        let mut out = Vec::new();
        let mut left = limit;
        let mut p = run.first;
        // Bounded by the run's length (capped at the region) and `limit`.
        while p < end && left > 0 {
            if set.contains(p) {
                p += 1;
                continue;
            }
            let stop = end.min((p / chunk + 1) * chunk).min(p + max).min(p + left);
            let mut q = p + 1;
            while q < stop && !set.contains(q) {
                q += 1;
            }
            out.push(PageRun::new(run.region, p, (q - p) as u32));
            left -= q - p;
            p = q;
        }
        out
    }

    /// Put pages back (the destination never received them).
    pub(super) fn requeue(&mut self, run: &PageRun) {
        if let Err(e) = self.unsent.insert_run(run) {
            // The caller checked the run against the layout.
            debug!(error = %e, run = %run, "post-copy: a requeued run outside the regions dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RegionInfo, RegionLayout};

    #[test]
    fn the_holdoff_ends_at_its_bound_though_requests_keep_coming() {
        let ms = Duration::from_millis;
        let h = HoldOff::new(ms(50), ms(4));
        assert!(!h.over_at(ms(0)), "no request yet: held");
        assert!(!h.over_at(ms(49)), "no request yet: held up to the bound");
        assert!(h.over_at(ms(50)), "over at the bound");
        // A request at every ms: never quiet, over at the bound all the same.
        let h = HoldOff::new(Duration::from_secs(3600), ms(4));
        h.last
            .store(ms(10).as_nanos() as u64 + 1, Ordering::Relaxed);
        assert!(!h.over_at(ms(12)), "a request 2 ms ago: held");
        assert!(h.over_at(ms(14)), "quiet for 4 ms after a request: over");
        let h = HoldOff::new(ms(50), ms(4));
        for t in 0..100 {
            h.last.store(ms(t).as_nanos() as u64 + 1, Ordering::Relaxed);
            assert_eq!(h.over_at(ms(t)), t >= 50, "at {t} ms");
        }
        // Zero: no hold-off, and requests are not even noted.
        let h = HoldOff::new(Duration::ZERO, ms(4));
        assert!(h.over_at(ms(0)));
        h.request();
        assert_eq!(h.last.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_destinations_settled_ends_the_holdoff_at_once() {
        let ms = Duration::from_millis;
        // No quiet rule (the source waits for the destination's word).
        let h = HoldOff::new(ms(100), Duration::MAX);
        h.last.store(ms(1).as_nanos() as u64 + 1, Ordering::Relaxed);
        assert!(!h.over_at(ms(60)), "no quiet rule: held after requests");
        assert!(!h.ended_by_settle());
        h.settle();
        assert!(h.over_at(ms(0)), "settled: over at once");
        assert!(h.ended_by_settle());
        // Past the bound (or the quiet rule), the word ends nothing.
        let h = HoldOff::new(Duration::ZERO, Duration::MAX);
        h.settle();
        assert!(!h.ended_by_settle());
        // A waiter sleeping out a long hold-off wakes within its tick.
        let h = HoldOff::new(Duration::from_secs(3600), Duration::MAX);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(ms(5));
                h.settle();
            });
            h.wait(|| false);
        });
        assert!(h.start.elapsed() < Duration::from_secs(3600));
    }

    /// The pusher's wait in slices (its signs of life between them): a
    /// slice ends short of a long hold-off, and the whole wait ends at the
    /// destination's word or a stop.
    #[test]
    fn a_wait_in_slices_ends_each_slice_and_then_the_holdoff() {
        let ms = Duration::from_millis;
        let h = HoldOff::new(Duration::from_secs(3600), Duration::MAX);
        assert!(!h.wait_at_most(|| false, ms(2)), "a slice passed: held");
        assert!(!h.wait_at_most(|| false, Duration::ZERO), "no slice: held");
        assert!(
            h.wait_at_most(|| true, Duration::from_secs(3600)),
            "stopped"
        );
        h.settle();
        assert!(h.wait_at_most(|| false, ms(2)), "settled: over");
        // The bound ends a slice that reaches past it.
        let h = HoldOff::new(ms(3), Duration::MAX);
        assert!(h.wait_at_most(|| false, Duration::from_secs(3600)));
    }

    #[test]
    fn waiting_out_the_holdoff_is_bounded_while_requests_keep_coming() {
        let h = HoldOff::new(Duration::from_millis(30), Duration::from_millis(4));
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Requests every 0.5 ms until the waiter is through
                // (bounded: at most 60 s of them).
                for _ in 0..120_000 {
                    if done.load(Ordering::Acquire) {
                        break;
                    }
                    h.request();
                    std::thread::sleep(Duration::from_micros(500));
                }
            });
            h.wait(|| false);
            done.store(true, Ordering::Release);
        });
        assert!(h.over_at(h.start.elapsed()));
        // A session that ends stops the wait at once.
        let h = HoldOff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        h.wait(|| true);
    }

    #[test]
    fn a_run_asked_for_without_the_queue_is_cut_at_chunks_and_the_limit() {
        let run = |f, c| PageRun::new(RegionId(1), f, c);
        assert_eq!(requested_as_asked(&run(5, 1), 64, 64), vec![run(5, 1)]);
        assert_eq!(
            requested_as_asked(&run(60, 10), 64, 64),
            vec![run(60, 4), run(64, 6)]
        );
        assert_eq!(
            requested_as_asked(&run(0, 200), 32, 70),
            vec![run(0, 32), run(32, 32), run(64, 6)]
        );
        assert!(requested_as_asked(&run(0, 5), 64, 0).is_empty());
    }

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
    fn pages_sent_before_a_request_are_named_for_resending() {
        let mut q = queue(256);
        let run = |f, c| PageRun::new(RegionId(1), f, c);
        assert!(q.sent_before(&run(10, 4), 64, 64).is_empty());
        q.take_requested(&run(10, 4), 64);
        // 60..70 crosses a chunk border: two runs; 10..14 sent before.
        q.take_requested(&run(60, 10), 64);
        assert_eq!(
            q.sent_before(&run(8, 8), 64, 64),
            vec![run(10, 4)],
            "only the pages that left the queue"
        );
        assert_eq!(
            q.sent_before(&run(58, 14), 64, 64),
            vec![run(60, 4), run(64, 6)]
        );
        assert_eq!(
            q.sent_before(&run(58, 14), 3, 5),
            vec![run(60, 3), run(63, 1), run(64, 1)]
        );
        // A run past the region's end names nothing beyond it.
        assert!(q.sent_before(&run(250, 1000), 64, 64).is_empty());
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
