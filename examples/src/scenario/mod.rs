//! The end-to-end scenario behind the demo and `lmig-bench migrate`: three
//! hosts (network namespaces on a bridge: clients, A, B), kvd serving on A
//! with its data in an lmig region, N client connections issuing `INCR`s and
//! checking every reply, then kvd migrating itself live from A to B.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lmig_net::topology::Topology;

use crate::common::keys::random_key_hex;
use crate::figures::{DestinationFigures, KvdEvent, SourceFigures};
use crate::kvd::load::{self, KeyCheck, LoadReport};

pub mod external;
mod kvd;
pub mod phases;
pub mod queued;
pub mod split;
mod timeline;
mod tls;

use kvd::{
    admin, admin_line, cancel_at, destination, events, kvd, migrate_once, wait_event,
    wait_event_seeing,
};

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
    /// Migrate over TLS 1.3 with certificates made for the run (a CA and
    /// one for each kvd) instead of the pre-shared key's Noise.
    pub tls: bool,
    /// Migrate with frames in clear after the key's admission
    /// (`LMIG_PLAINTEXT_TRUSTED_LINK_ONLY=1`): to measure what encryption
    /// costs against the same run encrypted.
    pub plaintext: bool,
    /// Bound kvd's freeze (`migrate`'s max freeze, ms): past it the source
    /// aborts and serves on.
    pub max_freeze_ms: Option<f64>,
    /// MiB left queued in kvd's sockets at the freeze (see [`queued`]); 0: none.
    pub queued_mib: f64,
    /// The receive buffer of the connections holding those replies
    /// (`SO_RCVBUF`; 0: the kernel's default), see [`queued::stuff`].
    pub queued_rcvbuf: usize,
    /// Cancel the migration (admin `cancel`) once round 0 sent this
    /// percentage of its pages, watching `status`; kvd must serve on.
    pub cancel_at_pct: Option<f64>,
    /// `migrate`'s bandwidth limit, MB/s (`None`: none).
    pub bandwidth_mbps: Option<f64>,
    /// After the migration, move kvd back: a fresh kvd waits on A and B's
    /// admin socket is asked to migrate to it (the clients go on).
    pub migrate_back: bool,
    /// A program of its own run against the service from the client
    /// namespace ([`external`]): started once kvd serves, `warmup` before
    /// the migration, and waited for (instead of `after`) when it is done.
    pub external: Option<external::External>,
    /// Experiments that change placement ([`split`]): the clients on a
    /// CPU of their own, or kvd's loop and the clients on one CPU and the
    /// migration on another. Never a default.
    pub placement: split::Placement,
    /// A dry pre-copy at this many MB/s instead of a migration
    /// ([`crate::kvd::dry`]): the attempt fails by design, kvd serves on,
    /// and [`Report::attempt_p99_ms`] tells what the clients felt.
    pub dry_precopy_mbps: Option<f64>,
}

/// [`Options::mode`] that runs everything but the migration.
pub const NO_MIGRATION: &str = "none";

/// The port kvd serves on (at [`Topology::SERVICE_V4`]).
pub const SERVICE_PORT: u16 = 6379;

impl Options {
    /// The scenario in `mode` over `mib` MiB and `conns` connections, one
    /// second of load before and after, two streams, kvd run as this very
    /// program with `kvd` as its first argument (the demo and `lmig-bench`
    /// both are kvd too).
    pub fn new(mode: &str, mib: u64, conns: usize) -> Result<Self, Error> {
        Ok(Self {
            mib,
            conns,
            rate: 0.0,
            mode: mode.to_string(),
            dirty_mbps: 0.0,
            keys: 0,
            warmup: Duration::from_secs(1),
            after: Duration::from_secs(1),
            streams: 2,
            progress: false,
            svg: None,
            kvd: (std::env::current_exe()?, vec!["kvd".into()]),
            fault: None,
            tls: false,
            plaintext: false,
            max_freeze_ms: None,
            queued_mib: 0.0,
            queued_rcvbuf: queued::RCVBUF,
            cancel_at_pct: None,
            bandwidth_mbps: None,
            migrate_back: false,
            external: None,
            placement: split::Placement::Unplaced,
            dry_precopy_mbps: None,
        })
    }
}

/// Which daemon the scenario migrates: both speak the same RESP subset,
/// admin commands and event lines.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Server {
    /// kvd: one mio loop ([`crate::kvd`]).
    #[default]
    Kvd,
    /// tokiod: a tokio runtime, a task per connection ([`crate::tokiod`]).
    Tokio,
}

impl Server {
    /// From its name on a command line: `kvd` or `tokio`.
    pub fn parse(name: &str) -> Result<Self, Error> {
        match name {
            "kvd" => Ok(Self::Kvd),
            "tokio" => Ok(Self::Tokio),
            other => Err(format!("server {other:?}: kvd or tokio").into()),
        }
    }

    /// Its name, as [`Server::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kvd => "kvd",
            Self::Tokio => "tokio",
        }
    }

    /// How to start it from a program that runs either daemon when its
    /// first argument names it (`lmig-bench`, the demo): `exe` and that argument.
    pub fn command(self, exe: PathBuf) -> (PathBuf, Vec<String>) {
        let arg = match self {
            Self::Kvd => "kvd",
            Self::Tokio => "tokiod",
        };
        (exe, vec![arg.into()])
    }
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
    /// The same before the migration, during pre-copy and during post-copy.
    pub phases: phases::PhaseLatency,
    /// The load generator's view.
    pub load: LoadReport,
    /// The source kvd's migration figures (when it committed).
    pub source: Option<SourceFigures>,
    /// The destination kvd's figures (when it committed).
    pub destination: Option<DestinationFigures>,
    /// The migration succeeded (committed and confirmed).
    pub migrated: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// When it failed: whether the source kept serving.
    pub source_serving: Option<bool>,
    /// It failed because the freeze outlasted `max_freeze_ms`.
    pub aborted_by_deadline: bool,
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
    /// Sockets that had joined the destination loop's poller before
    /// `Commit` (its `serving` event).
    pub registered_before_commit: Option<u64>,
    /// With `queued_mib`: the connections that held the queued replies,
    /// the reply bytes they asked for, and whether every byte arrived in
    /// order after the migration (`Err`: where it did not).
    pub queued: Option<(usize, u64, Result<(), String>)>,
    /// Where the timeline went.
    pub svg: Option<PathBuf>,
    /// The attempt ended on the operator's `cancel` ([`Options::cancel_at_pct`]).
    pub cancelled: bool,
    /// From sending `cancel` to kvd's line saying it runs again (the
    /// session resumed the program), ms.
    pub cancel_ms: Option<f64>,
    /// From sending `cancel` to `migrate`'s final answer (after the
    /// session's cleanup: the dirty tracker's teardown, the channel), ms.
    pub cancel_answered_ms: Option<f64>,
    /// Where the migration was when `cancel` went out: round and the
    /// fraction of it sent.
    pub cancelled_at: Option<(u32, f64)>,
    /// What kvd answered to a second `cancel` (after the first one's
    /// answer) and to a `cancel` before any migration.
    pub cancel_answers: Vec<String>,
    /// The keys the destination's admin socket counted after the migration.
    pub destination_keys: Option<u64>,
    /// The source kvd ended after it migrated away and removed its admin
    /// socket file ([`Options::migrate_back`] only).
    pub source_socket_removed: Option<bool>,
    /// [`Options::migrate_back`]: B's answer when asked to migrate on to A.
    pub back: Option<Result<SourceFigures, crate::figures::MigrateFailure>>,
    /// What [`Options::external`] did.
    pub external: Option<external::ExternalRun>,
    /// An attempt that did not migrate (a dry pre-copy): the clients' p99
    /// in the 2 s before the `migrate` command and while it ran (requests
    /// answered before its answer), ms.
    pub attempt_p99_ms: Option<(Option<f64>, Option<f64>)>,
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
    if opts.queued_mib > 0.0 {
        queued::make_room(&topo.a, opts.queued_mib, opts.conns)?;
    }

    let dir = std::env::temp_dir().join(format!("lmig-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cleanup = Cleanup {
        children: Vec::new(),
        dir: dir.clone(),
    };
    let admin_path = dir.join("kvd-a.sock");
    let key = random_key_hex()?;
    let service = format!("{}:{SERVICE_PORT}", Topology::SERVICE_V4);
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
    if let Some(mbps) = opts.dry_precopy_mbps {
        a.env(crate::kvd::dry::DRY_ENV, mbps.to_string());
    }
    let tls_dir = if opts.tls {
        if opts.fault == Some(Fault::WrongKey) {
            return Err("the wrong-key fault needs the pre-shared key, not TLS".into());
        }
        Some(tls::certificates(&dir)?)
    } else {
        None
    };
    if let Some(t) = &tls_dir {
        tls::use_certificates(&mut a, t, "a");
    }
    let placer = split::Placer::new(opts.placement)?;
    let mut a = topo.a.spawn(&mut a)?;
    let a_pid = a.id();
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
    let mut b_pid = None;
    let mut b_events = if opts.fault == Some(Fault::NoDestination) {
        mpsc::channel().1
    } else {
        let (b, rx) = destination(
            opts,
            (&topo.b, "b"),
            &incoming,
            &b_key,
            die_at,
            tls_dir.as_deref(),
            &dir.join("kvd-b.sock"),
        )?;
        b_pid = Some(b.id());
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
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(e) = v.get("error") {
            return Err(format!("loading data: {e}").into());
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
    let clients = topo.client.spawn_thread(move || {
        placer
            .place_clients()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        load::run(addr, conns, rate, load_stop, load_running, max)
    })?;
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
    let external = match &opts.external {
        Some(x) => Some(external::start(x, &topo.client, service.parse()?)?),
        None => None,
    };
    // Every thread of A and B is there now (those started later inherit),
    // placed before the baseline so that it has the same placement.
    placer.place_kvd(a_pid, b_pid)?;
    std::thread::sleep(opts.warmup);

    // Strangers at the destination's door first; some stay through the migration.
    let strangers = match opts.fault {
        Some(Fault::Strangers) => {
            let target: std::net::SocketAddr = incoming.parse()?;
            let key = crate::common::keys::key_from_hex(&key)?;
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

    // Replies left queued in kvd's sockets, read after the migration.
    let stuffed = if opts.queued_mib > 0.0 {
        Some(queued::stuff(
            &topo.client,
            service.parse()?,
            opts.queued_mib,
            opts.conns,
            opts.queued_rcvbuf,
        )?)
    } else {
        None
    };

    // Migrate (twice when the first destination is killed in the freeze).
    let attempt_began = crate::common::clock::now_mono_ns();
    let mut report = Report::default();
    let mut source = match opts.cancel_at_pct {
        Some(pct) => {
            report
                .cancel_answers
                .push(admin_line(&admin_path, "cancel")?);
            let c = cancel_at(&admin_path, &incoming, opts, pct)?;
            report.cancel_ms = Some(c.cancel_ms);
            report.cancel_answered_ms = Some(c.answered_ms);
            report.cancelled_at = Some(c.at);
            report.cancel_answers.push(c.second_answer);
            report.cancelled = c.answer.as_ref().is_err_and(|f| f.cancelled);
            c.answer
        }
        None if opts.mode == NO_MIGRATION => Err(crate::figures::MigrateFailure {
            error: "not asked to migrate (mode none)".into(),
            source_serving: true,
            ..Default::default()
        }),
        None => migrate_once(&admin_path, &incoming, opts)?,
    };
    report.attempts = 1;
    let attempt_ended = crate::common::clock::now_mono_ns();
    if let Some(after_us) = die_at {
        let failure = source.err().ok_or_else(|| {
            format!(
                "the destination was to die {after_us} µs into the freeze, yet the migration committed"
            )
        })?;
        report.first_attempt_error = Some(failure.error);
        report.first_attempt_source_serving = Some(failure.source_serving);
        // The first destination is gone (SIGKILL); a fresh one takes its address.
        if let Some(b1) = cleanup.children.last_mut() {
            let _ = b1.wait();
        }
        let (b, rx) = destination(
            opts,
            (&topo.b, "b"),
            &incoming,
            &key,
            None,
            tls_dir.as_deref(),
            &dir.join("kvd-b.sock"),
        )?;
        cleanup.children.push(b);
        b_events = rx;
        wait_event(&b_events, "waiting", Duration::from_secs(30))?;
        source = migrate_once(&admin_path, &incoming, opts)?;
        report.attempts = 2;
    }
    drop(strangers);
    report.migrated = source.is_ok();
    if let Err(f) = &source {
        report.error = Some(f.error.clone());
        report.source_serving = Some(f.source_serving);
        report.aborted_by_deadline = f.aborted_by_deadline;
        // The aborted attempt's freeze: pause to resumed on the source.
        report.freeze_ms = f.freeze_ms.unwrap_or(0.0);
    }
    report.source = source.ok();
    if report.migrated {
        let mut seen = Vec::new();
        let migrated =
            wait_event_seeing(&b_events, "migrated", Duration::from_secs(120), &mut seen)?;
        if let KvdEvent::Migrated(d) = migrated {
            report.destination = Some(d);
        }
        report.refused = seen
            .iter()
            .filter(|e| matches!(e, KvdEvent::Refused { .. }))
            .count() as u64;
        report.destination_frozen_ns = seen.iter().find_map(|e| match e {
            KvdEvent::Frozen { mono_ns } => Some(*mono_ns as f64),
            _ => None,
        });
        // `serving` comes at `Commit`, `migrated` when every page is
        // there: usually in that order, not always.
        let serving = match seen.iter().find(|e| e.name() == "serving") {
            Some(e) => e.clone(),
            None => wait_event(&b_events, "serving", Duration::from_secs(30))?,
        };
        if let KvdEvent::Serving {
            registered_before_commit,
            ..
        } = serving
        {
            report.registered_before_commit = Some(registered_before_commit);
        }
        // The destination's admin socket answers now (it serves); tokiod
        // has none at the destination (`destination_keys` stays empty).
        report.destination_keys = admin_line(&dir.join("kvd-b.sock"), "stats")
            .ok()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .and_then(|stats| stats.get("keys").and_then(|k| k.as_u64()));
        if opts.migrate_back {
            let a = cleanup.children.first_mut().ok_or("kvd A is gone")?;
            report.source_socket_removed = Some(ended(a)? && !admin_path.exists());
            report.back = Some(migrate_back(&topo, &dir, &key, opts, &mut cleanup)?);
        }
    }
    if let Some(q) = stuffed {
        let (conns, asked) = (q.conns(), q.asked_bytes);
        report.queued = Some((conns, asked, q.verify()));
    }
    if let (Some(x), Some(ext)) = (external, &opts.external) {
        report.external = Some(x.finish(ext, &topo.client, service.parse()?)?);
    }
    std::thread::sleep(opts.after);
    stop.store(true, Ordering::SeqCst);
    let load = clients
        .join()
        .map_err(|_| "the client thread panicked")??
        .map_err(|e| format!("clients: {e}"))?;
    let paused = report.source.as_ref().map(|s| s.paused_ns);
    let resumed = report.destination.as_ref().and_then(|d| d.resumed_ns);
    if let (Some(p), Some(r)) = (paused, resumed) {
        report.freeze_ms = (r as f64 - p as f64) / 1e6;
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
    if !report.migrated {
        report.attempt_p99_ms = attempt_p99(&load, attempt_began, attempt_ended);
    }
    report.client_stall_ms = load.max_latency_ms;
    report.client_p99_ms = load.client_p99();
    report.phases = phases::PhaseLatency::measure(
        &load,
        report.source.as_ref(),
        report.destination.as_ref(),
        opts.warmup.min(phases::BASELINE_WINDOW),
    );
    if let Some(path) = &opts.svg {
        timeline::draw(
            path,
            &load,
            report.source.as_ref(),
            report.destination.as_ref(),
        )?;
        report.svg = Some(path.clone());
    }
    report.load = load;
    drop(cleanup);
    drop(topo);
    Ok(report)
}

/// The clients' p99 before an attempt (its baseline window) and while it
/// ran, from its start and end (ns, monotonic).
fn attempt_p99(load: &LoadReport, began: u64, ended: u64) -> Option<(Option<f64>, Option<f64>)> {
    let zero = crate::common::clock::mono_ns(load.started?) as f64;
    let (b, e) = ((began as f64 - zero) / 1e6, (ended as f64 - zero) / 1e6);
    let window = phases::BASELINE_WINDOW.as_secs_f64() * 1e3;
    Some((
        load.p99_sent_between(b - window, b, b),
        load.p99_sent_between(b, e, e),
    ))
}

/// Wait (at most 60 s) for a kvd that migrated away to end: did it end well?
fn ended(child: &mut Child) -> Result<bool, Error> {
    let by = Instant::now() + Duration::from_secs(60);
    // Bounded by `by`.
    while Instant::now() < by {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(false)
}

/// Move kvd on from B back to A: a fresh kvd waits on A, B's admin socket
/// is asked to migrate there; B's answer.
fn migrate_back(
    topo: &Topology,
    dir: &std::path::Path,
    key: &str,
    opts: &Options,
    cleanup: &mut Cleanup,
) -> Result<Result<SourceFigures, crate::figures::MigrateFailure>, Error> {
    let incoming = format!("{}:7000", Topology::A_V4);
    let tls = opts.tls.then(|| dir.join("tls"));
    let (a2, rx) = destination(
        opts,
        (&topo.a, "a"),
        &incoming,
        key,
        None,
        tls.as_deref(),
        &dir.join("kvd-a2.sock"),
    )?;
    cleanup.children.push(a2);
    wait_event(&rx, "waiting", Duration::from_secs(30))?;
    let back = migrate_once(&dir.join("kvd-b.sock"), &incoming, opts)?;
    if back.is_ok() {
        wait_event(&rx, "migrated", Duration::from_secs(120))?;
    }
    Ok(back)
}

impl LoadReport {
    fn client_p99(&self) -> f64 {
        self.p99_latency_ms
    }
}
