//! tokiod migrating itself, on lmig's public API: the program side of the
//! source session ([`StateSource`] over the service, [`SocketOwner`] over
//! its sockets) and [`migrate_out`]; on the destination [`receive`], which
//! turns the [`Resumption`]'s restored sockets into tasks at `Commit`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmig_core::model::ProgramState;
use lmig_core::policy::{ConvergencePolicy, Fallback, PolicyConfig};
use lmig_core::session::{
    AfterCommit, Destination, DestinationReport, Mode, Resumption, Source, SourceConfig,
    SourceReport,
};
use lmig_core::traits::{Event, Observer, Phase};
use lmig_core::{BoxError, MigrationError, SocketSink, StateSink, StateSource};
use lmig_mem::{Backing, DestinationRegions, RegionSet, best_tracker};
use lmig_net::{
    HandoffConfig, HandoffSink, HandoffSource, NetSink, ProgramSockets, RestoredSocket, SinkConfig,
    SocketOwner,
};
use lmig_transport::{Endpoint, Listener, Rejection, StreamChannel, connect};

use super::dirtier::DirtierControl;
use super::service::{Control, LISTENER_ID, Memory, Parked, ParkedConn};
use super::state::{self, ConnBuffers};
use crate::kvd::migrate::DIE_IN_FREEZE_ENV;
use crate::kvd::security;

/// Version of tokiod's program-state format.
pub const STATE_VERSION: u32 = 1;

fn backend(what: &'static str, e: impl Into<BoxError>) -> MigrationError {
    MigrationError::backend(what, e)
}

/// Where the parked service waits between the program's pause and the
/// socket hand-over, and again between an abort and the program's resume.
type Slot = Arc<Mutex<Option<Parked>>>;

/// The program seen by the source session: its pause parks the service.
struct Program {
    control: Control,
    dirtier: Option<DirtierControl>,
    parked: Slot,
    state: Vec<u8>,
}

impl StateSource for Program {
    fn pause(&mut self) -> lmig_core::Result<()> {
        // The dirtier stops while the service parks (both are in the freeze).
        // A failed pause is undone by `resume` (the session calls it).
        if let Some(d) = &self.dirtier {
            d.request_pause();
        }
        let parked = self
            .control
            .park()
            .map_err(|e| backend("tokiod service", e))?;
        self.state = state::encode(parked.conns.iter().map(|c| &c.buffers));
        *self.parked.lock().expect("poisoned") = Some(parked);
        match &self.dirtier {
            Some(d) => d.wait_paused().map_err(|e| backend("tokiod dirtier", e)),
            None => Ok(()),
        }
    }

    fn capture(&mut self) -> lmig_core::Result<ProgramState> {
        Ok(ProgramState::new(
            STATE_VERSION,
            std::mem::take(&mut self.state),
        ))
    }

    fn resume(&mut self) -> lmig_core::Result<()> {
        // The sockets are back in the slot (the socket side put them there
        // at the abort, or they never left it).
        if let Some(d) = &self.dirtier {
            d.resume();
        }
        let parked = self.parked.lock().expect("poisoned").take();
        // None: the park failed (a park that timed out serves on by itself).
        let parked = parked.ok_or_else(|| backend("tokiod", "the sockets did not come back"))?;
        self.control
            .resume(parked)
            .map_err(|e| backend("tokiod service", e))
    }

    fn throttle(&mut self, percent: u8) -> bool {
        match &self.dirtier {
            Some(d) => {
                d.throttle(percent);
                true
            }
            None => false,
        }
    }

    fn committed(&mut self) {
        if let Some(d) = &self.dirtier {
            d.stop();
        }
    }
}

/// The service's sockets as lmig-net's [`SocketOwner`]: the program's
/// pause parked the service; the freeze takes the sockets from the slot
/// (keeping their buffers) and an abort puts them back with their buffers.
struct Sockets {
    control: Control,
    parked: Slot,
    /// The parked connections' buffers while their sockets are handed over.
    buffers: HashMap<u64, ConnBuffers>,
}

impl SocketOwner for Sockets {
    fn lend(&mut self, show: &mut dyn FnMut(u64, BorrowedFd<'_>)) -> Result<(), BoxError> {
        // The program's `park` only hands over what its pause parked: park
        // and resume the service here (each socket leaves the runtime and
        // is adopted again, with its buffers).
        let parked = self.control.park()?;
        show(LISTENER_ID, parked.listener.as_fd());
        for c in &parked.conns {
            show(c.buffers.id, c.fd.as_fd());
        }
        Ok(self.control.resume(parked)?)
    }

    fn park(&mut self) -> Result<Vec<(u64, OwnedFd)>, BoxError> {
        let parked = self.parked.lock().expect("poisoned").take();
        let parked = parked.ok_or("the freeze came before the service parked")?;
        let mut sockets = Vec::with_capacity(parked.conns.len() + 1);
        self.buffers.clear();
        for c in parked.conns {
            sockets.push((c.buffers.id, c.fd));
            self.buffers.insert(c.buffers.id, c.buffers);
        }
        sockets.push((LISTENER_ID, parked.listener));
        Ok(sockets)
    }

    fn resume(&mut self, sockets: Vec<(u64, OwnedFd)>) -> Result<(), BoxError> {
        let mut listener = None;
        let mut conns = Vec::with_capacity(sockets.len());
        for (id, fd) in sockets {
            if id == LISTENER_ID {
                listener = Some(fd);
                continue;
            }
            let buffers = self.buffers.remove(&id).unwrap_or(ConnBuffers {
                id,
                ..ConnBuffers::default()
            });
            conns.push(ParkedConn { fd, buffers });
        }
        let listener = listener.ok_or("the listener did not come back")?;
        *self.parked.lock().expect("poisoned") = Some(Parked { listener, conns });
        Ok(())
    }
}

/// How to migrate.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// The destination's migration address.
    pub target: SocketAddr,
    /// Memory mode.
    pub mode: Mode,
    /// Parallel data streams.
    pub streams: usize,
    /// The pre-shared key.
    pub key: Vec<u8>,
    /// Move the service address too.
    pub handoff: Option<HandoffConfig>,
    /// Policy downtime target.
    pub downtime: Duration,
    /// Past this freeze the source aborts and serves on.
    pub max_freeze: Option<Duration>,
}

/// Migrate this tokiod to `opts.target`. `Ok`: the destination serves now
/// and this process must end. `Err`: the service serves on here (unless
/// the error says the commit went out).
pub fn migrate_out(
    control: &Control,
    regions: &RegionSet,
    dirtier: Option<DirtierControl>,
    opts: &MigrateOptions,
    progress: impl Fn(&Event) + Send + Sync,
) -> Result<SourceReport, MigrationError> {
    let (mut tracker, _choice) = best_tracker(regions).map_err(MigrationError::from)?;
    let config = security::channel_config(&opts.key)
        .map_err(|e| backend("key", e))?
        .with_data_streams(opts.streams);
    let channel =
        connect(&Endpoint::Tcp(opts.target), config).map_err(|e| backend("connect", e))?;
    security::record_cipher(channel.cipher());
    let parked = Slot::default();
    let program = Program {
        control: control.clone(),
        dirtier,
        parked: parked.clone(),
        state: Vec::new(),
    };
    let owner = Sockets {
        control: control.clone(),
        parked,
        buffers: HashMap::new(),
    };
    // The connections move to another network namespace: close the
    // originals off the destination's CPU.
    let net = lmig_net::NetSourceConfig::default().with_close_in_background(true);
    let sockets = ProgramSockets::new(owner, net);
    let policy = ConvergencePolicy::new(
        PolicyConfig::default()
            .with_downtime_target(opts.downtime)
            .with_fallback(match opts.mode {
                Mode::Hybrid => Fallback::Postcopy,
                _ => Fallback::Freeze,
            }),
    );
    let config = SourceConfig::default()
        .with_mode(opts.mode)
        .with_max_freeze(opts.max_freeze);
    let source = Source::new(&channel, regions, &mut tracker, program)
        .with_policy(policy)
        .with_config(config)
        .with_observer(progress);
    match &opts.handoff {
        // Held packets go straight to the destination host.
        Some(h) => {
            let h = h.clone().forward_to(opts.target.ip());
            let mut locked = HandoffSource::new(sockets, h)?;
            source.with_sockets(&mut locked).run()
        }
        None => source.with_sockets(sockets).run(),
    }
}

/// The program seen by the destination session: it checks and keeps the
/// state, handed back with the [`Resumption`] at `Commit`.
#[derive(Default)]
struct ArrivingState {
    conns: Option<Vec<ConnBuffers>>,
}

impl StateSink for ArrivingState {
    fn restore(&mut self, state: ProgramState) -> lmig_core::Result<()> {
        if state.version != STATE_VERSION {
            return Err(MigrationError::invalid(
                "tokiod state",
                format!(
                    "version {} (this tokiod reads {STATE_VERSION})",
                    state.version
                ),
            ));
        }
        let conns =
            state::decode(&state.data).map_err(|e| MigrationError::invalid("tokiod state", e))?;
        self.conns = Some(conns);
        Ok(())
    }

    fn resume(&mut self) -> lmig_core::Result<()> {
        // The service starts from the resumption value.
        Ok(())
    }

    fn discard(&mut self) {
        self.conns = None;
    }
}

/// What the destination tells its operator, as it happens.
pub trait ReceiveLog: Send + Sync {
    /// Listening for migrations.
    fn waiting(&self);
    /// A connection was refused before authentication.
    fn refused(&self, peer: &str, reason: &str);
    /// The freeze reached this side (its first socket record).
    fn frozen(&self);
    /// An attempt ended: its report or its error (before `Commit`,
    /// everything it brought was discarded and the next one is awaited).
    fn report(&self, r: &Result<DestinationReport, MigrationError>);
    /// The service serves here.
    fn serving(&self);
}

/// The destination's observer: logs the freeze, and runs the scenario's
/// fault injection ([`DIE_IN_FREEZE_ENV`], as kvd does): killed (`SIGKILL`)
/// that long after the freeze reached it, before `Ready` at the latest.
#[derive(Clone)]
struct Watch {
    log: Arc<dyn ReceiveLog>,
    die_after: Option<Duration>,
}

fn die_now() -> ! {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

impl Observer for Watch {
    fn event(&self, e: &Event) {
        let Event::Phase { phase, .. } = e else {
            return;
        };
        match (phase, self.die_after) {
            (Phase::Frozen, die_after) => {
                self.log.frozen();
                if let Some(after) = die_after {
                    std::thread::spawn(move || {
                        std::thread::sleep(after);
                        die_now()
                    });
                }
            }
            // Never later than this: after `Ready` the source may commit.
            (Phase::AwaitReady, Some(_)) => die_now(),
            _ => {}
        }
    }
}

/// Restored sockets come non-blocking (tokio adopts them as they are);
/// two restore threads, as kvd's.
fn sink_config() -> SinkConfig {
    SinkConfig::default().with_nonblocking(true).with_threads(2)
}

/// Wait for migrations on `listen` until one commits, then serve what it
/// brought on `runtime` (through `start`, which makes the service's
/// [`Control`] over the memory that arrived). A refused connection or an
/// attempt that fails before `Commit` costs nothing: the next is awaited.
/// Returns the reporter of the committed migration; the caller keeps the
/// runtime running.
pub fn receive(
    listen: SocketAddr,
    key: &[u8],
    handoff: Option<HandoffConfig>,
    log: Arc<dyn ReceiveLog>,
    start: impl Fn(Memory) -> Control,
) -> Result<Reporter, BoxError> {
    let die_after = std::env::var(DIE_IN_FREEZE_ENV)
        .ok()
        .map(|v| v.parse().map(Duration::from_micros))
        .transpose()
        .map_err(|e| format!("{DIE_IN_FREEZE_ENV}: {e}"))?;
    let refused = log.clone();
    let config = security::channel_config(key)?
        .on_reject(move |r: &Rejection| refused.refused(&r.peer, &r.error.to_string()));
    let listener = Listener::bind(&Endpoint::Tcp(listen), config)?;
    log.waiting();
    // Bounded by the operator: each attempt is an authenticated source's.
    loop {
        let channel = listener.accept()?;
        let watch = Watch {
            log: log.clone(),
            die_after,
        };
        if let Some(served) = attempt(channel, handoff.clone(), watch, &start) {
            return served;
        }
        log.waiting();
    }
}

/// What the destination session is, for tokiod.
type Incoming<K> = Destination<'static, StreamChannel, Arc<DestinationRegions>, ArrivingState, K>;

/// One incoming migration: `None` if it failed before `Commit`.
fn attempt(
    channel: StreamChannel,
    handoff: Option<HandoffConfig>,
    watch: Watch,
    start: &dyn Fn(Memory) -> Control,
) -> Option<Result<Reporter, BoxError>> {
    let log = &watch.log.clone();
    let memory = Arc::new(DestinationRegions::new(Backing::Private).prefault(false));
    let net = match NetSink::new(sink_config()) {
        Ok(n) => n,
        Err(e) => return Some(Err(e.into())),
    };
    let dest = Destination::new(channel, memory, ArrivingState::default()).with_observer(watch);
    match handoff {
        Some(h) => match HandoffSink::new(net, h) {
            Ok(sink) => commit(dest.with_sockets(sink), log, start, |h| {
                h.inner_mut().take_restored()
            }),
            Err(e) => {
                log.report(&Err(e.into()));
                None
            }
        },
        None => commit(dest.with_sockets(net), log, start, NetSink::take_restored),
    }
}

/// Run the migration to `Commit`, then start the service with what it
/// handed over. `None` if it failed before `Commit`.
fn commit<K: SocketSink + 'static>(
    dest: Incoming<K>,
    log: &Arc<dyn ReceiveLog>,
    start: &dyn Fn(Memory) -> Control,
    take: impl FnOnce(&mut K) -> HashMap<u64, RestoredSocket>,
) -> Option<Result<Reporter, BoxError>> {
    let mut resumed = match dest.start() {
        Ok(r) => r,
        Err(e) => {
            log.report(&Err(e));
            return None;
        }
    };
    let sockets = take(&mut resumed.sockets);
    let conns = resumed.program.conns.take();
    let Resumption {
        memory,
        after_commit,
        ..
    } = resumed;
    let reporter = match Reporter::spawn(after_commit, log.clone()) {
        Ok(r) => r,
        Err(e) => return Some(Err(e.into())),
    };
    let served = conns
        .ok_or_else(|| "resumed without the program's state".to_string())
        .and_then(|conns| serve(start(Memory::Arrived(memory)), sockets, conns));
    Some(match served {
        Ok(()) => {
            log.serving();
            Ok(reporter)
        }
        // Nothing serves: still wait for the migration's end (its pages
        // are the memory) before the caller gives up.
        Err(e) => {
            reporter.join();
            Err(e.into())
        }
    })
}

/// Start the service with the restored sockets and their buffers.
fn serve(
    control: Control,
    mut sockets: HashMap<u64, RestoredSocket>,
    conns: Vec<ConnBuffers>,
) -> Result<(), String> {
    let listener = sockets
        .remove(&LISTENER_ID)
        .and_then(RestoredSocket::into_listener)
        .ok_or("the listening socket did not arrive")?;
    let conns = conns
        .into_iter()
        // No socket: the client reset it before the capture (lmig-net left
        // it out); its buffers go too.
        .filter_map(|b| Some((sockets.remove(&b.id)?.into_tcp()?, b)))
        .collect();
    control.start(listener, conns)
}

/// The thread logging the destination's report once the migration ended
/// behind the service (post-copy pages, the digest check, `Done`).
pub struct Reporter {
    thread: std::thread::JoinHandle<()>,
}

impl Reporter {
    fn spawn(
        after_commit: AfterCommit<'static>,
        log: Arc<dyn ReceiveLog>,
    ) -> std::io::Result<Self> {
        let thread = std::thread::Builder::new()
            .name("tokiod-report".into())
            .spawn(move || log.report(&after_commit.join()))?;
        Ok(Self { thread })
    }

    /// Wait until the report is logged.
    pub fn join(self) {
        let _ = self.thread.join();
    }
}
