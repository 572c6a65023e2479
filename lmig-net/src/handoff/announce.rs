//! Announcements of a service address that just arrived on this host: a
//! gratuitous ARP request (`sip = tip = service`) on an `AF_PACKET` socket,
//! and an unsolicited neighbour advertisement with the override flag to
//! ff02::1 (hop limit 255) from the service address on a raw ICMPv6 socket.
//! Every socket is opened before the freeze.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddrV6};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::addr::link_address;
use super::config::ServiceAddr;
use crate::error::{NetError, Result};
use crate::sys::packet;

/// Sends gratuitous ARPs and unsolicited neighbour advertisements for the
/// service addresses out of one interface. Sockets and the interface's
/// address are set up by [`Announcer::new`], before the freeze.
#[derive(Debug)]
pub struct Announcer {
    ifindex: u32,
    mac: [u8; 6],
    arp: std::os::fd::OwnedFd,
    icmp6: Vec<(Ipv6Addr, Socket)>,
}

impl Announcer {
    /// Prepare announcements of `addrs` out of `ifindex` (all sockets are
    /// opened here, in the calling thread's network namespace).
    pub fn new(ifindex: u32, addrs: &[ServiceAddr]) -> Result<Self> {
        let mac = link_address(ifindex)?;
        let arp =
            packet::packet_dgram_socket(packet::ETH_P_ARP).map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM) => NetError::Unsupported {
                    feature: "gratuitous ARP",
                    needs: "CAP_NET_RAW in the host's network namespace",
                },
                _ => NetError::sys("socket(AF_PACKET)", format!("interface {ifindex}"), e),
            })?;
        let mut icmp6 = Vec::new();
        for a in addrs {
            if let IpAddr::V6(v6) = a.addr {
                let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
                    .and_then(|s| {
                        s.set_multicast_hops_v6(255)?;
                        s.set_multicast_if_v6(ifindex)?;
                        Ok(s)
                    })
                    .map_err(|e| {
                        NetError::sys("socket(SOCK_RAW, IPPROTO_ICMPV6)", v6.to_string(), e)
                    })?;
                icmp6.push((v6, s));
            }
        }
        Ok(Self {
            ifindex,
            mac,
            arp,
            icmp6,
        })
    }

    /// Announce every address in `addrs` (which must be on the interface now
    /// and, for IPv6, have been given to [`Announcer::new`]).
    pub fn announce(&mut self, addrs: &[ServiceAddr]) -> Result<()> {
        for a in addrs {
            match a.addr {
                IpAddr::V4(v4) => {
                    let mut p = Vec::with_capacity(28);
                    p.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
                    p.extend_from_slice(&self.mac);
                    p.extend_from_slice(&v4.octets());
                    p.extend_from_slice(&[0; 6]);
                    p.extend_from_slice(&v4.octets());
                    packet::send_to_broadcast(
                        std::os::fd::AsFd::as_fd(&self.arp),
                        self.ifindex,
                        packet::ETH_P_ARP,
                        &p,
                    )
                    .map_err(|e| NetError::sys("send gratuitous ARP", v4.to_string(), e))?;
                }
                IpAddr::V6(v6) => self.advertise(v6).map_err(|e| {
                    NetError::sys(
                        "send unsolicited neighbour advertisement",
                        v6.to_string(),
                        e,
                    )
                })?,
            }
        }
        Ok(())
    }

    fn advertise(&mut self, target: Ipv6Addr) -> io::Result<()> {
        let Some(i) = self.icmp6.iter().position(|(a, _)| *a == target) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "address not prepared",
            ));
        };
        let s = &self.icmp6[i].1;
        // The source address must be the service address (now local).
        s.bind(&SockAddr::from(SocketAddrV6::new(target, 0, 0, 0)))?;
        let mut na = Vec::with_capacity(32);
        na.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
        na.extend_from_slice(&target.octets());
        na.extend_from_slice(&[2, 1]);
        na.extend_from_slice(&self.mac);
        let all_nodes = SocketAddrV6::new(
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            0,
            0,
            self.ifindex,
        );
        s.send_to(&na, &SockAddr::from(all_nodes))?;
        // A socket binds once: make a fresh one for a later announcement.
        if let Ok(fresh) = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)) {
            if let Err(e) = fresh.set_multicast_hops_v6(255) {
                debug!(error = %e, "the next announcement socket: setting its hop limit failed");
            }
            if let Err(e) = fresh.set_multicast_if_v6(self.ifindex) {
                debug!(error = %e, "the next announcement socket: setting its interface failed");
            }
            self.icmp6[i].1 = fresh;
        }
        Ok(())
    }
}
