//! The convergence policy: after each pre-copy round, decide whether to run
//! another round, freeze now, switch to post-copy, or ask the program to
//! slow its writes down.
//!
//! The estimate is simple and measured, not assumed: the bandwidth is what
//! the last rounds actually achieved (bytes sent / round time, smoothed), the
//! dirty rate is what the tracker found per second of round, and the
//! estimated freeze is the remaining dirty bytes over that bandwidth plus a
//! fixed cost the caller knows (sockets, program state).

use std::time::Duration;

/// What happened in one pre-copy round, measured by the source session.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct RoundStats {
    /// Round number, from 0.
    pub round: u32,
    /// Pages sent in the round, zero pages included.
    pub pages_sent: u64,
    /// Of which zero pages (sent as a flag, no data).
    pub zero_pages: u64,
    /// Bytes put on the channel in the round (page data plus headers).
    pub bytes_sent: u64,
    /// Wall time of the round, send and collect.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "elapsed_ms", with = "crate::serde_ms")
    )]
    pub elapsed: Duration,
    /// Pages found dirty by the collect that ended the round: what the next
    /// round (or the freeze) must send.
    pub dirty_pages: u64,
    /// The same in bytes.
    pub dirty_bytes: u64,
}

/// The policy's current view.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct Estimate {
    /// Bytes per second the channel achieved, smoothed.
    pub bandwidth_bps: f64,
    /// Bytes per second the program dirties, smoothed.
    pub dirty_rate_bps: f64,
    /// The freeze if we froze now.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "freeze_ms", with = "crate::serde_ms")
    )]
    pub freeze: Duration,
}

/// The policy's answer after a round.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run another pre-copy round.
    Continue,
    /// Pause the program and send what is left.
    Freeze,
    /// Pause briefly, move sockets and state, resume at the destination and
    /// fetch the remaining pages on demand.
    Postcopy,
    /// Ask the program to slow its writes to this percentage of their rate,
    /// then continue.
    Throttle {
        /// Target rate as a percentage (1..=99).
        percent: u8,
    },
}

/// Decides after each round. Implement it to plug in your own rules.
pub trait Policy: Send {
    /// Round `stats` just ended; what next? `throttle_refused` is true when the
    /// program declined the last throttle request.
    fn decide(&mut self, stats: &RoundStats, throttle_refused: bool) -> Decision;

    /// The current estimate (for observers and reports).
    fn estimate(&self) -> Estimate;

    /// Why the last decision was taken, in words (for reports).
    fn explain(&self) -> String {
        String::new()
    }
}

/// What to do when pre-copy does not converge.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Fallback {
    /// Freeze anyway and accept a longer freeze.
    #[default]
    Freeze,
    /// Switch to post-copy for what is left (hybrid migration).
    Postcopy,
    /// Ask the program to throttle, harder each round; freeze when it cannot.
    Throttle,
}

/// Settings of [`ConvergencePolicy`].
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    /// Freeze as soon as the estimated freeze is at most this.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "downtime_target_ms", with = "crate::serde_ms")
    )]
    pub downtime_target: Duration,
    /// Most pre-copy rounds before the fallback applies.
    pub max_rounds: u32,
    /// What to do when rounds stop converging or `max_rounds` is reached.
    pub fallback: Fallback,
    /// Freeze cost that does not depend on memory (sockets, state), added to the estimate.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "fixed_freeze_cost_ms", with = "crate::serde_ms")
    )]
    pub fixed_freeze_cost: Duration,
    /// A round "makes progress" when it leaves at most this fraction of the
    /// previous round's dirty bytes; after `stall_rounds` rounds without
    /// progress the fallback applies.
    pub progress_ratio: f64,
    /// See `progress_ratio`.
    pub stall_rounds: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            downtime_target: Duration::from_millis(5),
            max_rounds: 30,
            fallback: Fallback::Freeze,
            fixed_freeze_cost: Duration::ZERO,
            progress_ratio: 0.8,
            stall_rounds: 3,
        }
    }
}

/// The default policy: estimate the freeze from measured bandwidth and dirty
/// bytes; freeze when it meets the target; fall back when rounds stall.
#[derive(Clone, Debug)]
pub struct ConvergencePolicy {
    config: PolicyConfig,
    bandwidth: Option<f64>,
    dirty_rate: Option<f64>,
    last_dirty: Option<u64>,
    stalled: u32,
    throttle: u8,
    estimate: Estimate,
    reason: String,
}

const SMOOTHING: f64 = 0.5;

fn smooth(old: Option<f64>, sample: f64) -> f64 {
    match old {
        Some(o) => o * (1.0 - SMOOTHING) + sample * SMOOTHING,
        None => sample,
    }
}

impl ConvergencePolicy {
    /// A policy with these settings.
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            config,
            bandwidth: None,
            dirty_rate: None,
            last_dirty: None,
            stalled: 0,
            throttle: 100,
            estimate: Estimate::default(),
            reason: String::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    fn fallback(&mut self, throttle_refused: bool) -> Decision {
        match self.config.fallback {
            Fallback::Freeze => Decision::Freeze,
            Fallback::Postcopy => Decision::Postcopy,
            Fallback::Throttle if throttle_refused || self.throttle <= 10 => Decision::Freeze,
            Fallback::Throttle => {
                self.throttle = (self.throttle / 2).max(10);
                self.stalled = 0;
                Decision::Throttle {
                    percent: self.throttle,
                }
            }
        }
    }
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        Self::new(PolicyConfig::default())
    }
}

impl Policy for ConvergencePolicy {
    fn decide(&mut self, s: &RoundStats, throttle_refused: bool) -> Decision {
        let secs = s.elapsed.as_secs_f64().max(1e-6);
        // Tiny rounds measure latency, not bandwidth: only learn from rounds
        // that moved a meaningful amount.
        if s.bytes_sent >= 1 << 20 || self.bandwidth.is_none() {
            self.bandwidth = Some(smooth(self.bandwidth, s.bytes_sent as f64 / secs));
        }
        self.dirty_rate = Some(smooth(self.dirty_rate, s.dirty_bytes as f64 / secs));
        let bw = self.bandwidth.unwrap_or(0.0).max(1.0);
        let freeze =
            Duration::from_secs_f64(s.dirty_bytes as f64 / bw) + self.config.fixed_freeze_cost;
        self.estimate = Estimate {
            bandwidth_bps: bw,
            dirty_rate_bps: self.dirty_rate.unwrap_or(0.0),
            freeze,
        };

        let est = format!(
            "round {}: {} dirty bytes at {:.0} MB/s measured bandwidth, dirty rate {:.0} MB/s: estimated freeze {:.2} ms (target {:.2} ms)",
            s.round,
            s.dirty_bytes,
            bw / 1e6,
            self.estimate.dirty_rate_bps / 1e6,
            freeze.as_secs_f64() * 1e3,
            self.config.downtime_target.as_secs_f64() * 1e3
        );
        if freeze <= self.config.downtime_target {
            self.reason = format!("{est}; under the target: freeze");
            return Decision::Freeze;
        }
        match self.last_dirty {
            Some(prev) if (s.dirty_bytes as f64) > prev as f64 * self.config.progress_ratio => {
                self.stalled += 1
            }
            _ => self.stalled = 0,
        }
        self.last_dirty = Some(s.dirty_bytes);
        let why = if s.round + 1 >= self.config.max_rounds {
            Some(format!("round limit {} reached", self.config.max_rounds))
        } else if self.stalled >= self.config.stall_rounds {
            Some(format!(
                "not converging: {} rounds in a row left more than {:.0}% of the previous round's dirty bytes",
                self.stalled,
                self.config.progress_ratio * 100.0
            ))
        } else {
            None
        };
        if let Some(why) = why {
            let d = self.fallback(throttle_refused);
            self.reason = format!("{est}; {why}: {d:?} (fallback {:?})", self.config.fallback);
            return d;
        }
        self.reason = format!("{est}: another round");
        Decision::Continue
    }

    fn estimate(&self) -> Estimate {
        self.estimate
    }

    fn explain(&self) -> String {
        self.reason.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(round: u32, bytes: u64, ms: u64, dirty: u64) -> RoundStats {
        RoundStats {
            round,
            pages_sent: bytes / 4096,
            zero_pages: 0,
            bytes_sent: bytes,
            elapsed: Duration::from_millis(ms),
            dirty_pages: dirty / 4096,
            dirty_bytes: dirty,
        }
    }

    #[test]
    fn freezes_once_estimate_meets_target() {
        let mut p = ConvergencePolicy::default();
        // 1 GiB in 350 ms: ~3 GB/s. 35 MB dirty: ~11 ms > 5 ms.
        assert_eq!(
            p.decide(&round(0, 1 << 30, 350, 35 << 20), false),
            Decision::Continue
        );
        // 35 MB in 12 ms, 1 MB dirty: well under 5 ms.
        assert_eq!(
            p.decide(&round(1, 35 << 20, 12, 1 << 20), false),
            Decision::Freeze
        );
        assert!(p.estimate().freeze < Duration::from_millis(5));
    }

    #[test]
    fn stalled_rounds_trigger_fallback() {
        for (fallback, want) in [
            (Fallback::Freeze, Decision::Freeze),
            (Fallback::Postcopy, Decision::Postcopy),
            (Fallback::Throttle, Decision::Throttle { percent: 50 }),
        ] {
            let mut p = ConvergencePolicy::new(PolicyConfig {
                fallback,
                ..PolicyConfig::default()
            });
            // Dirtying as fast as we send: never converges.
            let mut last = Decision::Continue;
            for r in 0..10 {
                last = p.decide(&round(r, 300 << 20, 100, 300 << 20), false);
                if last != Decision::Continue {
                    break;
                }
            }
            assert_eq!(last, want);
        }
    }

    #[test]
    fn refused_throttle_freezes() {
        let mut p = ConvergencePolicy::new(PolicyConfig {
            fallback: Fallback::Throttle,
            max_rounds: 1,
            ..PolicyConfig::default()
        });
        assert_eq!(
            p.decide(&round(0, 300 << 20, 100, 300 << 20), true),
            Decision::Freeze
        );
    }

    #[test]
    fn max_rounds_is_a_hard_stop() {
        let mut p = ConvergencePolicy::new(PolicyConfig {
            max_rounds: 2,
            ..PolicyConfig::default()
        });
        assert_eq!(
            p.decide(&round(0, 1 << 30, 350, 100 << 20), false),
            Decision::Continue
        );
        assert_eq!(
            p.decide(&round(1, 100 << 20, 35, 50 << 20), false),
            Decision::Freeze
        );
    }
}
