//! Shared pieces of lmig-net's integration tests: the privilege check, and a
//! peer process (this test binary re-executed in another namespace) driven
//! by line commands on stdin.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use std::os::fd::OwnedFd;

use lmig_core::model::SocketRecord;
use lmig_core::traits::{SocketSink, SocketSource};
use lmig_net::topology::{Netns, Topology};
use lmig_net::{NetSink, NetSource, NetSourceConfig, SinkConfig};

/// True when privileged tests should run (as root); without root a clear
/// failure, or a visible skip with `LMIG_SKIP_PRIVILEGED=1`.
pub fn privileged(test: &str) -> bool {
    // The shared rule: runs as root; without root a failure, or a visible
    // skip with LMIG_SKIP_PRIVILEGED=1.
    if !lmig_core::testing::privileged(test, "network namespaces, CAP_NET_ADMIN for TCP repair") {
        return false;
    }
    let _ = lmig_net::raise_nofile_limit();
    true
}

/// The bytes every side writes: `<tag>-<i>;`.
pub fn pat(tag: &str, i: usize) -> Vec<u8> {
    format!("{tag}-{i};").into_bytes()
}

/// Byte `k` of a large payload.
pub fn big_byte(k: usize) -> u8 {
    (k % 251) as u8
}

/// Read exactly `want.len()` bytes and compare.
pub fn read_exact_eq(s: &mut impl Read, want: &[u8]) -> Result<(), String> {
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

/// Read `n` bytes of the big pattern.
pub fn read_big(s: &mut impl Read, n: usize) -> Result<(), String> {
    let mut buf = vec![0u8; 65536];
    let mut k = 0;
    while k < n {
        let m = (n - k).min(buf.len());
        s.read_exact(&mut buf[..m])
            .map_err(|e| format!("read big at {k}: {e}"))?;
        for (j, b) in buf[..m].iter().enumerate() {
            if *b != big_byte(k + j) {
                return Err(format!("big payload differs at byte {}", k + j));
            }
        }
        k += m;
    }
    Ok(())
}

/// Write `n` bytes of the big pattern (bounded: 20 s).
pub fn write_big(s: &mut TcpStream, n: usize) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| format!("{e}"))?;
    let mut buf = vec![0u8; 65536];
    let mut k = 0;
    while k < n {
        let m = (n - k).min(buf.len());
        for (j, b) in buf[..m].iter_mut().enumerate() {
            *b = big_byte(k + j);
        }
        match s.write(&buf[..m]) {
            Ok(w) => k += w,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("write big at {k}: {e}")),
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("wrote only {k} of {n} bytes in 20 s"));
        }
    }
    Ok(())
}

/// `EstabResets` of /proc/net/snmp in the caller's namespace.
pub fn estab_resets() -> u64 {
    let s = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let tcp: Vec<&str> = s.lines().filter(|l| l.starts_with("Tcp:")).collect();
    if tcp.len() < 2 {
        return 0;
    }
    let names: Vec<&str> = tcp[0].split_whitespace().collect();
    let vals: Vec<&str> = tcp[1].split_whitespace().collect();
    names
        .iter()
        .position(|n| *n == "EstabResets")
        .and_then(|i| vals.get(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The kernel TCP state of a socket (1 = ESTABLISHED, 8 = CLOSE_WAIT, ...).
pub fn tcp_state(s: &impl AsFd) -> u8 {
    lmig_net::sys::tcp_info(s.as_fd())
        .map(|i| i.state)
        .unwrap_or(0)
}

/// A peer process in another namespace.
pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Start this test binary's `peer_main` test in `ns`.
    pub fn spawn(ns: &Netns) -> Peer {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "peer_main",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env("LMIG_NET_PEER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = ns.spawn(&mut cmd).expect("spawn peer");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Peer {
            child,
            stdin,
            stdout,
        }
    }

    /// Send one command and return the peer's answer (`ok ...`); panics on `err`.
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to peer");
        self.stdin.flush().expect("flush peer");
        let mut out = String::new();
        // Bounded: the peer answers every command (its own I/O has timeouts);
        // lines that are not answers (test-harness chatter) are skipped.
        for _ in 0..100 {
            out.clear();
            let n = self.stdout.read_line(&mut out).expect("read from peer");
            assert!(n > 0, "peer exited during `{line}`");
            if let Some(ans) = out.trim_end().strip_prefix("PEER ") {
                assert!(ans.starts_with("ok"), "peer failed `{line}`: {ans}");
                return ans.to_string();
            }
        }
        panic!("no answer from peer to `{line}`");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Only the process we started, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peer's command loop; call from an `#[ignore]` test named `peer_main`.
pub fn peer_main() {
    if std::env::var("LMIG_NET_PEER").as_deref() != Ok("1") {
        return;
    }
    let _ = lmig_net::raise_nofile_limit();
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut udp: Option<UdpSocket> = None;
    let resets0 = estab_resets();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        let res: Result<String, String> = (|| {
            match w.as_slice() {
                ["quit"] => std::process::exit(0),
                // connect <addr> <n> <rcvbuf of the last one, 0 = default>
                ["connect", addr, n, rcvbuf] => {
                    let addr: SocketAddr = addr.parse().map_err(|e| format!("{e}"))?;
                    let n: usize = n.parse().map_err(|e| format!("{e}"))?;
                    let rcvbuf: i32 = rcvbuf.parse().map_err(|e| format!("{e}"))?;
                    for i in 0..n {
                        let sock = socket2::Socket::new(
                            socket2::Domain::for_address(addr),
                            socket2::Type::STREAM,
                            None,
                        )
                        .map_err(|e| format!("{e}"))?;
                        if i + 1 == n && rcvbuf > 0 {
                            sock.set_recv_buffer_size(rcvbuf as usize)
                                .map_err(|e| format!("{e}"))?;
                        }
                        sock.connect_timeout(&addr.into(), Duration::from_secs(10))
                            .map_err(|e| format!("connect {i}: {e}"))?;
                        let s: TcpStream = sock.into();
                        s.set_read_timeout(Some(Duration::from_secs(20)))
                            .map_err(|e| format!("{e}"))?;
                        conns.push(s);
                    }
                    Ok(format!("{}", conns.len()))
                }
                ["sendpat", tag] => {
                    for (i, c) in conns.iter_mut().enumerate() {
                        c.write_all(&pat(tag, i))
                            .map_err(|e| format!("write {i}: {e}"))?;
                    }
                    Ok(String::new())
                }
                ["sendpat_one", i, tag] => {
                    let i: usize = i.parse().map_err(|e| format!("{e}"))?;
                    conns[i]
                        .write_all(&pat(tag, i))
                        .map_err(|e| format!("write {i}: {e}"))?;
                    Ok(String::new())
                }
                ["expect", tag] => {
                    for (i, c) in conns.iter_mut().enumerate() {
                        read_exact_eq(c, &pat(tag, i)).map_err(|e| format!("conn {i}: {e}"))?;
                    }
                    Ok(String::new())
                }
                ["expect_one", i, tag] => {
                    let i: usize = i.parse().map_err(|e| format!("{e}"))?;
                    read_exact_eq(&mut conns[i], &pat(tag, i))
                        .map_err(|e| format!("conn {i}: {e}"))?;
                    Ok(String::new())
                }
                ["expect_big", i, n] => {
                    let i: usize = i.parse().map_err(|e| format!("{e}"))?;
                    let n: usize = n.parse().map_err(|e| format!("{e}"))?;
                    read_big(&mut conns[i], n).map_err(|e| format!("conn {i}: {e}"))?;
                    Ok(String::new())
                }
                // sendbig <i> <n>: write n bytes of the big pattern on
                // connection i (bounded: 20 s), whatever the window lets through.
                ["sendbig", i, n] => {
                    let i: usize = i.parse().map_err(|e| format!("{e}"))?;
                    let n: usize = n.parse().map_err(|e| format!("{e}"))?;
                    write_big(&mut conns[i], n).map_err(|e| format!("conn {i}: {e}"))?;
                    Ok(String::new())
                }
                ["expect_eof", i] => {
                    let i: usize = i.parse().map_err(|e| format!("{e}"))?;
                    let mut b = [0u8; 1];
                    match conns[i].read(&mut b) {
                        Ok(0) => Ok(String::new()),
                        Ok(_) => Err("data instead of end-of-file".into()),
                        Err(e) => Err(format!("read: {e}")),
                    }
                }
                ["shutdown_wr", i] => {
                    let i: usize = i.parse().map_err(|e| format!("{e}"))?;
                    conns[i]
                        .shutdown(std::net::Shutdown::Write)
                        .map_err(|e| format!("{e}"))?;
                    Ok(String::new())
                }
                // check: no connection was reset
                ["check"] => {
                    let resets = estab_resets() - resets0;
                    if resets != 0 {
                        return Err(format!("{resets} connections were reset"));
                    }
                    for (i, c) in conns.iter().enumerate() {
                        let st = tcp_state(c);
                        if st == 7 {
                            return Err(format!("conn {i} is closed (a RST arrived)"));
                        }
                    }
                    Ok(String::new())
                }
                ["state", i] => {
                    let i: usize = i.parse().map_err(|e| format!("{e}"))?;
                    Ok(format!("{}", tcp_state(&conns[i])))
                }
                ["udp_bind", addr] => {
                    let s = UdpSocket::bind(addr).map_err(|e| format!("{e}"))?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))
                        .map_err(|e| format!("{e}"))?;
                    let a = s.local_addr().map_err(|e| format!("{e}"))?;
                    udp = Some(s);
                    Ok(a.to_string())
                }
                ["udp_send", to, n, tag] => {
                    let s = udp.as_ref().ok_or("no udp socket")?;
                    let n: usize = n.parse().map_err(|e| format!("{e}"))?;
                    for i in 0..n {
                        s.send_to(&pat(tag, i), to).map_err(|e| format!("{e}"))?;
                    }
                    Ok(String::new())
                }
                ["udp_expect", n, tag] => {
                    let s = udp.as_ref().ok_or("no udp socket")?;
                    let n: usize = n.parse().map_err(|e| format!("{e}"))?;
                    let mut buf = [0u8; 2048];
                    for i in 0..n {
                        let (m, _) = s
                            .recv_from(&mut buf)
                            .map_err(|e| format!("udp recv {i}: {e}"))?;
                        if buf[..m] != pat(tag, i)[..] {
                            return Err(format!(
                                "udp datagram {i}: {:?}",
                                String::from_utf8_lossy(&buf[..m])
                            ));
                        }
                    }
                    Ok(String::new())
                }
                _ => Err(format!("unknown command {line:?}")),
            }
        })();
        let _ = match res {
            Ok(s) => writeln!(out, "PEER ok {s}"),
            Err(e) => writeln!(out, "PEER err {e}"),
        };
        let _ = out.flush();
    }
    std::process::exit(0);
}

/// Move `socks` (ids = positions) from host A to host B: prepare at B, freeze
/// and capture at A, restore at B, move the service address, release A,
/// activate B. Returns the records and the restored fds in id order.
pub fn migrate(topo: &Topology, socks: Vec<OwnedFd>) -> (Vec<SocketRecord>, Vec<OwnedFd>) {
    migrate_with(topo, socks, NetSourceConfig::default())
}

/// [`migrate`] with a source configured by `cfg`.
pub fn migrate_with(
    topo: &Topology,
    socks: Vec<OwnedFd>,
    cfg: NetSourceConfig,
) -> (Vec<SocketRecord>, Vec<OwnedFd>) {
    let (records, fds, _) = migrate_full(topo, socks, cfg, SinkConfig::default());
    (records, fds)
}

/// [`migrate_with`] with a sink configured by `sink_cfg`; also returns the
/// sink's gate of never-sent bytes (`SinkConfig::unsent_in_background`).
pub fn migrate_full(
    topo: &Topology,
    socks: Vec<OwnedFd>,
    cfg: NetSourceConfig,
    sink_cfg: SinkConfig,
) -> (
    Vec<SocketRecord>,
    Vec<OwnedFd>,
    Option<lmig_net::UnsentTails>,
) {
    let n = socks.len();
    let mut src = NetSource::new(cfg).unwrap();
    for (i, s) in socks.into_iter().enumerate() {
        src.add(i as u64, s).unwrap();
    }
    let plan = src.plan().unwrap();
    let sink = topo
        .b
        .run(move || {
            let mut s = NetSink::new(sink_cfg).unwrap();
            s.prepare(&plan).unwrap();
            s
        })
        .unwrap();
    // As the session does after each round: the estimate gets the capture's memory ready.
    let queued = src.queued_bytes().unwrap();
    src.freeze().unwrap();
    let mut batches = Vec::new();
    let cpu = || {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
        Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
    };
    let (t, c) = (std::time::Instant::now(), cpu());
    src.capture(&mut |b| {
        batches.push(b);
        Ok(())
    })
    .unwrap();
    let captured = (t.elapsed(), cpu() - c);
    let records: Vec<SocketRecord> = batches.iter().flatten().cloned().collect();
    // Restore at B while the service address is still on A (the restored
    // sockets bind and connect with IP_TRANSPARENT), then move the address,
    // release the source and activate. Packets that reach B in between meet
    // sockets in repair mode instead of no socket (which would answer RST).
    let sink = topo
        .b
        .run(move || {
            let mut sink = sink;
            let t = std::time::Instant::now();
            for b in batches {
                sink.restore(b).unwrap();
            }
            eprintln!(
                "{queued} bytes queued: capture (wall, cpu) {captured:?}, restore {:?}",
                t.elapsed()
            );
            sink
        })
        .unwrap();
    topo.move_service_address(&topo.a, &topo.b).unwrap();
    src.release().unwrap();
    let fds = topo
        .b
        .run(move || {
            let mut sink = sink;
            let t = std::time::Instant::now();
            sink.activate().unwrap();
            eprintln!("activate {:?}", t.elapsed());
            (sink.take_fds(), sink.unsent_tails())
        })
        .unwrap();
    let (mut fds, tails) = fds;
    assert_eq!(fds.len(), n);
    let fds = (0..n).map(|i| fds.remove(&(i as u64)).unwrap()).collect();
    (records, fds, tails)
}
