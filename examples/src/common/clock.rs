//! One clock for every process on a host: timestamps that cross a process
//! boundary (kvd's reports, a peer's results) are `CLOCK_MONOTONIC`
//! nanoseconds.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// `CLOCK_MONOTONIC` now, in nanoseconds: comparable between processes on one host.
pub fn now_mono_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// An `Instant` of this process as `CLOCK_MONOTONIC` nanoseconds.
pub fn mono_ns(at: Instant) -> u64 {
    let (now, now_ns) = (Instant::now(), now_mono_ns());
    if at <= now {
        now_ns - (now - at).as_nanos() as u64
    } else {
        now_ns + (at - now).as_nanos() as u64
    }
}

/// Wall-clock time now, ns since the Unix epoch (0 if the clock is before it).
pub fn wall_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
