//! The release of held packets on a thread of its own ([`Releaser`]), for
//! both sides: the destination after its sockets are live, the source
//! after an abort when a socket is full and the program must read first.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{NetError, Result};
use crate::lock::{InOrder, NetLock, SETTLE};

/// What a release measured.
#[derive(Debug)]
pub(super) struct Released {
    /// The set flush (destination), or from the start until the lock was
    /// removed (source, after an abort).
    pub(super) unlock: Duration,
    /// From the start until every held packet was let through.
    pub(super) release: Duration,
    /// Packets let through.
    pub(super) held: u64,
    /// Packets lost (kernel drops, a failed step).
    pub(super) dropped: u64,
}

/// Lets held packets through in order, paced ([`InOrder`]), and removes the
/// lock, while the program runs (thread `lmig-handoff-unlock`).
#[derive(Debug)]
pub(super) struct Releaser {
    thread: JoinHandle<Released>,
}

impl Releaser {
    /// Go on with `paced` on `lock` on the thread (`total_unlock`: see [`release`]).
    pub(super) fn spawn(lock: NetLock, paced: InOrder, total_unlock: bool) -> Result<Self> {
        let thread = std::thread::Builder::new()
            .name("lmig-handoff-unlock".into())
            .spawn(move || release(lock, paced, total_unlock))
            .map_err(|e| NetError::sys("spawn", "handoff unlock", e))?;
        Ok(Self { thread })
    }

    /// Wait for it (bounded by the paced release's limit and [`SETTLE`]);
    /// `None` if it panicked.
    pub(super) fn join(self) -> Option<Released> {
        self.thread.join().ok()
    }
}

/// The releaser's steps. If a step fails, whatever is left goes through at
/// once and the table is deleted anyway (a table left behind would hold
/// the service's packets forever). `total_unlock`: report the whole time
/// as the unlock, not only the flush.
pub(super) fn release(mut lock: NetLock, mut paced: InOrder, total_unlock: bool) -> Released {
    let t = Instant::now();
    let ok = paced.run(&mut lock, true).is_ok();
    let mut lost = 0;
    if !ok {
        let flushed = lock.disengage().is_ok();
        let accepted = lock.accept_all().is_ok();
        std::thread::sleep(SETTLE);
        if let Err(e) = lock.accept_held() {
            debug!(error = %e, "release after a failed paced run: accepting the held packets failed");
        }
        let removed = lock.remove_tables().is_ok();
        // Packets still queued when a step failed are dropped with the
        // table: count at least one.
        lost = u64::from(!(flushed && accepted && removed));
    }
    let stats = paced.stats();
    Released {
        unlock: if total_unlock || !ok {
            t.elapsed()
        } else {
            stats.flush
        },
        release: if ok { stats.caught_up } else { t.elapsed() },
        held: stats.released,
        dropped: lock.kernel_dropped() + lock.stats().dropped + lost,
    }
}
