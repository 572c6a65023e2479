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

/// A TCP socket in repair mode; repair mode is left when the guard drops
/// (with the window probe), unless [`RepairGuard::keep`] or
/// [`RepairGuard::leave`] was called.
///
/// In repair mode the kernel sends nothing for the socket when the program
/// calls `close`, `shutdown` or `write`, and closing it sends neither FIN nor
/// RST: this is how the source side lets a connection go.
#[derive(Debug)]
pub struct RepairGuard<'fd> {
    fd: BorrowedFd<'fd>,
    armed: bool,
}

impl<'fd> RepairGuard<'fd> {
    /// Enter repair mode (`TCP_REPAIR` = 1; needs `CAP_NET_ADMIN`).
    pub fn enter(fd: BorrowedFd<'fd>, what: impl FnOnce() -> String) -> Result<Self> {
        match sys::tcp_repair(fd, RepairMode::On) {
            Ok(()) => Ok(Self { fd, armed: true }),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(NetError::Unsupported {
                feature: "TCP_REPAIR",
                needs: "CAP_NET_ADMIN in the socket's network namespace (and a non-listening socket)",
            }),
            Err(e) => Err(NetError::sys("TCP_REPAIR on", what(), e)),
        }
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'fd> {
        self.fd
    }

    /// Leave repair mode now with the given exit; the guard is spent.
    pub fn leave(mut self, probe: bool) -> std::io::Result<()> {
        self.armed = false;
        sys::tcp_repair(
            self.fd,
            if probe {
                RepairMode::Off
            } else {
                RepairMode::OffNoWindowProbe
            },
        )
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
            let _ = sys::tcp_repair(self.fd, RepairMode::Off);
        }
    }
}
