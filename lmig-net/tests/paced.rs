//! Held packets released in order without overflowing receive buffers:
//! thousands of UDP datagrams held for one socket with a small receive
//! buffer, released while a program reads, arrive all and in order per flow.
//!
//! Needs root (namespaces, nftables, NFQUEUE). Without it the tests fail
//! with a message; `LMIG_SKIP_PRIVILEGED=1` skips them, saying so.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lmig_core::traits::{NoSockets, SocketSource};
use lmig_net::handoff::{HandoffConfig, HandoffSource, ServiceAddr};
use lmig_net::lock::{LockConfig, NetLock};
use lmig_net::topology::{Netns, Topology};

fn privileged(test: &str) -> bool {
    lmig_core::testing::privileged(test, "namespaces, nftables and NFQUEUE")
}

/// Flows (client sockets) and datagrams per flow.
const FLOWS: usize = 3;
const PER_FLOW: u32 = 1000;
/// Payload bytes per datagram.
const SIZE: usize = 200;
/// The server's receive buffer (the kernel doubles it): a few dozen datagrams.
const RCVBUF: usize = 16 * 1024;

/// Packets waiting in NFQUEUE queues of `ns` now.
fn queued(ns: &Netns) -> u64 {
    ns.run(|| {
        std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
            .sum()
    })
    .unwrap()
}

/// `Udp:`/`Udp6:` `RcvbufErrors` of `/proc/net/snmp{,6}` in `ns`: datagrams
/// dropped for want of receive-buffer room.
fn rcvbuf_errors(ns: &Netns) -> u64 {
    ns.run(|| {
        let v4 = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let lines: Vec<&str> = v4.lines().filter(|l| l.starts_with("Udp:")).collect();
        let names: Vec<&str> = lines[0].split_whitespace().collect();
        let values: Vec<&str> = lines[1].split_whitespace().collect();
        let i = names.iter().position(|n| *n == "RcvbufErrors").unwrap();
        let v6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap();
        let six = v6
            .lines()
            .find_map(|l| l.strip_prefix("Udp6RcvbufErrors"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        values[i].parse::<u64>().unwrap() + six
    })
    .unwrap()
}

/// The server: a UDP socket on `at` in `ns` with a small receive buffer.
fn server(ns: &Netns, at: SocketAddr) -> UdpSocket {
    ns.run(move || {
        let s = socket2::Socket::new(socket2::Domain::for_address(at), socket2::Type::DGRAM, None)
            .unwrap();
        s.set_recv_buffer_size(RCVBUF).unwrap();
        s.bind(&at.into()).unwrap();
        UdpSocket::from(s)
    })
    .unwrap()
}

/// From the client host, `FLOWS` sockets send `PER_FLOW` datagrams each to
/// `to`, interleaved: `[flow, seq (4 bytes LE), padding]`.
fn send_flows(client: &Netns, to: SocketAddr) {
    client
        .run(move || {
            let any: SocketAddr = match to {
                SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
                SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
            };
            let socks: Vec<UdpSocket> = (0..FLOWS).map(|_| UdpSocket::bind(any).unwrap()).collect();
            let mut buf = vec![0u8; SIZE];
            for seq in 0..PER_FLOW {
                for (flow, s) in socks.iter().enumerate() {
                    buf[0] = flow as u8;
                    buf[1..5].copy_from_slice(&seq.to_le_bytes());
                    // Bounded: a full send buffer only blocks for a moment.
                    s.send_to(&buf, to).unwrap();
                }
            }
        })
        .unwrap();
}

/// Wait (bounded) until `ns` holds every datagram sent.
fn wait_held(ns: &Netns) {
    let total = FLOWS as u64 * u64::from(PER_FLOW);
    let deadline = Instant::now() + Duration::from_secs(20);
    while queued(ns) < total {
        assert!(
            Instant::now() < deadline,
            "held {} of {total} datagrams",
            queued(ns)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The program: reads until every datagram came (or nothing came for 10 s),
/// a little slowly; returns the `(flow, seq)` of each, in arrival order.
fn reader(sock: UdpSocket) -> JoinHandle<Vec<(u8, u32)>> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let total = FLOWS * PER_FLOW as usize;
        let mut got = Vec::with_capacity(total);
        let mut buf = [0u8; 2048];
        // Bounded by `total` and the read timeout.
        while got.len() < total {
            let Ok(n) = sock.recv(&mut buf) else { break };
            assert_eq!(n, SIZE);
            got.push((buf[0], u32::from_le_bytes(buf[1..5].try_into().unwrap())));
            if got.len() % 16 == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        got
    })
}

/// Every datagram arrived once, and in order within its flow.
fn check_all_in_order(got: &[(u8, u32)], dropped_by_kernel: u64) {
    let total = FLOWS * PER_FLOW as usize;
    assert_eq!(
        got.len(),
        total,
        "datagrams lost ({dropped_by_kernel} receive-buffer drops)"
    );
    assert_eq!(dropped_by_kernel, 0, "receive-buffer drops");
    for flow in 0..FLOWS as u8 {
        let seqs: Vec<u32> = got.iter().filter(|g| g.0 == flow).map(|g| g.1).collect();
        assert_eq!(seqs, (0..PER_FLOW).collect::<Vec<_>>(), "flow {flow}");
    }
}

/// A lock copying headers only (the destination's kind) holds 3,000
/// datagrams for one socket whose buffer takes a few dozen, IPv4 and IPv6;
/// the paced unlock delivers every one, in order per flow, while the
/// program reads, and none is dropped for want of room.
#[test]
fn held_datagrams_are_released_in_order_as_the_socket_has_room() {
    if !privileged("held_datagrams_are_released_in_order_as_the_socket_has_room") {
        return;
    }
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).unwrap();
    for (ip, port) in [
        (IpAddr::from(Topology::SERVICE_V4), 7300),
        (IpAddr::from(Topology::SERVICE_V6), 7301),
    ] {
        let at = SocketAddr::new(ip, port);
        let sock = server(&topo.a, at);
        let mut lock = topo
            .a
            .run(move || {
                let mut cfg = LockConfig::new([ip]);
                cfg.copy_payload = false;
                let mut lock = NetLock::install(cfg)?;
                lock.engage()?;
                Ok::<_, lmig_net::NetError>(lock)
            })
            .unwrap()
            .expect("lock");
        let drops = rcvbuf_errors(&topo.a);
        send_flows(&topo.client, at);
        wait_held(&topo.a);
        let read = reader(sock);
        let stats = topo
            .a
            .run(move || lock.retire_in_order(Duration::from_secs(60)))
            .unwrap()
            .expect("paced release");
        let got = read.join().unwrap();
        check_all_in_order(&got, rcvbuf_errors(&topo.a) - drops);
        assert_eq!(stats.released, FLOWS as u64 * u64::from(PER_FLOW), "{at}");
        assert_eq!(stats.forced, 0, "{at}: let through without room");
        assert_eq!(queued(&topo.a), 0);
    }
}

/// The source's abort after a long freeze: the held datagrams go back to
/// the program's socket in order, the rest following on a thread as the
/// resumed program reads; nothing is lost and no lock is left.
#[test]
fn an_abort_releases_a_long_freeze_s_datagrams_without_loss() {
    if !privileged("an_abort_releases_a_long_freeze_s_datagrams_without_loss") {
        return;
    }
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).unwrap();
    let at = SocketAddr::new(Topology::SERVICE_V4.into(), 7302);
    let sock = server(&topo.a, at);
    let mut src = topo
        .a
        .run(|| {
            let cfg = HandoffConfig::new([ServiceAddr::new(Topology::SERVICE_V4, 24)], "eth0");
            HandoffSource::new(NoSockets, cfg)
        })
        .unwrap()
        .expect("lock");
    let drops = rcvbuf_errors(&topo.a);
    src.freeze().unwrap();
    send_flows(&topo.client, at);
    wait_held(&topo.a);
    // The program runs again after the abort returns.
    src.abort().unwrap();
    let got = reader(sock).join().unwrap();
    let stats = src.handoff().finish();
    check_all_in_order(&got, rcvbuf_errors(&topo.a) - drops);
    assert_eq!(stats.held, FLOWS as u64 * u64::from(PER_FLOW));
    assert_eq!(stats.dropped, 0);
    assert_eq!(queued(&topo.a), 0);
    let tables = topo
        .a
        .run(lmig_net::lock::testing::tables)
        .unwrap()
        .unwrap();
    assert!(
        !tables
            .iter()
            .any(|t| t.contains(lmig_net::lock::TABLE_PREFIX)),
        "{tables:?}"
    );
}
