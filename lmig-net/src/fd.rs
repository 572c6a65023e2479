//! The program's fds as [`crate::NetSource`] receives them: which kind of
//! socket one is, its identity, and taking one from another process.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use lmig_core::model::SocketKind;

use crate::error::{NetError, Result};
use crate::sys;

/// What kind of socket `fd` is: `SO_DOMAIN`, `SO_TYPE`, `SO_ACCEPTCONN`.
pub(crate) fn kind_of(fd: BorrowedFd<'_>, id: u64) -> Result<SocketKind> {
    let what = || format!("socket {id}");
    let get = |name, op| {
        sys::getsockopt_int(fd, libc::SOL_SOCKET, name).map_err(|e| NetError::sys(op, what(), e))
    };
    let domain = get(libc::SO_DOMAIN, "getsockopt(SO_DOMAIN)")?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(NetError::NotMigratable {
            what: what(),
            reason: format!("address family {domain} is not IPv4 or IPv6"),
        });
    }
    let ty = get(libc::SO_TYPE, "getsockopt(SO_TYPE)")?;
    let proto = get(libc::SO_PROTOCOL, "getsockopt(SO_PROTOCOL)")?;
    match (ty, proto) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => {
            if get(libc::SO_ACCEPTCONN, "getsockopt(SO_ACCEPTCONN)")? != 0 {
                Ok(SocketKind::TcpListen)
            } else {
                Ok(SocketKind::TcpEstablished)
            }
        }
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => Ok(SocketKind::Udp),
        _ => Err(NetError::NotMigratable {
            what: what(),
            reason: format!("socket type {ty} protocol {proto} is not TCP or UDP"),
        }),
    }
}

/// Take a duplicate of fd `target_fd` of process `pid` (`pidfd_open` +
/// `pidfd_getfd`, Linux >= 5.6), for programs that do not link lmig.
///
/// Needs ptrace rights over the process (same user and
/// `kernel.yama.ptrace_scope` allowing it, or `CAP_SYS_PTRACE`). The other
/// process keeps its own fd: stop it (e.g. `SIGSTOP`) before the freeze, and
/// after `release` it must exit or close its fds without leaving repair mode.
pub fn take_fd_from_process(pid: i32, target_fd: RawFd) -> Result<OwnedFd> {
    let what = || format!("fd {target_fd} of process {pid}");
    let pidfd = sys::pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => NetError::Unsupported {
            feature: "pidfd_open",
            needs: "Linux >= 5.3",
        },
        _ => NetError::sys("pidfd_open", what(), e),
    })?;
    sys::pidfd_getfd(pidfd.as_fd(), target_fd).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => NetError::Unsupported {
            feature: "pidfd_getfd",
            needs: "Linux >= 5.6",
        },
        _ => NetError::sys("pidfd_getfd", what(), e),
    })
}

/// The socket's identity (`SO_COOKIE`): the same for every fd of one socket.
pub(crate) fn cookie_of(fd: BorrowedFd<'_>, id: u64) -> Result<u64> {
    sys::socket_cookie(fd)
        .map_err(|e| NetError::sys("getsockopt(SO_COOKIE)", format!("socket {id}"), e))
}
