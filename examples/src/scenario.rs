//! The end-to-end scenario behind the demo and `lmig-bench migrate`: three
//! hosts (network namespaces on a bridge: clients, A, B), kvd serving on A
//! with its data in an lmig region, N client connections issuing `INCR`s and
//! checking every reply, then kvd migrating itself live from A to B.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lmig_net::topology::Topology;
use serde_json::Value;

use crate::bench::peer::{mono_ns, random_key_hex};
use crate::kvd::load::{self, KeyCheck, LoadReport};

/// Error type of the scenario.
pub type Error = Box<dyn std::error::Error>;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// kvd's region size in MiB.
    pub mib: u64,
    /// Client connections.
    pub conns: usize,
    /// Requests per second over all client connections.
    pub rate: f64,
    /// `precopy`, `postcopy` or `hybrid`.
    pub mode: String,
    /// MB/s of scratch pages kvd dirties in the background.
    pub dirty_mbps: f64,
    /// Keys loaded before the clients start.
    pub keys: u64,
    /// Load before the migration.
    pub warmup: Duration,
    /// Load after the migration.
    pub after: Duration,
    /// Data streams.
    pub streams: usize,
    /// Draw a progress bar.
    pub progress: bool,
    /// Write the timeline picture here.
    pub svg: Option<PathBuf>,
    /// How to start kvd: this program and the arguments that select its kvd mode.
    pub kvd: (PathBuf, Vec<String>),
    /// A fault to inject (tests of the failure paths).
    pub fault: Option<Fault>,
}

/// Idle connections [`Fault::Strangers`] holds open through the migration.
pub const STRANGERS_IDLE: usize = 1000;

/// Failures the scenario can stage.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The destination kvd holds a different key: it refuses the source.
    WrongKey,
    /// No destination kvd at all: the address is unreachable.
    NoDestination,
    /// The destination dies (`SIGKILL`) this many µs after the freeze
    /// reaches it, and before `Ready` at the latest; then a fresh
    /// destination is started and kvd migrated again, which must succeed.
    KillDestinationInFreeze {
        /// Delay after the destination's first socket record.
        after_us: u64,
    },
    /// Strangers connect to the destination's migration address before the
    /// migration (garbage, a 4 GiB length, a message before authentication,
    /// a wrong key, a replayed and a truncated handshake) and hold
    /// [`STRANGERS_IDLE`] idle connections open through it; the migration
    /// must succeed.
    Strangers,
}

/// What the scenario measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// kvd paused on A → kvd resumed on B.
    pub freeze_ms: f64,
    /// Longest request → reply gap any client saw.
    pub client_stall_ms: f64,
    /// 99th percentile request latency.
    pub client_p99_ms: f64,
    /// The load generator's view.
    pub load: LoadReport,
    /// The source kvd's migration report.
    pub source: Value,
    /// The destination kvd's report.
    pub destination: Value,
    /// The migration succeeded (committed and confirmed).
    pub migrated: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Migrations asked for (2 when the first destination was killed).
    pub attempts: u32,
    /// Why the first of two attempts failed.
    pub first_attempt_error: Option<String>,
    /// Whether the source kept serving after the failed first attempt.
    pub first_attempt_source_serving: Option<bool>,
    /// Every loaded key read back through the service address at the end.
    pub keys: Option<KeyCheck>,
    /// Connections the destination refused (its `refused` events).
    pub refused: u64,
    /// When the freeze reached the destination (its first socket record), ns.
    pub destination_frozen_ns: Option<f64>,
    /// Where the timeline went.
    pub svg: Option<PathBuf>,
}

/// Children killed (by pid, ours only) and the socket directory removed on drop.
struct Cleanup {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kvd(opts: &Options, args: &[String]) -> Command {
    let mut c = Command::new(&opts.kvd.0);
    c.args(&opts.kvd.1)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

/// Read kvd's JSON event lines on a thread.
fn events(stdout: ChildStdout) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn wait_event(rx: &mpsc::Receiver<Value>, name: &str, timeout: Duration) -> Result<Value, Error> {
    wait_event_seeing(rx, name, timeout, &mut Vec::new())
}

/// [`wait_event`], keeping the other events that came first in `seen`.
fn wait_event_seeing(
    rx: &mpsc::Receiver<Value>,
    name: &str,
    timeout: Duration,
    seen: &mut Vec<Value>,
) -> Result<Value, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if v["event"] == name => return Ok(v),
            Ok(v) if v["event"] == "failed" => {
                return Err(format!("kvd failed: {}", v["error"]).into());
            }
            Ok(v) => seen.push(v),
            Err(_) => return Err(format!("kvd did not report {name:?} within {timeout:?}").into()),
        }
    }
}

/// Start a destination kvd in B waiting on `incoming` (dying in the freeze
/// after `die_at` µs, if given); its events.
fn destination(
    opts: &Options,
    topo: &Topology,
    incoming: &str,
    key: &str,
    die_at: Option<u64>,
) -> Result<(Child, mpsc::Receiver<Value>), Error> {
    let mut b = kvd(
        opts,
        &[
            "--incoming".into(),
            incoming.into(),
            "--service-if".into(),
            "eth0".into(),
            "--service-addr".into(),
            Topology::SERVICE_V4.to_string(),
            "--service-prefix".into(),
            "24".into(),
        ],
    );
    b.env("LMIG_KEY", key);
    if let Some(us) = die_at {
        b.env(crate::kvd::migrate::DIE_IN_FREEZE_ENV, us.to_string());
    }
    let mut b = topo.b.spawn(&mut b)?;
    let rx = events(b.stdout.take().ok_or("kvd B has no stdout")?);
    Ok((b, rx))
}

/// Ask kvd A to migrate; its final reply (`ok` or `error`).
fn migrate_once(admin_path: &Path, incoming: &str, opts: &Options) -> Result<Value, Error> {
    let (_s, mut r) = admin(
        admin_path,
        &format!("migrate {incoming} {} {}", opts.mode, opts.streams),
    )?;
    let bar = opts.progress.then(|| {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template("migrating {bar:40} {percent:>3}% {msg}")
                .expect("valid template"),
        );
        bar
    });
    let mut source = Value::Null;
    let mut line = String::new();
    for _ in 0..1_000_000 {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let v: Value = serde_json::from_str(line.trim())?;
        if let Some(p) = v.get("progress") {
            if let (Some(bar), Some(pages), Some(total)) =
                (&bar, p["pages"].as_f64(), p["total_pages"].as_f64())
            {
                bar.set_position((pages / total.max(1.0) * 100.0).min(100.0) as u64);
                bar.set_message(format!(
                    "{:.0} MiB sent",
                    p["bytes"].as_f64().unwrap_or(0.0) / 1048576.0
                ));
            }
            continue;
        }
        source = v;
        break;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(source)
}

fn admin(path: &Path, line: &str) -> Result<(UnixStream, BufReader<UnixStream>), Error> {
    let mut s = UnixStream::connect(path)
        .map_err(|e| format!("kvd admin socket {}: {e}", path.display()))?;
    writeln!(s, "{line}")?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

/// Run the scenario.
pub fn run(opts: &Options) -> Result<Report, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "this needs root: it creates network namespaces, moves an address and \
                    uses TCP repair (run it with sudo)"
                .into(),
        );
    }
    lmig_net::raise_nofile_limit()?;
    let topo = Topology::new()?;
    topo.add_service_address(&topo.a)?;

    let dir = std::env::temp_dir().join(format!("lmig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cleanup = Cleanup {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let admin_path = dir.join("kvd-a.sock");
    let key = random_key_hex()?;
    let service = format!("{}:6379", Topology::SERVICE_V4);
    let incoming = format!("{}:7000", Topology::B_V4);

    // kvd on A, serving; kvd on B, waiting.
    let mut a = kvd(
        opts,
        &[
            "--listen".into(),
            service.clone(),
            "--mib".into(),
            opts.mib.to_string(),
            "--admin".into(),
            admin_path.display().to_string(),
            "--service-if".into(),
            "eth0".into(),
            "--dirty-mbps".into(),
            opts.dirty_mbps.to_string(),
        ],
    );
    a.env("LMIG_KEY", &key);
    let mut a = topo.a.spawn(&mut a)?;
    let a_events = events(a.stdout.take().ok_or("kvd A has no stdout")?);
    cleanup.children.push(a);
    let b_key = if opts.fault == Some(Fault::WrongKey) {
        random_key_hex()?
    } else {
        key.clone()
    };
    let die_at = match opts.fault {
        Some(Fault::KillDestinationInFreeze { after_us }) => Some(after_us),
        _ => None,
    };
    let mut b_events = if opts.fault == Some(Fault::NoDestination) {
        mpsc::channel().1
    } else {
        let (b, rx) = destination(opts, &topo, &incoming, &b_key, die_at)?;
        cleanup.children.push(b);
        rx
    };
    wait_event(&a_events, "listening", Duration::from_secs(60))?;
    if opts.fault != Some(Fault::NoDestination) {
        wait_event(&b_events, "waiting", Duration::from_secs(30))?;
    }

    // Load data.
    if opts.keys > 0 {
        let (_s, mut r) = admin(&admin_path, &format!("populate {}", opts.keys))?;
        let mut line = String::new();
        r.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line)?;
        if v.get("error").is_some() {
            return Err(format!("loading data: {}", v["error"]).into());
        }
    }

    // Clients.
    let stop = Arc::new(AtomicBool::new(false));
    let load_stop = stop.clone();
    let conns = opts.conns;
    let rate = opts.rate;
    let addr = service.parse()?;
    let max = opts.warmup + opts.after + Duration::from_secs(600);
    let running = Arc::new(AtomicBool::new(false));
    let load_running = running.clone();
    let clients = topo
        .client
        .spawn_thread(move || load::run(addr, conns, rate, load_stop, load_running, max))?;
    // The warm-up counts from when every client is connected: the freeze
    // must fall inside the load, however long opening the connections took.
    let connect_by = Instant::now() + Duration::from_secs(120);
    while !running.load(Ordering::SeqCst) {
        if clients.is_finished() {
            return Err(match clients.join() {
                Ok(Ok(Err(e))) => format!("clients: {e}"),
                Ok(Err(e)) => format!("clients: {e}"),
                _ => "the client thread ended before it connected".to_string(),
            }
            .into());
        }
        if Instant::now() > connect_by {
            // The thread ends at its next connect timeout, or with the namespace.
            stop.store(true, Ordering::SeqCst);
            return Err(format!("{conns} clients did not connect within 120 s").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(opts.warmup);

    // Strangers at the destination's door first; some stay through the migration.
    let strangers = match opts.fault {
        Some(Fault::Strangers) => {
            let target: std::net::SocketAddr = incoming.parse()?;
            let key = crate::bench::peer::key_from_hex(&key)?;
            Some(
                topo.client
                    .run(move || -> std::io::Result<_> {
                        let every = lmig_transport::hostile::every_kind(target, &key)?;
                        let idle = lmig_transport::hostile::idle_many(target, STRANGERS_IDLE)?;
                        Ok((every, idle))
                    })?
                    .map_err(|e| format!("strangers: {e}"))?,
            )
        }
        _ => None,
    };

    // Migrate (twice when the first destination is killed in the freeze).
    let mut report = Report::default();
    let mut source = migrate_once(&admin_path, &incoming, opts)?;
    report.attempts = 1;
    if let Some(after_us) = die_at {
        if source.get("ok").is_some() {
            return Err(format!(
                "the destination was to die {after_us} µs into the freeze, yet the migration committed"
            )
            .into());
        }
        report.first_attempt_error = source.get("error").map(|e| e.to_string());
        report.first_attempt_source_serving = source["source_serving"].as_bool();
        // The first destination is gone (SIGKILL); a fresh one takes its address.
        if let Some(b1) = cleanup.children.last_mut() {
            let _ = b1.wait();
        }
        let (b, rx) = destination(opts, &topo, &incoming, &key, None)?;
        cleanup.children.push(b);
        b_events = rx;
        wait_event(&b_events, "waiting", Duration::from_secs(30))?;
        source = migrate_once(&admin_path, &incoming, opts)?;
        report.attempts = 2;
    }
    drop(strangers);
    let migrated = source.get("ok").is_some();
    report.migrated = migrated;
    report.error = source.get("error").map(|e| e.to_string());
    report.source = source.clone();
    if migrated {
        let mut seen = Vec::new();
        report.destination =
            wait_event_seeing(&b_events, "migrated", Duration::from_secs(120), &mut seen)?;
        report.refused = seen.iter().filter(|v| v["event"] == "refused").count() as u64;
        report.destination_frozen_ns = seen
            .iter()
            .find(|v| v["event"] == "frozen")
            .and_then(|v| v["mono_ns"].as_f64());
    }
    std::thread::sleep(opts.after);
    stop.store(true, Ordering::SeqCst);
    let load = clients
        .join()
        .map_err(|_| "the client thread panicked")??
        .map_err(|e| format!("clients: {e}"))?;
    if let (Some(p), Some(r)) = (
        source["paused_ns"].as_f64(),
        report.destination["resumed_ns"].as_f64(),
    ) {
        report.freeze_ms = (r - p) / 1e6;
    }
    if opts.keys > 0 {
        let addr: std::net::SocketAddr = service.parse()?;
        let keys = opts.keys;
        report.keys = Some(
            topo.client
                .run(move || load::check_keys(addr, keys, crate::kvd::cli::POPULATE_VALUE_LEN))?
                .map_err(|e| format!("reading every key back: {e}"))?,
        );
    }
    report.client_stall_ms = load.max_latency_ms;
    report.client_p99_ms = load.client_p99();
    if let Some(path) = &opts.svg {
        draw_timeline(path, &load, &source, &report.destination)?;
        report.svg = Some(path.clone());
    }
    report.load = load;
    drop(cleanup);
    drop(topo);
    Ok(report)
}

impl LoadReport {
    fn client_p99(&self) -> f64 {
        self.p99_latency_ms
    }
}

/// Request latency over time with the migration's phases marked.
fn draw_timeline(
    path: &Path,
    load: &LoadReport,
    source: &Value,
    dest: &Value,
) -> Result<(), Error> {
    use plotters::prelude::*;
    let zero = load.started.map(mono_ns).unwrap_or(0) as f64;
    let at = |ns: Option<f64>| ns.map(|n| (n - zero) / 1e9);
    let points: Vec<(f64, f64)> = load
        .timeline
        .iter()
        .filter(|(_, _, n)| *n > 0)
        .map(|(t, max, _)| (t / 1e3, max.max(0.01)))
        .collect();
    let x_max = points.last().map_or(1.0, |p| p.0).max(0.1);
    let y_max = points.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.2;
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "kvd live migration: client request latency",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time since clients started (s)")
        .y_desc("max latency per 10 ms (ms)")
        .draw()?;
    chart
        .draw_series(LineSeries::new(points, &BLUE))?
        .label("max request latency")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    let marks = [
        ("migration starts", at(source["started_ns"].as_f64()), GREEN),
        (
            "freeze (paused on A)",
            at(source["paused_ns"].as_f64()),
            RED,
        ),
        ("resumed on B", at(dest["resumed_ns"].as_f64()), MAGENTA),
    ];
    for (label, x, color) in marks {
        if let Some(x) = x {
            chart
                .draw_series(LineSeries::new(vec![(x, 0.0), (x, y_max)], color))?
                .label(label)
                .legend(move |(px, py)| PathElement::new(vec![(px, py), (px + 20, py)], color));
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
