//! The listening side: one acceptor thread per listener, one short-lived
//! thread per handshake, and a cap on unauthenticated connections.
//!
//! ```text
//!  listening socket ──▶ acceptor thread ("lmig-accept")
//!                         │  admits each connection into the in-flight table
//!                         │  (evicting the one with the least progress when full),
//!                         │  cuts connections past their handshake deadline
//!                         ▼
//!                       handshake thread ("lmig-handshake", one per connection)
//!                         │  auth::accept; on failure a Reject frame, the
//!                         │  rejection hook, the connection closed
//!                         ▼
//!                       pending sets ──▶ accept_set (Listener::accept, reconnect)
//! ```
//!
//! A stranger costs its own connection and nothing else: its failure is
//! reported to the embedder ([`Rejection`]) and counted ([`ListenerStats`]);
//! whoever waits for a channel keeps waiting. Only the listening socket
//! failing ends the waits with an error.
//!
//! The acceptor thread holds the listener's state weakly: it stops within
//! [`TICK`] once the [`super::Listener`] and every channel it accepted (and
//! every handshake in flight) are gone.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::conn::{Conn, FrameReader, HandshakeConn};
use super::{AcceptConn, ChannelConfig, Key, Stream, Streams, lock, role_name, secure};
use crate::auth::{self, HandshakeIo, ReplayCache};
use crate::error::{Result, TransportError};
use crate::wire::{Handshake, Hello, Reject, RejectReason, SESSION_ID_LEN, StreamRole};

/// Longest the acceptor thread blocks before it looks at deadlines and at
/// whether anyone still needs the listener.
const TICK: Duration = Duration::from_millis(200);
/// Stack of a handshake thread (it decodes small frames and computes HMACs;
/// the rejection hook runs on it too).
const HANDSHAKE_STACK: usize = 256 << 10;
/// After refusing a stranger, how long (and how many bytes) to read what it
/// already sent, so that closing does not reset the connection before our
/// `Reject` frame reaches it.
const LINGER: Duration = Duration::from_millis(100);
const LINGER_BYTES: usize = 64 << 10;

/// A connection the listener refused, as reported to the
/// [`ChannelConfig::on_reject`] hook.
#[derive(Debug)]
#[non_exhaustive]
pub struct Rejection {
    /// Who: `198.51.100.3:41234` for TCP, `unix`, or `memory`.
    pub peer: String,
    /// Why (the peer got a `Reject` frame with a coarse reason where the
    /// protocol allowed, else just the closed connection).
    pub error: TransportError,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused a connection from {}: {}", self.peer, self.error)
    }
}

/// The function [`ChannelConfig::on_reject`] installs.
type HookFn = dyn Fn(&Rejection) + Send + Sync + 'static;

/// An optional rejection hook, shared by the clones of a config.
#[derive(Clone, Default)]
pub(crate) struct RejectHook(Option<Arc<HookFn>>);

impl RejectHook {
    pub(crate) fn new(f: impl Fn(&Rejection) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    fn call(&self, r: &Rejection) {
        if let Some(f) = &self.0 {
            f(r);
        }
    }
}

impl fmt::Debug for RejectHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "RejectHook(set)"
        } else {
            "RejectHook(none)"
        })
    }
}

/// Counters of a listener, from [`super::Listener::stats`].
///
/// Every connection the socket accepted is, at any moment, exactly one of
/// authenticated, rejected or in flight:
/// `accepted == authenticated + rejected + in_flight`. `timed_out` and
/// `evicted` are parts of `rejected`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Connections accepted from the socket (streams, not channels).
    pub accepted: u64,
    /// Streams that completed their handshake.
    pub authenticated: u64,
    /// Connections refused for any reason (including the two below).
    pub rejected: u64,
    /// Refused because the handshake passed its deadline.
    pub timed_out: u64,
    /// Refused to make room under [`ChannelConfig::max_handshakes`].
    pub evicted: u64,
    /// Handshakes running now.
    pub in_flight: usize,
}

/// Why the acceptor cut a connection.
const CUT_NONE: u8 = 0;
const CUT_TIMEOUT: u8 = 1;
const CUT_EVICTED: u8 = 2;
const CUT_CLOSED: u8 = 3;

/// What a handshake thread and the acceptor share about one connection.
#[derive(Default)]
struct Progress {
    hello: AtomicBool,
    cut: AtomicU8,
}

/// One handshake in flight.
struct InFlight {
    id: u64,
    started: Instant,
    progress: Arc<Progress>,
    /// A handle to cut the connection.
    conn: Box<dyn Conn>,
}

#[derive(Default)]
struct Table {
    in_flight: Vec<InFlight>,
    next_id: u64,
    stats: ListenerStats,
}

impl Table {
    /// The handshake that made the least progress: no valid `Hello` yet
    /// first, then the oldest.
    fn least_progress(&self) -> Option<usize> {
        self.in_flight
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| (e.progress.hello.load(Ordering::Acquire), e.started))
            .map(|(i, _)| i)
    }

    /// Remove entry `i`, cut its connection for `why` and count it.
    fn cut(&mut self, i: usize, why: u8) {
        let e = self.in_flight.swap_remove(i);
        e.progress.cut.store(why, Ordering::Release);
        e.conn.shutdown_read();
        self.stats.rejected += 1;
        match why {
            CUT_TIMEOUT => self.stats.timed_out += 1,
            CUT_EVICTED => self.stats.evicted += 1,
            _ => {}
        }
    }
}

/// Streams of one (session, generation) accepted so far.
struct Pending {
    data_streams: u16,
    control: Option<Stream>,
    urgent: Option<Stream>,
    data: Vec<Option<Stream>>,
}

impl Pending {
    fn new(data_streams: u16) -> Self {
        Self {
            data_streams,
            control: None,
            urgent: None,
            data: (0..data_streams).map(|_| None).collect(),
        }
    }

    fn has(&self, role: StreamRole, index: u16) -> bool {
        match role {
            StreamRole::Control => self.control.is_some(),
            StreamRole::Urgent => self.urgent.is_some(),
            StreamRole::Data => self
                .data
                .get(usize::from(index))
                .is_some_and(Option::is_some),
        }
    }

    fn complete(&self) -> bool {
        self.control.is_some() && self.urgent.is_some() && self.data.iter().all(Option::is_some)
    }

    fn into_streams(self) -> Option<Streams> {
        Some(Streams {
            control: self.control?,
            urgent: self.urgent?,
            data: self.data.into_iter().collect::<Option<Vec<_>>>()?,
        })
    }
}

/// Authenticated streams, grouped by channel.
#[derive(Default)]
struct Sets {
    pending: HashMap<Key, Pending>,
    /// Sessions accepted, with their current generation.
    established: HashMap<[u8; SESSION_ID_LEN], u32>,
    /// The listening socket failed: (kind, what happened).
    stopped: Option<(io::ErrorKind, String)>,
}

/// The listening side as its owners hold it: the [`super::Listener`] and
/// every channel it accepted (for `reconnect`). When the last one goes, the
/// acceptor thread stops (within [`TICK`]), the handshakes in flight are
/// cut and the listening socket closes.
pub(super) struct ListenerCore {
    shared: Arc<Shared>,
}

impl std::ops::Deref for ListenerCore {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Drop for ListenerCore {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl ListenerCore {
    /// Start accepting on `acceptor`: the acceptor thread runs until the
    /// returned core is dropped.
    pub(super) fn start(
        acceptor: Box<dyn AcceptConn>,
        config: ChannelConfig,
    ) -> Result<(Arc<Self>, thread::JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            acceptor,
            config,
            replay: Mutex::default(),
            sets: Mutex::default(),
            ready: Condvar::new(),
            table: Mutex::default(),
            closed: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let handle = thread::Builder::new()
            .name("lmig-accept".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn(move || {
                AcceptorLoop {
                    shared: thread_shared,
                }
                .run()
            })
            .map_err(|e| TransportError::io("starting the acceptor thread", e))?;
        Ok((Arc::new(Self { shared }), handle))
    }
}

/// What the acceptor thread, the handshake threads and the owners share.
pub(super) struct Shared {
    acceptor: Box<dyn AcceptConn>,
    pub(super) config: ChannelConfig,
    replay: Mutex<ReplayCache>,
    sets: Mutex<Sets>,
    /// Signalled when a stream is filed or the listener stops.
    ready: Condvar,
    table: Mutex<Table>,
    /// The owners are gone: stop accepting.
    closed: AtomicBool,
}

impl Shared {
    /// The owners are gone: stop the acceptor, cut every handshake.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut t = lock(&self.table);
        while !t.in_flight.is_empty() {
            t.cut(0, CUT_CLOSED);
        }
        drop(t);
        self.ready.notify_all();
    }

    /// The counters now.
    pub(super) fn stats(&self) -> ListenerStats {
        let t = lock(&self.table);
        ListenerStats {
            in_flight: t.in_flight.len(),
            ..t.stats
        }
    }

    /// Wait until a complete set matching `want` is there, take it and
    /// record its session as established with its generation. Fails only
    /// when `wait` runs out or the listening socket failed.
    pub(super) fn accept_set(
        &self,
        want: &dyn Fn(&Key) -> bool,
        wait: Option<Duration>,
    ) -> Result<(Key, Streams)> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut sets = lock(&self.sets);
        loop {
            let found = sets
                .pending
                .iter()
                .find(|(k, p)| want(k) && p.complete())
                .map(|(k, _)| *k);
            if let Some(key) = found {
                if let Some(streams) = sets.pending.remove(&key).and_then(Pending::into_streams) {
                    sets.established.insert(key.0, key.1);
                    return Ok((key, streams));
                }
                continue;
            }
            if let Some((kind, what)) = &sets.stopped {
                return Err(TransportError::io(
                    "the listener stopped accepting",
                    io::Error::new(*kind, what.clone()),
                ));
            }
            sets = match deadline {
                None => self.ready.wait(sets).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(TransportError::Timeout {
                            waiting_for: "the dialer's streams",
                            after: wait.unwrap_or_default(),
                        });
                    }
                    self.ready
                        .wait_timeout(sets, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

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
                t.cut(i, CUT_TIMEOUT);
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
                match t.least_progress() {
                    Some(i) => t.cut(i, CUT_EVICTED),
                    None => break,
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
        let core = self.clone();
        let thread_peer = peer.clone();
        let spawned = thread::Builder::new()
            .name("lmig-handshake".into())
            .stack_size(HANDSHAKE_STACK)
            .spawn(move || core.handshake(conn, id, &progress, thread_peer));
        if let Err(e) = spawned {
            // The closure (and the connection in it) was dropped.
            let e = TransportError::io("spawning a handshake thread", e);
            if self.finish(id, Err(&e)) {
                self.report(peer, e);
            }
        }
    }

    /// Remove handshake `id` from the table and count its outcome; false if
    /// the acceptor cut it first (it was counted then).
    fn finish(&self, id: u64, result: std::result::Result<(), &TransportError>) -> bool {
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

    fn report(&self, peer: String, error: TransportError) {
        self.config.on_reject.call(&Rejection { peer, error });
    }

    /// A handshake thread: authenticate `conn`, file it, or refuse it.
    fn handshake(&self, conn: Box<dyn Conn>, id: u64, progress: &Progress, peer: String) {
        match self.authenticate(conn, id, progress) {
            Ok((hello, stream)) => {
                if self.finish(id, Ok(())) {
                    if let Err(e) = self.file(&hello, stream) {
                        self.report(peer, e);
                    }
                } else {
                    // Cut just as it completed: it no longer holds a place.
                    stream.writer.shutdown_conn();
                    self.report(peer, self.cut_error(progress.cut.load(Ordering::Acquire)));
                }
            }
            Err(e) => self.report(peer, e),
        }
    }

    fn cut_error(&self, why: u8) -> TransportError {
        match why {
            CUT_EVICTED => TransportError::Evicted {
                cap: self.config.max_handshakes,
            },
            CUT_CLOSED => TransportError::Handshake {
                detail: "the listener was closed".into(),
            },
            _ => TransportError::Timeout {
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
                    let (reader, writer) = secure::seal(reader, writer, a.keys);
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
        let reason = match &e {
            TransportError::Evicted { .. } => Some(RejectReason::Busy),
            TransportError::Timeout { .. } => Some(RejectReason::Timeout),
            _ => None,
        };
        if let Some(reason) = reason {
            let mut io = HandshakeConn {
                reader: &mut reader,
                writer: &mut *writer,
                timeout: config.handshake_timeout,
                hello_seen: None,
            };
            let _ = io.send(&Handshake::Reject(Reject { reason }));
        }
        linger(&mut *writer);
        writer.shutdown_conn();
        Err(e)
    }

    /// The error to report for a failed handshake: why the acceptor cut it,
    /// if it did, else `e`.
    fn cut_or(&self, progress: &Progress, e: TransportError) -> TransportError {
        match progress.cut.load(Ordering::Acquire) {
            CUT_NONE => e,
            cut => self.cut_error(cut),
        }
    }

    /// Does the announced stream fit (session, generation, lane)?
    fn check(&self, h: &Hello) -> Result<()> {
        let bad = |detail: String| Err(TransportError::Handshake { detail });
        let sets = lock(&self.sets);
        match (h.generation, sets.established.get(&h.session).copied()) {
            (0, Some(_)) => return bad("a new stream for a session already established".into()),
            (g, Some(cur)) if g <= cur => return bad(format!("stale generation {g}")),
            (g, None) if g > 0 => return bad("reconnect for an unknown session".into()),
            _ => {}
        }
        if let Some(p) = sets.pending.get(&(h.session, h.generation)) {
            if p.data_streams != h.data_streams {
                return bad("streams disagree on the number of data lanes".into());
            }
            if p.has(h.role, h.index) {
                return bad(format!(
                    "{} stream {} announced twice",
                    role_name(h.role),
                    h.index
                ));
            }
        }
        Ok(())
    }

    /// File an authenticated stream under its session and wake the waiters.
    fn file(&self, hello: &Hello, stream: Stream) -> Result<()> {
        let mut sets = lock(&self.sets);
        if self.closed.load(Ordering::Acquire) {
            stream.writer.shutdown_conn();
            return Err(self.cut_error(CUT_CLOSED));
        }
        let p = sets
            .pending
            .entry((hello.session, hello.generation))
            .or_insert_with(|| Pending::new(hello.data_streams));
        // Checked before the proof; two streams of a keyholder racing for
        // one lane are caught here.
        if p.data_streams != hello.data_streams || p.has(hello.role, hello.index) {
            stream.writer.shutdown_conn();
            return Err(TransportError::Handshake {
                detail: format!(
                    "{} stream {} does not fit its channel any more",
                    role_name(hello.role),
                    hello.index
                ),
            });
        }
        match hello.role {
            StreamRole::Control => p.control = Some(stream),
            StreamRole::Urgent => p.urgent = Some(stream),
            StreamRole::Data => {
                if let Some(slot) = p.data.get_mut(usize::from(hello.index)) {
                    *slot = Some(stream);
                }
            }
        }
        drop(sets);
        self.ready.notify_all();
        Ok(())
    }

    /// The listening socket failed for good: wake every waiter with it.
    fn stop(&self, e: &io::Error) {
        lock(&self.sets).stopped = Some((e.kind(), e.to_string()));
        self.ready.notify_all();
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

/// The acceptor thread: accepts for as long as someone holds the listener.
struct AcceptorLoop {
    shared: Arc<Shared>,
}

impl AcceptorLoop {
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
                        let mut t = lock(&core.table);
                        if let Some(i) = t.least_progress() {
                            t.cut(i, CUT_EVICTED);
                        }
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    core.stop(&e);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthKey;
    use crate::channel::Endpoint;

    #[test]
    fn acceptor_thread_stops_when_the_owners_are_gone() {
        let config = ChannelConfig::new(AuthKey::new([1u8; 32]).unwrap());
        let (acceptor, _) =
            super::super::net::listen(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), &config)
                .unwrap();
        let (core, thread) = ListenerCore::start(acceptor, config).unwrap();
        let other_owner = core.clone();
        drop(core);
        std::thread::sleep(TICK * 2);
        assert!(!thread.is_finished(), "an owner is left");
        drop(other_owner);
        for _ in 0..100 {
            if thread.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            thread.is_finished(),
            "the acceptor thread outlived its listener"
        );
    }

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
        t.cut(i, CUT_EVICTED);
        let i = t.least_progress().unwrap();
        assert_eq!(t.in_flight[i].id, 1);
        t.cut(i, CUT_EVICTED);
        assert_eq!(t.in_flight[t.least_progress().unwrap()].id, 0);
        assert_eq!((t.stats.rejected, t.stats.evicted), (2, 2));
    }
}
