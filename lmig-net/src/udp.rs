//! UDP sockets: bound and connected addresses, options, and the datagrams
//! waiting in the receive queue.
//!
//! The queue is read without consuming it: `SO_PEEK_OFF` = 0 makes each
//! `recvfrom(MSG_PEEK)` return the next datagram, and the offset is switched
//! off again afterwards, so an aborted migration leaves every datagram in
//! place (CRIU drops them). On the destination the datagrams are injected at
//! activation, in order and with their original senders, through a raw
//! socket: the program reads them before anything that arrives later.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bytes::Bytes;
use lmig_core::model::{MAX_QUEUE_BYTES, MAX_UDP_DATAGRAMS, UdpDatagram, UdpSockState};

use crate::error::{NetError, Result};
use crate::inject::{self, Injector};
use crate::opts::{self, Defaults};
use crate::sys;

fn describe(id: u64, local: Option<SocketAddr>) -> String {
    format!(
        "UDP socket {id} ({})",
        local.map(|a| a.to_string()).unwrap_or_else(|| "?".into())
    )
}

/// Capture a UDP socket and peek its pending datagrams.
pub(crate) fn capture_udp(fd: BorrowedFd<'_>, id: u64, buffers: bool) -> Result<UdpSockState> {
    let local = sys::local_addr(fd).ok().flatten();
    let what = || describe(id, local);
    let Some(local) = local else {
        return Err(NetError::NotMigratable {
            what: what(),
            reason: "not bound".into(),
        });
    };
    let peer = sys::peer_addr(fd).map_err(|e| NetError::sys("getpeername", what(), e))?;
    let reuse = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .map_err(|e| NetError::sys("getsockopt(SO_REUSEADDR)", what(), e))?
        != 0;
    let sock = opts::read_sock_opts(fd, local.is_ipv6(), reuse, buffers, &what)?;

    let mut recv_queue = Vec::new();
    if sys::inq(fd).map_err(|e| NetError::sys("ioctl(SIOCINQ)", what(), e))? > 0 {
        // The program's own peek offset is put back afterwards: an aborted
        // migration leaves the socket as it was.
        let before =
            sys::peek_off(fd).map_err(|e| NetError::sys("getsockopt(SO_PEEK_OFF)", what(), e))?;
        sys::set_peek_off(fd, 0)
            .map_err(|e| NetError::sys("setsockopt(SO_PEEK_OFF)", what(), e))?;
        let res = peek_all(fd, &mut recv_queue, &what);
        let off = sys::set_peek_off(fd, before)
            .map_err(|e| NetError::sys("setsockopt(SO_PEEK_OFF)", what(), e));
        res?;
        off?;
    }
    Ok(UdpSockState {
        id,
        local,
        peer,
        sock,
        recv_queue,
    })
}

fn peek_all(
    fd: BorrowedFd<'_>,
    out: &mut Vec<UdpDatagram>,
    what: &dyn Fn() -> String,
) -> Result<()> {
    let mut buf = vec![0u8; 65_536];
    let mut total = 0usize;
    // Bounded by the model's caps.
    while out.len() < MAX_UDP_DATAGRAMS {
        match sys::peek_from(fd, &mut buf) {
            Ok((n, from)) => {
                let Some(from) = from else {
                    return Err(NetError::NotMigratable {
                        what: what(),
                        reason: "a pending datagram has no sender address".into(),
                    });
                };
                let n = n.min(buf.len());
                total += n;
                if total > MAX_QUEUE_BYTES {
                    return Err(NetError::NotMigratable {
                        what: what(),
                        reason: format!("more than {MAX_QUEUE_BYTES} bytes of pending datagrams"),
                    });
                }
                out.push(UdpDatagram {
                    from,
                    data: Bytes::copy_from_slice(&buf[..n]),
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(()),
            Err(e) => return Err(NetError::sys("recvfrom(MSG_PEEK)", what(), e)),
        }
    }
    Err(NetError::NotMigratable {
        what: what(),
        reason: format!("more than {MAX_UDP_DATAGRAMS} pending datagrams"),
    })
}

/// A restored UDP socket waiting for activation.
#[derive(Debug)]
pub(crate) struct RestoredUdp {
    pub fd: OwnedFd,
}

fn bind_connect(fd: BorrowedFd<'_>, s: &UdpSockState, what: &dyn Fn() -> String) -> Result<()> {
    match sys::bind(fd, &s.local) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            let (level, name) = if s.local.is_ipv4() {
                (libc::SOL_IP, libc::IP_TRANSPARENT)
            } else {
                (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
            };
            // Not local yet (the address moves later): IP_TRANSPARENT lets the
            // socket bind and connect (route lookups accept any source).
            sys::setsockopt_int(fd, level, name, 1)
                .map_err(|e| NetError::sys("setsockopt(IP_TRANSPARENT)", what(), e))?;
            sys::bind(fd, &s.local).map_err(|e| NetError::sys("bind", what(), e))?;
        }
        Err(e) => return Err(NetError::sys("bind", what(), e)),
    }
    if let Some(peer) = s.peer {
        sys::connect(fd, &peer).map_err(|e| NetError::sys("connect", what(), e))?;
    }
    Ok(())
}

/// Create, configure, bind and connect, before `Commit` (what can refuse is
/// tried while the source still serves). A port another socket of this host
/// holds (the source itself, when both run on one host) refuses with
/// `EADDRINUSE` unless both sockets set `SO_REUSEADDR` or `SO_REUSEPORT`.
pub(crate) fn restore_udp(s: &UdpSockState, d: &Defaults, flags: i32) -> Result<RestoredUdp> {
    let what = || describe(s.id, Some(s.local));
    let fd = sys::socket(sys::family_of(&s.local), libc::SOCK_DGRAM | flags, 0)
        .map_err(|e| NetError::sys("socket", what(), e))?;
    opts::apply_sock_opts(fd.as_fd(), s.local.is_ipv6(), true, &s.sock, &d.sock, &what)?;
    opts::apply_reuse_addr(fd.as_fd(), &s.sock, &what)?;
    bind_connect(fd.as_fd(), s, &what)?;
    Ok(RestoredUdp { fd })
}

/// After `Commit`: deliver the pending datagrams.
pub(crate) fn activate_udp(s: &UdpSockState, inj: &mut Injector) -> Result<()> {
    let what = || describe(s.id, Some(s.local));
    // A socket bound to the wildcard address does not record where each
    // datagram was sent to: deliver to the loopback address of its family.
    let to = if s.local.ip().is_unspecified() {
        let ip = if s.local.is_ipv4() {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        } else {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        };
        SocketAddr::new(ip, s.local.port())
    } else {
        s.local
    };
    for dg in &s.recv_queue {
        let pkt = inject::udp_packet(dg.from, to, &dg.data);
        inj.inject(to, &pkt, &what)?;
    }
    Ok(())
}
