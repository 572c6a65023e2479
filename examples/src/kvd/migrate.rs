//! kvd migrating itself: the program side of lmig's traits (pause the loop,
//! hand over its sockets and buffered bytes) and the two entry points,
//! [`migrate_out`] on the source and [`receive`] on the destination.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lmig_core::model::{ProgramState, RegionId};
use lmig_core::policy::{ConvergencePolicy, Fallback, PolicyConfig};
use lmig_core::session::{
    AfterCommit, Destination, DestinationConfig, DestinationReport, Mode, Resumption, Source,
    SourceConfig, SourceControl, SourceReport,
};
use lmig_core::traits::{Event, Phase};
use lmig_core::{BoxError, MigrationError, SocketSink, StateSink, StateSource};
use lmig_mem::{Backing, DestinationRegions, RegionSet, best_tracker};
use lmig_net::{
    HandoffConfig, HandoffSink as Handoff, HandoffSource as Locked, NetSink, ProgramSockets,
    SinkConfig, SocketOwner,
};
use lmig_transport::{Endpoint, Listener, Rejection, StreamChannel, connect};

use super::server::{Control, POSTCOPY_PAUSED, Parked, Preregistered, Server, Wake, decode_state};
use super::store::Store;

/// Version of kvd's program-state format.
pub const STATE_VERSION: u32 = 1;
/// The region holding the store.
pub const STORE_REGION: RegionId = RegionId(1);
/// The listening socket's id in the socket records.
pub const LISTENER_ID: u64 = 0;

/// A background writer dirtying random scratch pages, paused with the loop.
#[derive(Clone, Default)]
pub struct Dirtier {
    /// Pause requested.
    pub pause: Arc<AtomicBool>,
    /// Acknowledged pause.
    pub paused: Arc<AtomicBool>,
    /// Rate as a percentage of the configured one (throttling).
    pub percent: Arc<AtomicU8>,
    /// Stop for good.
    pub stop: Arc<AtomicBool>,
}

impl Dirtier {
    /// Dirty `mbps` MB/s of scratch pages of `store` until stopped.
    pub fn run(&self, store: &Store<'_>, mbps: f64) {
        self.percent.store(100, Ordering::SeqCst);
        // Pages owed: grows at the rate of the moment (a throttle slows it
        // from then on, never retroactively), at most 50 ms of it at once
        // (after a pause nothing is made up).
        let mut at = Instant::now();
        let mut owed = 0f64;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut stamp = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            if self.pause.load(Ordering::SeqCst) {
                self.paused.store(true, Ordering::SeqCst);
                while self.pause.load(Ordering::SeqCst) && !self.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(200));
                }
                self.paused.store(false, Ordering::SeqCst);
                at = Instant::now();
                continue;
            }
            let rate =
                mbps * 1e6 / 4096.0 * f64::from(self.percent.load(Ordering::Relaxed)) / 100.0;
            let now = Instant::now();
            owed = (owed + (now - at).as_secs_f64() * rate).min(rate * 0.05);
            at = now;
            while owed >= 1.0 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                stamp += 1;
                store.dirty_scratch_page(seed, stamp);
                owed -= 1.0;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Ask the dirtier to pause (see [`Dirtier::wait_paused`]).
    fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
    }

    /// Wait (at most 5 s) until the dirtier acknowledges the pause asked by
    /// [`Dirtier::request_pause`].
    fn wait_paused(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.paused.load(Ordering::SeqCst) && !self.stop.load(Ordering::Relaxed) {
            if Instant::now() > deadline {
                return Err("the dirtier did not pause within 5 s".into());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }
}

/// The program seen by the source session.
struct KvdProgram {
    control: Control,
    dirtier: Option<Dirtier>,
    parked: Arc<Mutex<Option<Parked>>>,
    state: Vec<u8>,
}

fn backend(what: &'static str, e: impl Into<lmig_core::BoxError>) -> MigrationError {
    MigrationError::backend(what, e)
}

impl StateSource for KvdProgram {
    fn pause(&mut self) -> lmig_core::Result<()> {
        let t = Instant::now();
        // Both stop at once: the dirtier's pause (it sleeps up to 500 µs
        // between bursts) and the loop's park (the rest of its pass) overlap
        // instead of adding up inside the freeze.
        if let Some(d) = &self.dirtier {
            d.request_pause();
        }
        let parked = self.control.park().map_err(|e| backend("kvd loop", e))?;
        let loop_parked = t.elapsed();
        if let Some(d) = &self.dirtier {
            if let Err(e) = d.wait_paused() {
                // Serve on: the session aborts and resumes with nothing else.
                self.control.wake(Wake::Resume(parked));
                return Err(backend("kvd dirtier", e));
            }
        }
        if std::env::var_os("LMIG_DEMO_DEBUG").is_some() {
            eprintln!(
                "kvd: pause: loop parked after {loop_parked:?}, dirtier paused after {:?}",
                t.elapsed()
            );
        }
        self.state = parked.state.clone();
        *self.parked.lock().expect("poisoned") = Some(parked);
        Ok(())
    }

    fn capture(&mut self) -> lmig_core::Result<ProgramState> {
        Ok(ProgramState::new(
            STATE_VERSION,
            std::mem::take(&mut self.state),
        ))
    }

    fn resume(&mut self) -> lmig_core::Result<()> {
        // The sockets come back from the slot (the socket source put them
        // there when it aborted, or they never left it).
        let parked = self.parked.lock().expect("poisoned").take();
        match parked {
            Some(p) => self.control.wake(Wake::Resume(p)),
            None => {
                return Err(backend(
                    "kvd",
                    "the sockets did not come back after the abort",
                ));
            }
        }
        if let Some(d) = &self.dirtier {
            d.percent.store(100, Ordering::SeqCst);
            d.pause.store(false, Ordering::SeqCst);
        }
        self.control.counters.pace.throttle(100);
        Ok(())
    }

    /// Auto-converge: the background dirtier writes at `percent` % of its
    /// rate, and the loop, which answers the clients, is throttled only
    /// half as hard ([`super::pace::loop_share`]: a bounded sleep after each
    /// pass, [`super::pace::LoopPace`]): the writes nobody waits for slow
    /// down first, the clients' writes once the throttle deepens.
    fn throttle(&mut self, percent: u8) -> bool {
        if let Some(d) = &self.dirtier {
            d.percent.store(percent, Ordering::SeqCst);
        }
        self.control
            .counters
            .pace
            .throttle(super::pace::loop_share_for(percent));
        true
    }

    fn committed(&mut self) {
        if let Some(d) = &self.dirtier {
            d.stop.store(true, Ordering::SeqCst);
        }
        self.control.wake(Wake::Exit);
    }
}

/// kvd's loop as lmig-net's [`SocketOwner`] (behind [`ProgramSockets`],
/// which plans from duplicates while the loop serves, takes the sockets at
/// the freeze and gives them back on abort). The program's pause parks the
/// loop (its sockets and buffered bytes land in `parked`): the freeze takes
/// the sockets from there, and an abort puts them back for the program's
/// resume, which wakes the loop with them.
struct KvdLoop {
    control: Control,
    parked: Arc<Mutex<Option<Parked>>>,
    /// The parked loop's buffered bytes while its sockets are handed over.
    state: Vec<u8>,
    /// Lower this thread's priority once the sockets are released.
    lowers_priority: bool,
}

impl SocketOwner for KvdLoop {
    fn lend(&mut self, show: &mut dyn FnMut(u64, BorrowedFd<'_>)) -> Result<(), BoxError> {
        // Parked for about a microsecond per socket (one duplicate each).
        let snapshot = self.control.park()?;
        show(LISTENER_ID, snapshot.listener.as_fd());
        for (id, fd) in &snapshot.conns {
            show(*id, fd.as_fd());
        }
        self.control.wake(Wake::Resume(snapshot));
        Ok(())
    }

    fn park(&mut self) -> Result<Vec<(u64, OwnedFd)>, BoxError> {
        let parked = self.parked.lock().expect("poisoned").take();
        let parked = parked.ok_or("freeze before the loop parked")?;
        self.state = parked.state;
        // The loop left room for the listener: no copy in the freeze.
        let mut sockets = parked.conns;
        sockets.push((LISTENER_ID, parked.listener));
        Ok(sockets)
    }

    fn resume(&mut self, mut sockets: Vec<(u64, OwnedFd)>) -> Result<(), BoxError> {
        let at = sockets.iter().position(|(id, _)| *id == LISTENER_ID);
        let (_, listener) = sockets.swap_remove(at.ok_or("the listener did not come back")?);
        *self.parked.lock().expect("poisoned") = Some(Parked {
            listener,
            conns: sockets,
            state: std::mem::take(&mut self.state),
        });
        Ok(())
    }

    fn released(&mut self) {
        // Called after the commit, once the service address and the held
        // packets went to the destination (`Locked` hands over first). From
        // here this thread only closes the old sockets and, in pre-copy,
        // checksums the frozen memory for the verification: let everything
        // else on this host go first (a destination on the same machine).
        // Not earlier: the handoff decides how long the clients wait.
        if std::env::var_os("LMIG_DEMO_DEBUG").is_some() {
            eprintln!(
                "kvd: handed over at {} ns",
                crate::common::clock::now_mono_ns()
            );
        }
        if self.lowers_priority {
            yield_cpu();
        }
    }
}

/// kvd's connections always move to another network namespace: the
/// originals are closed in the background, off the destination's CPU.
fn net_config() -> lmig_net::NetSourceConfig {
    lmig_net::NetSourceConfig::default().with_close_in_background(true)
}

/// How to migrate.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// The destination kvd's migration address.
    pub target: SocketAddr,
    /// Memory mode.
    pub mode: Mode,
    /// Parallel data streams.
    pub streams: usize,
    /// The pre-shared key.
    pub key: Vec<u8>,
    /// Move the service address too (source side settings).
    pub handoff: Option<HandoffConfig>,
    /// Policy downtime target.
    pub downtime: Duration,
    /// Past this freeze the source aborts and serves on (`None`: no bound).
    pub max_freeze: Option<Duration>,
    /// Bandwidth limit of the pages, bytes/s (0: none); changeable while
    /// the migration runs through its [`SourceControl`].
    pub bandwidth: u64,
}

/// Migrate this kvd to `opts.target`. `Ok`: the destination runs now and this
/// process must exit. `Err`: kvd serves on here (unless the error says the
/// commit went out). `started` gets the session's control (progress,
/// cancel, bandwidth) once connected, before the session runs.
pub fn migrate_out(
    control: &Control,
    regions: &RegionSet,
    dirtier: Option<Dirtier>,
    opts: &MigrateOptions,
    started: impl FnOnce(SourceControl),
    progress: impl Fn(&Event) + Send + Sync,
) -> Result<SourceReport, MigrationError> {
    // An experiment: the source's memory work alone, nothing sent.
    if let Some(mbps) = crate::kvd::dry::dry_rate() {
        let what = crate::kvd::dry::dry_precopy(regions, mbps);
        return Err(backend("dry pre-copy", what));
    }
    let debug = std::env::var_os("LMIG_DEMO_DEBUG").is_some();
    let t = Instant::now();
    let (mut tracker, _choice) = best_tracker(regions).map_err(MigrationError::from)?;
    if debug {
        eprintln!("kvd: tracker ready after {:?}", t.elapsed());
    }
    let config = crate::kvd::security::channel_config(&opts.key)
        .map_err(|e| backend("key", e))?
        .with_data_streams(opts.streams);
    let channel =
        connect(&Endpoint::Tcp(opts.target), config).map_err(|e| backend("connect", e))?;
    crate::kvd::security::record_cipher(channel.cipher());
    if debug {
        eprintln!("kvd: connected after {:?}", t.elapsed());
    }
    let parked = Arc::new(Mutex::new(None));
    let program = KvdProgram {
        control: control.clone(),
        dirtier,
        parked: parked.clone(),
        state: Vec::new(),
    };
    let kvd_loop = KvdLoop {
        control: control.clone(),
        parked,
        state: Vec::new(),
        // Post-copy serves the destination's faults from this thread.
        lowers_priority: opts.mode == Mode::Precopy,
    };
    let sockets = ProgramSockets::new(kvd_loop, net_config());
    // Hybrid switches to post-copy when the rounds cannot converge;
    // pre-copy throttles kvd (auto-converge, harder each round) and freezes
    // when that is not enough.
    let fallback = match opts.mode {
        Mode::Hybrid => Fallback::Postcopy,
        Mode::Precopy => Fallback::Throttle,
        _ => Fallback::Freeze,
    };
    let policy = ConvergencePolicy::new(
        PolicyConfig::default()
            .with_downtime_target(opts.downtime)
            .with_fallback(fallback),
    );
    // The rounds' senders yield the CPU to the loop (LMIG_KVD_YIELD=0: they
    // do not, to compare).
    let yield_to_loop = std::env::var_os("LMIG_KVD_YIELD").is_none_or(|v| v != "0");
    // Post-copy: a parked request for a page already pushed is answered
    // again on the urgent lane instead of waiting behind the push (the
    // copy that comes second is dropped at the destination).
    let config = SourceConfig::default()
        .with_resend_in_flight(true)
        .with_mode(opts.mode)
        .with_max_freeze(opts.max_freeze)
        .with_bandwidth_limit(opts.bandwidth)
        .with_yield_to_program(yield_to_loop)
        .with_idle_lanes(crate::kvd::pace::idle_lanes())
        .with_idle_duty(crate::kvd::pace::idle_duty())
        .with_idle_threads(crate::kvd::pace::idle_threads())
        .with_idle_place(crate::kvd::pace::idle_place())
        .with_push_holdoff(crate::kvd::park::push_holdoff())
        .with_push_holdoff_until_settled(crate::kvd::park::holdoff_until_settled())
        .with_idle_push(crate::kvd::park::idle_push());
    let source = Source::new(&channel, regions, &mut tracker, program)
        .with_policy(policy)
        .with_config(config)
        .with_observer(move |e: &Event| {
            if let Event::Phase { phase, .. } = e {
                if debug {
                    eprintln!(
                        "kvd: {phase:?} at {:?} ({} ns)",
                        t.elapsed(),
                        crate::common::clock::now_mono_ns()
                    );
                }
            }
            progress(e)
        });
    started(source.control());
    match &opts.handoff {
        // Held packets go straight to the destination host (a neighbour on
        // the service link: its migration address).
        Some(h) => {
            let h = h.clone().forward_to(opts.target.ip());
            let mut locked = Locked::new(sockets, h)?;
            let r = source.with_sockets(&mut locked).run();
            if debug {
                eprintln!(
                    "kvd: session returned at {:?}; source handoff {:?}",
                    t.elapsed(),
                    locked.handoff().finish()
                );
            }
            r
        }
        None => source.with_sockets(sockets).run(),
    }
}

/// Lowest CPU priority for the calling thread (Linux nice values are per thread).
fn yield_cpu() {
    let _ = lmig_net::sys::lowest_thread_priority();
}

/// The program seen by the destination session: it checks and keeps the
/// state, handed back with the [`Resumption`] at `Commit`.
#[derive(Default)]
struct KvdState {
    state: Option<ProgramState>,
}

impl StateSink for KvdState {
    fn restore(&mut self, state: ProgramState) -> lmig_core::Result<()> {
        if state.version != STATE_VERSION {
            return Err(MigrationError::invalid(
                "kvd state",
                format!("version {} (this kvd reads {STATE_VERSION})", state.version),
            ));
        }
        decode_state(&state.data).map_err(|e| MigrationError::invalid("kvd state", e))?;
        self.state = Some(state);
        Ok(())
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        // The loop starts from the resumption value.
        Ok(())
    }
    fn discard(&mut self) {
        self.state = None;
    }
}

/// Restored sockets come non-blocking: kvd's loop needs no `ioctl` each.
/// Two restore threads: the restore that outlasts the source's capture
/// uses both cores (migrate --conns 10000: wait for Ready after the
/// handover 46 -> 22 ms, freeze 165 -> 152 ms, median of 5 alternating).
fn sink_config() -> SinkConfig {
    // Never-sent bytes are written after the commit (the server honours the
    // gate: `Server::set_unsent`).
    SinkConfig::default()
        .with_nonblocking(true)
        .with_threads(2)
        .with_unsent_in_background(true)
}

/// What the destination tells its operator, as it happens.
pub trait ReceiveLog: Send + Sync {
    /// Listening for migrations on the address.
    fn waiting(&self);
    /// A connection was refused before authentication (it cost nothing else).
    fn refused(&self, peer: &str, reason: &str);
    /// The session reached a phase (`Frozen` from the first socket record on).
    fn phase(&self, _phase: Phase) {}
    /// An attempt ended: a report, or an error (then, before `Commit`,
    /// everything it brought was discarded and kvd waits for the next one).
    fn report(&self, r: &Result<DestinationReport, MigrationError>);
    /// The loop serves; `registered_before_commit` sockets had joined its
    /// poller before `Commit` (as `NetSink::on_register` announced them).
    fn serving(&self, at: Instant, registered_before_commit: u64);
    /// After `Commit`: the source was lost with `missing_pages` pages still
    /// missing; post-copy is paused (requests touching the store are refused).
    fn postcopy_paused(&self, _missing_pages: u64, _reason: &str) {}
    /// A source came back after a pause: post-copy goes on.
    fn postcopy_resumed(&self, _missing_pages: u64, _paused_for: Duration) {}
    /// The migration arrived and kvd is about to serve it: its loop and
    /// its memory (which lives as long as the process), e.g. for an admin
    /// socket that can migrate it on.
    fn took_over(&self, _served: Served) {}
    /// The serving loop ended (kvd migrated on, at its `Commit`): return
    /// once that migration is over (the process then ends).
    fn serving_ended(&self) {}
}

/// A destination kvd serving what arrived ([`ReceiveLog::took_over`]).
pub struct Served {
    /// The serving loop's control.
    pub control: Control,
    /// kvd's memory, for as long as the process lives.
    pub regions: &'static RegionSet,
}

/// Fault injection for tests of the failure paths: with
/// `KVD_DIE_IN_FREEZE_US=<µs>`, a destination kills itself (`SIGKILL`, as
/// `kill -9` from outside would) that long after the freeze reaches it (its
/// first socket record), and at the latest just before it sends `Ready`: a
/// destination lost in the freeze, before `Commit`, whatever the delay.
pub const DIE_IN_FREEZE_ENV: &str = "KVD_DIE_IN_FREEZE_US";

/// The observer that runs [`DIE_IN_FREEZE_ENV`] and reports phases.
#[derive(Clone)]
struct DestinationWatch {
    log: Arc<dyn ReceiveLog>,
    die_after: Option<Duration>,
    /// The attempt's poller, told when `Commit` happened.
    early: Option<Arc<EarlyPoller>>,
}

/// The destination loop's poller, filled as the sink makes the sockets
/// (`NetSink::on_register`, on the session's thread): the connections
/// `prepare` makes right after it, before the freeze (the restore fills
/// those very sockets), and the sockets made in the freeze (the listener)
/// as activation starts. At `Commit` the loop serves at once, with no
/// `epoll_ctl` per connection (docs/traps.md, "Edge-triggered readiness").
struct EarlyPoller {
    poller: Mutex<Option<Preregistered>>,
    /// The session passed `Commit` (its `Committed` phase, which comes
    /// before activation on the same thread).
    committed: AtomicBool,
    /// Sockets registered before `Commit`.
    before_commit: AtomicU64,
}

impl EarlyPoller {
    fn new() -> std::io::Result<Arc<Self>> {
        // Restored sockets come non-blocking (`sink_config`).
        let pre = Server::preregister(&[], sink_config().nonblocking)?;
        Ok(Arc::new(Self {
            poller: Mutex::new(Some(pre)),
            committed: AtomicBool::new(false),
            before_commit: AtomicU64::new(0),
        }))
    }

    /// Have `net` register every socket it makes with this poller.
    fn attach(self: &Arc<Self>, net: &mut NetSink) {
        let early = self.clone();
        net.on_register(move |v| {
            let mut poller = early.poller.lock().expect("poisoned");
            if let Some(pre) = poller.as_mut() {
                pre.register(&[(v.id, v.fd.as_raw_fd())]);
                if !early.committed.load(Ordering::Acquire) {
                    early.before_commit.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    /// The poller, for the loop (once).
    fn take(&self) -> Option<Preregistered> {
        self.poller.lock().expect("poisoned").take()
    }
}

fn die_now() -> ! {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

impl lmig_core::traits::Observer for DestinationWatch {
    fn event(&self, e: &Event) {
        let phase = match e {
            Event::Phase { phase, .. } => {
                if let (Phase::Committed, Some(early)) = (phase, &self.early) {
                    early.committed.store(true, Ordering::Release);
                }
                phase
            }
            Event::PostcopyPaused {
                missing_pages,
                reason,
                ..
            } => {
                POSTCOPY_PAUSED.store(*missing_pages, Ordering::Release);
                return self.log.postcopy_paused(*missing_pages, reason);
            }
            Event::PostcopyResumed {
                missing_pages,
                paused_for,
            } => {
                POSTCOPY_PAUSED.store(0, Ordering::Release);
                return self.log.postcopy_resumed(*missing_pages, *paused_for);
            }
            _ => return,
        };
        self.log.phase(*phase);
        match (phase, self.die_after) {
            (Phase::Frozen, Some(after)) => {
                std::thread::spawn(move || {
                    std::thread::sleep(after);
                    die_now()
                });
            }
            // Never later than this: after `Ready` the source may commit.
            (Phase::AwaitReady, Some(_)) => die_now(),
            _ => {}
        }
    }
}

/// Wait for migrations on `listen` until one commits, then serve what
/// arrived until this process is stopped. A connection that fails its
/// handshake is refused (and logged) and the listener waits on; an attempt
/// that fails before `Commit` is discarded and the next one awaited.
pub fn receive(
    listen: SocketAddr,
    key: &[u8],
    handoff: Option<HandoffConfig>,
    log: Arc<dyn ReceiveLog>,
) -> Result<(), Box<dyn std::error::Error>> {
    let die_after = std::env::var(DIE_IN_FREEZE_ENV)
        .ok()
        .map(|v| v.parse().map(Duration::from_micros))
        .transpose()
        .map_err(|e| format!("{DIE_IN_FREEZE_ENV}: {e}"))?;
    let refused = log.clone();
    let config = crate::kvd::security::channel_config(key)?
        .on_reject(move |r: &Rejection| refused.refused(&r.peer, &r.error.to_string()));
    let listener = Listener::bind(&Endpoint::Tcp(listen), config)?;
    log.waiting();
    let watch = DestinationWatch {
        log,
        die_after,
        early: None,
    };
    // Bounded by the operator: each attempt is an authenticated source's.
    loop {
        let channel = listener.accept()?;
        if let Some(served) = attempt(channel, handoff.clone(), &watch) {
            return served;
        }
        watch.log.waiting();
    }
}

/// One incoming migration: `None` if it failed before `Commit` (everything
/// it brought is discarded), else how serving ended.
fn attempt(
    channel: StreamChannel,
    handoff: Option<HandoffConfig>,
    watch: &DestinationWatch,
) -> Option<Result<(), Box<dyn std::error::Error>>> {
    let memory = Arc::new(DestinationRegions::new(Backing::Private).prefault(false));
    let mut net = match NetSink::new(sink_config()) {
        Ok(n) => n,
        Err(e) => return Some(Err(e.into())),
    };
    let early = match EarlyPoller::new() {
        Ok(p) => p,
        Err(e) => return Some(Err(e.into())),
    };
    early.attach(&mut net);
    let unsent = net.unsent_tails();
    let watch = DestinationWatch {
        early: Some(early.clone()),
        ..watch.clone()
    };
    let dest = Destination::new(channel, memory, KvdState::default())
        .with_config(
            DestinationConfig::default().with_idle_receive(crate::kvd::pace::idle_receive()),
        )
        .with_observer(watch.clone());
    let log = watch.log.clone();
    match handoff {
        Some(h) => match Handoff::new(net, h) {
            Ok(sink) => resume(dest.with_sockets(sink), log, (&early, unsent), |h| {
                debug_figures(&format!("{:?}", h.handoff().stats()));
                h.inner_mut().take_fds()
            }),
            Err(e) => {
                log.report(&Err(e.into()));
                None
            }
        },
        None => resume(dest.with_sockets(net), log, (&early, unsent), |n| {
            debug_figures("");
            n.take_fds()
        }),
    }
}

/// What the destination session is, for kvd.
type KvdDestination<K> = Destination<'static, StreamChannel, Arc<DestinationRegions>, KvdState, K>;

/// Run the migration to `Commit`, then serve what it hands over (the
/// report is logged when the migration ends, behind the serving loop).
/// `None` if it failed before `Commit`.
fn resume<K: SocketSink + 'static>(
    dest: KvdDestination<K>,
    log: Arc<dyn ReceiveLog>,
    (early, unsent): (&EarlyPoller, Option<lmig_net::UnsentTails>),
    take_fds: impl FnOnce(&mut K) -> HashMap<u64, OwnedFd>,
) -> Option<Result<(), Box<dyn std::error::Error>>> {
    let t = Instant::now();
    let mut resumed = match dest.start() {
        Ok(r) => r,
        Err(e) => {
            log.report(&Err(e));
            return None;
        }
    };
    if debug() {
        eprintln!("kvd: resumed {:?} after the session began", t.elapsed());
    }
    let fds = take_fds(&mut resumed.sockets);
    let state = resumed.program.state.take();
    let Resumption {
        memory,
        after_commit,
        residency,
        ..
    } = resumed;
    // kvd serves this memory until the process ends (or migrates it on,
    // and then ends): it lives as long as the process.
    let memory: &'static Arc<DestinationRegions> = Box::leak(Box::new(memory));
    let reporter = match Reporter::spawn(after_commit, log.clone()) {
        Ok(r) => r,
        Err(e) => return Some(Err(e.into())),
    };
    let registered = early.before_commit.load(Ordering::Relaxed);
    let served = match (state, early.take()) {
        (Some(state), Some(pre)) => serve(
            state,
            memory.as_ref(),
            residency,
            fds,
            (pre, registered, unsent),
            &*log,
        ),
        (_, None) => Err("the early poller was taken already".into()),
        (None, _) => Err("resumed without the program's state".into()),
    };
    // Serving ends when the process is stopped; a failure to start it
    // still waits for the migration to finish (its pages are the memory).
    reporter.join();
    Some(served)
}

fn debug() -> bool {
    std::env::var_os("LMIG_DEMO_DEBUG").is_some()
}

fn debug_figures(figures: &str) {
    if debug() {
        eprintln!("kvd: sockets activated {figures}");
    }
}

/// The thread logging the destination's report once the migration ended
/// behind the serving loop (post-copy pages, the digest check, `Done`).
struct Reporter {
    thread: std::thread::JoinHandle<()>,
}

impl Reporter {
    fn spawn(
        after_commit: AfterCommit<'static>,
        log: Arc<dyn ReceiveLog>,
    ) -> std::io::Result<Self> {
        let thread = std::thread::Builder::new()
            .name("kvd-report".into())
            .spawn(move || log.report(&after_commit.join()))?;
        Ok(Self { thread })
    }

    fn join(self) {
        let _ = self.thread.join();
    }
}

/// Serve the program resumed at `Commit` with the sockets the session
/// handed over, on the poller they joined as the sink made them (and how
/// many joined before `Commit`).
fn serve(
    state: ProgramState,
    memory: &'static DestinationRegions,
    residency: Option<Arc<dyn lmig_core::PageResidency>>,
    mut fds: HashMap<u64, OwnedFd>,
    (pre, registered_before_commit, unsent): (Preregistered, u64, Option<lmig_net::UnsentTails>),
    log: &dyn ReceiveLog,
) -> Result<(), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let conns = decode_state(&state.data)?;
    let listener = fds
        .remove(&LISTENER_ID)
        .ok_or("the listening socket did not arrive")?;
    let mut restored = Vec::with_capacity(conns.len());
    for (id, rbuf, wbuf) in conns {
        // No socket: the client reset the connection before the capture
        // (lmig-net left it out); it is closed here too.
        let Some(fd) = fds.remove(&id) else { continue };
        restored.push((id, std::net::TcpStream::from(fd), rbuf, wbuf));
    }
    let regions = memory.regions().ok_or("no regions arrived")?;
    let store = Store::open(regions.get(STORE_REGION)?).map_err(|e| e.to_string())?;
    let mut server = Server::with_poller(pre, std::net::TcpListener::from(listener), restored)?;
    // Post-copy: a request whose key is not here yet waits, parked, while
    // the loop serves the others.
    if let Some(residency) = residency {
        server.set_residency(residency, STORE_REGION)?;
    }
    if let Some(gate) = unsent {
        server.set_unsent(gate)?;
    }
    if debug() {
        eprintln!("kvd: server built in {:?}", t.elapsed());
    }
    log.took_over(Served {
        control: server.control(),
        regions,
    });
    log.serving(Instant::now(), registered_before_commit);
    server.run(&store)?;
    log.serving_ended();
    Ok(())
}
