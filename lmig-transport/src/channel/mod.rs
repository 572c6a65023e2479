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
//! bounded queue shared by the channel; [`Channel::recv`](lmig_core::Channel::recv) reads that queue.
//! When the queue is full the readers stop reading and TCP flow control
//! slows the sender down. The urgent stream is the exception once a
//! consumer calls [`Channel::recv_urgent`](lmig_core::Channel::recv_urgent):
//! from its next message on that consumer reads the stream itself (see
//! `urgent.rs`), so a post-copy request or reply wakes the thread that acts
//! on it and no other. How streams become lanes and readers is in `lanes.rs`.
//!
//! Either side may listen: [`Listener::bind`] + [`Listener::accept`] on one,
//! [`connect`] on the other. A listener accepts and authenticates
//! connections in the background (see `accept.rs`): strangers are refused,
//! reported and counted without disturbing anyone waiting for a channel.
//! [`pair`] builds an in-memory channel pair that still encodes,
//! authenticates and decodes every frame.
//!
//! # Failures
//!
//! A peer that vanishes or closes shows up as a
//! [`MigrationError::Channel`](lmig_core::MigrationError::Channel) from `recv` and `send`, never as a hang:
//! a closed connection is seen at once, TCP keepalive (10 s idle, then 3
//! probes 5 s apart) catches a peer host that went silent, and writes time
//! out after [`ChannelConfig::write_timeout`]. The peer closing every stream
//! cleanly (after its last message) is reported only once every message it
//! sent before closing was received.
//!
//! # Recovery
//!
//! [`Channel::reconnect`](lmig_core::Channel::reconnect) re-establishes every stream for the same session
//! id with the next generation number, re-running the authentication: the
//! dialing side dials again, the listening side waits (up to
//! [`ChannelConfig::reconnect_timeout`]) on the listener that accepted the
//! channel. Call it on both sides; messages that were in flight on the
//! broken connections are lost (the session resends what is missing).

//!
//! # Files
//!
//! ```text
//! config.rs    ChannelConfig
//! dial.rs      the connect side: dial and authenticate a generation's streams
//! listener.rs  Listener (public face of the listening side)
//! accept.rs    the listening side's shared state: pending sets, accept_set
//! acceptor.rs  AcceptorThread: accepts connections, admits them, cuts overdue ones
//! handshake.rs HandshakeWorker: one thread per accepted connection
//! eviction.rs  the in-flight table and who makes room under max_handshakes
//! reject.rs    Rejection, the rejection hook, ListenerStats
//! stream.rs    StreamChannel: send, recv, reconnect, shutdown
//! lanes.rs     the stream hand-over: lanes (writers) and LaneReader threads
//! urgent.rs    the urgent stream read by its consumer (recv_urgent)
//! memory.rs    pair(): the in-memory channel pair
//! conn.rs, net.rs, pipe.rs, secure.rs, queue.rs, limit.rs: connections,
//!              sockets, pipes, stream protection, the event queue, the rate limit
//! ```

mod accept;
mod acceptor;
mod config;
mod conn;
mod dial;
mod event;
mod eviction;
mod handshake;
mod lanes;
mod limit;
mod listener;
mod listening;
mod memory;
mod net;
mod pipe;
mod queue;
mod reject;
mod secure;
mod stream;
mod urgent;
mod warm;

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::error::Result;
use crate::wire::SESSION_ID_LEN;
pub use config::ChannelConfig;
use conn::{Conn, FrameReader};
pub use listener::Listener;
pub use memory::pair;
pub use net::{Endpoint, connect};
pub use reject::{ListenerStats, Rejection};
pub use secure::Security;
pub use stream::StreamChannel;

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

/// A mutex's guard, also after a thread panicked holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A channel as the listener groups its streams: (session id, generation).
type Key = ([u8; SESSION_ID_LEN], u32);
