//! The sockets `prepare` makes before the freeze: options and timestamp
//! clock from the plan, and what the restore checks before it uses them.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lmig_core::model::{SockOpts, SocketPrep, TcpConnState, TcpOpts};

use crate::error::{NetError, Result};
use crate::opts::{self, Defaults};
use crate::sys;
use crate::tcp;

/// A socket `prepare` made for a planned connection, with the options of
/// the plan it carries.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) fd: OwnedFd,
    /// The plan's options, set on `fd` before the freeze (`None`: the plan
    /// had none, and the socket has a fresh socket's).
    pub(super) opts: Box<(Option<SockOpts>, Option<TcpOpts>)>,
    /// The timestamp clock started from the plan ([`SocketPrep::ts_clock`]):
    /// `CLOCK_MONOTONIC` in ms plus this is never more than it reads.
    pub(super) clock: Option<u32>,
}

/// The clock of a prepared socket starts this far past the plan's
/// `TIMESTAMP_LEAD_MS` lead: the plan's clock is read up to ~2 ms low.
const CLOCK_MARGIN_MS: u32 = 4;
/// How far past the clock the restore would set (`TIMESTAMP_LEAD_MS`
/// ahead of the captured one) a clock started before the freeze may read
/// and be kept. It reads the source's clock now plus the lead (plus the
/// hosts' difference in `CLOCK_REALTIME`), so it is past that by the time
/// from the capture to the restore: tens of ms. A peer may take the lead as
/// round-trip time once (see `TIMESTAMP_LEAD_MS`): this bounds that to
/// twice the lead.
const CLOCK_SLACK_MS: u32 = tcp::TIMESTAMP_LEAD_MS;

/// Start a prepared socket's timestamp clock at the plan's clock
/// ([`SocketPrep::ts_clock`]) plus the lead, before the freeze; returns its
/// offset from `CLOCK_MONOTONIC` (ms), never more than the kernel's.
fn start_clock(fd: BorrowedFd<'_>, ts_clock: u32) -> std::io::Result<u32> {
    let lead = tcp::TIMESTAMP_LEAD_MS + CLOCK_MARGIN_MS;
    // Even: an odd value would switch the clock to microseconds.
    let ts = sys::realtime_ms().wrapping_add(ts_clock).wrapping_add(lead) & !1;
    sys::set_tcp_timestamp(fd, ts)?;
    // Read after: the kernel's clock was no later then.
    Ok(ts.wrapping_sub(sys::monotonic_ms()))
}

/// Does the clock started before the freeze (offset `off`) read what the
/// restore would set, or up to `CLOCK_SLACK_MS` more? (Else the restore
/// sets it.)
/// `now`: `CLOCK_MONOTONIC` in ms.
pub(super) fn clock_fits(c: &TcpConnState, off: u32, now: u32) -> bool {
    let want = c.timestamp.wrapping_add(tcp::TIMESTAMP_LEAD_MS);
    let ahead = now.wrapping_add(off).wrapping_sub(want);
    // A millisecond clock (even), at or past `want`, not too far.
    c.timestamps_ok && c.timestamp & 1 == 0 && ahead <= CLOCK_SLACK_MS
}

impl Prepared {
    /// Does the record's connection want other options than the ones set
    /// (the program changed one after the plan)? Then the prepared socket
    /// is not used: an option set cannot always be unset (a buffer size
    /// locks it, a device binding or a congestion control stays).
    pub(super) fn set_otherwise(&self, c: &TcpConnState) -> bool {
        let (sock, tcp) = &*self.opts;
        sock.as_ref().is_some_and(|o| *o != c.sock) || tcp.as_ref().is_some_and(|o| *o != c.tcp)
    }

    /// Set the record's options the plan did not carry.
    pub(super) fn finish(&self, c: &TcpConnState, d: &Defaults) -> Result<()> {
        let (sock, tcp) = &*self.opts;
        let what = || tcp::describe_conn(c.id, Some(c.local), Some(c.peer));
        let sock = sock.is_none().then_some(&c.sock);
        let tcp = tcp.is_none().then_some(&c.tcp);
        opts::apply_conn_opts(self.fd.as_fd(), c.local.is_ipv6(), sock, tcp, d, &what)
    }
}

/// Before the freeze, or in it for a connection not planned: a socket in
/// repair mode, bound, with the options `p` carries and its timestamp
/// clock started (the clock's offset, see [`start_clock`]).
pub(super) fn prepare_conn(
    p: &SocketPrep,
    d: &Defaults,
    flags: i32,
) -> Result<(OwnedFd, Option<u32>)> {
    let fd = tcp::prepare_established(p, flags)?;
    let what = || tcp::describe_conn(p.id, Some(p.local), p.peer);
    let v6 = p.local.is_ipv6();
    opts::apply_conn_opts(fd.as_fd(), v6, p.sock.as_ref(), p.tcp.as_ref(), d, &what)?;
    let clock = match p.ts_clock {
        Some(ts) => Some(
            start_clock(fd.as_fd(), ts)
                .map_err(|e| NetError::sys("setsockopt(TCP_TIMESTAMP)", what(), e))?,
        ),
        None => None,
    };
    Ok((fd, clock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_started_before_the_freeze_is_kept_only_at_or_a_little_past_the_restores() {
        let c = TcpConnState {
            id: 1,
            local: "198.51.100.1:80".parse().unwrap(),
            peer: "198.51.100.2:4000".parse().unwrap(),
            state: lmig_core::model::TcpStateKind::Established,
            snd_seq: 0,
            rcv_seq: 0,
            send_queue: Default::default(),
            unsent_len: 0,
            recv_queue: Default::default(),
            mss: 1448,
            snd_wscale: 7,
            rcv_wscale: 7,
            wscale_ok: true,
            sack_ok: true,
            timestamps_ok: true,
            timestamp: u32::MAX - 41,
            window: None,
            sock: Default::default(),
            tcp: Default::default(),
        };
        let lead = tcp::TIMESTAMP_LEAD_MS;
        // The prepared clock reads `now + off`: from `want - 1` to `want + slack + 1`.
        let want = c.timestamp.wrapping_add(lead);
        let now = 5_000u32;
        let at = |ahead: i64| (want as i64 + ahead - now as i64) as u32;
        assert!(!clock_fits(&c, at(-1), now), "behind by 1 ms");
        assert!(clock_fits(&c, at(0), now));
        assert!(clock_fits(&c, at(CLOCK_SLACK_MS as i64), now));
        assert!(
            !clock_fits(&c, at(CLOCK_SLACK_MS as i64 + 1), now),
            "too far"
        );
        assert!(!clock_fits(&c, at(-10_000), now));
        let usec = TcpConnState {
            timestamp: c.timestamp | 1,
            ..c.clone()
        };
        assert!(!clock_fits(&usec, at(2), now), "a microsecond clock");
        let none = TcpConnState {
            timestamps_ok: false,
            ..c
        };
        assert!(!clock_fits(&none, at(2), now));
    }
}
