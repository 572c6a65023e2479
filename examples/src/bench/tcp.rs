//! `lmig-bench tcp`: TCP connection migration at scale.
//!
//! Four processes: this one (the orchestrator) makes the test topology
//! (`lmig_net::topology`: hosts client, A and B), then re-executes itself as
//! * `peers` in the client namespace: opens `--conns` connections to the
//!   service address and keeps them idle;
//! * `source` in A: accepts them, queues data both ways on every
//!   `--queued-every`-th connection, hands them to a [`NetSource`];
//! * `dest` in B: a [`NetSink`].
//!
//! Source and destination talk over a Unix stream with lmig-transport's wire
//! codec (`SocketPlan`, `Sockets{records, last}`, `Commit` messages, no
//! authentication). Sequence: plan → prepare (before the freeze) → freeze
//! (repair mode) → the service address moves to B (the lock and the proper
//! handoff are issue 6; the peers are idle meanwhile) → capture in batches,
//! each sent as soon as captured while B restores the previous one →
//! `Commit` → B activates; A releases its sockets in parallel. Then the data
//! is verified: bytes queued before the freeze arrive exactly once, in
//! order, both ways, then new bytes both ways; the peers check that no
//! connection was reset.
//!
//! Figures: `capture_us_per_conn` (source, capture only: encoding and
//! sending excluded), `restore_us_per_conn` (destination: restore of every
//! batch plus activation), `pipeline_ms` (from the first capture to the last
//! restored connection usable, across processes), `verified_conns`,
//! `broken_conns`; and for context `freeze_ms`, `prepare_us_per_conn`,
//! `release_us_per_conn`, `address_move_ms`, `encode_send_us_per_conn`,
//! `activate_us_per_conn`, `decode_us_per_conn`, `peer_resets`; and, since
//! the machine may be shared, the capture thread's CPU time (encoding
//! included) and the restore thread's CPU time per connection, with the time
//! each spent waiting for a CPU (`/proc/thread-self/schedstat`).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use lmig_core::protocol::Message;
use lmig_core::traits::SocketSource;
use lmig_net::topology::{Netns, Topology};
use lmig_net::{NetSink, NetSource, NetSourceConfig, RepairExit, SinkConfig};
use lmig_transport::wire::{MessageDecoder, WireItem, encode_message};
use serde_json::json;

use super::{Output, round};
use crate::common::clock::wall_ns;
use crate::common::netstat::snmp_tcp;
use crate::common::process::{Worker, serve_commands};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const PORT: u16 = 7300;

/// Options of `lmig-bench tcp`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Connections to migrate.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Every k-th connection has bytes queued in both directions at the freeze.
    #[arg(long, default_value_t = 4)]
    pub queued_every: usize,
    /// Records per batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Capture threads at the source.
    #[arg(long, default_value_t = 1)]
    pub capture_threads: usize,
    /// Restore threads at the destination (they share the CPUs with the capture).
    #[arg(long, default_value_t = 1)]
    pub restore_threads: usize,
    /// Activation threads at the destination (after Commit).
    #[arg(long, default_value_t = 2)]
    pub activate_threads: usize,
    /// How restored connections leave repair mode: auto, probe or no-probe.
    #[arg(long, default_value = "auto")]
    pub exit: String,
    /// Internal: the role of a child process (peers, source, dest).
    #[arg(long, hide = true)]
    pub role: Option<String>,
    /// Internal: the Unix socket between source and destination.
    #[arg(long, hide = true)]
    pub sock: Option<String>,
}

/// This thread's (CPU time, run-queue wait) in ns: figures that other
/// processes on the machine do not inflate (`CLOCK_THREAD_CPUTIME_ID`, and
/// the wait from `/proc/thread-self/schedstat`, updated at scheduler ticks).
fn schedstat() -> (u128, u128) {
    let cpu = lmig_net::sys::thread_cpu_time()
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let wait = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse::<u128>().ok())
        .unwrap_or(0);
    (cpu, wait)
}

fn pat(tag: &str, i: usize) -> Vec<u8> {
    format!("{tag}-{i};").into_bytes()
}

fn service(args: &Args) -> SocketAddr {
    let _ = args;
    SocketAddr::new(IpAddr::V4(Topology::SERVICE_V4), PORT)
}

fn queued(args: &Args, i: usize) -> bool {
    args.queued_every > 0 && i.is_multiple_of(args.queued_every)
}

/// Start this benchmark's worker process `name` in `ns`.
fn spawn_role(ns: &Netns, name: &'static str, args: &Args, sock: &str) -> BoxResult<Worker> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["tcp", "--role", name, "--sock", sock])
        .args(["--conns", &args.conns.to_string()])
        .args(["--queued-every", &args.queued_every.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--capture-threads", &args.capture_threads.to_string()])
        .args(["--restore-threads", &args.restore_threads.to_string()])
        .args(["--activate-threads", &args.activate_threads.to_string()])
        .args(["--exit", &args.exit]);
    Worker::spawn(ns, name, &mut cmd)
}

fn num(v: &[String], i: usize) -> f64 {
    v.get(i).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

fn ids(v: &[String], i: usize) -> BTreeSet<u64> {
    v.get(i)
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// Run the scenario (or, with the hidden `--role`, one of its processes).
pub fn run(args: Args, out: Output) -> BoxResult<()> {
    match args.role.as_deref() {
        Some("peers") => return role_loop(&args, Peers::default()),
        Some("source") => return role_loop(&args, Source::default()),
        Some("dest") => return role_loop(&args, Dest::default()),
        Some(other) => return Err(format!("unknown role {other}").into()),
        None => {}
    }
    if args.conns == 0 || args.conns > 18_000 {
        return Err("--conns must be between 1 and 18000 (open-file limit per process)".into());
    }
    lmig_net::raise_nofile_limit()?;
    let topo = Topology::new()?;
    topo.add_service_address(&topo.a)?;
    let sock = format!("/tmp/lmig-bench-tcp-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&sock);
    let result = (|| -> BoxResult<serde_json::Value> {
        let mut dest = spawn_role(&topo.b, "dest", &args, &sock)?;
        let mut source = spawn_role(&topo.a, "source", &args, &sock)?;
        let mut peers = spawn_role(&topo.client, "peers", &args, &sock)?;
        dest.cmd("listen")?;
        source.cmd("serve")?;
        peers.cmd("connect")?;
        source.cmd("accept")?;
        dest.send("prepare")?;
        source.cmd("plan")?;
        let prep = dest.answer()?;
        let frz = source.cmd("freeze")?;
        let t = Instant::now();
        topo.move_service_address(&topo.a, &topo.b)?;
        let address_move_ms = t.elapsed().as_secs_f64() * 1e3;
        dest.send("run")?;
        let cap = source.cmd("capture")?;
        let rst = dest.answer()?;
        let rel = source.cmd("release")?;
        let d1 = dest.cmd("verify1")?;
        let p = peers.cmd("verify")?;
        let d2 = dest.cmd("verify2")?;
        let n = args.conns as f64;
        let mut broken = ids(&d1, 0);
        broken.extend(ids(&p, 1));
        broken.extend(ids(&d2, 0));
        let failed_restore = num(&rst, 3);
        let t0 = num(&cap, 1);
        let t_end = num(&rst, 2);
        Ok(json!({
            "scenario": "tcp",
            "conns": args.conns,
            "capture_us_per_conn": round(num(&cap, 0) / n, 2),
            "restore_us_per_conn": round((num(&rst, 0) + num(&rst, 1)) / n, 2),
            "pipeline_ms": round((t_end - t0) / 1e6, 2),
            "verified_conns": args.conns.saturating_sub(broken.len()),
            "broken_conns": broken.len() + failed_restore as usize,
            "peer_resets": num(&p, 0),
            "queued_conns": args.conns.div_ceil(args.queued_every.max(1)),
            "freeze_ms": round(num(&frz, 0) / 1e3, 2),
            "prepare_us_per_conn": round(num(&prep, 0) / n, 2),
            "activate_us_per_conn": round(num(&rst, 1) / n, 2),
            "encode_send_us_per_conn": round(num(&cap, 2) / n, 2),
            "decode_us_per_conn": round(num(&rst, 4) / n, 2),
            "capture_cpu_us_per_conn": round(num(&cap, 3) / n, 2),
            "restore_cpu_us_per_conn": round(num(&rst, 5) / n, 2),
            "capture_runqueue_wait_ms": round(num(&cap, 4) / 1e3, 2),
            "restore_runqueue_wait_ms": round(num(&rst, 6) / 1e3, 2),
            "release_us_per_conn": round(num(&rel, 0) / n, 2),
            "address_move_ms": round(address_move_ms, 2),
            "batch": args.batch,
            "capture_threads": args.capture_threads,
            "restore_threads": args.restore_threads,
            "activate_threads": args.activate_threads,
            "exit": args.exit,
            "framing": "lmig-transport wire codec over a Unix stream (no authentication)",
        }))
    })();
    let _ = std::fs::remove_file(&sock);
    out.emit(&result?);
    Ok(())
}

/// One process of the scenario: answers commands read on stdin.
trait RoleImpl {
    fn command(&mut self, args: &Args, cmd: &str) -> BoxResult<String>;
}

fn role_loop(args: &Args, mut r: impl RoleImpl) -> BoxResult<()> {
    serve_commands(|cmd| r.command(args, cmd))
}

fn id_list(v: &[u64]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }
}

fn read_eq(s: &mut TcpStream, want: &[u8]) -> bool {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).is_ok() && got == want
}

#[derive(Default)]
struct Peers {
    conns: Vec<TcpStream>,
    resets0: u64,
}

impl RoleImpl for Peers {
    fn command(&mut self, args: &Args, cmd: &str) -> BoxResult<String> {
        match cmd {
            "connect" => {
                self.resets0 = snmp_tcp("EstabResets");
                let addr = service(args);
                for i in 0..args.conns {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
                    s.set_read_timeout(Some(Duration::from_secs(20)))?;
                    if queued(args, i) {
                        s.write_all(&pat("P1", i))?;
                    }
                    self.conns.push(s);
                }
                Ok(String::new())
            }
            "verify" => {
                let mut broken = Vec::new();
                for (i, c) in self.conns.iter_mut().enumerate() {
                    let ok = (!queued(args, i) || read_eq(c, &pat("S1", i)))
                        && read_eq(c, &pat("S2", i))
                        && c.write_all(&pat("P2", i)).is_ok()
                        && lmig_net::sys::tcp_info(c.as_fd())
                            .map(|t| t.state == 1)
                            .unwrap_or(false);
                    if !ok {
                        broken.push(i as u64);
                    }
                }
                Ok(format!(
                    "{} {}",
                    snmp_tcp("EstabResets") - self.resets0,
                    id_list(&broken)
                ))
            }
            _ => Err(format!("unknown command {cmd}").into()),
        }
    }
}

#[derive(Default)]
struct Source {
    listener: Option<std::thread::JoinHandle<std::io::Result<Vec<TcpStream>>>>,
    src: Option<NetSource>,
    link: Option<UnixStream>,
}

impl RoleImpl for Source {
    fn command(&mut self, args: &Args, cmd: &str) -> BoxResult<String> {
        match cmd {
            "serve" => {
                let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                l.set_reuse_address(true)?;
                l.bind(&service(args).into())?;
                l.listen(4096)?;
                let l: TcpListener = l.into();
                let n = args.conns;
                self.listener = Some(std::thread::spawn(move || {
                    (0..n).map(|_| l.accept().map(|(s, _)| s)).collect()
                }));
                Ok(String::new())
            }
            "accept" => {
                let h = self.listener.take().ok_or("not serving")?;
                let mut conns = h.join().map_err(|_| "acceptor panicked")??;
                // One client connecting sequentially: accept order = connect order.
                let deadline = Instant::now() + Duration::from_secs(30);
                for (i, c) in conns.iter_mut().enumerate() {
                    if queued(args, i) {
                        c.write_all(&pat("S1", i))?;
                        // Bounded wait for the peer's bytes to be queued here.
                        while lmig_net::sys::inq(c.as_fd())? < pat("P1", i).len() as u32 {
                            if Instant::now() > deadline {
                                return Err("peer data did not arrive".into());
                            }
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                }
                let mut src = NetSource::new(
                    NetSourceConfig::default()
                        .with_batch_size(args.batch)
                        .with_threads(args.capture_threads),
                )?;
                for (i, c) in conns.into_iter().enumerate() {
                    src.add(i as u64, OwnedFd::from(c))?;
                }
                self.src = Some(src);
                Ok(String::new())
            }
            "plan" => {
                let plan = self.src.as_mut().ok_or("no sockets")?.plan()?;
                let mut link = UnixStream::connect(args.sock.as_deref().ok_or("no --sock")?)?;
                encode_message(&Message::SocketPlan(plan))?.write_to(&mut link)?;
                self.link = Some(link);
                Ok(String::new())
            }
            "freeze" => {
                let t = Instant::now();
                self.src.as_mut().ok_or("no sockets")?.freeze_sockets()?;
                Ok(format!("{}", t.elapsed().as_micros()))
            }
            "capture" => {
                let src = self.src.as_mut().ok_or("no sockets")?;
                let link = self.link.as_mut().ok_or("no link")?;
                let mut emit_ns = 0u128;
                let mut io_err: Option<String> = None;
                let t0_ns = wall_ns();
                let (cpu0, wait0) = schedstat();
                let t = Instant::now();
                src.capture_sockets(&mut |records| {
                    let te = Instant::now();
                    let r = encode_message(&Message::Sockets {
                        records,
                        last: false,
                    })
                    .map_err(|e| e.to_string())
                    .and_then(|f| f.write_to(link).map_err(|e| e.to_string()));
                    emit_ns += te.elapsed().as_nanos();
                    if let Err(e) = r {
                        io_err = Some(e.clone());
                        return Err(lmig_core::MigrationError::channel_closed(e));
                    }
                    Ok(())
                })?;
                let total_ns = t.elapsed().as_nanos();
                let (cpu1, wait1) = schedstat();
                let te = Instant::now();
                encode_message(&Message::Sockets {
                    records: Vec::new(),
                    last: true,
                })?
                .write_to(link)?;
                encode_message(&Message::Commit)?.write_to(link)?;
                emit_ns += te.elapsed().as_nanos();
                if let Some(e) = io_err {
                    return Err(e.into());
                }
                Ok(format!(
                    "{} {} {} {} {}",
                    (total_ns - emit_ns.min(total_ns)) as f64 / 1e3,
                    t0_ns,
                    emit_ns as f64 / 1e3,
                    (cpu1 - cpu0) as f64 / 1e3,
                    (wait1 - wait0) as f64 / 1e3
                ))
            }
            "release" => {
                let t = Instant::now();
                self.src.as_mut().ok_or("no sockets")?.release_sockets()?;
                Ok(format!("{}", t.elapsed().as_secs_f64() * 1e6))
            }
            _ => Err(format!("unknown command {cmd}").into()),
        }
    }
}

#[derive(Default)]
struct Dest {
    listener: Option<UnixListener>,
    link: Option<UnixStream>,
    buf: BytesMut,
    dec: MessageDecoder,
    decode_ns: u128,
    sink: Option<NetSink>,
    conns: Vec<Option<TcpStream>>,
}

impl Dest {
    fn next(&mut self) -> BoxResult<Message> {
        let link = self.link.as_mut().ok_or("no link")?;
        let mut chunk = vec![0u8; 1 << 20];
        // Bounded by the link: the source sends a finite stream and then waits.
        loop {
            let t = Instant::now();
            let item = self.dec.decode(&mut self.buf)?;
            self.decode_ns += t.elapsed().as_nanos();
            if let Some(item) = item {
                return match item {
                    WireItem::Message(m) => Ok(m),
                    WireItem::Handshake(_) => Err("unexpected handshake".into()),
                };
            }
            let n = link.read(&mut chunk)?;
            if n == 0 {
                return Err("source closed the link".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl RoleImpl for Dest {
    fn command(&mut self, args: &Args, cmd: &str) -> BoxResult<String> {
        match cmd {
            "listen" => {
                self.listener = Some(UnixListener::bind(
                    args.sock.as_deref().ok_or("no --sock")?,
                )?);
                Ok(String::new())
            }
            "prepare" => {
                let (link, _) = self.listener.as_ref().ok_or("not listening")?.accept()?;
                self.link = Some(link);
                let Message::SocketPlan(plan) = self.next()? else {
                    return Err("expected SocketPlan".into());
                };
                let exit = match args.exit.as_str() {
                    "probe" => RepairExit::WindowProbe,
                    "no-probe" => RepairExit::NoWindowProbe,
                    _ => RepairExit::Auto,
                };
                let mut sink = NetSink::new(
                    SinkConfig::default()
                        .with_threads(args.restore_threads)
                        .with_activate_threads(args.activate_threads)
                        .with_exit(exit)
                        .with_tolerate_bad_records(true),
                )?;
                let t = Instant::now();
                sink.prepare_sockets(&plan)?;
                let us = t.elapsed().as_secs_f64() * 1e6;
                self.sink = Some(sink);
                Ok(format!("{us}"))
            }
            "run" => {
                let mut restore_ns = 0u128;
                let (mut restore_cpu_ns, mut restore_wait_ns) = (0u128, 0u128);
                // Bounded: the source sends its batches, one last batch and Commit.
                loop {
                    match self.next()? {
                        Message::Sockets { records, .. } => {
                            let (c0, w0) = schedstat();
                            let t = Instant::now();
                            self.sink
                                .as_mut()
                                .ok_or("not prepared")?
                                .restore_batch(records)?;
                            restore_ns += t.elapsed().as_nanos();
                            let (c1, w1) = schedstat();
                            restore_cpu_ns += c1 - c0;
                            restore_wait_ns += w1 - w0;
                        }
                        Message::Commit => break,
                        other => return Err(format!("unexpected {}", other.name()).into()),
                    }
                }
                let sink = self.sink.as_mut().ok_or("not prepared")?;
                let t = Instant::now();
                sink.activate_sockets()?;
                let activate_ns = t.elapsed().as_nanos();
                let t_end = wall_ns();
                let failed = sink.failures().len();
                let mut fds = sink.take_fds();
                self.conns = (0..args.conns)
                    .map(|i| fds.remove(&(i as u64)).map(TcpStream::from))
                    .collect();
                Ok(format!(
                    "{} {} {} {} {} {} {}",
                    restore_ns as f64 / 1e3,
                    activate_ns as f64 / 1e3,
                    t_end,
                    failed,
                    self.decode_ns as f64 / 1e3,
                    restore_cpu_ns as f64 / 1e3,
                    restore_wait_ns as f64 / 1e3
                ))
            }
            "verify1" => {
                let mut broken = Vec::new();
                for (i, c) in self.conns.iter_mut().enumerate() {
                    let ok = match c {
                        Some(c) => {
                            c.set_read_timeout(Some(Duration::from_secs(20)))?;
                            (!queued(args, i) || read_eq(c, &pat("P1", i)))
                                && c.write_all(&pat("S2", i)).is_ok()
                        }
                        None => false,
                    };
                    if !ok {
                        broken.push(i as u64);
                    }
                }
                Ok(id_list(&broken))
            }
            "verify2" => {
                let mut broken = Vec::new();
                for (i, c) in self.conns.iter_mut().enumerate() {
                    if !c.as_mut().is_some_and(|c| read_eq(c, &pat("P2", i))) {
                        broken.push(i as u64);
                    }
                }
                Ok(id_list(&broken))
            }
            _ => Err(format!("unknown command {cmd}").into()),
        }
    }
}
