//! Where a running source session is: the [`Progress`] snapshot, and the
//! state behind it that the session updates as it goes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::session::pace::Meter;
use crate::traits::Phase;

/// A snapshot of a running source session
/// ([`SourceControl::progress`](super::SourceControl::progress)): cheap
/// (a lock held for a copy, a few atomic loads), taken from any thread at
/// any time.
///
/// Rates are in bytes per second. A field the session has not measured yet
/// is 0 (or `None`).
#[derive(Copy, Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Progress {
    /// The phase the session is in (`None`: not started).
    pub phase: Option<Phase>,
    /// The pre-copy round running or last run.
    pub round: u32,
    /// Pages the current pre-copy round sends.
    pub round_pages: u64,
    /// Of those, pages sent so far.
    pub round_pages_sent: u64,
    /// Pages of the program's memory.
    pub total_pages: u64,
    /// Pages sent so far, every phase (zero pages included).
    pub pages_sent: u64,
    /// Bytes put on the channel for pages so far (data plus a fixed
    /// per-message overhead, as [`SourceReport::bytes_sent`](super::SourceReport::bytes_sent)).
    pub bytes_sent: u64,
    /// Pages the program dirtied during the last finished round: what the
    /// next round (or the freeze) sends.
    pub dirty_pages: u64,
    /// How fast the program dirtied memory during the last finished round.
    pub dirty_rate: f64,
    /// The bandwidth measured over the current round so far (over the
    /// last finished round right after it ended).
    pub bandwidth: f64,
    /// The freeze if it began now: the dirty bytes at the measured bandwidth.
    pub estimated_freeze: Option<Duration>,
    /// The bandwidth limit in force (0: none).
    pub bandwidth_limit: u64,
    /// Since the session started.
    pub elapsed: Duration,
}

impl Progress {
    /// How far the current pre-copy round is, 0.0 to 1.0 (0 before it started).
    pub fn round_fraction(&self) -> f64 {
        if self.round_pages == 0 {
            return 0.0;
        }
        (self.round_pages_sent as f64 / self.round_pages as f64).min(1.0)
    }
}

/// What the session records at its phase and round boundaries; the page
/// counters live in the [`Meter`].
#[derive(Debug, Default)]
pub(super) struct ProgressState {
    inner: Mutex<Marks>,
}

#[derive(Debug, Default)]
struct Marks {
    started: Option<Instant>,
    phase: Option<Phase>,
    round: u32,
    round_pages: u64,
    total_pages: u64,
    /// The meter's pages and bytes when the current round began, and when.
    round_start: (u64, u64, Option<Instant>),
    dirty_pages: u64,
    dirty_bytes: u64,
    dirty_rate: f64,
    /// The last finished round's bandwidth.
    bandwidth: f64,
}

impl ProgressState {
    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session started with this much memory.
    pub fn started(&self, total_pages: u64) {
        let mut m = self.marks();
        m.started = Some(Instant::now());
        m.total_pages = total_pages;
    }

    /// The session entered `phase`.
    pub fn phase(&self, phase: Phase) {
        self.marks().phase = Some(phase);
    }

    /// Round `round` begins, to send `pages` pages.
    pub fn round_begins(&self, meter: &Meter, round: u32, pages: u64) {
        let (sent, bytes) = meter.sent();
        let mut m = self.marks();
        m.round = round;
        m.round_pages = pages;
        m.round_start = (sent, bytes, Some(Instant::now()));
    }

    /// The round ended: `bytes` sent in `elapsed`, `dirty_pages` pages
    /// (`dirty_bytes` bytes) dirtied meanwhile.
    pub fn round_ends(&self, bytes: u64, elapsed: Duration, dirty_pages: u64, dirty_bytes: u64) {
        let secs = elapsed.as_secs_f64();
        let mut m = self.marks();
        m.dirty_pages = dirty_pages;
        m.dirty_bytes = dirty_bytes;
        if secs > 0.0 {
            m.dirty_rate = dirty_bytes as f64 / secs;
            m.bandwidth = bytes as f64 / secs;
        }
    }

    /// The snapshot, with the meter's counters.
    pub fn snapshot(&self, meter: &Meter) -> Progress {
        let (pages_sent, bytes_sent) = meter.sent();
        let m = self.marks();
        let (round_sent, round_bytes, round_at) = m.round_start;
        let in_round = matches!(m.phase, Some(Phase::Precopy(_)));
        let live = round_at
            .filter(|_| in_round)
            .map(|at| at.elapsed().as_secs_f64())
            .filter(|&s| s > 0.0 && bytes_sent > round_bytes)
            .map(|s| (bytes_sent - round_bytes) as f64 / s);
        let bandwidth = live.unwrap_or(m.bandwidth);
        Progress {
            phase: m.phase,
            round: m.round,
            round_pages: m.round_pages,
            round_pages_sent: if in_round {
                (pages_sent - round_sent).min(m.round_pages)
            } else {
                m.round_pages
            },
            total_pages: m.total_pages,
            pages_sent,
            bytes_sent,
            dirty_pages: m.dirty_pages,
            dirty_rate: m.dirty_rate,
            bandwidth,
            estimated_freeze: (bandwidth > 0.0)
                .then(|| Duration::from_secs_f64(m.dirty_bytes as f64 / bandwidth)),
            bandwidth_limit: meter.limit(),
            elapsed: m.started.map(|s| s.elapsed()).unwrap_or_default(),
        }
    }
}
