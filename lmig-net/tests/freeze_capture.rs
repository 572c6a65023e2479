//! What the freeze's capture no longer asks every connection, checked on
//! real connections: a send queue `TCP_INFO` shows empty is not read, and
//! sockets planned before the freeze are taken over without copies. Each
//! shortcut must give the same record as the long way.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{Peer, pat, privileged, read_exact_eq};
use lmig_core::model::SocketRecord;
use lmig_core::traits::SocketSource;
use lmig_net::lock::{LockConfig, NetLock};
use lmig_net::topology::Topology;
use lmig_net::{NetError, NetSource, NetSourceConfig};

#[test]
#[ignore = "the peer process of the other tests (run by them)"]
fn peer_main() {
    common::peer_main();
}

/// Freeze `src` and capture every socket it holds, by id.
fn capture(src: &mut NetSource) -> Vec<SocketRecord> {
    src.freeze().unwrap();
    let mut recs = Vec::new();
    src.capture(&mut |b| {
        recs.extend(b);
        Ok(())
    })
    .unwrap();
    recs.sort_by_key(SocketRecord::id);
    recs
}

/// Bytes sent and not yet acknowledged (the network lock holds the peer's
/// ACKs) are in the captured send queue, as sent bytes; an idle
/// connection's send queue, which the capture takes from `TCP_INFO` without
/// `SIOCOUTQ`, is empty. After the abort both connections carry on, every
/// byte once. Fails if the capture took "nothing unsent" for "nothing to
/// send" (the in-flight bytes would be missing from the record).
#[test]
fn bytes_in_flight_are_captured_and_idle_send_queues_are_empty() {
    if !privileged("bytes_in_flight_are_captured_and_idle_send_queues_are_empty") {
        return;
    }
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).unwrap();
    let ip: IpAddr = Topology::SERVICE_V4.into();
    let addr = SocketAddr::new(ip, 7110);
    let listener = topo
        .a
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let mut peer = Peer::spawn(&topo.client);
    peer.cmd(&format!("connect {addr} 2 65536"));
    let mut conns: Vec<TcpStream> = (0..2).map(|_| listener.accept().unwrap().0).collect();
    let mut lock = topo
        .a
        .run(move || {
            let mut lock = NetLock::install(LockConfig::new([ip]))?;
            lock.engage()?;
            Ok::<_, NetError>(lock)
        })
        .unwrap()
        .expect("lock");
    // Sent at once (the window is open), acknowledged never: the ACKs are held.
    conns[0].write_all(&pat("S1", 0)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = lmig_net::sys::tcp_info(conns[0].as_fd()).unwrap();
        if info.notsent_bytes == 0 {
            break info;
        }
        assert!(Instant::now() < deadline, "the bytes were never sent");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(info.unacked > 0, "the bytes are in flight, unacknowledged");
    let idle = lmig_net::sys::tcp_info(conns[1].as_fd()).unwrap();
    assert_eq!(
        (idle.unacked, idle.notsent_bytes),
        (0, 0),
        "idle connection"
    );

    let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
    for (i, c) in conns.iter().enumerate() {
        src.add(i as u64, OwnedFd::from(c.try_clone().unwrap()))
            .unwrap();
    }
    let recs = capture(&mut src);
    let [SocketRecord::Tcp(busy), SocketRecord::Tcp(calm)] = &recs[..] else {
        panic!("two connections, got {recs:?}");
    };
    assert_eq!(&busy.send_queue[..], &pat("S1", 0)[..], "in-flight bytes");
    assert_eq!(busy.unsent_len, 0, "sent already");
    assert!(calm.send_queue.is_empty() && calm.recv_queue.is_empty());

    // Nothing was consumed: after the abort the connections carry on.
    src.abort().unwrap();
    topo.a.run(move || lock.unlock()).unwrap().expect("unlock");
    peer.cmd("expect_one 0 S1");
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&pat("S2", i)).unwrap();
    }
    peer.cmd("expect S2");
    peer.cmd("sendpat P1");
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        read_exact_eq(c, &pat("P1", i)).unwrap();
    }
    peer.cmd("check");
}

/// A loopback connection: (client, server).
fn loopback_pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    (client, server)
}

/// At the freeze, planned sockets are taken by id in any order, once: a
/// second `add` of a planned id is refused (the first stays), a connection
/// opened after the plan comes in under an id of its own and is read at the
/// freeze, and an unplanned id given twice is refused too, also after an
/// abort. Every record carries the queue its connection had.
#[test]
fn planned_and_late_sockets_are_taken_once_each() {
    if !privileged("planned_and_late_sockets_are_taken_once_each") {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let pairs: Vec<(TcpStream, TcpStream)> = (0..4).map(|_| loopback_pair(&l)).collect();
    let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
    for (i, (_, server)) in pairs.iter().take(3).enumerate() {
        src.plan_fd(i as u64, server.as_fd()).unwrap();
    }
    for (i, (client, server)) in pairs.iter().enumerate() {
        let mut client = client;
        client.write_all(&pat("C", i)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while lmig_net::sys::inq(server.as_fd()).unwrap() < pat("C", i).len() as u32 {
            assert!(Instant::now() < deadline, "bytes did not arrive");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let dup = |i: usize| OwnedFd::from(pairs[i].1.try_clone().unwrap());
    // Not in the order planned.
    for i in [2, 0, 1] {
        src.add(i as u64, dup(i)).unwrap();
    }
    assert!(matches!(
        src.add(1, dup(1)),
        Err(NetError::BadId { id: 1, .. })
    ));
    src.add(9, dup(3)).unwrap(); // opened after the plan
    assert!(matches!(
        src.add(9, dup(3)),
        Err(NetError::BadId { id: 9, .. })
    ));
    assert_eq!(src.len(), 4);
    let recs = capture(&mut src);
    let got: Vec<(u64, Vec<u8>)> = recs
        .iter()
        .map(|r| match r {
            SocketRecord::Tcp(c) => (c.id, c.recv_queue.to_vec()),
            other => panic!("not a connection: {other:?}"),
        })
        .collect();
    let want: Vec<(u64, Vec<u8>)> = [(0, 0), (1, 1), (2, 2), (9, 3)]
        .into_iter()
        .map(|(id, i)| (id, pat("C", i)))
        .collect();
    assert_eq!(got, want);
    // After an abort the ids held stay taken, planned ones included.
    src.abort().unwrap();
    for id in [0, 9] {
        assert!(matches!(
            src.add(id, dup(0)),
            Err(NetError::BadId { id: got, .. }) if got == id
        ));
    }
    assert_eq!(src.len(), 4);
}
