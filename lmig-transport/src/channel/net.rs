//! TCP and Unix stream sockets under a channel.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, TcpKeepalive, Type};

use super::conn::Conn;
use super::stream::start_dialed;
use super::{AcceptConn, ChannelConfig, Dial, StreamChannel};
use crate::error::{Result, TransportError};

/// Where a channel's listener is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// A TCP address (IPv4 or IPv6).
    Tcp(SocketAddr),
    /// A Unix stream socket path.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(a: SocketAddr) -> Self {
        Self::Tcp(a)
    }
}

impl From<PathBuf> for Endpoint {
    fn from(p: PathBuf) -> Self {
        Self::Unix(p)
    }
}

/// Dial `endpoint`, open and authenticate every stream
/// (`config.data_streams` data streams, a control and an urgent stream).
pub fn connect(endpoint: &Endpoint, config: ChannelConfig) -> Result<StreamChannel> {
    start_dialed(Box::new(endpoint.clone()), config)
}

fn tune_tcp(sock: &Socket, config: &ChannelConfig) -> io::Result<()> {
    sock.set_tcp_nodelay(true)?;
    if let Some(b) = config.socket_buffer {
        sock.set_send_buffer_size(b)?;
        sock.set_recv_buffer_size(b)?;
    }
    sock.set_keepalive(true)?;
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5))
            .with_retries(3),
    )
}

impl Dial for Endpoint {
    fn dial(&self, config: &ChannelConfig) -> Result<Box<dyn Conn>> {
        let ctx = |e| TransportError::io(format!("connecting to {self}"), e);
        match self {
            Self::Tcp(addr) => {
                let sock = Socket::new(
                    Domain::for_address(*addr),
                    Type::STREAM,
                    Some(Protocol::TCP),
                )
                .map_err(ctx)?;
                tune_tcp(&sock, config).map_err(ctx)?;
                sock.connect_timeout(&SockAddr::from(*addr), config.connect_timeout)
                    .map_err(ctx)?;
                Ok(Box::new(TcpStream::from(sock)))
            }
            Self::Unix(path) => Ok(Box::new(UnixStream::connect(path).map_err(ctx)?)),
        }
    }
}

/// Connections the kernel queues before the acceptor thread takes them (the
/// kernel caps it at `net.core.somaxconn`, 4096 by default).
const LISTEN_BACKLOG: i32 = 1024;

/// `accept(2)` failed: the OS error (kept as the source, so its code can
/// be classified) and the endpoint.
#[derive(Debug)]
struct AcceptFailed {
    on: String,
    source: io::Error,
}

impl fmt::Display for AcceptFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "accepting on {}: {}", self.on, self.source)
    }
}

impl std::error::Error for AcceptFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Accepts with a deadline: `accept` on a blocking listening socket honours
/// `SO_RCVTIMEO` on Linux, so a deadline costs no polling.
struct SockAcceptor {
    sock: Socket,
    tcp: bool,
    name: String,
}

impl AcceptConn for SockAcceptor {
    fn accept_conn(
        &self,
        config: &ChannelConfig,
        deadline: Option<Instant>,
    ) -> io::Result<Option<Box<dyn Conn>>> {
        loop {
            let timeout = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    Some(left.max(Duration::from_millis(1)))
                }
            };
            self.sock.set_read_timeout(timeout)?;
            match self.sock.accept() {
                Ok((s, _)) => {
                    // A connection that cannot even be set up (reset at
                    // once) is dropped; it says nothing about the listener.
                    if s.set_read_timeout(None).is_err() {
                        continue;
                    }
                    if self.tcp {
                        if tune_tcp(&s, config).is_err() {
                            continue;
                        }
                        return Ok(Some(Box::new(TcpStream::from(s))));
                    }
                    return Ok(Some(Box::new(UnixStream::from(s))));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        AcceptFailed {
                            on: self.name.clone(),
                            source: e,
                        },
                    ));
                }
            }
        }
    }
}

/// Bind and listen; returns the acceptor and the endpoint actually bound.
pub(super) fn listen(
    endpoint: &Endpoint,
    config: &ChannelConfig,
) -> Result<(Box<dyn AcceptConn>, Endpoint)> {
    let ctx = |e| TransportError::io(format!("listening on {endpoint}"), e);
    match endpoint {
        Endpoint::Tcp(addr) => {
            let sock = Socket::new(
                Domain::for_address(*addr),
                Type::STREAM,
                Some(Protocol::TCP),
            )
            .map_err(ctx)?;
            sock.set_reuse_address(true).map_err(ctx)?;
            if let Some(b) = config.socket_buffer {
                // Set before listen so accepted sockets inherit it (window scale).
                sock.set_recv_buffer_size(b).map_err(ctx)?;
                sock.set_send_buffer_size(b).map_err(ctx)?;
            }
            sock.bind(&SockAddr::from(*addr)).map_err(ctx)?;
            sock.listen(LISTEN_BACKLOG).map_err(ctx)?;
            let local = sock
                .local_addr()
                .map_err(ctx)?
                .as_socket()
                .ok_or_else(|| ctx(io::Error::other("bound address is not an IP address")))?;
            let local = Endpoint::Tcp(local);
            Ok((
                Box::new(SockAcceptor {
                    sock,
                    tcp: true,
                    name: local.to_string(),
                }),
                local,
            ))
        }
        Endpoint::Unix(path) => {
            let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(ctx)?;
            sock.bind(&SockAddr::unix(path).map_err(ctx)?)
                .map_err(ctx)?;
            sock.listen(LISTEN_BACKLOG).map_err(ctx)?;
            Ok((
                Box::new(SockAcceptor {
                    sock,
                    tcp: false,
                    name: endpoint.to_string(),
                }),
                endpoint.clone(),
            ))
        }
    }
}
