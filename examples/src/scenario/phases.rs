//! The clients' latency per phase of the migration: before it (the
//! baseline), during the pre-copy rounds, and during post-copy, from the
//! requests' send times and the sessions' timestamps (one monotonic clock:
//! every process runs on this host).

use std::time::Duration;

use crate::common::clock::mono_ns;
use crate::figures::{DestinationFigures, SourceFigures};
use crate::kvd::load::LoadReport;

/// How much load before the migration makes the baseline (at most: the
/// scenario's warm-up may be shorter).
pub const BASELINE_WINDOW: Duration = Duration::from_secs(2);

/// The clients' 99th percentile latency (ms) in each phase; `None` where a
/// phase did not happen or no request fell in it.
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct PhaseLatency {
    /// Requests sent in the `window` before the `migrate` command and
    /// answered before it.
    pub baseline_p99_ms: Option<f64>,
    /// Requests sent from the `migrate` command to the pause and answered
    /// before the pause (a request the freeze held counts in the stall,
    /// not here); `None` without pre-copy rounds.
    pub precopy_p99_ms: Option<f64>,
    /// Requests sent from `Commit` to the last missing page placed;
    /// `None` without post-copy.
    pub postcopy_p99_ms: Option<f64>,
}

impl PhaseLatency {
    /// Cut `load`'s requests by the phases the two sides reported;
    /// `window`: the baseline's length.
    pub fn measure(
        load: &LoadReport,
        source: Option<&SourceFigures>,
        destination: Option<&DestinationFigures>,
        window: Duration,
    ) -> Self {
        let (Some(started), Some(s)) = (load.started, source) else {
            return Self::default();
        };
        // ns since the epoch of `CLOCK_MONOTONIC` → ms after the load started.
        let zero = mono_ns(started) as f64;
        let ms = |ns: u64| (ns as f64 - zero) / 1e6;
        let begin = ms(s.started_ns);
        let paused = ms(s.paused_ns);
        let baseline = load.p99_sent_between(begin - window.as_secs_f64() * 1e3, begin, begin);
        let precopy = (s.rounds > 0)
            .then(|| load.p99_sent_between(begin, paused, paused))
            .flatten();
        let postcopy = (s.mode == "postcopy" || s.switched_to_postcopy)
            .then(|| {
                let end = destination.and_then(|d| d.complete_ns)?;
                load.p99_sent_between(ms(s.commit_ns), ms(end), f64::INFINITY)
            })
            .flatten();
        Self {
            baseline_p99_ms: baseline,
            precopy_p99_ms: precopy,
            postcopy_p99_ms: postcopy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_take_only_their_requests() {
        let load = LoadReport {
            // sent ms, latency ms: 100 before the migration (1 ms), 100 in
            // pre-copy (4 ms), one held by the freeze (50 ms), 100 after.
            samples: (0..100)
                .map(|i| (i as f32 * 10.0, 1.0))
                .chain((0..100).map(|i| (1000.0 + i as f32 * 10.0, 4.0)))
                .chain([(1999.0, 50.0)])
                .chain((0..100).map(|i| (2100.0 + i as f32, 9.0)))
                .collect(),
            ..LoadReport::default()
        };
        assert_eq!(load.p99_sent_between(0.0, 1000.0, 1000.0), Some(1.0));
        assert_eq!(load.p99_sent_between(1000.0, 2000.0, 2000.0), Some(4.0));
        // The held request counts once its answer is allowed.
        assert_eq!(
            load.p99_sent_between(1990.0, 2000.0, f64::INFINITY),
            Some(50.0)
        );
        assert_eq!(load.p99_sent_between(2100.0, 2200.0, 1e9), Some(9.0));
        assert_eq!(load.p99_sent_between(5000.0, 6000.0, 1e9), None);
    }
}
