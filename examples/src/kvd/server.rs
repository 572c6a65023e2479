//! kvd's event loop: one thread, mio, many connections; it can be parked for
//! the freeze (handing over its connections' buffered bytes and a duplicate
//! of every socket fd), resumed after an abort, or told to exit after the
//! commit.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

mod control;
mod postcopy;

pub use control::{Control, Counters, POSTCOPY_PAUSED, Parked, Wake};

use super::commands::execute;
use super::park::Parking;
use super::resp;
use super::store::Store;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// The post-copy residency eventfd ([`Server::set_residency`]).
const PARKED: Token = Token(usize::MAX - 1);
/// The gate of never-sent bytes written after the commit ([`Server::set_unsent`]).
const UNSENT: Token = Token(usize::MAX - 2);
/// The listener's accept queue (the kernel caps it at
/// `net.core.somaxconn`). A client opening many connections at once
/// (redis-benchmark opens `-c 1000` at each test's start) overflowed std's
/// 128 while a loop turn or the freeze held the loop, and an overflowed
/// handshake costs that client a retransmission of a second or more.
pub const ACCEPT_BACKLOG: i32 = 4096;
/// Connection ids start here (0 is the listener's id in migration records).
const FIRST_CONN: u64 = 2;

/// One client connection.
struct Conn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Registered for writability too (only while output waits: otherwise
    /// every ACK that frees send buffer space would wake the loop).
    writable: bool,
}

/// A poller with restored sockets already registered, made while the
/// destination activates them (see [`Server::preregister`]).
pub struct Preregistered {
    poll: Poll,
    ids: HashSet<u64>,
    /// The registered sockets were created non-blocking.
    nonblocking: bool,
}

impl Preregistered {
    /// Register more sockets (see [`Server::preregister`]). A socket that
    /// is closed later leaves the poller by itself; its number may come
    /// again with another socket, registered anew.
    pub fn register(&mut self, fds: &[(u64, RawFd)]) {
        for &(id, fd) in fds {
            let token = if id == super::migrate::LISTENER_ID {
                LISTENER
            } else if id < FIRST_CONN {
                continue;
            } else {
                token(id)
            };
            if self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
                .is_ok()
            {
                self.ids.insert(id);
            }
        }
    }
}

/// The loop and its connections.
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    control: Control,
    wake_rx: Receiver<Wake>,
    /// Connections that arrived with buffered bytes: served once at the start.
    buffered: Vec<u64>,
    /// Post-copy: requests parked until their pages are here.
    parking: Option<Parking>,
    /// After a migration: connections whose never-sent bytes lmig-net is
    /// still writing; kvd writes nothing to them until they are in.
    unsent: Option<lmig_net::UnsentTails>,
    /// Connections whose sockets may still hold input that no readiness
    /// event will report again (readiness is edge-triggered): the read
    /// limit was reached, or the connection was not read while it had all
    /// the parked requests it may have. Served again after the next poll,
    /// which then does not wait.
    again: Vec<u64>,
}

fn token(id: u64) -> Token {
    Token(id as usize)
}

impl Server {
    /// A server on `listener` with `conns` (restored after a migration: id,
    /// socket, buffered input, buffered output).
    pub fn new(
        listener: std::net::TcpListener,
        conns: Vec<(u64, std::net::TcpStream, Vec<u8>, Vec<u8>)>,
    ) -> std::io::Result<Self> {
        Self::with_poller(
            Preregistered {
                poll: Poll::new()?,
                ids: HashSet::new(),
                nonblocking: false,
            },
            listener,
            conns,
        )
    }

    /// Register restored sockets by fd number (`id`, fd; the listener has id
    /// [`LISTENER_ID`](super::migrate::LISTENER_ID)) before they are handed
    /// over, so that building the server after the commit costs no
    /// `epoll_ctl` for them. A number that is not a socket any more by then
    /// only costs an event nobody serves. `nonblocking`: the sockets were
    /// created non-blocking (no `ioctl` each either).
    pub fn preregister(fds: &[(u64, RawFd)], nonblocking: bool) -> std::io::Result<Preregistered> {
        let mut pre = Preregistered {
            poll: Poll::new()?,
            ids: HashSet::with_capacity(fds.len()),
            nonblocking,
        };
        pre.register(fds);
        Ok(pre)
    }

    /// [`Server::new`] on a poller where some sockets are registered already.
    pub fn with_poller(
        pre: Preregistered,
        listener: std::net::TcpListener,
        conns: Vec<(u64, std::net::TcpStream, Vec<u8>, Vec<u8>)>,
    ) -> std::io::Result<Self> {
        let Preregistered {
            poll,
            ids,
            nonblocking,
        } = pre;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        listener.set_nonblocking(true)?;
        // Listening again only sets the queue's length (a restored
        // listener carries the length it had at the source).
        socket2::SockRef::from(&listener).listen(ACCEPT_BACKLOG)?;
        let mut listener = TcpListener::from_std(listener);
        if !ids.contains(&super::migrate::LISTENER_ID) {
            poll.registry()
                .register(&mut listener, LISTENER, Interest::READABLE)?;
        }
        let (wake_tx, wake_rx) = channel();
        let mut server = Self {
            poll,
            listener: Some(listener),
            conns: HashMap::with_capacity(conns.len()),
            next_id: FIRST_CONN,
            control: Control {
                pause: Arc::new(AtomicBool::new(false)),
                waker,
                parked_tx: Arc::new(Mutex::new(None)),
                wake_tx,
                counters: Arc::new(Counters::default()),
            },
            wake_rx,
            buffered: Vec::new(),
            again: Vec::new(),
            parking: None,
            unsent: None,
        };
        for (id, stream, rbuf, wbuf) in conns {
            if !rbuf.is_empty() || !wbuf.is_empty() {
                server.buffered.push(id);
            }
            let registered = ids.contains(&id);
            if !(registered && nonblocking) {
                stream.set_nonblocking(true)?;
            }
            server.add_conn(id, stream, rbuf, wbuf, registered)?;
        }
        Ok(server)
    }

    /// After a migration with `SinkConfig::unsent_in_background`: honour
    /// the gate's contract (no write to a connection whose never-sent bytes
    /// are still being written) and serve each connection again as its
    /// bytes are in.
    pub fn set_unsent(&mut self, gate: lmig_net::UnsentTails) -> std::io::Result<()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&gate.fd());
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), UNSENT, Interest::READABLE)?;
        self.unsent = Some(gate);
        Ok(())
    }

    /// Never-sent bytes are in: write what waited on those connections.
    fn unsent_written(&mut self, store: &Store<'_>) {
        let Some(gate) = self.unsent.as_ref() else {
            return;
        };
        for id in gate.take_written() {
            self.serve(id, store);
        }
    }

    /// Serve once more the connections `again` holds.
    fn serve_again(&mut self, store: &Store<'_>) {
        let mut ids = std::mem::take(&mut self.again);
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.serve(id, store);
        }
    }

    /// A handle to park, resume or end the loop.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    fn add_conn(
        &mut self,
        id: u64,
        stream: std::net::TcpStream,
        rbuf: Vec<u8>,
        wbuf: Vec<u8>,
        registered: bool,
    ) -> std::io::Result<()> {
        let mut stream = TcpStream::from_std(stream);
        let writable = !wbuf.is_empty();
        let interest = if writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if !registered {
            self.poll
                .registry()
                .register(&mut stream, token(id), interest)?;
        } else if writable {
            self.poll
                .registry()
                .reregister(&mut stream, token(id), interest)?;
        }
        self.insert_conn(id, stream, rbuf, wbuf);
        if let Some(c) = self.conns.get_mut(&id) {
            c.writable = writable;
        }
        Ok(())
    }

    /// Serve a connection registered with the poller already.
    fn insert_conn(&mut self, id: u64, stream: TcpStream, rbuf: Vec<u8>, wbuf: Vec<u8>) {
        self.next_id = self.next_id.max(id + 1);
        self.conns.insert(
            id,
            Conn {
                stream,
                rbuf,
                wbuf,
                writable: false,
            },
        );
        self.control
            .counters
            .clients
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Accept what waits and serve every connection once, after a pause
    /// (readiness is edge-triggered: events of the batch left for the pause
    /// are not reported again).
    fn serve_all(&mut self, store: &Store<'_>) -> std::io::Result<()> {
        self.accept_all()?;
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.serve(id, store);
        }
        Ok(())
    }

    /// Serve until told to exit after a commit.
    ///
    /// No pass over every connection at the start: a socket with bytes
    /// waiting is reported at the first poll (readiness is checked at
    /// registration); only connections that arrived with buffered bytes
    /// (read or written by the source before the freeze) are served first.
    pub fn run(&mut self, store: &Store<'_>) -> std::io::Result<()> {
        for id in std::mem::take(&mut self.buffered) {
            self.serve(id, store);
        }
        let mut events = Events::with_capacity(1024);
        // LMIG_DEMO_DEBUG: how the first passes after a start went.
        let mut traced = if std::env::var_os("LMIG_DEMO_DEBUG").is_some() {
            5
        } else {
            0
        };
        let started = std::time::Instant::now();
        let mut stalls = super::stall::StallLog::from_env();
        loop {
            if self.control.pause.load(Ordering::SeqCst) {
                match self.park()? {
                    Wake::Resume(parked) => {
                        self.take_back(parked)?;
                        // Readiness is edge-triggered: events of the batch left
                        // for the pause are not reported again.
                        self.serve_all(store)?;
                        continue;
                    }
                    Wake::Exit => return Ok(()),
                }
            }
            let polling = stalls.as_mut().map(|s| s.before_poll());
            let wait = self.next_wait();
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if events.is_empty() && !wait.is_zero() {
                if let Some(p) = self.parking.as_mut() {
                    p.quiet();
                }
            }
            if let (Some(s), Some(at)) = (stalls.as_mut(), polling) {
                let served = self.control.counters.requests.load(Ordering::Relaxed);
                s.after_poll(at, events.iter().count(), served, self.parked());
            }
            let timer = super::pace::PassTimer::start(
                self.control.counters.requests.load(Ordering::Relaxed),
            );
            let pass = (traced > 0).then(|| {
                let served = self.control.counters.requests.load(Ordering::Relaxed);
                (std::time::Instant::now(), served)
            });
            for ev in &events {
                // A freeze request is served before the rest of the batch:
                // unserved events stay pending in the kernel and the sockets.
                if self.control.pause.load(Ordering::Relaxed) {
                    break;
                }
                match ev.token() {
                    LISTENER => self.accept_all()?,
                    WAKER => {}
                    PARKED => self.unpark(store),
                    UNSENT => self.unsent_written(store),
                    Token(t) => self.serve(t as u64, store),
                }
            }
            if !self.control.pause.load(Ordering::Relaxed) {
                self.serve_again(store);
            }
            let counters = &self.control.counters;
            timer.done(&counters.pace, counters.requests.load(Ordering::Relaxed));
            if let Some((at, served)) = pass {
                traced -= 1;
                eprintln!(
                    "kvd: pass at {:?}: {} events, {} requests, {:?}",
                    at - started,
                    events.iter().count(),
                    self.control.counters.requests.load(Ordering::Relaxed) - served,
                    at.elapsed()
                );
            }
        }
    }

    fn accept_all(&mut self) -> std::io::Result<()> {
        let Some(listener) = self.listener.as_ref() else {
            return Ok(());
        };
        let mut accepted = Vec::new();
        for _ in 0..4096 {
            match listener.accept() {
                Ok((stream, _)) => accepted.push(std::net::TcpStream::from(OwnedFd::from(stream))),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        for stream in accepted {
            // Restored connections keep the option (lmig carries it).
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            let id = self.next_id;
            self.add_conn(id, stream, Vec::new(), Vec::new(), false)?;
        }
        Ok(())
    }

    fn serve(&mut self, id: u64, store: &Store<'_>) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut closed = false;
        let mut buf = [0u8; 16384];
        // A connection with all the parked requests it may have is not read
        // (nor its input parsed) until they ran.
        let held = self.parking.as_ref().is_some_and(|p| p.full(id));
        let reads = if held { 0 } else { 64 };
        let mut drained = false;
        for _ in 0..reads {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    conn.rbuf.extend_from_slice(&buf[..n]);
                    // A short read emptied the socket: no second read just to
                    // see `EAGAIN` (epoll(7): for stream sockets a short read
                    // detects the exhausted buffer; new data is a new edge).
                    if n < buf.len() {
                        drained = true;
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        // Parked requests first, in order (post-copy).
        while let Some(args) = self.parking.as_mut().and_then(|p| p.next(id, store)) {
            execute(store, &args, &mut conn.wbuf, &self.control.counters);
            self.control
                .counters
                .requests
                .fetch_add(1, Ordering::Relaxed);
        }
        let mut consumed = 0;
        loop {
            if self.parking.as_ref().is_some_and(|p| p.full(id)) {
                break;
            }
            match resp::parse(&conn.rbuf[consumed..]) {
                Ok(Some((args, n))) => {
                    consumed += n;
                    let args = match self.parking.as_mut() {
                        Some(p) if !args.is_empty() => p.admit(id, store, args),
                        _ => Some(args),
                    };
                    let Some(args) = args else {
                        self.control.counters.parked.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    if !args.is_empty() {
                        execute(store, &args, &mut conn.wbuf, &self.control.counters);
                        self.control
                            .counters
                            .requests
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    resp::error(&mut conn.wbuf, &format!("Protocol error: {}", e.0));
                    consumed = conn.rbuf.len();
                    closed = true;
                    break;
                }
            }
        }
        conn.rbuf.drain(..consumed);
        // lmig-net's contract: nothing overtakes the never-sent bytes it
        // still writes (`unsent_written` serves the connection again).
        let gated = self.unsent.as_ref().is_some_and(|g| g.is_pending(id));
        while !gated && !conn.wbuf.is_empty() {
            match conn.stream.write(&conn.wbuf) {
                Ok(0) => break,
                Ok(n) => {
                    conn.wbuf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let want = !gated && !conn.wbuf.is_empty();
        if !closed && want != conn.writable {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            closed = self
                .poll
                .registry()
                .reregister(&mut conn.stream, token(id), interest)
                .is_err();
            conn.writable = want;
        }
        // Input may wait in the socket with no edge to report it: serve this
        // connection again soon, unless its parked requests still wait for
        // pages (their arrival serves it).
        if !closed && !drained && !self.parking.as_ref().is_some_and(|p| p.full(id)) {
            self.again.push(id);
        }
        if closed {
            if let Some(p) = self.parking.as_mut() {
                p.forget(id);
            }
            if let Some(mut c) = self.conns.remove(&id) {
                let _ = self.poll.registry().deregister(&mut c.stream);
                self.control
                    .counters
                    .clients
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Hand over every socket and the buffered bytes; wait.
    ///
    /// The sockets stay registered with the poller (no system call per
    /// connection here, in the freeze): they come back as the same fds after
    /// an abort, and after the commit this process exits.
    fn park(&mut self) -> std::io::Result<Wake> {
        // Migrating on: the last migration's never-sent bytes are in the
        // sockets before they are captured. Bounded: the writer gives each
        // connection at most 5 s (then shuts it down and lists it written).
        if let Some(gate) = self.unsent.take() {
            let rounds = 5 * gate.pending_len() + 5;
            for _ in 0..rounds {
                if gate.wait(Duration::from_secs(1)) {
                    break;
                }
            }
        }
        let listener = self
            .listener
            .take()
            .ok_or_else(|| std::io::Error::other("no listener"))?;
        // One more: the migration adds the listener to this list.
        let mut conns = Vec::with_capacity(self.conns.len() + 1);
        let mut state = Vec::new();
        encode_state_header(&mut state, self.conns.len());
        for (id, c) in self.conns.drain() {
            encode_conn_state(&mut state, id, &c.rbuf, &c.wbuf);
            conns.push((id, OwnedFd::from(c.stream)));
        }
        self.control.counters.clients.store(0, Ordering::Relaxed);
        let parked = Parked {
            listener: OwnedFd::from(listener),
            conns,
            state,
        };
        let tx = self.control.parked_tx.lock().expect("poisoned").take();
        match tx {
            Some(tx) => {
                if let Err(back) = tx.send(parked) {
                    // Nobody waits for the sockets: serve on with them.
                    return Ok(Wake::Resume(back.0));
                }
            }
            None => return Ok(Wake::Resume(parked)),
        }
        // Parked until told: resume with the sockets (abort) or exit (commit).
        Ok(self.wake_rx.recv().unwrap_or(Wake::Exit))
    }

    /// Serve again the sockets of a [`Parked`] (after a failed migration or
    /// a snapshot): the same fds [`Server::park`] handed out, still registered.
    fn take_back(&mut self, parked: Parked) -> std::io::Result<()> {
        let listener = std::net::TcpListener::from(parked.listener);
        self.listener = Some(TcpListener::from_std(listener));
        let bufs: HashMap<u64, (Vec<u8>, Vec<u8>)> = decode_state(&parked.state)
            .map_err(std::io::Error::other)?
            .into_iter()
            .map(|(id, r, w)| (id, (r, w)))
            .collect();
        let mut bufs = bufs;
        for (id, fd) in parked.conns {
            let (r, w) = bufs.remove(&id).unwrap_or_default();
            let stream = TcpStream::from_std(std::net::TcpStream::from(fd));
            self.insert_conn(id, stream, r, w);
        }
        Ok(())
    }
}

/// One connection's buffered bytes: `(id, input, output)`.
pub type ConnState = (u64, Vec<u8>, Vec<u8>);

/// The start of kvd's state: the number of connections that follow.
pub fn encode_state_header(out: &mut Vec<u8>, conns: usize) {
    out.extend_from_slice(&(conns as u64).to_le_bytes());
}

/// One connection's part of kvd's state: its id, then its buffered input
/// and output, each with its length.
pub fn encode_conn_state(out: &mut Vec<u8>, id: u64, rbuf: &[u8], wbuf: &[u8]) {
    out.extend_from_slice(&id.to_le_bytes());
    for b in [rbuf, wbuf] {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    }
}

/// The smallest encoding of one connection (id and two lengths).
const MIN_CONN_STATE: usize = 24;

/// Decode the state a parked loop produced, one [`ConnState`] per
/// connection. Bytes after the last connection are ignored; nothing is
/// allocated beyond what the input holds.
pub fn decode_state(mut s: &[u8]) -> Result<Vec<ConnState>, String> {
    fn take<'a>(s: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if s.len() < n {
            return Err("kvd state truncated".into());
        }
        let (a, b) = s.split_at(n);
        *s = b;
        Ok(a)
    }
    fn word(s: &mut &[u8]) -> Result<u64, String> {
        Ok(u64::from_le_bytes(take(s, 8)?.try_into().expect("8 bytes")))
    }
    let n = word(&mut s)?;
    if n > 1 << 20 {
        return Err(format!("kvd state claims {n} connections"));
    }
    // A count the bytes cannot hold fails below, without reserving for it.
    let mut out = Vec::with_capacity((n as usize).min(s.len() / MIN_CONN_STATE));
    for _ in 0..n {
        let id = word(&mut s)?;
        let r = word(&mut s)? as usize;
        let rbuf = take(&mut s, r)?.to_vec();
        let w = word(&mut s)? as usize;
        let wbuf = take(&mut s, w)?.to_vec();
        out.push((id, rbuf, wbuf));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn the_listener_queues_a_burst_of_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let same = listener.try_clone().unwrap();
        let _server = super::Server::new(listener, Vec::new()).unwrap();
        // For a listening socket `tcpi_sacked` is its accept queue's length.
        let queue = lmig_net::sys::tcp_info(same.as_fd()).unwrap().sacked;
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .map_or(4096, |s| s.trim().parse().unwrap_or(4096));
        assert_eq!(queue, (super::ACCEPT_BACKLOG as u32).min(somaxconn));
        assert!(queue > 128 || somaxconn <= 128, "std's 128 kept: {queue}");
    }
}
