//! What kvd answers on its admin socket ([`crate::kvd::admin`]): a serving
//! kvd ([`ServingAdmin`]: stats, status, populate, migrate with its
//! parameters, cancel, a bandwidth limit changed while it runs) and a
//! destination still waiting for its migration ([`WaitingAdmin`]).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use lmig_core::MigrationError;
use lmig_core::session::{CancelOutcome, SourceControl, SourceReport};
use lmig_core::traits::{Event, Phase};
use lmig_mem::RegionSet;
use lmig_net::HandoffConfig;
use serde_json::json;

use super::admin::{AdminCommand, AdminHandler, COMMANDS, MigrateRequest};
use super::cli::POPULATE_VALUE_LEN;
use super::migrate::{Dirtier, MigrateOptions, migrate_out};
use super::pace::PassHistogram;
use super::server::{Control, Counters, POSTCOPY_PAUSED};
use super::store::Store;
use crate::common::clock::{mono_ns, now_mono_ns};
use crate::figures::{
    AdminStatus, KvdEvent, MigrateFailure, MigrateLine, MigrationStatus, Progress, SourceFigures,
};

/// One JSON line to the admin client.
fn reply(out: &mut dyn Write, v: serde_json::Value) {
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// An error line; a command kvd could not read also lists the commands.
fn error(out: &mut dyn Write, msg: impl std::fmt::Display, list: bool) {
    if list {
        reply(out, json!({"error": msg.to_string(), "commands": COMMANDS}));
    } else {
        reply(out, json!({"error": msg.to_string()}));
    }
}

/// Write a [`KvdEvent`] line on kvd's stdout.
pub fn event(e: KvdEvent) {
    let line = serde_json::to_string(&e).expect("a KvdEvent serializes");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The pre-shared key from `LMIG_KEY`.
pub fn key_from_env() -> Result<Vec<u8>, String> {
    let hex = std::env::var("LMIG_KEY").map_err(|_| {
        "set LMIG_KEY to the pre-shared key (hex, at least 16 bytes) on both hosts".to_string()
    })?;
    crate::common::keys::key_from_hex(&hex).map_err(|e| format!("LMIG_KEY: {e}"))
}

/// Commands that need a serving kvd, answered by a waiting destination.
fn not_yet(out: &mut dyn Write, what: &str) {
    error(
        out,
        format!("kvd waits for an incoming migration: nothing to {what} yet"),
        false,
    );
}

/// A destination before its migration arrived.
pub struct WaitingAdmin;

impl AdminHandler for WaitingAdmin {
    fn handle(&self, command: Result<AdminCommand, String>, out: &mut UnixStream) -> bool {
        match command {
            Ok(AdminCommand::Stats) => reply(
                out,
                json!({"state": "waiting", "keys": null, "clients": 0, "requests": 0}),
            ),
            Ok(AdminCommand::Status) => reply(
                out,
                json!(AdminStatus {
                    state: "waiting".into(),
                    ..AdminStatus::default()
                }),
            ),
            Ok(AdminCommand::Populate(_)) => not_yet(out, "populate"),
            Ok(AdminCommand::Migrate(_)) => not_yet(out, "migrate"),
            Ok(AdminCommand::SetBandwidth(_)) | Ok(AdminCommand::Cancel) => {
                error(out, "no migration is running", false)
            }
            Ok(AdminCommand::Quit) => return false,
            Ok(_) => reply(out, json!({"commands": COMMANDS})),
            Err(e) => error(out, e, true),
        }
        true
    }
}

/// The migration away, as the admin commands see it.
#[derive(Default)]
enum Migration {
    #[default]
    Idle,
    /// Connecting to the destination: the session does not exist yet; a
    /// cancel or a limit asked for now applies when it does.
    Connecting { cancel: bool, bandwidth: u64 },
    /// The session runs.
    Running(SourceControl),
    /// kvd migrated away (or `Commit` went out): the process ends.
    Departed,
}

/// kvd leaving: the main thread waits (after its serving loop ended at the
/// commit) until the migration away is over, then ends the process.
#[derive(Default)]
pub struct Departure {
    over: Mutex<bool>,
    cv: Condvar,
}

impl Departure {
    fn settle(&self) {
        *self.over.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Wait (at most `limit`) until the migration away is over.
    pub fn wait(&self, limit: Duration) {
        let over = self.over.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.cv.wait_timeout_while(over, limit, |o| !*o);
    }
}

/// A serving kvd's admin commands (the source, or a destination after its
/// migration arrived: it can migrate again).
pub struct ServingAdmin {
    /// The serving loop.
    pub control: Control,
    /// kvd's memory (it lives as long as the process).
    pub regions: &'static RegionSet,
    /// The store in it.
    pub store: Store<'static>,
    /// The background writer, if any.
    pub dirtier: Option<Dirtier>,
    /// Move the service address with kvd.
    pub handoff: Option<HandoffConfig>,
    /// Set when kvd migrated away.
    pub departure: std::sync::Arc<Departure>,
    migration: Mutex<Migration>,
}

impl ServingAdmin {
    /// The handler for a kvd serving `store`.
    pub fn new(
        control: Control,
        regions: &'static RegionSet,
        store: Store<'static>,
        dirtier: Option<Dirtier>,
        handoff: Option<HandoffConfig>,
    ) -> Self {
        Self {
            control,
            regions,
            store,
            dirtier,
            handoff,
            departure: Default::default(),
            migration: Mutex::new(Migration::Idle),
        }
    }

    fn migration(&self) -> std::sync::MutexGuard<'_, Migration> {
        self.migration.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self, out: &mut dyn Write) {
        // Paused: the key count could sit on a missing page.
        let missing = POSTCOPY_PAUSED.load(Ordering::Acquire);
        let c = &self.control.counters;
        reply(
            out,
            json!({
                "keys": (missing == 0).then(|| self.store.len()),
                "clients": c.clients.load(Ordering::Relaxed),
                "requests": c.requests.load(Ordering::Relaxed),
                "postcopy_paused": missing > 0,
                "missing_pages": missing,
            }),
        )
    }

    fn status(&self) -> AdminStatus {
        let clients = self.control.counters.clients.load(Ordering::Relaxed);
        let (state, migration) = match &*self.migration() {
            Migration::Idle => ("serving", None),
            Migration::Departed => ("departed", None),
            Migration::Connecting { cancel, bandwidth } => (
                "migrating",
                Some(MigrationStatus {
                    phase: "connecting".into(),
                    bandwidth_limit_mbps: *bandwidth as f64 / 1e6,
                    cancelling: *cancel,
                    ..MigrationStatus::default()
                }),
            ),
            Migration::Running(c) => ("migrating", Some(migration_status(c))),
        };
        AdminStatus {
            state: state.into(),
            clients,
            migration,
        }
    }

    fn cancel(&self, out: &mut dyn Write) {
        if std::env::var_os("LMIG_DEMO_DEBUG").is_some() {
            eprintln!("kvd: cancel at {} ns", now_mono_ns());
        }
        let mut m = self.migration();
        match &mut *m {
            Migration::Idle => error(out, "no migration is running", false),
            Migration::Departed => error(
                out,
                "too late: kvd migrated away (it runs at the destination)",
                false,
            ),
            Migration::Connecting { cancel: true, .. } => already_cancelled(out),
            Migration::Connecting { cancel, .. } => {
                *cancel = true;
                reply(out, json!({"ok": true, "cancelled": true}));
            }
            Migration::Running(c) if c.cancel_handle().is_cancelled() => already_cancelled(out),
            Migration::Running(c) => match c.cancel() {
                CancelOutcome::Cancelled => reply(out, json!({"ok": true, "cancelled": true})),
                CancelOutcome::AfterCommit => error(
                    out,
                    "too late: the migration committed; kvd now runs at the destination",
                    false,
                ),
                _ => error(out, "the migration already failed; kvd serves here", false),
            },
        }
    }

    fn set_bandwidth(&self, mbps: f64, out: &mut dyn Write) {
        let bytes = (mbps * 1e6) as u64;
        match &mut *self.migration() {
            Migration::Connecting { bandwidth, .. } => *bandwidth = bytes,
            Migration::Running(c) => c.set_bandwidth_limit(bytes),
            _ => return error(out, "no migration is running", false),
        }
        reply(out, json!({"ok": true, "bandwidth_mbps": mbps}));
    }

    /// The session exists: apply what was asked for while connecting.
    fn started(&self, control: SourceControl) {
        let mut m = self.migration();
        if let Migration::Connecting { cancel, bandwidth } = *m {
            if bandwidth > 0 {
                control.set_bandwidth_limit(bandwidth);
            }
            if cancel {
                control.cancel();
            }
        }
        *m = Migration::Running(control);
    }

    /// `migrate`: runs on the asking connection's thread, streaming
    /// progress lines to it; the other admin connections are served meanwhile.
    fn migrate(&self, req: MigrateRequest, out: &mut UnixStream) {
        {
            let mut m = self.migration();
            match *m {
                Migration::Idle => {}
                Migration::Departed => return error(out, "kvd migrated away", false),
                _ => {
                    return error(
                        out,
                        "a migration is already running (see status; cancel stops it)",
                        false,
                    );
                }
            }
            *m = Migration::Connecting {
                cancel: false,
                bandwidth: req.bandwidth,
            };
        }
        let key = match key_from_env() {
            Ok(k) => k,
            Err(e) => {
                *self.migration() = Migration::Idle;
                return error(out, e, false);
            }
        };
        let opts = MigrateOptions {
            target: req.target,
            mode: req.mode,
            streams: req.streams,
            key,
            handoff: self.handoff.clone(),
            downtime: req.downtime,
            max_freeze: req.max_freeze,
            bandwidth: req.bandwidth,
        };
        let started = now_mono_ns();
        let t0 = Instant::now();
        let watch = Watch {
            out: out.try_clone().ok().map(Mutex::new),
            freeze: Mutex::new((None, None)),
            counters: self.control.counters.clone(),
            loop_before: self.control.counters.pace.snapshot(),
            loop_at_freeze: Mutex::new(None),
        };
        let over = AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            let deadline = req
                .timeout
                .map(|t| Deadline::spawn(s, self, &over, t))
                .transpose();
            let r = migrate_out(
                &self.control,
                self.regions,
                self.dirtier.clone(),
                &opts,
                |c| self.started(c),
                |e: &Event| watch.event(e),
            );
            if let Ok(Some(d)) = deadline {
                d.join();
            }
            if std::env::var_os("LMIG_DEMO_DEBUG").is_some() {
                eprintln!("kvd: migrate_out returned at {:?}", t0.elapsed());
            }
            r
        });
        let (line, ev, departed) = answer(r, started, t0, &watch);
        *self.migration() = if departed {
            Migration::Departed
        } else {
            Migration::Idle
        };
        event(ev);
        reply(out, line);
        if departed {
            if let Some(d) = &self.dirtier {
                d.stop.store(true, Ordering::SeqCst);
            }
            self.departure.settle();
        }
    }
}

/// What `migrate` watches while the session runs: the progress lines go to
/// the asking connection; an aborted attempt's freeze is timed.
struct Watch {
    out: Option<Mutex<UnixStream>>,
    /// The pause and the program resumed after an abort.
    freeze: Mutex<(Option<Instant>, Option<Instant>)>,
    /// The loop's counters: its pass times ([`super::pace::LoopPace`]).
    counters: Arc<Counters>,
    /// The loop's pass times when `migrate` arrived ...
    loop_before: PassHistogram,
    /// ... and at the freeze.
    loop_at_freeze: Mutex<Option<PassHistogram>>,
}

impl Watch {
    fn event(&self, e: &Event) {
        let mut f = self.freeze.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            Event::Phase {
                phase: Phase::Frozen,
                at,
            } => {
                f.0 = Some(*at);
                let at_freeze = self.counters.pace.snapshot();
                *self
                    .loop_at_freeze
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(at_freeze);
            }
            Event::Phase {
                phase: Phase::Aborted,
                at,
            } => {
                f.1 = Some(*at);
                // The program runs here again: say so now, before the
                // session's cleanup (the tracker's teardown, the channel).
                self.line(&MigrateLine::Resumed {
                    resumed_ns: mono_ns(*at),
                });
            }
            Event::Progress {
                pages,
                bytes,
                total_pages,
            } => {
                self.line(&MigrateLine::Progress {
                    progress: Progress {
                        pages: *pages,
                        bytes: *bytes,
                        total_pages: *total_pages,
                    },
                });
            }
            _ => {}
        }
    }

    /// One line to the connection that asked for the migration.
    fn line(&self, line: &MigrateLine) {
        if let Some(o) = &self.out {
            let mut o = o.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(o, "{}", json!(line));
            let _ = o.flush();
        }
    }
}

/// `migrate`'s last line, the same as an event for stdout, and whether kvd
/// departed (committed: it runs at the destination now).
fn answer(
    r: Result<SourceReport, MigrationError>,
    started: u64,
    t0: Instant,
    watch: &Watch,
) -> (serde_json::Value, KvdEvent, bool) {
    match r {
        Ok(rep) => {
            let mut f = source_figures(rep, started, t0);
            // kvd's own service time before the migration and in pre-copy.
            let before = &watch.loop_before;
            f.kvd_baseline_p99_ms = before.p99_ms_since(&PassHistogram::default());
            let at_freeze = watch
                .loop_at_freeze
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            f.kvd_precopy_p99_ms = at_freeze.and_then(|h| h.p99_ms_since(before));
            (
                json!(MigrateLine::Migrated(f.clone())),
                KvdEvent::MigratedOut(f),
                true,
            )
        }
        Err(e) => {
            let (paused, resumed) = *watch.freeze.lock().unwrap_or_else(|p| p.into_inner());
            let f = MigrateFailure {
                error: e.to_string(),
                source_serving: e.source_may_run(),
                aborted_by_deadline: matches!(e, MigrationError::FreezeDeadline { .. }),
                freeze_ms: paused
                    .zip(resumed)
                    .map(|(p, r)| (r - p).as_secs_f64() * 1e3),
                cancelled: matches!(e, MigrationError::Cancelled),
            };
            let departed = !f.source_serving;
            (
                json!(MigrateLine::Failed(f.clone())),
                KvdEvent::MigrateFailed(f),
                departed,
            )
        }
    }
}

fn already_cancelled(out: &mut dyn Write) {
    reply(
        out,
        json!({"ok": true, "cancelled": true, "already": true,
               "note": "already cancelled: the attempt is ending and kvd serves here"}),
    )
}

fn phase_name(p: Option<Phase>) -> &'static str {
    match p {
        None => "connecting",
        Some(Phase::Setup) => "setup",
        Some(Phase::Precopy(_)) => "precopy",
        Some(Phase::Frozen) => "frozen",
        Some(Phase::AwaitReady) => "await_ready",
        Some(Phase::Committed) => "committed",
        Some(Phase::Postcopy) => "postcopy",
        Some(Phase::Done) => "done",
        Some(Phase::Aborted) => "aborted",
        // `Phase` is `#[non_exhaustive]`: a phase added later.
        Some(_) => "other",
    }
}

fn migration_status(c: &SourceControl) -> MigrationStatus {
    let p = c.progress();
    MigrationStatus {
        phase: phase_name(p.phase).into(),
        round: p.round,
        round_pages: p.round_pages,
        round_pages_sent: p.round_pages_sent,
        total_pages: p.total_pages,
        pages_sent: p.pages_sent,
        bytes_sent: p.bytes_sent,
        dirty_pages: p.dirty_pages,
        dirty_rate_mbps: p.dirty_rate / 1e6,
        bandwidth_mbps: p.bandwidth / 1e6,
        bandwidth_limit_mbps: p.bandwidth_limit as f64 / 1e6,
        estimated_freeze_ms: p.estimated_freeze.map(|d| d.as_secs_f64() * 1e3),
        elapsed_ms: p.elapsed.as_secs_f64() * 1e3,
        cancelling: c.cancel_handle().is_cancelled(),
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

/// The thread that cancels a migration still not committed after
/// `migrate`'s `timeout_s`.
struct Deadline<'scope> {
    thread: ScopedJoinHandle<'scope, ()>,
    over: &'scope AtomicBool,
}

impl<'scope> Deadline<'scope> {
    fn spawn<'env>(
        scope: &'scope Scope<'scope, 'env>,
        admin: &'env ServingAdmin,
        over: &'env AtomicBool,
        after: Duration,
    ) -> std::io::Result<Self> {
        let thread = std::thread::Builder::new()
            .name("kvd-deadline".into())
            .spawn_scoped(scope, move || {
                let by = Instant::now() + after;
                // Bounded by `by`.
                while !over.load(Ordering::SeqCst) {
                    if Instant::now() >= by {
                        match &mut *admin.migration() {
                            Migration::Connecting { cancel, .. } => *cancel = true,
                            Migration::Running(c) => {
                                c.cancel();
                            }
                            _ => {}
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })?;
        Ok(Self { thread, over })
    }

    /// The migration ended: stop watching.
    fn join(self) {
        self.over.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

impl AdminHandler for ServingAdmin {
    fn handle(&self, command: Result<AdminCommand, String>, out: &mut UnixStream) -> bool {
        match command {
            Ok(AdminCommand::Stats) => self.stats(out),
            Ok(AdminCommand::Status) => reply(out, json!(self.status())),
            Ok(AdminCommand::Populate(n)) => match self.store.populate(n, POPULATE_VALUE_LEN) {
                Ok(()) => reply(out, json!({"ok": true, "keys": self.store.len()})),
                Err(e) => error(out, e, false),
            },
            Ok(AdminCommand::Migrate(req)) => self.migrate(req, out),
            Ok(AdminCommand::SetBandwidth(mbps)) => self.set_bandwidth(mbps, out),
            Ok(AdminCommand::Cancel) => self.cancel(out),
            Ok(AdminCommand::Quit) => return false,
            Ok(_) => reply(out, json!({"commands": COMMANDS})),
            Err(e) => error(out, e, true),
        }
        true
    }
}
