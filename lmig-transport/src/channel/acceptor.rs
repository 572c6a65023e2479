//! The listener's acceptor thread: accepts connections for as long as
//! someone holds the listener, admits each into the in-flight table (making
//! room under the cap) with a [`HandshakeWorker`] of its own, and cuts the
//! handshakes past their deadline.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use super::accept::Shared;
use super::conn::Conn;
use super::eviction::{Cut, InFlight, Progress};
use super::handshake::{HANDSHAKE_STACK, HandshakeWorker};
use super::lock;
use crate::error::TransportError;

/// Longest the acceptor thread blocks before it looks at deadlines and at
/// whether anyone still needs the listener.
pub(super) const TICK: Duration = Duration::from_millis(200);
/// How long to wait after a passing `accept(2)` failure.
const RETRY: Duration = Duration::from_millis(10);

/// The acceptor thread ("lmig-accept"). It holds the listener's state and
/// stops within [`TICK`] once the owners closed it (`ListenerCore`'s drop).
pub(super) struct AcceptorThread {
    shared: Arc<Shared>,
}

impl AcceptorThread {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Start the thread; its handle joins once the listener is closed.
    pub(super) fn spawn(self) -> io::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name("lmig-accept".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn(move || self.run())
    }

    fn run(self) {
        let core = &self.shared;
        loop {
            if core.closed.load(Ordering::Acquire) {
                return;
            }
            let wait = core.cut_overdue();
            match core
                .acceptor
                .accept_conn(&core.config, Some(Instant::now() + wait))
            {
                Ok(None) => {}
                Ok(Some(conn)) => core.admit(conn),
                Err(e) if transient(&e) => {
                    let code = os_code(&e);
                    if code == Some(nix::errno::Errno::EMFILE as i32)
                        || code == Some(nix::errno::Errno::ENFILE as i32)
                    {
                        // Out of descriptors: give back the one a stranger holds longest.
                        lock(&core.table).evict_one();
                    }
                    thread::sleep(RETRY);
                }
                Err(e) => {
                    core.stop(&e);
                    return;
                }
            }
        }
    }
}

impl Shared {
    /// Cut the handshakes past their deadline; how long until the next one is due.
    fn cut_overdue(&self) -> Duration {
        let now = Instant::now();
        let limit = self.config.handshake_timeout;
        let mut t = lock(&self.table);
        let mut i = 0;
        let mut next = TICK;
        while i < t.in_flight.len() {
            let due = t.in_flight[i].started + limit;
            if due <= now {
                t.cut(i, Cut::Timeout);
            } else {
                next = next.min(due - now);
                i += 1;
            }
        }
        next.max(Duration::from_millis(1))
    }

    /// Take a fresh connection into the table (evicting the handshake with
    /// the least progress if the table is full) and start its handshake.
    fn admit(self: &Arc<Self>, conn: Box<dyn Conn>) {
        if self.closed.load(Ordering::Acquire) {
            conn.shutdown_conn();
            return;
        }
        let peer = conn.peer_name();
        let watch = match conn.try_clone_conn() {
            Ok(w) => w,
            Err(e) => {
                conn.shutdown_conn();
                let mut t = lock(&self.table);
                t.stats.accepted += 1;
                t.stats.rejected += 1;
                drop(t);
                self.report(peer, TransportError::io("preparing an accepted stream", e));
                return;
            }
        };
        let progress = Arc::new(Progress::default());
        let id = {
            let mut t = lock(&self.table);
            t.stats.accepted += 1;
            let cap = self.config.max_handshakes.max(1);
            while t.in_flight.len() >= cap {
                if !t.evict_one() {
                    break;
                }
            }
            let id = t.next_id;
            t.next_id += 1;
            t.in_flight.push(InFlight {
                id,
                started: Instant::now(),
                progress: progress.clone(),
                conn: watch,
            });
            id
        };
        let worker = HandshakeWorker::new(self.clone(), conn, id, progress, peer.clone());
        // Nobody joins a handshake: it ends by itself or is cut.
        if let Err(e) = worker.spawn() {
            // The worker (and the connection in it) was dropped.
            let e = TransportError::io("spawning a handshake thread", e);
            if self.finish(id, Err(&e)) {
                self.report(peer, e);
            }
        }
    }
}

/// Errors of `accept(2)` that concern one connection or a passing
/// shortage, not the listening socket.
fn transient(e: &io::Error) -> bool {
    use nix::errno::Errno;
    let Some(code) = os_code(e) else {
        return false;
    };
    [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOBUFS,
        Errno::ENOMEM,
        Errno::ECONNABORTED,
        Errno::EPROTO,
        Errno::EPERM,
        Errno::ENETDOWN,
        Errno::ENOPROTOOPT,
        Errno::EHOSTDOWN,
        Errno::ENONET,
        Errno::EHOSTUNREACH,
        Errno::EOPNOTSUPP,
        Errno::ENETUNREACH,
        Errno::EINTR,
        Errno::EAGAIN,
    ]
    .iter()
    .any(|c| *c as i32 == code)
}

/// The OS error code of `e` or of the OS error it wraps.
fn os_code(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()?
            .source()?
            .downcast_ref::<io::Error>()?
            .raw_os_error()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_that_concern_one_connection_are_transient() {
        use nix::errno::Errno;
        let os = |e: Errno| io::Error::from_raw_os_error(e as i32);
        assert!(transient(&os(Errno::EMFILE)));
        assert!(transient(&os(Errno::ECONNABORTED)));
        assert!(!transient(&os(Errno::EBADF)), "the socket itself is gone");
        assert!(!transient(&io::Error::other("no OS code")));
        let wrapped = io::Error::other(TransportError::io("accepting", os(Errno::EAGAIN)));
        assert_eq!(os_code(&wrapped), Some(Errno::EAGAIN as i32));
    }
}
