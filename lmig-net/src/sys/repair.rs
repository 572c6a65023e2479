//! TCP repair (`TCP_REPAIR`, Linux >= 3.5): the socket options that read and
//! write a connection's hidden state, as CRIU's `soccr` uses them. No crate
//! offers these; they stay raw, each a safe function over one option.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::time::{ClockId, clock_gettime};

use super::errno::cvt;
use super::sock::{getsockopt_pod, setsockopt_int, setsockopt_raw};

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
    // The kernel's value, named for completeness; lmig always selects a queue.
    #[allow(dead_code)]
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
    // CLOCK_MONOTONIC always exists; 0 is never reached in practice.
    let ns = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    (ns / 1_000_000) as u32
}

/// `CLOCK_REALTIME` in milliseconds, wrapping: the clock two hosts share
/// (as far as they keep time alike), which a plan's timestamp clocks are
/// given against.
pub fn realtime_ms() -> u32 {
    // CLOCK_REALTIME always exists.
    let ns = clock_gettime(ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    (ns / 1_000_000) as u32
}

/// `setsockopt(TCP_TIMESTAMP)`: set the offset so the clock reads `ts` now.
#[doc(alias = "TCP_TIMESTAMP")]
pub fn set_tcp_timestamp(fd: BorrowedFd<'_>, ts: u32) -> io::Result<()> {
    setsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, &ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers of `<linux/tcp.h>` and `<net/tcp.h>`, as the kernel has them.
    #[test]
    fn numbers_match_the_kernel_headers() {
        // TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE (not in libc for Linux).
        assert_eq!(
            (
                TcpQueue::None as i32,
                TcpQueue::Recv as i32,
                TcpQueue::Send as i32
            ),
            (0, 1, 2)
        );
        assert_eq!(libc::TCP_REPAIR, 19);
        assert_eq!(libc::TCP_REPAIR_QUEUE, 20);
        assert_eq!(libc::TCP_QUEUE_SEQ, 21);
        assert_eq!(libc::TCP_REPAIR_OPTIONS, 22);
        assert_eq!(libc::TCP_TIMESTAMP, 24);
        assert_eq!(libc::TCP_REPAIR_WINDOW, 29);
        assert_eq!(
            (
                TCPOPT_MAXSEG,
                TCPOPT_WINDOW,
                TCPOPT_SACK_PERM,
                TCPOPT_TIMESTAMP
            ),
            (2, 3, 4, 8)
        );
        assert_eq!(size_of::<TcpRepairOpt>(), 8);
        assert_eq!(size_of::<TcpRepairWindowRaw>(), 20);
    }

    #[test]
    fn the_tcp_clock_moves_forward() {
        let a = monotonic_ms();
        std::thread::sleep(std::time::Duration::from_millis(3));
        assert!(monotonic_ms().wrapping_sub(a) >= 3);
    }
}
