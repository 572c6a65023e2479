//! Channels: authenticated multi-stream message transport implementing
//! [`lmig_core::Channel`].
//!
//! A channel is a set of connections between the same two sides, each one
//! authenticated on its own ([`crate::auth`]):
//!
//! * one **control** stream for the session's messages,
//! * `data_streams` **data** streams for pages (lane `i` is stream `i`;
//!   the session keeps every page of one chunk on one lane, and each stream
//!   is FIFO),
//! * one **urgent** stream for post-copy page requests and their replies,
//!   so that they never queue behind bulk pages.
//!
//! Every stream has a reader thread that decodes frames and feeds one
//! bounded queue shared by the channel; [`Channel::recv`] reads that queue.
//! When the queue is full the readers stop reading and TCP flow control
//! slows the sender down. The urgent stream is the exception once a
//! consumer calls [`Channel::recv_urgent`]: from its next message on that
//! consumer reads the stream itself (see `DirectUrgent`), so a post-copy
//! request or reply wakes the thread that acts on it and no other.
//!
//! Either side may listen: [`Listener::bind`] + [`Listener::accept`] on one,
//! [`connect`] on the other. A listener accepts and authenticates
//! connections in the background (see `accept.rs`): strangers are refused,
//! reported and counted without disturbing anyone waiting for a channel. [`pair`] builds an in-memory channel pair
//! that still encodes, authenticates and decodes every frame.
//!
//! # Failures
//!
//! A peer that vanishes or closes shows up as a
//! [`MigrationError::Channel`] from `recv` and `send`, never as a hang:
//! a closed connection is seen at once, TCP keepalive (10 s idle, then 3
//! probes 5 s apart) catches a peer host that went silent, and writes time
//! out after [`ChannelConfig::write_timeout`]. The peer closing every stream
//! cleanly (after its last message) is reported only once every message it
//! sent before closing was received.
//!
//! # Recovery
//!
//! [`Channel::reconnect`] re-establishes every stream for the same session
//! id with the next generation number, re-running the authentication: the
//! dialing side dials again, the listening side waits (up to
//! [`ChannelConfig::reconnect_timeout`]) on the listener that accepted the
//! channel. Call it on both sides; messages that were in flight on the
//! broken connections are lost (the session resends what is missing).

mod accept;
mod conn;
mod limit;
mod net;
mod pipe;
mod queue;
mod secure;

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use lmig_core::protocol::{Message, PageBatch};
use lmig_core::{Channel, MigrationError};

use crate::auth::{self, AuthKey};
use crate::error::{Result, TransportError};
use crate::tls::TlsIdentity;
use crate::wire::{Hello, SESSION_ID_LEN, StreamRole, WireItem, encode_message};
use accept::{ListenerCore, RejectHook};
pub use accept::{ListenerStats, Rejection};
use conn::{Conn, FrameReader, HandshakeConn, ReadOutcome};
use limit::TokenBucket;
pub use net::{Endpoint, connect};
use queue::EventQueue;
pub use secure::Security;

/// How a channel is set up. Both sides need the same [`Security`] mode
/// and key (or certificates from a CA the other trusts).
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// How streams are authenticated and protected; by default
    /// [`Security::Psk`]: every byte after the handshake encrypted and
    /// authenticated by Noise keyed by the pre-shared key.
    pub security: Security,
    /// Data streams the dialer opens (1..=64); the listener takes what the
    /// dialer announces.
    pub data_streams: usize,
    /// Bytes per second over all streams together (frames and headers);
    /// `None`: unlimited.
    pub bandwidth_limit: Option<u64>,
    /// Longest wait for each step of a stream's handshake; on the listening
    /// side also the longest a whole handshake may take (a peer trickling
    /// bytes is cut at this deadline).
    pub handshake_timeout: Duration,
    /// Longest wait to establish a TCP connection.
    pub connect_timeout: Duration,
    /// Longest a write may block (the peer stopped reading). `None`: forever.
    pub write_timeout: Option<Duration>,
    /// `SO_SNDBUF` / `SO_RCVBUF` for TCP streams; `None` keeps the kernel's
    /// auto-tuning.
    pub socket_buffer: Option<usize>,
    /// Messages buffered between the reader threads and `recv`.
    pub queue_depth: usize,
    /// How long the listening side's `reconnect` waits for the dialer.
    pub reconnect_timeout: Duration,
    /// Most unauthenticated connections a listener handshakes at once. When
    /// one more arrives, the one that made the least progress (no valid
    /// `Hello` yet, then the oldest) is dropped with a `Busy` reject: a
    /// flood of idle connections cannot lock out a dialer, which sends its
    /// `Hello` at once.
    pub max_handshakes: usize,
    /// Called with every connection a listener refuses.
    on_reject: RejectHook,
}

impl ChannelConfig {
    /// Streams admitted by the pre-shared `key` and encrypted with Noise
    /// keyed by it ([`Security::Psk`], the default mode).
    ///
    /// Defaults: one data stream, no bandwidth limit, 10 s handshake and
    /// connect timeouts, 60 s write timeout, kernel socket buffers, a queue
    /// of 64 messages, 30 s to reconnect, 64 handshakes in flight per
    /// listener, no rejection hook.
    pub fn new(key: AuthKey) -> Self {
        Self::with_security(Security::Psk(key))
    }

    /// Streams in TLS 1.3 with certificates verified both ways
    /// ([`Security::Tls`]); other defaults as [`ChannelConfig::new`].
    pub fn tls(identity: TlsIdentity) -> Self {
        Self::with_security(Security::Tls(identity))
    }

    /// Streams admitted by the pre-shared `key`, then **unencrypted**
    /// ([`Security::PlaintextTrustedLinkOnly`]): only for a link that is
    /// private and trusted by itself. Other defaults as [`ChannelConfig::new`].
    pub fn plaintext_trusted_link_only(key: AuthKey) -> Self {
        Self::with_security(Security::PlaintextTrustedLinkOnly(key))
    }

    /// Streams protected as `security` says; other defaults as
    /// [`ChannelConfig::new`].
    pub fn with_security(security: Security) -> Self {
        Self {
            security,
            data_streams: 1,
            bandwidth_limit: None,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            write_timeout: Some(Duration::from_secs(60)),
            socket_buffer: None,
            queue_depth: 64,
            reconnect_timeout: Duration::from_secs(30),
            max_handshakes: 64,
            on_reject: RejectHook::default(),
        }
    }

    /// Call `f` with every connection a listener using this config refuses
    /// (bad bytes, wrong key, replay, timeout, eviction…), on the thread
    /// that ran its handshake. Keep it short; it must not block.
    #[must_use]
    pub fn on_reject(mut self, f: impl Fn(&Rejection) + Send + Sync + 'static) -> Self {
        self.on_reject = RejectHook::new(f);
        self
    }

    /// Set the number of data streams.
    pub fn with_data_streams(mut self, n: usize) -> Self {
        self.data_streams = n;
        self
    }

    /// Limit the sending rate to `bytes_per_sec`.
    pub fn with_bandwidth_limit(mut self, bytes_per_sec: u64) -> Self {
        self.bandwidth_limit = Some(bytes_per_sec);
        self
    }

    fn check(&self) -> Result<()> {
        if !(1..=usize::from(crate::wire::MAX_DATA_STREAMS)).contains(&self.data_streams) {
            return Err(TransportError::Config(format!(
                "{} data streams; 1..=64 allowed",
                self.data_streams
            )));
        }
        if self.queue_depth == 0 {
            return Err(TransportError::Config("queue depth 0".into()));
        }
        if self.max_handshakes == 0 {
            return Err(TransportError::Config("max_handshakes 0".into()));
        }
        Ok(())
    }
}

/// Opens connections to the listening side.
pub(crate) trait Dial: Send + Sync {
    fn dial(&self, config: &ChannelConfig) -> Result<Box<dyn Conn>>;
}

/// Accepts connections on the listening side.
pub(crate) trait AcceptConn: Send + Sync {
    /// The next connection, or `None` once `deadline` passed.
    fn accept_conn(
        &self,
        config: &ChannelConfig,
        deadline: Option<Instant>,
    ) -> std::io::Result<Option<Box<dyn Conn>>>;
}

/// A connection after its handshake: a writer and a framed reader.
struct Stream {
    writer: Box<dyn Conn>,
    reader: FrameReader,
    /// What protects its bytes.
    cipher: String,
}

/// The streams of one generation of a channel.
struct Streams {
    control: Stream,
    data: Vec<Stream>,
    urgent: Stream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn role_name(role: StreamRole) -> &'static str {
    match role {
        StreamRole::Control => "control",
        StreamRole::Data => "data",
        StreamRole::Urgent => "urgent",
    }
}

fn lane_plan(data_streams: u16) -> impl Iterator<Item = (StreamRole, u16)> {
    std::iter::once((StreamRole::Control, 0))
        .chain((0..data_streams).map(|i| (StreamRole::Data, i)))
        .chain(std::iter::once((StreamRole::Urgent, 0)))
}

/// Dial and authenticate every stream of one generation.
fn dial_streams(
    dialer: &dyn Dial,
    config: &ChannelConfig,
    session: [u8; SESSION_ID_LEN],
    generation: u32,
) -> Result<Streams> {
    let n = config.data_streams as u16;
    let mut control = None;
    let mut urgent = None;
    let mut data = Vec::with_capacity(n.into());
    for (role, index) in lane_plan(n) {
        let conn = dialer.dial(config)?;
        let stream = handshake_dial(conn, config, session, generation, role, index)?;
        match role {
            StreamRole::Control => control = Some(stream),
            StreamRole::Data => data.push(stream),
            StreamRole::Urgent => urgent = Some(stream),
        }
    }
    match (control, urgent) {
        (Some(control), Some(urgent)) => Ok(Streams {
            control,
            data,
            urgent,
        }),
        _ => Err(TransportError::Handshake {
            detail: "stream plan incomplete".into(),
        }),
    }
}

fn handshake_dial(
    conn: Box<dyn Conn>,
    config: &ChannelConfig,
    session: [u8; SESSION_ID_LEN],
    generation: u32,
    role: StreamRole,
    index: u16,
) -> Result<Stream> {
    let io_err = |e| TransportError::io("preparing a stream", e);
    conn.set_timeouts(
        Some(config.handshake_timeout),
        Some(config.handshake_timeout),
    )
    .map_err(io_err)?;
    let opened = secure::open(conn, &config.security, true)?;
    let mut writer = opened.writer;
    let mut reader = FrameReader::new(opened.reader);
    let hello = Hello {
        session,
        role,
        index,
        data_streams: config.data_streams as u16,
        generation,
        nonce: auth::nonce()?,
    };
    let result = auth::dial(
        &mut HandshakeConn {
            reader: &mut reader,
            writer: &mut *writer,
            timeout: config.handshake_timeout,
            hello_seen: None,
        },
        &opened.key,
        opened.mode,
        hello,
    );
    let keys = match result {
        Ok(a) => a.keys,
        Err(e) => {
            writer.shutdown_conn();
            return Err(e);
        }
    };
    writer
        .set_timeouts(None, config.write_timeout)
        .map_err(io_err)?;
    reader.set_authenticated();
    let (reader, writer) = secure::seal(reader, writer, keys);
    Ok(Stream {
        writer,
        reader,
        cipher: opened.cipher,
    })
}

type Key = ([u8; SESSION_ID_LEN], u32);

/// Accepts channels: binds an address, authenticates the dialer's streams
/// and groups them into channels.
pub struct Listener {
    core: Arc<ListenerCore>,
    local: Endpoint,
}

impl Listener {
    /// Listen on `endpoint` (TCP or Unix).
    pub fn bind(endpoint: &Endpoint, config: ChannelConfig) -> Result<Self> {
        config.check()?;
        let (acceptor, local) = net::listen(endpoint, &config)?;
        let (core, _acceptor_thread) = ListenerCore::start(acceptor, config)?;
        Ok(Self { core, local })
    }

    /// The address actually bound (with the port the kernel chose for port 0).
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.local
    }

    /// Wait for a dialer and return the authenticated channel.
    ///
    /// Connections are accepted and authenticated in the background, from
    /// [`Listener::bind`] on, several at once. A connection that fails its
    /// handshake costs that connection only: it is refused, reported to
    /// [`ChannelConfig::on_reject`] and counted in [`Listener::stats`], and
    /// this call keeps waiting. It fails only if the listening socket does.
    pub fn accept(&self) -> Result<StreamChannel> {
        self.accept_until(None)
    }

    /// [`Listener::accept`], giving up with [`TransportError::Timeout`] after `timeout`.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<StreamChannel> {
        self.accept_until(Some(timeout))
    }

    /// What the listener has accepted, authenticated and refused so far.
    pub fn stats(&self) -> ListenerStats {
        self.core.stats()
    }

    fn accept_until(&self, wait: Option<Duration>) -> Result<StreamChannel> {
        let ((session, generation), streams) = self.core.accept_set(&|k| k.1 == 0, wait)?;
        Ok(StreamChannel::start(
            streams,
            self.core.config.clone(),
            session,
            generation,
            Side::Listener(self.core.clone()),
        ))
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

enum Side {
    Dialer(Box<dyn Dial>),
    Listener(Arc<ListenerCore>),
}

/// The urgent stream's reader thread (its messages go first in the queue).
const URGENT_READER: &str = "lmig-rx-urgent";

/// What a reader thread reports.
enum Event {
    Msg(Message),
    Eof(u32),
    Failed(u32, TransportError),
}

/// The writing halves of one generation.
/// Bytes a data lane gathers before writing (frames larger than this go out directly).
const DATA_BUFFER: usize = 256 << 10;

struct Lanes {
    control: Mutex<Box<dyn Conn>>,
    /// Data lanes buffer small frames (single pages) into larger writes;
    /// [`Channel::flush`] pushes them out.
    data: Vec<Mutex<BufWriter<Box<dyn Conn>>>>,
    urgent: Mutex<Box<dyn Conn>>,
    /// Handles to shut every connection down.
    all: Vec<Box<dyn Conn>>,
}

impl Lanes {
    fn shutdown(&self) {
        for c in &self.all {
            c.shutdown_conn();
        }
    }
}

struct RecvState {
    generation: u32,
    open_lanes: usize,
    broken: Option<String>,
}

/// The urgent stream read by its consumer itself.
///
/// At first a reader thread reads the urgent stream like any other and
/// queues its messages. Once a consumer calls [`Channel::recv_urgent`]
/// (post-copy's dedicated urgent thread), the reader thread hands its reader
/// over here after its next message and ends, and `recv_urgent` reads the
/// stream directly: a page request or reply then wakes the thread that acts
/// on it, not a reader thread that has to wake it in turn (on this kind of
/// machine each such hand-off costs tens of µs). Readers of later
/// generations (after `reconnect`) go straight here.
///
/// A reader taken over gets a read timeout ([`ChannelConfig::handshake_timeout`]):
/// `recv_urgent` reads only once bytes are there, and a peer that stops in
/// the middle of a frame fails the stream instead of holding the consumer.
struct DirectUrgent {
    /// A consumer called `recv_urgent`.
    wanted: AtomicBool,
    /// The urgent stream's reader and its generation, once handed over.
    slot: Mutex<Option<(u32, FrameReader)>>,
    /// Longest a started frame may take to arrive in full.
    frame_timeout: Duration,
    /// The stream's write timeout (the socket's timeouts are shared by its
    /// reading and writing halves).
    write_timeout: Option<Duration>,
}

impl DirectUrgent {
    fn new(config: &ChannelConfig) -> Self {
        Self {
            wanted: AtomicBool::new(false),
            slot: Mutex::new(None),
            frame_timeout: config.handshake_timeout,
            write_timeout: config.write_timeout,
        }
    }

    /// Hand `reader` of `generation` to the consumer (unless a later
    /// generation's is there already).
    fn put(&self, slot: &mut Option<(u32, FrameReader)>, generation: u32, reader: FrameReader) {
        if slot.as_ref().is_some_and(|(g, _)| *g > generation) {
            return;
        }
        let _ = reader
            .conn()
            .set_timeouts(Some(self.frame_timeout), self.write_timeout);
        *slot = Some((generation, reader));
    }
}

struct Inner {
    config: ChannelConfig,
    /// What protects the streams' bytes.
    cipher: String,
    session: [u8; SESSION_ID_LEN],
    side: Side,
    lanes: RwLock<Arc<Lanes>>,
    queue: Arc<EventQueue<Event>>,
    urgent: Arc<DirectUrgent>,
    state: Mutex<RecvState>,
    limiter: Option<TokenBucket>,
    closed: AtomicBool,
    generation: AtomicU32,
    reconnect_lock: Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.queue.close();
        if let Ok(l) = self.lanes.read() {
            l.shutdown();
        }
    }
}

/// An authenticated channel over TCP, Unix or in-memory streams.
///
/// Cheap to share: methods take `&self`; wrap it in an `Arc` to use it
/// from several threads (the session sends pages on several lanes at once).
/// Dropping it closes every stream.
pub struct StreamChannel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StreamChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamChannel")
            .field("data_streams", &self.data_lanes())
            .field("generation", &self.inner.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl StreamChannel {
    fn start(
        streams: Streams,
        config: ChannelConfig,
        session: [u8; SESSION_ID_LEN],
        generation: u32,
        side: Side,
    ) -> Self {
        let queue = Arc::new(EventQueue::new(config.queue_depth));
        let limiter = config.bandwidth_limit.map(TokenBucket::new);
        let cipher = streams.control.cipher.clone();
        let (lanes, readers) = split(streams);
        let open_lanes = readers.len();
        let inner = Arc::new(Inner {
            cipher,
            session,
            side,
            lanes: RwLock::new(Arc::new(lanes)),
            queue,
            urgent: Arc::new(DirectUrgent::new(&config)),
            state: Mutex::new(RecvState {
                generation,
                open_lanes,
                broken: None,
            }),
            limiter,
            closed: AtomicBool::new(false),
            generation: AtomicU32::new(generation),
            reconnect_lock: Mutex::new(()),
            config,
        });
        spawn_readers(readers, &inner.queue, &inner.urgent, generation);
        Self { inner }
    }

    /// The channel's session id (the same on both sides, random per channel).
    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        self.inner.session
    }

    /// What protects the bytes of its streams: the Noise protocol name
    /// (`Noise_NNpsk0_25519_AESGCM_SHA256`), `TLS 1.3` and the suite
    /// negotiated, or `none` ([`Security::PlaintextTrustedLinkOnly`]).
    pub fn cipher(&self) -> &str {
        &self.inner.cipher
    }

    /// How many times the channel was re-established (0 at first).
    pub fn generation(&self) -> u32 {
        self.inner.generation.load(Ordering::Acquire)
    }

    fn write(&self, lane: Lane, msg: &Message) -> lmig_core::Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(MigrationError::channel_closed("the channel was shut down"));
        }
        let frames = encode_message(msg)
            .map_err(|e| MigrationError::channel(format!("cannot encode {}", msg.name()), e))?;
        if let Some(l) = &self.inner.limiter {
            l.acquire(frames.len());
        }
        let lanes = self
            .inner
            .lanes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (written, name) = match lane {
            Lane::Control => (frames.write_to(&mut **lock(&lanes.control)), "control"),
            Lane::Urgent => (frames.write_to(&mut **lock(&lanes.urgent)), "urgent"),
            Lane::Data(i) => (
                frames.write_to(&mut *lock(&lanes.data[i % lanes.data.len()])),
                "data",
            ),
        };
        written.map_err(|e| {
            MigrationError::channel(format!("sending {} on the {name} stream", msg.name()), e)
        })
    }

    fn reconnect_inner(&self) -> Result<()> {
        let _g = lock(&self.inner.reconnect_lock);
        let inner = &self.inner;
        let cur = inner.generation.load(Ordering::Acquire);
        let (generation, streams) = match &inner.side {
            Side::Dialer(d) => {
                let g = cur + 1;
                (g, dial_streams(&**d, &inner.config, inner.session, g)?)
            }
            Side::Listener(core) => {
                let session = inner.session;
                let ((_, g), streams) = core.accept_set(
                    &|k: &Key| k.0 == session && k.1 > cur,
                    Some(inner.config.reconnect_timeout),
                )?;
                (g, streams)
            }
        };
        let (lanes, readers) = split(streams);
        {
            let mut st = lock(&inner.state);
            st.generation = generation;
            st.open_lanes = readers.len();
            st.broken = None;
        }
        let old = std::mem::replace(
            &mut *inner.lanes.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(lanes),
        );
        old.shutdown();
        inner.generation.store(generation, Ordering::Release);
        spawn_readers(readers, &inner.queue, &inner.urgent, generation);
        Ok(())
    }
}

enum Lane {
    Control,
    Data(usize),
    Urgent,
}

fn split(streams: Streams) -> (Lanes, Vec<(String, FrameReader)>) {
    let mut all = Vec::new();
    let mut readers = Vec::new();
    let mut take = |s: Stream, name: String| {
        if let Ok(c) = s.writer.try_clone_conn() {
            all.push(c);
        }
        if let Ok(c) = s.reader.conn().try_clone_conn() {
            all.push(c);
        }
        readers.push((name, s.reader));
        Mutex::new(s.writer)
    };
    let control = take(streams.control, "lmig-rx-control".into());
    let data = streams
        .data
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let w = take(s, format!("lmig-rx-data{i}"));
            Mutex::new(BufWriter::with_capacity(
                DATA_BUFFER,
                w.into_inner().unwrap_or_else(|p| p.into_inner()),
            ))
        })
        .collect();
    let urgent = take(streams.urgent, URGENT_READER.into());
    (
        Lanes {
            control,
            data,
            urgent,
            all,
        },
        readers,
    )
}

fn spawn_readers(
    readers: Vec<(String, FrameReader)>,
    queue: &Arc<EventQueue<Event>>,
    direct: &Arc<DirectUrgent>,
    generation: u32,
) {
    for (name, mut reader) in readers {
        // Messages of the urgent stream overtake queued bulk pages; its end
        // or failure queues behind them like any other stream's.
        let urgent_stream = name == URGENT_READER;
        if urgent_stream && direct.wanted.load(Ordering::Acquire) {
            direct.put(&mut lock(&direct.slot), generation, reader);
            continue;
        }
        let thread_queue = queue.clone();
        let direct = direct.clone();
        let spawned = thread::Builder::new().name(name).spawn(move || {
            loop {
                let ev = read_event(&mut reader, generation);
                let last = !matches!(ev, Event::Msg(_));
                if urgent_stream && !last && direct.wanted.load(Ordering::Acquire) {
                    // Queued and handed over under the slot's lock, so the
                    // consumer takes this message before reading the next.
                    let mut slot = lock(&direct.slot);
                    if thread_queue.push(ev, true).is_err() {
                        reader.conn().shutdown_conn();
                        return;
                    }
                    if !reader.has_partial() {
                        direct.put(&mut slot, generation, reader);
                        return;
                    }
                    continue;
                }
                if thread_queue.push(ev, urgent_stream && !last).is_err() || last {
                    reader.conn().shutdown_conn();
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            let _ = queue.push(
                Event::Failed(
                    generation,
                    TransportError::io("spawning a reader thread", e),
                ),
                false,
            );
        }
    }
}

/// The next message of a stream, or its end, as a reader reports it.
fn read_event(reader: &mut FrameReader, generation: u32) -> Event {
    match reader.next("while receiving") {
        Ok(ReadOutcome::Item(WireItem::Message(m))) => Event::Msg(m),
        Ok(ReadOutcome::Item(WireItem::Handshake(h))) => Event::Failed(
            generation,
            TransportError::Handshake {
                detail: format!("{} frame after authentication", h.kind().name()),
            },
        ),
        Ok(ReadOutcome::Eof) => Event::Eof(generation),
        Err(e) => Event::Failed(generation, e),
    }
}

impl Channel for StreamChannel {
    fn send(&self, msg: &Message) -> lmig_core::Result<()> {
        self.write(Lane::Control, msg)
    }

    fn send_pages(&self, lane: usize, batch: &PageBatch) -> lmig_core::Result<()> {
        self.write(Lane::Data(lane), &Message::Pages(batch.clone()))
    }

    fn send_urgent(&self, msg: &Message) -> lmig_core::Result<()> {
        self.write(Lane::Urgent, msg)
    }

    fn data_lanes(&self) -> usize {
        self.inner.lanes.read().map(|l| l.data.len()).unwrap_or(1)
    }

    fn flush(&self) -> lmig_core::Result<()> {
        let lanes = self
            .inner
            .lanes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for d in lanes.data.iter() {
            lock(d)
                .flush()
                .map_err(|e| MigrationError::channel("flushing a data stream", e))?;
        }
        Ok(())
    }

    fn recv(&self, timeout: Option<Duration>) -> lmig_core::Result<Option<Message>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(MigrationError::channel_closed("the channel was shut down"));
            }
            if let Some(b) = &lock(&self.inner.state).broken {
                return Err(MigrationError::channel_closed(b.clone()));
            }
            let Some(ev) = self.inner.queue.pop(deadline) else {
                return Ok(None);
            };
            let mut st = lock(&self.inner.state);
            match ev {
                Event::Msg(m) => return Ok(Some(m)),
                Event::Eof(g) if g == st.generation => {
                    st.open_lanes = st.open_lanes.saturating_sub(1);
                    if st.open_lanes == 0 {
                        let detail = "the peer closed the channel".to_string();
                        st.broken = Some(detail.clone());
                        return Err(MigrationError::channel_closed(detail));
                    }
                }
                Event::Failed(g, e) if g == st.generation => {
                    st.broken = Some(format!("channel broken: {e}"));
                    return Err(e.into());
                }
                // A reader of a generation replaced by `reconnect`.
                Event::Eof(_) | Event::Failed(..) => {}
            }
        }
    }

    fn recv_urgent(&self, timeout: Duration) -> lmig_core::Result<Option<Message>> {
        let deadline = Instant::now() + timeout;
        let direct = &self.inner.urgent;
        direct.wanted.store(true, Ordering::Release);
        loop {
            if self.inner.closed.load(Ordering::Acquire) {
                return Err(MigrationError::channel_closed("the channel was shut down"));
            }
            let mut slot = lock(&direct.slot);
            // What the reader thread queued comes first; its end or failure
            // went to `recv`.
            match self.inner.queue.try_pop_urgent() {
                Some(Event::Msg(m)) => return Ok(Some(m)),
                Some(_) => continue,
                None => {}
            }
            let now = Instant::now();
            let Some((generation, reader)) = slot.as_mut() else {
                drop(slot);
                // The reader thread still reads: its next message wakes us
                // (and hands its reader over).
                match self.inner.queue.pop_urgent(deadline) {
                    Some(Event::Msg(m)) => return Ok(Some(m)),
                    Some(_) => continue,
                    None if Instant::now() >= deadline => return Ok(None),
                    None => continue,
                }
            };
            if now >= deadline {
                return Ok(None);
            }
            match reader.conn().wait_readable(deadline - now) {
                Ok(false) => return Ok(None),
                Ok(true) => {}
                Err(e) => {
                    let ev = Event::Failed(
                        *generation,
                        TransportError::io("waiting on the urgent stream", e),
                    );
                    *slot = None;
                    drop(slot);
                    let _ = self.inner.queue.push(ev, false);
                    continue;
                }
            }
            match read_event(reader, *generation) {
                Event::Msg(m) => return Ok(Some(m)),
                // The stream's end or failure goes to `recv`, like a reader
                // thread's.
                ev => {
                    // Bytes were there: a timeout is a frame that stopped half-way.
                    let ev = match ev {
                        Event::Failed(g, TransportError::Timeout { .. }) => Event::Failed(
                            g,
                            TransportError::Timeout {
                                waiting_for: "the rest of a frame on the urgent stream",
                                after: direct.frame_timeout,
                            },
                        ),
                        ev => ev,
                    };
                    if let Some((_, r)) = slot.take() {
                        r.conn().shutdown_conn();
                    }
                    drop(slot);
                    let _ = self.inner.queue.push(ev, false);
                }
            }
        }
    }

    fn reconnect(&self) -> lmig_core::Result<()> {
        self.reconnect_inner().map_err(Into::into)
    }

    fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Ok(l) = self.inner.lanes.read() {
            l.shutdown();
        }
    }
}

/// The dialer of an in-memory pair: hands one end of a fresh pipe to the
/// listening side per stream.
struct MemDial(Mutex<std::sync::mpsc::Sender<pipe::PipeEnd>>);

impl Dial for MemDial {
    fn dial(&self, _config: &ChannelConfig) -> Result<Box<dyn Conn>> {
        let (a, b) = pipe::pipe();
        lock(&self.0).send(b).map_err(|_| TransportError::Closed {
            during: "while connecting (in-memory listener gone)",
        })?;
        Ok(Box::new(a))
    }
}

struct MemAccept(Mutex<Receiver<pipe::PipeEnd>>);

impl AcceptConn for MemAccept {
    fn accept_conn(
        &self,
        _config: &ChannelConfig,
        deadline: Option<Instant>,
    ) -> std::io::Result<Option<Box<dyn Conn>>> {
        let rx = lock(&self.0);
        let r = match deadline {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match r {
            Ok(p) => Ok(Some(Box::new(p))),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "in-memory dialer gone",
            )),
        }
    }
}

/// An in-memory channel pair `(dialer, listener)`: every message still goes
/// through the frame codec, the handshake and the reader threads. Both
/// support `reconnect` (call it on both, from two threads).
pub fn pair(config: ChannelConfig) -> Result<(StreamChannel, StreamChannel)> {
    config.check()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (core, _acceptor_thread) =
        ListenerCore::start(Box::new(MemAccept(Mutex::new(rx))), config.clone())?;
    let dial = MemDial(Mutex::new(tx));
    let mut session = [0u8; SESSION_ID_LEN];
    auth::fill_random(&mut session)?;
    // The listening side's handshakes run on its own threads.
    let dialed = dial_streams(&dial, &config, session, 0)?;
    let ((session_l, generation), accepted) = core.accept_set(
        &|k| k.0 == session && k.1 == 0,
        Some(config.handshake_timeout),
    )?;
    let a = StreamChannel::start(
        dialed,
        config.clone(),
        session,
        0,
        Side::Dialer(Box::new(dial)),
    );
    let b = StreamChannel::start(
        accepted,
        config,
        session_l,
        generation,
        Side::Listener(core),
    );
    Ok((a, b))
}

pub(crate) fn start_dialed(dialer: Box<dyn Dial>, config: ChannelConfig) -> Result<StreamChannel> {
    config.check()?;
    let mut session = [0u8; SESSION_ID_LEN];
    auth::fill_random(&mut session)?;
    let streams = dial_streams(&*dialer, &config, session, 0)?;
    Ok(StreamChannel::start(
        streams,
        config,
        session,
        0,
        Side::Dialer(dialer),
    ))
}
