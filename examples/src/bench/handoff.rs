//! `lmig-bench handoff`: the network lock, held packets and the address
//! handoff while `--conns` clients keep sending.
//!
//! Four processes: this one (the orchestrator) makes the test topology
//! (`lmig_net::topology`: hosts client, A and B) and re-executes itself as
//! * `clients` in the client namespace: `--conns` TCP connections to the
//!   service address, each sending an 8-byte request and waiting for its echo,
//!   `--rate` requests per second in total, spread over the connections;
//! * `source` in A: the echo program, serving its connections through a
//!   [`Locked`]`<`[`NetSource`]`>` (it keeps no fd of its own);
//! * `dest` in B: a [`Handoff`]`<`[`NetSink`]`>`, which serves the restored
//!   connections after `Commit`.
//!
//! Source and destination talk over a Unix stream with lmig-transport's wire
//! codec (`SocketPlan`, `Sockets{records, last}`, `Commit`). The sequence is
//! the session's: lock installed and plan sent before the freeze; at the
//! freeze the program stops serving, the lock engages (packets to the
//! service are held) and the sockets enter repair mode; capture and restore;
//! `Commit`; the source removes the address, re-injects what it held and
//! forwards stragglers; the destination adds the address, announces it,
//! leaves repair mode and lets its held packets through.
//!
//! Figures: `lock_ms` (engaging the lock at the freeze), `unlock_ms`
//! (destination: the set flush once its held packets are through),
//! `release_held_ms` (destination: until every held packet was let through,
//! in order, as the sockets had room), `address_move_ms` (source
//! removal + destination add and announcement), `freeze_ms` (source freeze to
//! destination serving, across processes), `client_stall_ms` (the longest
//! request → reply time any client saw), `packets_held` (packets the source's
//! lock caught and re-injected towards the destination; `dest_held` counts
//! what the destination's lock then held until its sockets were live, the
//! re-injected ones included), `packets_dropped`,
//! `rst_seen` (RSTs sent by A or B until the clients stop, plus resets the
//! clients saw; `rst_at_teardown` counts those sent when the benchmark then
//! closes its own connections, unread bytes and all); for
//! context `nft_f_ms` (the same lock engagement done by spawning `nft -f`),
//! `source_unlock_ms`, `client_retrans`, `requests`, `capture_restore_ms`.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use lmig_core::protocol::Message;
use lmig_core::traits::{SocketSink, SocketSource};
use lmig_net::handoff::{
    HandoffConfig, HandoffSink as Handoff, HandoffSource as Locked, ServiceAddr,
};
use lmig_net::topology::{Netns, Topology};
use lmig_net::{NetSink, NetSource, NetSourceConfig, SinkConfig};
use lmig_transport::wire::{MessageDecoder, WireItem, encode_message};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use serde_json::json;

use super::{Output, round};
use crate::common::clock::wall_ns;
use crate::common::netstat::snmp_tcp;
use crate::common::process::{Worker, serve_commands};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const PORT: u16 = 7400;

/// Options of `lmig-bench handoff`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Client connections.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Requests per second over all connections.
    #[arg(long, default_value_t = 4000)]
    pub rate: u64,
    /// How long clients keep sending after the handoff, in ms.
    #[arg(long, default_value_t = 500)]
    pub after_ms: u64,
    /// Use IPv6 (default IPv4).
    #[arg(long)]
    pub v6: bool,
    /// The source closes its released sockets before `release` returns
    /// (default: on a background thread at the lowest CPU priority,
    /// `NetSourceConfig::close_in_background`).
    #[arg(long)]
    pub close_in_foreground: bool,
    /// Internal: the role of a re-executed process.
    #[arg(long, hide = true)]
    pub role: Option<String>,
    /// Internal: the Unix socket between source and destination.
    #[arg(long, hide = true)]
    pub sock: Option<String>,
}

fn service(args: &Args) -> SocketAddr {
    let ip: IpAddr = if args.v6 {
        Topology::SERVICE_V6.into()
    } else {
        Topology::SERVICE_V4.into()
    };
    SocketAddr::new(ip, PORT)
}

fn handoff_config() -> HandoffConfig {
    HandoffConfig::new(
        [
            ServiceAddr::new(Topology::SERVICE_V4, 24),
            ServiceAddr::new(Topology::SERVICE_V6, 64),
        ],
        "eth0",
    )
}

/// A worker's answer as numbers (NaN for anything else).
fn nums(v: Vec<String>) -> Vec<f64> {
    v.iter().map(|x| x.parse().unwrap_or(f64::NAN)).collect()
}

/// Start this benchmark's worker process `name` in `ns`.
fn spawn_role(ns: &Netns, name: &'static str, args: &Args, sock: &str) -> BoxResult<Worker> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["handoff", "--role", name, "--sock", sock])
        .args(["--conns", &args.conns.to_string()])
        .args(["--rate", &args.rate.to_string()])
        .args(if args.v6 { &["--v6"][..] } else { &[][..] })
        .args(if args.close_in_foreground {
            &["--close-in-foreground"][..]
        } else {
            &[][..]
        });
    Worker::spawn(ns, name, &mut cmd)
}

/// Time to engage an equivalent lock by spawning `nft -f` (a scratch table
/// in `ns`, an element added to its set), in ms.
fn nft_f_ms(ns: &Netns) -> BoxResult<f64> {
    let table = format!("lmig_nftf_{}", std::process::id());
    let run = |script: &str| -> BoxResult<f64> {
        let t = Instant::now();
        let mut child = ns.spawn(Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()))?;
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(script.as_bytes())?;
        let st = child.wait()?;
        if !st.success() {
            return Err(format!("nft -f failed: {st}").into());
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    run(&format!(
        "table ip {table} {{\n set svc {{\n  type ipv4_addr\n }}\n chain hold {{\n  type filter hook prerouting priority -300; policy accept;\n  ip daddr @svc counter\n }}\n}}\n"
    ))?;
    let ms = run(&format!(
        "add element ip {table} svc {{ 198.51.100.100 }}\n"
    ))?;
    run(&format!("delete table ip {table}\n"))?;
    Ok(ms)
}

/// The orchestrator.
pub fn run(args: Args, out: Output) -> BoxResult<()> {
    if let Some(role) = args.role.clone() {
        return role_main(&args, &role);
    }
    let topo = Topology::new()?;
    topo.add_service_address(&topo.a)?;
    let sock = format!("/tmp/lmig-handoff-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&sock);
    let mut dest = spawn_role(&topo.b, "dest", &args, &sock)?;
    let mut source = spawn_role(&topo.a, "source", &args, &sock)?;
    let mut clients = spawn_role(&topo.client, "clients", &args, &sock)?;

    dest.cmd("listen")?;
    source.cmd("serve")?;
    clients.cmd("connect")?;
    source.cmd("accepted")?;
    clients.cmd("start")?;
    std::thread::sleep(Duration::from_millis(300));

    // Before the freeze: the plan, prepared at the destination.
    dest.send("prepare")?;
    source.cmd("prepare")?;
    dest.answer()?;
    std::thread::sleep(Duration::from_millis(100));

    // Freeze → Commit → handoff, both sides at once.
    dest.send("migrate")?;
    let s = nums(source.cmd("migrate")?);
    let d = nums(dest.answer()?);
    let (freeze_start_ns, lock_ms, src_move_ms, capture_ms) = (s[0], s[1], s[2], s[3]);
    let (serving_ns, dst_move_ms) = (d[0], d[1]);
    std::thread::sleep(Duration::from_millis(args.after_ms));

    // RSTs of the hosts over the migration window, before the teardown
    // closes connections (with unread bytes: RSTs no client sees).
    let (src_rsts, dst_rsts) = (nums(source.cmd("rsts")?)[0], nums(dest.cmd("rsts")?)[0]);
    let c = nums(clients.cmd("stop")?);
    let (requests, answered, stall_ms, resets, retrans) = (c[0], c[1], c[2], c[3], c[4]);
    let sf = nums(source.cmd("finish")?);
    let df = nums(dest.cmd("finish")?);
    // The destination lets its held packets through in the background.
    let (unlock_ms, release_ms) = (df[3], df[4]);
    let nft_f = nft_f_ms(&topo.a).unwrap_or(f64::NAN);
    let freeze_ms = (serving_ns - freeze_start_ns) / 1e6;
    let lost = requests - answered;

    out.emit(&json!({
        "scenario": "handoff",
        "conns": args.conns,
        "lock_ms": round(lock_ms, 3),
        "unlock_ms": round(unlock_ms, 3),
        "address_move_ms": round(src_move_ms + dst_move_ms, 3),
        "freeze_ms": round(freeze_ms, 2),
        "client_stall_ms": round(stall_ms, 2),
        "packets_held": sf[0],
        "dest_held": df[0],
        "packets_dropped": sf[1] + df[1],
        "rst_seen": resets + src_rsts + dst_rsts,
        "rst_by": format!("clients {resets} source {src_rsts} dest {dst_rsts}"),
        "rst_at_teardown": sf[2] + df[2] - src_rsts - dst_rsts,
        "nft_f_ms": round(nft_f, 2),
        "source_unlock_ms": round(sf[3], 3),
        "release_held_ms": round(release_ms, 3),
        "capture_restore_ms": round(capture_ms, 2),
        "close_in_background": !args.close_in_foreground,
        "client_retrans": retrans,
        "requests": requests,
        "unanswered": lost,
        "family": if args.v6 { "ipv6" } else { "ipv4" },
    }));
    drop((clients, source, dest));
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

fn role_main(args: &Args, role: &str) -> BoxResult<()> {
    let mut state = RoleState::default();
    serve_commands(|cmd| match role {
        "clients" => state.clients(args, cmd),
        "source" => state.source(args, cmd),
        "dest" => state.dest(args, cmd),
        _ => Err(format!("unknown role {role}").into()),
    })
}

/// What a role process keeps between commands.
#[derive(Default)]
struct RoleState {
    accept: Option<std::thread::JoinHandle<std::io::Result<Vec<TcpStream>>>>,
    program: Option<Program>,
    conns: Vec<TcpStream>,
    client: Option<std::thread::JoinHandle<ClientFigures>>,
    stop: Arc<AtomicBool>,
    listener: Option<UnixListener>,
    link: Option<UnixStream>,
    sink: Option<Handoff<NetSink>>,
    echo_b: Option<std::thread::JoinHandle<()>>,
    /// The destination program's poller: restored sockets are registered
    /// as their batches arrive, before `Commit`.
    epoll_b: Option<Epoll>,
    reader: Option<Reader>,
    retrans0: u64,
    rsts0: u64,
}

/// The source's program thread: serves through the `Locked<NetSource>` it
/// owns and runs the migration steps it is sent.
struct Program {
    tx: mpsc::Sender<(String, mpsc::Sender<Result<String, String>>)>,
    handle: std::thread::JoinHandle<()>,
}

impl Program {
    fn call(&self, cmd: &str) -> BoxResult<String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send((cmd.to_string(), tx))
            .map_err(|_| "program thread gone")?;
        Ok(rx.recv().map_err(|_| "program thread gone")??)
    }
}

/// Echo whatever is readable on `fd` (non-blocking); false when it closed or failed.
fn echo_once(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) -> bool {
    // Bounded: a few reads per readiness event.
    for _ in 0..16 {
        match nix::unistd::read(fd, buf) {
            Ok(0) => return false,
            Ok(n) => {
                let mut off = 0;
                // Bounded by n; small writes on an idle socket do not block.
                for _ in 0..64 {
                    if off >= n {
                        break;
                    }
                    match nix::unistd::write(fd, &buf[off..n]) {
                        Ok(w) => off += w,
                        Err(nix::errno::Errno::EAGAIN) => {
                            std::thread::sleep(Duration::from_micros(50))
                        }
                        Err(_) => return false,
                    }
                }
            }
            Err(nix::errno::Errno::EAGAIN) => return true,
            Err(_) => return false,
        }
    }
    true
}

fn program_thread(
    mut src: Locked<NetSource>,
    ids: Vec<u64>,
    sock: String,
    rx: mpsc::Receiver<(String, mpsc::Sender<Result<String, String>>)>,
) {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    for &id in &ids {
        if let Some(fd) = src.inner().fd(id) {
            let _ = epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, id));
        }
    }
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = vec![0u8; 4096];
    let mut link: Option<UnixStream> = None;
    let mut serving = true;
    // Bounded by the orchestrator's `quit` (the channel closes).
    loop {
        if serving {
            let n = epoll.wait(&mut events, 1u8).unwrap_or(0);
            for ev in &events[..n] {
                if let Some(fd) = src.inner().fd(ev.data()) {
                    echo_once(fd, &mut buf);
                }
            }
        }
        let msg = if serving {
            match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::TryRecvError::Empty) => continue,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            }
        };
        let (cmd, reply) = msg;
        let r: BoxResult<String> = (|| match cmd.as_str() {
            "prepare" => {
                let mut l = UnixStream::connect(&sock)?;
                let plan = src.plan()?;
                encode_message(&Message::SocketPlan(plan))?.write_to(&mut l)?;
                link = Some(l);
                Ok(String::new())
            }
            "migrate" => {
                // The program stops touching its sockets: the freeze.
                serving = false;
                let t0 = wall_ns();
                let t = Instant::now();
                src.freeze()?;
                let l = link.as_mut().ok_or("not prepared")?;
                let tc = Instant::now();
                src.capture(&mut |records| {
                    encode_message(&Message::Sockets {
                        records,
                        last: false,
                    })
                    .map_err(|e| lmig_core::MigrationError::channel_closed(e.to_string()))?
                    .write_to(l)
                    .map_err(|e| lmig_core::MigrationError::channel_closed(e.to_string()))
                })?;
                encode_message(&Message::Sockets {
                    records: Vec::new(),
                    last: true,
                })?
                .write_to(l)?;
                encode_message(&Message::Commit)?.write_to(l)?;
                let capture_ms = tc.elapsed().as_secs_f64() * 1e3;
                let _ = t;
                src.release()?;
                let st = src.handoff().stats();
                Ok(format!(
                    "{} {} {} {}",
                    t0,
                    st.lock.as_secs_f64() * 1e3,
                    st.address_move.as_secs_f64() * 1e3,
                    capture_ms
                ))
            }
            "finish" => {
                let st = src.handoff().finish();
                Ok(format!(
                    "{} {} {}",
                    st.held,
                    st.dropped,
                    st.unlock.as_secs_f64() * 1e3
                ))
            }
            other => Err(format!("unknown program command {other}").into()),
        })();
        let _ = reply.send(r.map_err(|e| e.to_string()));
    }
}

#[derive(Default, Debug)]
struct ClientFigures {
    requests: u64,
    answered: u64,
    max_stall: Duration,
    resets: u64,
}

/// The clients: every connection sends a request, waits for its echo, and
/// sends the next one after its turn comes again (`rate` per second overall).
fn client_loop(conns: &mut [TcpStream], rate: u64, stop: &AtomicBool) -> ClientFigures {
    let mut f = ClientFigures::default();
    let n = conns.len().max(1);
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    for (i, c) in conns.iter().enumerate() {
        let _ = c.set_nonblocking(true);
        let _ = epoll.add(c.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64));
    }
    let period =
        Duration::from_secs_f64(n as f64 / rate.max(1) as f64).max(Duration::from_millis(1));
    let start = Instant::now();
    // Per connection: when the outstanding request was sent, bytes of its echo so far, next send time.
    let mut sent_at: Vec<Option<Instant>> = vec![None; n];
    let mut got = vec![0usize; n];
    let mut next: Vec<Instant> = (0..n)
        .map(|i| start + period.mul_f64(i as f64 / n as f64))
        .collect();
    let mut dead = vec![false; n];
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = [0u8; 64];
    let mut cursor = 0usize;
    let mut stop_at: Option<Instant> = None;
    // Bounded: stops 2 s after `stop` (outstanding replies drain), or after 10 minutes.
    while start.elapsed() < Duration::from_secs(600) {
        if stop.load(Ordering::Acquire) && stop_at.is_none() {
            stop_at = Some(Instant::now());
        }
        let draining = stop_at.is_some();
        if let Some(t) = stop_at {
            if t.elapsed() > Duration::from_secs(2) || sent_at.iter().all(Option::is_none) {
                break;
            }
        }
        // Send the requests that are due (scan a slice per round).
        let now = Instant::now();
        if !draining {
            for _ in 0..n.min(2048) {
                let i = cursor;
                cursor = (cursor + 1) % n;
                if dead[i] || sent_at[i].is_some() || next[i] > now {
                    continue;
                }
                match conns[i].write(&f.requests.to_le_bytes()) {
                    Ok(8) => {
                        sent_at[i] = Some(Instant::now());
                        got[i] = 0;
                        f.requests += 1;
                    }
                    Ok(_) | Err(_) => {
                        dead[i] = true;
                        f.resets += 1;
                    }
                }
            }
        }
        let k = epoll.wait(&mut events, 1u8).unwrap_or(0);
        for ev in &events[..k] {
            let i = ev.data() as usize;
            // Bounded: a few reads per event.
            for _ in 0..4 {
                match conns[i].read(&mut buf) {
                    Ok(0) => {
                        if !dead[i] {
                            dead[i] = true;
                            f.resets += 1;
                        }
                        let _ = epoll.delete(conns[i].as_fd());
                        break;
                    }
                    Ok(m) => {
                        got[i] += m;
                        if got[i] >= 8 {
                            if let Some(t) = sent_at[i].take() {
                                f.max_stall = f.max_stall.max(t.elapsed());
                                f.answered += 1;
                            }
                            got[i] -= 8;
                            next[i] = Instant::now() + period;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        if !dead[i] {
                            dead[i] = true;
                            f.resets += 1;
                        }
                        let _ = epoll.delete(conns[i].as_fd());
                        break;
                    }
                }
            }
        }
    }
    f
}

impl RoleState {
    fn clients(&mut self, args: &Args, cmd: &str) -> BoxResult<String> {
        match cmd {
            "connect" => {
                let addr = service(args);
                for _ in 0..args.conns {
                    let s = TcpStream::connect(addr)?;
                    s.set_nodelay(true)?;
                    self.conns.push(s);
                }
                Ok(String::new())
            }
            "start" => {
                // Connection setup (SYN retransmissions at a full backlog) is not counted.
                self.retrans0 = snmp_tcp("RetransSegs");
                let mut conns = std::mem::take(&mut self.conns);
                let stop = Arc::clone(&self.stop);
                let rate = args.rate;
                self.client = Some(std::thread::spawn(move || {
                    client_loop(&mut conns, rate, &stop)
                }));
                Ok(String::new())
            }
            "stop" => {
                self.stop.store(true, Ordering::Release);
                let f = self
                    .client
                    .take()
                    .ok_or("not started")?
                    .join()
                    .map_err(|_| "client loop panicked")?;
                let retrans = snmp_tcp("RetransSegs") - self.retrans0;
                Ok(format!(
                    "{} {} {} {} {}",
                    f.requests,
                    f.answered,
                    f.max_stall.as_secs_f64() * 1e3,
                    f.resets,
                    retrans
                ))
            }
            _ => Err(format!("unknown command {cmd}").into()),
        }
    }

    fn source(&mut self, args: &Args, cmd: &str) -> BoxResult<String> {
        match cmd {
            "serve" => {
                let l = TcpListener::bind(service(args))?;
                let n = args.conns;
                self.accept = Some(std::thread::spawn(move || {
                    (0..n)
                        .map(|_| l.accept().map(|(s, _)| s))
                        .collect::<std::io::Result<Vec<_>>>()
                }));
                Ok(String::new())
            }
            "accepted" => {
                let conns = self
                    .accept
                    .take()
                    .ok_or("not serving")?
                    .join()
                    .map_err(|_| "accept panicked")??;
                self.rsts0 = snmp_tcp("OutRsts");
                // The lock is installed here, before any freeze; a failure ends the run.
                // Held packets go straight to B (any family: one link-layer address).
                let cfg = handoff_config().forward_to(Topology::B_V4.into());
                let net = NetSource::new(
                    NetSourceConfig::default().with_close_in_background(!args.close_in_foreground),
                )?;
                let mut src = Locked::new(net, cfg)?;
                let mut ids = Vec::with_capacity(conns.len());
                for (i, c) in conns.into_iter().enumerate() {
                    c.set_nonblocking(true)?;
                    src.inner_mut().add(i as u64, OwnedFd::from(c))?;
                    ids.push(i as u64);
                }
                let (tx, rx) = mpsc::channel();
                let sock = args.sock.clone().ok_or("no --sock")?;
                let handle = std::thread::spawn(move || program_thread(src, ids, sock, rx));
                self.program = Some(Program { tx, handle });
                Ok(String::new())
            }
            "prepare" | "migrate" => self.program.as_ref().ok_or("no program")?.call(cmd),
            // RSTs sent so far (read while the clients still run: closing
            // the test's own connections at the end may send some).
            "rsts" => Ok((snmp_tcp("OutRsts") - self.rsts0).to_string()),
            "finish" => {
                let p = self.program.take().ok_or("no program")?;
                let r = p.call("finish")?;
                drop(p.tx);
                let _ = p.handle.join();
                let rsts = snmp_tcp("OutRsts") - self.rsts0;
                let mut w: Vec<&str> = r.split_whitespace().collect();
                let unlock = w.pop().unwrap_or("0");
                let rsts = rsts.to_string();
                w.push(&rsts);
                w.push(unlock);
                Ok(w.join(" "))
            }
            _ => Err(format!("unknown command {cmd}").into()),
        }
    }

    fn dest(&mut self, args: &Args, cmd: &str) -> BoxResult<String> {
        let _ = args;
        match cmd {
            "rsts" => Ok((snmp_tcp("OutRsts") - self.rsts0).to_string()),
            "listen" => {
                let sock = args.sock.clone().ok_or("no --sock")?;
                self.listener = Some(UnixListener::bind(sock)?);
                self.rsts0 = snmp_tcp("OutRsts");
                Ok(String::new())
            }
            "prepare" => {
                let (link, _) = self.listener.as_ref().ok_or("not listening")?.accept()?;
                self.link = Some(link);
                // Restored non-blocking: the program needs no call per
                // connection after the commit (as kvd).
                let net = NetSink::new(SinkConfig::default().with_nonblocking(true))?;
                let mut sink = Handoff::new(net, handoff_config())?;
                self.epoll_b = Some(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
                let mut dec = Reader::default();
                match dec.next(self.link.as_mut().ok_or("no link")?)? {
                    Message::SocketPlan(plan) => sink.prepare(&plan)?,
                    m => return Err(format!("expected SocketPlan, got {}", m.name()).into()),
                }
                self.sink = Some(sink);
                self.reader = Some(dec);
                Ok(String::new())
            }
            "migrate" => {
                let link = self.link.as_mut().ok_or("no link")?;
                let sink = self.sink.as_mut().ok_or("not prepared")?;
                let dec = self.reader.as_mut().ok_or("not prepared")?;
                let epoll = self.epoll_b.take().ok_or("not prepared")?;
                // Bounded by the source's finite stream ending with Commit.
                let mut registered = 0;
                loop {
                    match dec.next(link)? {
                        Message::Sockets { records, .. } => sink.restore(records)?,
                        Message::Commit => break,
                        m => return Err(format!("unexpected {}", m.name()).into()),
                    }
                    // The program registers what was restored with its
                    // poller while the freeze goes on (nothing is readable
                    // before the sockets are activated).
                    // (`take_fds` hands these very sockets to it later.)
                    for v in sink.inner().pending_sockets().skip(registered) {
                        epoll.add(v.fd, EpollEvent::new(EpollFlags::EPOLLIN, v.id))?;
                        registered += 1;
                    }
                }
                sink.activate()?;
                let conns: HashMap<u64, TcpStream> = sink
                    .inner_mut()
                    .take_fds()
                    .into_iter()
                    .map(|(id, fd)| (id, TcpStream::from(fd)))
                    .collect();
                let stats = sink.handoff().stats();
                let stop = Arc::clone(&self.stop);
                let (ready_tx, ready_rx) = mpsc::channel();
                self.echo_b = Some(std::thread::spawn(move || {
                    echo_streams(conns, epoll, &stop, ready_tx)
                }));
                // The program runs again at the destination: the freeze ends.
                ready_rx
                    .recv()
                    .map_err(|_| "destination program failed to start")?;
                let serving = wall_ns();
                // (Unlock and release run in the background: see "finish".)
                Ok(format!(
                    "{} {}",
                    serving,
                    stats.address_move.as_secs_f64() * 1e3
                ))
            }
            "finish" => {
                self.stop.store(true, Ordering::Release);
                if let Some(h) = self.echo_b.take() {
                    let _ = h.join();
                }
                let st = self.sink.as_mut().ok_or("not prepared")?.handoff().finish();
                let rsts = snmp_tcp("OutRsts") - self.rsts0;
                Ok(format!(
                    "{} {} {} {} {}",
                    st.held,
                    st.dropped,
                    rsts,
                    st.unlock.as_secs_f64() * 1e3,
                    st.release.as_secs_f64() * 1e3
                ))
            }
            _ => Err(format!("unknown command {cmd}").into()),
        }
    }
}

/// The destination's program: echo on the restored connections until `stop`.
fn echo_streams(
    conns: HashMap<u64, TcpStream>,
    epoll: Epoll,
    stop: &AtomicBool,
    ready: mpsc::Sender<()>,
) {
    let _ = ready.send(());
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = vec![0u8; 4096];
    // Bounded by `stop`, which `finish` sets.
    while !stop.load(Ordering::Acquire) {
        let n = epoll.wait(&mut events, 1u8).unwrap_or(0);
        for ev in &events[..n] {
            if let Some(c) = conns.get(&ev.data()) {
                if !echo_once(c.as_fd(), &mut buf) {
                    let _ = epoll.delete(c.as_fd());
                }
            }
        }
    }
}

/// Reads wire messages from the link.
#[derive(Default)]
struct Reader {
    buf: BytesMut,
    dec: MessageDecoder,
}

impl Reader {
    fn next(&mut self, link: &mut UnixStream) -> BoxResult<Message> {
        let mut chunk = vec![0u8; 1 << 20];
        // Bounded by the link: the source sends a finite stream.
        loop {
            if let Some(item) = self.dec.decode(&mut self.buf)? {
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
