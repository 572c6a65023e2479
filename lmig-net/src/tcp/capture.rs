//! Capture of established TCP connections in repair mode: their static
//! settings, sequence numbers, window, timestamp and queues.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use bytes::Bytes;
use lmig_core::model::{SockOpts, TcpConnState, TcpOpts, TcpRepairWindow};

use crate::arena::QueueArena;
use crate::error::{NetError, Result};
use crate::opts;
use crate::sys::{self, TcpQueue};

use super::{TCP_CLOSE, describe_conn, state_kind};

/// Knobs of capture.
#[derive(Clone, Debug, Default)]
pub(crate) struct CaptureCtx {
    pub buffers: bool,
    pub default_cc: Option<String>,
    /// Where queues are read into (shared by the capture threads).
    pub arena: Arc<QueueArena>,
}

/// Peek a whole queue of `len` bytes in one call, into a buffer cut from
/// `arena` (one byte more, to see a queue longer than announced).
fn peek_queue(
    fd: BorrowedFd<'_>,
    len: u32,
    arena: &QueueArena,
    what: &dyn Fn() -> String,
    op: &'static str,
) -> Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let mut buf = arena.take(len as usize + 1);
    let n = sys::peek(fd, &mut buf, 0).map_err(|e| NetError::sys(op, what(), e))?;
    if n != len as usize {
        return Err(NetError::NotMigratable {
            what: what(),
            reason: format!("{op}: peeked {n} bytes, the queue holds {len}"),
        });
    }
    buf.truncate(n);
    Ok(buf.freeze())
}

/// What does not change while a connection lives, or only when the program
/// sets an option: addresses and options. Read before the freeze (at
/// `plan`, or at `freeze` before repair mode, which overrides
/// `SO_REUSEADDR`), so the freeze only reads what the freeze fixes.
#[derive(Clone, Debug)]
pub(crate) struct ConnStatic {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub sock: SockOpts,
    pub tcp: TcpOpts,
    /// The timestamp clock's offset from `CLOCK_MONOTONIC` in ms (it only
    /// changes when set in repair mode): the capture computes the clock
    /// instead of asking for it. At most ~3 ms ahead, never behind.
    pub ts_offset: Option<u32>,
}

/// Read a connection's [`ConnStatic`] (not in repair mode).
pub(crate) fn read_static(fd: BorrowedFd<'_>, id: u64, ctx: &CaptureCtx) -> Result<ConnStatic> {
    let local = sys::local_addr(fd).ok().flatten();
    let peer = sys::peer_addr(fd).ok().flatten();
    let what = || describe_conn(id, local, peer);
    let (Some(local), Some(peer)) = (local, peer) else {
        return Err(NetError::NotMigratable {
            what: what(),
            reason: "not connected".into(),
        });
    };
    let reuse = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .map_err(|e| NetError::sys("getsockopt(SO_REUSEADDR)", what(), e))?
        != 0;
    // The monotonic clock read first: the offset comes out no smaller
    // than the kernel's.
    let mono = sys::monotonic_ms();
    let ts_offset = sys::tcp_timestamp(fd).ok().map(|ts| ts.wrapping_sub(mono));
    Ok(ConnStatic {
        local,
        peer,
        ts_offset,
        sock: opts::read_sock_opts(fd, local.is_ipv6(), reuse, ctx.buffers, &what)?,
        tcp: opts::read_tcp_opts(fd, ctx.default_cc.as_deref(), &what)?,
    })
}

/// Capture an established (or half-closed) connection. The socket must be in
/// repair mode; `st` was read before. Nothing is consumed from the socket;
/// its queues are read into `arena`.
pub(crate) fn capture_established(
    fd: BorrowedFd<'_>,
    id: u64,
    st: &ConnStatic,
    arena: &QueueArena,
) -> Result<TcpConnState> {
    let (local, peer) = (st.local, st.peer);
    let what = || describe_conn(id, Some(local), Some(peer));
    let (info, info_len) =
        sys::tcp_info_len(fd).map_err(|e| NetError::sys("getsockopt(TCP_INFO)", what(), e))?;
    if info.state == TCP_CLOSE {
        return Err(NetError::ConnectionGone { what: what() });
    }
    let state = state_kind(info.state).map_err(|r| NetError::NotMigratable {
        what: what(),
        reason: r.into(),
    })?;
    // `TCP_INFO` carries what `SIOCOUTQNSD` would say (one call less) since Linux 4.6.
    let notsent = (info_len >= sys::TCP_INFO_NOTSENT_LEN).then_some(info.notsent_bytes);
    let mut outq = send_queue_len(fd, &info, notsent, &what)?;
    let mut unsent = match notsent {
        Some(n) => n,
        None => sys::outq_nsd(fd).map_err(|e| NetError::sys("ioctl(SIOCOUTQNSD)", what(), e))?,
    };
    let inq = sys::inq(fd).map_err(|e| NetError::sys("ioctl(SIOCINQ)", what(), e))?;
    if state.fin_sent() {
        // The FIN takes one sequence number in the send queue but carries no byte.
        outq = outq.saturating_sub(1);
        unsent = unsent.saturating_sub(1);
    }
    sys::set_repair_queue(fd, TcpQueue::Recv)
        .map_err(|e| NetError::sys("TCP_REPAIR_QUEUE", what(), e))?;
    let rcv_nxt =
        sys::queue_seq(fd).map_err(|e| NetError::sys("getsockopt(TCP_QUEUE_SEQ)", what(), e))?;
    let recv_queue = peek_queue(fd, inq, arena, &what, "peek receive queue")?;
    sys::set_repair_queue(fd, TcpQueue::Send)
        .map_err(|e| NetError::sys("TCP_REPAIR_QUEUE", what(), e))?;
    let write_seq =
        sys::queue_seq(fd).map_err(|e| NetError::sys("getsockopt(TCP_QUEUE_SEQ)", what(), e))?;
    // The send queue stays selected: the queue choice only matters in repair
    // mode, every capture selects its queue first, and entering repair mode
    // again resets it (one system call less per connection in the freeze).
    let send_queue = peek_queue(fd, outq, arena, &what, "peek send queue")?;

    let rcv_end = if state.fin_received() {
        rcv_nxt.wrapping_sub(1)
    } else {
        rcv_nxt
    };
    let snd_end = if state.fin_sent() {
        write_seq.wrapping_sub(1)
    } else {
        write_seq
    };
    if state.fin_sent() && unsent != 0 {
        // Bytes queued behind our FIN were never sent: restore them as sent
        // (the retransmission timer sends them) so the FIN stays last.
        unsent = 0;
    }
    let mss =
        sys::tcp_maxseg(fd).map_err(|e| NetError::sys("getsockopt(TCP_MAXSEG)", what(), e))?;
    let timestamps_ok = info.options & sys::TCPI_OPT_TIMESTAMPS != 0;
    let timestamp = capture_timestamp(fd, st, &info, &what)?;
    let window = capture_window(fd, rcv_end, &what)?;
    Ok(TcpConnState {
        id,
        local,
        peer,
        state,
        snd_seq: snd_end.wrapping_sub(send_queue.len() as u32),
        rcv_seq: rcv_end.wrapping_sub(recv_queue.len() as u32),
        send_queue,
        unsent_len: unsent,
        recv_queue,
        mss,
        snd_wscale: info.wscale & 0x0f,
        rcv_wscale: info.wscale >> 4,
        wscale_ok: info.options & sys::TCPI_OPT_WSCALE != 0,
        sack_ok: info.options & sys::TCPI_OPT_SACK != 0,
        timestamps_ok,
        timestamp,
        window,
        sock: st.sock.clone(),
        tcp: st.tcp.clone(),
    })
}

/// `SIOCOUTQ` (`write_seq - snd_una`), unless `TCP_INFO` already says it is
/// 0: no segment in flight (`tcpi_unacked`, the retransmission queue's
/// segments: empty means `snd_una == snd_nxt`, a FIN counts one) and no byte
/// unsent (`write_seq == snd_nxt`). Most connections of a busy server are so
/// at the freeze: one system call per connection less.
fn send_queue_len(
    fd: BorrowedFd<'_>,
    info: &sys::TcpInfo,
    notsent: Option<u32>,
    what: &dyn Fn() -> String,
) -> Result<u32> {
    if info.unacked == 0 && notsent == Some(0) {
        return Ok(0);
    }
    sys::outq(fd).map_err(|e| NetError::sys("ioctl(SIOCOUTQ)", what(), e))
}

/// The capture's timestamp phase: the connection's timestamp clock now
/// (0 without timestamps), computed from the offset read before the freeze
/// when the clock counts milliseconds.
fn capture_timestamp(
    fd: BorrowedFd<'_>,
    st: &ConnStatic,
    info: &sys::TcpInfo,
    what: &dyn Fn() -> String,
) -> Result<u32> {
    let timestamps_ok = info.options & sys::TCPI_OPT_TIMESTAMPS != 0;
    Ok(match st.ts_offset {
        _ if !timestamps_ok => 0,
        // The kernel reports a millisecond clock with its lowest bit clear
        // (set means microseconds, also when the value is written back),
        // so the offset may be 1 low: 2 ms more, then that bit cleared.
        Some(off) if info.options & sys::TCPI_OPT_USEC_TS == 0 => {
            sys::monotonic_ms().wrapping_add(off).wrapping_add(2) & !1
        }
        _ => sys::tcp_timestamp(fd)
            .map_err(|e| NetError::sys("getsockopt(TCP_TIMESTAMP)", what(), e))?,
    })
}

/// The capture's window phase: `TCP_REPAIR_WINDOW` (`None` before Linux
/// 4.8), its update point kept inside `rcv_end`.
fn capture_window(
    fd: BorrowedFd<'_>,
    rcv_end: u32,
    what: &dyn Fn() -> String,
) -> Result<Option<TcpRepairWindow>> {
    match sys::repair_window(fd) {
        Ok(w) => {
            let mut w = TcpRepairWindow {
                snd_wl1: w.snd_wl1,
                snd_wnd: w.snd_wnd,
                max_window: w.max_window,
                rcv_wnd: w.rcv_wnd,
                rcv_wup: w.rcv_wup,
            };
            // The restored socket's rcv_nxt excludes the peer's FIN until it
            // is injected again: keep the window update point inside it.
            if (w.rcv_wup.wrapping_sub(rcv_end) as i32) > 0 {
                w.rcv_wup = rcv_end;
                w.rcv_wnd = w.rcv_wnd.wrapping_add(1);
            }
            Ok(Some(w))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(None),
        Err(e) => Err(NetError::sys("getsockopt(TCP_REPAIR_WINDOW)", what(), e)),
    }
}
