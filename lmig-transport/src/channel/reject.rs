//! What the listening side tells its embedder about strangers: each refused
//! connection ([`Rejection`], through the hook [`ChannelConfig::on_reject`]
//! installs) and the counters ([`ListenerStats`]).
//!
//! [`ChannelConfig::on_reject`]: super::ChannelConfig::on_reject

use std::fmt;
use std::sync::Arc;

use crate::error::TransportError;

/// A connection the listener refused, as reported to the
/// [`ChannelConfig::on_reject`](super::ChannelConfig::on_reject) hook.
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

/// The function [`ChannelConfig::on_reject`](super::ChannelConfig::on_reject) installs.
type HookFn = dyn Fn(&Rejection) + Send + Sync + 'static;

/// An optional rejection hook, shared by the clones of a config.
#[derive(Clone, Default)]
pub(crate) struct RejectHook(Option<Arc<HookFn>>);

impl RejectHook {
    pub(crate) fn new(f: impl Fn(&Rejection) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    pub(super) fn call(&self, r: &Rejection) {
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
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
    /// Refused to make room under [`ChannelConfig::max_handshakes`](super::ChannelConfig::max_handshakes).
    pub evicted: u64,
    /// Handshakes running now.
    pub in_flight: usize,
}
