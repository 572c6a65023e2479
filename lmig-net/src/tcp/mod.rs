//! TCP: capture an established connection or a listener into a record, and
//! restore it into a new socket with TCP repair.
//!
//! # Established connections
//!
//! Capture (socket already in repair mode, see [`crate::RepairGuard`]):
//! `TCP_INFO` (state, negotiated options, window scales), `SIOCOUTQ`,
//! `SIOCOUTQNSD`, `SIOCINQ`, `TCP_QUEUE_SEQ` of both queues, both queues
//! peeked with `MSG_PEEK` (nothing is consumed: an abort loses nothing),
//! each in one call into memory written before the freeze (the estimate of
//! [`crate::NetSource::queued_bytes`] sizes it: pages faulted in during the
//! freeze were most of the capture's cost with megabytes queued),
//! `TCP_MAXSEG` (the MSS clamp in repair mode), `TCP_TIMESTAMP`,
//! `TCP_REPAIR_WINDOW` and the socket and TCP options of the model.
//!
//! Restore, in three steps so that the first can run before the freeze:
//! 1. *prepare*: `socket`, `TCP_REPAIR` on, `bind` (repair forces the reuse of
//!    an address in use; when the address is not local yet, `IP_TRANSPARENT`
//!    lets the socket bind and connect before the address handoff);
//! 2. *restore*: both `TCP_QUEUE_SEQ`, `connect` (in repair mode: no SYN, the
//!    socket is established at once — the original 4-tuple must be free, i.e.
//!    the source closed or on another host), `TCP_REPAIR_OPTIONS`,
//!    `TCP_TIMESTAMP`, the received-unread bytes into the receive queue, the
//!    sent-unacknowledged bytes into the send queue (they are retransmitted
//!    if the peer lacks them), a FIN we had sent, `TCP_REPAIR_WINDOW` (the
//!    socket and TCP options are the sink's: set before, from the plan);
//!    a connection with a send queue gets `SO_SNDBUF` (forced) large enough
//!    for all of it — the new socket's buffer starts small where the source's
//!    had been grown by auto-tuning — which locks the size for that connection;
//! 3. *activate* (after `Commit`): a FIN the peer had sent is injected, repair
//!    mode is left (with or without a window probe, see
//!    [`crate::RepairExit`]), `SO_REUSEADDR` re-applied (leaving repair mode
//!    clears it), and the never-sent bytes are written normally (or after
//!    activation, on a thread of their own: [`crate::UnsentTails`]).
//!
//! # Half-closed connections
//!
//! * FIN sent (`FIN_WAIT1`, `FIN_WAIT2`, `CLOSING`, `LAST_ACK`): the FIN is put
//!   back as already sent (`shutdown(SHUT_WR)` in repair mode with the send
//!   queue selected), so it is retransmitted until acknowledged; never-sent
//!   bytes queued before a FIN are restored as sent (retransmitted by timer).
//! * FIN received (`CLOSE_WAIT`, `LAST_ACK`, `CLOSING`): the receive sequence
//!   excludes the FIN; at activation a FIN segment from the peer's address is
//!   injected through a raw socket (needs the local address to be local by
//!   then), so the program reads the pending bytes and then end-of-file.
//! * Any other state (`SYN_SENT`, `TIME_WAIT`, `CLOSE` after a reset, ...) is
//!   reported as [`NetError::NotMigratable`] with the state's name.
//!
//! # Listeners
//!
//! A listening socket cannot enter repair mode. Its address, backlog
//! (`tcpi_sacked`) and options are captured; the destination binds a new
//! socket in repair mode (forced reuse) and listens at restore, before
//! `Commit`: after it nothing is left that can refuse.
//! Connections that completed the handshake but were not accepted by the
//! program stay on the source: the source closes its listener at release,
//! which resets them (as a crashed server would); their clients reconnect to
//! the destination. A program that cares accepts its backlog before the freeze.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmig_core::model::{SocketPrep, TcpConnState, TcpStateKind};

use crate::error::{NetError, Result};
use crate::inject::{self, Injector};
use crate::repair::{self, RepairExit};
use crate::sys::{self, TcpQueue};

mod capture;

pub(crate) use capture::{CaptureCtx, ConnStatic, capture_established, read_static};

/// "TCP connection 7 (a -> b)", the name errors use.
pub fn describe_conn(id: u64, local: Option<SocketAddr>, peer: Option<SocketAddr>) -> String {
    let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
    format!("TCP connection {id} ({} -> {})", show(local), show(peer))
}

/// Kernel state number to the model's close-handshake state.
/// `TCP_CLOSE`: after a reset, or a close that completed.
const TCP_CLOSE: u8 = 7;

pub(crate) fn state_kind(state: u8) -> std::result::Result<TcpStateKind, &'static str> {
    Ok(match state {
        1 => TcpStateKind::Established,
        4 => TcpStateKind::FinWait1,
        5 => TcpStateKind::FinWait2,
        8 => TcpStateKind::CloseWait,
        9 => TcpStateKind::LastAck,
        11 => TcpStateKind::Closing,
        2 => return Err("SYN_SENT: the handshake has not completed"),
        3 => return Err("SYN_RECV: the handshake has not completed"),
        6 => return Err("TIME_WAIT: the connection is over"),
        7 => return Err("CLOSE: the connection was closed or reset"),
        10 => return Err("LISTEN: a listener, not a connection"),
        _ => return Err("unknown TCP state"),
    })
}

/// How far ahead of the captured value a restored connection's timestamp
/// clock starts, in milliseconds.
///
/// The source socket keeps its clock running and may still send after the
/// capture: delayed ACKs, tail loss probes and retransmissions run in repair
/// mode too. A peer that saw a later timestamp from the source than the
/// destination's first segments carry drops those as old (PAWS) until the
/// destination retransmits, after the restored socket's initial RTO of 1 s.
/// Starting ahead covers a source that sends for up to this long after its
/// capture (plus the time from restore to activation, which the clock runs
/// through).
///
/// The lead is not free, so it is short: until the peer has seen a segment
/// of the destination it echoes the source's timestamps, and an ACK that
/// takes its RTT sample from the echo (Karn's rule: retransmitted or
/// partly acknowledged data) measures the lead as round-trip time. With
/// the 5 s lead this used to be, one such sample set the RTO to 15 s and the
/// tail loss probe to 10 s: a segment lost after the move stalled the
/// connection for that long (`tcp_unsent_tail_written_after_activation_keeps_order`
/// failed so in 1 of 20 runs). A sample of 100 ms costs an RTO of ~300 ms.
pub const TIMESTAMP_LEAD_MS: u32 = 100;

/// Bind `fd` to `local`, falling back to `IP_TRANSPARENT` when the address is
/// not (yet) local here.
pub(crate) fn bind_maybe_transparent(
    fd: BorrowedFd<'_>,
    local: &SocketAddr,
    what: &dyn Fn() -> String,
) -> Result<()> {
    match sys::bind(fd, local) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            let (level, name) = if local.is_ipv4() {
                (libc::SOL_IP, libc::IP_TRANSPARENT)
            } else {
                (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
            };
            sys::setsockopt_int(fd, level, name, 1)
                .map_err(|e| NetError::sys("setsockopt(IP_TRANSPARENT)", what(), e))?;
            sys::bind(fd, local).map_err(|e| NetError::sys("bind", what(), e))
        }
        Err(e) => Err(NetError::sys("bind", what(), e)),
    }
}

/// Before the freeze: a new socket in repair mode bound to the connection's
/// local address.
pub(crate) fn prepare_established(prep: &SocketPrep, flags: i32) -> Result<OwnedFd> {
    let what = || describe_conn(prep.id, Some(prep.local), prep.peer);
    let fd = sys::socket(sys::family_of(&prep.local), libc::SOCK_STREAM | flags, 0)
        .map_err(|e| NetError::sys("socket", what(), e))?;
    repair::repair_on(fd.as_fd(), what)?;
    bind_maybe_transparent(fd.as_fd(), &prep.local, &what)?;
    sys::set_repair_queue(fd.as_fd(), TcpQueue::Send)
        .map_err(|e| NetError::sys("TCP_REPAIR_QUEUE", what(), e))?;
    Ok(fd)
}

/// `connect` in repair mode. `EADDRNOTAVAIL` means the original 4-tuple is
/// still in use on this host: when source and destination share a host, the
/// source's socket may outlive its `close` for a moment (another process
/// forked by the program holds the fd until its `exec`). Retried for up to
/// 100 ms, then reported.
fn connect_when_free(fd: BorrowedFd<'_>, peer: &SocketAddr) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(100);
    loop {
        match sys::connect(fd, peer) {
            Err(e)
                if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            r => return r,
        }
    }
}

/// What activation still has to do for a restored connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct PendingActivation {
    /// The connection's addresses, for errors.
    addrs: Option<(SocketAddr, SocketAddr)>,
    /// A FIN to inject: (from, to, seq, ack, window field).
    fin: Option<(SocketAddr, SocketAddr, u32, u32, u16)>,
    /// Bytes never sent on the source, written after repair mode.
    unsent: Bytes,
    /// Whether `RepairExit::Auto` sends the window probe.
    wants_probe: bool,
    /// The captured send window, when the restore set it to 0 to learn it
    /// from the probe (see `send_window`; 0: not so): put back at
    /// activation if no probe is sent.
    snd_wnd: u32,
    reuse_addr: bool,
}

/// Write `data` into repair queue `q`, selecting it unless `selected` says
/// it is already (one system call per connection less in the freeze).
fn write_queue(
    fd: BorrowedFd<'_>,
    q: TcpQueue,
    selected: &mut TcpQueue,
    data: &[u8],
    what: &dyn Fn() -> String,
    op: &'static str,
) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    if *selected != q {
        sys::set_repair_queue(fd, q).map_err(|e| NetError::sys("TCP_REPAIR_QUEUE", what(), e))?;
        *selected = q;
    }
    let mut off = 0;
    let mut chunk = data.len();
    // Bounded: each round either writes or halves the chunk (the kernel
    // allocates one linear buffer per call in repair mode and may refuse big ones).
    for _ in 0..(64 + data.len() / 1024) {
        if off == data.len() {
            return Ok(());
        }
        let end = (off + chunk).min(data.len());
        match sys::send(fd, &data[off..end], libc::MSG_DONTWAIT) {
            Ok(n) if n > 0 => off += n,
            Ok(_) => {
                return Err(NetError::sys(
                    op,
                    what(),
                    std::io::Error::other("zero-length write"),
                ));
            }
            Err(e)
                if chunk > 1024
                    && matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EAGAIN)) =>
            {
                chunk /= 2
            }
            Err(e) => return Err(NetError::sys(op, what(), e)),
        }
    }
    if off == data.len() {
        Ok(())
    } else {
        Err(NetError::sys(
            op,
            what(),
            std::io::Error::other("queue not fully restored"),
        ))
    }
}

/// Restore the frozen state into a prepared socket (repair mode, bound).
/// The socket stays in repair mode; the peer hears nothing yet.
/// The socket and TCP options are not set here: the caller sets them
/// before (see `NetSink`), most before the freeze. Nor is the timestamp
/// clock when `clock_set` (the caller started it before the freeze, and it
/// reads at least `TIMESTAMP_LEAD_MS` past the captured clock).
pub(crate) fn restore_established(
    fd: BorrowedFd<'_>,
    c: &TcpConnState,
    clock_set: bool,
) -> Result<PendingActivation> {
    let what = || describe_conn(c.id, Some(c.local), Some(c.peer));
    let e = |op: &'static str| move |err| NetError::sys(op, what(), err);
    // `prepare_established` left the send queue selected.
    sys::set_queue_seq(fd, c.snd_seq).map_err(e("setsockopt(TCP_QUEUE_SEQ send)"))?;
    sys::set_repair_queue(fd, TcpQueue::Recv).map_err(e("TCP_REPAIR_QUEUE"))?;
    // Nothing below selects another queue until the queues are written.
    let mut selected = TcpQueue::Recv;
    sys::set_queue_seq(fd, c.rcv_seq).map_err(e("setsockopt(TCP_QUEUE_SEQ recv)"))?;
    connect_when_free(fd, &c.peer).map_err(e("connect (repair)"))?;

    let (ropts, n) = repair_options(c);
    sys::set_repair_options(fd, &ropts[..n]).map_err(e("setsockopt(TCP_REPAIR_OPTIONS)"))?;
    if c.timestamps_ok && !clock_set {
        let ts = c.timestamp.wrapping_add(TIMESTAMP_LEAD_MS);
        sys::set_tcp_timestamp(fd, ts).map_err(e("setsockopt(TCP_TIMESTAMP)"))?;
    }
    make_room_for_send_queue(fd, c, &what)?;
    write_queue(
        fd,
        TcpQueue::Recv,
        &mut selected,
        &c.recv_queue,
        &what,
        "restore receive queue",
    )?;
    let sent = c.send_queue.len() - c.unsent_len as usize;
    write_queue(
        fd,
        TcpQueue::Send,
        &mut selected,
        &c.send_queue[..sent],
        &what,
        "restore send queue",
    )?;
    if c.state.fin_sent() {
        // With the send queue selected the FIN is queued as already sent.
        if selected != TcpQueue::Send {
            sys::set_repair_queue(fd, TcpQueue::Send).map_err(e("TCP_REPAIR_QUEUE"))?;
        }
        sys::shutdown(fd, libc::SHUT_WR).map_err(e("shutdown(SHUT_WR) in repair mode"))?;
    }
    // See `send_window`: a connection with bytes to send learns the peer's
    // window from the probe's answer instead.
    let learn_window = !c.send_queue.is_empty() || c.state.fin_sent();
    let captured = c.window.map(|w| sys::TcpRepairWindowRaw {
        snd_wl1: w.snd_wl1,
        snd_wnd: w.snd_wnd,
        max_window: w.max_window,
        rcv_wnd: w.rcv_wnd,
        rcv_wup: w.rcv_wup,
    });
    if let Some(w) = captured {
        let raw = sys::TcpRepairWindowRaw {
            snd_wnd: send_window(w.snd_wnd, learn_window),
            ..w
        };
        sys::set_repair_window(fd, &raw).map_err(e("setsockopt(TCP_REPAIR_WINDOW)"))?;
    }

    let fin = c.state.fin_received().then(|| {
        let rcv_end = c.rcv_seq.wrapping_add(c.recv_queue.len() as u32);
        let wnd = c.window.map(|w| w.snd_wnd).unwrap_or(65_535);
        let shift = if c.wscale_ok { c.snd_wscale } else { 0 };
        let field = (wnd >> shift).min(65_535) as u16;
        (c.peer, c.local, rcv_end, c.snd_seq, field)
    });
    Ok(PendingActivation {
        addrs: Some((c.local, c.peer)),
        fin,
        unsent: c.send_queue.slice(sent..),
        wants_probe: learn_window,
        snd_wnd: captured.filter(|_| learn_window).map_or(0, |w| w.snd_wnd),
        reuse_addr: c.sock.reuse_addr,
    })
}

/// The send window to restore: the captured one, or 0 for a connection that
/// learns the peer's window from the window probe's answer (`learn`: it has
/// bytes to send, so it probes when it leaves repair mode).
///
/// Why: `connect` in repair mode arms the kernel's header prediction with
/// the send window it has then, 0 (`tcp_finish_connect` calls
/// `__tcp_fast_path_on(tp, snd_wnd)` while `snd_wscale` is still 0), and
/// `TCP_REPAIR_WINDOW` changes `snd_wnd` without re-arming it. An ACK that
/// matches the prediction — a zero window — and acknowledges new data takes
/// the fast path, which assumes the window did not change: the socket keeps
/// the captured window while the peer's is closed, sends into it, and the
/// peer drops those segments (they need a retransmission timeout). This is
/// the common case with queued data: the peer acknowledged during the freeze
/// what the source had sent, and its window closed. Restored as 0, the
/// prediction is right: a zero-window answer leaves 0, any other window
/// takes the slow path, which updates the window and the prediction.
fn send_window(captured: u32, learn: bool) -> u32 {
    if learn { 0 } else { captured }
}

/// The options negotiated in the handshake, as `TCP_REPAIR_OPTIONS` wants
/// them (the first `n` of the array).
fn repair_options(c: &TcpConnState) -> ([sys::TcpRepairOpt; 4], usize) {
    let mut ropts = [sys::TcpRepairOpt::default(); 4];
    let mut n = 0;
    if c.sack_ok {
        ropts[n] = sys::TcpRepairOpt {
            opt_code: sys::TCPOPT_SACK_PERM,
            opt_val: 0,
        };
        n += 1;
    }
    if c.wscale_ok {
        ropts[n] = sys::TcpRepairOpt {
            opt_code: sys::TCPOPT_WINDOW,
            opt_val: u32::from(c.snd_wscale) | (u32::from(c.rcv_wscale) << 16),
        };
        n += 1;
    }
    if c.timestamps_ok {
        ropts[n] = sys::TcpRepairOpt {
            opt_code: sys::TCPOPT_TIMESTAMP,
            opt_val: 0,
        };
        n += 1;
    }
    ropts[n] = sys::TcpRepairOpt {
        opt_code: sys::TCPOPT_MAXSEG,
        opt_val: c.mss,
    };
    n += 1;
    (ropts, n)
}

/// The whole send queue must fit the new socket's send buffer, which starts
/// small (auto-tuning grew the source's): make room, beyond `wmem_max` if
/// needed (`SO_SNDBUFFORCE`). This locks the size for this connection; a
/// size the program set is left alone.
fn make_room_for_send_queue(
    fd: BorrowedFd<'_>,
    c: &TcpConnState,
    what: &dyn Fn() -> String,
) -> Result<()> {
    let e = |op: &'static str| move |err| NetError::sys(op, what(), err);
    if !c.send_queue.is_empty() && c.sock.sndbuf == 0 {
        let cur = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)
            .map_err(e("getsockopt(SO_SNDBUF)"))?;
        let need = c.send_queue.len() + (64 << 10);
        if (cur as usize) < 2 * need {
            sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, need as i32)
                .map_err(e("setsockopt(SO_SNDBUFFORCE)"))?;
        }
    }
    Ok(())
}

/// After `Commit`: inject a received FIN, leave repair mode, write
/// never-sent bytes (unless `defer_unsent`: then the caller writes
/// [`PendingActivation::take_unsent`] before the program may write).
pub(crate) fn activate_established(
    fd: BorrowedFd<'_>,
    id: u64,
    p: &PendingActivation,
    exit: RepairExit,
    inj: &mut Injector,
    defer_unsent: bool,
) -> Result<()> {
    let what = || describe_conn(id, p.addrs.map(|a| a.0), p.addrs.map(|a| a.1));
    if let Some((from, to, seq, ack, win)) = p.fin {
        let pkt = inject::tcp_packet(from, to, seq, ack, inject::TH_FIN | inject::TH_ACK, win);
        inj.inject(to, &pkt, &what)?;
    }
    let probe = match exit {
        RepairExit::WindowProbe => true,
        RepairExit::NoWindowProbe => false,
        RepairExit::Auto => p.wants_probe,
    };
    if !probe && p.snd_wnd != 0 {
        // No answer will tell the window: the captured one, stale prediction
        // and all, beats none (`send_window`). The rest as it is now (the
        // socket may have received since the restore).
        let mut w = sys::repair_window(fd)
            .map_err(|e| NetError::sys("getsockopt(TCP_REPAIR_WINDOW)", what(), e))?;
        if w.snd_wnd == 0 {
            w.snd_wnd = p.snd_wnd;
            sys::set_repair_window(fd, &w)
                .map_err(|e| NetError::sys("setsockopt(TCP_REPAIR_WINDOW)", what(), e))?;
        }
    }
    repair::leave_repair(fd, probe, p.reuse_addr)
        .map_err(|e| NetError::sys("TCP_REPAIR off", what(), e))?;
    if defer_unsent {
        return Ok(());
    }
    write_unsent(fd, &p.unsent, &what)
}

impl PendingActivation {
    /// The never-sent bytes, taken (for a write after activation).
    pub(crate) fn take_unsent(&mut self) -> Bytes {
        std::mem::take(&mut self.unsent)
    }
}

pub(crate) fn write_unsent(
    fd: BorrowedFd<'_>,
    data: &[u8],
    what: &dyn Fn() -> String,
) -> Result<()> {
    let mut off = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    // Bounded by the deadline: the bytes fitted the source's send buffer.
    while off < data.len() {
        match sys::send(fd, &data[off..], libc::MSG_DONTWAIT) {
            Ok(n) => off += n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if Instant::now() >= deadline {
                    return Err(NetError::sys("write never-sent bytes", what(), e));
                }
                if let Err(e) = sys::poll_one(fd, libc::POLLOUT, 100) {
                    debug!(error = %e, "waiting for room in a send queue failed");
                }
            }
            Err(e) => return Err(NetError::sys("write never-sent bytes", what(), e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(sack_ok: bool, wscale_ok: bool, timestamps_ok: bool) -> TcpConnState {
        TcpConnState {
            id: 1,
            local: "198.51.100.1:80".parse().unwrap(),
            peer: "198.51.100.2:4000".parse().unwrap(),
            state: TcpStateKind::Established,
            snd_seq: 0,
            rcv_seq: 0,
            send_queue: Default::default(),
            unsent_len: 0,
            recv_queue: Default::default(),
            mss: 1448,
            snd_wscale: 7,
            rcv_wscale: 9,
            wscale_ok,
            sack_ok,
            timestamps_ok,
            timestamp: 0,
            window: None,
            sock: Default::default(),
            tcp: Default::default(),
        }
    }

    #[test]
    fn repair_options_carry_what_the_handshake_negotiated() {
        let (opts, n) = repair_options(&conn(true, true, true));
        let codes: Vec<_> = opts[..n].iter().map(|o| (o.opt_code, o.opt_val)).collect();
        assert_eq!(
            codes,
            [
                (sys::TCPOPT_SACK_PERM, 0),
                (sys::TCPOPT_WINDOW, 7 | 9 << 16),
                (sys::TCPOPT_TIMESTAMP, 0),
                (sys::TCPOPT_MAXSEG, 1448),
            ]
        );
        let (opts, n) = repair_options(&conn(false, false, false));
        assert_eq!(n, 1);
        assert_eq!(
            (opts[0].opt_code, opts[0].opt_val),
            (sys::TCPOPT_MAXSEG, 1448)
        );
    }

    #[test]
    fn kernel_states_map_to_the_model_or_a_reason() {
        assert_eq!(state_kind(1), Ok(TcpStateKind::Established));
        assert_eq!(state_kind(4), Ok(TcpStateKind::FinWait1));
        assert_eq!(state_kind(5), Ok(TcpStateKind::FinWait2));
        assert_eq!(state_kind(8), Ok(TcpStateKind::CloseWait));
        assert_eq!(state_kind(9), Ok(TcpStateKind::LastAck));
        assert_eq!(state_kind(11), Ok(TcpStateKind::Closing));
        for s in [2, 3, 6, 7, 10, 12, 0] {
            assert!(state_kind(s).is_err(), "state {s}");
        }
    }

    #[test]
    fn connection_names_carry_id_and_addresses() {
        let a: SocketAddr = "198.51.100.1:80".parse().unwrap();
        assert_eq!(
            describe_conn(7, Some(a), None),
            "TCP connection 7 (198.51.100.1:80 -> ?)"
        );
    }
}
