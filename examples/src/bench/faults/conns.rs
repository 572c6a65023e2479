//! The sockets of the socket fault points (`faults::net`): TCP
//! connections and a UDP socket between a client in the client namespace
//! and the program in host A, with bytes queued both ways before the
//! migration; after it, whichever host holds them must deliver every
//! queued byte and carry a marker each way ([`exchange`]). Also the
//! resource checks of a point: TCP repair mode on a socket, the network
//! lock's nftables tables and the service addresses of a host.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use lmig_net::handoff::{self, HandoffConfig, ServiceAddr};
use lmig_net::lock::{self, TABLE_PREFIX};
use lmig_net::topology::{Netns, Topology};

/// TCP connections per point.
pub const CONNS: usize = 2;
/// The id of the UDP socket (the connections are 0..CONNS).
pub const UDP_ID: u64 = 100;
/// How long one read of the exchange waits (a bound, never asserted).
const READ_WAIT: Duration = Duration::from_secs(3);

/// What is written: `<tag>-<conn>;` (distinct per direction, step and connection).
fn pat(tag: &str, i: usize) -> Vec<u8> {
    format!("{tag}-{i};").into_bytes()
}

/// The handoff settings of both hosts: the service addresses on `eth0`,
/// short quiet and linger times (the suite runs many points).
pub fn handoff_config() -> HandoffConfig {
    HandoffConfig::new(service_addrs(), "eth0")
        .with_quiet(Duration::from_millis(50))
        .with_linger(Duration::from_millis(500))
}

/// The topology's service addresses.
pub fn service_addrs() -> Vec<ServiceAddr> {
    vec![
        ServiceAddr::new(Topology::SERVICE_V4, 24),
        ServiceAddr::new(Topology::SERVICE_V6, 64),
    ]
}

/// The client's ends.
pub struct Client {
    tcp: Vec<TcpStream>,
    udp: UdpSocket,
    /// The program's UDP address (the service address).
    udp_to: SocketAddr,
}

/// The program's sockets in host A, before the migration.
pub struct ProgramSockets {
    /// The connections (ids `0..CONNS`).
    pub tcp: Vec<OwnedFd>,
    /// The UDP socket (id [`UDP_ID`]).
    pub udp: OwnedFd,
}

fn io(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Open the connections and the UDP socket on the service address of host
/// A, and queue bytes both ways that nobody reads before the migration:
/// `c2s` on every connection and a datagram to the program, `s2c` on every
/// connection to the client.
pub fn open(topo: &Topology) -> Result<(Client, ProgramSockets), String> {
    let (listener, udp) = topo
        .a
        .run(|| -> std::io::Result<(TcpListener, UdpSocket)> {
            let any = |p| SocketAddr::new(Topology::SERVICE_V4.into(), p);
            Ok((TcpListener::bind(any(0))?, UdpSocket::bind(any(0))?))
        })
        .map_err(|e| e.to_string())?
        .map_err(io("bind in host A"))?;
    let to = listener.local_addr().map_err(io("listener address"))?;
    let udp_to = udp.local_addr().map_err(io("udp address"))?;
    let (tcp, cudp) = topo
        .client
        .run(move || -> std::io::Result<(Vec<TcpStream>, UdpSocket)> {
            let mut v = Vec::new();
            for _ in 0..CONNS {
                v.push(TcpStream::connect_timeout(&to, READ_WAIT)?);
            }
            let u = UdpSocket::bind(SocketAddr::new(Topology::CLIENT_V4.into(), 0))?;
            Ok((v, u))
        })
        .map_err(|e| e.to_string())?
        .map_err(io("connect from the client"))?;
    listener.set_nonblocking(false).map_err(io("listener"))?;
    let mut server = Vec::new();
    for _ in 0..CONNS {
        let (s, _) = listener.accept().map_err(io("accept in host A"))?;
        server.push(s);
    }
    let mut client = Client {
        tcp,
        udp: cudp,
        udp_to,
    };
    for (i, (c, s)) in client.tcp.iter_mut().zip(server.iter_mut()).enumerate() {
        for t in [&*c, &*s] {
            t.set_read_timeout(Some(READ_WAIT)).map_err(io("timeout"))?;
        }
        c.write_all(&pat("c2s", i)).map_err(io("client write"))?;
        s.write_all(&pat("s2c", i)).map_err(io("program write"))?;
    }
    udp.set_read_timeout(Some(READ_WAIT))
        .map_err(io("timeout"))?;
    client
        .udp
        .set_read_timeout(Some(READ_WAIT))
        .map_err(io("timeout"))?;
    client
        .udp
        .send_to(b"u-pre", udp_to)
        .map_err(io("client datagram"))?;
    // Let the queued bytes land in the receive queues (bounded: if they
    // are still on the way, the migration must carry them all the same).
    for _ in 0..100 {
        let landed = server
            .iter()
            .all(|s| lmig_net::sys::inq(s.as_fd()).unwrap_or(0) > 0);
        if landed {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((
        client,
        ProgramSockets {
            tcp: server.into_iter().map(OwnedFd::from).collect(),
            udp: OwnedFd::from(udp),
        },
    ))
}

/// `getsockopt(TCP_REPAIR)`: is the connection in repair mode?
pub fn in_repair(fd: BorrowedFd<'_>) -> bool {
    lmig_net::sys::getsockopt_int(fd, nix::libc::IPPROTO_TCP, nix::libc::TCP_REPAIR)
        .map_or(true, |v| v != 0)
}

/// Lock tables (`lmig_lock_<pid>_<n>`) of this process in `ns`.
pub fn lock_tables(ns: &Netns) -> Result<Vec<String>, String> {
    let own = format!("{TABLE_PREFIX}{}_", std::process::id());
    let t = ns
        .run(lock::testing::tables)
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(t.into_iter().filter(|t| t.contains(&own)).collect())
}

/// Which service addresses `ns` holds on `eth0`.
pub fn holds_service(ns: &Netns) -> Result<Vec<IpAddr>, String> {
    let have = ns
        .run(|| {
            let eth0 = nix::net::if_::if_nametoindex("eth0").map_err(|e| e.to_string())?;
            handoff::addresses(eth0).map_err(|e| e.to_string())
        })
        .map_err(|e| e.to_string())??;
    Ok(service_addrs()
        .into_iter()
        .map(|a| a.addr)
        .filter(|a| have.iter().any(|h| h.addr == *a))
        .collect())
}

/// What [`exchange`] found.
#[derive(Debug, Default)]
pub struct Exchange {
    /// Bytes (TCP) and datagram bytes (UDP) that did not arrive as sent.
    pub lost_bytes: u64,
    /// What went wrong.
    pub problems: Vec<String>,
}

fn read_exact_eq(s: &mut impl Read, want: &[u8]) -> Result<(), String> {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != want {
        return Err(format!(
            "got {:?}, want {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        ));
    }
    Ok(())
}

impl Exchange {
    fn step(&mut self, what: String, want: &[u8], r: Result<(), String>) -> bool {
        match r {
            Ok(()) => true,
            Err(e) => {
                self.lost_bytes += want.len() as u64;
                self.problems.push(format!("{what}: {e}"));
                false
            }
        }
    }
}

/// The holder of the program's sockets (`tcp` by id, `udp`; host A after
/// an abort, host B after `Commit`) and the client: every byte queued
/// before the migration arrives, then a marker goes each way on every
/// connection and a datagram each way on the UDP socket.
pub fn exchange(client: &mut Client, tcp: Vec<OwnedFd>, udp: Option<OwnedFd>) -> Exchange {
    let mut x = Exchange::default();
    if tcp.len() != CONNS {
        x.problems.push(format!(
            "{} of {CONNS} connections held after the migration",
            tcp.len()
        ));
    }
    for (i, (fd, c)) in tcp.into_iter().zip(client.tcp.iter_mut()).enumerate() {
        let mut s = TcpStream::from(fd);
        let _ = s.set_read_timeout(Some(READ_WAIT));
        let steps: [(&str, bool); 4] = [
            ("c2s", true),
            ("s2c", false),
            ("c2s-mark", true),
            ("s2c-mark", false),
        ];
        for (tag, to_program) in steps {
            let want = pat(tag, i);
            let r = if tag.ends_with("mark") {
                let (w, r): (&mut TcpStream, &mut TcpStream) =
                    if to_program { (c, &mut s) } else { (&mut s, c) };
                w.write_all(&want)
                    .map_err(|e| format!("write: {e}"))
                    .and_then(|()| read_exact_eq(r, &want))
            } else if to_program {
                read_exact_eq(&mut s, &want)
            } else {
                read_exact_eq(c, &want)
            };
            if !x.step(format!("connection {i}, {tag}"), &want, r) {
                break;
            }
        }
    }
    let Some(udp) = udp else {
        x.lost_bytes += 5;
        x.problems.push("the UDP socket is not held".into());
        return x;
    };
    let u = UdpSocket::from(udp);
    let _ = u.set_read_timeout(Some(READ_WAIT));
    let mut buf = [0u8; 64];
    let got = |r: std::io::Result<(usize, SocketAddr)>, buf: &[u8], want: &[u8]| match r {
        Ok((n, _)) if &buf[..n] == want => Ok(()),
        Ok((n, _)) => Err(format!("got {:?}", String::from_utf8_lossy(&buf[..n]))),
        Err(e) => Err(format!("recv: {e}")),
    };
    let r = u.recv_from(&mut buf);
    let r = got(r, &buf, b"u-pre");
    if !x.step("UDP, the datagram queued before".into(), b"u-pre", r) {
        return x;
    }
    let r = client
        .udp
        .send_to(b"u-mark", client.udp_to)
        .map_err(|e| format!("send: {e}"))
        .and_then(|_| got(u.recv_from(&mut buf), &buf, b"u-mark"));
    x.step("UDP, client to program".into(), b"u-mark", r);
    let back = client.udp.local_addr().map_err(|e| format!("{e}"));
    let mut cbuf = [0u8; 64];
    let r = back
        .and_then(|to| u.send_to(b"u-back", to).map_err(|e| format!("send: {e}")))
        .and_then(|_| got(client.udp.recv_from(&mut cbuf), &cbuf, b"u-back"));
    x.step("UDP, program to client".into(), b"u-back", r);
    x
}
