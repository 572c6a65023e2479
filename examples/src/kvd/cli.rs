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
//! (network lock, held packets, address handoff). The admin socket
//! ([`crate::kvd::admin`], commands in [`crate::kvd::operator`]) serves its
//! operators concurrently, on both sides; `kvd --help` shows an example session.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::clock::{mono_ns, now_mono_ns};
use crate::kvd::admin::{self, AdminServer, HandlerSlot, SignalWatch};
use crate::kvd::migrate::{Dirtier, ReceiveLog, STORE_REGION, Served, receive};
use crate::kvd::operator::{Departure, ServingAdmin, WaitingAdmin, event, key_from_env};
use crate::kvd::server::Server;
use crate::kvd::store::Store;
use clap::Parser;
use lmig_core::MigrationError;
use lmig_core::session::DestinationReport;
use lmig_core::traits::Phase;
use lmig_mem::{RegionOptions, RegionSet};
use lmig_net::{HandoffConfig, ServiceAddr};

use crate::figures::{DestinationFigures, KvdEvent};

/// What `kvd --help` adds below the options.
const AFTER_HELP: &str = "\
Environment:
  LMIG_KEY       the pre-shared key of the migration channel (hex, at least 16
                 bytes), the same on both hosts; e.g. `openssl rand -hex 32`
  LMIG_TLS_CERT, LMIG_TLS_KEY, LMIG_TLS_CA
                 PEM files: migrate over TLS 1.3 with certificates instead

Admin commands (one per line on the --admin Unix socket; one JSON line back,
a `migrate` streams progress lines and ends with the report; many operators
at once, an idle connection is closed after 60 s):
  stats                      keys, clients, requests
  status                     serving | migrating | waiting | departed, and the
                             running migration: phase, round, bytes, dirty
                             rate, bandwidth, estimated freeze
  populate N                 store N keys
  migrate HOST:PORT [precopy|postcopy|hybrid] [downtime_ms=N]
          [bandwidth_mbps=N] [timeout_s=N] [streams=N] [max_freeze_ms=N]
                             move kvd live to the kvd waiting on HOST:PORT
                             (bandwidth in MB/s, 0 = no limit; timeout_s:
                             cancel if not committed by then)
  set bandwidth_mbps=N       change the running migration's limit
  cancel                     stop the running migration: before its commit kvd
                             serves on here with every connection and byte;
                             after it, kvd answers that it is too late
  help, quit

Example session:
  A$ LMIG_KEY=$K kvd --listen 198.51.100.100:6379 --admin /run/kvd-a.sock
  B$ LMIG_KEY=$K kvd --incoming 198.51.100.2:7000 --admin /run/kvd-b.sock
  A$ socat - UNIX:/run/kvd-a.sock
     populate 100000
     {\"ok\":true,\"keys\":100000}
     migrate 198.51.100.2:7000 precopy bandwidth_mbps=200 timeout_s=60
     {\"progress\":{\"pages\":65536,\"bytes\":268438016,\"total_pages\":262144}}
  A$ echo status | socat - UNIX:/run/kvd-a.sock        # from another shell
     {\"state\":\"migrating\",\"migration\":{\"phase\":\"precopy\",\"round\":0,...}}
  A$ echo 'set bandwidth_mbps=0' | socat - UNIX:/run/kvd-a.sock
  A$ echo cancel | socat - UNIX:/run/kvd-a.sock        # or let it finish
  B$ echo stats | socat - UNIX:/run/kvd-b.sock         # after it moved: B serves

Both kvds print JSON event lines on stdout (listening, waiting, migrated,
migrated_out, migrate_failed, ...); the admin socket file is removed when kvd
ends (also on SIGTERM, SIGINT, SIGHUP).";

/// kvd's command line.
#[derive(Parser, Debug)]
#[command(
    name = "kvd",
    version,
    about = "A Redis-protocol key-value server that migrates itself live",
    long_about = "A Redis-protocol key-value server (PING, GET, SET, DEL, INCR, DBSIZE, \
INFO, DEBUG POPULATE) whose data lives in an lmig region, and which migrates itself live \
(memory, client connections, state) to a kvd waiting on another host when its operator \
says `migrate` on the admin socket.",
    after_help = AFTER_HELP
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
    /// Admin socket (Unix): `stats`, `status`, `migrate`, `cancel`, ...
    /// (see below); on both sides, removed when kvd ends.
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
    admin::exit(1)
}

fn key() -> Vec<u8> {
    key_from_env().unwrap_or_else(|e| fail(e))
}

/// The destination's log: JSON events on stdout, refusals also on stderr
/// (the first ten, then at every power of ten: a flood does not flood the log).
struct JsonLog {
    incoming: SocketAddr,
    refused: std::sync::atomic::AtomicU64,
    /// The admin socket's handler: the full command set once kvd serves.
    admin: Option<Arc<HandlerSlot>>,
    handoff: Option<HandoffConfig>,
    /// Set once kvd serves: its migration on, if one goes out.
    departure: std::sync::Mutex<Option<Arc<Departure>>>,
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
            Ok(rep) => event(KvdEvent::Migrated(DestinationFigures::from_report(rep))),
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

    fn serving(&self, at: Instant, registered_before_commit: u64) {
        event(KvdEvent::Serving {
            mono_ns: mono_ns(at),
            registered_before_commit,
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

    fn took_over(&self, served: Served) {
        let Some(slot) = &self.admin else { return };
        let store = match served.regions.get(STORE_REGION).map(Store::open) {
            Ok(Ok(store)) => store,
            _ => return eprintln!("kvd: the admin socket cannot open the store"),
        };
        let handler = ServingAdmin::new(
            served.control,
            served.regions,
            store,
            None,
            self.handoff.clone(),
        );
        *self.departure.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler.departure.clone());
        slot.set(Arc::new(handler));
    }

    fn serving_ended(&self) {
        let departure = self
            .departure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(d) = departure {
            d.wait(Duration::from_secs(3600));
        }
    }
}

/// Run kvd with these arguments (never returns on success paths that end the process).
pub fn main_with(args: Args) {
    // Before any other thread: the signals that end kvd go to one thread,
    // which removes the admin socket first.
    let signals = SignalWatch::spawn().unwrap_or_else(|e| fail(format!("signals: {e}")));
    crate::kvd::park::apply_fault_path();
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
    let admin_listener = args.admin.as_ref().map(|path| {
        admin::bind(path).unwrap_or_else(|e| fail(format!("admin socket {}: {e}", path.display())))
    });
    if let Some(incoming) = args.incoming {
        let key = key();
        let slot = admin_listener.map(|l| {
            let slot = HandlerSlot::new(Arc::new(WaitingAdmin));
            let server = AdminServer::spawn(l, slot.clone())
                .unwrap_or_else(|e| fail(format!("admin socket: {e}")));
            (slot, server)
        });
        let log = Arc::new(JsonLog {
            incoming,
            refused: Default::default(),
            admin: slot.as_ref().map(|(s, _)| s.clone()),
            handoff,
            departure: Default::default(),
        });
        if let Err(e) = receive(incoming, &key, log.handoff.clone(), log) {
            fail(format!("incoming migration failed: {e}"));
        }
        if let Some((_, server)) = slot {
            server.join();
        }
        admin::remove_socket();
        drop(signals);
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
    // kvd serves this memory until the process ends: it lives as long as it.
    let regions: &'static RegionSet = Box::leak(Box::new(regions));
    let region = regions.get(STORE_REGION).unwrap_or_else(|e| fail(e));
    let store = Store::format(region);
    let listener = std::net::TcpListener::bind(listen)
        .unwrap_or_else(|e| fail(format!("listening on {listen}: {e}")));
    let mut server = Server::new(listener, Vec::new()).unwrap_or_else(|e| fail(e));
    let dirtier = (args.dirty_mbps > 0.0).then(Dirtier::default);
    let handler = Arc::new(ServingAdmin::new(
        server.control(),
        regions,
        Store::open(region).unwrap_or_else(|e| fail(e)),
        dirtier.clone(),
        handoff,
    ));
    let departure = handler.departure.clone();
    let admin = admin_listener.map(|l| {
        AdminServer::spawn(l, HandlerSlot::new(handler))
            .unwrap_or_else(|e| fail(format!("admin socket: {e}")))
    });
    event(KvdEvent::Listening {
        addr: listen.to_string(),
        pid: std::process::id(),
    });
    std::thread::scope(|s| {
        if let Some(d) = &dirtier {
            s.spawn(|| d.run(&store, args.dirty_mbps));
        }
        if let Err(e) = server.run(&store) {
            fail(format!("serving: {e}"));
        }
        // The loop ended at the commit. The session still runs (post-copy
        // service, digests, `Done`) and needs this memory: wait for it.
        departure.wait(Duration::from_secs(3600));
        if let Some(d) = &dirtier {
            d.stop.store(true, Ordering::SeqCst);
        }
    });
    if let Some(a) = admin {
        a.join();
    }
    drop(signals);
    admin::exit(0);
}
