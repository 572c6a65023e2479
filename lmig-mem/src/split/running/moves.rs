//! Moving pages between hosts: eviction to a page host, partial migration
//! from one page host to another, and reintegration (gather).

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use lmig_core::model::{PageRun, PageSet};
use lmig_core::protocol::{Message, PageBatch, PageData};
use lmig_core::split::{HostId, SplitMessage, runs_of_set};

use super::book::Switch;
use super::reports::{GatherReport, MoveReport};
use super::shared::{Inner, Link, proto, set_of};
use crate::error::MemError;
use crate::split::{BATCH_PAGES, Result, SplitError};
use crate::sys::uffd;

impl Inner {
    pub(super) fn evict(&self, host: HostId, runs: &[PageRun]) -> Result<u64> {
        let link = self.link(host)?;
        let (set, epoch) = {
            let mut st = self.lock();
            if !st.book.map().knows(host) || st.dead.contains(&host) {
                return Err(SplitError::UnknownHost { host });
            }
            if st.draining.contains(&host) {
                return Err(SplitError::State(format!(
                    "{host} is being drained by a partial migration"
                )));
            }
            for r in runs {
                self.region.run_bytes(r)?;
            }
            let set = st.book.begin_evict(runs);
            (set, st.book.map().epoch())
        };
        let result = self.evict_set(host, &link, &set, epoch);
        let mut st = self.lock();
        let mut evicted = 0u64;
        if result.is_ok() {
            for (p, n) in st.book.evict_drops(&set) {
                let off = (p * self.page_size) as usize;
                let len = (n * self.page_size) as usize;
                self.region
                    .mapping()
                    .discard(off, len, libc::MADV_DONTNEED)
                    .map_err(|e| {
                        MemError::os("madvise(MADV_DONTNEED)", self.region.describe(), e)
                    })?;
                st.book.evicted(p, n, host)?;
                evicted += n;
            }
        }
        st.book.end_evict(&set);
        // Lift the protection of what stayed here (dropped pages have none).
        for (first, count) in set.runs() {
            if let Err(e) = uffd::writeprotect(
                self.uffd.as_fd(),
                self.addr(first),
                count * self.page_size,
                false,
            ) {
                debug!(error = %e, "eviction: lifting write protection failed (a write fault lifts it)");
            }
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

    /// The copy phase of a partial migration: ask `from` to send `snapshot`
    /// (what it held at epoch `e0`) straight to `to`, and wait until it
    /// says `to` acknowledged all of it.
    fn copy_between(
        &self,
        from: HostId,
        to: HostId,
        src: &Link,
        dst: &Link,
        snapshot: &PageSet,
        e0: u64,
    ) -> Result<()> {
        let runs = runs_of_set(self.region.id(), snapshot, u32::MAX);
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
    }

    pub(super) fn move_host(&self, from: HostId, to: HostId) -> Result<MoveReport> {
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
            (st.book.map().pages_of(from), st.book.map().epoch())
        };
        let result = self.copy_between(from, to, &src, &dst, &snapshot, e0);
        let mut st = self.lock();
        st.draining.remove(&from);
        if let Err(e) = result {
            drop(st);
            // The new host's partial copies are of no use.
            let runs = runs_of_set(self.region.id(), &snapshot, u32::MAX);
            if let Err(e) = dst
                .ch
                .send(&Message::Split(SplitMessage::Forget { epoch: e0, runs }))
            {
                debug!(error = %e, "failed move: telling the new host to forget its partial copies failed");
            }
            return Err(e);
        }
        // The switch: one step, one epoch; fetches still waiting on the old
        // owner go to the new one.
        let Switch {
            moved,
            stale,
            refetch,
            epoch,
        } = st.book.switch(&snapshot, from, e0, to)?;
        drop(st);
        for run in runs_of_set(self.region.id(), &set_of(self.pages, &refetch), BATCH_PAGES) {
            self.counters.refetched.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = dst
                .ch
                .send_urgent(&Message::Split(SplitMessage::Fetch { epoch, run }))
            {
                debug!(error = %e, "move: a refetch from the new owner could not be sent (its link is broken)");
            }
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

    pub(super) fn gather(&self, my_endpoint: &str, relay: Option<HostId>) -> Result<GatherReport> {
        let (parts, epoch, before) = {
            let st = self.lock();
            let parts = st.book.remote_parts();
            if let Some((h, _)) = parts.iter().find(|(h, _)| st.dead.contains(h)) {
                return Err(SplitError::UnknownHost { host: *h });
            }
            // Pages being placed (a fetch in progress) are here already,
            // as `stats().local` counts them: the gather does not move them.
            (parts, st.book.map().epoch(), st.book.held_here())
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
        let result = self.wait_for("every page to arrive", &watch, |st| st.book.all_local());
        if let Some(r) = relay {
            if let Ok(link) = self.link(r) {
                if let Err(e) = link.ch.send(&Message::Split(SplitMessage::Relay {
                    to: self.me,
                    endpoint: String::new(),
                    epoch,
                })) {
                    debug!(error = %e, "gather: ending the relay failed");
                }
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
                if let Err(e) = l.ch.send(&Message::Split(SplitMessage::Forget {
                    epoch,
                    runs: vec![self.whole()],
                })) {
                    debug!(error = %e, "gather done: telling a page host to forget its pages failed");
                }
            }
        }
        Ok(GatherReport {
            pages: pages - before,
            hosts: n,
        })
    }
}
