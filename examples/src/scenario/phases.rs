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
    /// `precopy_p99_ms` split in two: the requests sent before the rounds
    /// after the first began (the set-up and round 0, the full copy) …
    pub precopy_first_p99_ms: Option<f64>,
    /// … and those sent from then to the pause (the later, small rounds
    /// and any throttle). The split falls at the pause less the later
    /// rounds' wall time ([`later_rounds_ms`]).
    pub precopy_later_p99_ms: Option<f64>,
}

/// The wall time (ms) of the rounds after the first, from the source's
/// report (`round_stats[].elapsed_ms`); 0 when it says none.
pub fn later_rounds_ms(report: &serde_json::Value) -> f64 {
    report
        .get("round_stats")
        .and_then(|r| r.as_array())
        .map(|rounds| {
            rounds
                .iter()
                .skip(1)
                .filter_map(|r| r.get("elapsed_ms").and_then(|e| e.as_f64()))
                .sum()
        })
        .unwrap_or(0.0)
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
        let split = (paused - later_rounds_ms(&s.report)).max(begin);
        let (first, later) = match precopy {
            Some(_) => (
                load.p99_sent_between(begin, split, paused),
                load.p99_sent_between(split, paused, paused),
            ),
            None => (None, None),
        };
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
            precopy_first_p99_ms: first,
            precopy_later_p99_ms: later,
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

    #[test]
    fn later_rounds_are_the_rounds_after_the_first() {
        let report = serde_json::json!({"round_stats": [
            {"round": 0, "elapsed_ms": 2000.0},
            {"round": 1, "elapsed_ms": 30.5},
            {"round": 2, "elapsed_ms": 20.0},
        ]});
        assert_eq!(later_rounds_ms(&report), 50.5);
        assert_eq!(
            later_rounds_ms(&serde_json::json!({"round_stats": [{"elapsed_ms": 9.0}]})),
            0.0
        );
        assert_eq!(later_rounds_ms(&serde_json::Value::Null), 0.0);
    }
}
