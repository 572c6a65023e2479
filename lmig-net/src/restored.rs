//! What [`crate::NetSink`] hands the program: its restored sockets typed by
//! kind ([`RestoredSocket`]), and borrowed views of the sockets it still
//! owns ([`SocketView`]) for registering them with a poller early.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lmig_core::model::SocketKind;

/// One restored socket, owned, as the std type of its kind.
///
/// Made by [`crate::NetSink::take_restored`] after activation. Blocking
/// unless [`crate::SinkConfig::nonblocking`] was set (then created
/// non-blocking, with no system call after the commit);
/// [`RestoredSocket::set_nonblocking`] changes it. Dropping it closes the
/// socket.
#[derive(Debug)]
#[non_exhaustive]
pub enum RestoredSocket {
    /// An established TCP connection.
    Tcp(TcpStream),
    /// A listening TCP socket.
    Listener(TcpListener),
    /// A UDP socket.
    Udp(UdpSocket),
}

impl RestoredSocket {
    /// A socket of `kind` from its fd.
    pub(crate) fn new(kind: SocketKind, fd: OwnedFd) -> Self {
        match kind {
            SocketKind::TcpListen => Self::Listener(fd.into()),
            SocketKind::Udp => Self::Udp(fd.into()),
            _ => Self::Tcp(fd.into()),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> SocketKind {
        match self {
            Self::Tcp(_) => SocketKind::TcpEstablished,
            Self::Listener(_) => SocketKind::TcpListen,
            Self::Udp(_) => SocketKind::Udp,
        }
    }

    /// Set or clear `O_NONBLOCK` (one `ioctl(FIONBIO)`).
    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_nonblocking(on),
            Self::Listener(s) => s.set_nonblocking(on),
            Self::Udp(s) => s.set_nonblocking(on),
        }
    }

    /// The connection, if it is one.
    pub fn into_tcp(self) -> Option<TcpStream> {
        match self {
            Self::Tcp(s) => Some(s),
            _ => None,
        }
    }

    /// The listener, if it is one.
    pub fn into_listener(self) -> Option<TcpListener> {
        match self {
            Self::Listener(s) => Some(s),
            _ => None,
        }
    }

    /// The UDP socket, if it is one.
    pub fn into_udp(self) -> Option<UdpSocket> {
        match self {
            Self::Udp(s) => Some(s),
            _ => None,
        }
    }
}

impl AsFd for RestoredSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Listener(s) => s.as_fd(),
            Self::Udp(s) => s.as_fd(),
        }
    }
}

impl From<RestoredSocket> for OwnedFd {
    fn from(s: RestoredSocket) -> Self {
        match s {
            RestoredSocket::Tcp(s) => s.into(),
            RestoredSocket::Listener(s) => s.into(),
            RestoredSocket::Udp(s) => s.into(),
        }
    }
}

/// A socket the sink still owns, shown to the program by id: it may
/// register [`SocketView::fd`] with its poller (epoll, mio, tokio's
/// `AsyncFd` after taking it) before the sink hands the socket out. The fd
/// stays valid for as long as the sink holds the socket; the socket the
/// program takes later is this very one (same fd number, same file).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct SocketView<'a> {
    /// The program's id of the socket.
    pub id: u64,
    /// Its kind.
    pub kind: SocketKind,
    /// The socket.
    pub fd: BorrowedFd<'a>,
    /// Made before the freeze by `prepare` (in repair mode and not
    /// connected yet: `poll` reports `POLLHUP` until the restore connects
    /// it), as opposed to made in the freeze.
    pub prepared: bool,
}

/// The program's registration callback (see [`crate::NetSink::on_register`]).
pub(crate) type Register = Box<dyn FnMut(SocketView<'_>) + Send>;
