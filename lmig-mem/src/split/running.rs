//! The running host's side: remote paging, eviction, partial migration,
//! reintegration.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmig_core::model::{PageRun, PageSet};
use lmig_core::protocol::{Message, PageBatch, PageData};
use lmig_core::split::{Answer, HostId, OwnerMap, SplitMessage, runs_of_set};
use lmig_core::{Channel, MigrationError};

use super::{ACK_TIMEOUT, BATCH_PAGES, Result, SplitError, lock};
use crate::error::MemError;
use crate::memory::{Backing, Region};
use crate::sys::uffd::{self, UffdMsg, UffdOrigin};

/// `UFFD_PAGEFAULT_FLAG_WP`: the fault is a write to a write-protected page.
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// How the running host pages.
#[derive(Copy, Clone, Debug)]
pub struct SplitOptions {
    /// Pages fetched with a faulting page: up to this many after it and half
    /// as many before it, when the same host owns them (pre-paging). Default 8.
    pub prepage: u32,
    /// Busy-poll the userfaultfd this long before blocking. Default 0.
    pub spin: Duration,
    /// Longest wait for a gather or a partial migration. Default 120 s.
    pub timeout: Duration,
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self {
            prepage: 8,
            spin: Duration::ZERO,
            timeout: ACK_TIMEOUT,
        }
    }
}

/// What the running host did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitStats {
    /// Faults on pages held elsewhere (each one a fetch request).
    pub remote_faults: u64,
    /// Pages placed from answers (fetches, gathers).
    pub placed: u64,
    /// Answers discarded because the map changed after their epoch (late
    /// answers from a former owner).
    pub stale_discarded: u64,
    /// Answers discarded because the sender does not own the page.
    pub not_owner_discarded: u64,
    /// Answers for pages already here, discarded.
    pub duplicates: u64,
    /// Pages a host said it did not hold although the map names it.
    pub not_held: u64,
    /// Fetches sent again to a page's new owner.
    pub refetched: u64,
    /// Pages evicted (dropped here after their host acknowledged them).
    pub evicted: u64,
    /// Pages written during their eviction and therefore kept here.
    pub kept_dirty: u64,
    /// Pages held here now (those being copied in from an answer included).
    pub local: u64,
}

/// A page host that vanished, with the pages it held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLost {
    /// The host.
    pub host: HostId,
    /// How many pages it held.
    pub pages: u64,
    /// Which ones.
    pub runs: Vec<PageRun>,
    /// What the channel said.
    pub detail: String,
}

/// The outcome of [`SplitRegion::move_host`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveReport {
    /// Pages the draining host owned when the move began.
    pub pages: u64,
    /// Pages that switched to the new host.
    pub moved: u64,
    /// Pages that changed hands during the move (fetched here); the new
    /// host's copies of them were invalidated.
    pub invalidated: u64,
    /// The owner-map epoch of the switch.
    pub epoch: u64,
}

/// The outcome of a gather.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatherReport {
    /// Pages that came from page hosts.
    pub pages: u64,
    /// Hosts that sent.
    pub hosts: usize,
}

struct Link {
    ch: Arc<dyn Channel>,
    endpoint: String,
    seq: AtomicU64,
}

#[derive(Default)]
struct Events {
    synced: HashSet<(HostId, u64)>,
    sent: Vec<(HostId, HostId, u64)>,
    refused: Vec<(HostId, String)>,
}

struct State {
    map: OwnerMap,
    local: PageSet,
    /// Pages being placed right now (outside the lock): the owner map gives
    /// them to this host already, the kernel may not have them yet.
    placing: PageSet,
    pending: HashMap<u64, HostId>,
    evicting: PageSet,
    evict_dirty: PageSet,
    draining: HashSet<HostId>,
    dead: HashSet<HostId>,
    lost: Vec<HostLost>,
    events: Events,
}

#[derive(Default)]
struct Counters {
    remote_faults: AtomicU64,
    placed: AtomicU64,
    stale: AtomicU64,
    not_owner: AtomicU64,
    duplicates: AtomicU64,
    not_held: AtomicU64,
    refetched: AtomicU64,
    evicted: AtomicU64,
    kept_dirty: AtomicU64,
}

struct Inner {
    me: HostId,
    options: SplitOptions,
    start: u64,
    page_size: u64,
    pages: u64,
    state: Mutex<State>,
    cond: Condvar,
    links: RwLock<HashMap<HostId, Arc<Link>>>,
    stop: AtomicBool,
    counters: Counters,
    uffd: OwnedFd,
    /// Declared last: unmapped after the userfaultfd is closed.
    region: Region,
}

/// The running host's side of a split region.
///
/// Owns the [`Region`]; the program uses it through [`SplitRegion::region`]
/// (raw copies or its pointer). Pages held elsewhere are fetched when
/// touched. Dropping it stops the fault handler and closes the links: pages
/// still held elsewhere then read as zeros, so gather first.
pub struct SplitRegion {
    inner: Arc<Inner>,
    fault_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SplitRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitRegion")
            .field("me", &self.inner.me)
            .field("pages", &self.inner.pages)
            .finish_non_exhaustive()
    }
}

fn proto(e: MigrationError) -> SplitError {
    SplitError::Protocol(e)
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
        let unsupported = |needs| MemError::Unsupported {
            feature: "split memory (userfaultfd missing + write-protect faults)",
            needs,
        };
        let (fd, origin) = uffd::open_best().map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::ENOSYS) => unsupported(
                "userfaultfd: CAP_SYS_PTRACE, vm.unprivileged_userfaultfd = 1 or access to /dev/userfaultfd",
            ),
            _ => MemError::os("userfaultfd", "split memory", e),
        })?;
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
                map,
                local: PageSet::full(pages),
                placing: PageSet::new(pages),
                pending: HashMap::new(),
                evicting: PageSet::new(pages),
                evict_dirty: PageSet::new(pages),
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
        let i = inner.clone();
        let fault_thread = std::thread::Builder::new()
            .name("split-faults".into())
            .spawn(move || i.fault_loop())
            .map_err(|e| MemError::os("spawn", "split fault handler", e))?;
        Ok(Self {
            inner,
            fault_thread: Some(fault_thread),
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
            st.map.add_host(host)?;
            st.dead.remove(&host);
        }
        self.inner
            .links
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host, link);
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name(format!("split-link-{}", host.0))
            .spawn(move || inner.link_loop(host, ch))
            .map_err(|e| MemError::os("spawn", "split link", e))?;
        self.inner.sync(host)
    }

    /// Serve a channel a page host opened to this host (a gather or a relay).
    pub fn serve_incoming(&self, channel: Box<dyn Channel>) -> JoinHandle<()> {
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name("split-incoming".into())
            .spawn(move || inner.incoming_loop(Arc::from(channel)))
            .expect("spawn split incoming thread")
    }

    /// Is `page` held here? (Pages being copied in from an answer count:
    /// the owner map gives them to this host already, and a thread that
    /// touches one waits for the copy.)
    pub fn is_local(&self, page: u64) -> bool {
        let st = self.inner.lock();
        st.local.contains(page) || st.placing.contains(page)
    }

    /// The host holding `page`.
    pub fn owner(&self, page: u64) -> Result<HostId> {
        Ok(self.inner.lock().map.owner(page)?)
    }

    /// A copy of the owner map.
    pub fn owner_map(&self) -> OwnerMap {
        self.inner.lock().map.clone()
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
            local: {
                let st = self.inner.lock();
                st.local.count() + st.placing.count()
            },
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
        std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .iter()
                .map(|(h, runs)| s.spawn(move || self.inner.evict(*h, runs)))
                .collect();
            let mut total = 0;
            for h in handles {
                total += h
                    .join()
                    .map_err(|_| SplitError::State("eviction thread panicked".into()))??;
            }
            Ok(total)
        })
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
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
        let _ = uffd::unregister(
            self.inner.uffd.as_fd(),
            self.inner.start,
            self.inner.region.len() as u64,
        );
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn link(&self, host: HostId) -> Result<Arc<Link>> {
        self.links
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&host)
            .cloned()
            .ok_or(SplitError::UnknownHost { host })
    }

    /// The whole region as one run.
    fn whole(&self) -> PageRun {
        PageRun::new(
            self.region.id(),
            0,
            self.pages.min(u64::from(u32::MAX)) as u32,
        )
    }

    fn addr(&self, page: u64) -> u64 {
        self.start + page * self.page_size
    }

    /// Wait until `done` holds, a host in `watch` is lost or refused, or the
    /// timeout. A refusal already known is reported even when `done` holds
    /// too: it came first (the waiting thread may be late to look). A loss
    /// after `done` is not this wait's failure.
    fn wait_for(
        &self,
        what: &'static str,
        watch: &[HostId],
        mut done: impl FnMut(&mut State) -> bool,
    ) -> Result<()> {
        let timeout = self.options.timeout;
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(i) = st
                .events
                .refused
                .iter()
                .position(|(h, _)| watch.contains(h))
            {
                let (host, reason) = st.events.refused.remove(i);
                return Err(SplitError::Refused { host, reason });
            }
            if done(&mut st) {
                return Ok(());
            }
            if let Some(l) = st.lost.iter().find(|l| watch.contains(&l.host)) {
                return Err(SplitError::HostLost {
                    host: l.host,
                    pages: l.pages,
                    runs: l.runs.clone(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SplitError::Timeout {
                    what,
                    after: timeout,
                });
            }
            st = self
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Every message sent to `host` before this call has been handled by it.
    fn sync(&self, host: HostId) -> Result<()> {
        self.sync_all(&[host])
    }

    /// Every message sent to each of `hosts` before this call has been
    /// handled by it (all asked at once).
    fn sync_all(&self, hosts: &[HostId]) -> Result<()> {
        let mut asked = Vec::with_capacity(hosts.len());
        for &host in hosts {
            let link = self.link(host)?;
            let seq = link.seq.fetch_add(1, Ordering::Relaxed);
            link.ch
                .send(&Message::Split(SplitMessage::Sync { seq }))
                .map_err(proto)?;
            asked.push((host, seq));
        }
        self.wait_for("Synced", hosts, |st| {
            asked.retain(|k| !st.events.synced.remove(k));
            asked.is_empty()
        })
    }

    fn link_loop(self: Arc<Self>, host: HostId, ch: Arc<dyn Channel>) {
        loop {
            match ch.recv(Some(Duration::from_millis(200))) {
                Ok(None) => {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                }
                Ok(Some(Message::Split(m))) => self.on_message(host, &*ch, m),
                Ok(Some(_)) => {}
                Err(e) => {
                    if !self.stop.load(Ordering::Acquire) {
                        self.host_lost(host, e.to_string());
                    }
                    return;
                }
            }
        }
    }

    fn host_lost(&self, host: HostId, detail: String) {
        let mut st = self.lock();
        if !st.dead.insert(host) {
            return;
        }
        let held = st.map.pages_of(host);
        let runs = runs_of_set(st.map.region().id, &held, u32::MAX);
        st.pending.retain(|_, h| *h != host);
        st.lost.push(HostLost {
            host,
            pages: held.count(),
            runs,
            detail,
        });
        drop(st);
        self.cond.notify_all();
    }

    fn on_message(&self, host: HostId, ch: &dyn Channel, m: SplitMessage) {
        match m {
            SplitMessage::Data { from, epoch, batch } => {
                // A host may only speak for itself on its own link.
                let from = if from == host { from } else { HostId(u32::MAX) };
                if let Err(e) = self.place_answer(from, epoch, &batch) {
                    // Surfaced to whoever waits on this host.
                    self.lock().events.refused.push((host, e.to_string()));
                    self.cond.notify_all();
                }
            }
            SplitMessage::NotHeld { run, epoch, .. } => {
                let mut st = self.lock();
                for p in run.first..run.end() {
                    if st.pending.get(&p) == Some(&host) {
                        st.pending.remove(&p);
                    }
                }
                self.counters
                    .not_held
                    .fetch_add(u64::from(run.count), Ordering::Relaxed);
                // A former owner answering a fetch that raced a partial
                // migration (the fetch went to the new owner at the switch)
                // says nothing wrong; a host the owner map still names for
                // those pages, as of the fetch's epoch, does.
                let current = (run.first..run.end())
                    .any(|p| matches!(st.map.check_answer(host, epoch, p), Ok(Answer::Current)));
                if current {
                    st.events.refused.push((
                        host,
                        format!("does not hold {run}, which the owner map gives it"),
                    ));
                }
                drop(st);
                self.cond.notify_all();
            }
            SplitMessage::Synced { seq, .. } => {
                self.lock().events.synced.insert((host, seq));
                self.cond.notify_all();
            }
            SplitMessage::Sent {
                from, to, epoch, ..
            } => {
                self.lock().events.sent.push((from, to, epoch));
                self.cond.notify_all();
            }
            SplitMessage::Refused { reason } => {
                self.lock().events.refused.push((host, reason));
                self.cond.notify_all();
            }
            SplitMessage::Sync { seq } => {
                let _ = ch.send(&Message::Split(SplitMessage::Synced { seq, pages: 0 }));
            }
            _ => {}
        }
    }

    fn incoming_loop(self: Arc<Self>, ch: Arc<dyn Channel>) {
        let mut received = 0u64;
        let mut peer = None;
        while !self.stop.load(Ordering::Acquire) {
            let m = match ch.recv(Some(Duration::from_millis(200))) {
                Ok(Some(Message::Split(m))) => m,
                Ok(Some(_)) | Ok(None) => continue,
                Err(_) => return,
            };
            let reply = match m {
                SplitMessage::Attach { from, to, region } => {
                    if to != self.me || &region != self.region.info() {
                        Some(SplitMessage::Refused {
                            reason: format!("{to} with {region:?} is not this host's region"),
                        })
                    } else {
                        peer = Some(from);
                        None
                    }
                }
                SplitMessage::Data { from, epoch, batch } => {
                    received += u64::from(batch.run.count);
                    if peer.is_none() {
                        Some(SplitMessage::Refused {
                            reason: "pages before Attach".into(),
                        })
                    } else {
                        match self.place_answer(from, epoch, &batch) {
                            Err(e) => Some(SplitMessage::Refused {
                                reason: e.to_string(),
                            }),
                            Ok(()) => None,
                        }
                    }
                }
                SplitMessage::Sync { seq } => Some(SplitMessage::Synced {
                    seq,
                    pages: received,
                }),
                _ => None,
            };
            if let Some(r) = reply {
                let _ = ch.send(&Message::Split(r));
            }
        }
    }

    /// Place pages `from` sent as of `epoch`, where the owner map allows it;
    /// ask the current owner again for discarded pages someone waits on.
    ///
    /// The verdict and the owner-map switch to this host happen under the
    /// state lock; the copies into the region (`UFFDIO_COPY`) happen outside
    /// it, so several channels place in parallel. While a page is being
    /// placed it is in `placing`: a fault on it waits for the copy (which
    /// wakes it), another answer for it is a duplicate, and no eviction or
    /// partial migration can take it (it is neither local nor another
    /// host's).
    fn place_answer(&self, from: HostId, epoch: u64, batch: &PageBatch) -> Result<()> {
        let run = batch.run;
        let region = &self.region;
        region.run_bytes(&run)?;
        let ps = self.page_size as usize;
        if let PageData::Raw(d) = &batch.data {
            region.check_len(&run, d.len())?;
        }
        let mut refetch = Vec::new();
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        {
            let mut st = self.lock();
            // Whether each page may be placed.
            let mut verdict = |st: &mut State, p: u64| -> bool {
                let was_pending = st.pending.get(&p) == Some(&from);
                if was_pending {
                    st.pending.remove(&p);
                }
                if st.local.contains(p) || st.placing.contains(p) {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                match st.map.check_answer(from, epoch, p) {
                    Ok(Answer::Current) => true,
                    Ok(Answer::Stale { .. }) => {
                        self.counters.stale.fetch_add(1, Ordering::Relaxed);
                        if was_pending {
                            refetch.push(p);
                        }
                        false
                    }
                    Ok(Answer::NotOwner { .. }) | Err(_) => {
                        self.counters.not_owner.fetch_add(1, Ordering::Relaxed);
                        if was_pending {
                            refetch.push(p);
                        }
                        false
                    }
                }
            };
            let oks: Vec<bool> = (run.first..run.end())
                .map(|p| verdict(&mut st, p))
                .collect();
            let mut p = run.first;
            while p < run.end() {
                // A maximal sub-run of pages with the same verdict.
                let ok = oks[(p - run.first) as usize];
                let mut q = p + 1;
                while q < run.end() && oks[(q - run.first) as usize] == ok {
                    q += 1;
                }
                if ok {
                    st.map.assign(p, q - p, self.me)?;
                    st.placing.insert_range(p, q - p);
                    claimed.push((p, q - p));
                }
                p = q;
            }
        }
        let mut placed = Vec::with_capacity(claimed.len());
        let mut result = Ok(());
        for &(p, n) in &claimed {
            let data = match &batch.data {
                PageData::Raw(d) => {
                    let off = (p - run.first) as usize * ps;
                    Some(&d[off..off + n as usize * ps])
                }
                PageData::Zero => None,
            };
            let (done, r) = if result.is_ok() {
                self.fill(p, n, data, from)
            } else {
                (0, Ok(()))
            };
            placed.push(done);
            if let Err(e) = r {
                result = Err(e);
            }
        }
        let full = {
            let mut st = self.lock();
            for (&(p, n), &done) in claimed.iter().zip(&placed) {
                st.placing.remove_range(p, n);
                st.local.insert_range(p, done);
                if done < n {
                    // Not placed: `from` still holds them.
                    st.map.assign(p + done, n - done, from)?;
                    let _ = uffd::wake(
                        self.uffd.as_fd(),
                        self.addr(p + done),
                        (n - done) * self.page_size,
                    );
                }
                self.counters.placed.fetch_add(done, Ordering::Relaxed);
            }
            st.local.count() == self.pages
        };
        if full {
            // Only a gather waits for placements: for every page to be here.
            self.cond.notify_all();
        }
        for p in refetch {
            self.request(p, false);
        }
        result
    }

    /// Fill `count` missing pages from `first` (`UFFDIO_COPY`, or
    /// `UFFDIO_ZEROPAGE` without data), which wakes their waiters. Returns
    /// how many pages were filled, and the error that stopped it.
    ///
    /// A page the kernel reports present (`EEXIST`) although the owner map
    /// gave it to `from` is an error: this host's bookkeeping and the
    /// region disagree, and overwriting the page could hide a lost write.
    fn fill(&self, first: u64, count: u64, data: Option<&[u8]>, from: HostId) -> (u64, Result<()>) {
        let ps = self.page_size;
        let total = count * ps;
        let mut done = 0u64;
        let mut retries = 0u32;
        while done < total {
            let addr = self.addr(first) + done;
            let filled = match data {
                Some(d) => uffd::copy(self.uffd.as_fd(), addr, &d[done as usize..]),
                None => uffd::zeropage(self.uffd.as_fd(), addr, total - done),
            };
            done += filled.bytes / ps * ps;
            let Some(err) = filled.error else { continue };
            let call = if data.is_some() {
                "UFFDIO_COPY"
            } else {
                "UFFDIO_ZEROPAGE"
            };
            let page = first + done / ps;
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    return (
                        done / ps,
                        Err(SplitError::State(format!(
                            "{call}: page {page} of region {} is present here although the \
                             owner map gave it to {from}",
                            self.region.id()
                        ))),
                    );
                }
                Some(libc::EAGAIN) if filled.bytes == 0 => {
                    retries += 1;
                    if retries > crate::postcopy::MAX_FILL_RETRIES {
                        return (
                            done / ps,
                            Err(MemError::os(call, "split memory", err).into()),
                        );
                    }
                    std::thread::yield_now();
                }
                Some(libc::EAGAIN) => {}
                _ => {
                    return (
                        done / ps,
                        Err(MemError::os(call, format!("split region page {page}"), err).into()),
                    );
                }
            }
        }
        (count, Ok(()))
    }

    fn fault_loop(self: Arc<Self>) {
        let mut buf = [UffdMsg::default(); 32];
        let mut idle_since = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            let n = match uffd::read_msgs(self.uffd.as_fd(), &mut buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            if n == 0 {
                if idle_since.elapsed() < self.options.spin {
                    std::hint::spin_loop();
                } else {
                    let _ = uffd::poll_in(self.uffd.as_fd(), 100);
                    idle_since = Instant::now();
                }
                continue;
            }
            for m in &buf[..n] {
                if m.event != uffd::UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = m.arg[1];
                if addr < self.start || addr - self.start >= self.pages * self.page_size {
                    continue;
                }
                let page = (addr - self.start) / self.page_size;
                if m.arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0 {
                    self.on_write_fault(page);
                } else {
                    self.request(page, true);
                }
            }
            idle_since = Instant::now();
        }
    }

    /// A write to a page under eviction: keep the page here, let the write go.
    fn on_write_fault(&self, page: u64) {
        let mut st = self.lock();
        if st.evicting.contains(page) && st.evict_dirty.insert(page) {
            self.counters.kept_dirty.fetch_add(1, Ordering::Relaxed);
        }
        let fd = self.uffd.as_fd();
        if uffd::writeprotect(fd, self.addr(page), self.page_size, false).is_err() {
            let _ = uffd::wake(fd, self.addr(page), self.page_size);
        }
        drop(st);
    }

    /// A thread needs `page`: fetch it (with neighbours) from its owner, or
    /// answer at once when it is here.
    fn request(&self, page: u64, fault: bool) {
        let mut st = self.lock();
        let Ok(owner) = st.map.owner(page) else {
            return;
        };
        if st.placing.contains(page) {
            // Being copied in: the copy wakes the faulting thread.
            return;
        }
        if st.local.contains(page) || owner == self.me {
            // Here already (a fault reported twice, or one racing the
            // placement): wake the waiters; zeros if the program dropped it.
            let fd = self.uffd.as_fd();
            let z = uffd::zeropage(fd, self.addr(page), self.page_size);
            if z.error.is_some() {
                let _ = uffd::wake(fd, self.addr(page), self.page_size);
            }
            return;
        }
        if st.pending.contains_key(&page) || st.dead.contains(&owner) {
            return;
        }
        let wanted = |st: &State, p: u64| {
            !st.local.contains(p)
                && !st.placing.contains(p)
                && !st.pending.contains_key(&p)
                && st.map.owner(p).ok() == Some(owner)
        };
        let before = u64::from(self.options.prepage / 2);
        let after = u64::from(self.options.prepage);
        let mut lo = page;
        while lo > 0 && page - lo < before && wanted(&st, lo - 1) {
            lo -= 1;
        }
        let mut hi = page + 1;
        while hi < self.pages && hi - page <= after && wanted(&st, hi) {
            hi += 1;
        }
        for p in lo..hi {
            st.pending.insert(p, owner);
        }
        let epoch = st.map.epoch();
        drop(st);
        if fault {
            self.counters.remote_faults.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.refetched.fetch_add(1, Ordering::Relaxed);
        }
        let run = PageRun::new(self.region.id(), lo, (hi - lo) as u32);
        let sent = self.link(owner).and_then(|l| {
            l.ch.send_urgent(&Message::Split(SplitMessage::Fetch { epoch, run }))
                .map_err(proto)
        });
        if sent.is_err() {
            let mut st = self.lock();
            for p in lo..hi {
                st.pending.remove(&p);
            }
        }
    }

    fn evict(&self, host: HostId, runs: &[PageRun]) -> Result<u64> {
        let link = self.link(host)?;
        let (set, epoch) = {
            let mut st = self.lock();
            if !st.map.knows(host) || st.dead.contains(&host) {
                return Err(SplitError::UnknownHost { host });
            }
            if st.draining.contains(&host) {
                return Err(SplitError::State(format!(
                    "{host} is being drained by a partial migration"
                )));
            }
            let mut set = PageSet::new(self.pages);
            for r in runs {
                self.region.run_bytes(r)?;
                for p in r.first..r.end() {
                    if st.local.contains(p) && !st.evicting.contains(p) {
                        set.insert(p);
                    }
                }
            }
            st.evicting.union_with(&set);
            (set, st.map.epoch())
        };
        let result = self.evict_set(host, &link, &set, epoch);
        let mut st = self.lock();
        let mut evicted = 0u64;
        if result.is_ok() {
            let keep = st.evict_dirty.clone();
            for (first, count) in set.runs() {
                let mut p = first;
                while p < first + count {
                    let drop_it = !keep.contains(p);
                    let mut q = p + 1;
                    while q < first + count && keep.contains(q) != drop_it {
                        q += 1;
                    }
                    if drop_it {
                        let off = (p * self.page_size) as usize;
                        let len = ((q - p) * self.page_size) as usize;
                        self.region
                            .mapping()
                            .discard(off, len, libc::MADV_DONTNEED)
                            .map_err(|e| {
                                MemError::os("madvise(MADV_DONTNEED)", self.region.describe(), e)
                            })?;
                        st.local.remove_range(p, q - p);
                        st.map.assign(p, q - p, host)?;
                        evicted += q - p;
                    }
                    p = q;
                }
            }
        }
        st.evicting.subtract(&set);
        let mut dirty = st.evict_dirty.clone();
        dirty.subtract(&st.evicting);
        st.evict_dirty.subtract(&dirty);
        // Lift the protection of what stayed here (dropped pages have none).
        for (first, count) in set.runs() {
            let _ = uffd::writeprotect(
                self.uffd.as_fd(),
                self.addr(first),
                count * self.page_size,
                false,
            );
        }
        drop(st);
        result?;
        self.counters.evicted.fetch_add(evicted, Ordering::Relaxed);
        Ok(evicted)
    }

    fn evict_set(&self, host: HostId, link: &Link, set: &PageSet, epoch: u64) -> Result<()> {
        for (first, count) in set.runs() {
            uffd::writeprotect(
                self.uffd.as_fd(),
                self.addr(first),
                count * self.page_size,
                true,
            )
            .map_err(|e| MemError::os("UFFDIO_WRITEPROTECT", self.region.describe(), e))?;
        }
        let ps = self.page_size as usize;
        for run in runs_of_set(self.region.id(), set, BATCH_PAGES) {
            let mut buf = vec![0u8; run.count as usize * ps];
            self.region.read_pages(&run, &mut buf)?;
            link.ch
                .send(&Message::Split(SplitMessage::Data {
                    from: self.me,
                    epoch,
                    batch: PageBatch {
                        round: 0,
                        run,
                        data: PageData::Raw(Bytes::from(buf)),
                    },
                }))
                .map_err(proto)?;
        }
        self.sync(host)
    }

    fn move_host(&self, from: HostId, to: HostId) -> Result<MoveReport> {
        let src = self.link(from)?;
        let dst = self.link(to)?;
        let (snapshot, e0) = {
            let mut st = self.lock();
            for h in [from, to] {
                if st.dead.contains(&h) {
                    return Err(SplitError::UnknownHost { host: h });
                }
            }
            if !st.draining.insert(from) {
                return Err(SplitError::State(format!(
                    "{from} is being drained already"
                )));
            }
            (st.map.pages_of(from), st.map.epoch())
        };
        let result = (|| {
            let runs = runs_of_set(self.region.id(), &snapshot, u32::MAX);
            src.ch
                .send(&Message::Split(SplitMessage::Send {
                    to,
                    endpoint: dst.endpoint.clone(),
                    epoch: e0,
                    runs,
                }))
                .map_err(proto)?;
            self.wait_for("Sent", &[from, to], |st| {
                let i = st
                    .events
                    .sent
                    .iter()
                    .position(|&(f, t, e)| f == from && t == to && e == e0);
                i.map(|i| st.events.sent.remove(i)).is_some()
            })
        })();
        let mut st = self.lock();
        st.draining.remove(&from);
        if let Err(e) = result {
            drop(st);
            // The new host's partial copies are of no use.
            let runs = runs_of_set(self.region.id(), &snapshot, u32::MAX);
            let _ = dst
                .ch
                .send(&Message::Split(SplitMessage::Forget { epoch: e0, runs }));
            return Err(e);
        }
        // The switch: one step, one epoch.
        let moved = st.map.switch(&snapshot, from, e0, to)?;
        let epoch = st.map.epoch();
        let mut stale = snapshot.clone();
        stale.subtract(&moved);
        // Fetches still waiting on the old owner go to the new one.
        let mut resend = Vec::new();
        for (p, h) in st.pending.iter_mut() {
            if *h == from && moved.contains(*p) {
                *h = to;
                resend.push(*p);
            }
        }
        drop(st);
        resend.sort_unstable();
        for run in runs_of_set(self.region.id(), &set_of(self.pages, &resend), BATCH_PAGES) {
            self.counters.refetched.fetch_add(1, Ordering::Relaxed);
            let _ = dst
                .ch
                .send_urgent(&Message::Split(SplitMessage::Fetch { epoch, run }));
        }
        // The drained host owns nothing now: it drops everything, copies of
        // pages fetched from it earlier included.
        src.ch
            .send(&Message::Split(SplitMessage::Forget {
                epoch,
                runs: vec![self.whole()],
            }))
            .map_err(proto)?;
        if !stale.is_empty() {
            dst.ch
                .send(&Message::Split(SplitMessage::Forget {
                    epoch,
                    runs: runs_of_set(self.region.id(), &stale, u32::MAX),
                }))
                .map_err(proto)?;
        }
        Ok(MoveReport {
            pages: snapshot.count(),
            moved: moved.count(),
            invalidated: stale.count(),
            epoch,
        })
    }

    fn gather(&self, my_endpoint: &str, relay: Option<HostId>) -> Result<GatherReport> {
        let (parts, epoch, before) = {
            let st = self.lock();
            let parts: Vec<(HostId, PageSet)> = st
                .map
                .counts()
                .into_iter()
                .filter(|&(h, n)| h != self.me && n > 0)
                .map(|(h, _)| (h, st.map.pages_of(h)))
                .collect();
            if let Some((h, _)) = parts.iter().find(|(h, _)| st.dead.contains(h)) {
                return Err(SplitError::UnknownHost { host: *h });
            }
            // Pages being placed (a fetch in progress) are here already,
            // as `stats().local` counts them: the gather does not move them.
            (parts, st.map.epoch(), st.local.count() + st.placing.count())
        };
        let hosts: Vec<HostId> = parts.iter().map(|(h, _)| *h).collect();
        let mut watch = hosts.clone();
        if let Some(r) = relay {
            let link = self.link(r)?;
            link.ch
                .send(&Message::Split(SplitMessage::Relay {
                    to: self.me,
                    endpoint: my_endpoint.to_string(),
                    epoch,
                }))
                .map_err(proto)?;
            self.sync(r)?;
            watch.push(r);
        }
        for (h, set) in &parts {
            let (to, endpoint) = match relay {
                Some(r) if r != *h => (r, self.link(r)?.endpoint.clone()),
                _ => (self.me, my_endpoint.to_string()),
            };
            self.link(*h)?
                .ch
                .send(&Message::Split(SplitMessage::Send {
                    to,
                    endpoint,
                    epoch,
                    runs: runs_of_set(self.region.id(), set, u32::MAX),
                }))
                .map_err(proto)?;
        }
        let pages = self.pages;
        let result = self.wait_for("every page to arrive", &watch, |st| {
            st.local.count() == pages
        });
        if let Some(r) = relay {
            if let Ok(link) = self.link(r) {
                let _ = link.ch.send(&Message::Split(SplitMessage::Relay {
                    to: self.me,
                    endpoint: String::new(),
                    epoch,
                }));
            }
        }
        result?;
        // Every host reports Sent once its receiver acknowledged.
        let n = hosts.len();
        let mut seen = 0usize;
        self.wait_for("Sent", &watch, |st| {
            st.events.sent.retain(|&(f, _, e)| {
                let mine = e == epoch && hosts.contains(&f);
                seen += usize::from(mine);
                !mine
            });
            seen >= n
        })?;
        // Every page is here: the page hosts drop everything they hold.
        for (h, _) in &parts {
            if let Ok(l) = self.link(*h) {
                let _ = l.ch.send(&Message::Split(SplitMessage::Forget {
                    epoch,
                    runs: vec![self.whole()],
                }));
            }
        }
        Ok(GatherReport {
            pages: pages - before,
            hosts: n,
        })
    }
}

fn set_of(pages: u64, list: &[u64]) -> PageSet {
    let mut s = PageSet::new(pages);
    for &p in list {
        s.insert(p);
    }
    s
}
