//! [`StreamChannel`]: one channel's shared state, its sending side,
//! `recv`, `reconnect` and shutdown.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use lmig_core::protocol::{Message, PageBatch};
use lmig_core::{Channel, MigrationError};

use super::dial::dial_streams;
use super::event::Event;
use super::lanes::{Lane, LaneReader, Lanes};
use super::limit::TokenBucket;
use super::listening::ListenerCore;
use super::queue::EventQueue;
use super::urgent::DirectUrgent;
use super::warm::WarmArea;
use super::{ChannelConfig, Dial, Key, Streams, lock};
use crate::auth;
use crate::error::Result;
use crate::wire::{EncodedFrames, SESSION_ID_LEN, encode_message, encode_message_sealed};

/// A channel over `dialer`'s connections: a fresh session, generation 0.
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

/// How a channel re-establishes its streams.
pub(super) enum Side {
    /// It dials again.
    Dialer(Box<dyn Dial>),
    /// It waits on the listener that accepted it.
    Listener(Arc<ListenerCore>),
}

/// What `recv` knows about the current generation.
struct RecvState {
    generation: u32,
    /// Streams whose end was not received yet.
    open_lanes: usize,
    /// Why the channel is broken, once it is.
    broken: Option<String>,
}

/// What the clones of a channel share.
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
    /// Receive memory for large frames, written before the freeze.
    warm: Arc<WarmArea>,
}

impl Inner {
    /// The lanes of the current generation.
    fn current_lanes(&self) -> Arc<Lanes> {
        self.lanes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
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
    /// A channel over the authenticated `streams` of `generation`: they are
    /// handed over to lanes and reader threads at once.
    pub(super) fn start(
        streams: Streams,
        config: ChannelConfig,
        session: [u8; SESSION_ID_LEN],
        generation: u32,
        side: Side,
    ) -> Self {
        let queue = Arc::new(EventQueue::new(config.queue_depth));
        let limiter = config.bandwidth_limit.map(TokenBucket::new);
        let cipher = streams.control.cipher.clone();
        let (lanes, readers) = Lanes::split(streams, generation);
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
            warm: Arc::default(),
            config,
        });
        start_readers(readers, &inner);
        Self { inner }
    }

    /// The channel's session id (the same on both sides, random per channel).
    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        self.inner.session
    }

    /// What protects the bytes of its streams: the Noise protocol name
    /// (`Noise_NNpsk0_25519_AESGCM_SHA256`), `TLS 1.3` and the suite
    /// negotiated, or `none` ([`Security::PlaintextTrustedLinkOnly`](super::Security::PlaintextTrustedLinkOnly)).
    pub fn cipher(&self) -> &str {
        &self.inner.cipher
    }

    /// Bytes of the receive memory [`Channel::warm_receive`] got ready that
    /// no frame has used yet.
    pub fn warm_left(&self) -> usize {
        self.inner.warm.left()
    }

    /// How many times the channel was re-established (0 at first).
    pub fn generation(&self) -> u32 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Encode `msg` for the channel's streams.
    fn encode(&self, msg: &Message) -> lmig_core::Result<EncodedFrames> {
        let encode = if self.inner.config.security.seals() {
            encode_message_sealed
        } else {
            encode_message
        };
        encode(msg).map_err(|e| MigrationError::channel(format!("cannot encode {}", msg.name()), e))
    }

    fn write(&self, lane: Lane, msg: &Message) -> lmig_core::Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(MigrationError::channel_closed("the channel was shut down"));
        }
        let frames = self.encode(msg)?;
        if let Some(l) = &self.inner.limiter {
            l.acquire(frames.len());
        }
        let lanes = self.inner.current_lanes();
        if lane == Lane::Urgent {
            self.inner.urgent.note_sent();
        }
        lanes.write(lane, &frames).map_err(|e| {
            let name = lane.name();
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
        let (lanes, readers) = Lanes::split(streams, generation);
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
        start_readers(readers, inner);
        info!(
            generation = generation,
            "channel re-established (every stream re-authenticated)"
        );
        Ok(())
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

    /// The freeze's socket batches: encoded and sealed on the caller's
    /// thread, read and opened by the lane's own reader.
    fn send_lane(&self, lane: usize, msg: &Message) -> lmig_core::Result<()> {
        self.write(Lane::Data(lane), msg)
    }

    fn send_urgent_many(&self, msgs: &[Message]) -> lmig_core::Result<()> {
        if let [one] = msgs {
            return self.write(Lane::Urgent, one);
        }
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(MigrationError::channel_closed("the channel was shut down"));
        }
        let frames = msgs
            .iter()
            .map(|m| self.encode(m))
            .collect::<lmig_core::Result<Vec<_>>>()?;
        if let Some(l) = &self.inner.limiter {
            l.acquire(frames.iter().map(EncodedFrames::len).sum());
        }
        let lanes = self.inner.current_lanes();
        self.inner.urgent.note_sent();
        lanes.write_urgent_many(&frames).map_err(|e| {
            MigrationError::channel(format!("sending {} urgent messages", msgs.len()), e)
        })
    }

    fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
        self.inner.current_lanes().ip_addresses()
    }

    fn data_lanes(&self) -> usize {
        self.inner.lanes.read().map(|l| l.data_lanes()).unwrap_or(1)
    }

    fn warm_receive(&self, bytes: u64) {
        self.inner.warm.reserve(bytes);
    }

    fn flush(&self) -> lmig_core::Result<()> {
        let lanes = self.inner.current_lanes();
        lanes
            .flush_data()
            .map_err(|e| MigrationError::channel("flushing a data stream", e))?;
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
        self.inner
            .urgent
            .recv(&self.inner.queue, &self.inner.closed, timeout)
    }

    fn reconnect(&self) -> lmig_core::Result<()> {
        self.reconnect_inner().map_err(Into::into)
    }

    fn urgent_fd(&self) -> lmig_core::Result<Option<std::os::fd::RawFd>> {
        Ok(self.inner.urgent.fd())
    }

    fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Ok(l) = self.inner.lanes.read() {
            l.shutdown();
        }
    }
}

/// Start the readers of a new generation.
fn start_readers(readers: Vec<LaneReader>, inner: &Inner) {
    for mut r in readers {
        r.set_warm(inner.warm.clone());
        r.start(&inner.queue, &inner.urgent);
    }
}
