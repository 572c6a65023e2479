//! Never-sent bytes written after activation, off the freeze: the
//! [`UnsentTails`] gate and its writer thread ([`UnsentWriter`]).
//!
//! A connection's send queue has two parts: bytes sent but not acknowledged
//! (they go back in repair mode, inside the freeze: the peer may be missing
//! them) and bytes the source never sent (held back by the peer's window).
//! The second part is an ordinary write once repair mode is off, and with
//! megabytes queued it is most of the queue: with
//! [`SinkConfig::unsent_in_background`](crate::SinkConfig::unsent_in_background)
//! activation leaves it to a thread that writes it while the program runs.
//!
//! # The contract
//!
//! The program must not write to (nor `shutdown`) a connection for which
//! [`UnsentTails::is_pending`] is true: its bytes would overtake the tail.
//! Reading is fine. Once the tail is in the socket the writer lists the id
//! in [`UnsentTails::take_written`] and makes [`UnsentTails::fd`] readable
//! (poll it with the connections); the program then writes what it held
//! back. Closing the program's fd early is safe: the writer holds its own
//! reference to the socket until the tail is written.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{NetError, Result, SocketFailure};
use crate::sys;

#[derive(Default)]
struct Progress {
    pending: HashSet<u64>,
    written: Vec<u64>,
    failures: Vec<SocketFailure>,
}

struct Shared {
    progress: Mutex<Progress>,
    done: Condvar,
    /// Readable while written ids wait in `take_written`.
    notify_rx: UnixStream,
    notify_tx: UnixStream,
}

/// The gate between the tail writer and the program (cheap to clone).
/// The contract is in the crate docs and [`SinkConfig::unsent_in_background`](crate::SinkConfig::unsent_in_background).
#[derive(Clone)]
pub struct UnsentTails {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UnsentTails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnsentTails")
            .field("pending", &self.pending_len())
            .finish()
    }
}

impl UnsentTails {
    pub(crate) fn new() -> Result<Self> {
        let (notify_rx, notify_tx) =
            UnixStream::pair().map_err(|e| NetError::sys("socketpair", "unsent tails", e))?;
        for s in [&notify_rx, &notify_tx] {
            s.set_nonblocking(true)
                .map_err(|e| NetError::sys("fcntl(O_NONBLOCK)", "unsent tails", e))?;
        }
        Ok(Self {
            shared: Arc::new(Shared {
                progress: Mutex::default(),
                done: Condvar::new(),
                notify_rx,
                notify_tx,
            }),
        })
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The program must not write to connection `id` yet (its never-sent
    /// bytes are still being written).
    pub fn is_pending(&self, id: u64) -> bool {
        self.progress().pending.contains(&id)
    }

    /// Connections whose tail is not written yet.
    pub fn pending_len(&self) -> usize {
        self.progress().pending.len()
    }

    /// The connections whose tail was written (or failed, see
    /// [`UnsentTails::take_failures`]) since the last call: the program may
    /// write to them now. Also empties [`UnsentTails::fd`].
    pub fn take_written(&self) -> Vec<u64> {
        let mut buf = [0u8; 256];
        // Bounded: the socket holds at most one byte per written id.
        while let Ok(n) = (&self.shared.notify_rx).read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        std::mem::take(&mut self.progress().written)
    }

    /// Readable while [`UnsentTails::take_written`] has ids (level
    /// triggered; an edge-triggered poller sees one edge per written batch).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.notify_rx.as_fd()
    }

    /// Wait until every tail is written, at most `timeout`; true if they are.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.progress();
        // Bounded by the deadline.
        while !p.pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = match self.shared.done.wait_timeout(p, left) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Tails that could not be written: the connection was shut down (the
    /// peer sees its stream end early rather than a gap in it).
    pub fn take_failures(&self) -> Vec<SocketFailure> {
        std::mem::take(&mut self.progress().failures)
    }

    /// Mark `ids` pending (before the sockets are handed out).
    fn hold(&self, ids: impl Iterator<Item = u64>) {
        self.progress().pending.extend(ids);
    }

    fn written(&self, id: u64, failure: Option<NetError>) {
        {
            let mut p = self.progress();
            p.pending.remove(&id);
            p.written.push(id);
            if let Some(e) = failure {
                p.failures.push(SocketFailure {
                    id,
                    error: Box::new(e),
                });
            }
            if p.pending.is_empty() {
                self.shared.done.notify_all();
            }
        }
        // Full (the program has not looked yet) is fine: it is readable.
        let _ = (&self.shared.notify_tx).write(&[1]);
    }
}

/// One connection's tail: its id, a reference to its socket of the
/// writer's own, and the bytes.
pub(crate) struct Tail {
    pub id: u64,
    pub fd: OwnedFd,
    pub bytes: Bytes,
}

/// The thread writing the tails (`lmig-net-unsent`), in the order given.
#[derive(Debug)]
pub(crate) struct UnsentWriter {
    thread: JoinHandle<()>,
}

impl UnsentWriter {
    /// Mark every tail pending in `gate`, then write them on a thread.
    /// If the thread cannot start they are written here.
    pub(crate) fn spawn(gate: &UnsentTails, tails: Vec<Tail>) -> Option<Self> {
        gate.hold(tails.iter().map(|t| t.id));
        // Shared so that they are still here if the thread cannot start.
        let slot = Arc::new(Mutex::new(Some(tails)));
        let (g, s) = (gate.clone(), slot.clone());
        let spawned = std::thread::Builder::new()
            .name("lmig-net-unsent".into())
            .spawn(move || write_all(&g, take_slot(&s)));
        match spawned {
            Ok(thread) => Some(Self { thread }),
            Err(e) => {
                warn!(error = %e, "the unsent-tail writer could not start: writing here");
                write_all(gate, take_slot(&slot));
                None
            }
        }
    }

    /// Wait for it (bounded: each tail has a deadline).
    pub(crate) fn join(self) {
        if self.thread.join().is_err() {
            warn!("the unsent-tail writer panicked");
        }
    }
}

fn take_slot(slot: &Mutex<Option<Vec<Tail>>>) -> Vec<Tail> {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_default()
}

fn write_all(gate: &UnsentTails, tails: Vec<Tail>) {
    for t in tails {
        let what = || format!("TCP connection {}", t.id);
        let failure = crate::tcp::write_unsent(t.fd.as_fd(), &t.bytes, &what).err();
        if failure.is_some() {
            // Never a gap in the stream: the peer sees it end instead.
            let _ = sys::shutdown(t.fd.as_fd(), libc::SHUT_RDWR);
        }
        gate.written(t.id, failure);
    }
}
