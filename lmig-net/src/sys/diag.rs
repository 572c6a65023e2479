//! `NETLINK_SOCK_DIAG`: the UDP sockets of a network namespace with their
//! receive-buffer use (`inet_diag`, `INET_DIAG_SKMEMINFO`), for pacing the
//! release of held packets ([`crate::lock`]); the queued bytes of its TCP
//! connections by socket cookie, for the freeze's estimate.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::socket::SockProtocol;

use super::netlink::{Attrs, F_DUMP, F_REQUEST, MsgBuf, NlSocket};

/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_SKMEMINFO`: `u32[SK_MEMINFO_VARS]`.
const INET_DIAG_SKMEMINFO: u16 = 7;
/// `sizeof(struct inet_diag_sockid)`.
const SOCKID_LEN: usize = 48;
/// `sizeof(struct inet_diag_msg)`.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// One UDP socket as `inet_diag` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UdpDiag {
    /// Bound address (unspecified: any).
    pub(crate) local: SocketAddr,
    /// Connected peer, if any.
    pub(crate) peer: Option<SocketAddr>,
    /// Bytes charged to its receive queues (`sk_rmem_alloc`).
    pub(crate) rmem: u32,
    /// Its receive buffer (`sk_rcvbuf`).
    pub(crate) rcvbuf: u32,
}

/// A `NETLINK_SOCK_DIAG` socket in the calling thread's network namespace.
#[derive(Debug)]
pub(crate) struct Diag {
    nl: NlSocket,
}

impl Diag {
    /// Open it.
    pub(crate) fn open() -> io::Result<Self> {
        Ok(Self {
            nl: NlSocket::open(SockProtocol::NetlinkSockDiag)?,
        })
    }

    /// Every UDP socket of both families, with its memory use (one dump each).
    #[doc(alias = "SOCK_DIAG_BY_FAMILY")]
    pub(crate) fn udp_sockets(&mut self, out: &mut Vec<UdpDiag>) -> io::Result<()> {
        out.clear();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let mut m = MsgBuf::new();
            m.begin(SOCK_DIAG_BY_FAMILY, F_REQUEST | F_DUMP, self.nl.next_seq())
                .raw(&udp_request(family))
                .end();
            self.nl.dump(m.bytes(), |kind, payload| {
                if kind == SOCK_DIAG_BY_FAMILY {
                    out.extend(parse_udp(payload));
                }
            })?;
        }
        Ok(())
    }
}

impl Diag {
    /// Every TCP connection of both families but listeners: `each(cookie,
    /// receive queue, send queue)` in bytes (`rcv_nxt - copied_seq`,
    /// `write_seq - snd_una`, as `SIOCINQ` and `SIOCOUTQ` say), one dump each.
    #[doc(alias = "SOCK_DIAG_BY_FAMILY")]
    pub(crate) fn tcp_queues(&mut self, each: &mut dyn FnMut(u64, u32, u32)) -> io::Result<()> {
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let mut m = MsgBuf::new();
            m.begin(SOCK_DIAG_BY_FAMILY, F_REQUEST | F_DUMP, self.nl.next_seq())
                .raw(&tcp_request(family))
                .end();
            self.nl.dump(m.bytes(), |kind, payload| {
                if kind == SOCK_DIAG_BY_FAMILY {
                    if let Some((cookie, rq, wq)) = parse_tcp_queues(payload) {
                        each(cookie, rq, wq);
                    }
                }
            })?;
        }
        Ok(())
    }
}

/// `struct inet_diag_req_v2` for every TCP socket of `family` but
/// listeners (`TCP_LISTEN` = 10), no attributes.
fn tcp_request(family: u8) -> [u8; 8 + SOCKID_LEN] {
    let mut r = [0u8; 8 + SOCKID_LEN];
    r[0] = family;
    r[1] = libc::IPPROTO_TCP as u8;
    r[4..8].copy_from_slice(&(!(1u32 << 10)).to_ne_bytes());
    r
}

/// (cookie, `idiag_rqueue`, `idiag_wqueue`) of one `inet_diag_msg`.
fn parse_tcp_queues(p: &[u8]) -> Option<(u64, u32, u32)> {
    let msg = p.get(..DIAG_MSG_LEN)?;
    let word = |i: usize| u32::from_ne_bytes([msg[i], msg[i + 1], msg[i + 2], msg[i + 3]]);
    // `idiag_cookie` is `__u32[2]`, the low half first.
    let cookie = u64::from(word(4 + 40)) | u64::from(word(4 + 44)) << 32;
    Some((cookie, word(4 + SOCKID_LEN + 4), word(4 + SOCKID_LEN + 8)))
}

/// `struct inet_diag_req_v2` for every UDP socket of `family`, asking for
/// `INET_DIAG_SKMEMINFO`.
fn udp_request(family: u8) -> [u8; 8 + SOCKID_LEN] {
    let mut r = [0u8; 8 + SOCKID_LEN];
    r[0] = family;
    r[1] = libc::IPPROTO_UDP as u8;
    r[2] = 1 << (INET_DIAG_SKMEMINFO - 1);
    r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    r
}

/// An address of an `inet_diag_sockid` (`__be32[4]`) of `family`.
fn addr(family: u8, b: &[u8], port: u16) -> Option<SocketAddr> {
    let ip = match family as i32 {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&b[..16]).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One `inet_diag_msg` and its attributes; `None` if malformed or without
/// memory figures.
pub(crate) fn parse_udp(p: &[u8]) -> Option<UdpDiag> {
    let msg = p.get(..DIAG_MSG_LEN)?;
    let family = msg[0];
    let id = &msg[4..4 + SOCKID_LEN];
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let local = addr(family, &id[4..20], sport)?;
    let peer = addr(family, &id[20..36], dport).filter(|a| a.port() != 0);
    let mut mem = None;
    for (kind, value) in Attrs::new(p.get(DIAG_MSG_LEN..)?) {
        if kind == INET_DIAG_SKMEMINFO && value.len() >= 8 {
            let word =
                |i: usize| u32::from_ne_bytes([value[i], value[i + 1], value[i + 2], value[i + 3]]);
            mem = Some((
                word(4 * libc::SK_MEMINFO_RMEM_ALLOC as usize),
                word(4 * libc::SK_MEMINFO_RCVBUF as usize),
            ));
        }
    }
    let (rmem, rcvbuf) = mem?;
    Some(UdpDiag {
        local,
        peer,
        rmem,
        rcvbuf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_layout() {
        let r = udp_request(libc::AF_INET6 as u8);
        assert_eq!(r.len(), 56, "sizeof(struct inet_diag_req_v2)");
        assert_eq!((r[0], r[1], r[2]), (10, 17, 0x40));
        // An AF_INET reply: 198.51.100.10:5300 connected to 198.51.100.3:6000,
        // 768 bytes of 212992 used.
        let mut p = vec![0u8; DIAG_MSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[4..6].copy_from_slice(&5300u16.to_be_bytes());
        p[6..8].copy_from_slice(&6000u16.to_be_bytes());
        p[8..12].copy_from_slice(&[198, 51, 100, 10]);
        p[24..28].copy_from_slice(&[198, 51, 100, 3]);
        let mut mem = Vec::new();
        for v in [768u32, 212_992, 0, 0, 0, 0, 0, 0, 0] {
            mem.extend_from_slice(&v.to_ne_bytes());
        }
        p.extend_from_slice(&((4 + mem.len()) as u16).to_ne_bytes());
        p.extend_from_slice(&INET_DIAG_SKMEMINFO.to_ne_bytes());
        p.extend_from_slice(&mem);
        let d = parse_udp(&p).unwrap();
        assert_eq!(d.local, "198.51.100.10:5300".parse().unwrap());
        assert_eq!(d.peer, Some("198.51.100.3:6000".parse().unwrap()));
        assert_eq!((d.rmem, d.rcvbuf), (768, 212_992));
        // Truncated, or without memory figures: nothing.
        assert_eq!(parse_udp(&p[..DIAG_MSG_LEN - 1]), None);
        assert_eq!(parse_udp(&p[..DIAG_MSG_LEN]), None);
    }

    #[test]
    fn tcp_queue_request_and_reply_layout() {
        let r = tcp_request(libc::AF_INET as u8);
        assert_eq!((r[0], r[1], r[2]), (2, 6, 0));
        assert_eq!(u32::from_ne_bytes([r[4], r[5], r[6], r[7]]), !0x400);
        let mut p = vec![0u8; DIAG_MSG_LEN];
        let cookie: u64 = 0x1234_5678_9abc_def0;
        p[44..48].copy_from_slice(&(cookie as u32).to_ne_bytes());
        p[48..52].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        p[52..56].copy_from_slice(&7u32.to_ne_bytes()); // expires
        p[56..60].copy_from_slice(&4096u32.to_ne_bytes()); // rqueue
        p[60..64].copy_from_slice(&65_536u32.to_ne_bytes()); // wqueue
        assert_eq!(parse_tcp_queues(&p), Some((cookie, 4096, 65_536)));
        assert_eq!(parse_tcp_queues(&p[..DIAG_MSG_LEN - 1]), None);
    }
}
