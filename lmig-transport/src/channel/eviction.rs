//! The handshakes in flight and who makes room: a table the acceptor thread
//! and the handshake workers share, no IO but cutting a connection.
//!
//! When a connection arrives and [`ChannelConfig::max_handshakes`] are in
//! flight, the one with the least progress (no valid `Hello` yet first,
//! then the oldest) is cut: a flood of idle connections cannot lock out a
//! dialer, which sends its `Hello` at once.
//!
//! [`ChannelConfig::max_handshakes`]: super::ChannelConfig::max_handshakes

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use super::conn::Conn;
use super::reject::ListenerStats;

wire_enum! {
    /// Why the acceptor cut a connection (kept in an `AtomicU8` the
    /// handshake worker reads when its connection fails).
    pub(super) enum Cut [] {
        /// Not cut.
        None = 0 => "not cut",
        /// Past its handshake deadline.
        Timeout = 1 => "timed out",
        /// Made room for a newer connection.
        Evicted = 2 => "evicted",
        /// The listener's owners are gone.
        Closed = 3 => "listener closed",
    }
    unknown |v| crate::wire::WireError::bad("cut", format!("{v}"))
}

/// What a handshake worker and the acceptor share about one connection.
#[derive(Default)]
pub(super) struct Progress {
    /// A valid `Hello` arrived.
    pub(super) hello: AtomicBool,
    /// A [`Cut`], as its number.
    cut: AtomicU8,
}

impl Progress {
    /// Why the acceptor cut the connection, if it did.
    pub(super) fn cut(&self) -> Cut {
        Cut::from_u8(self.cut.load(Ordering::Acquire)).unwrap_or(Cut::None)
    }
}

/// One handshake in flight.
pub(super) struct InFlight {
    pub(super) id: u64,
    pub(super) started: Instant,
    pub(super) progress: Arc<Progress>,
    /// A handle to cut the connection.
    pub(super) conn: Box<dyn Conn>,
}

/// The handshakes in flight and the listener's counters.
#[derive(Default)]
pub(super) struct Table {
    pub(super) in_flight: Vec<InFlight>,
    pub(super) next_id: u64,
    pub(super) stats: ListenerStats,
}

impl Table {
    /// The handshake that made the least progress: no valid `Hello` yet
    /// first, then the oldest.
    pub(super) fn least_progress(&self) -> Option<usize> {
        self.in_flight
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| (e.progress.hello.load(Ordering::Acquire), e.started))
            .map(|(i, _)| i)
    }

    /// Remove entry `i`, cut its connection for `why` and count it.
    pub(super) fn cut(&mut self, i: usize, why: Cut) {
        let e = self.in_flight.swap_remove(i);
        e.progress.cut.store(why.to_u8(), Ordering::Release);
        e.conn.shutdown_read();
        self.stats.rejected += 1;
        match why {
            Cut::Timeout => self.stats.timed_out += 1,
            Cut::Evicted => self.stats.evicted += 1,
            Cut::None | Cut::Closed => {}
        }
    }

    /// Cut the handshake with the least progress, if there is one.
    pub(super) fn evict_one(&mut self) -> bool {
        match self.least_progress() {
            Some(i) => {
                self.cut(i, Cut::Evicted);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn eviction_takes_the_least_progress() {
        let (a, _b) = super::super::pipe::pipe();
        let now = Instant::now();
        let entry = |id, hello, age_ms| {
            let progress = Arc::new(Progress::default());
            progress.hello.store(hello, Ordering::Release);
            InFlight {
                id,
                started: now - Duration::from_millis(age_ms),
                progress,
                conn: a.try_clone_conn().unwrap(),
            }
        };
        // Oldest of all sent its Hello; of the others, id 2 is the oldest.
        let mut t = Table {
            in_flight: vec![
                entry(0, true, 900),
                entry(1, false, 100),
                entry(2, false, 500),
            ],
            ..Table::default()
        };
        let i = t.least_progress().unwrap();
        assert_eq!(t.in_flight[i].id, 2);
        t.cut(i, Cut::Evicted);
        let i = t.least_progress().unwrap();
        assert_eq!(t.in_flight[i].id, 1);
        t.cut(i, Cut::Evicted);
        assert_eq!(t.in_flight[t.least_progress().unwrap()].id, 0);
        assert_eq!((t.stats.rejected, t.stats.evicted), (2, 2));
    }

    #[test]
    fn a_cut_is_seen_by_the_handshake_worker() {
        let (a, _b) = super::super::pipe::pipe();
        let progress = Arc::new(Progress::default());
        assert_eq!(progress.cut(), Cut::None);
        let mut t = Table::default();
        t.in_flight.push(InFlight {
            id: 7,
            started: Instant::now(),
            progress: progress.clone(),
            conn: Box::new(a),
        });
        t.cut(0, Cut::Timeout);
        assert_eq!(progress.cut(), Cut::Timeout);
        assert!(!t.evict_one(), "nothing left to evict");
        assert_eq!((t.stats.rejected, t.stats.timed_out), (1, 1));
    }
}
