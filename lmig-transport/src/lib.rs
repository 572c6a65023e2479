//! lmig-transport: the wire format, authentication and channels of lmig.
//!
//! * [`wire`]: frames (fixed 16-byte little-endian header with CRC-32C,
//!   capped length) and a codec for every [`lmig_core::protocol::Message`],
//!   zero-copy for page data, strict decoders that return errors on any bad
//!   input and never panic.
//! * [`auth`]: mutual challenge-response authentication of every stream
//!   with a pre-shared key (HMAC-SHA256, fresh nonces from both sides,
//!   constant-time comparison).
//! * [`channel`]: [`StreamChannel`], an implementation of
//!   [`lmig_core::Channel`] over TCP, Unix stream sockets or in-memory pipes,
//!   with one control stream, several data streams, an urgent stream for
//!   post-copy, an optional bandwidth limit and reconnection.
//!
//! # Guarantees
//!
//! * No message is accepted on a stream before both ends proved they hold
//!   the key; a peer that fails gets nothing and is disconnected.
//! * A peer cannot make a receiver allocate more than
//!   [`wire::MAX_FRAME_PAYLOAD`] (64 MiB) per frame, nor hold more than
//!   [`wire::MAX_MESSAGE_BYTES`] for a message it sends in fragments.
//! * Pages of one lane arrive in the order they were sent.
//! * A listener survives any stranger: connections are accepted and
//!   authenticated in the background, several at once, each within a total
//!   deadline; at most [`ChannelConfig::max_handshakes`] unauthenticated
//!   connections are held (the one with the least progress makes room) and
//!   none of them gets a receive buffer beyond its small handshake frame. A
//!   refused connection costs only itself: it is reported to
//!   [`ChannelConfig::on_reject`] as a [`Rejection`], counted in
//!   [`Listener::stats`], and [`Listener::accept`] keeps waiting.
//!
//! # Non-goals (for now)
//!
//! Confidentiality and per-frame integrity against an active attacker on
//! the path: frames are not encrypted (see [`auth`] for the hook a later
//! encryption layer uses). Run lmig on a trusted network or in a tunnel.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use lmig_core::Channel;
//! use lmig_core::protocol::Message;
//! use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, connect};
//!
//! let key = AuthKey::new(b"a shared secret of 32 bytes.....")?;
//! let config = ChannelConfig::new(key).with_data_streams(2);
//! let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse()?), config.clone())?;
//! let endpoint = listener.local_endpoint().clone();
//! let dialer = std::thread::spawn(move || connect(&endpoint, config));
//! let destination = listener.accept_timeout(Duration::from_secs(10))?;
//! let source = dialer.join().unwrap()?;
//!
//! source.send(&Message::Ready)?;
//! assert_eq!(destination.recv(Some(Duration::from_secs(10)))?, Some(Message::Ready));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]

pub mod auth;
pub mod channel;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod wire;

pub use auth::AuthKey;
pub use channel::{
    ChannelConfig, Endpoint, Listener, ListenerStats, Rejection, StreamChannel, connect, pair,
};
pub use error::{Result, TransportError};
pub use wire::WireError;
