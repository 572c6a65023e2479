//! Socket records: everything needed to recreate a socket on another host.
//!
//! They are captured by `lmig-net` (TCP repair for established connections)
//! and travel inside `Sockets` messages. A record is plain data; it is
//! validated with [`SocketRecord::validate`] before anything is restored, so
//! an impossible record is rejected with an error naming the connection and
//! the other connections are restored.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::error::{MigrationError, Result};

/// Largest send or receive queue a record may carry (64 MiB).
pub const MAX_QUEUE_BYTES: usize = 64 << 20;
/// Most datagrams a UDP record may carry.
pub const MAX_UDP_DATAGRAMS: usize = 65_536;
/// Longest congestion-control algorithm name (the kernel's `TCP_CA_NAME_MAX`).
pub const MAX_CONGESTION_NAME: usize = 16;

/// Socket-level options a server commonly sets, captured from every socket kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SockOpts {
    /// `SO_REUSEADDR`.
    pub reuse_addr: bool,
    /// `SO_REUSEPORT`.
    pub reuse_port: bool,
    /// `SO_RCVBUF` as set by the program (the kernel doubles it; this is the value to set).
    pub rcvbuf: u32,
    /// `SO_SNDBUF` as set by the program (the value to set).
    pub sndbuf: u32,
    /// `SO_MARK`.
    pub mark: u32,
    /// `SO_PRIORITY`.
    pub priority: u32,
    /// `IP_TOS` (IPv4) or `IPV6_TCLASS` (IPv6).
    pub tos: u8,
    /// `IPV6_V6ONLY` (IPv6 sockets only).
    pub v6only: bool,
    /// `SO_BINDTODEVICE`, if set.
    pub bind_device: Option<String>,
}

/// TCP-level options a server commonly sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpOpts {
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// `SO_KEEPALIVE`.
    pub keepalive: bool,
    /// `TCP_KEEPIDLE`, seconds.
    pub keep_idle: u32,
    /// `TCP_KEEPINTVL`, seconds.
    pub keep_intvl: u32,
    /// `TCP_KEEPCNT`.
    pub keep_cnt: u32,
    /// `TCP_USER_TIMEOUT`, milliseconds.
    pub user_timeout: u32,
    /// `TCP_CONGESTION`, if not the system default.
    pub congestion: Option<String>,
}

/// The fields of `TCP_REPAIR_WINDOW` (`struct tcp_repair_window`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpRepairWindow {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's advertised (send) window.
    pub snd_wnd: u32,
    /// The largest window the peer ever advertised.
    pub max_window: u32,
    /// Our advertised (receive) window.
    pub rcv_wnd: u32,
    /// `rcv_nxt` at the time of the last window update we sent.
    pub rcv_wup: u32,
}

/// Where an established connection is in its close handshake.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum TcpStateKind {
    /// Both directions open.
    #[default]
    Established,
    /// The peer sent FIN (we may still send).
    CloseWait,
    /// We sent FIN, not yet acknowledged.
    FinWait1,
    /// We sent FIN and it was acknowledged; the peer may still send.
    FinWait2,
    /// Both sent FIN, ours not yet acknowledged, theirs arrived after ours.
    Closing,
    /// The peer sent FIN first, then we did; ours not yet acknowledged.
    LastAck,
}

impl TcpStateKind {
    /// Did the peer send FIN (nothing more will arrive)?
    pub fn fin_received(self) -> bool {
        matches!(self, Self::CloseWait | Self::Closing | Self::LastAck)
    }

    /// Did we send FIN (nothing more may be sent)?
    pub fn fin_sent(self) -> bool {
        matches!(
            self,
            Self::FinWait1 | Self::FinWait2 | Self::Closing | Self::LastAck
        )
    }
}

/// An established TCP connection, as TCP repair reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConnState {
    /// The program's identifier for this socket; given back on restore.
    pub id: u64,
    /// Local address (IPv4 or IPv6; same family as `peer`).
    pub local: SocketAddr,
    /// Peer address.
    pub peer: SocketAddr,
    /// Close-handshake state.
    pub state: TcpStateKind,
    /// Sequence number of the first byte of `send_queue` (`snd_una`): the
    /// send-queue sequence (`TCP_QUEUE_SEQ` on the send queue) minus the
    /// queue length.
    pub snd_seq: u32,
    /// Sequence number of the next byte expected from the peer (`rcv_nxt`)
    /// minus the length of `recv_queue`: the sequence of the first unread byte.
    pub rcv_seq: u32,
    /// Sent-but-unacknowledged bytes followed by never-sent bytes.
    pub send_queue: Bytes,
    /// How many bytes at the end of `send_queue` were never sent (`SIOCOUTQNSD`).
    pub unsent_len: u32,
    /// Received bytes the program has not read yet.
    pub recv_queue: Bytes,
    /// Maximum segment size (`TCP_MAXSEG`).
    pub mss: u32,
    /// Send window scale (the peer's shift), when window scaling is on.
    pub snd_wscale: u8,
    /// Receive window scale (our shift), when window scaling is on.
    pub rcv_wscale: u8,
    /// Window scaling negotiated.
    pub wscale_ok: bool,
    /// SACK negotiated.
    pub sack_ok: bool,
    /// TCP timestamps negotiated.
    pub timestamps_ok: bool,
    /// The connection's `TCP_TIMESTAMP` clock at capture; restore sets the
    /// offset so the peer sees the clock continue.
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`, when the kernel provides it (>= 4.8).
    pub window: Option<TcpRepairWindow>,
    /// Socket-level options.
    pub sock: SockOpts,
    /// TCP options.
    pub tcp: TcpOpts,
}

/// A listening TCP socket.
///
/// Connections still in the accept queue at capture are not moved: a
/// listener cannot enter repair mode, and when the source closes it after
/// `Commit` the kernel resets the connections it had not accepted yet.
/// Programs that accept promptly lose none; new connection attempts during
/// the freeze are held by the network lock and reach the destination's
/// listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpListenState {
    /// The program's identifier for this socket.
    pub id: u64,
    /// The bound address.
    pub local: SocketAddr,
    /// The backlog passed to `listen`.
    pub backlog: u32,
    /// Socket-level options.
    pub sock: SockOpts,
    /// TCP options (inherited by accepted sockets).
    pub tcp: TcpOpts,
}

/// One datagram waiting in a UDP socket's receive queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpDatagram {
    /// The sender.
    pub from: SocketAddr,
    /// The payload.
    pub data: Bytes,
}

/// A UDP socket, bound and optionally connected, with its pending datagrams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpSockState {
    /// The program's identifier for this socket.
    pub id: u64,
    /// The bound address.
    pub local: SocketAddr,
    /// The connected peer, if `connect` was called.
    pub peer: Option<SocketAddr>,
    /// Socket-level options.
    pub sock: SockOpts,
    /// Datagrams received but not read, oldest first; delivered to the restored socket.
    pub recv_queue: Vec<UdpDatagram>,
}

/// The kind of a socket, for pre-freeze preparation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SocketKind {
    /// An established TCP connection.
    TcpEstablished,
    /// A listening TCP socket.
    TcpListen,
    /// A UDP socket.
    Udp,
}

/// What the destination may do before the freeze for one socket: create it,
/// enter repair mode, set options and bind. Sent ahead so that the freeze only
/// carries what depends on the frozen state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketPrep {
    /// The program's identifier for this socket.
    pub id: u64,
    /// Its kind.
    pub kind: SocketKind,
    /// Local address.
    pub local: SocketAddr,
    /// Peer address (established TCP and connected UDP).
    pub peer: Option<SocketAddr>,
    /// The socket's options when planned, if known: the destination sets
    /// them on the prepared socket before the freeze, and in the freeze only
    /// when the record's differ (an option the program changed after the plan).
    pub sock: Option<SockOpts>,
    /// The TCP options when planned, if known (as `sock`).
    pub tcp: Option<TcpOpts>,
    /// An established connection's TCP timestamp clock (milliseconds) minus
    /// the source's `CLOCK_REALTIME` in milliseconds, wrapping, when
    /// planned: the destination starts the prepared socket's clock from it
    /// before the freeze, and sets it again in the freeze only if it does
    /// not read what the record wants. `None`: no timestamps, or a clock
    /// counting microseconds.
    pub ts_clock: Option<u32>,
}

/// One captured socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketRecord {
    /// An established TCP connection.
    Tcp(TcpConnState),
    /// A listening TCP socket.
    Listen(TcpListenState),
    /// A UDP socket.
    Udp(UdpSockState),
}

fn check_family(a: SocketAddr, b: SocketAddr) -> std::result::Result<(), String> {
    if a.is_ipv4() != b.is_ipv4() {
        return Err(format!("mixed address families: local {a}, peer {b}"));
    }
    Ok(())
}

fn check_opts(sock: &SockOpts, tcp: Option<&TcpOpts>) -> std::result::Result<(), String> {
    if sock.bind_device.as_ref().is_some_and(|d| d.len() >= 16) {
        return Err("device name longer than IFNAMSIZ".into());
    }
    if let Some(tcp) = tcp {
        if tcp
            .congestion
            .as_ref()
            .is_some_and(|c| c.is_empty() || c.len() >= MAX_CONGESTION_NAME)
        {
            return Err("congestion control name length out of range".into());
        }
    }
    Ok(())
}

impl SocketRecord {
    /// The program's identifier of this socket.
    pub fn id(&self) -> u64 {
        match self {
            Self::Tcp(s) => s.id,
            Self::Listen(s) => s.id,
            Self::Udp(s) => s.id,
        }
    }

    /// A short name for errors: `"TCP connection 7 (10.0.0.1:80 -> ...)"`.
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(s) => format!("TCP connection {} ({} -> {})", s.id, s.local, s.peer),
            Self::Listen(s) => format!("TCP listener {} ({})", s.id, s.local),
            Self::Udp(s) => format!("UDP socket {} ({})", s.id, s.local),
        }
    }

    /// The pre-freeze preparation for this socket.
    pub fn prep(&self) -> SocketPrep {
        match self {
            Self::Tcp(s) => SocketPrep {
                id: s.id,
                kind: SocketKind::TcpEstablished,
                local: s.local,
                peer: Some(s.peer),
                sock: Some(s.sock.clone()),
                tcp: Some(s.tcp.clone()),
                ts_clock: None,
            },
            Self::Listen(s) => SocketPrep {
                id: s.id,
                kind: SocketKind::TcpListen,
                local: s.local,
                peer: None,
                sock: None,
                tcp: None,
                ts_clock: None,
            },
            Self::Udp(s) => SocketPrep {
                id: s.id,
                kind: SocketKind::Udp,
                local: s.local,
                peer: s.peer,
                sock: None,
                tcp: None,
                ts_clock: None,
            },
        }
    }

    /// Reject impossible records: mixed families, queues over the caps,
    /// sequence numbers that contradict the queues, unknown option values.
    /// The error names the socket ([`SocketRecord::describe`]); a valid
    /// record costs no formatting (every record is checked at both ends).
    pub fn validate(&self) -> Result<()> {
        self.check()
            .map_err(|detail| MigrationError::invalid(self.describe(), detail))
    }

    fn check(&self) -> std::result::Result<(), String> {
        match self {
            Self::Tcp(s) => {
                check_family(s.local, s.peer)?;
                check_opts(&s.sock, Some(&s.tcp))?;
                if s.local.port() == 0 || s.peer.port() == 0 {
                    return Err("port 0 in an established connection".into());
                }
                if s.send_queue.len() > MAX_QUEUE_BYTES || s.recv_queue.len() > MAX_QUEUE_BYTES {
                    return Err(format!(
                        "queue of {} / {} bytes exceeds the cap of {MAX_QUEUE_BYTES}",
                        s.send_queue.len(),
                        s.recv_queue.len()
                    ));
                }
                if s.unsent_len as usize > s.send_queue.len() {
                    return Err(format!(
                        "{} unsent bytes but a send queue of {}",
                        s.unsent_len,
                        s.send_queue.len()
                    ));
                }
                if s.state.fin_sent() && s.unsent_len != 0 {
                    return Err("FIN sent yet unsent data is queued".into());
                }
                if s.mss == 0 || s.mss > 65_535 {
                    return Err(format!("MSS {} out of range", s.mss));
                }
                if s.wscale_ok && (s.snd_wscale > 14 || s.rcv_wscale > 14) {
                    return Err("window scale over 14".into());
                }
                if let Some(w) = s.window {
                    // The kernel's own checks in tcp_repair_set_window(): the
                    // window update cannot lie beyond what we have received.
                    let rcv_nxt = s.rcv_seq.wrapping_add(s.recv_queue.len() as u32);
                    if (w.rcv_wup.wrapping_sub(rcv_nxt) as i32) > 0 {
                        return Err(format!("rcv_wup {} is after rcv_nxt {rcv_nxt}", w.rcv_wup));
                    }
                    if (w.snd_wl1.wrapping_sub(rcv_nxt.wrapping_add(w.rcv_wnd)) as i32) > 0 {
                        return Err(format!(
                            "snd_wl1 {} is beyond the receive window",
                            w.snd_wl1
                        ));
                    }
                }
            }
            Self::Listen(s) => {
                check_opts(&s.sock, Some(&s.tcp))?;
                if s.local.port() == 0 {
                    return Err("listener without a port".into());
                }
            }
            Self::Udp(s) => {
                check_opts(&s.sock, None)?;
                if let Some(peer) = s.peer {
                    check_family(s.local, peer)?;
                }
                if s.recv_queue.len() > MAX_UDP_DATAGRAMS {
                    return Err("too many pending datagrams".into());
                }
                let total: usize = s.recv_queue.iter().map(|d| d.data.len()).sum();
                if total > MAX_QUEUE_BYTES || s.recv_queue.iter().any(|d| d.data.len() > 65_535) {
                    return Err("pending datagrams exceed the caps".into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn conn() -> TcpConnState {
        TcpConnState {
            id: 7,
            local: "198.51.100.1:80".parse().unwrap(),
            peer: "198.51.100.9:40000".parse().unwrap(),
            state: TcpStateKind::Established,
            snd_seq: 1000,
            rcv_seq: 5000,
            send_queue: Bytes::from_static(b"hello world"),
            unsent_len: 5,
            recv_queue: Bytes::from_static(b"req"),
            mss: 1448,
            snd_wscale: 7,
            rcv_wscale: 7,
            wscale_ok: true,
            sack_ok: true,
            timestamps_ok: true,
            timestamp: 123,
            window: Some(TcpRepairWindow {
                snd_wl1: 5003,
                snd_wnd: 65535,
                max_window: 65535,
                rcv_wnd: 65535,
                rcv_wup: 5003,
            }),
            sock: SockOpts::default(),
            tcp: TcpOpts::default(),
        }
    }

    #[test]
    fn valid_connection_passes() {
        SocketRecord::Tcp(conn()).validate().unwrap();
    }

    #[test]
    fn impossible_connections_are_named() {
        let mut c = conn();
        c.peer = "[2001:db8::1]:40000".parse().unwrap();
        let e = SocketRecord::Tcp(c).validate().unwrap_err().to_string();
        assert!(e.contains("TCP connection 7") && e.contains("mixed"), "{e}");

        let mut c = conn();
        c.unsent_len = 100;
        assert!(SocketRecord::Tcp(c).validate().is_err());

        let mut c = conn();
        c.window.as_mut().unwrap().rcv_wup = 9000;
        assert!(SocketRecord::Tcp(c).validate().is_err());

        let mut c = conn();
        c.state = TcpStateKind::FinWait1;
        assert!(
            SocketRecord::Tcp(c).validate().is_err(),
            "FIN after unsent data"
        );
    }
}
