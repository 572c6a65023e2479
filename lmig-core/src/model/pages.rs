use crate::error::{MigrationError, Result};

use super::region::{PageRun, RegionId, RegionLayout};

/// A set of page indexes of one region, as a bitmap.
///
/// Iterating the set runs ([`PageSet::runs`]) skips empty 64-page words and
/// yields maximal runs of consecutive pages, so a sparse set of a 1 GiB
/// region (262,144 pages) is walked in microseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
    count: u64,
}

impl PageSet {
    /// An empty set for a region of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
            count: 0,
        }
    }

    /// A set holding every page of a region of `pages` pages.
    pub fn full(pages: u64) -> Self {
        let mut s = Self::new(pages);
        s.insert_range(0, pages);
        s
    }

    /// Number of pages the region has (the universe of this set).
    pub fn capacity(&self) -> u64 {
        self.pages
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// True when no page is in the set.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Is `page` in the set? Pages past the end are never in it.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Add `page`; returns true when it was not there. Pages past the end are ignored
    /// (callers check runs against the region first).
    pub fn insert(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let w = &mut self.words[(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        let new = *w & bit == 0;
        *w |= bit;
        self.count += u64::from(new);
        new
    }

    /// Remove `page`; returns true when it was there.
    pub fn remove(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let w = &mut self.words[(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        let had = *w & bit != 0;
        *w &= !bit;
        self.count -= u64::from(had);
        had
    }

    /// Add pages `first..first + count`, clipped to the region.
    pub fn insert_range(&mut self, first: u64, count: u64) {
        self.update_range(first, count, true);
    }

    /// Remove pages `first..first + count`, clipped to the region.
    pub fn remove_range(&mut self, first: u64, count: u64) {
        self.update_range(first, count, false);
    }

    fn update_range(&mut self, first: u64, count: u64, set: bool) {
        let end = first.saturating_add(count).min(self.pages);
        let mut p = first;
        while p < end {
            let wi = (p / 64) as usize;
            let lo = p % 64;
            let hi = (end - (p - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let before = self.words[wi].count_ones();
            if set {
                self.words[wi] |= mask;
            } else {
                self.words[wi] &= !mask;
            }
            let after = self.words[wi].count_ones();
            self.count = self.count + u64::from(after) - u64::from(before);
            p += hi - lo;
        }
    }

    /// Remove every page.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }

    /// Add every page of `other` (same capacity required, else only the common prefix).
    pub fn union_with(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.recount();
    }

    /// Remove every page of `other`.
    pub fn subtract(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
        self.recount();
    }

    fn recount(&mut self) {
        self.count = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// Set bits from a little-endian bitmap of one bit per page (a VMM's dirty
    /// log, for example); bits past the region are ignored.
    pub fn insert_bitmap(&mut self, bitmap: &[u64]) {
        for (a, b) in self.words.iter_mut().zip(bitmap) {
            *a |= b;
        }
        if let Some(last) = self.words.last_mut() {
            let tail = self.pages % 64;
            if tail != 0 {
                *last &= (1u64 << tail) - 1;
            }
        }
        self.recount();
    }

    /// The maximal runs of consecutive pages, as `(first, count)`, in order.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            words: &self.words,
            pos: 0,
            pages: self.pages,
        }
    }

    /// The runs inside `start..end` only, clipped to that window.
    pub fn runs_in(&self, start: u64, end: u64) -> Runs<'_> {
        Runs {
            words: &self.words,
            pos: start,
            pages: end.min(self.pages),
        }
    }

    /// The pages, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs().flat_map(|(first, count)| first..first + count)
    }
}

/// Iterator over the runs of a [`PageSet`], see [`PageSet::runs`].
pub struct Runs<'a> {
    words: &'a [u64],
    pos: u64,
    pages: u64,
}

impl Runs<'_> {
    /// First page >= `from` whose bit equals `want`, or `pages`.
    fn seek(&self, from: u64, want: bool) -> u64 {
        let mut p = from;
        while p < self.pages {
            let wi = (p / 64) as usize;
            let word = if want {
                self.words[wi]
            } else {
                !self.words[wi]
            };
            let masked = word & (u64::MAX << (p % 64));
            if masked != 0 {
                return ((wi as u64) * 64 + u64::from(masked.trailing_zeros())).min(self.pages);
            }
            p = (wi as u64 + 1) * 64;
        }
        self.pages
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.seek(self.pos, true);
        if start >= self.pages {
            self.pos = self.pages;
            return None;
        }
        let end = self.seek(start, false);
        self.pos = end;
        Some((start, end - start))
    }
}

/// One [`PageSet`] per region of a layout: the dirty pages of a round, the
/// pages still missing at the destination, and so on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPages {
    sets: Vec<(RegionId, PageSet)>,
}

impl RegionPages {
    /// Empty sets for every region of `layout`.
    pub fn empty(layout: &RegionLayout) -> Self {
        Self {
            sets: layout
                .regions()
                .iter()
                .map(|r| (r.id, PageSet::new(r.pages())))
                .collect(),
        }
    }

    /// Every page of every region of `layout`.
    pub fn full(layout: &RegionLayout) -> Self {
        Self {
            sets: layout
                .regions()
                .iter()
                .map(|r| (r.id, PageSet::full(r.pages())))
                .collect(),
        }
    }

    /// The set for one region.
    pub fn get(&self, region: RegionId) -> Result<&PageSet> {
        self.sets
            .iter()
            .find(|(id, _)| *id == region)
            .map(|(_, s)| s)
            .ok_or(MigrationError::UnknownRegion { region })
    }

    /// The set for one region, mutable.
    pub fn get_mut(&mut self, region: RegionId) -> Result<&mut PageSet> {
        self.sets
            .iter_mut()
            .find(|(id, _)| *id == region)
            .map(|(_, s)| s)
            .ok_or(MigrationError::UnknownRegion { region })
    }

    /// The per-region sets, in layout order.
    pub fn sets(&self) -> impl Iterator<Item = (RegionId, &PageSet)> {
        self.sets.iter().map(|(id, s)| (*id, s))
    }

    /// The per-region sets, mutable.
    pub fn sets_mut(&mut self) -> impl Iterator<Item = (RegionId, &mut PageSet)> {
        self.sets.iter_mut().map(|(id, s)| (*id, s))
    }

    /// Add a run, checked against the region's size.
    pub fn insert_run(&mut self, run: &PageRun) -> Result<()> {
        let set = self.get_mut(run.region)?;
        if run.count == 0 || run.end() > set.capacity() {
            return Err(MigrationError::PageOutsideRegion {
                run: *run,
                region_pages: set.capacity(),
            });
        }
        set.insert_range(run.first, u64::from(run.count));
        Ok(())
    }

    /// Total pages over all regions.
    pub fn count(&self) -> u64 {
        self.sets.iter().map(|(_, s)| s.count()).sum()
    }

    /// True when no region has a page in the set.
    pub fn is_empty(&self) -> bool {
        self.sets.iter().all(|(_, s)| s.is_empty())
    }

    /// Empty every set.
    pub fn clear(&mut self) {
        self.sets.iter_mut().for_each(|(_, s)| s.clear());
    }

    /// Add every page of `other` (regions matched by id).
    pub fn union_with(&mut self, other: &RegionPages) {
        for (id, set) in &mut self.sets {
            if let Ok(o) = other.get(*id) {
                set.union_with(o);
            }
        }
    }

    /// Remove every page of `other` (regions matched by id).
    pub fn subtract(&mut self, other: &RegionPages) {
        for (id, set) in &mut self.sets {
            if let Ok(o) = other.get(*id) {
                set.subtract(o);
            }
        }
    }

    /// All runs, region by region, each at most `max_pages` long and never
    /// crossing a multiple of `max_pages` (so a run always falls inside one
    /// aligned chunk of `max_pages` pages).
    pub fn chunked_runs(&self, max_pages: u32) -> impl Iterator<Item = PageRun> + '_ {
        let max = u64::from(max_pages.max(1));
        self.sets.iter().flat_map(move |(id, set)| {
            set.runs().flat_map(move |(first, count)| {
                let end = first + count;
                let mut p = first;
                std::iter::from_fn(move || {
                    if p >= end {
                        return None;
                    }
                    let chunk_end = (p / max + 1) * max;
                    let e = end.min(chunk_end);
                    let run = PageRun::new(*id, p, (e - p) as u32);
                    p = e;
                    Some(run)
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RegionInfo;

    fn naive_runs(s: &PageSet) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in 0..s.capacity() {
            if s.contains(p) {
                match out.last_mut() {
                    Some((f, c)) if *f + *c == p => *c += 1,
                    _ => out.push((p, 1)),
                }
            }
        }
        out
    }

    #[test]
    fn runs_match_naive_walk() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for pages in [1u64, 63, 64, 65, 130, 1000] {
            let mut s = PageSet::new(pages);
            for _ in 0..pages / 2 + 1 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let p = seed % pages;
                let len = seed % 100;
                if seed.is_multiple_of(3) {
                    s.remove_range(p, len);
                } else {
                    s.insert_range(p, len);
                }
                assert_eq!(
                    s.runs().collect::<Vec<_>>(),
                    naive_runs(&s),
                    "pages={pages}"
                );
                assert_eq!(s.count(), s.iter().count() as u64);
            }
        }
    }

    #[test]
    fn runs_in_window() {
        let mut s = PageSet::new(200);
        s.insert_range(10, 100);
        assert_eq!(s.runs_in(50, 70).collect::<Vec<_>>(), vec![(50, 20)]);
        assert_eq!(s.runs_in(0, 12).collect::<Vec<_>>(), vec![(10, 2)]);
        assert_eq!(s.runs_in(150, 400).count(), 0);
    }

    #[test]
    fn full_and_empty() {
        let s = PageSet::full(130);
        assert_eq!(s.runs().collect::<Vec<_>>(), vec![(0, 130)]);
        assert_eq!(s.count(), 130);
        assert!(!s.contains(130));
        assert_eq!(PageSet::new(130).runs().count(), 0);
    }

    #[test]
    fn bitmap_import_clips_tail() {
        let mut s = PageSet::new(70);
        s.insert_bitmap(&[1, u64::MAX]);
        assert_eq!(s.runs().collect::<Vec<_>>(), vec![(0, 1), (64, 6)]);
    }

    #[test]
    fn chunked_runs_split_at_chunk_edges() {
        let layout = RegionLayout::new(vec![
            RegionInfo::new(RegionId(7), 4096 * 300, 4096).unwrap(),
        ])
        .unwrap();
        let mut rp = RegionPages::empty(&layout);
        rp.insert_run(&PageRun::new(RegionId(7), 10, 250)).unwrap();
        let runs: Vec<_> = rp.chunked_runs(128).map(|r| (r.first, r.count)).collect();
        assert_eq!(runs, vec![(10, 118), (128, 128), (256, 4)]);
        assert!(rp.insert_run(&PageRun::new(RegionId(7), 299, 2)).is_err());
        assert!(rp.insert_run(&PageRun::new(RegionId(8), 0, 1)).is_err());
    }
}
