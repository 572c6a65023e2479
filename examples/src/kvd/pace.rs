//! kvd's loop as the migration sees it: how long its passes take (its own
//! service latency, per request) and the throttle auto-converge asks for
//! (`StateSource::throttle`): after each pass the loop sleeps so that it
//! runs at most the asked percentage of the time, a bounded sleep per pass.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Buckets of the pass histogram: pass times up to 2^(BUCKETS-1) µs (the
/// last bucket holds everything longer, about a second and more).
const BUCKETS: usize = 21;
/// The longest sleep after one pass, however hard the throttle.
pub const MAX_THROTTLE_SLEEP: Duration = Duration::from_millis(2);
/// The hardest throttle the loop accepts: it runs at least this
/// percentage of the time.
pub const MIN_PERCENT: u8 = 10;

/// The loop's pass times and its throttle, shared with the migration.
#[derive(Debug, Default)]
pub struct LoopPace {
    /// Requests by the time the pass that answered them took: bucket `i`
    /// holds passes of less than 2^i µs (and at least 2^(i-1)).
    passes: [AtomicU64; BUCKETS],
    /// The throttle: the loop runs this percentage of the time; 0 (the
    /// default) or 100: not throttled.
    percent: AtomicU8,
}

/// A copy of the histogram at one moment ([`LoopPace::snapshot`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassHistogram([u64; BUCKETS]);

impl PassHistogram {
    /// The 99th percentile of the requests answered between `earlier` and
    /// this snapshot, in ms (the upper bound of its bucket: a power of two
    /// in µs); `None` when no request was answered in between.
    pub fn p99_ms_since(&self, earlier: &PassHistogram) -> Option<f64> {
        let diff: Vec<u64> = (0..BUCKETS)
            .map(|i| self.0[i].saturating_sub(earlier.0[i]))
            .collect();
        let total: u64 = diff.iter().sum();
        if total == 0 {
            return None;
        }
        // The first bucket holding the request at rank ⌈0.99 total⌉.
        let rank = total - total / 100;
        let mut seen = 0;
        let at = diff
            .iter()
            .position(|&n| {
                seen += n;
                seen >= rank
            })
            .unwrap_or(BUCKETS - 1);
        Some((1u64 << at) as f64 / 1e3)
    }
}

impl LoopPace {
    /// A pass that answered `requests` requests took `took`; then sleep
    /// as the throttle says (at most [`MAX_THROTTLE_SLEEP`]).
    pub fn pass_done(&self, took: Duration, requests: u64) {
        if requests > 0 {
            let us = took.as_micros().max(1) as u64;
            // Less than 2^i µs: i = bits of `us`.
            let i = ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1);
            self.passes[i].fetch_add(requests, Ordering::Relaxed);
        }
        let percent = self.percent.load(Ordering::Relaxed);
        if percent == 0 || percent >= 100 {
            return;
        }
        // Running `percent` % of the time: a pass of `took` is followed by
        // `took × (100 − p) / p` of sleep.
        let sleep = took.mul_f64(f64::from(100 - percent) / f64::from(percent));
        std::thread::sleep(sleep.min(MAX_THROTTLE_SLEEP));
    }

    /// Throttle the loop to `percent` % of the time (clamped to
    /// [`MIN_PERCENT`]..=100; 100 lifts it).
    pub fn throttle(&self, percent: u8) {
        self.percent
            .store(percent.clamp(MIN_PERCENT, 100), Ordering::Relaxed);
    }

    /// The throttle now (100: none).
    pub fn percent(&self) -> u8 {
        match self.percent.load(Ordering::Relaxed) {
            0 => 100,
            p => p,
        }
    }

    /// The histogram now.
    pub fn snapshot(&self) -> PassHistogram {
        PassHistogram(std::array::from_fn(|i| {
            self.passes[i].load(Ordering::Relaxed)
        }))
    }
}

/// The share of the time the loop runs when the migration asks the
/// program to run at `percent` %: twice that (at most 100). A throttle
/// sleeps after every pass and so adds to the latency of every request
/// the pass answers; the background writer takes the asked percentage
/// itself, so the first throttle (50 %) leaves the loop alone and the
/// loop is held back only as the throttle deepens (25 % → 50 %, the
/// hardest, 10 % → 20 %).
pub fn loop_share(percent: u8) -> u8 {
    percent.saturating_mul(2).min(100)
}

/// Environment variable: `off` leaves kvd's loop alone when the migration
/// asks for a throttle and slows only the background writer (the loop's
/// sleeps after its passes add to the latency of every request they
/// answer); anything else or unset: the loop is throttled half as hard as
/// asked ([`loop_share`]), as before.
pub const LOOP_THROTTLE_ENV: &str = "LMIG_KVD_LOOP_THROTTLE";

/// The share of the time the loop runs when the migration asks for
/// `percent` %, as [`LOOP_THROTTLE_ENV`] says: [`loop_share`] by default,
/// 100 (never held back) with `off`.
pub fn loop_share_for(percent: u8) -> u8 {
    match std::env::var(LOOP_THROTTLE_ENV).as_deref() {
        Ok("off") => 100,
        _ => loop_share(percent),
    }
}

/// Environment variable: `0` keeps the migration's bulk threads in the
/// normal CPU class (to compare); anything else or unset: they run in
/// `SCHED_IDLE` while the rounds shrink
/// ([`SourceConfig::idle_lanes`](lmig_core::session::SourceConfig::idle_lanes),
/// [`DestinationConfig::idle_receive`](lmig_core::session::DestinationConfig::idle_receive)).
pub const IDLE_ENV: &str = "LMIG_KVD_IDLE";

fn idle_on() -> bool {
    std::env::var_os(IDLE_ENV).is_none_or(|v| v != "0")
}

/// The source's hook for the rounds' senders: `SCHED_IDLE` while the
/// rounds shrink, unless [`IDLE_ENV`] is `0`.
pub fn idle_lanes() -> Option<fn(bool) -> bool> {
    idle_on().then_some(lmig_mem::cpu::idle_thread as fn(bool) -> bool)
}

/// Environment variable: the share of the time (percent, 1–100) the
/// source's senders work while in the lowest class
/// ([`SourceConfig::idle_duty`](lmig_core::session::SourceConfig::idle_duty));
/// unset: [`IDLE_DUTY`].
pub const IDLE_DUTY_ENV: &str = "LMIG_KVD_IDLE_DUTY";

/// kvd's default share for the senders in the lowest class.
pub const IDLE_DUTY: u8 = 100;

/// The senders' share in the lowest class: [`IDLE_DUTY_ENV`] or [`IDLE_DUTY`].
pub fn idle_duty() -> u8 {
    env_number(IDLE_DUTY_ENV, IDLE_DUTY)
}

/// The number in environment variable `name`, or `default` when it is
/// unset or not a number.
fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Environment variable: the most sender threads while they are in the
/// lowest class
/// ([`SourceConfig::idle_threads`](lmig_core::session::SourceConfig::idle_threads));
/// unset or `0`: one per data lane ([`IDLE_THREADS`]). `1` on a 2-vCPU
/// host leaves a CPU to the loop and its clients; measured on a busy
/// machine it did not lower the clients' pre-copy p99 (docs/benchmarks.md),
/// so it is not the default.
pub const IDLE_THREADS_ENV: &str = "LMIG_KVD_IDLE_THREADS";

/// kvd's default sender threads in the lowest class: 0, one per lane.
pub const IDLE_THREADS: usize = 0;

/// The senders' threads in the lowest class: [`IDLE_THREADS_ENV`] or
/// [`IDLE_THREADS`].
pub fn idle_threads() -> usize {
    env_number(IDLE_THREADS_ENV, IDLE_THREADS)
}

/// The destination's hook: the whole kvd process (nothing of it serves
/// before the resume) in `SCHED_IDLE` while the rounds arrive, unless
/// [`IDLE_ENV`] is `0`.
pub fn idle_receive() -> Option<fn(bool) -> bool> {
    idle_on().then_some(lmig_mem::cpu::idle_process as fn(bool) -> bool)
}

/// Environment variable: `1` keeps the source's senders, while they are
/// in the lowest class, off the CPU kvd's loop last woke up on
/// ([`SourceConfig::idle_place`](lmig_core::session::SourceConfig::idle_place),
/// [`idle_place`]); unset or anything else: they run where the scheduler
/// puts them.
pub const IDLE_PLACE_ENV: &str = "LMIG_KVD_IDLE_PLACE";

fn place_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(IDLE_PLACE_ENV).is_some_and(|v| v == "1"))
}

/// The CPU kvd's loop last woke up on (-1: not known), recorded by
/// [`PassTimer::start`] when [`IDLE_PLACE_ENV`] is on.
static LOOP_CPU: AtomicI32 = AtomicI32::new(-1);

/// The source's placement hook for its senders in the lowest class, when
/// [`IDLE_PLACE_ENV`] is `1`.
pub fn idle_place() -> Option<fn(bool)> {
    place_on().then_some(place_sender as fn(bool))
}

thread_local! {
    /// The CPU this sender keeps off (-1: none) and the CPUs it had.
    static PLACED: Cell<(i32, Option<nix::sched::CpuSet>)> = const { Cell::new((-1, None)) };
}

/// `true`: keep the calling thread (a sender) off the CPU the loop last
/// woke up on, when another CPU is allowed; `false`: give it back every
/// CPU it had. A system call only when that CPU changed.
fn place_sender(on: bool) {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    let me = nix::unistd::Pid::from_raw(0);
    let (placed, had) = PLACED.get();
    let Some(had) = had.or_else(|| sched_getaffinity(me).ok()) else {
        return;
    };
    let avoid = if on {
        LOOP_CPU.load(Ordering::Relaxed)
    } else {
        -1
    };
    if avoid == placed {
        return;
    }
    let mut set = had;
    if avoid >= 0 {
        let _ = set.unset(avoid as usize);
    }
    let any = (0..nix::sched::CpuSet::count()).any(|c| set.is_set(c).unwrap_or(false));
    if any && sched_setaffinity(me, &set).is_ok() {
        PLACED.set((avoid, Some(had)));
    }
}

/// Times a pass of the loop: [`PassTimer::done`] hands it to a [`LoopPace`].
pub struct PassTimer(Instant, u64);

impl PassTimer {
    /// A pass starts, `requests` answered so far (and, with
    /// [`IDLE_PLACE_ENV`] on, the CPU it runs on is noted).
    pub fn start(requests: u64) -> Self {
        if place_on() {
            if let Ok(cpu) = nix::sched::sched_getcpu() {
                LOOP_CPU.store(cpu as i32, Ordering::Relaxed);
            }
        }
        Self(Instant::now(), requests)
    }

    /// The pass ended with `requests` answered so far.
    pub fn done(self, pace: &LoopPace, requests: u64) {
        pace.pass_done(self.0.elapsed(), requests.saturating_sub(self.1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_of_a_window_by_requests() {
        let pace = LoopPace::default();
        let before = pace.snapshot();
        assert_eq!(pace.snapshot().p99_ms_since(&before), None);
        // 990 requests in 50 µs passes, 10 in one 3 ms pass: the p99 is the
        // 64 µs bucket; 20 more in the slow bucket make it 4.096 ms.
        for _ in 0..99 {
            pace.pass_done(Duration::from_micros(50), 10);
        }
        pace.pass_done(Duration::from_millis(3), 10);
        let mid = pace.snapshot();
        assert_eq!(mid.p99_ms_since(&before), Some(0.064));
        pace.pass_done(Duration::from_millis(3), 20);
        assert_eq!(pace.snapshot().p99_ms_since(&before), Some(4.096));
        // Only the window counts.
        assert_eq!(pace.snapshot().p99_ms_since(&mid), Some(4.096));
    }

    #[test]
    fn the_loop_is_throttled_half_as_hard_as_asked() {
        assert_eq!(loop_share(100), 100);
        assert_eq!(loop_share(50), 100);
        assert_eq!(loop_share(25), 50);
        assert_eq!(loop_share(10), 20);
        assert_eq!(loop_share(200), 100);
    }

    #[test]
    fn a_placed_sender_keeps_off_the_loop_cpu_and_gets_every_cpu_back() {
        use nix::sched::sched_getaffinity;
        let me = nix::unistd::Pid::from_raw(0);
        std::thread::spawn(move || {
            let had = sched_getaffinity(me).unwrap();
            let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
                .filter(|&c| had.is_set(c).unwrap())
                .collect();
            let loop_cpu = cpus[0];
            LOOP_CPU.store(loop_cpu as i32, Ordering::Relaxed);
            place_sender(true);
            let now = sched_getaffinity(me).unwrap();
            // With one CPU allowed there is nowhere else to go.
            assert_eq!(now.is_set(loop_cpu).unwrap(), cpus.len() == 1);
            assert!(cpus[1..].iter().all(|&c| now.is_set(c).unwrap()));
            place_sender(false);
            let back = sched_getaffinity(me).unwrap();
            assert!(cpus.iter().all(|&c| back.is_set(c).unwrap()));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn throttle_sleeps_a_bounded_time_per_pass() {
        let pace = LoopPace::default();
        assert_eq!(pace.percent(), 100);
        pace.throttle(0);
        assert_eq!(pace.percent(), MIN_PERCENT);
        pace.throttle(50);
        assert_eq!(pace.percent(), 50);
        // A pass of 100 ms at 50%: 100 ms of sleep, bounded to 2 ms
        // (checked from below only: a sleep can be longer on a busy host).
        let t = Instant::now();
        pace.pass_done(Duration::from_millis(100), 1);
        assert!(t.elapsed() >= MAX_THROTTLE_SLEEP);
        pace.throttle(100);
        assert_eq!(pace.percent(), 100);
    }
}
