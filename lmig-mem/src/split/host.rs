//! The page-host service.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lmig_core::model::{PageRun, RegionInfo};
use lmig_core::protocol::{Message, PageBatch, PageData};
use lmig_core::split::{HostId, SplitMessage};
use lmig_core::{Channel, MigrationError};

use super::{ACK_TIMEOUT, BATCH_PAGES, Dial, lock};

/// What a page host did.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageHostStats {
    /// Pages it holds now.
    pub held: u64,
    /// Pages it stored (evictions, transfers).
    pub stored: u64,
    /// Pages it answered fetches with.
    pub served: u64,
    /// Fetched pages it did not hold.
    pub not_held: u64,
    /// Pages it sent to other hosts (`Send`).
    pub sent: u64,
    /// Pages it forwarded as a relay.
    pub forwarded: u64,
}

/// Held sub-runs with their content, and the sub-runs not held.
type Gathered = (Vec<(PageRun, Bytes)>, Vec<PageRun>);

/// Pages a `Send` looks up in the store at a time.
const SEND_WINDOW: u64 = 4096;

/// What a page host knows about one channel it serves.
#[derive(Default)]
struct LinkState {
    /// The host at the other end (from its `Attach`).
    peer: Option<HostId>,
    /// Pages received on it.
    received: u64,
}

#[derive(Default)]
struct Store {
    region: Option<RegionInfo>,
    /// Per page: the payload of the batch it arrived in and its byte
    /// offset there (so pages that arrived together leave together without
    /// a copy).
    pages: Vec<Option<(Bytes, usize)>>,
    held: u64,
}

#[derive(Default)]
struct Counters {
    stored: AtomicU64,
    served: AtomicU64,
    not_held: AtomicU64,
    sent: AtomicU64,
    forwarded: AtomicU64,
}

struct HostInner {
    id: HostId,
    dial: Dial,
    store: Mutex<Store>,
    relay: Mutex<Option<Arc<dyn Channel>>>,
    channels: Mutex<Vec<Arc<dyn Channel>>>,
    killed: AtomicBool,
    counters: Counters,
}

/// A page host: holds part of a split region's pages and serves them.
///
/// Hand it every channel that reaches it ([`PageHost::serve`]); each is
/// served on its own thread until it closes. Cheap to clone.
#[derive(Clone)]
pub struct PageHost {
    inner: Arc<HostInner>,
}

impl std::fmt::Debug for PageHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageHost")
            .field("id", &self.inner.id)
            .field("held", &self.held_pages())
            .finish_non_exhaustive()
    }
}

fn refuse(ch: &dyn Channel, reason: String) {
    if let Err(e) = ch.send(&Message::Split(SplitMessage::Refused { reason })) {
        debug!(error = %e, "page host: the refusal could not be sent");
    }
}

impl PageHost {
    /// A page host called `id`; `dial` reaches other hosts for `Send` and `Relay`.
    pub fn new(id: HostId, dial: Dial) -> Self {
        Self {
            inner: Arc::new(HostInner {
                id,
                dial,
                store: Mutex::new(Store::default()),
                relay: Mutex::new(None),
                channels: Mutex::new(Vec::new()),
                killed: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        }
    }

    /// This host's id.
    pub fn id(&self) -> HostId {
        self.inner.id
    }

    /// Pages held now.
    pub fn held_pages(&self) -> u64 {
        lock(&self.inner.store).held
    }

    /// Statistics so far.
    pub fn stats(&self) -> PageHostStats {
        let c = &self.inner.counters;
        PageHostStats {
            held: self.held_pages(),
            stored: c.stored.load(Ordering::Relaxed),
            served: c.served.load(Ordering::Relaxed),
            not_held: c.not_held.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
        }
    }

    /// Serve `channel` on a new thread until it closes (or [`PageHost::kill`]).
    pub fn serve(&self, channel: Box<dyn Channel>) -> JoinHandle<()> {
        let ch: Arc<dyn Channel> = Arc::from(channel);
        lock(&self.inner.channels).push(ch.clone());
        ChannelServer::spawn(self.inner.clone(), ch)
    }

    /// Stop serving at once and close every channel, as if the host died
    /// (for tests and demos of a lost host).
    pub fn kill(&self) {
        self.inner.killed.store(true, Ordering::Release);
        for ch in lock(&self.inner.channels).drain(..) {
            ch.shutdown();
        }
        if let Some(r) = lock(&self.inner.relay).take() {
            r.shutdown();
        }
    }
}

impl HostInner {
    fn serve(self: Arc<Self>, ch: Arc<dyn Channel>) {
        let mut link = LinkState::default();
        while !self.killed.load(Ordering::Acquire) {
            let msg = match ch.recv(Some(Duration::from_millis(200))) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(_) => break,
            };
            let Message::Split(m) = msg else {
                refuse(
                    &*ch,
                    format!("{} is not a split-memory message", msg.name()),
                );
                continue;
            };
            if let Err(reason) = self.handle(&ch, m, &mut link) {
                refuse(&*ch, reason);
            }
        }
        lock(&self.channels).retain(|c| !Arc::ptr_eq(c, &ch));
    }

    fn handle(
        self: &Arc<Self>,
        ch: &Arc<dyn Channel>,
        m: SplitMessage,
        link: &mut LinkState,
    ) -> Result<(), String> {
        match m {
            SplitMessage::Attach { from, to, region } => {
                if to != self.id {
                    return Err(format!("this is {}, not {to}", self.id));
                }
                self.attach(&region)?;
                link.peer = Some(from);
                Ok(())
            }
            SplitMessage::Fetch { epoch, run } => self.fetch(&**ch, epoch, run),
            SplitMessage::Data { from, epoch, batch } => {
                link.received += self.on_data(from, epoch, batch)?;
                Ok(())
            }
            SplitMessage::Sync { seq } => ch
                .send(&Message::Split(SplitMessage::Synced {
                    seq,
                    pages: link.received,
                }))
                .map_err(|e| e.to_string()),
            SplitMessage::Send {
                to,
                endpoint,
                epoch,
                runs,
            } => {
                // Pages for the host at the other end of this channel go
                // back on it: no connection to open, no handshake, and the
                // `Sent` behind them on the same lane tells that they were
                // handled.
                let back = (link.peer == Some(to)).then(|| ch.clone());
                let order = SendOrder {
                    to,
                    endpoint,
                    epoch,
                    runs,
                };
                PageSender::spawn(self.clone(), ch.clone(), order, back)
            }
            SplitMessage::Relay { to, endpoint, .. } => self.relay(to, &endpoint),
            SplitMessage::Forget { runs, .. } => {
                self.forget(&runs);
                Ok(())
            }
            SplitMessage::NotHeld { .. }
            | SplitMessage::Synced { .. }
            | SplitMessage::Sent { .. }
            | SplitMessage::Refused { .. } => Ok(()),
        }
    }

    /// Pages `from` sent as of `epoch`: stored, or forwarded to the relay.
    /// Returns how many.
    fn on_data(&self, from: HostId, epoch: u64, batch: PageBatch) -> Result<u64, String> {
        let pages = u64::from(batch.run.count);
        let relay = lock(&self.relay).clone();
        match relay {
            Some(r) => {
                r.send(&Message::Split(SplitMessage::Data { from, epoch, batch }))
                    .map_err(|e| format!("relay: {e}"))?;
                self.counters.forwarded.fetch_add(pages, Ordering::Relaxed);
            }
            None => self.store(&batch)?,
        }
        Ok(pages)
    }

    /// Forward what arrives to `to` at `endpoint` from now on (attached as
    /// this host); an empty endpoint ends the relay. A former relay channel
    /// is drained (synced) and closed.
    fn relay(&self, to: HostId, endpoint: &str) -> Result<(), String> {
        let old = if endpoint.is_empty() {
            lock(&self.relay).take()
        } else {
            let region = lock(&self.store)
                .region
                .clone()
                .ok_or("relay before attach")?;
            let r: Arc<dyn Channel> = Arc::from((self.dial)(endpoint).map_err(|e| e.to_string())?);
            r.send(&Message::Split(SplitMessage::Attach {
                from: self.id,
                to,
                region,
            }))
            .map_err(|e| e.to_string())?;
            lock(&self.relay).replace(r)
        };
        if let Some(old) = old {
            if let Err(e) = sync_with(&*old, u64::MAX) {
                debug!(error = %e, "page host: syncing with the former relay failed");
            }
            old.shutdown();
        }
        Ok(())
    }

    /// Drop the pages of `runs` held here.
    fn forget(&self, runs: &[PageRun]) {
        let mut st = lock(&self.store);
        for run in runs {
            let end = run.end().min(st.pages.len() as u64);
            for p in run.first.min(end)..end {
                if st.pages[p as usize].take().is_some() {
                    st.held -= 1;
                }
            }
        }
    }

    fn attach(&self, region: &RegionInfo) -> Result<(), String> {
        region.validate().map_err(|e| e.to_string())?;
        let mut st = lock(&self.store);
        match &st.region {
            Some(r) if r == region => Ok(()),
            Some(r) => Err(format!(
                "region {} is {} bytes of {}-byte pages here, {} bytes of {}-byte pages offered",
                r.id, r.len, r.page_size, region.len, region.page_size
            )),
            None => {
                st.pages = vec![None; region.pages() as usize];
                st.region = Some(region.clone());
                Ok(())
            }
        }
    }

    fn store(&self, batch: &PageBatch) -> Result<(), String> {
        let mut st = lock(&self.store);
        let region = st.region.clone().ok_or("pages before attach")?;
        region.check_run(&batch.run).map_err(|e| e.to_string())?;
        let ps = region.page_size as usize;
        let n = batch.run.count as usize;
        let data = match &batch.data {
            PageData::Raw(d) if d.len() == n * ps => d.clone(),
            PageData::Raw(d) => {
                return Err(format!("{} bytes for {} pages of {ps}", d.len(), n));
            }
            PageData::Zero => Bytes::from(vec![0u8; n * ps]),
        };
        for i in 0..n {
            let slot = &mut st.pages[batch.run.first as usize + i];
            let had = slot.replace((data.clone(), i * ps)).is_some();
            if !had {
                st.held += 1;
            }
        }
        self.counters.stored.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The held sub-runs of `run` with their content, and the pages not held.
    fn gather(&self, run: &PageRun) -> Result<Gathered, String> {
        let st = lock(&self.store);
        let region = st.region.as_ref().ok_or("fetch before attach")?;
        region.check_run(run).map_err(|e| e.to_string())?;
        let ps = region.page_size as usize;
        let mut held = Vec::new();
        let mut missing = Vec::new();
        let mut p = run.first;
        while p < run.end() {
            let has = st.pages[p as usize].is_some();
            let mut q = p;
            while q < run.end() && st.pages[q as usize].is_some() == has {
                q += 1;
            }
            let sub = PageRun::new(run.region, p, (q - p) as u32);
            if has {
                let pages = &st.pages[p as usize..q as usize];
                // One slice when the pages lie in order in one batch.
                let whole = match pages.first() {
                    Some(Some((first, off))) => pages.iter().enumerate().all(|(i, e)| {
                        e.as_ref().is_some_and(|(b, o)| {
                            b.as_ptr() == first.as_ptr()
                                && b.len() == first.len()
                                && *o == off + i * ps
                        })
                    }),
                    _ => false,
                };
                let data = match pages.first() {
                    Some(Some((first, off))) if whole => first.slice(*off..*off + pages.len() * ps),
                    _ => {
                        let mut buf = BytesMut::with_capacity(pages.len() * ps);
                        for (b, o) in pages.iter().flatten() {
                            buf.extend_from_slice(&b[*o..*o + ps]);
                        }
                        buf.freeze()
                    }
                };
                held.push((sub, data));
            } else {
                missing.push(sub);
            }
            p = q;
        }
        Ok((held, missing))
    }

    /// The held pages of `run` as pieces of at most `max` pages that each
    /// lie in order in one stored batch (a slice of it, no copy), and how
    /// many pages of `run` are not held.
    fn pieces(&self, run: &PageRun, max: u32) -> Result<(Vec<(PageRun, Bytes)>, u64), String> {
        let st = lock(&self.store);
        let region = st.region.as_ref().ok_or("send before attach")?;
        region.check_run(run).map_err(|e| e.to_string())?;
        let ps = region.page_size as usize;
        let mut pieces = Vec::new();
        let mut missing = 0u64;
        let mut p = run.first;
        while p < run.end() {
            let Some((first, off)) = &st.pages[p as usize] else {
                missing += 1;
                p += 1;
                continue;
            };
            let mut q = p + 1;
            while q < run.end()
                && q - p < u64::from(max)
                && st.pages[q as usize].as_ref().is_some_and(|(b, o)| {
                    b.as_ptr() == first.as_ptr()
                        && b.len() == first.len()
                        && *o == off + (q - p) as usize * ps
                })
            {
                q += 1;
            }
            let sub = PageRun::new(run.region, p, (q - p) as u32);
            pieces.push((sub, first.slice(*off..*off + (q - p) as usize * ps)));
            p = q;
        }
        Ok((pieces, missing))
    }

    fn fetch(&self, ch: &dyn Channel, epoch: u64, run: PageRun) -> Result<(), String> {
        let (held, missing) = self.gather(&run)?;
        for (sub, data) in held {
            self.counters
                .served
                .fetch_add(u64::from(sub.count), Ordering::Relaxed);
            ch.send_urgent(&Message::Split(SplitMessage::Data {
                from: self.id,
                epoch,
                batch: PageBatch {
                    round: 0,
                    run: sub,
                    data: PageData::Raw(data),
                },
            }))
            .map_err(|e| e.to_string())?;
        }
        for sub in missing {
            self.counters
                .not_held
                .fetch_add(u64::from(sub.count), Ordering::Relaxed);
            ch.send_urgent(&Message::Split(SplitMessage::NotHeld {
                from: self.id,
                epoch,
                run: sub,
            }))
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Send the held pages of `runs` straight to `to`, on `back` (the
    /// channel the request came on, whose other end is `to`) or on a new
    /// channel to `endpoint`; (pages sent, pages not held).
    fn send_to(
        &self,
        to: HostId,
        endpoint: &str,
        epoch: u64,
        runs: &[PageRun],
        back: Option<Arc<dyn Channel>>,
    ) -> Result<(u64, u64), MigrationError> {
        let region = lock(&self.store)
            .region
            .clone()
            .ok_or_else(|| MigrationError::invalid("Send", "before attach"))?;
        let dialed = back.is_none();
        let ch: Arc<dyn Channel> = match back {
            Some(ch) => ch,
            None => {
                let ch: Arc<dyn Channel> = Arc::from((self.dial)(endpoint)?);
                ch.send(&Message::Split(SplitMessage::Attach {
                    from: self.id,
                    to,
                    region,
                }))?;
                ch
            }
        };
        let (mut sent, mut missing) = (0u64, 0u64);
        for run in runs {
            let mut f = run.first;
            while f < run.end() {
                // Back to the running host, pages go as slices of the
                // batches they were stored in: it copies them into place
                // and drops the message. A host that stores them (the new
                // owner in a partial migration) or forwards them (a relay)
                // gets full windows of `BATCH_PAGES` (copied together
                // where they span stored batches): fewer, fuller messages
                // cost it less than the copy saves. Either way a bounded
                // window per look-up, so fetches served meanwhile do not
                // wait long for the store.
                let (n, (held, not)) = if dialed {
                    let n = (run.end() - f).min(u64::from(BATCH_PAGES)) as u32;
                    let (held, not) = self
                        .gather(&PageRun::new(run.region, f, n))
                        .map_err(|e| MigrationError::invalid("Send", e))?;
                    (n, (held, not.iter().map(|r| u64::from(r.count)).sum()))
                } else {
                    let n = (run.end() - f).min(SEND_WINDOW) as u32;
                    let pieces = self
                        .pieces(&PageRun::new(run.region, f, n), BATCH_PAGES)
                        .map_err(|e| MigrationError::invalid("Send", e))?;
                    (n, pieces)
                };
                missing += not;
                for (sub, data) in held {
                    ch.send(&Message::Split(SplitMessage::Data {
                        from: self.id,
                        epoch,
                        batch: PageBatch {
                            round: 0,
                            run: sub,
                            data: PageData::Raw(data),
                        },
                    }))?;
                    sent += u64::from(sub.count);
                }
                f += u64::from(n);
            }
        }
        if dialed {
            let acked = sync_with(&*ch, 1);
            ch.shutdown();
            acked?;
        }
        self.counters.sent.fetch_add(sent, Ordering::Relaxed);
        Ok((sent, missing))
    }
}

/// Send `Sync{seq}` and wait for its `Synced` (bounded by [`ACK_TIMEOUT`]).
fn sync_with(ch: &dyn Channel, seq: u64) -> Result<u64, MigrationError> {
    ch.send(&Message::Split(SplitMessage::Sync { seq }))?;
    let deadline = Instant::now() + ACK_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrationError::Timeout {
                waiting_for: "Synced",
                after: ACK_TIMEOUT,
            });
        }
        match ch.recv(Some(left))? {
            Some(Message::Split(SplitMessage::Synced { seq: s, pages })) if s == seq => {
                return Ok(pages);
            }
            Some(Message::Split(SplitMessage::Refused { reason })) => {
                return Err(MigrationError::PeerAborted { reason });
            }
            _ => {}
        }
    }
}

/// A `Send` order: pages to send to another host.
struct SendOrder {
    to: HostId,
    endpoint: String,
    epoch: u64,
    runs: Vec<PageRun>,
}

/// Sends the pages of one `Send` order (`pagehost-send-<id>`), then answers
/// `Sent` (or `Refused`) on the channel the order came on. Detached: the
/// answer is what the running host waits for.
struct PageSender;

impl PageSender {
    fn spawn(
        host: Arc<HostInner>,
        ch: Arc<dyn Channel>,
        order: SendOrder,
        back: Option<Arc<dyn Channel>>,
    ) -> Result<(), String> {
        std::thread::Builder::new()
            .name(format!("pagehost-send-{}", host.id.0))
            .spawn(move || Self::run(&host, &*ch, order, back))
            .map(|_| ())
            .map_err(|e| format!("spawn sender: {e}"))
    }

    fn run(host: &HostInner, ch: &dyn Channel, order: SendOrder, back: Option<Arc<dyn Channel>>) {
        let SendOrder {
            to,
            endpoint,
            epoch,
            runs,
        } = order;
        let reply = match host.send_to(to, &endpoint, epoch, &runs, back) {
            Ok((pages, missing)) => SplitMessage::Sent {
                from: host.id,
                to,
                epoch,
                pages,
                missing,
            },
            Err(e) => SplitMessage::Refused {
                reason: format!("sending to {to} at {endpoint}: {e}"),
            },
        };
        if let Err(e) = ch.send(&Message::Split(reply)) {
            debug!(error = %e, "page host: the reply to Send could not be sent");
        }
    }
}

/// Serves one channel (`pagehost-<id>`) until it closes or the host is
/// killed; the caller joins it.
struct ChannelServer;

impl ChannelServer {
    fn spawn(host: Arc<HostInner>, ch: Arc<dyn Channel>) -> JoinHandle<()> {
        std::thread::Builder::new()
            .name(format!("pagehost-{}", host.id.0))
            .spawn(move || host.serve(ch))
            .expect("spawn page-host thread")
    }
}
