//! Network lock and address handoff (issue 6) between host namespaces A and
//! B, with a client in a third that keeps sending through the migration.
//!
//! Needs root (namespaces, nftables, NFQUEUE, TCP repair). Without it the
//! tests fail with a message; `LMIG_SKIP_PRIVILEGED=1` skips them, saying so.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lmig_core::model::SocketRecord;
use lmig_core::traits::{NoSockets, SocketSink, SocketSource};
use lmig_net::handoff::{self, HandoffConfig, HandoffSink, HandoffSource, ServiceAddr};
use lmig_net::lock::{self, LockConfig, NetLock, TABLE_PREFIX};
use lmig_net::topology::{Netns, Topology};
use lmig_net::{NetError, NetSink, NetSource, NetSourceConfig, SinkConfig};

/// True when the test may run; panics with a clear message when it needs
/// root and does not have it.
fn privileged(test: &str) -> bool {
    lmig_core::testing::privileged(test, "namespaces, nftables and NFQUEUE")
}

fn service_addrs() -> Vec<ServiceAddr> {
    vec![
        ServiceAddr::new(Topology::SERVICE_V4, 24),
        ServiceAddr::new(Topology::SERVICE_V6, 64),
    ]
}

fn config() -> HandoffConfig {
    let mut c = HandoffConfig::new(service_addrs(), "eth0");
    c.quiet = Duration::from_millis(100);
    c.linger = Duration::from_secs(2);
    c
}

/// The nftables tables of `ns` (`ip/<name>`, `ip6/<name>`).
fn tables(ns: &Netns) -> Vec<String> {
    ns.run(lock::testing::tables)
        .unwrap()
        .expect("list nftables tables")
}

/// Lock tables (named with [`TABLE_PREFIX`]) among `tables`.
fn lock_tables(tables: &[String]) -> Vec<&String> {
    tables.iter().filter(|t| t.contains(TABLE_PREFIX)).collect()
}

fn eth0() -> u32 {
    nix::net::if_::if_nametoindex("eth0").expect("eth0")
}

/// The addresses of `eth0` in `ns`.
fn addresses(ns: &Netns) -> Vec<ServiceAddr> {
    ns.run(|| handoff::addresses(eth0()))
        .unwrap()
        .expect("addresses of eth0")
}

fn has_address(ns: &Netns, ip: IpAddr) -> bool {
    addresses(ns).iter().any(|a| a.addr == ip)
}

/// A counter of `/proc/net/snmp` (`Tcp: RetransSegs`, `Tcp: OutRsts`, ...) in `ns`.
fn snmp(ns: &Netns, group: &'static str, field: &'static str) -> u64 {
    ns.run(move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{group}:")))
            .collect();
        let names: Vec<&str> = lines[0].split_whitespace().collect();
        let values: Vec<&str> = lines[1].split_whitespace().collect();
        let i = names.iter().position(|n| *n == field).unwrap();
        values[i].parse::<u64>().unwrap()
    })
    .unwrap()
}

/// The Ethernet address of `eth0` in `ns`.
fn link_address(ns: &Netns) -> [u8; 6] {
    ns.run(|| handoff::link_address(eth0()))
        .unwrap()
        .expect("eth0 has an Ethernet address")
}

/// What `ns`'s neighbour table says about the topology's addresses (diagnostics).
fn neigh(ns: &Netns) -> String {
    ns.run(|| {
        let ips: [IpAddr; 8] = [
            Topology::SERVICE_V4.into(),
            Topology::SERVICE_V6.into(),
            Topology::CLIENT_V4.into(),
            Topology::CLIENT_V6.into(),
            Topology::A_V4.into(),
            Topology::A_V6.into(),
            Topology::B_V4.into(),
            Topology::B_V6.into(),
        ];
        ips.iter()
            .map(|&ip| format!("{ip} {:x?}; ", handoff::neighbour_address(eth0(), ip)))
            .collect()
    })
    .unwrap()
}

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

#[test]
fn lock_is_one_table_per_family_and_goes_away() {
    if !privileged("lock_is_one_table_per_family_and_goes_away") {
        return;
    }
    let topo = Topology::new().expect("topology");
    let lock = topo
        .a
        .run(|| {
            let addrs = service_addrs().iter().map(|a| a.addr).collect::<Vec<_>>();
            NetLock::install(LockConfig::new(addrs))
        })
        .unwrap()
        .expect("install");
    let table = lock.table().to_string();
    assert!(table.starts_with(&format!("{TABLE_PREFIX}{}_", std::process::id())));
    let t = tables(&topo.a);
    assert!(t.contains(&format!("ip/{table}")), "{t:?}");
    assert!(t.contains(&format!("ip6/{table}")), "{t:?}");
    assert_eq!(lock_tables(&t).len(), 2, "one table per family: {t:?}");
    // A second lock in the same namespace and process gets its own tables.
    let second = topo
        .a
        .run(|| NetLock::install(LockConfig::new([IpAddr::from(Topology::B_V4)])))
        .unwrap()
        .expect("second lock");
    assert_ne!(second.table(), table);
    drop(second);
    let mut lock = lock;
    lock.engage().unwrap();
    assert!(lock.is_engaged());
    lock.disengage().unwrap();
    lock.engage().unwrap();
    assert_eq!(lock.unlock().unwrap(), 0);
    let t = tables(&topo.a);
    assert!(lock_tables(&t).is_empty(), "table left behind: {t:?}");
}

#[test]
fn leftover_tables_of_dead_processes_are_removed() {
    if !privileged("leftover_tables_of_dead_processes_are_removed") {
        return;
    }
    let topo = Topology::new().expect("topology");
    // 4194304 is above the largest pid Linux hands out: surely dead.
    let dead = format!("{TABLE_PREFIX}4194304");
    let alive = format!("{TABLE_PREFIX}1");
    for (ipv6, name) in [(false, &dead), (true, &dead), (false, &alive)] {
        let name = name.clone();
        topo.a
            .run(move || lock::testing::add_table(ipv6, &name))
            .unwrap()
            .expect("add table");
    }
    let removed = topo.a.run(lock::clean_stale).unwrap().expect("clean_stale");
    assert_eq!(removed.len(), 2, "{removed:?}");
    let t = tables(&topo.a);
    assert!(!t.iter().any(|n| n.ends_with(&dead)), "{t:?}");
    assert!(
        t.contains(&format!("ip/{alive}")),
        "a live process's table must stay: {t:?}"
    );
}

/// Run as a child without capabilities (see the test below).
#[test]
#[ignore = "child of lock_install_failure_is_clear_and_changes_nothing"]
fn unprivileged_child() {
    if std::env::var("LMIG_HANDOFF_CHILD").is_err() {
        return;
    }
    // Leave root for `nobody`: the kernel clears every capability (glibc
    // changes the ids of all threads).
    use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
    setgroups(&[]).unwrap();
    setgid(Gid::from_raw(65534)).unwrap();
    setuid(Uid::from_raw(65534)).unwrap();
    let err = HandoffSource::new(NoSockets, config())
        .map(|_| ())
        .unwrap_err();
    println!("ERROR: {err}");
    assert!(matches!(err, NetError::Unsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
}

#[test]
fn lock_install_failure_is_clear_and_changes_nothing() {
    if !privileged("lock_install_failure_is_clear_and_changes_nothing") {
        return;
    }
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).unwrap();
    let before = (tables(&topo.a), addresses(&topo.a));
    let exe = std::env::current_exe().unwrap();
    // The child drops its capabilities itself (no `setpriv` needed).
    let out = topo
        .a
        .spawn(
            Command::new(exe)
                .args([
                    "--ignored",
                    "--exact",
                    "unprivileged_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("LMIG_HANDOFF_CHILD", "1")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )
        .expect("start the child")
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ERROR: network lock"), "{text}");
    assert_eq!(
        (tables(&topo.a), addresses(&topo.a)),
        before,
        "the failed install changed something"
    );
}

/// Ends a process this test started (by its pid), even on panic.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the client saw.
#[derive(Debug, Default)]
struct ClientReport {
    sent: u64,
    answered: u64,
    max_gap: Duration,
    error: Option<String>,
}

enum Conn {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl Conn {
    fn request(&mut self, i: u64) -> std::io::Result<()> {
        let req = i.to_be_bytes();
        let mut rep = [0u8; 8];
        match self {
            Conn::Tcp(s) => {
                s.write_all(&req)?;
                s.read_exact(&mut rep)?;
            }
            Conn::Udp(s) => {
                s.send(&req)?;
                let n = s.recv(&mut rep)?;
                if n != 8 {
                    return Err(std::io::Error::new(ErrorKind::InvalidData, "short reply"));
                }
            }
        }
        if rep != req {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("reply {rep:?} to {i}"),
            ));
        }
        Ok(())
    }
}

/// Echo 8-byte requests on `conn` until `stop`; returns the socket.
fn echo(conn: Conn, stop: Arc<AtomicBool>) -> JoinHandle<Conn> {
    std::thread::spawn(move || {
        let mut conn = conn;
        let mut buf = [0u8; 8];
        let start = Instant::now();
        // Bounded by `stop`, which the test sets, and by a minute.
        while !stop.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(60) {
            match &mut conn {
                Conn::Tcp(s) => {
                    s.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
                    match s.read_exact(&mut buf) {
                        Ok(()) => s.write_all(&buf).unwrap(),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        // The client is done and closed.
                        Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
                        Err(e) => panic!("server: {e}"),
                    }
                }
                Conn::Udp(s) => {
                    s.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
                    match s.recv_from(&mut buf) {
                        Ok((8, from)) => {
                            s.send_to(&buf, from).unwrap();
                        }
                        Ok(_) => {}
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(e) => panic!("server: {e}"),
                    }
                }
            }
        }
        conn
    })
}

/// Migrate one TCP or UDP service socket from A to B through `HandoffSource` /
/// `HandoffSink` around the real `NetSource` / `NetSink`, while a client sends.
fn service_moves(tcp: bool, v6: bool) {
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).unwrap();
    // Debugging aid: LMIG_HANDOFF_PCAP=<file> captures the bridge (needs
    // tcpdump; only then).
    let pcap = std::env::var("LMIG_HANDOFF_PCAP").ok().map(|f| {
        let c = topo
            .bridge()
            .spawn(
                Command::new("tcpdump")
                    .args(["-U", "-i", "any", "-n", "-w", &f])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null()),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        ChildGuard(c)
    });
    let ip: IpAddr = if v6 {
        Topology::SERVICE_V6.into()
    } else {
        Topology::SERVICE_V4.into()
    };
    let addr = SocketAddr::new(ip, 7100);

    // The program on A and its client.
    let listener = if tcp {
        Some(
            topo.a
                .run(move || TcpListener::bind(addr))
                .unwrap()
                .unwrap(),
        )
    } else {
        None
    };
    let udp = if tcp {
        None
    } else {
        Some(topo.a.run(move || UdpSocket::bind(addr)).unwrap().unwrap())
    };
    let done = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    // While `gate` is set the client sends nothing new (the test uses it to
    // make sure one request is sent during the freeze, not before it).
    let gate = Arc::new(AtomicBool::new(false));
    let idle = Arc::new(AtomicBool::new(false));
    let (d, p) = (Arc::clone(&done), Arc::clone(&progress));
    let (g, idl) = (Arc::clone(&gate), Arc::clone(&idle));
    let client = topo
        .client
        .spawn_thread(move || {
            let mut r = ClientReport::default();
            let mut conn = if tcp {
                let s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                Conn::Tcp(s)
            } else {
                let s = UdpSocket::bind(SocketAddr::new(
                    if v6 {
                        Topology::CLIENT_V6.into()
                    } else {
                        Topology::CLIENT_V4.into()
                    },
                    0,
                ))
                .unwrap();
                s.connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                Conn::Udp(s)
            };
            let start = Instant::now();
            // Bounded: 100,000 requests or 30 s.
            for i in 0..100_000u64 {
                if d.load(Ordering::Acquire) || start.elapsed() > Duration::from_secs(30) {
                    break;
                }
                // Bounded by the 30 s above.
                while g.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(30) {
                    idl.store(true, Ordering::Release);
                    std::thread::sleep(Duration::from_micros(200));
                }
                idl.store(false, Ordering::Release);
                r.sent += 1;
                let t = Instant::now();
                if let Err(e) = conn.request(i) {
                    r.error = Some(format!("request {i}: {e}"));
                    break;
                }
                r.max_gap = r.max_gap.max(t.elapsed());
                r.answered += 1;
                p.store(r.answered, Ordering::Release);
                std::thread::sleep(Duration::from_millis(1));
            }
            r
        })
        .unwrap();
    let wait_progress = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while progress.load(Ordering::Acquire) < n {
            if Instant::now() >= deadline {
                panic!(
                    "the client stopped making progress at {}; neighbours: client {} a {} b {}; addresses a {:?} b {:?}",
                    progress.load(Ordering::Acquire),
                    neigh(&topo.client),
                    neigh(&topo.a),
                    neigh(&topo.b),
                    addresses(&topo.a),
                    addresses(&topo.b)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let server_conn = match (listener, udp) {
        (Some(l), _) => Conn::Tcp(l.accept().unwrap().0),
        (_, Some(u)) => Conn::Udp(u),
        _ => unreachable!(),
    };
    let fd: OwnedFd = match &server_conn {
        Conn::Tcp(s) => s.try_clone().unwrap().into(),
        Conn::Udp(s) => s.try_clone().unwrap().into(),
    };
    let stop_a = Arc::new(AtomicBool::new(false));
    let server_a = echo(server_conn, Arc::clone(&stop_a));
    wait_progress(20);
    let retrans_before = snmp(&topo.client, "Tcp", "RetransSegs");
    let rsts_before = (
        snmp(&topo.a, "Tcp", "OutRsts"),
        snmp(&topo.b, "Tcp", "OutRsts"),
    );

    // Before the freeze: lock installed on A, armed on B, sockets planned.
    // TCP runs forward held packets straight to B's link-layer address
    // (resolved here, A never talked to B); UDP runs route them.
    let b_host: IpAddr = if v6 {
        Topology::B_V6.into()
    } else {
        Topology::B_V4.into()
    };
    let src_cfg = if tcp {
        // Early forwarding in one of the two TCP runs.
        let mut c = config().forward_to(b_host);
        c.forward_early = !v6;
        c
    } else {
        config()
    };
    let mut src = topo
        .a
        .run(move || {
            let mut s = HandoffSource::new(NetSource::new(NetSourceConfig::default())?, src_cfg)?;
            s.inner_mut().add(1, fd)?;
            Ok::<_, NetError>(s)
        })
        .unwrap()
        .expect("source with lock");
    assert_eq!(
        src.handoff().stats().forwarded_direct,
        tcp,
        "direct forwarding (neighbours of A: {})",
        neigh(&topo.a)
    );
    let plan = src.plan().unwrap();
    let sink = topo
        .b
        .run(move || {
            let mut h = HandoffSink::new(NetSink::new(SinkConfig::default())?, config())?;
            h.prepare(&plan)
                .map_err(|e| NetError::topology(e.to_string(), None))?;
            Ok::<_, NetError>(h)
        })
        .unwrap()
        .expect("sink with handoff");

    // Freeze: the program stops, the lock engages, repair mode. The client
    // is held back until the lock is on, then sends one request.
    gate.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !idle.load(Ordering::Acquire) {
        assert!(Instant::now() < deadline, "the client did not pause");
        std::thread::sleep(Duration::from_micros(200));
    }
    stop_a.store(true, Ordering::Release);
    drop(server_a.join().unwrap());
    let freeze_at = Instant::now();
    let mut src = topo
        .a
        .run(move || {
            src.freeze().unwrap();
            src
        })
        .unwrap();
    gate.store(false, Ordering::Release);
    // A request sent during the freeze is held by A's lock.
    let deadline = Instant::now() + Duration::from_secs(5);
    while queued(&topo.a) == 0 {
        assert!(
            Instant::now() < deadline,
            "no client packet reached the lock during the freeze"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    if tcp && !v6 {
        // With early forwarding, A keeps the original queued and sends a
        // copy on into B's lock from a thread of its own: wait until the
        // copy is there, or the hand-over may come first and send the
        // original itself (then nothing went early and the assertion
        // below would test the race, not the feature).
        while queued(&topo.b) == 0 {
            assert!(
                Instant::now() < deadline,
                "the held request did not reach B's lock early"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let mut batches: Vec<Vec<SocketRecord>> = Vec::new();
    src.capture(&mut |b| {
        batches.push(b);
        Ok(())
    })
    .unwrap();
    let sink = topo
        .b
        .run(move || {
            let mut sink = sink;
            for b in batches {
                sink.restore(b).unwrap();
            }
            sink
        })
        .unwrap();

    // Commit: the source hands over, the destination takes over.
    let mut src = topo
        .a
        .run(move || {
            src.release().unwrap();
            src
        })
        .unwrap();
    let (fds, dst_stats) = topo
        .b
        .run(move || {
            let mut sink = sink;
            sink.activate().unwrap();
            let stats = sink.handoff().finish();
            (sink.inner_mut().take_fds(), stats)
        })
        .unwrap();
    let freeze = freeze_at.elapsed();
    eprintln!("destination after activate: {dst_stats:?}");
    eprintln!("destination after activate: {dst_stats:?}");
    if std::env::var("LMIG_HANDOFF_DEBUG").is_ok() {
        for _ in 0..3 {
            let snmp6 = topo
                .b
                .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap_or_default())
                .unwrap();
            let snmp6: Vec<&str> = snmp6
                .lines()
                .filter(|l| {
                    [
                        "InAddrErrors",
                        "InNoRoutes",
                        "InDiscards",
                        "InReceives",
                        "InDelivers",
                    ]
                    .iter()
                    .any(|f| l.starts_with(&format!("Ip6{f}")))
                })
                .collect();
            eprintln!(
                "B at {:?}: addresses {:?}\nneighbours {}\ntables {:?}\n{snmp6:?}",
                freeze_at.elapsed(),
                addresses(&topo.b),
                neigh(&topo.b),
                tables(&topo.b),
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let fd = fds.into_iter().next().expect("restored socket").1;
    let conn_b = if tcp {
        Conn::Tcp(TcpStream::from(fd))
    } else {
        Conn::Udp(UdpSocket::from(fd))
    };
    let stop_b = Arc::new(AtomicBool::new(false));
    let server_b = echo(conn_b, Arc::clone(&stop_b));

    // The client goes on, now answered by B.
    let after = progress.load(Ordering::Acquire);
    wait_progress(after + 50);
    done.store(true, Ordering::Release);
    let report = client.join().unwrap().unwrap();
    stop_b.store(true, Ordering::Release);
    drop(server_b.join().unwrap());
    let src_stats = src.handoff().finish();
    drop(src);

    if pcap.is_some() {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(pcap);
    eprintln!(
        "tcp={tcp} v6={v6}: {report:?}, freeze {freeze:?}, source {src_stats:?}, destination {dst_stats:?}"
    );
    assert_eq!(report.error, None, "client: {report:?}");
    assert_eq!(report.answered, report.sent, "every request answered");
    assert!(
        src_stats.held >= 1,
        "the request sent during the freeze was held: {src_stats:?}"
    );
    assert_eq!(src_stats.dropped + dst_stats.dropped, 0, "packets dropped");
    if tcp {
        // Sent straight to B: with early forwarding already during the
        // freeze, into B's lock.
        assert_eq!(
            src_stats.forwarded_early >= 1,
            !v6,
            "the held request went on to B during the freeze iff asked: {src_stats:?}"
        );
        assert_eq!(
            snmp(&topo.client, "Tcp", "RetransSegs"),
            retrans_before,
            "the client retransmitted: a held packet was lost or answered late"
        );
    }
    assert_eq!(
        (
            snmp(&topo.a, "Tcp", "OutRsts"),
            snmp(&topo.b, "Tcp", "OutRsts")
        ),
        rsts_before,
        "a RST was sent"
    );
    // The address moved; both locks are gone.
    let t = (tables(&topo.a), tables(&topo.b));
    assert!(
        lock_tables(&t.0).is_empty() && lock_tables(&t.1).is_empty(),
        "{t:?}"
    );
    assert!(has_address(&topo.b, ip), "{:?}", addresses(&topo.b));
    // The announcement switched the client to B's link-layer address.
    let mac_b = link_address(&topo.b);
    let seen = topo
        .client
        .run(move || handoff::neighbour_address(eth0(), ip))
        .unwrap()
        .expect("client neighbour table");
    assert_eq!(
        seen,
        Some(mac_b),
        "client neighbour entry {seen:x?}, B is {mac_b:x?}"
    );
    assert!(!has_address(&topo.a, ip), "{:?}", addresses(&topo.a));
}

#[test]
fn tcp_service_moves_v4() {
    if privileged("tcp_service_moves_v4") {
        service_moves(true, false);
    }
}

#[test]
fn tcp_service_moves_v6() {
    if privileged("tcp_service_moves_v6") {
        service_moves(true, true);
    }
}

#[test]
fn udp_service_moves_v4() {
    if privileged("udp_service_moves_v4") {
        service_moves(false, false);
    }
}

#[test]
fn udp_service_moves_v6() {
    if privileged("udp_service_moves_v6") {
        service_moves(false, true);
    }
}

/// A datagram sent to the service during the freeze is held, then
/// delivered here, once, after the abort; no lock is left. With `early`, A
/// forwards straight to B and sends copies on during the freeze: B's lock
/// holds them and drops them when B gives up.
fn abort_delivers_held_here(port: u16, early: bool) {
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).unwrap();
    let addr = SocketAddr::new(Topology::SERVICE_V4.into(), port);
    let server = topo.a.run(move || UdpSocket::bind(addr)).unwrap().unwrap();
    let b_host: IpAddr = Topology::B_V4.into();
    let mut src = topo
        .a
        .run(move || {
            let mut c = config();
            if early {
                c = c.forward_to(b_host);
                c.forward_early = true;
            }
            HandoffSource::new(NoSockets, c)
        })
        .unwrap()
        .expect("lock");
    assert_eq!(src.handoff().stats().forwarded_direct, early);
    let mut sink = early.then(|| {
        topo.b
            .run(|| HandoffSink::new(NoSockets, config()))
            .unwrap()
            .expect("destination lock")
    });
    src.freeze().unwrap();
    topo.client
        .run(move || {
            let c = UdpSocket::bind("0.0.0.0:0").unwrap();
            c.send_to(b"held", addr).unwrap();
        })
        .unwrap();
    // Held here (and with `early` its copy held by B's lock).
    let deadline = Instant::now() + Duration::from_secs(5);
    while queued(&topo.a) == 0 || (early && queued(&topo.b) == 0) {
        assert!(
            Instant::now() < deadline,
            "held here {} / copies at B {}",
            queued(&topo.a),
            queued(&topo.b)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    server
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(server.recv(&mut buf).is_err(), "delivered while locked");
    src.abort().unwrap();
    if let Some(sink) = sink.as_mut() {
        sink.discard();
    }
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = server
        .recv(&mut buf)
        .expect("held datagram delivered after the abort");
    assert_eq!(&buf[..n], b"held");
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(server.recv(&mut buf).is_err(), "delivered twice");
    assert_eq!(queued(&topo.b), 0, "B still holds copies");
    // The table goes behind the resumed program; `finish` waits for it.
    src.handoff().finish();
    assert!(lock_tables(&tables(&topo.a)).is_empty());
    assert!(lock_tables(&tables(&topo.b)).is_empty());
    assert!(has_address(&topo.a, Topology::SERVICE_V4.into()));
}

#[test]
fn abort_unlocks_and_the_source_serves_on() {
    if privileged("abort_unlocks_and_the_source_serves_on") {
        abort_delivers_held_here(7200, false);
    }
}

#[test]
fn abort_after_early_forwarding_delivers_here_once() {
    if privileged("abort_after_early_forwarding_delivers_here_once") {
        abort_delivers_held_here(7201, true);
    }
}
