//! TCP migration between two hosts (network namespaces A and B) with a real
//! peer process in a third: data queued before the freeze arrives exactly
//! once and in order, both ways; the peer sees no RST or FIN; half-closed
//! connections; listeners; abort; impossible records.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{Peer, migrate, migrate_with, pat, privileged, tcp_state};
use lmig_core::model::{SocketRecord, TcpListenState, TcpStateKind};
use lmig_core::traits::SocketSource;
use lmig_net::topology::Topology;
use lmig_net::{NetError, NetSink, NetSource, NetSourceConfig, SinkConfig};

#[test]
#[ignore = "the peer process of the other tests (run by them)"]
fn peer_main() {
    common::peer_main();
}

/// Wait (bounded) until `s` has `n` unread bytes.
fn wait_inq(s: &impl AsFd, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lmig_net::sys::inq(s.as_fd()).unwrap() < n {
        assert!(Instant::now() < deadline, "data did not arrive");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Wait (bounded) until `s` is in TCP state `st`.
fn wait_state(s: &impl AsFd, st: u8) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcp_state(s) != st {
        assert!(
            Instant::now() < deadline,
            "TCP state {} never became {st}",
            tcp_state(s)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Write the big pattern without blocking until the send buffer is full; returns the count.
fn fill(s: &mut TcpStream) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut k = 0usize;
    let mut buf = vec![0u8; 16384];
    // Bounded: at most 8 MiB.
    while k < 8 << 20 {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = common::big_byte(k + j);
        }
        match s.write(&buf) {
            Ok(n) => k += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("fill: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    k
}

/// Connections of this namespace with local port `port`, in any state but
/// listening (`/proc/net/tcp` and `tcp6`).
fn connections_on_port(port: u16) -> usize {
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|local| local.rsplit(':').next())
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
                })
                .filter(|l| l.split_whitespace().nth(3) != Some("0A"))
                .count()
        })
        .sum()
}

struct Setup {
    topo: Topology,
    peer: Peer,
    listener: TcpListener,
    addr: SocketAddr,
}

fn setup(v6: bool, port: u16) -> Setup {
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).unwrap();
    let ip: IpAddr = if v6 {
        Topology::SERVICE_V6.into()
    } else {
        Topology::SERVICE_V4.into()
    };
    let addr = SocketAddr::new(ip, port);
    let listener = topo
        .a
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    let peer = Peer::spawn(&topo.client);
    Setup {
        topo,
        peer,
        listener,
        addr,
    }
}

fn migrate_established(v6: bool) {
    let Setup {
        topo,
        mut peer,
        listener,
        addr,
    } = setup(v6, 7000);
    const N: usize = 4;
    peer.cmd(&format!("connect {addr} {N} 4096"));
    let mut conns: Vec<TcpStream> = (0..N).map(|_| listener.accept().unwrap().0).collect();
    conns[0].set_nodelay(true).unwrap();
    let k1 = socket2::SockRef::from(&conns[1]);
    k1.set_keepalive(true).unwrap();
    k1.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(77)))
        .unwrap();
    // Queued before the freeze: server -> peer (unread by the peer) and
    // peer -> server (unread by the server); the last connection also has a
    // send queue the peer's small window holds back (unsent bytes).
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&pat("S1", i)).unwrap();
    }
    let big = fill(&mut conns[N - 1]);
    peer.cmd("sendpat P1");
    for (i, c) in conns.iter().enumerate() {
        wait_inq(c, pat("P1", i).len() as u32);
    }

    // IPv6 closes the originals in the background (both ways run).
    let cfg = NetSourceConfig::default().with_close_in_background(v6);
    let (records, fds) = migrate_with(&topo, conns.into_iter().map(OwnedFd::from).collect(), cfg);
    // The originals are gone from A (closed in repair mode: no TIME_WAIT),
    // also when closed by the background thread.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = topo
            .a
            .run(move || connections_on_port(addr.port()))
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} original sockets still open on A"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for r in &records {
        let SocketRecord::Tcp(c) = r else {
            panic!("not TCP")
        };
        assert_eq!(c.state, TcpStateKind::Established);
        assert_eq!(
            &c.recv_queue[..],
            &pat("P1", c.id as usize)[..],
            "receive queue of {}",
            c.id
        );
        assert_eq!(c.local.is_ipv6(), v6);
        assert!(c.timestamps_ok && c.sack_ok && c.wscale_ok);
        assert!(c.window.is_some());
        match c.id {
            0 => assert!(c.tcp.nodelay),
            1 => assert!(c.tcp.keepalive && c.tcp.keep_idle == 77),
            _ => {}
        }
        if c.id as usize == N - 1 {
            assert!(
                c.unsent_len > 0,
                "the last connection should have unsent bytes"
            );
        }
    }
    // The restored timestamp clocks start ahead of the captured ones, so a
    // segment the source sent after the capture never makes the peer drop
    // the destination's as old (PAWS).
    for (r, fd) in records.iter().zip(&fds) {
        let SocketRecord::Tcp(c) = r else { continue };
        let now = lmig_net::sys::tcp_timestamp(fd.as_fd()).unwrap();
        let ahead = now.wrapping_sub(c.timestamp) as i32;
        assert!(
            ahead >= lmig_net::tcp::TIMESTAMP_LEAD_MS as i32 - 1,
            "connection {}: restored clock only {ahead} ms ahead",
            c.id
        );
    }
    let mut conns: Vec<TcpStream> = fds.into_iter().map(TcpStream::from).collect();
    assert!(conns[0].nodelay().unwrap(), "TCP_NODELAY restored");
    let k1 = socket2::SockRef::from(&conns[1]);
    assert!(k1.keepalive().unwrap(), "SO_KEEPALIVE restored");
    assert_eq!(k1.tcp_keepalive_time().unwrap(), Duration::from_secs(77));
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(tcp_state(c), 1);
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // Exactly once and in order: the bytes queued before the freeze, then new ones.
        common::read_exact_eq(c, &pat("P1", i)).unwrap();
        c.write_all(&pat("S2", i)).unwrap();
    }
    peer.cmd("expect S1");
    peer.cmd(&format!("expect_big {} {big}", N - 1));
    peer.cmd("expect S2");
    peer.cmd("sendpat P2");
    for (i, c) in conns.iter_mut().enumerate() {
        common::read_exact_eq(c, &pat("P2", i)).unwrap();
    }
    peer.cmd("check");
    for i in 0..N {
        assert_eq!(
            peer.cmd(&format!("state {i}")),
            "ok 1",
            "peer connection {i} established"
        );
    }
}

#[test]
fn tcp_ipv4_moves_between_hosts() {
    if privileged("tcp_ipv4_moves_between_hosts") {
        migrate_established(false);
    }
}

#[test]
fn tcp_ipv6_moves_between_hosts() {
    if privileged("tcp_ipv6_moves_between_hosts") {
        migrate_established(true);
    }
}

/// Several MiB queued both ways on one connection: the peer's bytes the
/// server has not read (receive queue) and the server's bytes the peer's
/// small window holds back (send queue, mostly never sent) all arrive
/// exactly once and in order after the move. The restored socket needs
/// buffers larger than a new socket's for both queues.
#[test]
fn tcp_large_queues_both_ways_move_intact() {
    if !privileged("tcp_large_queues_both_ways_move_intact") {
        return;
    }
    let Setup {
        topo,
        mut peer,
        listener,
        addr,
    } = setup(false, 7010);
    const RECV: usize = 4 << 20;
    peer.cmd(&format!("connect {addr} 1 4096"));
    let (mut conn, _) = listener.accept().unwrap();
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        lmig_net::sys::setsockopt_int(conn.as_fd(), libc::SOL_SOCKET, opt, 32 << 20).unwrap();
    }
    // Server -> peer: up to 8 MiB, held back by the peer's 4 KiB window.
    let sent = fill(&mut conn);
    assert!(sent >= 4 << 20, "only {sent} bytes fit the send queue");
    // Peer -> server: 4 MiB the server does not read.
    peer.cmd(&format!("sendbig 0 {RECV}"));
    wait_inq(&conn, RECV as u32);
    // The estimate the policy gets: both queues, as the ioctls count them.
    let mut probe = NetSource::new(NetSourceConfig::default()).unwrap();
    probe.add(0, conn.try_clone().unwrap().into()).unwrap();
    let outq = lmig_net::sys::outq(conn.as_fd()).unwrap() as u64;
    assert_eq!(probe.queued_bytes().unwrap(), RECV as u64 + outq);
    drop(probe);

    let (records, fds) = migrate(&topo, vec![OwnedFd::from(conn)]);
    let SocketRecord::Tcp(c) = &records[0] else {
        panic!("not TCP")
    };
    assert_eq!(c.recv_queue.len(), RECV, "receive queue captured whole");
    assert!(
        (0..RECV)
            .step_by(4093)
            .all(|k| c.recv_queue[k] == common::big_byte(k)),
        "receive queue captured in order"
    );
    // The peer's window took a few KiB; the rest is queued here.
    let acked = sent - c.send_queue.len();
    assert!(
        acked < 64 << 10,
        "send queue captured whole ({acked} acked)"
    );
    assert!(
        (0..c.send_queue.len())
            .step_by(4093)
            .all(|k| c.send_queue[k] == common::big_byte(acked + k)),
        "send queue captured in order"
    );
    let mut conn = TcpStream::from(fds.into_iter().next().unwrap());
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    common::read_big(&mut conn, RECV).unwrap();
    peer.cmd(&format!("expect_big 0 {sent}"));
    conn.write_all(&pat("S2", 0)).unwrap();
    peer.cmd("expect S2");
    peer.cmd("sendpat P2");
    common::read_exact_eq(&mut conn, &pat("P2", 0)).unwrap();
    peer.cmd("check");
    assert_eq!(peer.cmd("state 0"), "ok 1", "peer connection established");
}

/// With `SinkConfig::unsent_in_background`, the bytes the source never
/// sent (held back by the peer's small window) are written after
/// activation by the sink's writer: the gate holds the connection until
/// they are in, and every byte arrives once and in order, before what the
/// program writes after the gate opens.
#[test]
fn tcp_unsent_tail_written_after_activation_keeps_order() {
    if !privileged("tcp_unsent_tail_written_after_activation_keeps_order") {
        return;
    }
    let Setup {
        topo,
        mut peer,
        listener,
        addr,
    } = setup(false, 7014);
    peer.cmd(&format!("connect {addr} 1 4096"));
    let (mut conn, _) = listener.accept().unwrap();
    lmig_net::sys::setsockopt_int(
        conn.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        32 << 20,
    )
    .unwrap();
    let sent = fill(&mut conn);
    assert!(sent >= 4 << 20, "only {sent} bytes fit the send queue");
    let (records, fds, tails) = common::migrate_full(
        &topo,
        vec![OwnedFd::from(conn)],
        NetSourceConfig::default(),
        SinkConfig::default().with_unsent_in_background(true),
    );
    let SocketRecord::Tcp(c) = &records[0] else {
        panic!("not TCP")
    };
    assert!(
        c.unsent_len as usize > (1 << 20),
        "the test needs a never-sent tail ({} bytes)",
        c.unsent_len
    );
    let tails = tails.expect("the sink has a gate");
    // The program waits for the gate before its first write.
    assert!(tails.wait(Duration::from_secs(20)), "tail not written");
    assert!(!tails.is_pending(0));
    assert_eq!(tails.take_written(), [0]);
    assert!(tails.take_failures().is_empty());
    let mut conn = TcpStream::from(fds.into_iter().next().unwrap());
    conn.write_all(&pat("S2", 0)).unwrap();
    peer.cmd(&format!("expect_big 0 {sent}"));
    peer.cmd("expect S2");
    peer.cmd("check");
    assert_eq!(peer.cmd("state 0"), "ok 1", "peer connection established");
}

/// Without the window probe (`RepairExit::NoWindowProbe`) a connection with
/// a send queue, restored with send window 0 (to learn it from the probe's
/// answer) and given the captured window back at activation, loses nothing:
/// the bytes the peer's closed window held back all arrive, in order, then
/// the new ones. What it cannot tell is whether the put-back or the kernel's
/// own zero-window probe timer reopened the window: it proves the path does
/// no harm, not that the put-back is what made the bytes flow.
#[test]
fn tcp_send_queue_without_window_probe_keeps_order() {
    if !privileged("tcp_send_queue_without_window_probe_keeps_order") {
        return;
    }
    let Setup {
        topo,
        mut peer,
        listener,
        addr,
    } = setup(false, 7015);
    peer.cmd(&format!("connect {addr} 1 4096"));
    let (mut conn, _) = listener.accept().unwrap();
    let sent = fill(&mut conn);
    let (records, fds, _) = common::migrate_full(
        &topo,
        vec![OwnedFd::from(conn)],
        NetSourceConfig::default(),
        SinkConfig::default().with_exit(lmig_net::RepairExit::NoWindowProbe),
    );
    let SocketRecord::Tcp(c) = &records[0] else {
        panic!("not TCP")
    };
    assert!(!c.send_queue.is_empty(), "the test needs a send queue");
    let mut conn = TcpStream::from(fds.into_iter().next().unwrap());
    conn.write_all(&pat("S2", 0)).unwrap();
    peer.cmd(&format!("expect_big 0 {sent}"));
    peer.cmd("expect S2");
    peer.cmd("check");
}

/// Connection 0: the peer sent FIN (we are in CLOSE_WAIT with unread bytes);
/// connection 1: we sent FIN (FIN_WAIT2), the peer still sends; connection
/// 2: our FIN waits behind bytes the peer's window holds back (FIN_WAIT1).
#[test]
fn tcp_half_closed_both_directions() {
    if !privileged("tcp_half_closed_both_directions") {
        return;
    }
    let Setup {
        topo,
        mut peer,
        listener,
        addr,
    } = setup(false, 7001);
    // The last connection's peer has a small window: connection 2 sends FIN
    // behind bytes the window holds back (FIN_WAIT1 with unsent bytes).
    peer.cmd(&format!("connect {addr} 3 4096"));
    let mut conns: Vec<TcpStream> = (0..3).map(|_| listener.accept().unwrap().0).collect();
    peer.cmd("sendpat_one 0 P1");
    peer.cmd("shutdown_wr 0");
    wait_state(&conns[0], 8);
    conns[1].write_all(&pat("S1", 1)).unwrap();
    conns[1].shutdown(std::net::Shutdown::Write).unwrap();
    wait_state(&conns[1], 5);
    let big = fill(&mut conns[2]);
    conns[2].shutdown(std::net::Shutdown::Write).unwrap();
    wait_state(&conns[2], 4);

    let (records, fds) = migrate(&topo, conns.into_iter().map(OwnedFd::from).collect());
    let st: Vec<TcpStateKind> = records
        .iter()
        .map(|r| match r {
            SocketRecord::Tcp(c) => c.state,
            _ => panic!("not TCP"),
        })
        .collect();
    assert_eq!(
        st,
        [
            TcpStateKind::CloseWait,
            TcpStateKind::FinWait2,
            TcpStateKind::FinWait1
        ]
    );
    let mut conns: Vec<TcpStream> = fds.into_iter().map(TcpStream::from).collect();
    for c in &conns {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    // 0: the pending bytes, then end-of-file, and we may still send.
    common::read_exact_eq(&mut conns[0], &pat("P1", 0)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        conns[0].read(&mut b).unwrap(),
        0,
        "end-of-file after the peer's FIN"
    );
    assert_eq!(tcp_state(&conns[0]), 8, "CLOSE_WAIT restored");
    conns[0].write_all(&pat("S2", 0)).unwrap();
    peer.cmd("expect_one 0 S2");
    // 1: the peer reads what we sent, then end-of-file, and may still send.
    peer.cmd("expect_one 1 S1");
    peer.cmd("expect_eof 1");
    peer.cmd("sendpat_one 1 P2");
    common::read_exact_eq(&mut conns[1], &pat("P2", 1)).unwrap();
    // 2: every byte, then end-of-file.
    peer.cmd(&format!("expect_big 2 {big}"));
    peer.cmd("expect_eof 2");
    peer.cmd("check");
}

/// A listener moves; new connections reach the destination.
#[test]
fn tcp_listener_moves() {
    if !privileged("tcp_listener_moves") {
        return;
    }
    let Setup {
        topo,
        mut peer,
        listener,
        addr,
    } = setup(true, 7002);
    let (records, mut fds) = migrate(&topo, vec![OwnedFd::from(listener)]);
    let SocketRecord::Listen(l) = &records[0] else {
        panic!("not a listener")
    };
    assert_eq!(l.local, addr);
    let listener = TcpListener::from(fds.remove(0));
    peer.cmd(&format!("connect {addr} 1 0"));
    let (mut c, _) = listener.accept().unwrap();
    c.write_all(&pat("S1", 0)).unwrap();
    peer.cmd("expect S1");
}

/// Freeze `conns` connections and capture them (the capture cut by an
/// error after `cut_after` batches of one, if given), then abort: every
/// connection serves on, both ways, and nothing was consumed.
fn abort_keeps_serving(port: u16, conns: usize, cut_after: Option<usize>) {
    let Setup {
        topo: _topo,
        mut peer,
        listener,
        addr,
    } = setup(false, port);
    peer.cmd(&format!("connect {addr} {conns} 0"));
    let mut socks: Vec<TcpStream> = (0..conns).map(|_| listener.accept().unwrap().0).collect();
    for (i, c) in socks.iter_mut().enumerate() {
        c.write_all(&pat("S1", i)).unwrap();
    }
    peer.cmd("sendpat P1");
    for (i, c) in socks.iter().enumerate() {
        wait_inq(c, pat("P1", i).len() as u32);
    }
    let cfg = match cut_after {
        Some(_) => NetSourceConfig::default()
            .with_batch_size(1)
            .with_threads(1),
        None => NetSourceConfig::default(),
    };
    let mut src = NetSource::new(cfg).unwrap();
    for (i, c) in socks.into_iter().enumerate() {
        src.add(i as u64, c.into()).unwrap();
    }
    src.freeze().unwrap();
    let (mut batches, mut records) = (0, 0);
    let captured = src.capture(&mut |b| {
        batches += 1;
        records += b.len();
        if Some(batches) == cut_after {
            return Err(lmig_core::MigrationError::channel_closed("cut by the test"));
        }
        Ok(())
    });
    match cut_after {
        None => {
            captured.unwrap();
            assert_eq!(records, conns);
        }
        Some(n) => {
            assert!(captured.is_err(), "the capture must stop at the cut");
            assert_eq!(batches, n, "the capture went on after the cut");
        }
    }
    src.abort().unwrap();
    let mut socks: Vec<TcpStream> = src
        .into_fds()
        .into_iter()
        .map(|(_, fd)| fd.into())
        .collect();
    for (i, c) in socks.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        common::read_exact_eq(c, &pat("P1", i)).unwrap();
        c.write_all(&pat("S2", i)).unwrap();
    }
    peer.cmd("expect S1");
    peer.cmd("expect S2");
    peer.cmd("check");
}

/// Abort after capture: the source leaves repair mode and keeps serving; nothing was consumed.
#[test]
fn tcp_abort_keeps_serving() {
    if privileged("tcp_abort_keeps_serving") {
        abort_keeps_serving(7003, 3, None);
    }
}

/// Connections enter repair mode at their capture, not at the freeze: a
/// capture cut after the second batch, then an abort, leaves every
/// connection working, the captured ones and the ones never touched.
#[test]
fn tcp_abort_during_capture_keeps_every_connection() {
    if privileged("tcp_abort_during_capture_keeps_every_connection") {
        abort_keeps_serving(7004, 4, Some(2));
    }
}

/// A loopback connection (in the calling thread's namespace) whose client
/// sent `data`, unread by the server: the server end captured under id 1
/// and released. Returns the client end and the records.
fn captured_loopback(data: &[u8]) -> (TcpStream, Vec<SocketRecord>) {
    let (mut client, server) = loopback_pair();
    client.write_all(data).unwrap();
    wait_inq(&server, data.len() as u32);
    let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
    src.add(1, server.into()).unwrap();
    let recs = freeze_and_capture(&mut src);
    src.release().unwrap();
    (client, recs)
}

/// A loopback connection in the calling thread's namespace: (client, server).
fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    (client, server)
}

/// Freeze `src` and capture every socket it holds.
fn freeze_and_capture(src: &mut NetSource) -> Vec<SocketRecord> {
    src.freeze().unwrap();
    let mut recs = Vec::new();
    src.capture(&mut |b| {
        recs.extend(b);
        Ok(())
    })
    .unwrap();
    recs
}

/// The estimate of queued bytes counts connections handed over (ioctls)
/// and connections only planned (`sock_diag`, by cookie); the capture hands
/// its records over in batches cut at `batch_bytes` of queue data, each
/// queue whole and in order.
#[test]
fn queued_bytes_are_estimated_and_batches_cut_by_bytes() {
    if !privileged("queued_bytes_are_estimated_and_batches_cut_by_bytes") {
        return;
    }
    const EACH: usize = 3000;
    let pairs: Vec<(TcpStream, TcpStream)> = (0..4)
        .map(|i| {
            let (mut client, server) = loopback_pair();
            let data: Vec<u8> = (0..EACH).map(|k| common::big_byte(k + i)).collect();
            client.write_all(&data).unwrap();
            wait_inq(&server, EACH as u32);
            (client, server)
        })
        .collect();
    // Only planned: found by cookie in one dump of this namespace.
    let mut planned = NetSource::new(NetSourceConfig::default()).unwrap();
    for (i, (_, server)) in pairs.iter().enumerate() {
        planned.plan_fd(i as u64, server.as_fd()).unwrap();
    }
    assert_eq!(planned.queued_bytes().unwrap(), 4 * EACH as u64);
    drop(planned);
    for (batch_bytes, want) in [
        (5000, vec![1, 1, 1, 1]),
        (6000, vec![2, 2]),
        (1 << 20, vec![4]),
    ] {
        let cfg = NetSourceConfig::default()
            .with_threads(1)
            .with_batch_bytes(batch_bytes);
        let mut src = NetSource::new(cfg).unwrap();
        for (i, (_, server)) in pairs.iter().enumerate() {
            src.add(i as u64, server.try_clone().unwrap().into())
                .unwrap();
        }
        // Handed over: asked one by one.
        assert_eq!(src.queued_bytes().unwrap(), 4 * EACH as u64);
        src.freeze().unwrap();
        let mut sizes = Vec::new();
        src.capture(&mut |b| {
            for r in &b {
                let SocketRecord::Tcp(c) = r else {
                    panic!("not TCP")
                };
                let i = c.id as usize;
                let want: Vec<u8> = (0..EACH).map(|k| common::big_byte(k + i)).collect();
                assert_eq!(&c.recv_queue[..], &want[..], "queue of {i}");
            }
            sizes.push(b.len());
            Ok(())
        })
        .unwrap();
        assert_eq!(sizes, want, "batches at {batch_bytes} bytes");
        // The records are gone, the memory they were read into is still
        // held (given back after the freeze, not in it).
        assert!(
            src.held_queue_bytes() >= 4 * EACH,
            "held {} after the capture",
            src.held_queue_bytes()
        );
        // Aborted: the connections serve on, queues intact, the memory
        // given back; the next attempt reads into an arena of its own.
        src.abort().unwrap();
        assert_eq!(src.held_queue_bytes(), 0, "held after an abort");
    }
    for (i, (_, server)) in pairs.iter().enumerate() {
        assert_eq!(
            lmig_net::sys::inq(server.as_fd()).unwrap(),
            EACH as u32,
            "{i}"
        );
    }
}

/// The queue memory a capture read into is held past the freeze and
/// given back at the release (on the closing thread, after `Commit`), not
/// when the records are dropped inside the freeze.
#[test]
fn queue_memory_is_given_back_at_the_release() {
    if !privileged("queue_memory_is_given_back_at_the_release") {
        return;
    }
    const EACH: usize = 5000;
    let (mut client, server) = loopback_pair();
    let data: Vec<u8> = (0..EACH).map(common::big_byte).collect();
    client.write_all(&data).unwrap();
    wait_inq(&server, EACH as u32);
    let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
    src.add(1, server.into()).unwrap();
    assert_eq!(src.held_queue_bytes(), 0, "no estimate: no arena");
    assert_eq!(src.queued_bytes().unwrap(), EACH as u64);
    assert!(src.held_queue_bytes() >= EACH);
    src.freeze().unwrap();
    let mut got = Vec::new();
    src.capture(&mut |b| {
        for r in b {
            let SocketRecord::Tcp(c) = r else {
                panic!("not TCP")
            };
            got.extend_from_slice(&c.recv_queue);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(got, data, "the queue, once and in order");
    assert!(src.held_queue_bytes() >= EACH, "held past the capture");
    src.release().unwrap();
    assert_eq!(src.held_queue_bytes(), 0, "given back at the release");
}

/// `SinkConfig::nonblocking`: restored sockets come back non-blocking (no
/// `fcntl` needed by an event loop) and carry their data as usual.
#[test]
fn tcp_restored_nonblocking_when_asked() {
    if !privileged("tcp_restored_nonblocking_when_asked") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            let (mut client, recs) = captured_loopback(b"queued");
            let mut sink = NetSink::new(SinkConfig::default().with_nonblocking(true)).unwrap();
            sink.restore_batch(recs).unwrap();
            sink.activate_sockets().unwrap();
            let fd = sink.take(1).expect("restored");
            let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
            assert_ne!(
                flags & libc::O_NONBLOCK,
                0,
                "restored socket is non-blocking"
            );
            let mut restored = TcpStream::from(fd);
            let mut buf = [0u8; 6];
            // Bounded: the queued bytes are in the socket already.
            let mut got = 0;
            for _ in 0..1000 {
                match restored.read(&mut buf[got..]) {
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("{e}"),
                }
                if got == buf.len() {
                    break;
                }
            }
            assert_eq!(&buf, b"queued");
            let err = restored.read(&mut buf).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
            restored.write_all(b"reply").unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            common::read_exact_eq(&mut client, b"reply").unwrap();
        })
        .unwrap();
}

/// Impossible records are rejected by name; the rest of the batch is restored.
#[test]
fn tcp_bad_records_are_rejected_by_name() {
    if !privileged("tcp_bad_records_are_rejected_by_name") {
        return;
    }
    let topo = Topology::new().unwrap();
    let out = topo
        .a
        .run(|| {
            let (mut client, mut recs) = captured_loopback(b"hello");
            let SocketRecord::Tcp(good) = recs.remove(0) else {
                panic!()
            };
            let mut mixed = good.clone();
            mixed.id = 2;
            mixed.peer = "[2001:db8::9]:4000".parse().unwrap();
            let mut over = good.clone();
            over.id = 3;
            over.unsent_len = over.send_queue.len() as u32 + 1;
            let mut seq = good.clone();
            seq.id = 4;
            if let Some(w) = seq.window.as_mut() {
                w.rcv_wup = seq.rcv_seq.wrapping_add(1000);
            }
            let batch = vec![
                SocketRecord::Tcp(mixed),
                SocketRecord::Tcp(good),
                SocketRecord::Tcp(over),
                SocketRecord::Tcp(seq),
            ];
            let mut sink = NetSink::new(SinkConfig::default()).unwrap();
            let err = sink.restore_batch(batch).unwrap_err();
            sink.activate_sockets().unwrap();
            let mut fds = sink.take_fds();
            let mut restored = TcpStream::from(
                fds.remove(&1)
                    .unwrap_or_else(|| panic!("the valid connection was not restored: {err:?}")),
            );
            restored
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            common::read_exact_eq(&mut restored, b"hello").unwrap();
            restored.write_all(b"world").unwrap();
            common::read_exact_eq(&mut client, b"world").unwrap();
            err
        })
        .unwrap();
    let NetError::Partial { total, failures } = &out else {
        panic!("{out}")
    };
    assert_eq!(*total, 4);
    let ids: Vec<u64> = failures.iter().map(|f| f.id).collect();
    assert_eq!(ids, [2, 3, 4]);
    for f in failures {
        let msg = f.error.to_string();
        assert!(
            msg.contains(&format!("TCP connection {}", f.id)),
            "error names the connection: {msg}"
        );
    }
}

/// A listener that cannot listen (its address held by a live listener) is
/// refused at restore, before `Commit`, by its id and with the call that
/// failed; every other socket of the batch is restored and, activated on
/// two threads, talks.
#[test]
fn tcp_listener_that_cannot_listen_is_refused_before_commit() {
    if !privileged("tcp_listener_that_cannot_listen_is_refused_before_commit") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            let mut clients = Vec::new();
            let mut batch = Vec::new();
            // Enough for both activation threads to get a share.
            for id in 1..=200u64 {
                let (client, mut recs) = captured_loopback(format!("c{id:03}").as_bytes());
                let SocketRecord::Tcp(mut c) = recs.remove(0) else {
                    panic!("not a connection")
                };
                c.id = id;
                batch.push(SocketRecord::Tcp(c));
                clients.push((id, client));
            }
            let busy = TcpListener::bind("127.0.0.1:0").unwrap();
            let held = TcpListenState {
                id: 1000,
                local: busy.local_addr().unwrap(),
                backlog: 16,
                sock: Default::default(),
                tcp: Default::default(),
            };
            batch.insert(150, SocketRecord::Listen(held));
            let mut sink = NetSink::new(SinkConfig::default().with_activate_threads(2)).unwrap();
            let err = sink.restore_batch(batch).unwrap_err();
            let NetError::Partial { total, failures } = &err else {
                panic!("{err}")
            };
            assert_eq!(*total, 201);
            let ids: Vec<u64> = failures.iter().map(|f| f.id).collect();
            assert_eq!(ids, [1000], "{err}");
            let msg = failures[0].error.to_string();
            assert!(
                msg.contains("TCP listener 1000") && msg.contains("listen"),
                "{msg}"
            );
            assert_eq!(sink.restored_len(), 200);
            sink.activate_sockets().unwrap();
            let mut fds = sink.take_fds();
            assert_eq!(fds.len(), 200);
            for (id, mut client) in clients {
                let fd = fds
                    .remove(&id)
                    .unwrap_or_else(|| panic!("{id} not activated"));
                talks(
                    TcpStream::from(fd),
                    &mut client,
                    format!("c{id:03}").as_bytes(),
                );
            }
        })
        .unwrap();
}

/// A restored connection talks: it holds `queued` (what its client sent
/// before the capture), and its client hears its reply.
fn talks(mut restored: TcpStream, client: &mut TcpStream, queued: &[u8]) {
    restored
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    common::read_exact_eq(&mut restored, queued).unwrap();
    restored.write_all(b"ok").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    common::read_exact_eq(client, b"ok").unwrap();
}

/// `SO_REUSEADDR` of a socket, read directly.
fn reuse_addr(s: &impl AsFd) -> bool {
    lmig_net::sys::getsockopt_int(s.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap() != 0
}

/// A listener listens at restore, before `Commit`, beside restored
/// connections on its own port, whatever their `SO_REUSEADDR` and its own
/// (a connection without it used to make `listen` fail after `Commit`,
/// when nothing could be undone); activation leaves each option as captured.
#[test]
fn tcp_listener_listens_at_restore_beside_its_connections() {
    if !privileged("tcp_listener_listens_at_restore_beside_its_connections") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let mut clients = Vec::new();
            let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
            for id in 1..=3u64 {
                let mut client = TcpStream::connect(addr).unwrap();
                let (server, _) = l.accept().unwrap();
                client.write_all(&pat("C", id as usize)).unwrap();
                wait_inq(&server, pat("C", id as usize).len() as u32);
                src.add(id, server.into()).unwrap();
                clients.push(client);
            }
            src.add(0, l.into()).unwrap();
            let mut recs = freeze_and_capture(&mut src);
            src.release().unwrap();
            // Every record without SO_REUSEADDR but connection 2's.
            for r in &mut recs {
                match r {
                    SocketRecord::Tcp(c) => c.sock.reuse_addr = c.id == 2,
                    SocketRecord::Listen(l) => l.sock.reuse_addr = false,
                    _ => panic!("unexpected record"),
                }
            }
            // The connections first, as a session may send them.
            recs.sort_by_key(|r| std::cmp::Reverse(r.id()));
            let mut sink = NetSink::new(SinkConfig::default()).unwrap();
            sink.restore_batch(recs).unwrap();
            // Listening already (nothing left to refuse after Commit): a
            // new client is accepted into its backlog.
            let mut late = TcpStream::connect(addr).expect("the restored listener listens");
            late.write_all(b"late").unwrap();
            sink.activate_sockets().unwrap();
            let mut fds = sink.take_fds();
            let listener = TcpListener::from(fds.remove(&0).expect("listener restored"));
            assert!(
                !reuse_addr(&listener),
                "the listener's SO_REUSEADDR as captured"
            );
            let (mut accepted, _) = listener.accept().unwrap();
            accepted
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            common::read_exact_eq(&mut accepted, b"late").unwrap();
            for (i, mut client) in clients.into_iter().enumerate() {
                let id = i as u64 + 1;
                let c = TcpStream::from(fds.remove(&id).expect("connection restored"));
                assert_eq!(reuse_addr(&c), id == 2, "connection {id}'s SO_REUSEADDR");
                talks(c, &mut client, &pat("C", id as usize));
            }
        })
        .unwrap();
}

/// Where an attempt stops before it is aborted.
#[derive(Clone, Copy, Debug)]
enum AbortAt {
    /// After the plan (the sockets read before the freeze).
    Plan,
    /// After the freeze (locked, nothing captured).
    Freeze,
    /// In the capture, after two batches of one socket.
    Capture,
    /// After the whole capture.
    Captured,
}

/// One attempt over duplicates of `socks` (ids by position), aborted at
/// `at`; the records when the whole capture ran.
fn aborted_attempt(socks: &[OwnedFd], at: AbortAt) -> Option<Vec<SocketRecord>> {
    let mut src = NetSource::new(
        NetSourceConfig::default()
            .with_batch_size(1)
            .with_threads(1),
    )
    .unwrap();
    for (id, s) in socks.iter().enumerate() {
        src.add(id as u64, s.try_clone().unwrap()).unwrap();
    }
    src.plan().unwrap();
    let mut recs = Vec::new();
    if !matches!(at, AbortAt::Plan) {
        src.freeze().unwrap();
    }
    if matches!(at, AbortAt::Capture | AbortAt::Captured) {
        let cut = matches!(at, AbortAt::Capture).then_some(2);
        let captured = src.capture(&mut |b| {
            recs.extend(b);
            if Some(recs.len()) == cut {
                return Err(lmig_core::MigrationError::channel_closed("cut by the test"));
            }
            Ok(())
        });
        assert_eq!(captured.is_err(), cut.is_some(), "{at:?}");
    }
    src.abort().unwrap();
    drop(src.into_fds());
    matches!(at, AbortAt::Captured).then_some(recs)
}

/// What may differ between two captures of an unchanged socket: the
/// timestamp clock runs.
fn without_clock(mut recs: Vec<SocketRecord>) -> Vec<SocketRecord> {
    for r in &mut recs {
        if let SocketRecord::Tcp(c) = r {
            c.timestamp = 0;
        }
    }
    recs
}

/// `b` as captured again after `a`: `snd_wl1`, the sequence number of the
/// peer segment that last updated the send window, moves with every ACK
/// the peer sends (the abort's window probe draws one), up to `rcv_nxt`; it
/// is checked to stay in that range and then taken from `a`. Every other
/// field must be equal.
fn same_socket(a: &SocketRecord, b: &SocketRecord, after: AbortAt) {
    let mut b = b.clone();
    if let (SocketRecord::Tcp(a), SocketRecord::Tcp(b)) = (a, &mut b) {
        if let (Some(wa), Some(wb)) = (a.window, b.window.as_mut()) {
            let rcv_nxt = a.rcv_seq.wrapping_add(a.recv_queue.len() as u32);
            let moved = wb.snd_wl1.wrapping_sub(wa.snd_wl1);
            assert!(
                moved <= rcv_nxt.wrapping_sub(wa.snd_wl1),
                "connection {}: snd_wl1 {} outside [{}, {rcv_nxt}] after an abort at {after:?}",
                a.id,
                wb.snd_wl1,
                wa.snd_wl1
            );
            wb.snd_wl1 = wa.snd_wl1;
        }
    }
    if a != &b {
        panic!(
            "socket {} captured again after an abort at {after:?}: {}",
            a.id(),
            record_diff(a, &b)
        );
    }
}

/// The fields in which two records of one socket differ (queues by length
/// and first differing byte: they can be megabytes).
fn record_diff(a: &SocketRecord, b: &SocketRecord) -> String {
    let (SocketRecord::Tcp(a), SocketRecord::Tcp(b)) = (a, b) else {
        return format!("{a:?} != {b:?}");
    };
    let mut out = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            out.push(format!("{name}: {x} -> {y}"));
        }
    };
    let queue = |q: &[u8]| {
        format!(
            "{} bytes, hash {:x}",
            q.len(),
            q.iter()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)))
        )
    };
    field("state", format!("{:?}", a.state), format!("{:?}", b.state));
    field("snd_seq", a.snd_seq.to_string(), b.snd_seq.to_string());
    field("rcv_seq", a.rcv_seq.to_string(), b.rcv_seq.to_string());
    field("send_queue", queue(&a.send_queue), queue(&b.send_queue));
    field(
        "unsent_len",
        a.unsent_len.to_string(),
        b.unsent_len.to_string(),
    );
    field("recv_queue", queue(&a.recv_queue), queue(&b.recv_queue));
    field("mss", a.mss.to_string(), b.mss.to_string());
    field(
        "wscale",
        format!("{} {} {}", a.snd_wscale, a.rcv_wscale, a.wscale_ok),
        format!("{} {} {}", b.snd_wscale, b.rcv_wscale, b.wscale_ok),
    );
    field(
        "options",
        format!("{} {}", a.sack_ok, a.timestamps_ok),
        format!("{} {}", b.sack_ok, b.timestamps_ok),
    );
    field(
        "window",
        format!("{:?}", a.window),
        format!("{:?}", b.window),
    );
    field("sock", format!("{:?}", a.sock), format!("{:?}", b.sock));
    field("tcp", format!("{:?}", a.tcp), format!("{:?}", b.tcp));
    out.join("; ")
}

/// Nothing a failed attempt does changes the next one: after an abort at
/// each step (plan, freeze, in the capture, after it), a capture records
/// every socket exactly as the first did — options (`SO_REUSEADDR`, which
/// leaving repair mode clears, among them), queues, sequence numbers,
/// windows — and the sockets' options read directly are unchanged; then the
/// connections serve on and the set migrates.
#[test]
fn tcp_an_aborted_attempt_leaves_every_socket_as_it_was() {
    if !privileged("tcp_an_aborted_attempt_leaves_every_socket_as_it_was") {
        return;
    }
    let Setup {
        topo,
        mut peer,
        listener,
        addr,
    } = setup(false, 7010);
    const N: usize = 4;
    peer.cmd(&format!("connect {addr} {N} 4096"));
    let mut conns: Vec<TcpStream> = (0..N).map(|_| listener.accept().unwrap().0).collect();
    let reuse = [true, false, true, false];
    for (c, r) in conns.iter().zip(reuse) {
        socket2::SockRef::from(c).set_reuse_address(r).unwrap();
    }
    conns[0].set_nodelay(true).unwrap();
    let k1 = socket2::SockRef::from(&conns[1]);
    k1.set_keepalive(true).unwrap();
    k1.set_mark(7).unwrap();
    k1.set_tos_v4(0x10).unwrap();
    socket2::SockRef::from(&conns[2])
        .set_tcp_user_timeout(Some(Duration::from_millis(30_000)))
        .unwrap();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&pat("S1", i)).unwrap();
    }
    // Bytes the peer's small window holds back: a send queue with unsent
    // bytes. Captured once nothing is in flight any more (the window closed),
    // so that only an attempt could change it.
    let big = fill(&mut conns[N - 1]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fd = conns[N - 1].as_fd();
        let (outq, unsent) = (
            lmig_net::sys::outq(fd).unwrap(),
            lmig_net::sys::outq_nsd(fd).unwrap(),
        );
        if outq == unsent && unsent > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} bytes stay in flight",
            outq - unsent
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    peer.cmd("sendpat P1");
    for (i, c) in conns.iter().enumerate() {
        wait_inq(c, pat("P1", i).len() as u32);
    }
    let mut socks: Vec<OwnedFd> = conns.into_iter().map(OwnedFd::from).collect();
    socks.push(OwnedFd::from(listener));
    let listen_reuse = reuse_addr(&socks[N]);

    let first = without_clock(aborted_attempt(&socks, AbortAt::Captured).unwrap());
    assert_eq!(first.len(), N + 1);
    for at in [
        AbortAt::Plan,
        AbortAt::Freeze,
        AbortAt::Capture,
        AbortAt::Captured,
    ] {
        aborted_attempt(&socks, at);
        for (i, s) in socks[..N].iter().enumerate() {
            assert_eq!(
                reuse_addr(s),
                reuse[i],
                "connection {i} after an abort at {at:?}"
            );
        }
        assert_eq!(reuse_addr(&socks[N]), listen_reuse, "listener after {at:?}");
        let again = without_clock(aborted_attempt(&socks, AbortAt::Captured).unwrap());
        for (a, b) in first.iter().zip(&again) {
            same_socket(a, b, at);
        }
    }

    // The connections serve on, then move with the listener.
    let (_, fds) = migrate(&topo, socks);
    let mut fds = fds.into_iter();
    let mut conns: Vec<TcpStream> = fds.by_ref().take(N).map(TcpStream::from).collect();
    let listener = TcpListener::from(fds.next().unwrap());
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(reuse_addr(c), reuse[i], "connection {i} restored");
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        common::read_exact_eq(c, &pat("P1", i)).unwrap();
        c.write_all(&pat("S2", i)).unwrap();
    }
    peer.cmd("expect S1");
    peer.cmd(&format!("expect_big {} {big}", N - 1));
    peer.cmd("expect S2");
    peer.cmd(&format!("connect {addr} 1 0"));
    let (mut c, _) = listener.accept().unwrap();
    c.write_all(&pat("S3", N)).unwrap();
    peer.cmd(&format!("expect_one {N} S3"));
    peer.cmd("check");
}

/// `pidfd_getfd`: a connection is taken from a process by fd number (here
/// this process, which ptrace rules always allow) and captured.
#[test]
fn tcp_fd_taken_from_process() {
    if !privileged("tcp_fd_taken_from_process") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            use std::os::fd::AsRawFd;
            let (mut client, server) = loopback_pair();
            client.write_all(b"abc").unwrap();
            wait_inq(&server, 3);
            let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
            src.add_from_process(9, std::process::id() as i32, server.as_raw_fd())
                .unwrap();
            assert_eq!(
                lmig_net::sys::local_addr(src.fd(9).unwrap()).unwrap(),
                Some(server.local_addr().unwrap())
            );
            let recs = freeze_and_capture(&mut src);
            let SocketRecord::Tcp(c) = &recs[0] else {
                panic!("not TCP")
            };
            assert_eq!(&c.recv_queue[..], b"abc");
            // Abort: the program's own fd (the same socket) keeps working.
            src.abort().unwrap();
            drop(src);
            let mut server = server;
            common::read_exact_eq(&mut server, b"abc").unwrap();
        })
        .unwrap();
}

/// A planned connection's timestamp clock is computed at the capture from
/// the offset read at the plan: what the kernel would say, never less (the
/// restored clock must not run behind what the peer saw).
#[test]
fn planned_timestamp_clock_is_computed_never_behind() {
    if !privileged("planned_timestamp_clock_is_computed_never_behind") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            let (client, server) = loopback_pair();
            let probe = server.try_clone().unwrap();
            let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
            src.plan_fd(1, server.as_fd()).unwrap();
            // Long enough for a clock read at the plan to be visibly stale.
            std::thread::sleep(Duration::from_millis(30));
            src.add(1, server.into()).unwrap();
            src.freeze().unwrap();
            let before = lmig_net::sys::tcp_timestamp(probe.as_fd()).unwrap();
            let mut recs = Vec::new();
            src.capture(&mut |b| {
                recs.extend(b);
                Ok(())
            })
            .unwrap();
            let after = lmig_net::sys::tcp_timestamp(probe.as_fd()).unwrap();
            src.abort().unwrap();
            let SocketRecord::Tcp(c) = &recs[0] else {
                panic!("not TCP")
            };
            assert!(c.timestamps_ok);
            // A set lowest bit would make the restored clock count microseconds.
            assert_eq!(c.timestamp & 1, 0, "a millisecond clock is even");
            let (behind, ahead) = (
                c.timestamp.wrapping_sub(before) as i32,
                c.timestamp.wrapping_sub(after) as i32,
            );
            assert!(
                behind >= 0 && ahead <= 4,
                "captured {} with the kernel at {before}..{after}",
                c.timestamp
            );
            drop(client);
        })
        .unwrap();
}

/// `plan_fd` reads sockets the program keeps; at the freeze `add` takes
/// them and the capture checks their identity; a planned socket not handed
/// over is forgotten.
#[test]
fn planned_sockets_are_handed_over_at_the_freeze() {
    if !privileged("planned_sockets_are_handed_over_at_the_freeze") {
        return;
    }
    let Setup {
        topo: _topo,
        mut peer,
        listener,
        addr,
    } = setup(false, 7010);
    peer.cmd(&format!("connect {addr} 3 4096"));
    let mut conns: Vec<TcpStream> = (0..3).map(|_| listener.accept().unwrap().0).collect();
    let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
    for (i, c) in conns.iter().enumerate() {
        let prep = src.plan_fd(i as u64, c.as_fd()).unwrap();
        assert_eq!(prep.peer, Some(c.peer_addr().unwrap()));
    }
    assert!(matches!(
        src.plan_fd(0, conns[0].as_fd()),
        Err(NetError::BadId { id: 0, .. })
    ));
    assert_eq!(src.plan().unwrap().len(), 3);
    // Another socket under a planned id fails the capture (on the capture
    // threads, not in `add`), before anything is sent; the abort leaves
    // both sockets as they were.
    let mut wrong = NetSource::new(NetSourceConfig::default()).unwrap();
    wrong.plan_fd(0, conns[0].as_fd()).unwrap();
    wrong.plan_fd(1, conns[1].as_fd()).unwrap();
    wrong
        .add(1, OwnedFd::from(conns[1].try_clone().unwrap()))
        .unwrap();
    wrong
        .add(0, OwnedFd::from(conns[2].try_clone().unwrap()))
        .unwrap();
    wrong.freeze().unwrap();
    let mut sent = 0;
    let err = wrong
        .capture(&mut |b| {
            sent += b.len();
            Ok(())
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("socket id 0: names another socket than the one planned"),
        "{err}"
    );
    assert_eq!(sent, 0, "a failed batch is not handed on");
    wrong.abort().unwrap();
    drop(wrong);
    let kept = conns.pop().unwrap(); // planned, never handed over
    for (i, c) in conns.into_iter().enumerate() {
        src.add(i as u64, OwnedFd::from(c)).unwrap();
    }
    src.freeze().unwrap();
    let mut ids = Vec::new();
    src.capture(&mut |b| {
        ids.extend(b.iter().map(|r| r.id()));
        Ok(())
    })
    .unwrap();
    ids.sort_unstable();
    assert_eq!(ids, [0, 1]);
    // Aborted: the handed-over connections serve on.
    src.abort().unwrap();
    let mut back: Vec<TcpStream> = src
        .into_fds()
        .into_iter()
        .map(|(_, fd)| TcpStream::from(fd))
        .collect();
    back.push(kept);
    for (i, c) in back.iter_mut().enumerate() {
        c.write_all(&pat("S1", i)).unwrap();
    }
    peer.cmd("expect S1");
}

/// A connection the peer resets before the capture is left out (listed by
/// `gone`), not a failed migration; the others are captured.
#[test]
fn reset_connection_is_left_out_of_the_capture() {
    if !privileged("reset_connection_is_left_out_of_the_capture") {
        return;
    }
    let Setup {
        topo,
        peer: _peer,
        listener,
        addr,
    } = setup(false, 7020);
    let mut clients: Vec<Option<TcpStream>> = topo
        .client
        .run(move || {
            (0..3)
                .map(|_| TcpStream::connect(addr).map(Some))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .unwrap()
        .unwrap();
    let conns: Vec<TcpStream> = (0..3).map(|_| listener.accept().unwrap().0).collect();
    let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
    for (i, c) in conns.iter().enumerate() {
        src.add(i as u64, OwnedFd::from(c.try_clone().unwrap()))
            .unwrap();
    }
    src.plan().unwrap();
    // Client 1 resets its connection (linger 0): the server side goes to CLOSE.
    let c1 = clients[1].take().unwrap();
    socket2::SockRef::from(&c1)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c1);
    wait_state(&conns[1], 7);
    src.freeze().unwrap();
    let mut ids = Vec::new();
    src.capture(&mut |b| {
        ids.extend(b.iter().map(|r| r.id()));
        Ok(())
    })
    .unwrap();
    ids.sort_unstable();
    assert_eq!(ids, [0, 2]);
    assert_eq!(src.gone(), [1]);
    src.abort().unwrap();
    assert_eq!(
        src.into_fds().len(),
        3,
        "every fd comes back after the abort"
    );
}

/// The epoll set's events for up to `ms` (one `epoll_wait` with a timeout).
fn epoll_tokens(ep: &OwnedFd, ms: i32) -> Vec<(u64, u32)> {
    use std::os::fd::AsRawFd;
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
    // SAFETY: `evs` is a valid buffer of 16 events for the kernel to fill.
    let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), 16, ms) };
    assert!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
    evs[..n as usize]
        .iter()
        .map(|e| (e.u64, e.events))
        .collect()
}

fn epoll_add(ep: &OwnedFd, fd: std::os::fd::RawFd, token: u64) {
    use std::os::fd::AsRawFd;
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: token,
    };
    // SAFETY: plain system call on fds this test owns; `ev` outlives it.
    let r = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(r, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
}

fn inode(fd: std::os::fd::RawFd) -> Option<u64> {
    // SAFETY: `stat` is plain data; all zeros is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a number (at worst EBADF) into a valid buffer.
    let r = unsafe { libc::fstat(fd, &mut st) };
    (r == 0).then_some(st.st_ino)
}

/// `prepared_sockets` lists the sockets made before the freeze, which the
/// restore fills: a program registers them with its poller early (as an
/// event loop does, edge-triggered) and `unprepared_sockets` at activation, and
/// then hears every connection and no stale hang-up. A prepared socket that
/// no record restores is closed at activation.
#[test]
fn prepared_sockets_join_a_poller_before_the_freeze() {
    if !privileged("prepared_sockets_join_a_poller_before_the_freeze") {
        return;
    }
    let topo = Topology::new().unwrap();
    topo.a
        .run(|| {
            use std::os::fd::{AsRawFd, FromRawFd, RawFd};
            let pairs: Vec<(TcpStream, TcpStream)> = (0..4).map(|_| loopback_pair()).collect();
            let mut src = NetSource::new(NetSourceConfig::default()).unwrap();
            let mut plan = Vec::new();
            for (i, (_, server)) in pairs.iter().enumerate() {
                plan.push(src.plan_fd(i as u64 + 1, server.as_fd()).unwrap());
            }
            let mut clients = Vec::new();
            for (i, (client, server)) in pairs.into_iter().enumerate() {
                src.add(i as u64 + 1, server.into()).unwrap();
                clients.push(client);
            }
            let mut recs = freeze_and_capture(&mut src);
            src.release().unwrap();

            let mut sink = NetSink::new(SinkConfig::default().with_nonblocking(true)).unwrap();
            // Connection 4 is not in the sink's plan; connection 3's record never comes.
            sink.prepare_sockets(&plan[..3]).unwrap();
            recs.retain(|r| r.id() != 3);
            let mut prepared: Vec<(u64, RawFd)> = sink
                .prepared_sockets()
                .map(|v| (v.id, v.fd.as_raw_fd()))
                .collect();
            prepared.sort_unstable();
            assert_eq!(prepared.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3]);
            // SAFETY: plain system call; its result is checked below.
            let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            assert!(
                raw >= 0,
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: `raw` is a new epoll instance nothing else owns.
            let ep = unsafe { OwnedFd::from_raw_fd(raw) };
            for &(id, fd) in &prepared {
                epoll_add(&ep, fd, id);
            }
            let unused = (
                prepared[2].1,
                inode(prepared[2].1).expect("prepared socket open"),
            );

            sink.restore_batch(recs).unwrap();
            let late: Vec<(u64, RawFd)> = sink
                .unprepared_sockets()
                .map(|v| (v.id, v.fd.as_raw_fd()))
                .collect();
            assert_eq!(late.iter().map(|p| p.0).collect::<Vec<_>>(), [4]);
            let mut pending: Vec<(u64, RawFd)> = sink
                .pending_sockets()
                .map(|v| (v.id, v.fd.as_raw_fd()))
                .collect();
            pending.sort_unstable();
            assert_eq!(
                pending[..2],
                prepared[..2],
                "the restore fills the prepared sockets"
            );
            for &(id, fd) in &late {
                epoll_add(&ep, fd, id);
            }
            sink.activate_sockets().unwrap();
            assert_ne!(
                inode(unused.0),
                Some(unused.1),
                "a prepared socket nothing restored is closed"
            );
            let fds = sink.take_fds();
            assert_eq!(fds.len(), 3);
            // Connected and quiet: nothing to report, no hang-up left over
            // from the time the prepared sockets were unconnected. Connection
            // 3's socket is closed (checked above), but a process another
            // test forks at that moment holds the file until it execs, and
            // epoll drops a file only when its last reference goes: its
            // hang-up, from before the restore, may still be reported once.
            let live = |evs: Vec<(u64, u32)>| -> Vec<(u64, u32)> {
                evs.into_iter().filter(|&(token, _)| token != 3).collect()
            };
            assert_eq!(live(epoll_tokens(&ep, 0)), []);

            for (i, c) in clients.iter_mut().enumerate() {
                if i != 2 {
                    c.write_all(b"x").unwrap();
                }
            }
            let mut heard = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while heard.len() < 3 && Instant::now() < deadline {
                for (token, events) in live(epoll_tokens(&ep, 100)) {
                    assert_eq!(
                        events & libc::EPOLLHUP as u32,
                        0,
                        "connection {token}: hang-up"
                    );
                    heard.push(token);
                }
            }
            heard.sort_unstable();
            assert_eq!(heard, [1, 2, 4], "every restored connection is heard");
            for (id, fd) in fds {
                let mut s = TcpStream::from(fd);
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap();
                assert_eq!(&b, b"x", "connection {id}");
            }
        })
        .unwrap();
}
