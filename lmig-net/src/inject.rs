//! Packets handed to the local stack through a raw socket, as if the peer
//! had sent them: the FIN a half-closed connection had received, and the
//! datagrams a UDP socket had not read yet.
//!
//! The destination address must be local (after the address handoff) so the
//! packet loops back into this host's stack; one raw socket per family serves
//! a whole batch. Before the first packet to an address the injector waits
//! (at most [`LOCAL_WAIT`]) until the host routes it locally: an IPv6
//! address moved here a moment ago is not deliverable yet, and a raw packet
//! sent to it then is dropped without an error; an address that never
//! becomes local would send the packet out to the network. Either way the
//! injection fails with an error naming the address instead.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use crate::error::{NetError, Result};
use crate::sys;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// How long an injection waits for its destination address to become local.
pub(crate) const LOCAL_WAIT: Duration = Duration::from_secs(2);

/// Raw sockets (one per family, opened on first use) that inject packets.
#[derive(Debug, Default)]
pub(crate) struct Injector {
    v4: Option<OwnedFd>,
    v6: Option<OwnedFd>,
    /// rtnetlink, opened on first use, to check addresses are local.
    route: Option<sys::netlink::NlSocket>,
    /// Addresses already seen routed locally.
    local: HashSet<IpAddr>,
}

fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The transport checksum over the pseudo-header and `segment`.
pub(crate) fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = 0u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(acc, &s.octets());
            acc = sum16(acc, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum16(acc, &s.octets());
            acc = sum16(acc, &d.octets());
        }
        _ => {}
    }
    acc += u32::from(proto);
    acc += segment.len() as u32 & 0xffff;
    acc += (segment.len() as u32) >> 16;
    acc = sum16(acc, segment);
    fold(acc)
}

/// Prefix `segment` with an IPv4 or IPv6 header from `src` to `dst`.
fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + segment.len());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + segment.len()) as u16;
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            let csum = fold(sum16(0, &p[..20]));
            p[10..12].copy_from_slice(&csum.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&(segment.len() as u16).to_be_bytes());
            p.extend_from_slice(&[proto, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
        }
        _ => {}
    }
    p.extend_from_slice(segment);
    p
}

/// A UDP datagram from `from` to `to`, with its checksum.
pub(crate) fn udp_packet(from: SocketAddr, to: SocketAddr, data: &[u8]) -> Vec<u8> {
    let len = (8 + data.len()) as u16;
    let mut seg = Vec::with_capacity(8 + data.len());
    seg.extend_from_slice(&from.port().to_be_bytes());
    seg.extend_from_slice(&to.port().to_be_bytes());
    seg.extend_from_slice(&len.to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(data);
    let mut csum = l4_checksum(from.ip(), to.ip(), PROTO_UDP, &seg);
    if csum == 0 {
        csum = 0xffff;
    }
    seg[6..8].copy_from_slice(&csum.to_be_bytes());
    ip_packet(from.ip(), to.ip(), PROTO_UDP, &seg)
}

/// A bare TCP segment (no options) from `from` to `to`.
pub(crate) fn tcp_packet(
    from: SocketAddr,
    to: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20);
    seg.extend_from_slice(&from.port().to_be_bytes());
    seg.extend_from_slice(&to.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[5 << 4, flags]);
    seg.extend_from_slice(&window.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]);
    let csum = l4_checksum(from.ip(), to.ip(), PROTO_TCP, &seg);
    seg[16..18].copy_from_slice(&csum.to_be_bytes());
    ip_packet(from.ip(), to.ip(), PROTO_TCP, &seg)
}

/// TCP flag FIN.
pub(crate) const TH_FIN: u8 = 0x01;
/// TCP flag ACK.
pub(crate) const TH_ACK: u8 = 0x10;

impl Injector {
    /// Send `packet` (built by [`udp_packet`] / [`tcp_packet`]) to `to`'s host.
    pub(crate) fn inject(
        &mut self,
        to: SocketAddr,
        packet: &[u8],
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        self.wait_local(to.ip(), what)?;
        let slot = if to.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if slot.is_none() {
            let fd = sys::socket(sys::family_of(&to), libc::SOCK_RAW, libc::IPPROTO_RAW)
                .map_err(|e| NetError::sys("socket(SOCK_RAW)", what(), e))?;
            *slot = Some(fd);
        }
        let fd = slot.as_ref().map(|f| f.as_fd()).ok_or(NetError::Phase {
            op: "inject",
            detail: "no raw socket",
        })?;
        let dst = SocketAddr::new(to.ip(), 0);
        let n =
            sys::send_to(fd, packet, &dst).map_err(|e| NetError::sys("sendto(raw)", what(), e))?;
        if n != packet.len() {
            return Err(NetError::sys(
                "sendto(raw)",
                what(),
                std::io::Error::new(std::io::ErrorKind::WriteZero, "short raw send"),
            ));
        }
        Ok(())
    }

    /// Wait (at most [`LOCAL_WAIT`]) until `ip` routes locally here; once
    /// seen, an address is not asked again.
    fn wait_local(&mut self, ip: IpAddr, what: &dyn Fn() -> String) -> Result<()> {
        if self.local.contains(&ip) {
            return Ok(());
        }
        let route = match &mut self.route {
            Some(r) => r,
            slot => slot.insert(
                sys::netlink::NlSocket::route()
                    .map_err(|e| NetError::sys("netlink socket", "NETLINK_ROUTE", e))?,
            ),
        };
        sys::rtnl::wait_local(route, ip, LOCAL_WAIT).map_err(|e| {
            NetError::sys(
                "inject",
                format!(
                    "{}: {ip} is not a local address of this host after {LOCAL_WAIT:?} \
                     (move the service address here before activating)",
                    what()
                ),
                e,
            )
        })?;
        self.local.insert(ip);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_checksum_verifies() {
        let from: SocketAddr = "198.51.100.9:4000".parse().unwrap();
        let to: SocketAddr = "198.51.100.1:53".parse().unwrap();
        let p = udp_packet(from, to, b"hello");
        assert_eq!(p.len(), 20 + 8 + 5);
        // Re-summing a segment with its checksum in place gives zero.
        assert_eq!(l4_checksum(from.ip(), to.ip(), PROTO_UDP, &p[20..]), 0);
        assert_eq!(fold(sum16(0, &p[..20])), 0);
        let from6: SocketAddr = "[2001:db8::9]:4000".parse().unwrap();
        let to6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        let t = tcp_packet(from6, to6, 1, 2, TH_FIN | TH_ACK, 100);
        assert_eq!(t.len(), 60);
        assert_eq!(l4_checksum(from6.ip(), to6.ip(), PROTO_TCP, &t[40..]), 0);
    }
}
