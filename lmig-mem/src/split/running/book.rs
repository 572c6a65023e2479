//! The running host's page book: where every page of a split region is and
//! what happens to it, with no IO.
//!
//! Each page is in one [`PageState`]:
//!
//! ```text
//!            fault: Fetch               answer claimed              copy done
//!   Remote ───────────────▶ Fetching ──────────────────▶ Placing ─────────────▶ Local
//!     ▲   ◀─────────────────    │  (NotHeld, lost host,      │ copy failed:           │
//!     │     fetch failed        │   send failed)             │ back to the sender     │ begin_evict
//!     │                         └── answer from a former ────┘                        ▼
//!     │                             owner: refetch                                 Evicting
//!     │                                                                 write: written = true
//!     └──────────────────────── acknowledged, not written (evicted) ◀────────────────┘
//!                                 (written pages, or a failed eviction: Local again)
//! ```
//!
//! Answers from hosts are checked against the owner map as of the epoch
//! they were asked at ([`PageBook::claim_answer`]); a partial migration
//! switches owners in one step and re-aims the fetches waiting on the
//! drained host ([`PageBook::switch`]).
//!
//! The book is a plain value behind the region's lock: the loops around it
//! (fault handler, links, eviction, partial migration, gather) ask it for a
//! decision, do the IO the decision names (`UFFDIO_COPY`, `MADV_DONTNEED`,
//! messages) and report back.

use std::collections::HashMap;

use lmig_core::Result;
use lmig_core::model::{PageRun, PageSet};
use lmig_core::split::{Answer, HostId, OwnerMap};

/// Where one page is, as the running host sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum PageState {
    /// Held here; the program uses it freely.
    Local,
    /// Held here and write-protected while it is sent to another host;
    /// `written` when the program wrote it meanwhile (it then stays here).
    Evicting {
        /// Written during the eviction.
        written: bool,
    },
    /// Being copied in from an answer: the owner map gives it to this host
    /// already; a fault on it waits for the copy, which wakes it.
    Placing,
    /// Held by `owner`; nobody here asked for it.
    Remote {
        /// The host holding it.
        owner: HostId,
    },
    /// Held by `owner` and asked for from `asked` (the owner when the fetch
    /// left, or the new owner after a partial migration): a thread waits.
    Fetching {
        /// The host holding it.
        owner: HostId,
        /// The host the fetch went to.
        asked: HostId,
    },
}

/// What to do about a missing-page fault or a refetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FaultDecision {
    /// Nothing: the page is not in the region, a fetch for it is out
    /// already, or its owner is lost.
    Ignore,
    /// The page is being copied in; the copy wakes the waiters.
    AwaitPlacement,
    /// The page is here already (a fault reported twice, or one racing the
    /// placement): wake the waiters.
    AlreadyHere,
    /// Ask `owner` for `run` (the page and its pre-paged neighbours) as of
    /// `epoch`; the pages are now [`PageState::Fetching`].
    Fetch {
        /// Whom to ask.
        owner: HostId,
        /// The pages.
        first: u64,
        /// How many.
        count: u64,
        /// The owner-map epoch of the request.
        epoch: u64,
    },
}

/// What became of the pages of one answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AnswerClaim {
    /// Maximal runs `(first, count)` to copy in, now [`PageState::Placing`].
    pub claimed: Vec<(u64, u64)>,
    /// Pages a thread waits on whose answer was discarded: ask their
    /// current owner again.
    pub refetch: Vec<u64>,
    /// Pages already here (or being placed).
    pub duplicates: u64,
    /// Pages whose owner changed after the answer's epoch.
    pub stale: u64,
    /// Pages the sender does not own.
    pub not_owner: u64,
}

/// The result of a partial migration's switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Switch {
    /// Pages that moved to the new host.
    pub moved: PageSet,
    /// Pages of the snapshot that changed hands during the move: the new
    /// host's copies of them are stale.
    pub stale: PageSet,
    /// Pages waiting on the drained host, now asked from the new one (sorted).
    pub refetch: Vec<u64>,
    /// The owner-map epoch of the switch.
    pub epoch: u64,
}

/// Every page's state on the running host (see the module docs).
///
/// The states are kept as sets, one per state, so that the book costs bits
/// per page; [`PageBook::state`] reads a page's one state from them. Only
/// the book's methods change them, so they cannot disagree.
#[derive(Clone, Debug)]
pub(crate) struct PageBook {
    me: HostId,
    pages: u64,
    map: OwnerMap,
    /// Held here (evicting pages included).
    local: PageSet,
    /// Being copied in; the map gives them to `me` already.
    placing: PageSet,
    /// Fetches out: page → host asked.
    pending: HashMap<u64, HostId>,
    /// Local pages write-protected for an eviction.
    evicting: PageSet,
    /// Evicting pages written meanwhile.
    evict_dirty: PageSet,
}

impl PageBook {
    /// A book where `me` holds every page of `map` (which must say so).
    pub(crate) fn new(map: OwnerMap, me: HostId) -> Self {
        let pages = map.pages();
        Self {
            me,
            pages,
            map,
            local: PageSet::full(pages),
            placing: PageSet::new(pages),
            pending: HashMap::new(),
            evicting: PageSet::new(pages),
            evict_dirty: PageSet::new(pages),
        }
    }

    /// The owner map.
    pub(crate) fn map(&self) -> &OwnerMap {
        &self.map
    }

    /// Register page host `host` in the owner map.
    pub(crate) fn add_host(&mut self, host: HostId) -> Result<()> {
        self.map.add_host(host)
    }

    /// The state of `page`, or `None` outside the region.
    pub(crate) fn state(&self, page: u64) -> Option<PageState> {
        let owner = self.map.owner(page).ok()?;
        Some(if self.placing.contains(page) {
            PageState::Placing
        } else if self.evicting.contains(page) {
            PageState::Evicting {
                written: self.evict_dirty.contains(page),
            }
        } else if self.local.contains(page) {
            PageState::Local
        } else if let Some(&asked) = self.pending.get(&page) {
            PageState::Fetching { owner, asked }
        } else {
            PageState::Remote { owner }
        })
    }

    /// Held here, or being copied in.
    pub(crate) fn is_here(&self, page: u64) -> bool {
        matches!(
            self.state(page),
            Some(PageState::Local | PageState::Evicting { .. } | PageState::Placing)
        )
    }

    /// Pages held here or being copied in.
    pub(crate) fn held_here(&self) -> u64 {
        self.local.count() + self.placing.count()
    }

    /// Every page is held here (placements finished).
    pub(crate) fn all_local(&self) -> bool {
        self.local.count() == self.pages
    }

    /// A missing-page fault on `page` (`fault`), or a refetch of it: what to
    /// do. With pre-paging, up to `prepage` pages after it and half as many
    /// before it are asked for too when `owner` holds them and nobody asked
    /// yet. `is_dead` says whether a host is lost.
    pub(crate) fn fault(
        &mut self,
        page: u64,
        prepage: u32,
        is_dead: impl Fn(HostId) -> bool,
    ) -> FaultDecision {
        let Ok(owner) = self.map.owner(page) else {
            return FaultDecision::Ignore;
        };
        if self.placing.contains(page) {
            return FaultDecision::AwaitPlacement;
        }
        if self.local.contains(page) || owner == self.me {
            return FaultDecision::AlreadyHere;
        }
        if self.pending.contains_key(&page) || is_dead(owner) {
            return FaultDecision::Ignore;
        }
        let wanted = |p: u64| {
            !self.local.contains(p)
                && !self.placing.contains(p)
                && !self.pending.contains_key(&p)
                && self.map.owner(p).ok() == Some(owner)
        };
        let before = u64::from(prepage / 2);
        let after = u64::from(prepage);
        let mut lo = page;
        while lo > 0 && page - lo < before && wanted(lo - 1) {
            lo -= 1;
        }
        let mut hi = page + 1;
        while hi < self.pages && hi - page <= after && wanted(hi) {
            hi += 1;
        }
        for p in lo..hi {
            self.pending.insert(p, owner);
        }
        FaultDecision::Fetch {
            owner,
            first: lo,
            count: hi - lo,
            epoch: self.map.epoch(),
        }
    }

    /// The fetch of `first..first + count` could not be sent: nobody is
    /// asked for those pages any more.
    pub(crate) fn fetch_failed(&mut self, first: u64, count: u64) {
        for p in first..first + count {
            self.pending.remove(&p);
        }
    }

    /// `host` says it does not hold `run` (asked as of `epoch`). Its fetches
    /// there end. True when the owner map, as of `epoch`, does give it one
    /// of those pages: the host contradicts the map.
    pub(crate) fn not_held(&mut self, host: HostId, run: &PageRun, epoch: u64) -> bool {
        for p in run.first..run.end() {
            if self.pending.get(&p) == Some(&host) {
                self.pending.remove(&p);
            }
        }
        (run.first..run.end())
            .any(|p| matches!(self.map.check_answer(host, epoch, p), Ok(Answer::Current)))
    }

    /// `host` is lost: its fetches end. Returns the pages it held.
    pub(crate) fn host_lost(&mut self, host: HostId) -> PageSet {
        self.pending.retain(|_, h| *h != host);
        self.map.pages_of(host)
    }

    /// `from` answered with the pages of `run` as of `epoch` (`run` already
    /// checked against the region). Pages it may place (it owns them and
    /// they did not change hands since `epoch`; not here yet) switch to this
    /// host and become [`PageState::Placing`]; fetches waiting on `from`
    /// end, and those whose answer is discarded are to be asked again.
    pub(crate) fn claim_answer(
        &mut self,
        from: HostId,
        epoch: u64,
        run: &PageRun,
    ) -> Result<AnswerClaim> {
        let mut claim = AnswerClaim::default();
        let oks: Vec<bool> = (run.first..run.end())
            .map(|p| self.verdict(from, epoch, p, &mut claim))
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
                self.map.assign(p, q - p, self.me)?;
                self.placing.insert_range(p, q - p);
                claim.claimed.push((p, q - p));
            }
            p = q;
        }
        Ok(claim)
    }

    /// May page `p` of an answer from `from` as of `epoch` be placed?
    fn verdict(&mut self, from: HostId, epoch: u64, p: u64, claim: &mut AnswerClaim) -> bool {
        let was_pending = self.pending.get(&p) == Some(&from);
        if was_pending {
            self.pending.remove(&p);
        }
        if self.local.contains(p) || self.placing.contains(p) {
            claim.duplicates += 1;
            return false;
        }
        match self.map.check_answer(from, epoch, p) {
            Ok(Answer::Current) => return true,
            Ok(Answer::Stale { .. }) => claim.stale += 1,
            Ok(Answer::NotOwner { .. }) | Err(_) => claim.not_owner += 1,
        }
        if was_pending {
            claim.refetch.push(p);
        }
        false
    }

    /// The copy of the claimed run `first..first + count` placed its first
    /// `done` pages: they are here; the rest go back to `from`, which still
    /// holds them. True when some were not placed (their waiters need a
    /// wake-up).
    pub(crate) fn placed(
        &mut self,
        first: u64,
        count: u64,
        done: u64,
        from: HostId,
    ) -> Result<bool> {
        self.placing.remove_range(first, count);
        self.local.insert_range(first, done);
        if done < count {
            self.map.assign(first + done, count - done, from)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Begin evicting the pages of `runs` (already checked against the
    /// region): those held here and not under eviction already become
    /// [`PageState::Evicting`]. Returns them, to write-protect and send.
    pub(crate) fn begin_evict(&mut self, runs: &[PageRun]) -> PageSet {
        let mut set = PageSet::new(self.pages);
        for r in runs {
            for p in r.first..r.end() {
                if self.local.contains(p) && !self.evicting.contains(p) {
                    set.insert(p);
                }
            }
        }
        self.evicting.union_with(&set);
        set
    }

    /// A write to `page` (write-protected): when it is under eviction it is
    /// kept here. True the first time.
    pub(crate) fn written(&mut self, page: u64) -> bool {
        self.evicting.contains(page) && self.evict_dirty.insert(page)
    }

    /// The host acknowledged the eviction of `set`: the maximal runs of it
    /// not written meanwhile, to drop here ([`PageBook::evicted`] each).
    pub(crate) fn evict_drops(&self, set: &PageSet) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (first, count) in set.runs() {
            let mut p = first;
            while p < first + count {
                let drop_it = !self.evict_dirty.contains(p);
                let mut q = p + 1;
                while q < first + count && self.evict_dirty.contains(q) != drop_it {
                    q += 1;
                }
                if drop_it {
                    out.push((p, q - p));
                }
                p = q;
            }
        }
        out
    }

    /// `first..first + count` was dropped here: `host` holds it now.
    pub(crate) fn evicted(&mut self, first: u64, count: u64, host: HostId) -> Result<()> {
        self.local.remove_range(first, count);
        self.map.assign(first, count, host)?;
        Ok(())
    }

    /// The eviction of `set` is over (done or failed): what stayed here is
    /// [`PageState::Local`] again.
    pub(crate) fn end_evict(&mut self, set: &PageSet) {
        self.evicting.subtract(set);
        let mut dirty = self.evict_dirty.clone();
        dirty.subtract(&self.evicting);
        self.evict_dirty.subtract(&dirty);
    }

    /// The partial migration of `snapshot` (what `from` held at epoch
    /// `since`) to `to` is acknowledged: switch its pages in one step, and
    /// aim the fetches waiting on `from` at `to`.
    pub(crate) fn switch(
        &mut self,
        snapshot: &PageSet,
        from: HostId,
        since: u64,
        to: HostId,
    ) -> Result<Switch> {
        let moved = self.map.switch(snapshot, from, since, to)?;
        let epoch = self.map.epoch();
        let mut stale = snapshot.clone();
        stale.subtract(&moved);
        let mut refetch = Vec::new();
        for (p, h) in self.pending.iter_mut() {
            if *h == from && moved.contains(*p) {
                *h = to;
                refetch.push(*p);
            }
        }
        refetch.sort_unstable();
        Ok(Switch {
            moved,
            stale,
            refetch,
            epoch,
        })
    }

    /// Every other host holding pages, with its pages.
    pub(crate) fn remote_parts(&self) -> Vec<(HostId, PageSet)> {
        self.map
            .counts()
            .into_iter()
            .filter(|&(h, n)| h != self.me && n > 0)
            .map(|(h, _)| (h, self.map.pages_of(h)))
            .collect()
    }
}

#[cfg(test)]
mod tests;
