//! What kvd's loop shares with other threads: the handle that parks,
//! resumes or ends it, what it hands over when parked, its counters.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::Waker;

/// What the loop hands over when parked: its sockets themselves (not
/// duplicates: a server near the open-file limit has no room for a second
/// fd per connection) and its connections' buffered bytes.
pub struct Parked {
    /// The listening socket (id 0).
    pub listener: OwnedFd,
    /// Every connection socket, by id.
    pub conns: Vec<(u64, OwnedFd)>,
    /// The program state: buffered input and output of every connection.
    pub state: Vec<u8>,
}

/// What the parked loop should do next.
pub enum Wake {
    /// Serve on with these sockets (the ones it handed over).
    Resume(Parked),
    /// The migration committed: stop for good.
    Exit,
}

/// Post-copy paused (the source lost after `Commit`): how many pages are
/// still missing, 0 when not paused. While it is set, requests that read or
/// write the store are refused with an error (they could block on a missing
/// page); `PING` and `INFO` still answer and `INFO` reports it. Set by the
/// destination's session observer (one migration per process).
pub static POSTCOPY_PAUSED: AtomicU64 = AtomicU64::new(0);

/// Counters the loop keeps (for INFO and reports).
#[derive(Default)]
pub struct Counters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Connections open.
    pub clients: AtomicU64,
    /// Requests parked in post-copy until their key's pages came.
    pub parked: AtomicU64,
    /// Pass times and the migration's throttle.
    pub pace: crate::kvd::pace::LoopPace,
}

/// Handle to control a running loop from another thread.
#[derive(Clone)]
pub struct Control {
    pub(super) pause: Arc<AtomicBool>,
    pub(super) waker: Arc<Waker>,
    pub(super) parked_tx: Arc<Mutex<Option<Sender<Parked>>>>,
    pub(super) wake_tx: Sender<Wake>,
    /// Counters.
    pub counters: Arc<Counters>,
}

impl Control {
    /// Park the loop; returns what it hands over. Bounded wait.
    pub fn park(&self) -> Result<Parked, String> {
        let (tx, rx) = channel();
        *self.parked_tx.lock().expect("poisoned") = Some(tx);
        self.pause.store(true, Ordering::SeqCst);
        self.waker
            .wake()
            .map_err(|e| format!("waking the loop: {e}"))?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the server loop did not park within 10 s".to_string())
    }

    /// Resume (after an abort, handing the sockets back) or end (after the
    /// commit) a parked loop.
    pub fn wake(&self, what: Wake) {
        self.pause.store(false, Ordering::SeqCst);
        let _ = self.wake_tx.send(what);
    }
}
