//! Slow loop turns, for finding where a client's worst latency comes from
//! (`LMIG_KVD_STALL_MS=X`): every turn of the server loop (poll return to
//! poll return) longer than X ms is printed on stderr as one JSON line,
//! `{"kvd_stall": {...}}`, with its start (`at_ns`, `CLOCK_MONOTONIC`, the
//! clock of the migration reports), and how its time went: `poll_ms` in
//! `epoll_wait`, `cpu_ms` on a CPU, `wait_ms` in the run queue (the
//! scheduler's `/proc/thread-self/schedstat`), the rest blocked (a page
//! fault, a lock). A request arriving at a turn's start waits about that
//! turn and part of the next, so the longest turns bound the loop's share
//! of a client's worst latency.

use std::time::Instant;

use crate::common::clock::now_mono_ns;

/// The environment variable that turns the log on: its threshold, ms.
pub const STALL_ENV: &str = "LMIG_KVD_STALL_MS";

/// Where a turn started.
#[derive(Clone, Copy)]
struct Mark {
    at: Instant,
    at_ns: u64,
    cpu_ns: u64,
    wait_ns: u64,
    requests: u64,
}

impl Mark {
    fn now(requests: u64) -> Self {
        let (cpu_ns, wait_ns) = sched();
        Self {
            at: Instant::now(),
            at_ns: now_mono_ns(),
            cpu_ns,
            wait_ns,
            requests,
        }
    }
}

/// This thread's CPU time and run-queue wait so far, ns.
fn sched() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut f = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// The log of one loop (inactive unless [`STALL_ENV`] is set).
pub struct StallLog {
    threshold_ms: f64,
    turn: Option<Mark>,
    polled_ms: f64,
}

impl StallLog {
    /// From the environment; `None` when it is not asked for.
    pub fn from_env() -> Option<Self> {
        let threshold_ms = std::env::var(STALL_ENV).ok()?.parse().ok()?;
        Some(Self {
            threshold_ms,
            turn: None,
            polled_ms: 0.0,
        })
    }

    /// The loop is about to poll.
    pub fn before_poll(&mut self) -> Instant {
        Instant::now()
    }

    /// The poll returned (`events` of them, the loop having answered
    /// `requests` so far): end the previous turn, start the next.
    pub fn after_poll(&mut self, polled_at: Instant, events: usize, requests: u64, parked: u64) {
        let poll_ms = polled_at.elapsed().as_secs_f64() * 1e3;
        let now = Mark::now(requests);
        if let Some(t) = self.turn.replace(now) {
            let turn_ms = (now.at - t.at).as_secs_f64() * 1e3;
            if turn_ms > self.threshold_ms {
                let line = serde_json::json!({ "kvd_stall": {
                    "pid": std::process::id(),
                    "at_ns": t.at_ns,
                    "turn_ms": turn_ms,
                    "poll_ms": poll_ms,
                    "cpu_ms": now.cpu_ns.saturating_sub(t.cpu_ns) as f64 / 1e6,
                    "wait_ms": now.wait_ns.saturating_sub(t.wait_ns) as f64 / 1e6,
                    "prev_poll_ms": self.polled_ms,
                    "requests": requests.saturating_sub(t.requests),
                    "next_events": events,
                    "parked": parked,
                }});
                eprintln!("{line}");
            }
        }
        self.polled_ms = poll_ms;
    }
}
