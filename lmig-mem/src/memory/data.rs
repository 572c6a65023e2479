//! Which pages of a region may hold data, and the page writes that use it:
//! zero runs that clear only pages holding data, data runs pre-faulted in one
//! call.

use std::sync::atomic::{AtomicU64, Ordering};

use lmig_core::model::PageRun;

use super::Region;
use crate::error::{MemError, Result};
use crate::sys::mapping::MADV_POPULATE_WRITE;

/// Zero runs of at least this many pages that hold data are given back to
/// the kernel (`madvise`) rather than cleared with a memset.
pub const DISCARD_PAGES: u64 = 16;

/// One bit per page of a region: set when the page may hold data, clear
/// when it is known to read as zero. Atomic words: placement runs on
/// several threads (distinct chunks, which may share a word).
#[derive(Debug)]
pub(crate) struct DataBits {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl DataBits {
    pub(crate) fn new(pages: u64, on: bool) -> Self {
        let bits = Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        };
        bits.fill(on);
        bits
    }

    pub(crate) fn fill(&self, on: bool) {
        self.set(0, self.pages, on);
    }

    /// The words and masks covering `first..first + count` (clipped to the region).
    fn masks(&self, first: u64, count: u64) -> impl Iterator<Item = (&AtomicU64, u64)> {
        let end = first.saturating_add(count).min(self.pages);
        let first = first.min(end);
        (first / 64..end.div_ceil(64)).map(move |w| {
            let lo = (w * 64).max(first) - w * 64;
            let hi = ((w + 1) * 64).min(end) - w * 64;
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            (&self.words[w as usize], mask)
        })
    }

    pub(crate) fn set(&self, first: u64, count: u64, on: bool) {
        for (word, mask) in self.masks(first, count) {
            if on {
                word.fetch_or(mask, Ordering::Relaxed);
            } else {
                word.fetch_and(!mask, Ordering::Relaxed);
            }
        }
    }

    /// Does any page of the range have the bit `on`?
    pub(crate) fn any(&self, first: u64, count: u64, on: bool) -> bool {
        self.masks(first, count).any(|(word, mask)| {
            let w = word.load(Ordering::Relaxed);
            (if on { w } else { !w }) & mask != 0
        })
    }

    /// The maximal runs `(first, count)` of the range whose bit is `on`.
    pub(crate) fn runs(&self, first: u64, count: u64, on: bool) -> Vec<(u64, u64)> {
        let end = first.saturating_add(count).min(self.pages);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in first..end {
            let w = self.words[(p / 64) as usize].load(Ordering::Relaxed);
            if (w >> (p % 64) & 1 == 1) != on {
                continue;
            }
            match out.last_mut() {
                Some((f, c)) if *f + *c == p => *c += 1,
                _ => out.push((p, 1)),
            }
        }
        out
    }
}

/// Write `src` into the pages of `run` (already checked against `region`,
/// at byte `off`, `len` bytes) outside post-copy. With `prefault`, a run with
/// pages never written here is faulted in with one call first, instead of
/// one trap per page in the copy.
pub(crate) fn write_data_run(
    region: &Region,
    data: &DataBits,
    run: &PageRun,
    (off, len): (usize, usize),
    src: &[u8],
    prefault: bool,
) -> Result<()> {
    if prefault && data.any(run.first, run.count.into(), false) {
        region
            .mapping()
            .madvise(off, len, MADV_POPULATE_WRITE)
            .map_err(|e| MemError::os("madvise(MADV_POPULATE_WRITE)", region.describe(), e))?;
    }
    data.set(run.first, run.count.into(), true);
    region.write_pages(run, src)
}

/// Zero the pages of `run` (already checked against `region`) outside
/// post-copy, touching only the pages that may hold data: short runs of
/// them are cleared with a memset, runs of [`DISCARD_PAGES`] and more are
/// given back to the kernel (`MADV_DONTNEED` / `MADV_REMOVE`).
pub(crate) fn zero_data_run(region: &Region, data: &DataBits, run: &PageRun) -> Result<()> {
    let ps = region.page_size();
    for (first, count) in data.runs(run.first, run.count.into(), true) {
        let (off, len) = (first as usize * ps, count as usize * ps);
        if count >= DISCARD_PAGES {
            region
                .mapping()
                .discard(off, len, region.backing().discard_advice())
                .map_err(|e| MemError::os("madvise(discard)", region.describe(), e))?;
        } else {
            region.zero_at(off, len)?;
        }
        data.set(first, count, false);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DataBits;

    #[test]
    fn runs_and_any_follow_set() {
        let bits = DataBits::new(130, false);
        assert!(!bits.any(0, 130, true));
        bits.set(62, 5, true);
        bits.set(128, 10, true); // clipped to the region
        assert_eq!(bits.runs(0, 130, true), vec![(62, 5), (128, 2)]);
        assert!(bits.any(60, 3, true));
        assert!(!bits.any(67, 61, true));
        assert_eq!(bits.runs(63, 2, false), vec![]);
        bits.fill(true);
        assert_eq!(bits.runs(0, 130, false), vec![]);
        assert_eq!(bits.runs(0, u64::MAX, true), vec![(0, 130)]);
    }
}
