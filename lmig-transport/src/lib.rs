//! lmig-transport: the wire format, authentication and channels of lmig.
//!
//! * [`wire`]: frames (fixed 16-byte little-endian header with CRC-32C,
//!   left 0 on streams whose Noise or TLS records authenticate every byte,
//!   capped length) and a codec for every [`lmig_core::protocol::Message`],
//!   zero-copy for page data, strict decoders that return errors on any bad
//!   input and never panic.
//! * [`auth`]: admission of every stream: mutual challenge-response
//!   authentication (HMAC-SHA256, fresh nonces from both sides,
//!   constant-time comparison) binding the stream's identity (session,
//!   role, lane, generation), and the key exchange of the stream's cipher.
//! * [`noise`] and [`tls`]: what protects every byte after the handshake,
//!   chosen by [`Security`]: by default one Noise
//!   `NNpsk0_25519_AESGCM_SHA256` session per stream keyed by the
//!   pre-shared key (`snow`); or TLS 1.3 with certificates verified both
//!   ways (`rustls`, `ring` provider); or, only when asked for by name,
//!   nothing ([`Security::PlaintextTrustedLinkOnly`]).
//! * [`channel`]: [`StreamChannel`], an implementation of
//!   [`lmig_core::Channel`] over TCP, Unix stream sockets or in-memory pipes,
//!   with one control stream, several data streams, an urgent stream for
//!   post-copy, an optional bandwidth limit and reconnection.
//!
//! # Guarantees
//!
//! * No message is accepted on a stream before both ends proved they hold
//!   the key (or, with TLS, certificates the other side trusts); a peer
//!   that fails gets nothing and is disconnected.
//! * In the default mode and with TLS, every byte after the handshake is
//!   encrypted and authenticated: an attacker on the path reads nothing of
//!   pages, socket records or program state, and a byte changed, dropped,
//!   reordered, replayed or injected fails the stream with
//!   [`TransportError::Integrity`] before any of it is delivered. A
//!   recorded stream replayed to a listener is refused at the handshake.
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
//! # Non-goals
//!
//! * Hiding traffic volume and timing: the sizes of records and when they
//!   are sent show how much memory moves and when.
//! * Surviving an attacker who can cut connections: one on the path can
//!   always stop a migration (which then aborts by the session's rules, the
//!   source still running); it cannot make either side accept its bytes.
//! * Protection of the pre-shared key or certificate keys on the hosts.
//!   Whoever holds the key (or a certificate from the trusted CA) can open
//!   a channel.
//!
//! # Stable types
//!
//! Settings (`…Config`, `…Options`) are `#[non_exhaustive]` structs with
//! public fields: build one from `Default::default()` (or from its `new`
//! when some values are required) and chain its `#[must_use]`
//! `with_<field>` setters. Reports, statistics, events and the enums that
//! may grow (errors, phases, modes, outcomes, verdicts) are
//! `#[non_exhaustive]` too: read their fields, match them with a `_` arm.
//! A field or variant added later is then no breaking change. The
//! protocol's messages and records (lmig-core's `model`, `protocol` and
//! `split`, lmig-transport's handshake messages) stay exhaustive: a
//! variant added there is a new protocol version.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use lmig_core::Channel;
//! use lmig_core::protocol::Message;
//! use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, connect};
//!
//! // The default mode: the key admits each stream and keys its encryption.
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
//! assert_eq!(source.cipher(), "Noise_NNpsk0_25519_AESGCM_SHA256");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]

#[macro_use]
mod macros;
// Also first: its macros (`debug!`, `info!`, `warn!`, `error!`,
// `phase_span!`) are in scope in every module below.
#[macro_use]
mod log;

pub mod auth;
pub mod channel;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
#[cfg(feature = "test-util")]
pub mod hostile;
pub mod noise;
pub mod tls;
pub mod wire;

pub use auth::AuthKey;
pub use channel::{
    ChannelConfig, Endpoint, Listener, ListenerStats, Rejection, Security, StreamChannel, connect,
    pair,
};
pub use error::{Result, TransportError};
pub use tls::TlsIdentity;
pub use wire::WireError;
