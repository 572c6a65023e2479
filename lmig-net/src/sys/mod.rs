//! One safe function per kernel operation lmig-net uses.
//!
//! Every `unsafe` block of the crate lives here, each with the invariant it
//! relies on. Functions take `BorrowedFd<'_>` and hand out `OwnedFd`; errors
//! are plain [`std::io::Error`]s that the callers wrap into
//! [`crate::NetError`] with the operation and connection they belong to.
#![allow(unsafe_code)]

pub(crate) mod netlink;
pub(crate) mod packet;
pub(crate) mod rtnl;

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Touch every page of `v`'s unused capacity, so that filling it later (in
/// the freeze) does not fault in memory fresh from the kernel. A virtual
/// machine that hands free memory back to its hypervisor pays ~10 µs for a
/// page's first touch; 10,000 restored connections fill about 2 MB.
pub(crate) fn prefault_spare<T>(v: &mut Vec<T>) {
    let spare = v.spare_capacity_mut();
    let len = std::mem::size_of_val(spare);
    if len == 0 {
        return;
    }
    let base = spare.as_mut_ptr().cast::<u8>();
    let mut off = 0;
    while off < len {
        // SAFETY: `base..base + len` is the vector's allocated and unused
        // capacity; a byte written there stays uninitialized to the vector.
        unsafe { base.add(off).write_volatile(0) };
        off += 4096;
    }
    // SAFETY: as above; the last byte covers a page the stride skipped.
    unsafe { base.add(len - 1).write_volatile(0) };
}

/// `SIOCINQ` (= `FIONREAD`): bytes in the receive queue not yet read.
const SIOCINQ: libc::c_ulong = 0x541B;
/// `SIOCOUTQ` (= `TIOCOUTQ`): bytes in the send queue not yet acknowledged.
const SIOCOUTQ: libc::c_ulong = 0x5411;
/// `SIOCOUTQNSD`: bytes in the send queue never sent.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
/// `SO_PEEK_OFF`.
const SO_PEEK_OFF: libc::c_int = 42;

/// Values of `TCP_REPAIR`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RepairMode {
    /// `TCP_REPAIR_ON` (1).
    On,
    /// `TCP_REPAIR_OFF` (0): leave repair mode and send a window probe, which
    /// makes the peer answer with an ACK at once.
    Off,
    /// `TCP_REPAIR_OFF_NO_WP` (-1, Linux >= 4.13): leave without the probe.
    OffNoWindowProbe,
}

/// Queues selected by `TCP_REPAIR_QUEUE`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TcpQueue {
    /// `TCP_NO_QUEUE`.
    None = 0,
    /// `TCP_RECV_QUEUE`.
    Recv = 1,
    /// `TCP_SEND_QUEUE`.
    Send = 2,
}

/// `struct tcp_repair_opt`: one option of `TCP_REPAIR_OPTIONS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpRepairOpt {
    /// `TCPOPT_*` code.
    pub opt_code: u32,
    /// Its value.
    pub opt_val: u32,
}
const _: () = assert!(size_of::<TcpRepairOpt>() == 8);

/// `TCPOPT_MAXSEG`.
pub const TCPOPT_MAXSEG: u32 = 2;
/// `TCPOPT_WINDOW`: value is `snd_wscale | rcv_wscale << 16`.
pub const TCPOPT_WINDOW: u32 = 3;
/// `TCPOPT_SACK_PERM`.
pub const TCPOPT_SACK_PERM: u32 = 4;
/// `TCPOPT_TIMESTAMP`.
pub const TCPOPT_TIMESTAMP: u32 = 8;

/// `struct tcp_repair_window`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpRepairWindowRaw {
    /// `snd_wl1`.
    pub snd_wl1: u32,
    /// `snd_wnd`.
    pub snd_wnd: u32,
    /// `max_window`.
    pub max_window: u32,
    /// `rcv_wnd`.
    pub rcv_wnd: u32,
    /// `rcv_wup`.
    pub rcv_wup: u32,
}
const _: () = assert!(size_of::<TcpRepairWindowRaw>() == 20);

/// The leading, stable part of `struct tcp_info` (up to `tcpi_total_retrans`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct TcpInfo {
    /// `tcpi_state` (`TCP_ESTABLISHED` = 1, ...).
    pub state: u8,
    /// `tcpi_ca_state`.
    pub ca_state: u8,
    /// `tcpi_retransmits`.
    pub retransmits: u8,
    /// `tcpi_probes`.
    pub probes: u8,
    /// `tcpi_backoff`.
    pub backoff: u8,
    /// `tcpi_options` (`TCPI_OPT_*`).
    pub options: u8,
    /// `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4` (send scale in the low nibble).
    pub wscale: u8,
    /// `tcpi_delivery_rate_app_limited:1, tcpi_fastopen_client_fail:2`.
    pub flags: u8,
    /// `tcpi_rto`.
    pub rto: u32,
    /// `tcpi_ato`.
    pub ato: u32,
    /// `tcpi_snd_mss`.
    pub snd_mss: u32,
    /// `tcpi_rcv_mss`.
    pub rcv_mss: u32,
    /// `tcpi_unacked` (listeners: accept-queue length).
    pub unacked: u32,
    /// `tcpi_sacked` (listeners: backlog).
    pub sacked: u32,
    /// `tcpi_lost`.
    pub lost: u32,
    /// `tcpi_retrans`.
    pub retrans: u32,
    /// `tcpi_fackets`.
    pub fackets: u32,
    /// `tcpi_last_data_sent`.
    pub last_data_sent: u32,
    /// `tcpi_last_ack_sent`.
    pub last_ack_sent: u32,
    /// `tcpi_last_data_recv`.
    pub last_data_recv: u32,
    /// `tcpi_last_ack_recv`.
    pub last_ack_recv: u32,
    /// `tcpi_pmtu`.
    pub pmtu: u32,
    /// `tcpi_rcv_ssthresh`.
    pub rcv_ssthresh: u32,
    /// `tcpi_rtt`.
    pub rtt: u32,
    /// `tcpi_rttvar`.
    pub rttvar: u32,
    /// `tcpi_snd_ssthresh`.
    pub snd_ssthresh: u32,
    /// `tcpi_snd_cwnd`.
    pub snd_cwnd: u32,
    /// `tcpi_advmss`.
    pub advmss: u32,
    /// `tcpi_reordering`.
    pub reordering: u32,
    /// `tcpi_rcv_rtt`.
    pub rcv_rtt: u32,
    /// `tcpi_rcv_space`.
    pub rcv_space: u32,
    /// `tcpi_total_retrans`.
    pub total_retrans: u32,
    /// `tcpi_pacing_rate`.
    pub pacing_rate: u64,
    /// `tcpi_max_pacing_rate`.
    pub max_pacing_rate: u64,
    /// `tcpi_bytes_acked`.
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`.
    pub bytes_received: u64,
    /// `tcpi_segs_out`.
    pub segs_out: u32,
    /// `tcpi_segs_in`.
    pub segs_in: u32,
    /// `tcpi_notsent_bytes` (Linux 4.6): `write_seq - snd_nxt`, what
    /// `SIOCOUTQNSD` reports for a connection.
    pub notsent_bytes: u32,
    /// `tcpi_min_rtt`.
    pub min_rtt: u32,
}
const _: () = assert!(size_of::<TcpInfo>() == 152);

/// Bytes of [`TcpInfo`] up to and including `notsent_bytes`.
pub const TCP_INFO_NOTSENT_LEN: usize = 148;

/// `TCPI_OPT_TIMESTAMPS`.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
/// `TCPI_OPT_SACK`.
pub const TCPI_OPT_SACK: u8 = 2;
/// `TCPI_OPT_WSCALE`.
pub const TCPI_OPT_WSCALE: u8 = 4;
/// `TCPI_OPT_USEC_TS`: the timestamp clock counts microseconds (Linux >= 6.7).
pub const TCPI_OPT_USEC_TS: u8 = 64;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `setsockopt(fd, level, name, &val, sizeof val)` for any plain value.
fn setsockopt_raw<T: Copy>(
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
fn setsockopt_bytes(
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
fn getsockopt_pod<T: Copy + Default>(
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

/// Set `TCP_REPAIR`.
#[doc(alias = "TCP_REPAIR")]
pub fn tcp_repair(fd: BorrowedFd<'_>, mode: RepairMode) -> io::Result<()> {
    let val: i32 = match mode {
        RepairMode::On => 1,
        RepairMode::Off => 0,
        RepairMode::OffNoWindowProbe => -1,
    };
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, val)
}

/// Select the queue later calls act on: `TCP_REPAIR_QUEUE`.
#[doc(alias = "TCP_REPAIR_QUEUE")]
pub fn set_repair_queue(fd: BorrowedFd<'_>, q: TcpQueue) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, q as i32)
}

/// Read the selected queue's sequence: `getsockopt(TCP_QUEUE_SEQ)` (`write_seq`
/// for the send queue, `rcv_nxt` for the receive queue).
#[doc(alias = "TCP_QUEUE_SEQ")]
pub fn queue_seq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt_pod::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ).map(|(v, _)| v)
}

/// Set the selected queue's initial sequence (socket still closed): `setsockopt(TCP_QUEUE_SEQ)`.
#[doc(alias = "TCP_QUEUE_SEQ")]
pub fn set_queue_seq(fd: BorrowedFd<'_>, seq: u32) -> io::Result<()> {
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, &seq)
}

/// `setsockopt(TCP_REPAIR_OPTIONS)`: the options negotiated in the handshake.
#[doc(alias = "TCP_REPAIR_OPTIONS")]
pub fn set_repair_options(fd: BorrowedFd<'_>, opts: &[TcpRepairOpt]) -> io::Result<()> {
    // SAFETY: `opts` is a live slice of repr(C) structs; the kernel reads exactly its byte length.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            opts.as_ptr().cast(),
            size_of_val(opts) as libc::socklen_t,
        )
    };
    cvt(ret).map(drop)
}

/// `getsockopt(TCP_REPAIR_WINDOW)` (Linux >= 4.8; ENOPROTOOPT before).
#[doc(alias = "TCP_REPAIR_WINDOW")]
pub fn repair_window(fd: BorrowedFd<'_>) -> io::Result<TcpRepairWindowRaw> {
    getsockopt_pod::<TcpRepairWindowRaw>(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW)
        .map(|(v, _)| v)
}

/// `setsockopt(TCP_REPAIR_WINDOW)`.
#[doc(alias = "TCP_REPAIR_WINDOW")]
pub fn set_repair_window(fd: BorrowedFd<'_>, w: &TcpRepairWindowRaw) -> io::Result<()> {
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, w)
}

/// `getsockopt(TCP_TIMESTAMP)`: the connection's timestamp clock now.
#[doc(alias = "TCP_TIMESTAMP")]
pub fn tcp_timestamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt_pod::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP).map(|(v, _)| v)
}

/// `CLOCK_MONOTONIC` in milliseconds, wrapping as the kernel's TCP clock
/// (`tcp_clock_ms`, which millisecond timestamp clocks add an offset to).
pub fn monotonic_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    (ns / 1_000_000) as u32
}

/// `setsockopt(TCP_TIMESTAMP)`: set the offset so the clock reads `ts` now.
#[doc(alias = "TCP_TIMESTAMP")]
pub fn set_tcp_timestamp(fd: BorrowedFd<'_>, ts: u32) -> io::Result<()> {
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, &ts)
}

/// `getsockopt(TCP_INFO)` (the leading part, see [`TcpInfo`]).
#[doc(alias = "TCP_INFO")]
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    tcp_info_len(fd).map(|(info, _)| info)
}

/// [`tcp_info`] and the number of bytes the kernel filled (older kernels
/// fill less; the fields beyond are zero).
pub fn tcp_info_len(fd: BorrowedFd<'_>) -> io::Result<(TcpInfo, usize)> {
    let (info, len) = getsockopt_pod::<TcpInfo>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if len < 8 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short TCP_INFO"));
    }
    Ok((info, len))
}

/// `getsockopt(TCP_MAXSEG)`.
#[doc(alias = "TCP_MAXSEG")]
pub fn tcp_maxseg(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG).map(|v| v as u32)
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
    // SAFETY: `buf` is a live writable slice of the length passed.
    let ret = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT | extra,
        )
    };
    cvt_size(ret)
}

/// `recvfrom(fd, buf, MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC)`: the datagram's
/// full length and its sender.
#[doc(alias = "recvfrom")]
pub fn peek_from(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<SocketAddr>)> {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `buf` and `ss` are live and writable for the lengths passed.
    let ret = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    let n = cvt_size(ret)?;
    Ok((n, from_storage(&ss)))
}

/// `send(fd, buf, flags)`.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice of the length passed; the kernel only reads it.
    let ret = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    };
    cvt_size(ret)
}

/// `sendto(fd, buf, 0, addr)`.
#[doc(alias = "sendto")]
pub fn send_to(fd: BorrowedFd<'_>, buf: &[u8], addr: &SocketAddr) -> io::Result<usize> {
    let (ss, len) = to_storage(addr);
    // SAFETY: `buf` and `ss` are live; `len` is the valid length of the address in `ss`.
    let ret = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    cvt_size(ret)
}

/// `socket(domain, type | SOCK_CLOEXEC, protocol)`.
pub fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall, no pointers.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The address family constant of a socket address.
pub fn family_of(addr: &SocketAddr) -> libc::c_int {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn to_storage(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe {
                (&mut ss as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe {
                (&mut ss as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; storage is aligned for it.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6; storage is aligned for it.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `bind(fd, addr)`.
pub fn bind(fd: BorrowedFd<'_>, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = to_storage(addr);
    // SAFETY: `ss` is live and holds a valid address of `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(drop)
}

/// `connect(fd, addr)`.
pub fn connect(fd: BorrowedFd<'_>, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = to_storage(addr);
    // SAFETY: `ss` is live and holds a valid address of `len` bytes.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(drop)
}

/// `listen(fd, backlog)`.
pub fn listen(fd: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) }).map(drop)
}

/// `shutdown(fd, how)`.
pub fn shutdown(fd: BorrowedFd<'_>, how: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), how) }).map(drop)
}

fn name_of(fd: BorrowedFd<'_>, peer: bool) -> io::Result<Option<SocketAddr>> {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    // SAFETY: `ss` is live and writable for `len` bytes.
    let ret = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), p, &mut len)
        }
    };
    match cvt(ret) {
        Ok(_) => Ok(from_storage(&ss)),
        Err(e) if peer && e.raw_os_error() == Some(libc::ENOTCONN) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `getsockname(fd)`.
#[doc(alias = "getsockname")]
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<Option<SocketAddr>> {
    name_of(fd, false)
}

/// `getpeername(fd)`; `None` when not connected.
#[doc(alias = "getpeername")]
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<Option<SocketAddr>> {
    name_of(fd, true)
}

/// `fcntl(F_GETFL)` has `O_NONBLOCK`?
pub fn is_nonblocking(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: plain fcntl query on a valid fd.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(fl & libc::O_NONBLOCK != 0)
}

/// `fcntl(F_SETFL)` toggling `O_NONBLOCK`.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: plain fcntl query on a valid fd.
    let fl = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let fl = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    // SAFETY: plain fcntl update on a valid fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl) }).map(drop)
}

/// `poll` one fd for `events` up to `timeout_ms`; returns the revents.
#[doc(alias = "poll")]
pub fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout_ms: i32,
) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `p` is one live pollfd.
    cvt(unsafe { libc::poll(&mut p, 1, timeout_ms) })?;
    Ok(p.revents)
}

/// `pidfd_open(pid, 0)` (Linux >= 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall, no pointers.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// `pidfd_getfd(pidfd, targetfd, 0)` (Linux >= 5.6): a duplicate of another
/// process's fd (needs `PTRACE_MODE_ATTACH_REALCREDS` over it).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; `target` names an fd in the other process, not ours.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd in our table that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// Raise `RLIMIT_NOFILE`'s soft limit to its hard limit; returns the new limit.
#[doc(alias = "setrlimit")]
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a live rlimit the kernel writes.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) })?;
    r.rlim_cur = r.rlim_max;
    // SAFETY: `r` is a live, initialised rlimit the kernel reads.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) })?;
    Ok(r.rlim_cur)
}

/// `setns(fd, CLONE_NEWNET)` for the calling thread.
#[doc(alias = "setns")]
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// `unshare(CLONE_NEWNET)`: the calling thread (only it) moves to a new,
/// empty network namespace.
#[doc(alias = "unshare")]
pub(crate) fn unshare_net() -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// `mount(src, dst, NULL, MS_BIND | extra, NULL)`: bind-mount `src` on `dst`.
#[doc(alias = "mount")]
pub(crate) fn bind_mount(
    src: &std::path::Path,
    dst: &std::path::Path,
    recursive: bool,
) -> io::Result<()> {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    nix::mount::mount(Some(src), dst, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
}

/// `mount(NULL, path, NULL, MS_SHARED | MS_REC, NULL)`: mounts under
/// `path` propagate to (and from) peer mount namespaces. `EINVAL` when
/// `path` is not a mount point.
#[doc(alias = "mount")]
pub(crate) fn make_shared(path: &std::path::Path) -> io::Result<()> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// `umount2(path, MNT_DETACH)`: detach the mount at `path` now, free it
/// once nothing uses it.
#[doc(alias = "umount2")]
pub(crate) fn detach_mount(path: &std::path::Path) -> io::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// Make `cmd` enter the network namespace `ns` in the child before `exec`.
pub fn command_in_netns(cmd: &mut std::process::Command, ns: OwnedFd) {
    use std::os::unix::process::CommandExt;
    let raw = ns.as_raw_fd();
    // The fd must stay open until the child has forked: keep it alive in the closure.
    let keep = std::sync::Arc::new(ns);
    // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an
    // fd kept open by `keep` for as long as the Command lives.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            if libc::setns(raw, libc::CLONE_NEWNET) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`: CPU time of the calling thread
/// (precise, unlike `/proc` figures updated at scheduler ticks); for benchmarks.
pub fn thread_cpu_time() -> io::Result<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live timespec the kernel writes.
    cvt(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) })?;
    Ok(std::time::Duration::new(
        ts.tv_sec as u64,
        ts.tv_nsec as u32,
    ))
}

/// `setpriority(PRIO_PROCESS, 0, 19)`: the calling thread gets the lowest CPU
/// priority (Linux nice values are per thread).
#[doc(alias = "setpriority")]
pub fn lowest_thread_priority() -> io::Result<()> {
    // SAFETY: setpriority takes plain integers; `who` 0 is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
