//! The listener's handshake workers: one short-lived thread per accepted
//! connection runs the listener's side of the handshake, then files the
//! authenticated stream (`accept.rs`) or refuses the connection.

use std::io;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::accept::Shared;
use super::conn::{Conn, FrameReader, HandshakeConn};
use super::eviction::{Cut, Progress};
use super::reject::Rejection;
use super::{Stream, lock, secure};
use crate::auth::{self, HandshakeIo};
use crate::error::{Result, TransportError};
use crate::wire::{Handshake, Hello, Reject, RejectReason};

/// Stack of a handshake thread (it decodes small frames and computes HMACs;
/// the rejection hook runs on it too).
pub(super) const HANDSHAKE_STACK: usize = 256 << 10;
/// After refusing a stranger, how long (and how many bytes) to read what it
/// already sent, so that closing does not reset the connection before our
/// `Reject` frame reaches it.
const LINGER: Duration = Duration::from_millis(100);
const LINGER_BYTES: usize = 64 << 10;

/// A handshake thread ("lmig-handshake"): authenticates one connection,
/// files it, or refuses it. Nobody joins it: it ends with its handshake,
/// within the handshake deadline (the acceptor cuts it then).
pub(super) struct HandshakeWorker {
    shared: Arc<Shared>,
    conn: Box<dyn Conn>,
    /// Its entry in the in-flight table.
    id: u64,
    progress: Arc<Progress>,
    peer: String,
}

impl HandshakeWorker {
    pub(super) fn new(
        shared: Arc<Shared>,
        conn: Box<dyn Conn>,
        id: u64,
        progress: Arc<Progress>,
        peer: String,
    ) -> Self {
        Self {
            shared,
            conn,
            id,
            progress,
            peer,
        }
    }

    /// Start the thread; join its handle to wait for the handshake's end.
    /// On failure the worker (and its connection) is dropped.
    pub(super) fn spawn(self) -> io::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name("lmig-handshake".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn(move || self.run())
    }

    /// Authenticate the connection, file it, or refuse it.
    fn run(self) {
        let Self {
            shared,
            conn,
            id,
            progress,
            peer,
        } = self;
        match shared.authenticate(conn, id, &progress) {
            Ok((hello, stream)) => {
                if shared.finish(id, Ok(())) {
                    if let Err(e) = shared.file(&hello, stream) {
                        shared.report(peer, e);
                    }
                } else {
                    // Cut just as it completed: it no longer holds a place.
                    stream.writer.shutdown_conn();
                    shared.report(peer, shared.cut_error(progress.cut()));
                }
            }
            Err(e) => shared.report(peer, e),
        }
    }
}

impl Shared {
    /// Remove handshake `id` from the table and count its outcome; false if
    /// the acceptor cut it first (it was counted then).
    pub(super) fn finish(&self, id: u64, result: std::result::Result<(), &TransportError>) -> bool {
        let mut t = lock(&self.table);
        let Some(i) = t.in_flight.iter().position(|e| e.id == id) else {
            return false;
        };
        t.in_flight.swap_remove(i);
        match result {
            Ok(()) => t.stats.authenticated += 1,
            Err(e) => {
                t.stats.rejected += 1;
                if matches!(e, TransportError::Timeout { .. }) {
                    t.stats.timed_out += 1;
                }
            }
        }
        true
    }

    /// Tell the embedder about a refused connection.
    pub(super) fn report(&self, peer: String, error: TransportError) {
        self.config.on_reject.call(&Rejection { peer, error });
    }

    /// The error to report for a connection the acceptor cut.
    pub(super) fn cut_error(&self, why: Cut) -> TransportError {
        match why {
            Cut::Evicted => TransportError::Evicted {
                cap: self.config.max_handshakes,
            },
            Cut::Closed => TransportError::Handshake {
                detail: "the listener was closed".into(),
            },
            Cut::None | Cut::Timeout => TransportError::Timeout {
                waiting_for: "the peer to complete its handshake",
                after: self.config.handshake_timeout,
            },
        }
    }

    /// Run the listener's side of the handshake on `conn`. On failure the
    /// handshake is counted (its place freed at once), the peer got a
    /// `Reject` where the protocol allows and the connection is closed.
    fn authenticate(
        &self,
        conn: Box<dyn Conn>,
        id: u64,
        progress: &Progress,
    ) -> Result<(Hello, Stream)> {
        let config = &self.config;
        let io_err = |e| TransportError::io("preparing an accepted stream", e);
        let prepared = conn
            .set_timeouts(
                Some(config.handshake_timeout),
                Some(config.handshake_timeout),
            )
            .and_then(|()| conn.try_clone_conn());
        let opened = match prepared {
            Ok(raw) => secure::open(conn, &config.security, false).map_err(|e| (e, raw)),
            Err(e) => {
                conn.shutdown_conn();
                let e = io_err(e);
                self.finish(id, Err(&e));
                return Err(e);
            }
        };
        let opened = match opened {
            Ok(o) => o,
            Err((e, mut raw)) => {
                // A TLS handshake that failed (rustls sent its alert).
                let e = self.cut_or(progress, e);
                self.finish(id, Err(&e));
                linger(&mut *raw);
                raw.shutdown_conn();
                return Err(e);
            }
        };
        let (mut writer, cipher) = (opened.writer, opened.cipher);
        let mut reader = FrameReader::new(opened.reader);
        let check = |h: &Hello| self.check(h);
        let mut io = HandshakeConn {
            reader: &mut reader,
            writer: &mut *writer,
            timeout: config.handshake_timeout,
            hello_seen: Some(&progress.hello),
        };
        let e = match auth::accept(&mut io, &opened.key, opened.mode, &self.replay, &check) {
            Ok(a) => match writer.set_timeouts(None, config.write_timeout) {
                Ok(()) => {
                    reader.set_authenticated();
                    let (reader, writer) = secure::seal(reader, writer, a.keys, opened.mode);
                    return Ok((
                        a.hello,
                        Stream {
                            writer,
                            reader,
                            cipher,
                        },
                    ));
                }
                Err(e) => io_err(e),
            },
            Err(e) => e,
        };
        let e = self.cut_or(progress, e);
        self.finish(id, Err(&e));
        self.refuse(&e, &mut reader, writer);
        Err(e)
    }

    /// Send the peer a `Reject` where the protocol has a reason for `e`,
    /// then close the connection.
    fn refuse(&self, e: &TransportError, reader: &mut FrameReader, mut writer: Box<dyn Conn>) {
        let reason = match e {
            TransportError::Evicted { .. } => Some(RejectReason::Busy),
            TransportError::Timeout { .. } => Some(RejectReason::Timeout),
            _ => None,
        };
        if let Some(reason) = reason {
            let mut io = HandshakeConn {
                reader,
                writer: &mut *writer,
                timeout: self.config.handshake_timeout,
                hello_seen: None,
            };
            if let Err(e) = io.send(&Handshake::Reject(Reject { reason })) {
                debug!(error = %e, "telling a refused peer why did not work");
            }
        }
        linger(&mut *writer);
        writer.shutdown_conn();
    }

    /// The error to report for a failed handshake: why the acceptor cut it,
    /// if it did, else `e`.
    fn cut_or(&self, progress: &Progress, e: TransportError) -> TransportError {
        match progress.cut() {
            Cut::None => e,
            cut => self.cut_error(cut),
        }
    }
}

/// Read (and drop) what a refused peer already sent, briefly, so that
/// closing sends a FIN after our `Reject` rather than a reset that may
/// destroy it.
fn linger(conn: &mut dyn Conn) {
    let end = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    while left > 0 {
        let now = Instant::now();
        if now >= end || !matches!(conn.wait_readable(end - now), Ok(true)) {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}
