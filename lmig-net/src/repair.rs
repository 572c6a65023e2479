//! [`RepairGuard`]: TCP repair mode held by RAII.

use std::os::fd::BorrowedFd;

use crate::error::{NetError, Result};
use crate::sys::{self, RepairMode};

/// How a socket leaves TCP repair mode.
///
/// Measured on this machine (see `lmig-bench tcp`): the window probe of
/// [`RepairExit::WindowProbe`] costs one extra segment per connection; it
/// makes the peer answer with an ACK at once, which re-synchronises a
/// connection whose peer sent something during the freeze or whose
/// sent-but-unacknowledged data was already received. lmig uses the probe only
/// where it helps ([`RepairExit::Auto`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RepairExit {
    /// `TCP_REPAIR_OFF`: always send the window probe.
    WindowProbe,
    /// `TCP_REPAIR_OFF_NO_WP`: never send it.
    NoWindowProbe,
    /// Probe only connections that have sent-but-unacknowledged data or a
    /// FIN to re-announce (their peer's ACK settles them at once); the others
    /// stay silent until the program writes (the default).
    #[default]
    Auto,
}

/// Enter repair mode (`TCP_REPAIR` = 1), with a clear error for a missing privilege.
pub(crate) fn repair_on(fd: BorrowedFd<'_>, what: impl FnOnce() -> String) -> Result<()> {
    match sys::tcp_repair(fd, RepairMode::On) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(NetError::Unsupported {
            feature: "TCP_REPAIR",
            needs: "CAP_NET_ADMIN in the socket's network namespace (and a non-listening socket)",
        }),
        Err(e) => Err(NetError::sys("TCP_REPAIR on", what(), e)),
    }
}

/// Leave repair mode and give the socket its `SO_REUSEADDR` back.
///
/// The kernel forces address reuse in repair mode and clears the socket's
/// reuse flag when it leaves (`sk_reuse = SK_NO_REUSE`), whatever the program
/// had set: left alone, a connection that had `SO_REUSEADDR` comes out of an
/// aborted migration without it, the next capture records it so, and a
/// listener on the same port then cannot `listen` beside the restored
/// connections. `reuse_addr` is the value read before repair mode.
pub(crate) fn leave_repair(
    fd: BorrowedFd<'_>,
    probe: bool,
    reuse_addr: bool,
) -> std::io::Result<()> {
    sys::tcp_repair(
        fd,
        if probe {
            RepairMode::Off
        } else {
            RepairMode::OffNoWindowProbe
        },
    )?;
    if reuse_addr {
        sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    Ok(())
}

/// A TCP socket in repair mode; repair mode is left when the guard drops
/// (with the window probe), unless [`RepairGuard::keep`] or
/// [`RepairGuard::leave`] was called. Leaving gives the socket back the
/// `SO_REUSEADDR` it had when it entered (the kernel clears it).
///
/// In repair mode the kernel sends nothing for the socket when the program
/// calls `close`, `shutdown` or `write`, and closing it sends neither FIN nor
/// RST: this is how the source side lets a connection go.
#[derive(Debug)]
pub struct RepairGuard<'fd> {
    fd: BorrowedFd<'fd>,
    armed: bool,
    reuse_addr: bool,
}

impl<'fd> RepairGuard<'fd> {
    /// Enter repair mode (`TCP_REPAIR` = 1; needs `CAP_NET_ADMIN`), after
    /// reading the socket's `SO_REUSEADDR` to restore on leaving.
    pub fn enter(fd: BorrowedFd<'fd>, what: impl FnOnce() -> String) -> Result<Self> {
        let reuse_addr = match sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR) {
            Ok(v) => v != 0,
            Err(e) => return Err(NetError::sys("getsockopt(SO_REUSEADDR)", what(), e)),
        };
        repair_on(fd, what)?;
        Ok(Self {
            fd,
            armed: true,
            reuse_addr,
        })
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'fd> {
        self.fd
    }

    /// Leave repair mode now, with a window probe or without; the guard is spent.
    pub fn leave(mut self, probe: bool) -> std::io::Result<()> {
        self.armed = false;
        leave_repair(self.fd, probe, self.reuse_addr)
    }

    /// Keep the socket in repair mode (someone else leaves it or it is closed
    /// in repair mode, silently).
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for RepairGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = leave_repair(self.fd, true, self.reuse_addr) {
                warn!(error = %e, "a socket could not leave TCP repair mode");
            }
        }
    }
}
