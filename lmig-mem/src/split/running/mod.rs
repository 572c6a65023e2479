//! The running host's side: remote paging, eviction, partial migration,
//! reintegration.
//!
//! | file | holds |
//! |---|---|
//! | `options.rs`, `reports.rs` | [`SplitOptions`]; [`SplitStats`], [`HostLost`], [`MoveReport`], [`GatherReport`] |
//! | `book.rs` | [`PageBook`](book::PageBook): every page's state and its transitions, no IO |
//! | `shared.rs` | what the threads share: the lock's state, links, waits for replies |
//! | `links.rs` | the messages page hosts send |
//! | `paging.rs` | faults, fetches, placing answers with the userfaultfd |
//! | `moves.rs` | eviction, partial migration, gather |
//! | `threads.rs` | the thread roles: fault handler, link readers, incoming server, evictors |
//!
//! Every decision about a page is the book's; the functions around it hold
//! the lock while they ask, and do the IO (`UFFDIO_COPY`, `MADV_DONTNEED`,
//! messages) outside it or after it.

mod book;
mod links;
mod moves;
mod options;
mod paging;
mod reports;
mod shared;
mod threads;

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use lmig_core::Channel;
use lmig_core::model::PageRun;
use lmig_core::protocol::Message;
use lmig_core::split::{HostId, OwnerMap, SplitMessage};

use super::{Result, SplitError};
use crate::error::MemError;
use crate::memory::{Backing, Region};
use crate::sys::uffd::{self, UffdOrigin};
use book::PageBook;
pub use options::SplitOptions;
pub use reports::{GatherReport, HostLost, MoveReport, SplitStats};
use shared::{Counters, Events, Inner, Link, State, proto};
use threads::{Evictor, FaultHandler, IncomingServer, LinkReader};

/// The running host's side of a split region.
///
/// Owns the [`Region`]; the program uses it through [`SplitRegion::region`]
/// (raw copies or its pointer). Pages held elsewhere are fetched when
/// touched. Dropping it stops the fault handler and closes the links: pages
/// still held elsewhere then read as zeros, so gather first.
pub struct SplitRegion {
    inner: Arc<Inner>,
    fault_handler: Option<FaultHandler>,
}

impl std::fmt::Debug for SplitRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitRegion")
            .field("me", &self.inner.me)
            .field("pages", &self.inner.pages)
            .finish_non_exhaustive()
    }
}

impl SplitRegion {
    /// Take over `region` (private anonymous) on the running host `me`:
    /// every page is held here at first. Pre-faults it and registers it
    /// with a userfaultfd of its own for missing-page and write-protect faults.
    pub fn new(region: Region, me: HostId, options: SplitOptions) -> Result<Self> {
        if region.backing() != Backing::Private {
            return Err(SplitError::Mem(MemError::Unsupported {
                feature: "split memory on shared or memfd regions",
                needs: "a private anonymous region",
            }));
        }
        let map = OwnerMap::new(region.info().clone(), me)?;
        region.populate()?;
        let feature = "split memory (userfaultfd missing + write-protect faults)";
        let unsupported = |needs| MemError::Unsupported { feature, needs };
        let (fd, origin) = uffd::open_best()
            .map_err(|e| MemError::userfaultfd_open(feature, "split memory", e))?;
        if origin == UffdOrigin::UserModeOnly {
            return Err(unsupported(
                "kernel-mode faults (CAP_SYS_PTRACE, vm.unprivileged_userfaultfd = 1 or /dev/userfaultfd)",
            )
            .into());
        }
        uffd::api(fd.as_fd(), 0).map_err(|e| MemError::os("UFFDIO_API", "split memory", e))?;
        let start = region.as_ptr() as u64;
        uffd::register(
            fd.as_fd(),
            start,
            region.len() as u64,
            uffd::UFFDIO_REGISTER_MODE_MISSING | uffd::UFFDIO_REGISTER_MODE_WP,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => SplitError::Mem(unsupported(
                "write-protect on anonymous memory (Linux 5.7+)",
            )),
            _ => SplitError::Mem(MemError::os(
                "UFFDIO_REGISTER (missing + wp)",
                region.describe(),
                e,
            )),
        })?;
        let pages = region.pages();
        let inner = Arc::new(Inner {
            me,
            options,
            start,
            page_size: region.page_size() as u64,
            pages,
            state: Mutex::new(State {
                book: PageBook::new(map, me),
                draining: HashSet::new(),
                dead: HashSet::new(),
                lost: Vec::new(),
                events: Events::default(),
            }),
            cond: Condvar::new(),
            links: RwLock::new(HashMap::new()),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            uffd: fd,
            region,
        });
        let fault_handler = FaultHandler::spawn(inner.clone())?;
        Ok(Self {
            inner,
            fault_handler: Some(fault_handler),
        })
    }

    /// The region (the program's memory).
    pub fn region(&self) -> &Region {
        &self.inner.region
    }

    /// This host's id.
    pub fn id(&self) -> HostId {
        self.inner.me
    }

    /// Attach page host `host`, reachable by other hosts at `endpoint`, over
    /// `channel`: it learns the region's geometry and is added to the owner map.
    pub fn add_host(&self, host: HostId, endpoint: &str, channel: Box<dyn Channel>) -> Result<()> {
        if host == self.inner.me {
            return Err(SplitError::State(format!("{host} is this host")));
        }
        let ch: Arc<dyn Channel> = Arc::from(channel);
        ch.send(&Message::Split(SplitMessage::Attach {
            from: self.inner.me,
            to: host,
            region: self.inner.region.info().clone(),
        }))
        .map_err(proto)?;
        let link = Arc::new(Link {
            ch: ch.clone(),
            endpoint: endpoint.to_string(),
            seq: AtomicU64::new(1),
        });
        {
            let mut st = self.inner.lock();
            st.book.add_host(host)?;
            st.dead.remove(&host);
        }
        self.inner
            .links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host, link);
        LinkReader::spawn(self.inner.clone(), host, ch)?;
        self.inner.sync(host)
    }

    /// Serve a channel a page host opened to this host (a gather or a relay).
    pub fn serve_incoming(&self, channel: Box<dyn Channel>) -> JoinHandle<()> {
        IncomingServer::spawn(self.inner.clone(), Arc::from(channel))
    }

    /// Is `page` held here? (Pages being copied in from an answer count:
    /// the owner map gives them to this host already, and a thread that
    /// touches one waits for the copy.)
    pub fn is_local(&self, page: u64) -> bool {
        self.inner.lock().book.is_here(page)
    }

    /// The host holding `page`.
    pub fn owner(&self, page: u64) -> Result<HostId> {
        Ok(self.inner.lock().book.map().owner(page)?)
    }

    /// A copy of the owner map.
    pub fn owner_map(&self) -> OwnerMap {
        self.inner.lock().book.map().clone()
    }

    /// Page hosts that vanished, with the pages they held.
    pub fn lost_hosts(&self) -> Vec<HostLost> {
        self.inner.lock().lost.clone()
    }

    /// Wait until every attached page host has handled everything this
    /// host sent it so far (the `Forget`s that end a partial migration or
    /// a gather included): a quiet point, e.g. between the steps of a
    /// benchmark. Hosts known to be lost are skipped.
    pub fn sync_hosts(&self) -> Result<()> {
        let hosts: Vec<HostId> = {
            let dead = self.inner.lock().dead.clone();
            let links = self.inner.links.read().unwrap_or_else(|p| p.into_inner());
            links
                .keys()
                .filter(|h| !dead.contains(h))
                .copied()
                .collect()
        };
        self.inner.sync_all(&hosts)
    }

    /// `Err(HostLost)` for the first page host that vanished.
    pub fn check_hosts(&self) -> Result<()> {
        match self.inner.lock().lost.first() {
            None => Ok(()),
            Some(l) => Err(SplitError::HostLost {
                host: l.host,
                pages: l.pages,
                runs: l.runs.clone(),
            }),
        }
    }

    /// Statistics so far.
    pub fn stats(&self) -> SplitStats {
        let c = &self.inner.counters;
        SplitStats {
            remote_faults: c.remote_faults.load(Ordering::Relaxed),
            placed: c.placed.load(Ordering::Relaxed),
            stale_discarded: c.stale.load(Ordering::Relaxed),
            not_owner_discarded: c.not_owner.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            not_held: c.not_held.load(Ordering::Relaxed),
            refetched: c.refetched.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            kept_dirty: c.kept_dirty.load(Ordering::Relaxed),
            local: self.inner.lock().book.held_here(),
        }
    }

    /// Evict the pages of `runs` held here to `host`: write-protect, send,
    /// wait for the host's acknowledgement, then drop them here
    /// (`MADV_DONTNEED`) and switch their owner. Pages written meanwhile stay
    /// here. Returns the pages evicted.
    pub fn evict(&self, host: HostId, runs: &[PageRun]) -> Result<u64> {
        self.inner.evict(host, runs)
    }

    /// Split migration: send each host its runs, all hosts in parallel;
    /// afterwards the program runs with its memory split over them.
    /// Returns the pages evicted.
    pub fn split_to(&self, parts: &[(HostId, Vec<PageRun>)]) -> Result<u64> {
        let evictors: Vec<Result<Evictor>> = parts
            .iter()
            .map(|(h, runs)| Evictor::spawn(self.inner.clone(), *h, runs.clone()))
            .collect();
        // Every eviction ends before the first failure is reported.
        let results: Vec<Result<u64>> = evictors
            .into_iter()
            .map(|e| e.and_then(Evictor::join))
            .collect();
        let mut total = 0;
        for r in results {
            total += r?;
        }
        Ok(total)
    }

    /// Partial migration: move every page `from` holds to `to` (both
    /// attached) while the program runs. `from` sends them directly to `to`;
    /// then the owner map switches in one step.
    pub fn move_host(&self, from: HostId, to: HostId) -> Result<MoveReport> {
        self.inner.move_host(from, to)
    }

    /// Reintegration: every page host sends the pages it holds straight to
    /// this host, all in parallel, on the channel this host attached it
    /// with (no connection to open). `my_endpoint` is where this host
    /// listens, for a page host that reaches it only through a channel of
    /// its own; the caller hands such channels to
    /// [`SplitRegion::serve_incoming`]. Returns once every page is here.
    pub fn gather(&self, my_endpoint: &str) -> Result<GatherReport> {
        self.inner.gather(my_endpoint, None)
    }

    /// The same gather relayed through `relay`: the other page hosts send
    /// to it, it forwards their pages and its own to this host.
    pub fn relay_gather(&self, relay: HostId, my_endpoint: &str) -> Result<GatherReport> {
        self.inner.gather(my_endpoint, Some(relay))
    }
}

impl Drop for SplitRegion {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        for l in self
            .inner
            .links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            l.ch.shutdown();
        }
        if let Some(t) = self.fault_handler.take() {
            t.join();
        }
        if let Err(e) = uffd::unregister(
            self.inner.uffd.as_fd(),
            self.inner.start,
            self.inner.region.len() as u64,
        ) {
            debug!(error = %e, "dropping a split region: unregistering its userfaultfd range failed");
        }
    }
}
