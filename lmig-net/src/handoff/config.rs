//! What the two sides of the handoff are told ([`HandoffConfig`], the
//! [`ServiceAddr`]s that move) and what they report ([`HandoffStats`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::error::{NetError, Result};
use crate::lock::LockConfig;

/// One service address with its prefix length as configured on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAddr {
    /// The address clients connect to.
    pub addr: IpAddr,
    /// Its prefix length on the interface (e.g. 24, 64, or 32/128 for a host address).
    pub prefix_len: u8,
}

impl ServiceAddr {
    /// `addr/prefix_len`.
    pub fn new(addr: impl Into<IpAddr>, prefix_len: u8) -> Self {
        Self {
            addr: addr.into(),
            prefix_len,
        }
    }
}

/// Settings of one side of the handoff: [`HandoffConfig::new`] and the
/// `with_*` setters (the struct is `#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HandoffConfig {
    /// The service addresses that move (IPv4 and/or IPv6).
    pub addrs: Vec<ServiceAddr>,
    /// The interface carrying them on this host (e.g. `"eth0"`); looked up in
    /// the network namespace of the calling thread.
    pub interface: String,
    /// Source only: after the handoff, keep forwarding packets that still
    /// arrive here until none came for this long (default 250 ms) ...
    pub quiet: Duration,
    /// ... or at most this long (default 3 s).
    pub linger: Duration,
    /// Packets the lock may hold (default 65,536).
    pub queue_maxlen: u32,
    /// Receive buffer for held packet copies (default 64 MiB).
    pub rcvbuf: usize,
    /// Source only: the destination host's own address on this link (for
    /// example its migration address). When set, held packets go straight to
    /// its link-layer address, learnt before the freeze from the neighbour
    /// table. Without it (or when that host is not a known neighbour on
    /// `interface`) they are routed to the service address, which costs an
    /// ARP or neighbour exchange the destination only answers once it holds
    /// the address, and the kernel queues few packets meanwhile (the rest
    /// are dropped and the clients retransmit).
    pub forward_to: Option<IpAddr>,
    /// Source only, with direct forwarding ([`HandoffConfig::forward_to`]
    /// resolved): send copies of held packets on to the destination already
    /// during the freeze, as they arrive (default false). The destination's
    /// lock holds them until its sockets are live; the originals stay held
    /// here until the end, so an abort still delivers them here (and the
    /// destination drops its copies with its lock), and after `Commit` only
    /// the last few are left to send. Without it every held packet is sent
    /// after `Commit`, while the clients wait (a send per packet).
    ///
    /// Off by default: it moves that work into the freeze, which is worth
    /// it only where the freeze is not short of CPU. The default is tuned
    /// for source and destination sharing one 2-core host, where the freeze
    /// grows by more than the time saved after `Commit` (`lmig-bench
    /// migrate` measures both).
    pub forward_early: bool,
    /// The longest a release of held packets waits for the program to make
    /// room in its UDP sockets' receive buffers (default 5 s): held packets
    /// are let through in order, each batch only as far as their sockets
    /// have room (after an abort on the source, after `Commit` on the
    /// destination); past this, the rest goes at once and what does not
    /// fit is dropped (and counted in [`HandoffStats::dropped`]).
    pub release_limit: Duration,
}

impl HandoffConfig {
    /// These addresses on `interface`, default timings and capacities.
    pub fn new(addrs: impl IntoIterator<Item = ServiceAddr>, interface: impl Into<String>) -> Self {
        Self {
            addrs: addrs.into_iter().collect(),
            interface: interface.into(),
            quiet: Duration::from_millis(250),
            linger: Duration::from_secs(3),
            queue_maxlen: 65_536,
            rcvbuf: 64 << 20,
            forward_to: None,
            forward_early: false,
            release_limit: Duration::from_secs(5),
        }
    }

    /// Forward held packets straight to this destination host (see
    /// [`HandoffConfig::forward_to`]); the same as
    /// [`with_forward_to`](Self::with_forward_to)`(host)`.
    #[must_use]
    pub fn forward_to(mut self, host: IpAddr) -> Self {
        self.forward_to = Some(host);
        self
    }

    /// Sets [`quiet`](Self::quiet).
    #[must_use]
    pub fn with_quiet(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    /// Sets [`linger`](Self::linger).
    #[must_use]
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets [`queue_maxlen`](Self::queue_maxlen).
    #[must_use]
    pub fn with_queue_maxlen(mut self, queue_maxlen: u32) -> Self {
        self.queue_maxlen = queue_maxlen;
        self
    }

    /// Sets [`rcvbuf`](Self::rcvbuf).
    #[must_use]
    pub fn with_rcvbuf(mut self, rcvbuf: usize) -> Self {
        self.rcvbuf = rcvbuf;
        self
    }

    /// Sets [`forward_to`](Self::forward_to) (a value or `None`).
    #[must_use]
    pub fn with_forward_to(mut self, forward_to: impl Into<Option<IpAddr>>) -> Self {
        self.forward_to = forward_to.into();
        self
    }

    /// Sets [`forward_early`](Self::forward_early).
    #[must_use]
    pub fn with_forward_early(mut self, forward_early: bool) -> Self {
        self.forward_early = forward_early;
        self
    }

    /// Sets [`release_limit`](Self::release_limit).
    #[must_use]
    pub fn with_release_limit(mut self, release_limit: Duration) -> Self {
        self.release_limit = release_limit;
        self
    }

    /// Refuse a migration channel between `local` and `peer` when either
    /// end is one of the service addresses that move
    /// ([`NetError::ChannelOnServiceAddress`]): the lock holds every packet
    /// sent to them at the freeze, the channel's own included, and the
    /// freeze would last until a timeout. Call it with the channel's
    /// addresses before the migration starts (both sides may). IPv4-mapped
    /// IPv6 addresses count as their IPv4 address.
    pub fn check_channel(&self, local: SocketAddr, peer: SocketAddr) -> Result<()> {
        for (end, addr) in [("local", local), ("peer", peer)] {
            let ip = canonical(addr.ip());
            if let Some(s) = self.addrs.iter().find(|s| canonical(s.addr) == ip) {
                return Err(NetError::ChannelOnServiceAddress {
                    end,
                    addr,
                    service: s.addr,
                });
            }
        }
        Ok(())
    }

    pub(super) fn lock_config(&self, copy_payload: bool) -> LockConfig {
        LockConfig {
            addrs: self.addrs.iter().map(|a| a.addr).collect(),
            queue_maxlen: self.queue_maxlen,
            rcvbuf: self.rcvbuf,
            copy_payload,
        }
    }
}

/// `a` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as IPv4.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// What one side of a handoff did, for reports and benchmarks.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct HandoffStats {
    /// Time to engage the lock (source: at the freeze).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "lock_ms", with = "lmig_core::serde_ms")
    )]
    pub lock: Duration,
    /// Time to unlock (destination: the set flush, once the held packets
    /// are through; source: the whole unlock after an abort, its paced
    /// release included, or the final cleanup after a handoff).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "unlock_ms", with = "lmig_core::serde_ms")
    )]
    pub unlock: Duration,
    /// Destination (and source after an abort): time until every held
    /// packet was let through, in order, as the sockets had room (the
    /// kernel delivers them inside the batch verdicts, so it grows with the
    /// number of held packets, not of connections, and with the time the
    /// program takes to read a full UDP socket).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "release_ms", with = "lmig_core::serde_ms")
    )]
    pub release: Duration,
    /// Time to remove (source) or add and announce (destination) the addresses.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "address_move_ms", with = "lmig_core::serde_ms")
    )]
    pub address_move: Duration,
    /// Packets held by the lock (source: re-injected towards the destination).
    pub held: u64,
    /// Packets lost (queue or buffer overrun, failed re-injection).
    pub dropped: u64,
    /// Source: held packets go straight to the destination host's
    /// link-layer address ([`HandoffConfig::forward_to`] resolved).
    pub forwarded_direct: bool,
    /// Source: time to take the held packets and send them on at the
    /// handoff (the stragglers after it are not counted).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "forward_ms", with = "lmig_core::serde_ms")
    )]
    pub forward: Duration,
    /// Source: held packets sent on during the freeze already
    /// ([`HandoffConfig::forward_early`]).
    pub forwarded_early: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setters_set_their_field() {
        let host: IpAddr = "198.51.100.2".parse().unwrap();
        let c = HandoffConfig::new([ServiceAddr::new([198, 51, 100, 10], 24)], "eth0")
            .with_quiet(Duration::from_millis(1))
            .with_linger(Duration::from_millis(2))
            .with_queue_maxlen(3)
            .with_rcvbuf(4)
            .with_forward_to(host)
            .with_forward_early(true)
            .with_release_limit(Duration::from_millis(5));
        assert_eq!(c.quiet, Duration::from_millis(1));
        assert_eq!(c.linger, Duration::from_millis(2));
        assert_eq!(c.queue_maxlen, 3);
        assert_eq!(c.rcvbuf, 4);
        assert_eq!(c.forward_to, Some(host));
        assert!(c.forward_early);
        assert_eq!(c.release_limit, Duration::from_millis(5));
        let lock = c.lock_config(false);
        assert_eq!(
            (lock.queue_maxlen, lock.rcvbuf, lock.copy_payload),
            (3, 4, false)
        );
        assert_eq!(c.with_forward_to(None).forward_to, None);
    }

    #[test]
    fn a_channel_over_a_moved_service_address_is_refused() {
        let cfg = HandoffConfig::new(
            [
                ServiceAddr::new([198, 51, 100, 10], 24),
                ServiceAddr::new("2001:db8::10".parse::<IpAddr>().unwrap(), 64),
            ],
            "eth0",
        );
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Host addresses on the same link: fine.
        cfg.check_channel(sa("198.51.100.1:40000"), sa("198.51.100.2:7000"))
            .unwrap();
        cfg.check_channel(sa("[2001:db8::1]:40000"), sa("[2001:db8::2]:7000"))
            .unwrap();
        let refused = [
            (sa("198.51.100.10:40000"), sa("198.51.100.2:7000"), "local"),
            (sa("198.51.100.1:40000"), sa("198.51.100.10:7000"), "peer"),
            (sa("[2001:db8::1]:4"), sa("[2001:db8::10]:7000"), "peer"),
            // The same IPv4 address seen through a dual-stack socket.
            (
                sa("[::ffff:198.51.100.10]:4"),
                sa("[2001:db8::2]:7"),
                "local",
            ),
        ];
        for (local, peer, which) in refused {
            match cfg.check_channel(local, peer) {
                Err(NetError::ChannelOnServiceAddress { end, addr, .. }) => {
                    assert_eq!(end, which, "{local} -> {peer}");
                    assert_eq!(addr, if which == "local" { local } else { peer });
                }
                other => panic!("{local} -> {peer}: {other:?}"),
            }
        }
        let msg = cfg
            .check_channel(sa("198.51.100.1:1"), sa("198.51.100.10:2"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("198.51.100.10:2") && msg.contains("service address"),
            "{msg}"
        );
    }
}
