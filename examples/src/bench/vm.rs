//! `lmig-bench vm --mib M --dirty-mbps R --mode precopy|postcopy|hybrid
//! --tracker kvm|kvm-ring|uffd|kvm-get --json`: the micro-VMM's running guest migrating between
//! two VMM processes on two namespace hosts (issue 21).
//!
//! Host A runs the source VMM (guest booted, buffer filled, dirtying R MB/s,
//! heartbeats every 1 ms), host B the destination VMM (same guest size, not
//! booted). Both are this binary's hidden `vm-peer` command, driven line by
//! line ([`Worker`]). Times are `CLOCK_MONOTONIC`, one clock on this host.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use lmig_core::model::RegionPages;
use lmig_core::session::Mode;
use lmig_core::{DirtyClearer, DirtyTracker};
use lmig_net::topology::Topology;
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, connect};
use serde_json::json;

use super::{Output, round};
use crate::common::process::Worker;
use crate::vmm::migrate::{migrate_out, receive};
use crate::vmm::{HeartbeatLog, Machine, MachineConfig};

/// The destination's migration port on host B.
const PORT: u16 = 7021;
/// How long B's guest runs after resuming before its buffer check.
const AFTER: Duration = Duration::from_millis(300);
/// Bound on every wait for the guest.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of the `vm` scenario.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Guest RAM in MiB (all but the first 2 MiB is the guest's filled buffer).
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// MB/s the guest dirties (whole pages, rounded to pages per ms).
    #[arg(long, default_value_t = 100.0)]
    pub dirty_mbps: f64,
    /// precopy, postcopy or hybrid.
    #[arg(long, default_value = "precopy")]
    pub mode: String,
    /// Dirty tracker on the source: kvm (the default: KVM's dirty log, read
    /// with KVM_GET_DIRTY_LOG and reset with KVM_CLEAR_DIRTY_LOG in chunks
    /// where offered; it starts ~6x and collects 3-7x faster than uffd
    /// here), uffd (uffd-wp + PAGEMAP_SCAN on the VMM's mapping of guest
    /// RAM), kvm-ring (KVM's per-vCPU dirty ring, harvested while the
    /// guest runs) or kvm-get (KVM_GET_DIRTY_LOG alone, resetting all at once).
    #[arg(long, default_value = "kvm")]
    pub tracker: String,
    /// The source VMM's vCPU thread nice value (default: the process's).
    #[arg(long, allow_hyphen_values = true)]
    pub vcpu_nice: Option<i32>,
    /// Both VMMs run their vCPU thread in SCHED_FIFO at this priority
    /// (0: normal scheduling). The vCPU then never waits for one of the
    /// migration's threads past that thread's next preemption point.
    /// Default: 1 in pre-copy, 0 in hybrid and post-copy (see
    /// [`Args::vcpu_cpu`]).
    #[arg(long)]
    pub vcpu_rt: Option<i32>,
    /// The destination VMM's receiving threads (its main thread and the
    /// channel's readers it starts) run at this nice value, its vCPU thread
    /// at 0 (0: all at the process's). Off by default: with the vCPU
    /// pinned (--vcpu-cpu) and real-time it gains nothing, and the freeze's
    /// last steps on the destination (placing the last pages, `Ready`,
    /// starting the vCPU) wait behind other threads (heartbeat gap 2.96 -
    /// 3.7 ms at 0 against 4.1 - 13.9 at 10, 3 and 5 runs).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub receive_nice: i32,
    /// Both VMMs run their vCPU thread on this CPU only and every other
    /// thread (the migration's) on the other CPUs (-1: no pinning). On
    /// this kernel (no preemption in system calls) a woken vCPU otherwise
    /// waits for a migration thread's long system call (e.g. the
    /// destination's scan of guest memory at the start) to end.
    ///
    /// Default: 0 in pre-copy, -1 in hybrid and post-copy. Measured at
    /// 1000 MB/s (2 runs each): pinned and real-time, the migration gets
    /// one CPU, hybrid stops pre-copy after round 0 and its freeze grows
    /// (heartbeat gap 62-82 ms against 15-41); real-time unpinned, the
    /// guest's CPU time delays the migration's threads (post-copy gap
    /// 233-237 ms against 81-82).
    #[arg(long, allow_hyphen_values = true)]
    pub vcpu_cpu: Option<i64>,
}

impl Args {
    /// `--vcpu-rt` and `--vcpu-cpu`, their defaults resolved by mode.
    fn vcpu_placement(&self) -> (i32, i64) {
        let precopy = self.mode == "precopy";
        (
            self.vcpu_rt.unwrap_or(i32::from(precopy)),
            self.vcpu_cpu.unwrap_or(if precopy { 0 } else { -1 }),
        )
    }
}

/// Options of the hidden `vm-peer` command (one VMM process).
#[derive(clap::Args, Debug, Clone)]
pub struct PeerArgs {
    /// source or dest.
    #[arg(long)]
    pub role: String,
    /// Guest RAM in MiB.
    #[arg(long)]
    pub mib: u64,
    /// MB/s the guest dirties (source).
    #[arg(long, default_value_t = 0.0)]
    pub dirty_mbps: f64,
    /// precopy, postcopy or hybrid (source).
    #[arg(long, default_value = "precopy")]
    pub mode: String,
    /// kvm, kvm-ring, uffd or kvm-get (source).
    #[arg(long, default_value = "kvm")]
    pub tracker: String,
    /// The vCPU thread's nice value (source).
    #[arg(long, allow_hyphen_values = true)]
    pub vcpu_nice: Option<i32>,
    /// The vCPU thread's SCHED_FIFO priority (0: none).
    #[arg(long, default_value_t = 0)]
    pub vcpu_rt: i32,
    /// The receiving threads' nice value (destination).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub receive_nice: i32,
    /// The vCPU thread's CPU; the VMM's other threads get the others (-1: none).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub vcpu_cpu: i64,
}

/// The `--tracker` values.
const TRACKERS: [&str; 4] = ["uffd", "kvm", "kvm-ring", "kvm-get"];

fn mode(s: &str) -> Result<Mode, Box<dyn std::error::Error>> {
    match s {
        "precopy" => Ok(Mode::Precopy),
        "postcopy" => Ok(Mode::Postcopy),
        "hybrid" => Ok(Mode::Hybrid),
        other => Err(format!("--mode {other}: precopy, postcopy or hybrid").into()),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    (0..s.len() / 2)
        .map(|i| {
            u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or("odd hex")?, 16).map_err(Into::into)
        })
        .collect()
}

/// Run the scenario.
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn std::error::Error>> {
    mode(&args.mode)?;
    if !TRACKERS.contains(&args.tracker.as_str()) {
        return Err(format!("--tracker {}: uffd, kvm, kvm-ring or kvm-get", args.tracker).into());
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "lmig-bench vm needs root (namespaces, /dev/kvm, kernel-mode userfaultfd)".into(),
        );
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("lmig-bench vm needs KVM: /dev/kvm does not exist".into());
    }
    let topo = Topology::new()?;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let exe = std::env::current_exe()?;
    let (vcpu_rt, vcpu_cpu) = args.vcpu_placement();
    let peer = |role: &str| {
        let mut cmd = Command::new(&exe);
        cmd.args(["vm-peer", "--role", role, "--mib", &args.mib.to_string()])
            .args([
                "--dirty-mbps",
                &args.dirty_mbps.to_string(),
                "--mode",
                &args.mode,
                "--tracker",
                &args.tracker,
            ]);
        if let Some(nice) = args.vcpu_nice {
            cmd.arg(format!("--vcpu-nice={nice}"));
        }
        cmd.arg(format!("--vcpu-rt={vcpu_rt}"))
            .arg(format!("--receive-nice={}", args.receive_nice))
            .arg(format!("--vcpu-cpu={vcpu_cpu}"));
        cmd
    };
    let mut dest = Worker::spawn(&topo.b, "vm destination", &mut peer("dest"))?;
    let mut src = Worker::spawn(&topo.a, "vm source", &mut peer("source"))?;
    let target = SocketAddr::from((Topology::B_V4, PORT));
    dest.cmd(&format!("listen {target} {}", hex(&key)))?;
    let guest_dirty_mbps: f64 = src.cmd("boot")?.first().ok_or("boot: no figure")?.parse()?;
    dest.send("receive")?;
    // Answers come as words: a JSON answer is joined back.
    let s: serde_json::Value = serde_json::from_str(
        &src.cmd(&format!("migrate {target} {}", hex(&key)))?
            .join(" "),
    )?;
    let d: serde_json::Value = serde_json::from_str(&dest.answer()?.join(" "))?;
    let n = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let downtime = (n(&d, "resumed_ns") - n(&s, "paused_ns")) / 1e6;
    let across = (n(&d, "first_hb_ns") - n(&s, "last_hb_ns")) / 1e6;
    let gap = across
        .max(n(&s, "max_gap_ns") / 1e6)
        .max(n(&d, "max_gap_ns") / 1e6);
    let continuous = d["first_count"].as_u64() == s["last_count"].as_u64().map(|c| c + 1);
    let verified =
        d["guest_check_wrong"].as_u64() == Some(0) && d["digests_ok"].as_bool() == Some(true);
    out.emit(&json!({
        "scenario": "vm",
        "mib": args.mib,
        "dirty_mbps": args.dirty_mbps,
        "mode": args.mode,
        "tracker": args.tracker,
        "vcpu_nice": args.vcpu_nice,
        "vcpu_rt": vcpu_rt,
        "receive_nice": args.receive_nice,
        "vcpu_cpu": vcpu_cpu,
        "downtime_ms": round(downtime, 2),
        "heartbeat_gap_ms": round(gap, 2),
        "heartbeat_gap_across_ms": round(across, 2),
        "heartbeat_continuous": continuous,
        "heartbeat_gap_source_ms": round(n(&s, "max_gap_ns") / 1e6, 2),
        "heartbeat_gap_source_at_ms": round(n(&s, "max_gap_at_ns") / 1e6, 1),
        "heartbeat_gap_source_oncpu_ms": round(n(&s, "max_gap_cpu_ns") / 1e6, 2),
        "heartbeat_gap_source_runnable_ms": round(n(&s, "max_gap_wait_ns") / 1e6, 2),
        "heartbeat_gap_destination_ms": round(n(&d, "max_gap_ns") / 1e6, 2),
        "total_ms": round(n(&s, "total_ns") / 1e6, 1),
        "bytes_sent": s["bytes_sent"],
        "rounds": s["rounds"],
        "verified": verified,
        "postcopy_blocked_ms": round(n(&d, "blocked_ns") / 1e6, 2),
        "postcopy_complete_ms": round(n(&d, "complete_ns") / 1e6, 1),
        "kvm_dirty_log": s["kvm_dirty_log"],
        "ring_full_exits": s["ring_full_exits"],
        "postcopy_pages": d["postcopy_pages"],
        "network_faults": d["network_faults"],
        "guest_dirty_mbps": round(guest_dirty_mbps, 1),
        "tracker_start_ms": round(n(&s, "tracker_start_ns") / 1e6, 2),
        "collect_max_ms": round(n(&s, "collect_max_ns") / 1e6, 2),
        "collect_max_at_ms": round(n(&s, "collect_max_at_ns") / 1e6, 1),
        "round_ms": s["round_ms"],
        "tracker_start_at_ms": round(n(&s, "tracker_start_at_ns") / 1e6, 1),
        "connect_ms": round(n(&s, "connect_ns") / 1e6, 1),
        "paused_at_ms": round(n(&s, "paused_after_ns") / 1e6, 1),
        "heartbeat_gaps_source": s["top_gaps"],
        "freeze_steps_ms": s["freeze_steps_ms"],
        "filled_mib": (args.mib - 2),
    }));
    Ok(())
}

/// A pre-copy destination faults guest RAM in before the migration
/// arrives, as QEMU's `-mem-prealloc` does, so that placing pages later
/// costs no page faults while the source's guest runs on the same CPUs.
/// Post-copy and hybrid destinations do not: memory they hold counts as
/// data to lmig (`Region::populated`), so every page still missing at the
/// switch would first have to be dropped again for userfaultfd to see its
/// fault, inside the freeze.
fn prefault_for(machine: &Machine, mode: &str) -> Result<(), Box<dyn std::error::Error>> {
    if mode == "precopy" {
        machine.memory().prefault()?;
    }
    Ok(())
}

/// The largest host interval between consecutive heartbeats from `from_ns`
/// on, when it began (ns after `from_ns`), and the vCPU thread's time on a
/// CPU and waiting for one inside it (ns).
fn max_gap_since(log: &HeartbeatLog, from_ns: u64) -> (u64, u64, u64, u64) {
    log.beats
        .windows(2)
        .filter(|w| w[0].host_ns >= from_ns)
        .map(|w| {
            (
                w[1].host_ns - w[0].host_ns,
                w[0].host_ns - from_ns,
                w[1].cpu_ns.saturating_sub(w[0].cpu_ns),
                w[1].wait_ns.saturating_sub(w[0].wait_ns),
            )
        })
        .max()
        .unwrap_or((0, 0, 0, 0))
}

/// The `n` largest host intervals between consecutive heartbeats from
/// `from_ns` on, longest first, each as `[began ms after from_ns, length
/// ms, the vCPU thread's runnable ms inside it]` (to place them against the
/// session's timeline).
fn top_gaps(log: &HeartbeatLog, from_ns: u64, n: usize) -> Vec<[f64; 3]> {
    let mut gaps: Vec<(u64, u64, u64)> = log
        .beats
        .windows(2)
        .filter(|w| w[0].host_ns >= from_ns)
        .map(|w| {
            (
                w[1].host_ns - w[0].host_ns,
                w[0].host_ns - from_ns,
                w[1].wait_ns.saturating_sub(w[0].wait_ns),
            )
        })
        .collect();
    gaps.sort_unstable_by(|a, b| b.cmp(a));
    gaps.iter()
        .take(n)
        .map(|&(len, at, wait)| {
            [
                round(at as f64 / 1e6, 1),
                round(len as f64 / 1e6, 2),
                round(wait as f64 / 1e6, 2),
            ]
        })
        .collect()
}

/// The hidden `vm-peer` command: one VMM process, driven by stdin lines
/// (`boot`, `migrate ADDR KEY` for the source; `listen ADDR KEY`,
/// `receive` for the destination; `quit`), answering `OK …` or `ERR …`.
pub fn peer(args: PeerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = MachineConfig::new(args.mib);
    if args.role == "source" && args.tracker == "kvm-ring" {
        config = config.dirty_ring(0);
    }
    if let (true, Some(nice)) = (args.role == "source", args.vcpu_nice) {
        config = config.vcpu_nice(nice);
    }
    if args.vcpu_rt > 0 {
        config = config.vcpu_realtime(args.vcpu_rt);
    }
    if let Ok(cpu) = usize::try_from(args.vcpu_cpu) {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let others: Vec<usize> = (0..cpus).filter(|&c| c != cpu).collect();
        if cpu >= cpus || others.is_empty() {
            return Err(format!("--vcpu-cpu {cpu}: this host has {cpus} CPUs").into());
        }
        // Before any other thread exists: they all inherit it.
        crate::vmm::set_thread_cpus(&others)?;
        config = config.vcpu_cpu(cpu);
    }
    if args.role == "dest" && args.receive_nice != 0 {
        // Before the listener exists: the channel's threads inherit it.
        crate::vmm::set_thread_nice(args.receive_nice)?;
        config = config.vcpu_nice(0);
    }
    let mut machine = Machine::new(config)?;
    let mut listener = None;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["quit"] | [] => break,
            ["boot"] => boot(&mut machine, args.dirty_mbps),
            ["migrate", addr, key] => migrate(&machine, addr, key, &args.mode, &args.tracker),
            ["listen", addr, key] => prefault_for(&machine, &args.mode)
                .and_then(|()| bind(addr, key))
                .map(|l| {
                    listener = Some(l);
                    String::new()
                }),
            ["receive"] => match &listener {
                Some(l) => receive_one(&mut machine, l),
                None => Err("receive before listen".into()),
            },
            _ => Err(format!("unknown command {line:?}").into()),
        };
        let mut out = std::io::stdout().lock();
        match answer {
            Ok(a) => writeln!(out, "OK {a}")?,
            Err(e) => writeln!(out, "ERR {}", e.to_string().replace('\n', " "))?,
        }
        out.flush()?;
    }
    machine.stop()?;
    Ok(())
}

fn boot(machine: &mut Machine, dirty_mbps: f64) -> Result<String, Box<dyn std::error::Error>> {
    let pages_per_ms = (dirty_mbps * 1e6 / 4096.0 / 1000.0).round() as u64;
    machine.boot(pages_per_ms)?;
    machine.start()?;
    machine.vcpu()?.wait_ready(GUEST_TIMEOUT)?;
    // The guest's own dirtying rate, measured over a second.
    let d0 = machine.dirtied()?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let pages = machine.dirtied()? - d0;
    Ok(format!(
        "{}",
        pages as f64 * 4096.0 / 1e6 / t.elapsed().as_secs_f64()
    ))
}

fn channel_config(key: &str) -> Result<ChannelConfig, Box<dyn std::error::Error>> {
    Ok(ChannelConfig::new(AuthKey::new(unhex(key)?)?))
}

fn migrate(
    machine: &Machine,
    addr: &str,
    key: &str,
    mode_name: &str,
    tracker: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let start = crate::common::clock::now_mono_ns();
    let t = Instant::now();
    let channel = connect(&Endpoint::Tcp(addr.parse()?), channel_config(key)?)?;
    let connected = t.elapsed();
    let mut kvm_method = serde_json::Value::Null;
    let inner: Box<dyn DirtyTracker + '_> = if tracker == "kvm-ring" {
        let t = machine.dirty_ring_tracker()?;
        kvm_method = json!(format!(
            "dirty ring, {} KiB per vCPU",
            t.ring().bytes() / 1024
        ));
        Box::new(t)
    } else if tracker.starts_with("kvm") {
        let mut log = machine.dirty_log()?;
        if tracker == "kvm-get" {
            log = log.without_manual_protect();
        }
        kvm_method = json!(format!("{} ({})", log.method(), log.support()));
        Box::new(log.tracker(machine.regions().layout()))
    } else {
        Box::new(lmig_mem::best_tracker(machine.regions())?.0)
    };
    let mut timed = TimedTracker {
        inner,
        start: Duration::ZERO,
        start_at: Duration::ZERO,
        began: t,
        slowest_collect: (Duration::ZERO, Duration::ZERO),
    };
    let r = migrate_out(machine, &channel, &mut timed, mode(mode_name)?)?;
    let total = t.elapsed();
    let log = machine.heartbeats();
    let last = log.last.ok_or("no heartbeat on the source")?;
    let gap = max_gap_since(&log, start);
    Ok(json!({
        "paused_ns": r.paused_ns,
        "last_hb_ns": last.host_ns,
        "last_count": last.count,
        "max_gap_ns": gap.0,
        "max_gap_at_ns": gap.1,
        "max_gap_cpu_ns": gap.2,
        "max_gap_wait_ns": gap.3,
        "total_ns": total.as_nanos() as u64,
        "bytes_sent": r.report.bytes_sent,
        "rounds": r.report.rounds,
        "tracker_start_ns": timed.start.as_nanos() as u64,
        "tracker_start_at_ns": timed.start_at.as_nanos() as u64,
        "connect_ns": connected.as_nanos() as u64,
        "paused_after_ns": r.paused_ns.map(|p| p.saturating_sub(start)),
        "top_gaps": top_gaps(&log, start, 5),
        "freeze_steps_ms": r.report.freeze_steps.iter().map(|(k, d)| json!([k, round(d.as_secs_f64() * 1e3, 2)])).collect::<Vec<_>>(),
        "collect_max_ns": timed.slowest_collect.0.as_nanos() as u64,
        "collect_max_at_ns": timed.slowest_collect.1.as_nanos() as u64,
        "round_ms": r.report.round_stats.iter().map(|s| round(s.elapsed.as_secs_f64() * 1e3, 1)).collect::<Vec<_>>(),
        "kvm_dirty_log": kvm_method,
        "ring_full_exits": machine.dirty_ring().map(|r| r.full_exits()),
    })
    .to_string())
}

/// A tracker whose `start` (arming tracking over all of guest RAM) and
/// slowest `collect` are timed (to place heartbeat gaps).
struct TimedTracker<'a> {
    inner: Box<dyn DirtyTracker + 'a>,
    start: Duration,
    /// When `start` began (after `began`).
    start_at: Duration,
    /// When the migration began.
    began: Instant,
    /// The slowest collect and when it began (after `began`).
    slowest_collect: (Duration, Duration),
}

impl DirtyTracker for TimedTracker<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn start(&mut self) -> lmig_core::Result<()> {
        let t = Instant::now();
        self.start_at = t - self.began;
        let r = self.inner.start();
        self.start = t.elapsed();
        r
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        let t = Instant::now();
        let r = self.inner.collect(dirty);
        if t.elapsed() > self.slowest_collect.0 {
            self.slowest_collect = (t.elapsed(), t - self.began);
        }
        r
    }
    fn collect_paused(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        let t = Instant::now();
        let r = self.inner.collect_paused(dirty);
        if t.elapsed() > self.slowest_collect.0 {
            self.slowest_collect = (t.elapsed(), t - self.began);
        }
        r
    }
    fn stop(&mut self) -> lmig_core::Result<()> {
        self.inner.stop()
    }
    fn clearer(&self) -> Option<Box<dyn DirtyClearer>> {
        self.inner.clearer()
    }
}

fn bind(addr: &str, key: &str) -> Result<Listener, Box<dyn std::error::Error>> {
    Ok(Listener::bind(
        &Endpoint::Tcp(addr.parse()?),
        channel_config(key)?,
    )?)
}

fn receive_one(
    machine: &mut Machine,
    listener: &Listener,
) -> Result<String, Box<dyn std::error::Error>> {
    let channel = listener.accept_timeout(GUEST_TIMEOUT)?;
    // The session checks the source's digests before `Done` (verify is on):
    // Ok means they matched.
    let r = receive(machine, &channel)?;
    // `receive` returns once every page is here: the vCPU thread's time
    // blocked so far is its time blocked on missing pages.
    let time = machine.vcpu()?.time()?;
    let complete_ns = r
        .report
        .complete_at
        .zip(r.report.resumed_at)
        .map(|(c, s)| c.saturating_duration_since(s).as_nanos() as u64);
    std::thread::sleep(AFTER);
    let log = machine.heartbeats();
    let first = log
        .beats
        .first()
        .copied()
        .ok_or("no heartbeat on the destination")?;
    let wrong = machine.check_buffer(GUEST_TIMEOUT)?;
    Ok(json!({
        "resumed_ns": r.resumed_ns,
        "first_hb_ns": first.host_ns,
        "first_count": first.count,
        "max_gap_ns": max_gap_since(&log, first.host_ns).0,
        "guest_check_wrong": wrong,
        "digests_ok": true,
        "network_faults": r.report.network_faults,
        "postcopy_pages": r.report.postcopy_pages,
        "blocked_ns": time.blocked.as_nanos() as u64,
        "complete_ns": complete_ns,
    })
    .to_string())
}
