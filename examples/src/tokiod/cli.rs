//! The `tokiod` command: the tokio key-value service, with kvd's command
//! line, admin commands and event lines (so the scenario drives either).
//!
//! ```text
//! tokiod --listen 198.51.100.100:6379 --mib 1024 --admin /run/tokiod-a.sock   # serve
//! tokiod --incoming 198.51.100.2:7000                                          # wait for a migration
//! echo 'migrate 198.51.100.2:7000 precopy' | socat - UNIX:/run/tokiod-a.sock  # move A to B
//! ```
//!
//! Admin commands (one per line, JSON answers): `stats`, `populate N`,
//! `migrate HOST:PORT [precopy|postcopy|hybrid] [streams] [max-freeze-ms]`,
//! `quit`. The key comes from `LMIG_KEY` (hex) on both sides, or TLS
//! certificates as for kvd ([`crate::kvd::security`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use lmig_core::MigrationError;
use lmig_core::session::{DestinationReport, Mode, SourceReport};
use lmig_core::traits::{Event, Phase};
use lmig_mem::{RegionOptions, RegionSet};
use lmig_net::{HandoffConfig, ServiceAddr};
use serde_json::json;

use super::dirtier::{Dirtier, DirtierControl};
use super::migrate::{MigrateOptions, ReceiveLog, migrate_out, receive};
use super::service::{Control, Memory, STORE_REGION};
use crate::common::clock::now_mono_ns;
use crate::common::keys::key_from_hex;
use crate::figures::{
    DestinationFigures, KvdEvent, MigrateFailure, MigrateLine, Progress, SourceFigures,
};
use crate::kvd::store::Store;

/// tokiod's command line (kvd's).
#[derive(Parser, Debug)]
#[command(
    name = "tokiod",
    about = "A tokio key-value service that migrates itself live"
)]
pub struct Args {
    /// Serve clients on this address (source mode).
    #[arg(long, conflicts_with = "incoming")]
    pub listen: Option<SocketAddr>,
    /// Wait for an incoming migration on this address (destination mode).
    #[arg(long)]
    pub incoming: Option<SocketAddr>,
    /// Size of the data region in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Admin socket (Unix) for `migrate`, `stats`, `populate`.
    #[arg(long)]
    pub admin: Option<PathBuf>,
    /// Dirty this many MB/s of scratch pages in the background.
    #[arg(long, default_value_t = 0.0)]
    pub dirty_mbps: f64,
    /// Interface carrying the service address; the address moves too.
    #[arg(long)]
    pub service_if: Option<String>,
    /// Service address (default: the --listen address).
    #[arg(long)]
    pub service_addr: Option<IpAddr>,
    /// Prefix length of the service address on its interface.
    #[arg(long, default_value_t = 24)]
    pub service_prefix: u8,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("tokiod: {msg}");
    std::process::exit(1)
}

fn key() -> Result<Vec<u8>, String> {
    let hex = std::env::var("LMIG_KEY")
        .map_err(|_| "set LMIG_KEY to the pre-shared key (hex, at least 16 bytes)".to_string())?;
    key_from_hex(&hex).map_err(|e| format!("LMIG_KEY: {e}"))
}

fn event(e: &KvdEvent) {
    let line = serde_json::to_string(e).expect("an event serializes");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Run tokiod with these arguments.
pub fn main_with(args: Args) {
    if let Err(e) = lmig_net::raise_nofile_limit() {
        eprintln!("tokiod: cannot raise the open-file limit: {e}");
    }
    let handoff = args.service_if.as_ref().map(|iface| {
        let addr = args
            .service_addr
            .or(args.listen.map(|a| a.ip()))
            .unwrap_or_else(|| fail("--service-if needs --service-addr on the destination"));
        HandoffConfig::new([ServiceAddr::new(addr, args.service_prefix)], iface.clone())
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("starting the runtime: {e}")));
    match (args.incoming, args.listen) {
        (Some(incoming), _) => destination(&runtime, incoming, handoff),
        (None, Some(listen)) => source(&runtime, &args, listen, handoff),
        (None, None) => fail("give --listen ADDR (serve) or --incoming ADDR (receive)"),
    }
}

/// Wait for a migration, then serve what it brought until stopped.
fn destination(
    runtime: &tokio::runtime::Runtime,
    incoming: SocketAddr,
    handoff: Option<HandoffConfig>,
) {
    let key = key().unwrap_or_else(|e| fail(e));
    let log = Arc::new(JsonLog {
        incoming,
        refused: AtomicU64::new(0),
    });
    let handle = runtime.handle().clone();
    let start = move |memory| Control::new(handle.clone(), memory);
    let reporter = receive(incoming, &key, handoff, log, start)
        .unwrap_or_else(|e| fail(format!("incoming migration failed: {e}")));
    // The service's tasks run here until the process is stopped.
    runtime.block_on(std::future::pending::<()>());
    reporter.join();
}

/// Serve on `listen` until a migration commits.
fn source(
    runtime: &tokio::runtime::Runtime,
    args: &Args,
    listen: SocketAddr,
    handoff: Option<HandoffConfig>,
) {
    let region = RegionOptions::new(STORE_REGION, args.mib << 20)
        .populate(true)
        .map()
        .unwrap_or_else(|e| fail(format!("mapping {} MiB: {e}", args.mib)));
    let regions = Arc::new(RegionSet::new([region]).unwrap_or_else(|e| fail(e)));
    Store::format(regions.get(STORE_REGION).unwrap_or_else(|e| fail(e)));
    let control = Control::new(runtime.handle().clone(), Memory::Local(regions.clone()));
    let listener = std::net::TcpListener::bind(listen)
        .unwrap_or_else(|e| fail(format!("listening on {listen}: {e}")));
    control
        .start(listener, Vec::new())
        .unwrap_or_else(|e| fail(e));
    let dirtier = (args.dirty_mbps > 0.0).then(|| {
        Dirtier::spawn(control.memory().clone(), args.dirty_mbps)
            .unwrap_or_else(|e| fail(format!("starting the dirtier: {e}")))
    });
    let admin = Admin {
        control: control.clone(),
        regions,
        dirtier: dirtier.as_ref().map(Dirtier::control),
        handoff,
    };
    let (migrated, gone) = tokio::sync::oneshot::channel::<()>();
    let migrated = Mutex::new(Some(migrated));
    // Bound before `listening`: the scenario talks to it right after.
    let admin_socket = args.admin.as_ref().map(|path| {
        let _ = std::fs::remove_file(path);
        std::os::unix::net::UnixListener::bind(path)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .unwrap_or_else(|e| fail(format!("admin socket {}: {e}", path.display())))
    });
    event(&KvdEvent::Listening {
        addr: listen.to_string(),
        pid: std::process::id(),
    });
    runtime.block_on(async move {
        if let Some(socket) = admin_socket {
            let listener = tokio::net::UnixListener::from_std(socket)
                .unwrap_or_else(|e| fail(format!("admin socket: {e}")));
            tokio::spawn(admin.serve(listener, migrated));
        }
        // Until a migration committed (never without an admin socket).
        let _ = gone.await;
    });
    if let Some(d) = dirtier {
        d.join();
    }
    // The destination serves now; this process ends.
    std::process::exit(0);
}

/// The admin socket's side of tokiod.
#[derive(Clone)]
struct Admin {
    control: Control,
    regions: Arc<RegionSet>,
    dirtier: Option<DirtierControl>,
    handoff: Option<HandoffConfig>,
}

impl Admin {
    /// Accept admin connections; each is served on a blocking thread (a
    /// migration blocks it), and one that migrated tokiod away fires `migrated`.
    async fn serve(
        self,
        listener: tokio::net::UnixListener,
        migrated: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    ) {
        let migrated = Arc::new(migrated);
        while let Ok((conn, _)) = listener.accept().await {
            let Ok(conn) = conn.into_std().and_then(|c| {
                c.set_nonblocking(false)?;
                Ok(c)
            }) else {
                continue;
            };
            let (admin, migrated) = (self.clone(), migrated.clone());
            tokio::task::spawn_blocking(move || {
                if admin.session(conn) {
                    if let Some(tx) = migrated.lock().expect("poisoned").take() {
                        let _ = tx.send(());
                    }
                }
            });
        }
    }

    /// One admin connection; true when tokiod migrated away.
    fn session(&self, conn: std::os::unix::net::UnixStream) -> bool {
        let (Ok(read), Ok(progress)) = (conn.try_clone(), conn.try_clone()) else {
            return false;
        };
        let progress = Mutex::new(progress);
        let mut out = conn;
        for line in BufReader::new(read).lines().map_while(Result::ok) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let answer = match words.as_slice() {
                ["stats"] => self.stats(),
                ["populate", n] => self.populate(n),
                ["migrate", target, rest @ ..] => match self.migrate(target, rest, &progress) {
                    Ok(line) => {
                        let _ = writeln!(out, "{}", json!(line));
                        return true;
                    }
                    Err(answer) => answer,
                },
                ["quit"] => return false,
                _ => {
                    json!({"error": "commands: stats | populate N | migrate HOST:PORT [precopy|postcopy|hybrid] [streams] [max-freeze-ms] | quit"})
                }
            };
            let _ = writeln!(out, "{answer}");
            let _ = out.flush();
        }
        false
    }

    fn stats(&self) -> serde_json::Value {
        let c = self.control.counters();
        json!({
            "keys": self.control.memory().store().ok().map(|s| s.len()),
            "clients": c.clients.load(Ordering::Relaxed),
            "requests": c.requests.load(Ordering::Relaxed),
        })
    }

    fn populate(&self, n: &str) -> serde_json::Value {
        let stored = n.parse::<u64>().map_err(|e| e.to_string()).and_then(|n| {
            let store = self.control.memory().store()?;
            store
                .populate(n, crate::kvd::cli::POPULATE_VALUE_LEN)
                .map_err(|e| e.to_string())?;
            Ok(store.len())
        });
        match stored {
            Ok(keys) => json!({"ok": true, "keys": keys}),
            Err(e) => json!({"error": e}),
        }
    }

    /// `migrate`: the committed answer, or the answer to give (a usage
    /// error or the failure; the service serves on).
    fn migrate(
        &self,
        target: &str,
        rest: &[&str],
        progress: &Mutex<std::os::unix::net::UnixStream>,
    ) -> Result<MigrateLine, serde_json::Value> {
        let opts = self.options(target, rest)?;
        let started = now_mono_ns();
        let t0 = Instant::now();
        // An aborted attempt's freeze: the pause to the program resumed.
        let freeze = Mutex::new((None, None));
        let r = migrate_out(
            &self.control,
            &self.regions,
            self.dirtier.clone(),
            &opts,
            |e: &Event| match e {
                Event::Phase {
                    phase: Phase::Frozen,
                    at,
                } => freeze.lock().expect("poisoned").0 = Some(*at),
                Event::Phase {
                    phase: Phase::Aborted,
                    at,
                } => freeze.lock().expect("poisoned").1 = Some(*at),
                Event::Progress {
                    pages,
                    bytes,
                    total_pages,
                } => {
                    let line = MigrateLine::Progress {
                        progress: Progress {
                            pages: *pages,
                            bytes: *bytes,
                            total_pages: *total_pages,
                        },
                    };
                    let _ = writeln!(progress.lock().expect("poisoned"), "{}", json!(line));
                }
                _ => {}
            },
        );
        match r {
            Ok(rep) => Ok(MigrateLine::Migrated(source_figures(rep, started, t0))),
            Err(e) => Err(json!(MigrateLine::Failed(MigrateFailure {
                error: e.to_string(),
                source_serving: e.source_may_run(),
                aborted_by_deadline: matches!(e, MigrationError::FreezeDeadline { .. }),
                cancelled: matches!(e, MigrationError::Cancelled),
                freeze_ms: match freeze.into_inner().expect("poisoned") {
                    (Some(paused), Some(resumed)) => Some((resumed - paused).as_secs_f64() * 1e3),
                    _ => None,
                },
            }))),
        }
    }

    /// `migrate`'s words after the target, as kvd reads them.
    fn options(&self, target: &str, rest: &[&str]) -> Result<MigrateOptions, serde_json::Value> {
        let mode = match rest.first().copied().unwrap_or("precopy") {
            "precopy" => Mode::Precopy,
            "postcopy" => Mode::Postcopy,
            "hybrid" => Mode::Hybrid,
            other => {
                return Err(
                    json!({"error": format!("unknown mode {other:?}: precopy, postcopy or hybrid")}),
                );
            }
        };
        let target = target
            .parse::<SocketAddr>()
            .map_err(|_| json!({"error": format!("bad address {target:?}")}))?;
        // After the mode: kvd's `name=value` parameters (`streams=`,
        // `max_freeze_ms=`), or the older positional `[streams]
        // [max-freeze-ms]`.
        let (mut streams, mut max_freeze_ms) = (None, None);
        for (i, word) in rest.iter().enumerate().skip(1) {
            match word.split_once('=') {
                Some(("streams", v)) => streams = Some(v),
                Some(("max_freeze_ms", v)) => max_freeze_ms = Some(v),
                Some((name, _)) => {
                    return Err(json!({"error": format!(
                        "tokiod does not take {name}=: streams= and max_freeze_ms= only"
                    )}));
                }
                None if i == 1 => streams = Some(word),
                None if i == 2 => max_freeze_ms = Some(word),
                None => return Err(json!({"error": format!("unexpected {word:?}")})),
            }
        }
        let streams = match streams.map(|s| s.parse::<usize>()) {
            None => 2,
            Some(Ok(n)) if n > 0 => n,
            Some(_) => return Err(json!({"error": "streams: a positive number"})),
        };
        let max_freeze = match max_freeze_ms.map(|s| s.parse::<f64>()) {
            None => None,
            Some(Ok(ms)) if ms > 0.0 && ms.is_finite() => Some(Duration::from_secs_f64(ms / 1e3)),
            Some(_) => {
                return Err(json!({"error": "max freeze: a positive number of milliseconds"}));
            }
        };
        Ok(MigrateOptions {
            target,
            mode,
            streams,
            key: key().map_err(|e| json!({ "error": e }))?,
            handoff: self.handoff.clone(),
            // The pages' share of the freeze, as kvd's.
            downtime: Duration::from_millis(2),
            max_freeze,
        })
    }
}

fn source_figures(rep: SourceReport, started: u64, t0: Instant) -> SourceFigures {
    SourceFigures::from_report(
        &rep,
        started,
        t0.elapsed().as_secs_f64() * 1e3,
        crate::kvd::security::last_cipher(),
    )
}

/// The destination's log: JSON event lines on stdout (kvd's).
struct JsonLog {
    incoming: SocketAddr,
    refused: AtomicU64,
}

impl ReceiveLog for JsonLog {
    fn waiting(&self) {
        event(&KvdEvent::Waiting {
            addr: self.incoming.to_string(),
            pid: std::process::id(),
        });
    }

    fn refused(&self, peer: &str, reason: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 10 {
            eprintln!("tokiod: refused a connection from {peer}: {reason}");
        }
        event(&KvdEvent::Refused {
            peer: peer.to_string(),
            reason: reason.to_string(),
        });
    }

    fn frozen(&self) {
        event(&KvdEvent::Frozen {
            mono_ns: now_mono_ns(),
        });
    }

    fn report(&self, r: &Result<DestinationReport, MigrationError>) {
        match r {
            Ok(rep) => event(&KvdEvent::Migrated(DestinationFigures::from_report(rep))),
            Err(e) => {
                eprintln!("tokiod: incoming migration failed: {e}");
                event(&KvdEvent::Failed {
                    error: e.to_string(),
                })
            }
        }
    }

    fn serving(&self) {
        // tokio registers each restored socket as its task starts, after
        // Commit: none joined a poller before.
        event(&KvdEvent::Serving {
            mono_ns: now_mono_ns(),
            registered_before_commit: 0,
        });
    }
}
