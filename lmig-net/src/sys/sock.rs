//! Generic socket calls: socket options by level and name, the queue-size
//! ioctls, peeking, sending, and the address calls. Where socket2 or nix
//! already offers a call it goes through them ([`socket2::SockRef`] over a
//! borrowed fd); what neither offers (options by number, `SIOCOUTQNSD`,
//! `SO_PEEK_OFF`, `SO_COOKIE`) is raw here.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::MsgFlags;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use super::errno::cvt;

/// `SIOCINQ` (= `FIONREAD`): bytes in the receive queue not yet read.
const SIOCINQ: libc::c_ulong = 0x541B;
/// `SIOCOUTQ` (= `TIOCOUTQ`): bytes in the send queue not yet acknowledged.
const SIOCOUTQ: libc::c_ulong = 0x5411;
/// `SIOCOUTQNSD`: bytes in the send queue never sent.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
/// `SO_PEEK_OFF`.
const SO_PEEK_OFF: libc::c_int = 42;

/// `setsockopt(fd, level, name, &val, sizeof val)` for any plain value.
pub(super) fn setsockopt_raw<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    val: &T,
) -> io::Result<()> {
    // SAFETY: `val` points to a live `T` of exactly the length passed; the kernel only reads it.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (val as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

/// `setsockopt` with a byte buffer (arrays, strings).
pub(super) fn setsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    val: &[u8],
) -> io::Result<()> {
    // SAFETY: `val` is a live slice of the length passed; the kernel only reads it.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

/// `getsockopt` into a byte buffer; returns the length the kernel wrote.
fn getsockopt_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is a live, writable slice of `len` bytes and `len` is a valid socklen_t.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    cvt(ret)?;
    Ok(len as usize)
}

/// `getsockopt` of a plain-old-data value (zero-filled first, so a shorter
/// answer from an older kernel leaves the tail zero).
pub(super) fn getsockopt_pod<T: Copy + Default>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<(T, usize)> {
    let mut val = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `val` is a live `T` of `len` bytes; T is a repr(C)/integer type valid for any bytes.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut val as *mut T).cast(),
            &mut len,
        )
    };
    cvt(ret)?;
    Ok((val, len as usize))
}

/// `getsockopt(level, name)` of an `int` option.
pub fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<i32> {
    getsockopt_pod::<i32>(fd, level, name).map(|(v, _)| v)
}

/// `SO_COOKIE`: the kernel's 64-bit identifier of a socket, the same through
/// every fd of it and never reused while the host runs. Cheaper than
/// `fstat` for an identity check (no security hook on the inode).
#[doc(alias = "SO_COOKIE")]
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_pod::<u64>(fd, libc::SOL_SOCKET, libc::SO_COOKIE).map(|(v, _)| v)
}

/// `setsockopt(level, name)` of an `int` option.
pub fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    val: i32,
) -> io::Result<()> {
    setsockopt_raw(fd, level, name, &val)
}

/// `getsockopt` of a string option (`TCP_CONGESTION`, `SO_BINDTODEVICE`);
/// `None` when empty.
pub fn getsockopt_string(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<Option<String>> {
    let mut buf = [0u8; 32];
    let n = getsockopt_bytes(fd, level, name, &mut buf)?;
    let s = &buf[..n];
    let s = s.split(|b| *b == 0).next().unwrap_or(&[]);
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(String::from_utf8_lossy(s).into_owned()))
    }
}

/// `setsockopt` of a string option (`TCP_CONGESTION`, `SO_BINDTODEVICE`).
pub fn setsockopt_string(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    val: &str,
) -> io::Result<()> {
    setsockopt_bytes(fd, level, name, val.as_bytes())
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<u32> {
    let mut val: libc::c_int = 0;
    // SAFETY: these socket ioctls write one `int` through the pointer, which points to a live int.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut val as *mut libc::c_int) };
    cvt(ret)?;
    Ok(val as u32)
}

/// `ioctl(SIOCINQ)`: received bytes not yet read (a received FIN is not counted).
#[doc(alias = "SIOCINQ")]
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, SIOCINQ)
}

/// `ioctl(SIOCOUTQ)`: `write_seq - snd_una` (a queued FIN counts one).
#[doc(alias = "SIOCOUTQ")]
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, SIOCOUTQ)
}

/// `ioctl(SIOCOUTQNSD)`: `write_seq - snd_nxt`, bytes never sent.
#[doc(alias = "SIOCOUTQNSD")]
pub fn outq_nsd(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, SIOCOUTQNSD)
}

/// `getsockopt(SO_PEEK_OFF)`: the program's peek offset (-1: off).
#[doc(alias = "SO_PEEK_OFF")]
pub fn peek_off(fd: BorrowedFd<'_>) -> io::Result<i32> {
    getsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF)
}

/// `setsockopt(SO_PEEK_OFF)`: -1 switches peeking with an offset off.
#[doc(alias = "SO_PEEK_OFF")]
pub fn set_peek_off(fd: BorrowedFd<'_>, off: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF, off)
}

/// `recv(fd, buf, MSG_PEEK | MSG_DONTWAIT | extra)`.
#[doc(alias = "MSG_PEEK")]
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8], extra: libc::c_int) -> io::Result<usize> {
    let flags = MsgFlags::from_bits_retain(libc::MSG_PEEK | libc::MSG_DONTWAIT | extra);
    nix::sys::socket::recv(fd.as_raw_fd(), buf, flags).map_err(io::Error::from)
}

/// `recvfrom(fd, buf, MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC)`: the datagram's
/// full length and its sender.
#[doc(alias = "recvfrom")]
pub fn peek_from(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<SocketAddr>)> {
    // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout; the
    // socket only writes initialised bytes into it.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC;
    let (n, from) = SockRef::from(&fd).recv_from_with_flags(uninit, flags)?;
    Ok((n, from.as_socket()))
}

/// `send(fd, buf, flags | MSG_NOSIGNAL)`.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    SockRef::from(&fd).send_with_flags(buf, flags | libc::MSG_NOSIGNAL)
}

/// `sendto(fd, buf, MSG_NOSIGNAL, addr)`.
#[doc(alias = "sendto")]
pub fn send_to(fd: BorrowedFd<'_>, buf: &[u8], addr: &SocketAddr) -> io::Result<usize> {
    SockRef::from(&fd).send_to_with_flags(buf, &SockAddr::from(*addr), libc::MSG_NOSIGNAL)
}

/// `socket(domain, type | SOCK_CLOEXEC, protocol)`.
pub fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    let s = Socket::new(
        Domain::from(domain),
        Type::from(ty),
        Some(Protocol::from(protocol)),
    )?;
    Ok(OwnedFd::from(s))
}

/// The address family constant of a socket address.
pub fn family_of(addr: &SocketAddr) -> libc::c_int {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// `bind(fd, addr)`.
pub fn bind(fd: BorrowedFd<'_>, addr: &SocketAddr) -> io::Result<()> {
    SockRef::from(&fd).bind(&SockAddr::from(*addr))
}

/// `connect(fd, addr)`.
pub fn connect(fd: BorrowedFd<'_>, addr: &SocketAddr) -> io::Result<()> {
    SockRef::from(&fd).connect(&SockAddr::from(*addr))
}

/// `listen(fd, backlog)`.
pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    SockRef::from(&fd).listen(backlog)
}

/// `shutdown(fd, how)` with `how` one of `SHUT_RD`, `SHUT_WR`, `SHUT_RDWR`.
pub fn shutdown(fd: BorrowedFd<'_>, how: libc::c_int) -> io::Result<()> {
    let how = match how {
        libc::SHUT_RD => Shutdown::Read,
        libc::SHUT_WR => Shutdown::Write,
        libc::SHUT_RDWR => Shutdown::Both,
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    SockRef::from(&fd).shutdown(how)
}

/// `getsockname(fd)`.
#[doc(alias = "getsockname")]
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<Option<SocketAddr>> {
    Ok(SockRef::from(&fd).local_addr()?.as_socket())
}

/// `getpeername(fd)`; `None` when not connected.
#[doc(alias = "getpeername")]
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<Option<SocketAddr>> {
    match SockRef::from(&fd).peer_addr() {
        Ok(a) => Ok(a.as_socket()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `fcntl(F_GETFL)` has `O_NONBLOCK`?
#[cfg(feature = "bench-internals")]
pub fn is_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    SockRef::from(&fd).nonblocking()
}

/// `fcntl(F_SETFL)` toggling `O_NONBLOCK`.
#[cfg(feature = "bench-internals")]
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    SockRef::from(&fd).set_nonblocking(on)
}

/// `poll` one fd for `events` up to `timeout_ms`; returns the revents.
#[doc(alias = "poll")]
pub fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout_ms: i32,
) -> io::Result<libc::c_short> {
    let mut p = [PollFd::new(fd, PollFlags::from_bits_retain(events))];
    let timeout = PollTimeout::try_from(timeout_ms.max(-1)).unwrap_or(PollTimeout::NONE);
    poll(&mut p, timeout)?;
    Ok(p[0].revents().map_or(0, |r| r.bits()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// The ioctl and option numbers of `<linux/sockios.h>` and `<asm/socket.h>`.
    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(SIOCINQ, libc::FIONREAD as libc::c_ulong);
        assert_eq!(SIOCOUTQ, libc::TIOCOUTQ as libc::c_ulong);
        assert_eq!(SIOCOUTQNSD, 0x894B);
        assert_eq!(SO_PEEK_OFF, libc::SO_PEEK_OFF);
    }

    #[test]
    fn addresses_and_queues_of_a_connected_pair() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(
            local_addr(c.as_fd()).unwrap(),
            Some(c.local_addr().unwrap())
        );
        assert_eq!(peer_addr(c.as_fd()).unwrap(), Some(l.local_addr().unwrap()));
        assert_eq!(send(c.as_fd(), b"hello", 0).unwrap(), 5);
        assert_eq!(
            poll_one(s.as_fd(), libc::POLLIN, 1000).unwrap() & libc::POLLIN,
            libc::POLLIN
        );
        let mut buf = [0u8; 8];
        assert_eq!(peek(s.as_fd(), &mut buf, 0).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        assert_eq!(inq(s.as_fd()).unwrap(), 5);
        shutdown(c.as_fd(), libc::SHUT_WR).unwrap();
        assert!(shutdown(c.as_fd(), 7).is_err());
        let unconnected = socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
        assert_eq!(peer_addr(unconnected.as_fd()).unwrap(), None);
    }

    #[test]
    fn a_peeked_datagram_stays_queued_with_its_sender() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = a.local_addr().unwrap();
        send_to(b.as_fd(), b"0123456789", &to).unwrap();
        poll_one(a.as_fd(), libc::POLLIN, 1000).unwrap();
        let mut small = [0u8; 4];
        let (n, from) = peek_from(a.as_fd(), &mut small).unwrap();
        assert_eq!((n, from), (10, Some(b.local_addr().unwrap())));
        assert_eq!(&small, b"0123");
        let mut all = [0u8; 16];
        assert_eq!(a.recv(&mut all).unwrap(), 10);
    }
}
