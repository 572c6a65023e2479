//! The source side of the handoff ([`SourceHandoff`]) and the
//! [`SocketSource`] adapter that puts it around a source ([`HandoffSource`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lmig_core::model::{SocketPrep, SocketRecord};
use lmig_core::traits::SocketSource;

use super::addr::{if_index, remove_address_with, resolve_neighbour, route_socket};
use super::config::{HandoffConfig, HandoffStats};
use super::reinject::Reinjector;
use super::release::{Released, Releaser};
use crate::error::{NetError, Result};
use crate::lock::{InOrder, NetLock, SETTLE};
use crate::sys::netlink::NlSocket;

/// The source side of the handoff: the lock, and after `Commit` the address
/// removal and the forwarding of held packets.
#[derive(Debug)]
pub struct SourceHandoff {
    cfg: HandoffConfig,
    ifindex: u32,
    route: NlSocket,
    lock: Option<NetLock>,
    reinject: Option<Reinjector>,
    stats: Arc<Mutex<HandoffStats>>,
    forwarder: Option<Forwarder>,
    /// During the freeze: the thread forwarding copies early (it holds the
    /// lock and the re-injector until stopped).
    early: Option<EarlyForwarder>,
    /// After an abort that found a socket full: the release going on while
    /// the program reads.
    releaser: Option<Releaser>,
}

/// Sends copies of held packets on as they arrive, originals kept.
#[derive(Debug)]
struct EarlyForwarder {
    stop: Arc<AtomicBool>,
    /// Gives back the lock, the re-injector, how many of the lock's held
    /// packets were sent on (a prefix), and how many sends failed.
    thread: JoinHandle<(NetLock, Reinjector, usize, u64)>,
}

impl EarlyForwarder {
    /// Start the thread `lmig-handoff-early` on the engaged `lock`.
    fn spawn(lock: NetLock, reinject: Reinjector) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("lmig-handoff-early".into())
            .spawn(move || forward_copies(lock, reinject, &stopped))
            .map_err(|e| NetError::sys("spawn", "handoff early forwarder", e))?;
        Ok(Self { stop, thread })
    }

    /// Stop the thread and take back what it held (`None`: it panicked).
    fn join(self) -> Option<(NetLock, Reinjector, usize, u64)> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().ok()
    }
}

/// The early forwarder's loop: send copies of what the lock holds on as
/// they arrive, until `stop`.
fn forward_copies(
    mut lock: NetLock,
    reinject: Reinjector,
    stop: &AtomicBool,
) -> (NetLock, Reinjector, usize, u64) {
    let (mut sent, mut failed) = (0usize, 0u64);
    // Bounded by the session: `stop` is set at the handoff or the
    // abort, which follow the freeze.
    while !stop.load(Ordering::Acquire) {
        if lock.collect_for(EARLY_STEP).is_err() {
            break;
        }
        let held = lock.held();
        if held.len() > sent {
            failed += reinject.send_all(&held[sent..]);
            sent = held.len();
        }
    }
    (lock, reinject, sent, failed)
}

/// How long the early forwarder waits for packets before it looks at its
/// stop flag again (the handoff waits at most this long for it).
const EARLY_STEP: Duration = Duration::from_micros(500);

impl SourceHandoff {
    /// Install the lock (disengaged) and open the re-injection sockets. Run
    /// before the freeze: an error here changes nothing and the program keeps
    /// serving. Leftover lock tables of crashed runs are removed.
    pub fn new(cfg: HandoffConfig) -> Result<Self> {
        let ifindex = if_index(&cfg.interface)?;
        let route = route_socket()?;
        let lock = NetLock::install(cfg.lock_config(true))?;
        let mut reinject = Reinjector::new()?;
        let mut stats = HandoffStats::default();
        if let Some(host) = cfg.forward_to {
            // Unresolvable (another link, no answer): routed, as without it.
            if let Ok(Some(mac)) = resolve_neighbour(ifindex, host, Duration::from_secs(1)) {
                reinject = reinject.direct(ifindex, mac)?;
                stats.forwarded_direct = true;
            }
        }
        Ok(Self {
            cfg,
            ifindex,
            route,
            lock: Some(lock),
            reinject: Some(reinject),
            stats: Arc::new(Mutex::new(stats)),
            forwarder: None,
            early: None,
            releaser: None,
        })
    }

    /// The lock (for its table name and queue number).
    pub fn lock_ref(&self) -> Option<&NetLock> {
        self.lock.as_ref()
    }

    /// At the freeze: hold every packet sent to the service addresses.
    pub fn lock(&mut self) -> Result<()> {
        let lock = self.lock.as_mut().ok_or(NetError::Phase {
            op: "lock",
            detail: "the handoff already happened or was aborted",
        })?;
        let t = Instant::now();
        lock.engage()?;
        debug!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            "handoff: the network lock holds the service addresses' packets"
        );
        self.stats.lock().map(|mut s| s.lock = t.elapsed()).ok();
        let direct = self
            .stats
            .lock()
            .map(|s| s.forwarded_direct)
            .unwrap_or(false);
        if direct && self.cfg.forward_early {
            if let (Some(lock), Some(reinject)) = (self.lock.take(), self.reinject.take()) {
                self.early = Some(EarlyForwarder::spawn(lock, reinject)?);
            }
        }
        Ok(())
    }

    /// Stop the early forwarder (if any): the lock and the re-injector come
    /// back; returns how many held packets it sent on.
    fn stop_early(&mut self) -> usize {
        let Some(early) = self.early.take() else {
            return 0;
        };
        match early.join() {
            Some((lock, reinject, sent, failed)) => {
                self.lock = Some(lock);
                self.reinject = Some(reinject);
                if let Ok(mut s) = self.stats.lock() {
                    s.dropped += failed;
                }
                sent
            }
            // The thread panicked with the lock: its table goes with this
            // process (owner flag); nothing is left to hand over.
            None => 0,
        }
    }

    /// Before `Commit` only: let held packets continue here and remove the lock.
    /// (Copies sent on early are held by the destination's lock, which drops
    /// them when the destination gives up.)
    ///
    /// Held packets go in arrival order, each batch only as far as the UDP
    /// sockets they go to have room ([`InOrder`]). What fits now goes
    /// before this returns; the stragglers' settle time and the table's
    /// removal follow on a thread (`lmig-handoff-unlock`), and so does the
    /// rest of the release if a socket is full (a long freeze), as the
    /// program, resumed after the abort, reads (at most
    /// [`HandoffConfig::release_limit`]; joined by [`finish`](Self::finish)
    /// or `Drop`).
    pub fn unlock(&mut self) -> Result<()> {
        self.stop_early();
        let Some(mut lock) = self.lock.take() else {
            return Ok(());
        };
        let mut paced = InOrder::new(self.cfg.release_limit);
        // What fits goes on now; the stragglers' settle time and the
        // table's removal (and, if a socket was full, the rest of the
        // release) go on behind, so that the program the abort resumes does
        // not wait for them.
        let delivered = paced.deliver(&mut lock)?;
        info!(
            all_delivered = delivered,
            "handoff aborted: held packets continue here, the lock goes"
        );
        self.releaser = Some(Releaser::spawn(lock, paced, !delivered)?);
        Ok(())
    }

    /// Add what an unlock measured to the figures.
    fn count(&self, r: Released) {
        if let Ok(mut s) = self.stats.lock() {
            s.unlock = r.unlock;
            s.release = r.release;
            s.held += r.held;
            s.dropped += r.dropped;
        }
    }

    /// After `Commit` (sockets closed): remove the addresses, re-inject every
    /// held packet towards the destination and keep forwarding what still
    /// arrives on a background thread until [`HandoffConfig::quiet`].
    pub fn hand_over(&mut self) -> Result<()> {
        let sent_early = self.stop_early();
        let (Some(mut lock), Some(reinject)) = (self.lock.take(), self.reinject.take()) else {
            return Err(NetError::Phase {
                op: "hand over",
                detail: "the handoff already happened or was aborted",
            });
        };
        let direct = reinject.is_direct();
        let mut first_err = None;
        let mut remove_addresses = |route: &mut NlSocket| {
            let t = Instant::now();
            for a in &self.cfg.addrs {
                if let Err(e) = remove_address_with(route, self.ifindex, a) {
                    first_err.get_or_insert(e);
                }
            }
            t.elapsed()
        };
        // Routed re-injection needs the address gone first (or the packets
        // come back here); sent straight to the destination's link-layer
        // address they need not wait for it.
        let mut moved = Duration::ZERO;
        if !direct {
            moved = remove_addresses(&mut self.route);
        }
        let t = Instant::now();
        // Every original is dropped here; the copies sent early are at the
        // destination already.
        let held = lock.take_held()?;
        let failed = reinject.send_all(held.get(sent_early..).unwrap_or_default());
        let forward = t.elapsed();
        if direct {
            moved = remove_addresses(&mut self.route);
        }
        if let Ok(mut s) = self.stats.lock() {
            s.forward = forward;
            s.address_move = moved;
            s.held += held.len() as u64;
            s.forwarded_early += sent_early.min(held.len()) as u64;
            s.dropped += failed;
        }
        info!(
            held = held.len(),
            failed = failed,
            direct = direct,
            forward_ms = forward.as_secs_f64() * 1e3,
            "handoff: addresses removed, held packets sent on to the destination"
        );
        if let Some(e) = &first_err {
            warn!(error = %e, "handoff: removing a service address failed");
        }
        let stats = Arc::clone(&self.stats);
        let (quiet, linger) = (self.cfg.quiet, self.cfg.linger);
        self.forwarder = Some(Forwarder::spawn(lock, reinject, quiet, linger, stats)?);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Wait for the forwarder (bounded by [`HandoffConfig::linger`]) or
    /// the release after an abort (bounded by
    /// [`HandoffConfig::release_limit`]) and return the figures.
    pub fn finish(&mut self) -> HandoffStats {
        self.stop_early();
        if let Some(r) = self.releaser.take().and_then(Releaser::join) {
            self.count(r);
        }
        if let Some(f) = self.forwarder.take() {
            f.join();
        }
        self.stats()
    }

    /// The figures so far.
    pub fn stats(&self) -> HandoffStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

/// After the handoff: forwards what still arrives at the source's lock
/// (clients not yet switched by the announcement) until it is quiet, then
/// removes the lock (thread `lmig-handoff-fwd`).
#[derive(Debug)]
struct Forwarder {
    thread: JoinHandle<()>,
}

impl Forwarder {
    fn spawn(
        lock: NetLock,
        reinject: Reinjector,
        quiet: Duration,
        linger: Duration,
        stats: Arc<Mutex<HandoffStats>>,
    ) -> Result<Self> {
        let thread = std::thread::Builder::new()
            .name("lmig-handoff-fwd".into())
            .spawn(move || forward_until_quiet(lock, reinject, quiet, linger, stats))
            .map_err(|e| NetError::sys("spawn", "handoff forwarder", e))?;
        Ok(Self { thread })
    }

    /// Wait for it (bounded by [`HandoffConfig::linger`] and [`SETTLE`]).
    fn join(self) {
        if self.thread.join().is_err() {
            warn!("the handoff forwarder panicked");
        }
    }
}

fn forward_until_quiet(
    mut lock: NetLock,
    reinject: Reinjector,
    quiet: Duration,
    linger: Duration,
    stats: Arc<Mutex<HandoffStats>>,
) {
    let start = Instant::now();
    let mut last = Instant::now();
    let step = Duration::from_millis(10).min(quiet.max(Duration::from_millis(1)));
    // Bounded by `linger`.
    while start.elapsed() < linger && last.elapsed() < quiet {
        match lock.collect_for(step) {
            Ok(0) => {}
            Ok(_) => {
                last = Instant::now();
                if let Ok(held) = lock.take_held() {
                    let failed = reinject.send_all(&held);
                    if let Ok(mut s) = stats.lock() {
                        s.held += held.len() as u64;
                        s.dropped += failed;
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "handoff forwarder: reading the lock's queue failed: stopping early");
                break;
            }
        }
    }
    let t = Instant::now();
    if let Err(e) = lock.disengage() {
        warn!(error = %e, "handoff: disengaging the lock failed");
    }
    let mut held = lock.take_held().unwrap_or_default();
    let unlock = t.elapsed();
    let mut failed = reinject.send_all(&held);
    let mut count = held.len() as u64;
    // Stragglers queued while the set was flushed (see crate::lock), then
    // the table; bounded by SETTLE.
    let end = Instant::now() + SETTLE;
    while let Some(left) = end
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        if matches!(lock.collect_for(left), Ok(n) if n > 0) {
            held = lock.take_held().unwrap_or_default();
            failed += reinject.send_all(&held);
            count += held.len() as u64;
        }
    }
    if let Err(e) = lock.remove_tables() {
        warn!(error = %e, "handoff: removing the lock's tables failed");
    }
    let dropped = lock.kernel_dropped() + lock.stats().dropped;
    if let Ok(mut s) = stats.lock() {
        s.unlock = unlock;
        s.held += count;
        s.dropped += failed + dropped;
    }
}

impl Drop for SourceHandoff {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A [`SocketSource`] with the network lock and the address handoff around
/// it: `freeze` locks before `S::freeze`, `abort` unlocks after `S::abort`,
/// `release` hands the address and the held packets over, then runs
/// `S::release` (the sockets are in repair mode: closing them later sends
/// nothing, and the clients do not wait for it).
#[derive(Debug)]
pub struct HandoffSource<S> {
    inner: S,
    handoff: SourceHandoff,
}

impl<S: SocketSource> HandoffSource<S> {
    /// Wrap `inner`; installs the lock now (see [`SourceHandoff::new`]).
    pub fn new(inner: S, cfg: HandoffConfig) -> Result<Self> {
        Ok(Self {
            inner,
            handoff: SourceHandoff::new(cfg)?,
        })
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped source, mutably.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The handoff (figures, [`SourceHandoff::finish`]).
    pub fn handoff(&mut self) -> &mut SourceHandoff {
        &mut self.handoff
    }
}

impl<S: SocketSource> SocketSource for HandoffSource<S> {
    fn plan(&mut self) -> lmig_core::Result<Vec<SocketPrep>> {
        self.inner.plan()
    }

    fn moved_addresses(&self) -> Vec<std::net::IpAddr> {
        let mut moved = self.inner.moved_addresses();
        moved.extend(self.handoff.cfg.addrs.iter().map(|a| a.addr));
        moved
    }

    fn freeze(&mut self) -> lmig_core::Result<()> {
        self.handoff.lock()?;
        self.inner.freeze()
    }

    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        self.inner.capture(emit)
    }

    fn queued_bytes(&mut self) -> lmig_core::Result<u64> {
        self.inner.queued_bytes()
    }

    fn abort(&mut self) -> lmig_core::Result<()> {
        let inner = self.inner.abort();
        let lock = self.handoff.unlock();
        inner?;
        Ok(lock?)
    }

    fn release(&mut self) -> lmig_core::Result<()> {
        // Address and held packets first: closing thousands of sockets in
        // repair mode takes milliseconds the clients should not wait for,
        // and the closed sockets stay silent either way (repair mode).
        let handoff = self.handoff.hand_over();
        let inner = self.inner.release();
        inner?;
        Ok(handoff?)
    }
}

impl crate::NetworkLock for SourceHandoff {
    fn lock(&mut self, _sockets: &[SocketPrep]) -> Result<()> {
        SourceHandoff::lock(self)
    }

    fn unlock(&mut self) -> Result<()> {
        SourceHandoff::unlock(self)
    }

    fn release(&mut self) -> Result<()> {
        self.hand_over()
    }
}
