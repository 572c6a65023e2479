//! [`Listener`]: the public face of the listening side (the machinery is
//! in `accept.rs`).

use std::sync::Arc;
use std::time::Duration;

use super::listening::ListenerCore;
use super::stream::{Side, StreamChannel};
use super::{ChannelConfig, Endpoint, ListenerStats, net};
use crate::error::Result;

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

    /// [`Listener::accept`], giving up with [`TransportError::Timeout`](crate::TransportError::Timeout) after `timeout`.
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
