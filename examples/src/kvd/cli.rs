//! The `kvd` command: a key-value server speaking a Redis protocol subset (PING, GET,
//! SET, DEL, INCR, DBSIZE, INFO, DEBUG POPULATE) whose data lives in an lmig
//! region, and which migrates itself live to another host on an admin
//! request.
//!
//! ```text
//! kvd --listen 198.51.100.100:6379 --mib 1024 --admin /run/kvd-a.sock      # serve
//! kvd --incoming 198.51.100.2:7000 --admin /run/kvd-b.sock                 # wait for a migration
//! echo 'migrate 198.51.100.2:7000 precopy' | socat - UNIX:/run/kvd-a.sock   # move A to B
//! ```
//!
//! The pre-shared key comes from `LMIG_KEY` (hex, at least 16 bytes) on both
//! sides; with `LMIG_TLS_CERT`, `LMIG_TLS_KEY` and `LMIG_TLS_CA` (PEM files)
//! the migration runs over TLS 1.3 with certificates instead
//! ([`crate::kvd::security`]). With `--service-if`, the listening address moves with the program
//! (network lock, held packets, address handoff).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::clock::{mono_ns, now_mono_ns};
use crate::common::keys::key_from_hex;
use crate::kvd::migrate::{
    Dirtier, MigrateOptions, ReceiveLog, STORE_REGION, migrate_out, receive,
};
use crate::kvd::server::{Control, Server};
use crate::kvd::store::Store;
use clap::Parser;
use lmig_core::MigrationError;
use lmig_core::session::DestinationReport;
use lmig_core::session::Mode;
use lmig_core::traits::{Event, Phase};
use lmig_mem::{RegionOptions, RegionSet};
use lmig_net::{HandoffConfig, ServiceAddr};
use serde_json::json;

use crate::figures::{
    DestinationFigures, KvdEvent, MigrateFailure, MigrateLine, Progress, SourceFigures,
};

/// kvd's command line.
#[derive(Parser, Debug)]
#[command(
    name = "kvd",
    about = "A Redis-protocol key-value server that migrates itself live"
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
    /// Dirty this many MB/s of scratch pages in the background (load for benchmarks).
    #[arg(long, default_value_t = 0.0)]
    pub dirty_mbps: f64,
    /// Interface carrying the service address; the address moves with kvd.
    #[arg(long)]
    pub service_if: Option<String>,
    /// Service address (default: the --listen address) and its prefix length.
    #[arg(long)]
    pub service_addr: Option<IpAddr>,
    /// Prefix length of the service address on its interface.
    #[arg(long, default_value_t = 24)]
    pub service_prefix: u8,
}

/// Bytes of each value `populate N` stores (`value:<n>:` padded with `x`).
pub const POPULATE_VALUE_LEN: usize = 100;

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("kvd: {msg}");
    std::process::exit(1)
}

fn key() -> Vec<u8> {
    let hex = std::env::var("LMIG_KEY").unwrap_or_else(|_| {
        fail("set LMIG_KEY to the pre-shared key (hex, at least 16 bytes) on both hosts")
    });
    key_from_hex(&hex).unwrap_or_else(|e| fail(format!("LMIG_KEY: {e}")))
}

fn event(e: KvdEvent) {
    let line = serde_json::to_string(&e).expect("a KvdEvent serializes");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The destination's log: JSON events on stdout, refusals also on stderr
/// (the first ten, then at every power of ten: a flood does not flood the log).
struct JsonLog {
    incoming: SocketAddr,
    refused: std::sync::atomic::AtomicU64,
}

impl ReceiveLog for JsonLog {
    fn waiting(&self) {
        event(KvdEvent::Waiting {
            addr: self.incoming.to_string(),
            pid: std::process::id(),
        });
    }

    fn refused(&self, peer: &str, reason: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 10 || 10u64.pow(n.ilog10()) == n {
            eprintln!("kvd: refused a connection from {peer} ({n} so far): {reason}");
        }
        event(KvdEvent::Refused {
            peer: peer.to_string(),
            reason: reason.to_string(),
        });
    }

    fn phase(&self, phase: Phase) {
        if phase == Phase::Frozen {
            event(KvdEvent::Frozen {
                mono_ns: now_mono_ns(),
            });
        }
    }

    fn report(&self, r: &Result<DestinationReport, MigrationError>) {
        match r.as_ref().map_err(MigrationError::cause) {
            Ok(rep) => event(KvdEvent::Migrated(DestinationFigures {
                pages_placed: rep.pages_placed,
                postcopy_pages: rep.postcopy_pages,
                network_faults: rep.network_faults,
                duplicate_pages: rep.duplicate_pages,
                sockets: rep.sockets_restored,
                verified: rep.verification == lmig_core::protocol::Verification::Verified,
                resumed_ns: rep.resumed_at.map(mono_ns),
                handover_ns: rep.handover_at.map(mono_ns),
                last_page_ns: rep.last_page_at.map(mono_ns),
                ready_ns: rep.ready_at.map(mono_ns),
                complete_ns: rep.complete_at.map(mono_ns),
                warnings: rep.warnings.clone(),
            })),
            Err(e @ MigrationError::PostcopyPaused { missing_pages, .. }) if *missing_pages > 0 => {
                crate::kvd::server::POSTCOPY_PAUSED.store(*missing_pages, Ordering::Release);
                eprintln!("kvd: the source was lost after Commit: {e}");
                event(KvdEvent::SourceLost {
                    missing_pages: *missing_pages,
                    error: e.to_string(),
                })
            }
            Err(_) => {
                // The whole error, not its cause: after Commit it says
                // whether the program runs here.
                let e = r
                    .as_ref()
                    .err()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                eprintln!("kvd: incoming migration failed: {e}");
                event(KvdEvent::Failed { error: e })
            }
        }
    }

    fn serving(&self, at: Instant) {
        event(KvdEvent::Serving {
            mono_ns: mono_ns(at),
        });
    }

    fn postcopy_paused(&self, missing_pages: u64, reason: &str) {
        eprintln!("kvd: post-copy paused, {missing_pages} pages missing: {reason}");
        event(KvdEvent::PostcopyPaused {
            missing_pages,
            reason: reason.to_string(),
        });
    }

    fn postcopy_resumed(&self, missing_pages: u64, paused_for: Duration) {
        event(KvdEvent::PostcopyResumed {
            missing_pages,
            paused_ms: paused_for.as_millis() as u64,
        });
    }
}

/// Run kvd with these arguments (never returns on success paths that end the process).
pub fn main_with(args: Args) {
    // One fd per client connection: take the whole allowance.
    if let Err(e) = lmig_net::raise_nofile_limit() {
        eprintln!("kvd: cannot raise the open-file limit: {e}");
    }
    let handoff = args.service_if.as_ref().map(|iface| {
        let addr = args
            .service_addr
            .or(args.listen.map(|a| a.ip()))
            .unwrap_or_else(|| fail("--service-if needs --service-addr on the destination"));
        HandoffConfig::new([ServiceAddr::new(addr, args.service_prefix)], iface.clone())
    });
    if let Some(incoming) = args.incoming {
        let key = key();
        let log = Arc::new(JsonLog {
            incoming,
            refused: Default::default(),
        });
        if let Err(e) = receive(incoming, &key, handoff, log) {
            fail(format!("incoming migration failed: {e}"));
        }
        return;
    }
    let listen = args
        .listen
        .unwrap_or_else(|| fail("give --listen ADDR (serve) or --incoming ADDR (receive)"));
    let region = RegionOptions::new(STORE_REGION, args.mib << 20)
        .populate(true)
        .map()
        .unwrap_or_else(|e| fail(format!("mapping {} MiB: {e}", args.mib)));
    let regions = RegionSet::new([region]).unwrap_or_else(|e| fail(e));
    let region = regions.get(STORE_REGION).unwrap_or_else(|e| fail(e));
    let store = Store::format(region);
    let listener = std::net::TcpListener::bind(listen)
        .unwrap_or_else(|e| fail(format!("listening on {listen}: {e}")));
    let mut server = Server::new(listener, Vec::new()).unwrap_or_else(|e| fail(e));
    let control = server.control();
    let dirtier = (args.dirty_mbps > 0.0).then(Dirtier::default);
    let admin = args.admin.as_ref().map(|path| {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path)
            .unwrap_or_else(|e| fail(format!("admin socket {}: {e}", path.display())))
    });
    event(KvdEvent::Listening {
        addr: listen.to_string(),
        pid: std::process::id(),
    });
    let (migrated_tx, migrated_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        if let Some(d) = &dirtier {
            s.spawn(|| d.run(&store, args.dirty_mbps));
        }
        if let Some(admin) = admin {
            let (control, regions, dirtier, handoff, store) =
                (&control, &regions, &dirtier, &handoff, &store);
            s.spawn(move || {
                for conn in admin.incoming().flatten() {
                    if serve_admin(conn, control, regions, dirtier, handoff, store) {
                        // Migrated: the destination serves now; this process ends.
                        if let Some(d) = dirtier {
                            d.stop.store(true, Ordering::SeqCst);
                        }
                        let _ = migrated_tx.send(());
                        break;
                    }
                }
            });
        }
        if let Err(e) = server.run(&store) {
            fail(format!("serving: {e}"));
        }
        // The loop ended at the commit. The session still runs (post-copy
        // service, digests, `Done`) and needs this memory: wait for it.
        let _ = migrated_rx.recv_timeout(Duration::from_secs(3600));
        std::process::exit(0);
    });
}

/// Handle one admin connection; true when kvd migrated away.
fn serve_admin(
    conn: UnixStream,
    control: &Control,
    regions: &RegionSet,
    dirtier: &Option<Dirtier>,
    handoff: &Option<HandoffConfig>,
    store: &Store<'_>,
) -> bool {
    let (Ok(read), Ok(progress)) = (conn.try_clone(), conn.try_clone()) else {
        return false;
    };
    let progress_out = std::sync::Mutex::new(progress);
    let mut out = conn;
    for line in BufReader::new(read).lines().map_while(Result::ok) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut reply = |v: serde_json::Value| {
            let _ = writeln!(out, "{v}");
            let _ = out.flush();
        };
        match words.as_slice() {
            ["stats"] => {
                // Paused: the key count could sit on a missing page.
                let missing = crate::kvd::server::POSTCOPY_PAUSED.load(Ordering::Acquire);
                reply(json!({
                    "keys": (missing == 0).then(|| store.len()),
                    "clients": control.counters.clients.load(Ordering::Relaxed),
                    "requests": control.counters.requests.load(Ordering::Relaxed),
                    "postcopy_paused": missing > 0,
                    "missing_pages": missing,
                }))
            }
            ["populate", n] => match n
                .parse::<u64>()
                .map(|n| store.populate(n, POPULATE_VALUE_LEN))
            {
                Ok(Ok(())) => reply(json!({"ok": true, "keys": store.len()})),
                Ok(Err(e)) => reply(json!({"error": e.to_string()})),
                Err(e) => reply(json!({"error": e.to_string()})),
            },
            ["migrate", target, rest @ ..] => {
                let mode = match rest.first().copied().unwrap_or("precopy") {
                    "precopy" => Mode::Precopy,
                    "postcopy" => Mode::Postcopy,
                    "hybrid" => Mode::Hybrid,
                    other => {
                        reply(
                            json!({"error": format!("unknown mode {other:?}: precopy, postcopy or hybrid")}),
                        );
                        continue;
                    }
                };
                let Ok(target) = target.parse::<SocketAddr>() else {
                    reply(json!({"error": format!("bad address {target:?}")}));
                    continue;
                };
                let streams = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
                let max_freeze = match rest.get(2).map(|s| s.parse::<f64>()) {
                    None => None,
                    Some(Ok(ms)) if ms > 0.0 && ms.is_finite() => {
                        Some(Duration::from_secs_f64(ms / 1e3))
                    }
                    Some(_) => {
                        reply(json!({"error": "max freeze: a positive number of milliseconds"}));
                        continue;
                    }
                };
                let opts = MigrateOptions {
                    target,
                    mode,
                    streams,
                    key: key(),
                    handoff: handoff.clone(),
                    // The pages' share of the freeze: the sockets take the
                    // rest, and on a shared host the last pages compete with
                    // them for the CPU (5 ms left 600-1000 pages, 5-10 ms).
                    downtime: Duration::from_millis(2),
                    max_freeze,
                };
                let started = now_mono_ns();
                let t0 = Instant::now();
                // An aborted attempt's freeze: the pause to the program resumed.
                let freeze = std::sync::Mutex::new((None, None));
                let r = migrate_out(control, regions, dirtier.clone(), &opts, |e: &Event| {
                    match e {
                        Event::Phase {
                            phase: Phase::Frozen,
                            at,
                        } => freeze.lock().expect("poisoned").0 = Some(*at),
                        Event::Phase {
                            phase: Phase::Aborted,
                            at,
                        } => freeze.lock().expect("poisoned").1 = Some(*at),
                        _ => {}
                    }
                    if let Event::Progress {
                        pages,
                        bytes,
                        total_pages,
                    } = e
                    {
                        let line = MigrateLine::Progress {
                            progress: Progress {
                                pages: *pages,
                                bytes: *bytes,
                                total_pages: *total_pages,
                            },
                        };
                        let mut o = progress_out.lock().expect("poisoned");
                        let _ = writeln!(o, "{}", json!(line));
                    }
                });
                match r {
                    Ok(rep) => {
                        reply(json!(MigrateLine::Migrated(SourceFigures {
                            ok: true,
                            mode: format!("{:?}", rep.mode).to_lowercase(),
                            rounds: rep.rounds,
                            bytes_sent: rep.bytes_sent,
                            pages_sent: rep.pages_sent,
                            zero_pages: rep.zero_pages,
                            sockets: rep.sockets,
                            switched_to_postcopy: rep.switched_to_postcopy,
                            started_ns: started,
                            paused_ns: mono_ns(rep.paused_at),
                            commit_ns: mono_ns(rep.commit_at),
                            ready_ns: mono_ns(rep.ready_at),
                            freeze_pages: rep.freeze_pages,
                            freeze_steps_ms: rep
                                .freeze_steps
                                .iter()
                                .map(|(n, d)| (n.to_string(), d.as_secs_f64() * 1e3))
                                .collect(),
                            total_ms: t0.elapsed().as_secs_f64() * 1e3,
                            verified: rep.verification
                                == lmig_core::protocol::Verification::Verified,
                            policy: rep.policy_reason,
                            warnings: rep.warnings,
                            cipher: crate::kvd::security::last_cipher(),
                        })));
                        return true;
                    }
                    Err(e) => reply(json!(MigrateLine::Failed(MigrateFailure {
                        error: e.to_string(),
                        source_serving: e.source_may_run(),
                        aborted_by_deadline: matches!(e, MigrationError::FreezeDeadline { .. }),
                        freeze_ms: match freeze.into_inner().expect("poisoned") {
                            (Some(paused), Some(resumed)) => {
                                Some((resumed - paused).as_secs_f64() * 1e3)
                            }
                            _ => None,
                        },
                    }))),
                }
            }
            ["quit"] => return false,
            _ => reply(
                json!({"error": "commands: stats | populate N | migrate HOST:PORT [precopy|postcopy|hybrid] [streams] [max-freeze-ms] | quit"}),
            ),
        }
    }
    false
}
