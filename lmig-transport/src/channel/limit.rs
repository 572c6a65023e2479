//! A token bucket shared by every lane of a channel.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Limits the bytes written per second, all lanes together.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate` bytes per second; bursts of up to 50 ms worth (at least 64 KiB).
    pub(crate) fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        let burst = (rate / 20.0).max(64.0 * 1024.0);
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Take `n` bytes' worth of tokens, sleeping as long as the bucket is in debt.
    pub(crate) fn acquire(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
            s.0 = (s.0 + refill).min(self.burst) - n as f64;
            s.1 = now;
            if s.0 < 0.0 { -s.0 / self.rate } else { 0.0 }
        };
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debt_makes_the_caller_wait() {
        let b = TokenBucket::new(1 << 20);
        let t = Instant::now();
        // 64 KiB burst, then 192 KiB of debt at 1 MiB/s: at least ~187 ms.
        b.acquire(256 << 10);
        assert!(t.elapsed() >= Duration::from_millis(150));
    }
}
