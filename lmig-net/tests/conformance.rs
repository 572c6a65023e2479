//! `NetSource` and `NetSink` through the socket conformance kit, on real
//! sockets: host A holds TCP connections, a listener and a UDP socket on
//! the service address, with a peer process in the client namespace; the
//! sink runs in host B (every call of it in B's namespace). Data is queued
//! both ways before every freeze; the fixture checks each byte arrives once.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Peer, pat, privileged, read_exact_eq};
use lmig_core::conformance::sockets::{self, SocketFixture};
use lmig_core::model::{SocketPrep, SocketRecord};
use lmig_core::traits::SocketSink;
use lmig_net::topology::Topology;
use lmig_net::{NetSink, NetSource, SinkConfig, SourceConfig};

#[test]
#[ignore = "the peer process of the other tests (run by them)"]
fn peer_main() {
    common::peer_main();
}

const CONNS: usize = 3;
const TCP_PORT: u16 = 7400;
const UDP_PORT: u16 = 7401;
const LISTENER_ID: u64 = 100;
const UDP_ID: u64 = 200;
const WAIT: Duration = Duration::from_secs(10);

/// A [`NetSink`] living in host B: every call runs in B's namespace.
struct SinkInB {
    topo: Arc<Topology>,
    sink: Option<NetSink>,
}

impl SinkInB {
    fn run<R: Send + 'static>(&mut self, f: impl FnOnce(&mut NetSink) -> R + Send + 'static) -> R {
        let mut sink = self.sink.take().expect("the sink is back after every call");
        let (sink, r) = self
            .topo
            .b
            .run(move || {
                let r = f(&mut sink);
                (sink, r)
            })
            .expect("run in host B");
        self.sink = Some(sink);
        r
    }
}

impl SocketSink for SinkInB {
    fn prepare(&mut self, plan: &[SocketPrep]) -> lmig_core::Result<()> {
        let plan = plan.to_vec();
        self.run(move |s| s.prepare(&plan))
    }
    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        self.run(move |s| s.restore(batch))
    }
    fn activate(&mut self) -> lmig_core::Result<()> {
        self.run(|s| s.activate())
    }
    fn discard(&mut self) {
        self.run(|s| s.discard())
    }
}

/// Host A's sockets and the peer; `generation` names the data queued now.
struct Hosts {
    // Dropped first: the peer process, then the namespaces.
    peer: Peer,
    listener: Option<TcpListener>,
    udp: Option<UdpSocket>,
    topo: Arc<Topology>,
    addr: SocketAddr,
    udp_addr: SocketAddr,
    peer_udp: SocketAddr,
    generation: u32,
}

fn stream(fd: &OwnedFd) -> Result<TcpStream, String> {
    let s = TcpStream::from(fd.try_clone().map_err(|e| format!("dup: {e}"))?);
    s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    Ok(s)
}

fn udp(fd: &OwnedFd) -> Result<UdpSocket, String> {
    let s = UdpSocket::from(fd.try_clone().map_err(|e| format!("dup: {e}"))?);
    s.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Wait (bounded) until `s` has at least `n` bytes to read.
fn wait_inq(s: &impl std::os::fd::AsFd, n: u32, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    while lmig_net::sys::inq(s.as_fd()).map_err(|e| e.to_string())? < n {
        if Instant::now() > deadline {
            return Err(format!("{what} did not arrive within {WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

impl Hosts {
    fn new() -> Self {
        let topo = Arc::new(Topology::new().expect("topology"));
        topo.add_service_address(&topo.a).unwrap();
        let addr = SocketAddr::new(Topology::SERVICE_V4.into(), TCP_PORT);
        let udp_addr = SocketAddr::new(Topology::SERVICE_V4.into(), UDP_PORT);
        let (listener, udp) = topo
            .a
            .run(move || {
                (
                    TcpListener::bind(addr).unwrap(),
                    UdpSocket::bind(udp_addr).unwrap(),
                )
            })
            .unwrap();
        let mut peer = Peer::spawn(&topo.client);
        let peer_udp = SocketAddr::new(Topology::CLIENT_V4.into(), 7402);
        peer.cmd(&format!("udp_bind {peer_udp}"));
        Hosts {
            peer,
            listener: Some(listener),
            udp: Some(udp),
            topo,
            addr,
            udp_addr,
            peer_udp,
            generation: 0,
        }
    }

    /// Queue generation `g`'s data both ways, and wait until the peer's
    /// part is in the server's receive queues.
    fn queue(&mut self, conns: &[TcpStream], udp: &UdpSocket) -> Result<(), String> {
        let g = self.generation;
        self.peer.cmd(&format!("sendpat q{g}"));
        self.peer.cmd(&format!("udp_send {} 1 u{g}", self.udp_addr));
        for (i, mut c) in conns.iter().enumerate() {
            c.write_all(&pat(&format!("r{g}"), i))
                .map_err(|e| format!("write to conn {i}: {e}"))?;
            wait_inq(c, pat(&format!("q{g}"), i).len() as u32, "the peer's data")?;
        }
        wait_inq(udp, 1, "the peer's datagram")
    }

    /// Generation `g`'s data arrives exactly once, both ways.
    fn take_queued(&mut self, conns: &mut [TcpStream], udp: &UdpSocket) -> Result<(), String> {
        let g = self.generation;
        for (i, c) in conns.iter_mut().enumerate() {
            read_exact_eq(c, &pat(&format!("q{g}"), i)).map_err(|e| format!("conn {i}: {e}"))?;
        }
        self.peer.cmd(&format!("expect r{g}"));
        let mut buf = [0u8; 2048];
        let (n, from) = udp.recv_from(&mut buf).map_err(|e| format!("udp: {e}"))?;
        if buf[..n] != pat(&format!("u{g}"), 0)[..] || from != self.peer_udp {
            return Err(format!(
                "udp: got {:?} from {from}",
                String::from_utf8_lossy(&buf[..n])
            ));
        }
        Ok(())
    }

    /// Fresh data both ways through every connection and the UDP socket.
    fn exchange(
        &mut self,
        conns: &mut [TcpStream],
        udp: &UdpSocket,
        tag: &str,
    ) -> Result<(), String> {
        self.peer.cmd(&format!("sendpat p{tag}"));
        for (i, c) in conns.iter_mut().enumerate() {
            read_exact_eq(c, &pat(&format!("p{tag}"), i)).map_err(|e| format!("conn {i}: {e}"))?;
            c.write_all(&pat(&format!("s{tag}"), i))
                .map_err(|e| format!("write to conn {i}: {e}"))?;
        }
        self.peer.cmd(&format!("expect s{tag}"));
        udp.send_to(&pat(&format!("v{tag}"), 0), self.peer_udp)
            .map_err(|e| format!("udp send: {e}"))?;
        self.peer.cmd(&format!("udp_expect 1 v{tag}"));
        self.peer.cmd("check");
        Ok(())
    }
}

impl SocketFixture for Hosts {
    type Source = NetSource;
    type Sink = SinkInB;

    fn source(&mut self) -> Result<NetSource, String> {
        self.peer.cmd(&format!("connect {} {CONNS} 0", self.addr));
        let listener = self.listener.take().ok_or("source() called twice")?;
        let udp_sock = self.udp.take().ok_or("source() called twice")?;
        let mut src = NetSource::new(SourceConfig::default()).map_err(|e| e.to_string())?;
        let mut conns = Vec::new();
        for i in 0..CONNS {
            let (c, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            conns.push(c.try_clone().map_err(|e| e.to_string())?);
            src.add(i as u64, c.into()).map_err(|e| e.to_string())?;
        }
        let udp_dup = udp_sock.try_clone().map_err(|e| e.to_string())?;
        src.add(LISTENER_ID, listener.into())
            .map_err(|e| e.to_string())?;
        src.add(UDP_ID, udp_sock.into())
            .map_err(|e| e.to_string())?;
        self.queue(&conns, &udp_dup)?;
        Ok(src)
    }

    fn sink(&mut self) -> Result<SinkInB, String> {
        let sink = self
            .topo
            .b
            .run(|| NetSink::new(SinkConfig::default()))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        Ok(SinkInB {
            topo: Arc::clone(&self.topo),
            sink: Some(sink),
        })
    }

    fn source_serves(&mut self, src: &mut NetSource) -> Result<(), String> {
        let dup = |id: u64| -> Result<OwnedFd, String> {
            src.fd(id)
                .ok_or(format!("socket {id} is gone"))?
                .try_clone_to_owned()
                .map_err(|e| e.to_string())
        };
        let mut conns = (0..CONNS as u64)
            .map(|i| stream(&dup(i)?))
            .collect::<Result<Vec<_>, _>>()?;
        let udp_sock = udp(&dup(UDP_ID)?)?;
        self.take_queued(&mut conns, &udp_sock)?;
        self.exchange(&mut conns, &udp_sock, &format!("a{}", self.generation))?;
        self.generation += 1;
        self.queue(&conns, &udp_sock)
    }

    fn hand_over(&mut self) -> Result<(), String> {
        self.topo
            .move_service_address(&self.topo.a, &self.topo.b)
            .map_err(|e| e.to_string())
    }

    fn sink_serves(&mut self, sink: &mut SinkInB) -> Result<(), String> {
        let mut fds = sink.run(|s| s.take_fds());
        let mut take = |id: u64| {
            fds.remove(&id)
                .ok_or(format!("socket {id} was not restored"))
        };
        let mut conns = (0..CONNS as u64)
            .map(|i| stream(&take(i)?))
            .collect::<Result<Vec<_>, _>>()?;
        let udp_sock = udp(&take(UDP_ID)?)?;
        let listener = TcpListener::from(take(LISTENER_ID)?);
        self.take_queued(&mut conns, &udp_sock)?;
        self.exchange(&mut conns, &udp_sock, "b")?;
        // The restored listener accepts a new connection.
        self.peer.cmd(&format!("connect {} 1 0", self.addr));
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + WAIT;
        let mut fresh = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(format!("the restored listener: {e}")),
            }
        };
        fresh.set_nonblocking(false).map_err(|e| e.to_string())?;
        fresh
            .write_all(&pat("n", CONNS))
            .map_err(|e| e.to_string())?;
        self.peer.cmd(&format!("expect_one {CONNS} n"));
        let mut rest = Vec::new();
        fresh
            .set_read_timeout(Some(Duration::from_millis(1)))
            .map_err(|e| e.to_string())?;
        let _ = fresh.read_to_end(&mut rest);
        self.peer.cmd("check");
        Ok(())
    }
}

#[test]
fn net_source_and_sink_conform() {
    if !privileged("net_source_and_sink_conform") {
        return;
    }
    let mut hosts = Hosts::new();
    sockets::check("NetSource/NetSink", &mut hosts).unwrap();
}
