//! The destination side of the handoff ([`DestHandoff`]) and the
//! [`SocketSink`] adapter that puts it around a sink ([`HandoffSink`]).

use std::time::{Duration, Instant};

use lmig_core::model::{SocketPrep, SocketRecord};
use lmig_core::traits::SocketSink;

use super::addr::{add_address_with, if_index, route_socket, wait_local};
use super::announce::Announcer;
use super::config::{HandoffConfig, HandoffStats};
use super::release::Releaser;
use crate::error::Result;
use crate::lock::{InOrder, NetLock};
use crate::sys::netlink::NlSocket;

/// The destination side of the handoff: holds packets until the restored
/// sockets are live, takes over and announces the addresses.
#[derive(Debug)]
pub struct DestHandoff {
    cfg: HandoffConfig,
    ifindex: u32,
    route: NlSocket,
    lock: Option<NetLock>,
    announcer: Announcer,
    stats: HandoffStats,
    reaper: Option<Releaser>,
}

impl DestHandoff {
    /// Before the freeze: look the interface up, open the sockets and install
    /// and engage the lock (nothing matches until the address arrives here).
    /// Everything is opened in the calling thread's network namespace; later
    /// calls may come from any thread.
    pub fn new(cfg: HandoffConfig) -> Result<Self> {
        let ifindex = if_index(&cfg.interface)?;
        let route = route_socket()?;
        let announcer = Announcer::new(ifindex, &cfg.addrs)?;
        // The destination only lets held packets through: no copies needed.
        let mut lock = NetLock::install(cfg.lock_config(false))?;
        lock.engage()?;
        Ok(Self {
            cfg,
            ifindex,
            route,
            lock: Some(lock),
            announcer,
            stats: HandoffStats::default(),
            reaper: None,
        })
    }

    /// After `Commit`: add the addresses here and announce them.
    pub fn take_over(&mut self) -> Result<()> {
        let t = Instant::now();
        for a in &self.cfg.addrs {
            add_address_with(&mut self.route, self.ifindex, a)?;
        }
        // IPv6 makes an added address local from a workqueue, a moment after
        // RTM_NEWADDR returned: a held packet let through before that is
        // dropped (Ip6InAddrErrors). Wait until the kernel routes it locally.
        for a in &self.cfg.addrs {
            if a.addr.is_ipv6() {
                wait_local(&mut self.route, a.addr, Duration::from_secs(2))?;
            }
        }
        self.announcer.announce(&self.cfg.addrs)?;
        self.stats.address_move = t.elapsed();
        info!(
            addresses = self.cfg.addrs.len(),
            ms = t.elapsed().as_secs_f64() * 1e3,
            "handoff: the service addresses are here and announced"
        );
        Ok(())
    }

    /// After the restored sockets left repair mode: let held packets through
    /// and remove the lock, on a background thread (joined by
    /// [`finish`](Self::finish) or `Drop`), so the program resumes meanwhile.
    ///
    /// The kernel delivers the held packets to the sockets inside each
    /// batch verdict: the program serves what is already in its sockets
    /// while that runs. They go in arrival order, each batch only as far as
    /// the UDP sockets they go to have room in their receive buffers (see
    /// [`InOrder`]; the program reads meanwhile), at most
    /// [`HandoffConfig::release_limit`]; new packets queue behind them until
    /// none is left held. Then the set is flushed, stragglers are released
    /// for [`crate::lock::SETTLE`], and the table goes last; a failing step
    /// does not stop the later ones (a table left behind would hold the
    /// service's packets forever). [`HandoffStats::unlock`] and
    /// [`HandoffStats::release`] are known after `finish`.
    pub fn release_held(&mut self) -> Result<()> {
        let Some(lock) = self.lock.take() else {
            return Ok(());
        };
        let paced = InOrder::new(self.cfg.release_limit);
        self.reaper = Some(Releaser::spawn(lock, paced, false)?);
        Ok(())
    }

    /// Wait for the background unlock (bounded by
    /// [`HandoffConfig::release_limit`] and [`crate::lock::SETTLE`]) and
    /// return the figures.
    pub fn finish(&mut self) -> HandoffStats {
        if let Some(releaser) = self.reaper.take() {
            if let Some(r) = releaser.join() {
                self.stats.unlock = r.unlock;
                self.stats.release = r.release;
                self.stats.held += r.held;
                self.stats.dropped += r.dropped;
            }
        }
        self.stats
    }

    /// The migration failed before `Commit`: remove the lock (the address
    /// was never added here).
    pub fn discard(&mut self) {
        if let Some(mut lock) = self.lock.take() {
            if let Err(e) = lock.unlock() {
                warn!(error = %e, "discarding the handoff: unlocking failed");
            }
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> HandoffStats {
        self.stats
    }
}

impl Drop for DestHandoff {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A [`SocketSink`] with the destination half of the handoff: `new`
/// installs the lock, `activate` takes the address over, activates the sockets
/// and then lets the held packets through on a background thread (see
/// [`DestHandoff::release_held`]); `discard` removes the lock.
#[derive(Debug)]
pub struct HandoffSink<S> {
    inner: S,
    handoff: DestHandoff,
}

impl<S: SocketSink> HandoffSink<S> {
    /// Wrap `inner`; installs the destination's lock now, in the calling
    /// thread's network namespace (see [`DestHandoff::new`]).
    pub fn new(inner: S, cfg: HandoffConfig) -> Result<Self> {
        Ok(Self {
            inner,
            handoff: DestHandoff::new(cfg)?,
        })
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped sink, mutably (e.g. to take the restored fds).
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The handoff (figures, [`DestHandoff::finish`]).
    pub fn handoff(&mut self) -> &mut DestHandoff {
        &mut self.handoff
    }
}

impl<S: SocketSink> SocketSink for HandoffSink<S> {
    fn prepare(&mut self, plan: &[SocketPrep]) -> lmig_core::Result<()> {
        self.inner.prepare(plan)
    }

    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        self.inner.restore(batch)
    }

    fn activate(&mut self) -> lmig_core::Result<()> {
        let take = self.handoff.take_over();
        let inner = self.inner.activate();
        let release = self.handoff.release_held();
        take?;
        inner?;
        Ok(release?)
    }

    fn discard(&mut self) {
        self.inner.discard();
        self.handoff.discard();
    }
}
