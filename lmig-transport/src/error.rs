//! The error type of lmig-transport.

use std::time::Duration;

use lmig_core::MigrationError;

use crate::wire::{RejectReason, WireError};

/// Everything that can go wrong in a channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer's bytes do not decode.
    #[error("corrupt stream from the peer: {0}")]
    Wire(#[from] WireError),

    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The peer could not prove it holds the pre-shared key (wrong key or a
    /// replayed handshake). The connection was closed; the peer got nothing.
    #[error("authentication failed: {detail}")]
    AuthFailed {
        /// What did not verify.
        detail: &'static str,
    },

    /// The peer refused our handshake and closed the connection.
    #[error("the peer refused the connection: {reason}")]
    Rejected {
        /// The peer's (coarse) reason.
        reason: RejectReason,
    },

    /// The listener dropped this connection during its handshake to make
    /// room: `cap` unauthenticated connections were in flight and this one
    /// had made the least progress (no valid `Hello`, then the oldest).
    #[error(
        "dropped during the handshake: {cap} unauthenticated connections in flight and this one had made the least progress"
    )]
    Evicted {
        /// [`crate::ChannelConfig::max_handshakes`].
        cap: usize,
    },

    /// A record of an encrypted stream failed its integrity check: bytes
    /// were changed, dropped, reordered, replayed or injected on the path
    /// (or the stream ended inside a record). Nothing of that record was
    /// delivered; the stream is failed.
    #[error("integrity check failed on an encrypted stream: {detail}")]
    Integrity {
        /// What did not verify.
        detail: String,
    },

    /// The TLS handshake failed (an untrusted or invalid certificate, a
    /// name that does not match, a peer that does not speak TLS 1.3 or
    /// does not present a client certificate, …).
    #[error("TLS handshake failed: {detail}")]
    Tls {
        /// rustls' reason, or the peer's alert.
        detail: String,
    },

    /// A protocol message arrived before the stream was authenticated.
    #[error("the peer sent {got} before authenticating; connection closed")]
    Unauthenticated {
        /// What arrived.
        got: &'static str,
    },

    /// The handshake went wrong in another way (unexpected step, stream
    /// that does not fit the channel).
    #[error("handshake failed: {detail}")]
    Handshake {
        /// What happened.
        detail: String,
    },

    /// The peer closed the connection.
    #[error("connection closed by the peer {during}")]
    Closed {
        /// When.
        during: &'static str,
    },

    /// Nothing arrived in time.
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// What we were waiting for.
        waiting_for: &'static str,
        /// How long we waited.
        after: Duration,
    },

    /// The configuration is unusable.
    #[error("invalid channel configuration: {0}")]
    Config(String),

    /// This channel cannot do that.
    #[error("{0} is not supported by this channel")]
    Unsupported(&'static str),
}

impl TransportError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<TransportError> for MigrationError {
    fn from(e: TransportError) -> Self {
        MigrationError::channel(e.to_string(), e)
    }
}

/// Result alias of lmig-transport.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
