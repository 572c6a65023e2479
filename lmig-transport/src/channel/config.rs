//! How a channel is set up: [`ChannelConfig`], its defaults and its check.

use std::time::Duration;

use super::Security;
use super::reject::{RejectHook, Rejection};
use crate::auth::AuthKey;
use crate::error::{Result, TransportError};
use crate::tls::TlsIdentity;

/// The default [`ChannelConfig::urgent_spin`]: off. On this 2-vCPU machine a
/// 100 µs spin cut `lmig-bench postcopy`'s fault p50 by 3-6 µs but raised
/// its p99 from 250-600 to 650-1350 µs (the spinning threads took the CPU
/// the push and the placement needed), and 30 µs did the same; see
/// docs/benchmarks.md. A host with CPUs to spare can turn it on.
const DEFAULT_URGENT_SPIN: Duration = Duration::ZERO;

/// How a channel is set up. Both sides need the same [`Security`] mode
/// and key (or certificates from a CA the other trusts). Built by
/// [`ChannelConfig::new`] (or [`tls`](ChannelConfig::tls), ...) and the
/// `with_*` setters (the struct is `#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
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
    /// How long [`Channel::recv_urgent`](lmig_core::Channel::recv_urgent)
    /// busy-polls the urgent stream after this side last sent on it
    /// (a post-copy request whose reply is due, or a reply after which the
    /// next request often follows within a round trip) before it sleeps in
    /// `poll`. The reply then finds its thread running instead of waking it
    /// (on a virtual machine, an idle vCPU woken by an interrupt). The poll
    /// yields the CPU to any other runnable thread between looks, and stops
    /// at this bound once nothing arrived, so an idle urgent stream costs no
    /// CPU. `Duration::ZERO` (the default) turns it off: each spinning
    /// thread takes a CPU the program, the push and the placement may need.
    pub urgent_spin: Duration,
    /// Called with every connection a listener refuses.
    pub(super) on_reject: RejectHook,
}

impl ChannelConfig {
    /// Streams admitted by the pre-shared `key` and encrypted with Noise
    /// keyed by it ([`Security::Psk`], the default mode).
    ///
    /// Defaults: one data stream, no bandwidth limit, 10 s handshake and
    /// connect timeouts, 60 s write timeout, kernel socket buffers, a queue
    /// of 64 messages, 30 s to reconnect, 64 handshakes in flight per
    /// listener, a 100 µs busy-poll of the urgent stream after a send, no
    /// rejection hook.
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
            urgent_spin: DEFAULT_URGENT_SPIN,
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
    #[must_use]
    pub fn with_data_streams(mut self, n: usize) -> Self {
        self.data_streams = n;
        self
    }

    /// Limit the sending rate to `bytes_per_sec` (`None`: unlimited).
    #[must_use]
    pub fn with_bandwidth_limit(mut self, bytes_per_sec: impl Into<Option<u64>>) -> Self {
        self.bandwidth_limit = bytes_per_sec.into();
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    #[must_use]
    pub fn with_handshake_timeout(mut self, handshake_timeout: Duration) -> Self {
        self.handshake_timeout = handshake_timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    #[must_use]
    pub fn with_connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// Sets [`write_timeout`](Self::write_timeout) (a value or `None`).
    #[must_use]
    pub fn with_write_timeout(mut self, write_timeout: impl Into<Option<Duration>>) -> Self {
        self.write_timeout = write_timeout.into();
        self
    }

    /// Sets [`socket_buffer`](Self::socket_buffer) (a value or `None`).
    #[must_use]
    pub fn with_socket_buffer(mut self, socket_buffer: impl Into<Option<usize>>) -> Self {
        self.socket_buffer = socket_buffer.into();
        self
    }

    /// Sets [`queue_depth`](Self::queue_depth).
    #[must_use]
    pub fn with_queue_depth(mut self, queue_depth: usize) -> Self {
        self.queue_depth = queue_depth;
        self
    }

    /// Sets [`reconnect_timeout`](Self::reconnect_timeout).
    #[must_use]
    pub fn with_reconnect_timeout(mut self, reconnect_timeout: Duration) -> Self {
        self.reconnect_timeout = reconnect_timeout;
        self
    }

    /// Sets [`max_handshakes`](Self::max_handshakes).
    #[must_use]
    pub fn with_max_handshakes(mut self, max_handshakes: usize) -> Self {
        self.max_handshakes = max_handshakes;
        self
    }

    /// Sets [`urgent_spin`](Self::urgent_spin).
    #[must_use]
    pub fn with_urgent_spin(mut self, urgent_spin: Duration) -> Self {
        self.urgent_spin = urgent_spin;
        self
    }

    pub(super) fn check(&self) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setters_set_their_field() {
        let c = ChannelConfig::new(AuthKey::new([7; 32]).unwrap())
            .with_data_streams(3)
            .with_bandwidth_limit(4)
            .with_handshake_timeout(Duration::from_millis(5))
            .with_connect_timeout(Duration::from_millis(6))
            .with_write_timeout(None)
            .with_socket_buffer(7)
            .with_queue_depth(8)
            .with_reconnect_timeout(Duration::from_millis(9))
            .with_max_handshakes(10);
        assert_eq!(c.data_streams, 3);
        assert_eq!(c.bandwidth_limit, Some(4));
        assert_eq!(c.handshake_timeout, Duration::from_millis(5));
        assert_eq!(c.connect_timeout, Duration::from_millis(6));
        assert_eq!(c.write_timeout, None);
        assert_eq!(c.socket_buffer, Some(7));
        assert_eq!(c.queue_depth, 8);
        assert_eq!(c.reconnect_timeout, Duration::from_millis(9));
        assert_eq!(c.max_handshakes, 10);
        c.check().unwrap();
        let c = c
            .with_bandwidth_limit(None)
            .with_write_timeout(Duration::from_secs(1));
        assert_eq!(c.bandwidth_limit, None);
        assert_eq!(c.write_timeout, Some(Duration::from_secs(1)));
    }
}
