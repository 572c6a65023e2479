//! The convergence policy: after each pre-copy round, decide whether to run
//! another round, freeze now, switch to post-copy, or ask the program to
//! slow its writes down.
//!
//! The estimate is simple and measured, not assumed: the bandwidth is what
//! the last rounds actually achieved (bytes sent / round time, smoothed), the
//! dirty rate is what the tracker found per second of round, and the
//! estimated freeze is the remaining dirty bytes and the bytes queued in the
//! sockets over that bandwidth, plus a fixed cost the caller knows (the
//! sockets' per-connection work, program state).

use std::time::Duration;

/// What happened in one pre-copy round, measured by the source session.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
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
    /// Bytes queued in the program's sockets when the round ended
    /// ([`crate::traits::SocketSource::queued_bytes`]): the freeze captures
    /// and sends them with the last dirty pages.
    pub queued_bytes: u64,
}

/// The policy's current view (a [`Policy`] of your own starts from
/// `Estimate::default()` and sets the fields).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
#[non_exhaustive]
pub enum Fallback {
    /// Freeze anyway and accept a longer freeze.
    #[default]
    Freeze,
    /// Switch to post-copy for what is left (hybrid migration).
    Postcopy,
    /// Ask the program to throttle, harder each round; freeze when it cannot.
    Throttle,
}

/// Settings of [`ConvergencePolicy`]: `PolicyConfig::default()` and the
/// `with_*` setters (the struct is `#[non_exhaustive]`).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PolicyConfig {
    /// Freeze as soon as the estimated freeze is at most this. Bytes queued
    /// in sockets count in the estimate, but rounds cannot send them: when
    /// the memory left meets the target and only the queues keep the
    /// estimate above it, the policy freezes unless the queues drained by
    /// `progress_ratio` since the last round.
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
    /// With a fallback other than [`Fallback::Freeze`], apply it as soon as
    /// the estimate says pre-copy cannot reach the target, without waiting
    /// for `stall_rounds` stalled rounds: when a round leaves at least this
    /// fraction of what it sent (after round 0; the dirty rate over the
    /// measured bandwidth when that is higher), and at that ratio the
    /// dirty bytes would need more than `stall_rounds` further rounds to
    /// shrink to the target. Each round then only trades bandwidth and
    /// CPU for a little less dirty memory: hybrid switches to post-copy,
    /// auto-converge throttles (harder each round while it holds).
    /// QEMU's auto-converge uses the same 50% (pages dirtied over pages
    /// transferred). With [`Fallback::Freeze`] the rule does not apply: an
    /// early freeze would only be longer.
    pub switch_ratio: f64,
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
            switch_ratio: 0.5,
        }
    }
}

impl PolicyConfig {
    /// Sets [`downtime_target`](Self::downtime_target).
    #[must_use]
    pub fn with_downtime_target(mut self, target: Duration) -> Self {
        self.downtime_target = target;
        self
    }

    /// Sets [`max_rounds`](Self::max_rounds).
    #[must_use]
    pub fn with_max_rounds(mut self, rounds: u32) -> Self {
        self.max_rounds = rounds;
        self
    }

    /// Sets [`fallback`](Self::fallback).
    #[must_use]
    pub fn with_fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// Sets [`fixed_freeze_cost`](Self::fixed_freeze_cost).
    #[must_use]
    pub fn with_fixed_freeze_cost(mut self, cost: Duration) -> Self {
        self.fixed_freeze_cost = cost;
        self
    }

    /// Sets [`progress_ratio`](Self::progress_ratio).
    #[must_use]
    pub fn with_progress_ratio(mut self, ratio: f64) -> Self {
        self.progress_ratio = ratio;
        self
    }

    /// Sets [`stall_rounds`](Self::stall_rounds).
    #[must_use]
    pub fn with_stall_rounds(mut self, rounds: u32) -> Self {
        self.stall_rounds = rounds;
        self
    }

    /// Sets [`switch_ratio`](Self::switch_ratio) (above 1: never early).
    #[must_use]
    pub fn with_switch_ratio(mut self, ratio: f64) -> Self {
        self.switch_ratio = ratio;
        self
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
    /// The previous round's queued socket bytes.
    last_queued: Option<u64>,
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
            last_queued: None,
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

    /// Why pre-copy cannot reach the target at the rate the rounds shrink
    /// (see [`PolicyConfig::switch_ratio`]); `None` when it can, or when the
    /// fallback is to freeze.
    fn cannot_converge(&self, s: &RoundStats, bw: f64) -> Option<String> {
        if self.config.fallback == Fallback::Freeze || s.dirty_bytes == 0 {
            return None;
        }
        // What a round leaves of what it sent: measured by the round itself
        // after the first (round 0 sent everything, whatever was dirty:
        // there, the dirty rate over the bandwidth). Not smoothed, so a
        // throttle shows in the next round.
        let shrink = if s.round > 0 && s.bytes_sent >= 1 << 20 {
            s.dirty_bytes as f64 / s.bytes_sent as f64
        } else {
            self.estimate.dirty_rate_bps / bw
        };
        if shrink < self.config.switch_ratio {
            return None;
        }
        // The dirty bytes a freeze within the target could send.
        let room = self
            .config
            .downtime_target
            .saturating_sub(self.config.fixed_freeze_cost)
            .as_secs_f64()
            * bw
            - s.queued_bytes as f64;
        let rounds = if shrink >= 1.0 || room <= 0.0 {
            f64::INFINITY
        } else {
            ((room / s.dirty_bytes as f64).ln() / shrink.ln()).max(0.0)
        };
        (rounds > f64::from(self.config.stall_rounds)).then(|| {
            format!(
                "pre-copy cannot reach the target: a round leaves {:.0}% of what it sent, {:.1} more rounds needed (more than {})",
                shrink * 100.0,
                rounds,
                self.config.stall_rounds
            )
        })
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
        // Queued socket data crosses the same channel as the pages, in the freeze.
        let memory =
            Duration::from_secs_f64(s.dirty_bytes as f64 / bw) + self.config.fixed_freeze_cost;
        let freeze = memory + Duration::from_secs_f64(s.queued_bytes as f64 / bw);
        let last_queued = self.last_queued.replace(s.queued_bytes);
        self.estimate = Estimate {
            bandwidth_bps: bw,
            dirty_rate_bps: self.dirty_rate.unwrap_or(0.0),
            freeze,
        };

        let est = format!(
            "round {}: {} dirty bytes and {} queued in sockets at {:.0} MB/s measured bandwidth, dirty rate {:.0} MB/s: estimated freeze {:.2} ms (target {:.2} ms)",
            s.round,
            s.dirty_bytes,
            s.queued_bytes,
            bw / 1e6,
            self.estimate.dirty_rate_bps / 1e6,
            freeze.as_secs_f64() * 1e3,
            self.config.downtime_target.as_secs_f64() * 1e3
        );
        if freeze <= self.config.downtime_target {
            self.reason = format!("{est}; under the target: freeze");
            return Decision::Freeze;
        }
        if memory <= self.config.downtime_target {
            // Only the sockets' queues keep the estimate above the target, and
            // rounds cannot send them: go on only while they drain (the
            // program's clients reading).
            let draining = last_queued.is_some_and(|prev| {
                (s.queued_bytes as f64) <= prev as f64 * self.config.progress_ratio
            });
            if !draining {
                self.reason = format!(
                    "{est}; the memory left meets the target, the socket queues are not draining: freeze"
                );
                return Decision::Freeze;
            }
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
        } else if let Some(early) = self.cannot_converge(s, bw) {
            Some(early)
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
            queued_bytes: 0,
        }
    }

    #[test]
    fn queued_socket_bytes_count_in_the_estimate() {
        // 1 GiB in 500 ms: 2147.5 MB/s. 1 MiB dirty alone: 0.49 ms, a freeze.
        let mut alone = ConvergencePolicy::default();
        let r = round(0, 1 << 30, 500, 1 << 20);
        assert_eq!(alone.decide(&r, false), Decision::Freeze);
        // With 32 MiB queued in sockets: 33 MiB at the same bandwidth.
        let mut p = ConvergencePolicy::default();
        let queued = RoundStats {
            queued_bytes: 32 << 20,
            ..r
        };
        // Above the target only because of the queues, which rounds cannot
        // send: freeze, with the queues in the estimate.
        assert_eq!(p.decide(&queued, false), Decision::Freeze);
        let bw = (1u64 << 30) as f64 / 0.5;
        let want = (33u64 << 20) as f64 / bw;
        let got = p.estimate().freeze.as_secs_f64();
        assert!(
            (got - want).abs() < 1e-6,
            "estimated {got} s, want {want} s"
        );
        assert!(
            p.explain().contains("33554432 queued in sockets"),
            "{}",
            p.explain()
        );
        assert!(p.explain().contains("not draining"), "{}", p.explain());
        // The fixed cost still adds on top.
        let mut fixed = ConvergencePolicy::new(PolicyConfig {
            fixed_freeze_cost: Duration::from_millis(3),
            ..PolicyConfig::default()
        });
        fixed.decide(&queued, false);
        let got = fixed.estimate().freeze.as_secs_f64();
        assert!((got - want - 0.003).abs() < 1e-6, "{got}");
    }

    #[test]
    fn draining_queues_get_more_rounds() {
        let mut p = ConvergencePolicy::default();
        // Much memory dirty: another round, whatever the queues.
        let first = RoundStats {
            queued_bytes: 128 << 20,
            ..round(0, 1 << 30, 500, 64 << 20)
        };
        assert_eq!(p.decide(&first, false), Decision::Continue);
        // The memory meets the target; the queues went from 128 to 32 MiB.
        let draining = RoundStats {
            queued_bytes: 32 << 20,
            ..round(1, 64 << 20, 30, 1 << 20)
        };
        assert_eq!(p.decide(&draining, false), Decision::Continue);
        // They stopped draining: freeze.
        let stuck = RoundStats {
            queued_bytes: 30 << 20,
            ..round(2, 1 << 20, 1, 1 << 20)
        };
        assert_eq!(p.decide(&stuck, false), Decision::Freeze);
        // Drained below the target: freeze for that reason.
        let mut q = ConvergencePolicy::default();
        q.decide(&first, false);
        let drained = RoundStats {
            queued_bytes: 1 << 20,
            ..round(1, 64 << 20, 30, 1 << 20)
        };
        assert_eq!(q.decide(&drained, false), Decision::Freeze);
        assert!(q.explain().contains("under the target"), "{}", q.explain());
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
    fn hybrid_switches_once_the_rounds_cannot_reach_the_target() {
        let hybrid =
            || ConvergencePolicy::new(PolicyConfig::default().with_fallback(Fallback::Postcopy));
        // Hot memory: 1 GiB in 1.5 s (716 MB/s) while 680 MB got dirty
        // (453 MB/s, 63% of the bandwidth). At that ratio 680 MB needs 11
        // rounds to shrink to the 3.6 MB a 5 ms freeze sends: switch now,
        // not after three stalled rounds.
        let mut p = hybrid();
        assert_eq!(
            p.decide(&round(0, 1 << 30, 1500, 680 << 20), false),
            Decision::Postcopy
        );
        assert!(
            p.explain().contains("cannot reach the target"),
            "{}",
            p.explain()
        );
        // The same rounds with the freeze fallback go on: an early freeze
        // would only be longer.
        let mut f = ConvergencePolicy::default();
        assert_eq!(
            f.decide(&round(0, 1 << 30, 1500, 680 << 20), false),
            Decision::Continue
        );
        // Round 0 left little; round 1 left 63% of what it sent: switch.
        let mut q = hybrid();
        assert_eq!(
            q.decide(&round(0, 1 << 30, 1500, 200 << 20), false),
            Decision::Continue
        );
        assert_eq!(
            q.decide(&round(1, 200 << 20, 280, 126 << 20), false),
            Decision::Postcopy
        );
        // A cool program converges in pre-copy: 100 MB/s against 716.
        let mut c = hybrid();
        let mut decisions = vec![c.decide(&round(0, 1 << 30, 1500, 150 << 20), false)];
        decisions.push(c.decide(&round(1, 150 << 20, 210, 21 << 20), false));
        decisions.push(c.decide(&round(2, 21 << 20, 30, 3 << 20), false));
        assert_eq!(
            decisions,
            [Decision::Continue, Decision::Continue, Decision::Freeze]
        );
        // A round that leaves 60% of a little: two more rounds reach the
        // target, within `stall_rounds`: another round.
        let mut l = hybrid();
        l.decide(&round(0, 1 << 30, 1500, 16 << 20), false);
        assert_eq!(
            l.decide(&round(1, 16 << 20, 22, 9 << 20), false),
            Decision::Continue,
            "{}",
            l.explain()
        );
    }

    #[test]
    fn auto_converge_throttles_harder_each_round_then_freezes() {
        let mut p =
            ConvergencePolicy::new(PolicyConfig::default().with_fallback(Fallback::Throttle));
        let mut asked = Vec::new();
        // A program that never slows down: 300 MB dirty per 300 MB sent.
        for r in 0..10 {
            match p.decide(&round(r, 300 << 20, 400, 300 << 20), false) {
                Decision::Throttle { percent } => asked.push(percent),
                Decision::Freeze => break,
                d => panic!("round {r}: {d:?}"),
            }
        }
        assert_eq!(asked, [50, 25, 12, 10]);
        // A program that refuses: freeze at once, the rounds end.
        let mut r =
            ConvergencePolicy::new(PolicyConfig::default().with_fallback(Fallback::Throttle));
        assert!(matches!(
            r.decide(&round(0, 300 << 20, 400, 300 << 20), false),
            Decision::Throttle { .. }
        ));
        assert_eq!(
            r.decide(&round(1, 300 << 20, 400, 300 << 20), true),
            Decision::Freeze
        );
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
