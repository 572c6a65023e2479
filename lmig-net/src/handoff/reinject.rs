//! Re-injection of held packets: the source sends the packets its lock
//! held on to the destination, unchanged, after `Commit` (and, with
//! [`super::HandoffConfig::forward_early`], copies during the freeze).

use std::io;
use std::net::{Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::{NetError, Result};
use crate::lock::HeldPacket;
use crate::sys::packet;

/// Sends held IP packets again, unchanged: straight to the destination
/// host's link-layer address when it is known ([`Reinjector::direct`]),
/// otherwise through this host's routing (raw sockets with the header
/// included).
#[derive(Debug)]
pub struct Reinjector {
    v4: Socket,
    v6: Socket,
    direct: Option<Direct>,
}

/// The link-layer path of a [`Reinjector`].
#[derive(Debug)]
struct Direct {
    fd: std::os::fd::OwnedFd,
    ifindex: u32,
    mac: [u8; 6],
}

impl Reinjector {
    /// Open the raw sockets (before the freeze).
    pub fn new() -> Result<Self> {
        let open = |d: Domain| {
            Socket::new(d, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).map_err(|e| match e
                .raw_os_error()
            {
                Some(libc::EPERM) => NetError::Unsupported {
                    feature: "re-injecting held packets",
                    needs: "CAP_NET_RAW in the host's network namespace",
                },
                _ => NetError::sys("socket(SOCK_RAW, IPPROTO_RAW)", "re-injection", e),
            })
        };
        Ok(Self {
            v4: open(Domain::IPV4)?,
            v6: open(Domain::IPV6)?,
            direct: None,
        })
    }

    /// Send every packet out of interface `ifindex` to link-layer address
    /// `mac` (the destination host), without routing or address resolution.
    pub fn direct(mut self, ifindex: u32, mac: [u8; 6]) -> Result<Self> {
        let fd = packet::packet_dgram_socket(0)
            .map_err(|e| NetError::sys("socket(AF_PACKET)", format!("interface {ifindex}"), e))?;
        self.direct = Some(Direct { fd, ifindex, mac });
        Ok(self)
    }

    /// Packets go straight to a link-layer address ([`Reinjector::direct`]).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Send one IP packet (IPv4 or IPv6, from its header on) to its destination.
    pub fn send(&self, pkt: &[u8]) -> io::Result<()> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an IP packet");
        if let Some(d) = &self.direct {
            let proto = match pkt.first().map(|b| b >> 4) {
                Some(4) if pkt.len() >= 20 => packet::ETH_P_IP,
                Some(6) if pkt.len() >= 40 => packet::ETH_P_IPV6,
                _ => return Err(bad()),
            };
            return packet::send_to(
                std::os::fd::AsFd::as_fd(&d.fd),
                d.ifindex,
                proto,
                d.mac,
                pkt,
            );
        }
        match pkt.first().map(|b| b >> 4) {
            Some(4) if pkt.len() >= 20 => {
                let d = std::net::Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
                self.v4
                    .send_to(pkt, &SockAddr::from(SocketAddr::new(d.into(), 0)))?;
                Ok(())
            }
            Some(6) if pkt.len() >= 40 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&pkt[24..40]);
                self.v6.send_to(
                    pkt,
                    &SockAddr::from(SocketAddr::new(Ipv6Addr::from(o).into(), 0)),
                )?;
                Ok(())
            }
            _ => Err(bad()),
        }
    }

    /// Send every packet; returns how many could not be sent.
    pub fn send_all(&self, pkts: &[HeldPacket]) -> u64 {
        pkts.iter().filter(|p| self.send(&p.data).is_err()).count() as u64
    }
}
