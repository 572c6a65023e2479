//! A program's event loop behind [`ProgramSockets`] (lend, park, resume),
//! and the destination's sockets shown early ([`NetSink::on_register`]) and
//! handed out typed ([`NetSink::take_restored`]): real sockets in a network
//! namespace, TCP repair on them.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::privileged;
use lmig_core::BoxError;
use lmig_core::model::{SocketKind, SocketRecord};
use lmig_core::traits::{SocketSink, SocketSource};
use lmig_net::topology::Topology;
use lmig_net::{NetSink, NetSourceConfig, ProgramSockets, RestoredSocket, SinkConfig, SocketOwner};

const CONN: u64 = 1;
const LISTENER: u64 = 2;
const UDP: u64 = 3;
const UNIX: u64 = 4;

/// The program's loop, reduced to what it owns: its sockets while it serves
/// (`None` while parked), and what the adapter asked of it.
#[derive(Default)]
struct Loop {
    sockets: Option<Vec<(u64, OwnedFd)>>,
    calls: Vec<&'static str>,
}

/// The loop as [`SocketOwner`] (shared with the test, which serves with it).
#[derive(Clone, Default)]
struct Owner(Arc<Mutex<Loop>>);

impl SocketOwner for Owner {
    fn park(&mut self) -> Result<Vec<(u64, OwnedFd)>, BoxError> {
        let mut l = self.0.lock().unwrap();
        l.calls.push("park");
        l.sockets.take().ok_or_else(|| "parked twice".into())
    }

    fn resume(&mut self, sockets: Vec<(u64, OwnedFd)>) -> Result<(), BoxError> {
        let mut l = self.0.lock().unwrap();
        l.calls.push("resume");
        if l.sockets.is_some() {
            return Err("resumed while serving".into());
        }
        l.sockets = Some(sockets);
        Ok(())
    }

    fn released(&mut self) {
        self.0.lock().unwrap().calls.push("released");
    }
}

impl Owner {
    fn serving(&self, sockets: Vec<(u64, OwnedFd)>) {
        self.0.lock().unwrap().sockets = Some(sockets);
    }

    fn calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut self.0.lock().unwrap().calls)
    }

    /// The sockets it serves, by id (panics while parked).
    fn take_sockets(&self) -> HashMap<u64, OwnedFd> {
        let s = self.0.lock().unwrap().sockets.take();
        s.expect("the loop has its sockets").into_iter().collect()
    }
}

/// Wait (bounded) until `s` has `n` unread bytes.
fn wait_inq(s: &impl AsFd, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lmig_net::sys::inq(s.as_fd()).unwrap() < n {
        assert!(Instant::now() < deadline, "data did not arrive");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A connection with bytes waiting both ways, a listener, a UDP socket with
/// a datagram waiting: the program's sockets (ids CONN, LISTENER, UDP), and
/// the test's ends (client, the UDP peer, the listener's address).
fn program_sockets() -> (Vec<(u64, OwnedFd)>, TcpStream, UdpSocket, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    client.write_all(b"to the server").unwrap();
    (&server).write_all(b"to the client").unwrap();
    wait_inq(&server, 13);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.connect(udp.local_addr().unwrap()).unwrap();
    udp.connect(peer.local_addr().unwrap()).unwrap();
    peer.send(b"datagram 0").unwrap();
    wait_inq(&udp, 10);
    let sockets = vec![
        (CONN, server.into()),
        (LISTENER, listener.into()),
        (UDP, udp.into()),
    ];
    (sockets, client, peer, at)
}

/// Every socket works as before: the queued bytes and datagram are there,
/// new ones go both ways, the listener accepts.
fn check_serving(mut sockets: HashMap<u64, OwnedFd>, client: &mut TcpStream, peer: &UdpSocket) {
    let mut server = TcpStream::from(sockets.remove(&CONN).unwrap());
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 13];
    server.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"to the server", "the queued bytes are still there");
    server.write_all(b"more").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 17];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"to the clientmore");
    let udp = UdpSocket::from(sockets.remove(&UDP).unwrap());
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 64];
    let n = udp.recv(&mut b).unwrap();
    assert_eq!(
        &b[..n],
        b"datagram 0",
        "the waiting datagram is still there"
    );
    peer.send(b"datagram 1").unwrap();
    let n = udp.recv(&mut b).unwrap();
    assert_eq!(&b[..n], b"datagram 1");
    let listener = TcpListener::from(sockets.remove(&LISTENER).unwrap());
    let at = listener.local_addr().unwrap();
    let _c = TcpStream::connect(at).unwrap();
    listener.accept().unwrap();
}

/// A freeze that refuses one socket (a Unix socket among TCP and UDP ones)
/// fails, and the abort gives every socket back to the loop, the refused
/// one included, with every byte of every queue; the loop was parked once
/// to lend its sockets and once at the freeze.
#[test]
fn an_aborted_freeze_gives_every_socket_back_to_the_loop() {
    if !privileged("an_aborted_freeze_gives_every_socket_back_to_the_loop") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            let (mut sockets, mut client, peer, _) = program_sockets();
            let (unix, _other) = UnixDatagram::pair().unwrap();
            sockets.push((UNIX, unix.into()));
            let owner = Owner::default();
            owner.serving(sockets);
            let mut ps = ProgramSockets::new(owner.clone(), NetSourceConfig::default());
            let mut plan: Vec<u64> = ps.plan().unwrap().iter().map(|p| p.id).collect();
            plan.sort_unstable();
            assert_eq!(
                plan,
                [CONN, LISTENER, UDP],
                "the Unix socket is not planned"
            );
            assert_eq!(owner.calls(), ["park", "resume"], "lent for a moment");
            let err = ps.freeze().expect_err("a Unix socket cannot be moved");
            assert!(err.to_string().contains("socket 4"), "{err}");
            ps.abort().unwrap();
            assert_eq!(owner.calls(), ["park", "resume"]);
            let mut back = owner.take_sockets();
            let mut ids: Vec<u64> = back.keys().copied().collect();
            ids.sort_unstable();
            assert_eq!(ids, [CONN, LISTENER, UDP, UNIX], "every socket comes back");
            back.remove(&UNIX);
            check_serving(back, &mut client, &peer);
        })
        .unwrap();
}

/// One migration through the adapter, restored in the same namespace once
/// the originals are closed: the destination shows every socket to the
/// registration callback before handing it out (the prepared connection
/// before the freeze, the listener and the UDP socket as activation
/// starts), and hands them out as their std types, non-blocking as asked.
#[test]
fn program_sockets_move_and_come_back_typed() {
    if !privileged("program_sockets_move_and_come_back_typed") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            let (sockets, mut client, peer, at) = program_sockets();
            let owner = Owner::default();
            owner.serving(sockets);
            let mut ps = ProgramSockets::new(owner.clone(), NetSourceConfig::default());
            let plan = ps.plan().unwrap();
            ps.freeze().unwrap();
            let mut recs: Vec<SocketRecord> = Vec::new();
            ps.capture(&mut |b| {
                recs.extend(b);
                Ok(())
            })
            .unwrap();
            ps.release().unwrap();
            assert_eq!(owner.calls(), ["park", "resume", "park", "released"]);

            let mut sink = NetSink::new(SinkConfig::default().with_nonblocking(true)).unwrap();
            type Shown = Arc<Mutex<Vec<(u64, SocketKind, bool, RawFd)>>>;
            let shown: Shown = Arc::default();
            let seen = Arc::clone(&shown);
            sink.on_register(move |v| {
                seen.lock()
                    .unwrap()
                    .push((v.id, v.kind, v.prepared, v.fd.as_raw_fd()))
            });
            sink.prepare(&plan).unwrap();
            let before = shown.lock().unwrap().clone();
            assert_eq!(before.len(), 1, "{before:?}");
            assert_eq!(
                (before[0].0, before[0].1, before[0].2),
                (CONN, SocketKind::TcpEstablished, true)
            );
            let prepared: Vec<(u64, RawFd)> = sink
                .prepared_sockets()
                .map(|v| (v.id, v.fd.as_raw_fd()))
                .collect();
            assert_eq!(prepared, [(CONN, before[0].3)]);
            sink.restore(recs).unwrap();
            let mut late: Vec<u64> = sink.unprepared_sockets().map(|v| v.id).collect();
            late.sort_unstable();
            assert_eq!(late, [LISTENER, UDP]);
            assert_eq!(sink.pending_sockets().count(), 3);
            sink.activate().unwrap();
            let mut all = shown.lock().unwrap().clone();
            all.sort_unstable_by_key(|s| s.0);
            let kinds: Vec<(u64, SocketKind, bool)> = all.iter().map(|s| (s.0, s.1, s.2)).collect();
            assert_eq!(
                kinds,
                [
                    (CONN, SocketKind::TcpEstablished, true),
                    (LISTENER, SocketKind::TcpListen, false),
                    (UDP, SocketKind::Udp, false),
                ]
            );

            let mut restored = sink.take_restored();
            assert_eq!(restored.len(), 3);
            for (id, s) in &restored {
                let fd = all.iter().find(|x| x.0 == *id).unwrap().3;
                assert_eq!(s.as_fd().as_raw_fd(), fd, "socket {id} is the one shown");
            }
            let RestoredSocket::Tcp(mut server) = restored.remove(&CONN).unwrap() else {
                panic!("the connection is not a TcpStream")
            };
            let RestoredSocket::Listener(listener) = restored.remove(&LISTENER).unwrap() else {
                panic!("the listener is not a TcpListener")
            };
            let RestoredSocket::Udp(udp) = restored.remove(&UDP).unwrap() else {
                panic!("the UDP socket is not a UdpSocket")
            };
            assert_eq!(listener.local_addr().unwrap(), at);
            // Non-blocking: nothing waits on the listener.
            let e = listener.accept().expect_err("nothing to accept");
            assert_eq!(e.kind(), ErrorKind::WouldBlock);
            wait_inq(&server, 13);
            let mut b = [0u8; 64];
            let n = server.read(&mut b).unwrap();
            assert_eq!(&b[..n], b"to the server");
            let e = server.read(&mut b).expect_err("nothing more to read");
            assert_eq!(e.kind(), ErrorKind::WouldBlock);
            server.write_all(b"!").unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut b = [0u8; 14];
            client.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"to the client!");
            wait_inq(&udp, 10);
            let mut b = [0u8; 64];
            let n = udp.recv(&mut b).unwrap();
            assert_eq!(&b[..n], b"datagram 0");
            let e = udp.recv(&mut b).expect_err("nothing more");
            assert_eq!(e.kind(), ErrorKind::WouldBlock);
            peer.send(b"datagram 1").unwrap();
            wait_inq(&udp, 10);
            let n = udp.recv(&mut b).unwrap();
            assert_eq!(&b[..n], b"datagram 1");
        })
        .unwrap();
}
