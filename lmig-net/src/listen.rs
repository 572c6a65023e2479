//! TCP listeners: capture one into a record, restore it listening (see
//! the "Listeners" section of [`crate::tcp`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lmig_core::model::TcpListenState;

use crate::error::{NetError, Result};
use crate::opts::{self, Defaults};
use crate::repair;
use crate::sys;
use crate::tcp::{CaptureCtx, bind_maybe_transparent};

/// Capture a listening socket.
pub(crate) fn capture_listener(
    fd: BorrowedFd<'_>,
    id: u64,
    ctx: &CaptureCtx,
) -> Result<TcpListenState> {
    let local = sys::local_addr(fd).ok().flatten();
    let what = || {
        format!(
            "TCP listener {id} ({})",
            local.map(|a| a.to_string()).unwrap_or_else(|| "?".into())
        )
    };
    let Some(local) = local else {
        return Err(NetError::NotMigratable {
            what: what(),
            reason: "no local address".into(),
        });
    };
    let info = sys::tcp_info(fd).map_err(|e| NetError::sys("getsockopt(TCP_INFO)", what(), e))?;
    let reuse = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
        .map_err(|e| NetError::sys("getsockopt(SO_REUSEADDR)", what(), e))?
        != 0;
    Ok(TcpListenState {
        id,
        local,
        backlog: info.sacked,
        sock: opts::read_sock_opts(fd, local.is_ipv6(), reuse, ctx.buffers, &what)?,
        tcp: opts::read_tcp_opts(fd, ctx.default_cc.as_deref(), &what)?,
    })
}

/// Restore a listener, listening: everything that can refuse (`bind`,
/// `listen`) happens here, before `Commit`, so that a refusal aborts the
/// migration while the source still serves. Nothing reaches the listener
/// before the service address is local here (it binds with
/// `IP_TRANSPARENT` until then).
///
/// It binds in repair mode (forced reuse: the restored connections share its
/// port), leaves repair mode and listens with `SO_REUSEADDR` set, so that it
/// never conflicts with the restored connections on its port (in repair mode
/// until activation, their reuse is forced); then its own `SO_REUSEADDR` is
/// put back as captured. A listener on the same address held by another
/// socket of this host (the source itself, when both run on one host)
/// refuses with `EADDRINUSE`, unless both listeners set `SO_REUSEPORT`.
pub(crate) fn restore_listener(l: &TcpListenState, d: &Defaults, flags: i32) -> Result<OwnedFd> {
    let what = || format!("TCP listener {} ({})", l.id, l.local);
    let fd = sys::socket(sys::family_of(&l.local), libc::SOCK_STREAM | flags, 0)
        .map_err(|e| NetError::sys("socket", what(), e))?;
    opts::apply_sock_opts(fd.as_fd(), l.local.is_ipv6(), true, &l.sock, &d.sock, &what)?;
    opts::apply_tcp_opts(fd.as_fd(), &l.tcp, d, &what)?;
    repair::repair_on(fd.as_fd(), what)?;
    bind_maybe_transparent(fd.as_fd(), &l.local, &what)?;
    repair::leave_repair(fd.as_fd(), false, true)
        .map_err(|e| NetError::sys("TCP_REPAIR off", what(), e))?;
    let backlog = l.backlog.clamp(1, i32::MAX as u32) as i32;
    sys::listen(fd.as_fd(), backlog).map_err(|e| NetError::sys("listen", what(), e))?;
    if !l.sock.reuse_addr {
        sys::setsockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 0)
            .map_err(|e| NetError::sys("setsockopt(SO_REUSEADDR)", what(), e))?;
    }
    Ok(fd)
}
