//! 10,000 connections: every one moves with its queues, exactly once and in
//! order; the peers (another process: the open-file limit is 20,000 per
//! process) see no RST or FIN.
//!
//! Source and destination run one after the other in the same namespace
//! (the 4-tuples are freed by the source's release), in batches.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{Peer, pat, privileged};
use lmig_core::traits::{SocketSink, SocketSource};
use lmig_net::topology::Topology;
use lmig_net::{NetSink, NetSource, NetSourceConfig, SinkConfig};

#[test]
#[ignore = "the peer process of the other tests (run by them)"]
fn peer_main() {
    common::peer_main();
}

#[test]
fn tcp_ten_thousand_connections() {
    if !privileged("tcp_ten_thousand_connections") {
        return;
    }
    const N: usize = 10_000;
    let topo = Topology::new().unwrap();
    topo.add_service_address(&topo.a).unwrap();
    let addr = SocketAddr::new(Topology::SERVICE_V4.into(), 7100);
    let listener: TcpListener = topo
        .a
        .run(move || {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(4096).unwrap();
            s.into()
        })
        .unwrap();
    let acceptor = std::thread::spawn(move || {
        (0..N)
            .map(|_| listener.accept().map(|(s, _)| s))
            .collect::<std::io::Result<Vec<TcpStream>>>()
    });
    let mut peer = Peer::spawn(&topo.client);
    peer.cmd(&format!("connect {addr} {N} 0"));
    let mut conns = acceptor.join().unwrap().unwrap();
    // Peer connections are numbered in connect order; accept order is the same
    // (one client, sequential connects), which the data checks confirm.
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&pat("S1", i)).unwrap();
    }
    peer.cmd("sendpat P1");
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, c) in conns.iter().enumerate() {
        // Bounded wait for each connection's bytes.
        while lmig_net::sys::inq(c.as_fd()).unwrap() < pat("P1", i).len() as u32 {
            assert!(Instant::now() < deadline, "data did not arrive");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
    for (i, c) in conns.into_iter().enumerate() {
        src.add(i as u64, OwnedFd::from(c)).unwrap();
    }
    src.freeze().unwrap();
    let mut batches = Vec::new();
    src.capture(&mut |b| {
        batches.push(b);
        Ok(())
    })
    .unwrap();
    assert!(batches.len() > 1, "captured in batches");
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), N);
    src.release().unwrap();
    let mut fds = topo
        .a
        .run(move || {
            let mut sink = NetSink::new(SinkConfig::default()).unwrap();
            for b in batches {
                sink.restore(b).unwrap();
            }
            sink.activate().unwrap();
            sink.take_fds()
        })
        .unwrap();
    assert_eq!(fds.len(), N);
    let mut conns: Vec<TcpStream> = (0..N)
        .map(|i| TcpStream::from(fds.remove(&(i as u64)).unwrap()))
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        common::read_exact_eq(c, &pat("P1", i)).unwrap();
        c.write_all(&pat("S2", i)).unwrap();
    }
    peer.cmd("expect S1");
    peer.cmd("expect S2");
    peer.cmd("sendpat P2");
    for (i, c) in conns.iter_mut().enumerate() {
        common::read_exact_eq(c, &pat("P2", i)).unwrap();
    }
    peer.cmd("check");
}
