//! What the source's page senders share with the outside while they run:
//! counters of what went out (for the progress snapshot) and the bandwidth
//! limit, a token bucket over every data stream together.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest a sender sleeps at once while it waits for the bucket: a
/// changed limit or a cancel is seen within this.
const PACE_TICK: Duration = Duration::from_millis(10);
/// The bucket holds at most this much time's worth of bytes (a sender
/// that was idle may then send that much at once) ...
const BURST: Duration = Duration::from_millis(50);
/// ... and at least this many bytes (one message of 64 pages of 4 KiB).
const MIN_BURST: f64 = 256.0 * 1024.0;

/// Counters and the bandwidth limit of one source session's page senders.
#[derive(Debug)]
pub(crate) struct Meter {
    /// Bytes per second, 0 for no limit.
    limit: AtomicU64,
    bucket: Mutex<Bucket>,
    /// Pages put on the channel, every phase (zero pages included).
    pages: AtomicU64,
    /// Bytes put on the channel for pages (as [`super::pages::Sent::bytes`]).
    bytes: AtomicU64,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may go now; negative: a debt the senders wait out.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl Default for Meter {
    fn default() -> Self {
        Self {
            limit: AtomicU64::new(0),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                at: Instant::now(),
            }),
            pages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }
}

impl Meter {
    /// Set the limit in bytes per second (0: none). Senders waiting on the
    /// old limit see the new one within [`PACE_TICK`].
    /// A new limit starts from an empty bucket: no debt run up under the
    /// old one carries over.
    pub fn set_limit(&self, bytes_per_sec: u64) {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        *b = Bucket {
            tokens: 0.0,
            at: Instant::now(),
        };
        self.limit.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The limit in bytes per second (0: none).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Pages and bytes sent so far.
    pub fn sent(&self) -> (u64, u64) {
        (
            self.pages.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// `pages` pages in `bytes` bytes went out.
    pub fn count(&self, pages: u64, bytes: u64) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Take `bytes` from the bucket and wait (in slices of at most
    /// [`PACE_TICK`]) until it is out of debt, or the limit is lifted, or
    /// `stop` says so. One atomic load when there is no limit.
    pub fn pace(&self, bytes: u64, stop: &dyn Fn() -> bool) {
        if self.limit() == 0 {
            return;
        }
        let mut taken = false;
        // Bounded: the debt shrinks at the limit's rate, or the loop ends
        // when the limit is lifted or `stop` says so.
        loop {
            let rate = self.limit();
            if rate == 0 {
                return;
            }
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let rate = rate as f64;
                let burst = (rate * BURST.as_secs_f64()).max(MIN_BURST);
                b.tokens = (b.tokens + (now - b.at).as_secs_f64() * rate).min(burst);
                b.at = now;
                if !taken {
                    b.tokens -= bytes as f64;
                    taken = true;
                }
                if b.tokens >= 0.0 {
                    return;
                }
                Duration::from_secs_f64(-b.tokens / rate)
            };
            if stop() {
                return;
            }
            std::thread::sleep(wait.min(PACE_TICK));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_never_waits_and_counts() {
        let m = Meter::default();
        let t = Instant::now();
        for _ in 0..1000 {
            m.pace(1 << 20, &|| false);
            m.count(256, 1 << 20);
        }
        assert_eq!(m.sent(), (256_000, 1000 << 20));
        // A gigabyte "sent" without a limit: no sleeping at all (generous).
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_limit_holds_the_senders_back() {
        let m = Meter::default();
        m.set_limit(4 << 20);
        let t = Instant::now();
        // 2 MiB at 4 MiB/s with at most 256 KiB of burst: at least 437 ms.
        for _ in 0..32 {
            m.pace(64 << 10, &|| false);
        }
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn lifting_the_limit_or_stopping_ends_a_wait() {
        let m = std::sync::Arc::new(Meter::default());
        m.set_limit(1024);
        let m2 = m.clone();
        let waiter = std::thread::spawn(move || {
            // A 100 MiB debt at 1 KiB/s: a day, unless the limit is lifted.
            m2.pace(100 << 20, &|| false);
        });
        std::thread::sleep(Duration::from_millis(30));
        m.set_limit(0);
        waiter.join().unwrap();
        m.set_limit(1024);
        m.pace(100 << 20, &|| true);
    }
}
