//! UDP migration: bound and connected sockets move with the datagrams
//! waiting in their receive queues, delivered once, in order, with their
//! senders; capture consumes nothing on the source.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::{Peer, migrate, pat, privileged};
use lmig_core::model::SocketRecord;
use lmig_core::traits::SocketSource;
use lmig_net::topology::Topology;
use lmig_net::{NetSource, NetSourceConfig};

#[test]
#[ignore = "the peer process of the other tests (run by them)"]
fn peer_main() {
    common::peer_main();
}

/// Capture (freeze, capture, abort) duplicates of `socks`; returns the
/// pending-datagram counts. Nothing is consumed.
fn pending(socks: &[&UdpSocket]) -> Vec<usize> {
    let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
    for (i, s) in socks.iter().enumerate() {
        src.add(i as u64, OwnedFd::from(s.try_clone().unwrap()))
            .unwrap();
    }
    src.freeze().unwrap();
    let mut counts = vec![0; socks.len()];
    src.capture(&mut |b| {
        for r in b {
            let SocketRecord::Udp(u) = r else {
                panic!("not UDP")
            };
            counts[u.id as usize] = u.recv_queue.len();
        }
        Ok(())
    })
    .unwrap();
    src.abort().unwrap();
    counts
}

#[test]
fn udp_moves_with_pending_datagrams() {
    if !privileged("udp_moves_with_pending_datagrams") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.add_service_address(&topo.a).unwrap();
    let peer_addr: SocketAddr = SocketAddr::new(Topology::CLIENT_V4.into(), 6000);
    let (u0, u1) = topo
        .a
        .run(move || {
            let u0 = UdpSocket::bind((Topology::SERVICE_V4, 5300)).unwrap();
            let u1 = UdpSocket::bind((Topology::SERVICE_V4, 5301)).unwrap();
            u1.connect(peer_addr).unwrap();
            (u0, u1)
        })
        .unwrap();
    let mut peer = Peer::spawn(&topo.client);
    peer.cmd(&format!("udp_bind {peer_addr}"));
    peer.cmd(&format!("udp_send {}:5300 3 D", Topology::SERVICE_V4));
    peer.cmd(&format!("udp_send {}:5301 2 C", Topology::SERVICE_V4));
    let deadline = Instant::now() + Duration::from_secs(10);
    // Bounded wait for the datagrams; each look is a full capture that consumes nothing.
    while pending(&[&u0, &u1]) != [3, 2] {
        assert!(Instant::now() < deadline, "datagrams did not arrive");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(pending(&[&u0, &u1]), [3, 2], "a capture consumes nothing");

    let (records, fds) = migrate(&topo, vec![u0.into(), u1.into()]);
    let SocketRecord::Udp(r1) = &records[1] else {
        panic!("not UDP")
    };
    assert_eq!(r1.peer, Some(peer_addr));
    let mut it = fds.into_iter();
    let (u0, u1) = (
        UdpSocket::from(it.next().unwrap()),
        UdpSocket::from(it.next().unwrap()),
    );
    for u in [&u0, &u1] {
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let mut buf = [0u8; 2048];
    for i in 0..3 {
        let (n, from) = u0.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &pat("D", i)[..]);
        assert_eq!(from, peer_addr);
    }
    for i in 0..2 {
        let n = u1.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &pat("C", i)[..]);
    }
    // New datagrams come after the migrated ones, and replies reach the peer.
    peer.cmd(&format!("udp_send {}:5300 1 E", Topology::SERVICE_V4));
    let (n, _) = u0.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &pat("E", 0)[..]);
    u1.send(&pat("R", 0)).unwrap();
    peer.cmd("udp_expect 1 R");
}
