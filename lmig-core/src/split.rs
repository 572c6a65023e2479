//! Split memory (IPmigrate): a region whose pages live on several hosts.
//!
//! The program runs on one host (the *running host*); its region's pages are
//! held there or by *page hosts*. The [`OwnerMap`] says, for every page,
//! which host holds it now. Every change of ownership bumps the map's epoch
//! and records it on the page, so an answer sent by a former owner — a page
//! fetched before a partial migration moved it elsewhere, arriving after the
//! switch — is recognised ([`OwnerMap::check_answer`]) and discarded instead
//! of being placed.
//!
//! # Messages
//!
//! [`SplitMessage`] travels as one `Message::Split` variant:
//!
//! ```text
//! running host                          page host A                page host D
//!   Attach{region} ─────────────────────▶ (geometry checked)
//!   Data{from, epoch, pages} ───────────▶ store (eviction / split migration)
//!   Sync{seq} ──────────────────────────▶
//!   ◀──────────────────────────────────── Synced{seq, pages}   (then MADV_DONTNEED)
//!   Fetch{epoch, run} (urgent) ─────────▶
//!   ◀──────────────────────────────────── Data{from: A, epoch, pages} | NotHeld
//!   Send{to: D, endpoint, epoch, runs} ─▶ Attach, Data…, Sync ─────▶ store
//!                                         ◀───────────────────────── Synced
//!   ◀──────────────────────────────────── Sent{from, to, epoch, pages}
//!   [owner map switches A → D for the pages A still owned]
//!   Forget{runs} ───────────────────────▶ drop
//!   Relay{to, endpoint} ────────────────▶ forward pages arriving from other hosts
//! ```
//!
//! Reintegration is `Send{to: running host}` to every page host at once:
//! each dials the running host and sends its part directly, in parallel.

use crate::error::{MigrationError, Result};
use crate::model::{PageBatch, PageRun, PageSet, RegionId, RegionInfo};

/// A host taking part in split memory (the running host or a page host).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(pub u32);

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host {}", self.0)
    }
}

/// Most hosts one owner map may name.
pub const MAX_HOSTS: usize = 1024;
/// Most runs one `Send` or `Forget` message may carry.
pub const MAX_SPLIT_RUNS: usize = 1 << 22;
/// Longest endpoint string in `Send` / `Relay`.
pub const MAX_ENDPOINT_BYTES: usize = 512;

/// What [`OwnerMap::check_answer`] found about pages a host sent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The sender owns the page and it has not changed hands since `epoch`:
    /// the content may be placed.
    Current,
    /// The sender owned the page, but ownership changed after the epoch the
    /// answer is for: a late answer from a former owner. Discard it.
    Stale {
        /// The epoch at which the page last changed hands.
        changed: u64,
    },
    /// The sender does not own the page. Discard it.
    NotOwner {
        /// The page's real owner.
        owner: HostId,
    },
}

/// For every page of one region, the host that holds it now.
///
/// Hosts are registered first ([`OwnerMap::add_host`]); naming any other
/// host is an error. Every change bumps [`OwnerMap::epoch`] and stamps the
/// pages it touched, which is what makes late answers recognisable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerMap {
    region: RegionInfo,
    hosts: Vec<HostId>,
    owner: Vec<u16>,
    changed: Vec<u64>,
    epoch: u64,
}

impl OwnerMap {
    /// A map where `initial` holds every page of `region` (epoch 0).
    pub fn new(region: RegionInfo, initial: HostId) -> Result<Self> {
        region.validate()?;
        let pages = region.pages();
        let pages = usize::try_from(pages)
            .map_err(|_| MigrationError::invalid("owner map", "region too large"))?;
        Ok(Self {
            region,
            hosts: vec![initial],
            owner: vec![0; pages],
            changed: vec![0; pages],
            epoch: 0,
        })
    }

    /// A map from a list of `(host, run)` assignments, as another host would
    /// send it: every host must be in `hosts`, every run inside the region,
    /// and every page covered exactly once.
    pub fn from_runs(
        region: RegionInfo,
        hosts: &[HostId],
        runs: &[(HostId, PageRun)],
    ) -> Result<Self> {
        let Some(&first) = hosts.first() else {
            return Err(MigrationError::invalid("owner map", "no hosts"));
        };
        if hosts.len() > MAX_HOSTS {
            return Err(MigrationError::invalid(
                "owner map",
                format!("{} hosts, at most {MAX_HOSTS}", hosts.len()),
            ));
        }
        let mut map = Self::new(region, first)?;
        for &h in &hosts[1..] {
            map.add_host(h)?;
        }
        let mut seen = PageSet::new(map.pages());
        for (host, run) in runs {
            map.region.check_run(run)?;
            let idx = map.index(*host)?;
            for p in run.first..run.end() {
                if !seen.insert(p) {
                    return Err(MigrationError::invalid(
                        "owner map",
                        format!("page {p} assigned twice"),
                    ));
                }
                map.owner[p as usize] = idx;
            }
        }
        if seen.count() != map.pages() {
            return Err(MigrationError::invalid(
                "owner map",
                format!(
                    "{} of {} pages have no owner",
                    map.pages() - seen.count(),
                    map.pages()
                ),
            ));
        }
        Ok(map)
    }

    /// The region the map covers.
    pub fn region(&self) -> &RegionInfo {
        &self.region
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.owner.len() as u64
    }

    /// The current epoch (0 for a fresh map, bumped by every change).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The registered hosts.
    pub fn hosts(&self) -> &[HostId] {
        &self.hosts
    }

    /// Register a host (no page is assigned to it yet). Adding a known host is a no-op.
    pub fn add_host(&mut self, host: HostId) -> Result<()> {
        if self.hosts.contains(&host) {
            return Ok(());
        }
        if self.hosts.len() >= MAX_HOSTS {
            return Err(MigrationError::invalid(
                "owner map",
                format!("more than {MAX_HOSTS} hosts"),
            ));
        }
        self.hosts.push(host);
        Ok(())
    }

    /// Is `host` registered?
    pub fn knows(&self, host: HostId) -> bool {
        self.hosts.contains(&host)
    }

    fn index(&self, host: HostId) -> Result<u16> {
        self.hosts
            .iter()
            .position(|&h| h == host)
            .map(|i| i as u16)
            .ok_or_else(|| MigrationError::invalid("owner map", format!("unknown {host}")))
    }

    fn check_page(&self, page: u64) -> Result<usize> {
        if page >= self.pages() {
            return Err(MigrationError::PageOutsideRegion {
                run: PageRun::new(self.region.id, page, 1),
                region_pages: self.pages(),
            });
        }
        Ok(page as usize)
    }

    /// The host holding `page`.
    pub fn owner(&self, page: u64) -> Result<HostId> {
        let i = self.check_page(page)?;
        Ok(self.hosts[usize::from(self.owner[i])])
    }

    /// The epoch at which `page` last changed hands.
    pub fn changed_at(&self, page: u64) -> Result<u64> {
        let i = self.check_page(page)?;
        Ok(self.changed[i])
    }

    /// Give pages `first..first + count` to `host`; returns the new epoch.
    /// An unknown host or a run outside the region is an error and changes nothing.
    pub fn assign(&mut self, first: u64, count: u64, host: HostId) -> Result<u64> {
        let idx = self.index(host)?;
        let end = first
            .checked_add(count)
            .filter(|&e| e <= self.pages())
            .ok_or_else(|| {
                MigrationError::invalid(
                    "owner map",
                    format!("pages {first}+{count} outside {} pages", self.pages()),
                )
            })?;
        self.epoch += 1;
        for p in first as usize..end as usize {
            self.owner[p] = idx;
            self.changed[p] = self.epoch;
        }
        Ok(self.epoch)
    }

    /// Give every page of `pages` that `from` still owns and that has not
    /// changed hands after `since` to `to`, in one step (one epoch): the
    /// switch of a partial migration. Returns the pages moved.
    pub fn switch(
        &mut self,
        pages: &PageSet,
        from: HostId,
        since: u64,
        to: HostId,
    ) -> Result<PageSet> {
        let fi = self.index(from)?;
        let ti = self.index(to)?;
        let mut moved = PageSet::new(self.pages());
        self.epoch += 1;
        for p in pages.iter() {
            let i = p as usize;
            if i < self.owner.len() && self.owner[i] == fi && self.changed[i] <= since {
                self.owner[i] = ti;
                self.changed[i] = self.epoch;
                moved.insert(p);
            }
        }
        Ok(moved)
    }

    /// May pages `run` sent by `from`, as of `epoch`, be placed? The verdict
    /// of the first page that is not [`Answer::Current`], else `Current`.
    pub fn check_answer(&self, from: HostId, epoch: u64, page: u64) -> Result<Answer> {
        let i = self.check_page(page)?;
        let owner = self.hosts[usize::from(self.owner[i])];
        if owner != from {
            return Ok(Answer::NotOwner { owner });
        }
        if self.changed[i] > epoch {
            return Ok(Answer::Stale {
                changed: self.changed[i],
            });
        }
        Ok(Answer::Current)
    }

    /// The pages `host` holds.
    pub fn pages_of(&self, host: HostId) -> PageSet {
        let mut s = PageSet::new(self.pages());
        if let Ok(idx) = self.index(host) {
            for (p, &o) in self.owner.iter().enumerate() {
                if o == idx {
                    s.insert(p as u64);
                }
            }
        }
        s
    }

    /// The pages `host` holds, as runs of at most `max` pages.
    pub fn runs_of(&self, host: HostId, max: u32) -> Vec<PageRun> {
        runs_of_set(self.region.id, &self.pages_of(host), max)
    }

    /// How many pages each registered host holds.
    pub fn counts(&self) -> Vec<(HostId, u64)> {
        let mut c = vec![0u64; self.hosts.len()];
        for &o in &self.owner {
            c[usize::from(o)] += 1;
        }
        self.hosts.iter().copied().zip(c).collect()
    }
}

/// Pages `0..pages` of `region` in equal contiguous shares, one per host in
/// order (the last takes the remainder), as a split's assignment. Each share
/// must fit one run (`u32` pages).
pub fn even_shares(region: RegionId, pages: u64, hosts: &[HostId]) -> Vec<(HostId, Vec<PageRun>)> {
    let n = hosts.len().max(1) as u64;
    let share = pages / n;
    hosts
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            let first = i as u64 * share;
            let end = if i + 1 == hosts.len() {
                pages
            } else {
                first + share
            };
            (h, vec![PageRun::new(region, first, (end - first) as u32)])
        })
        .collect()
}

/// The runs of `set` (pages of region `region`), each at most `max` pages.
pub fn runs_of_set(region: RegionId, set: &PageSet, max: u32) -> Vec<PageRun> {
    let max = u64::from(max.max(1));
    let mut out = Vec::new();
    for (first, count) in set.runs() {
        let mut f = first;
        while f < first + count {
            let n = (first + count - f).min(max);
            out.push(PageRun::new(region, f, n as u32));
            f += n;
        }
    }
    out
}

/// A message of the split-memory protocol (carried as `Message::Split`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SplitMessage {
    /// The sender introduces itself and the region; the receiver checks the
    /// geometry against what it holds (a page host takes it on first use).
    Attach {
        /// The sender.
        from: HostId,
        /// The receiver, as the sender knows it.
        to: HostId,
        /// The region.
        region: RegionInfo,
    },
    /// The running host needs these pages (urgent lane).
    Fetch {
        /// The owner-map epoch of the request; echoed in the answer.
        epoch: u64,
        /// The pages.
        run: PageRun,
    },
    /// Page content from `from`, valid as of `epoch`: an answer to `Fetch`,
    /// an eviction, a split migration or a transfer between hosts.
    Data {
        /// The host the pages come from (kept when relayed).
        from: HostId,
        /// The owner-map epoch the content is for.
        epoch: u64,
        /// The pages (`round` unused, 0).
        batch: PageBatch,
    },
    /// The answer to a `Fetch` for pages this host does not hold.
    NotHeld {
        /// The answering host.
        from: HostId,
        /// The request's epoch.
        epoch: u64,
        /// The pages.
        run: PageRun,
    },
    /// Answer `Synced` once every message sent before on this lane was handled.
    Sync {
        /// Echoed.
        seq: u64,
    },
    /// Every message before the `Sync` was handled.
    Synced {
        /// The `Sync`'s sequence number.
        seq: u64,
        /// Pages stored from this channel so far.
        pages: u64,
    },
    /// Send these pages straight to host `to` at `endpoint`, then report `Sent`.
    Send {
        /// The receiving host.
        to: HostId,
        /// Where it listens (transport-specific, e.g. `127.0.0.1:4000`).
        endpoint: String,
        /// The owner-map epoch the transfer is for.
        epoch: u64,
        /// The pages.
        runs: Vec<PageRun>,
    },
    /// A `Send` is finished: the receiver acknowledged every page.
    Sent {
        /// The sending host.
        from: HostId,
        /// The receiving host.
        to: HostId,
        /// The transfer's epoch.
        epoch: u64,
        /// Pages sent.
        pages: u64,
        /// Pages asked for that this host did not hold.
        missing: u64,
    },
    /// Forward pages arriving from other page hosts to `to` instead of storing them.
    Relay {
        /// The final receiver.
        to: HostId,
        /// Where it listens.
        endpoint: String,
        /// The epoch.
        epoch: u64,
    },
    /// Drop these pages (they moved elsewhere or were invalidated).
    Forget {
        /// The epoch.
        epoch: u64,
        /// The pages.
        runs: Vec<PageRun>,
    },
    /// A request was refused.
    Refused {
        /// Why.
        reason: String,
    },
}

impl SplitMessage {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Attach { .. } => "Split/Attach",
            Self::Fetch { .. } => "Split/Fetch",
            Self::Data { .. } => "Split/Data",
            Self::NotHeld { .. } => "Split/NotHeld",
            Self::Sync { .. } => "Split/Sync",
            Self::Synced { .. } => "Split/Synced",
            Self::Send { .. } => "Split/Send",
            Self::Sent { .. } => "Split/Sent",
            Self::Relay { .. } => "Split/Relay",
            Self::Forget { .. } => "Split/Forget",
            Self::Refused { .. } => "Split/Refused",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(pages: u64) -> RegionInfo {
        RegionInfo::new(RegionId(1), pages * 4096, 4096).unwrap()
    }

    #[test]
    fn assign_and_epochs() {
        let (r, a, b) = (HostId(0), HostId(1), HostId(2));
        let mut m = OwnerMap::new(region(100), r).unwrap();
        assert!(m.assign(0, 10, a).is_err(), "unknown host");
        assert_eq!(m.epoch(), 0);
        m.add_host(a).unwrap();
        m.add_host(b).unwrap();
        let e1 = m.assign(0, 50, a).unwrap();
        m.assign(50, 50, b).unwrap();
        assert_eq!(m.owner(10).unwrap(), a);
        assert_eq!(m.check_answer(a, e1, 10).unwrap(), Answer::Current);
        assert_eq!(
            m.check_answer(b, e1, 10).unwrap(),
            Answer::NotOwner { owner: a }
        );
        // a's share moves to b; a late answer from a is not the owner's.
        let moved = m.switch(&m.pages_of(a), a, m.epoch(), b).unwrap();
        assert_eq!(moved.count(), 50);
        assert!(matches!(
            m.check_answer(a, e1, 10).unwrap(),
            Answer::NotOwner { .. }
        ));
        // b answering with an epoch from before it owned page 10: stale.
        assert!(matches!(
            m.check_answer(b, e1, 10).unwrap(),
            Answer::Stale { .. }
        ));
        assert_eq!(m.pages_of(b).count(), 100);
        assert!(m.assign(99, 2, b).is_err(), "past the end");
        assert!(m.owner(100).is_err());
    }

    #[test]
    fn switch_skips_pages_that_changed_hands() {
        let (r, a, d) = (HostId(0), HostId(1), HostId(4));
        let mut m = OwnerMap::new(region(10), r).unwrap();
        m.add_host(a).unwrap();
        m.add_host(d).unwrap();
        m.assign(0, 10, a).unwrap();
        let snapshot = m.pages_of(a);
        let e0 = m.epoch();
        m.assign(3, 1, r).unwrap(); // fetched by the running host during the move
        let moved = m.switch(&snapshot, a, e0, d).unwrap();
        assert_eq!(moved.count(), 9);
        assert_eq!(m.owner(3).unwrap(), r);
    }

    #[test]
    fn from_runs_validates() {
        let hosts = [HostId(0), HostId(1)];
        let ok = OwnerMap::from_runs(
            region(8),
            &hosts,
            &[
                (HostId(0), PageRun::new(RegionId(1), 0, 4)),
                (HostId(1), PageRun::new(RegionId(1), 4, 4)),
            ],
        )
        .unwrap();
        assert_eq!(ok.counts(), vec![(HostId(0), 4), (HostId(1), 4)]);
        assert_eq!(
            ok.runs_of(HostId(1), 3),
            vec![
                PageRun::new(RegionId(1), 4, 3),
                PageRun::new(RegionId(1), 7, 1)
            ]
        );
        let unknown = OwnerMap::from_runs(
            region(8),
            &hosts,
            &[(HostId(9), PageRun::new(RegionId(1), 0, 8))],
        );
        assert!(unknown.unwrap_err().to_string().contains("unknown host 9"));
        let gap = OwnerMap::from_runs(
            region(8),
            &hosts,
            &[(HostId(0), PageRun::new(RegionId(1), 0, 7))],
        );
        assert!(gap.is_err());
        let twice = OwnerMap::from_runs(
            region(8),
            &hosts,
            &[
                (HostId(0), PageRun::new(RegionId(1), 0, 8)),
                (HostId(1), PageRun::new(RegionId(1), 7, 1)),
            ],
        );
        assert!(twice.is_err());
        let outside = OwnerMap::from_runs(
            region(8),
            &hosts,
            &[(HostId(0), PageRun::new(RegionId(1), 0, 9))],
        );
        assert!(outside.is_err());
    }
}
