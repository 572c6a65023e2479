//! Free-range declarations: the program says which pages of a region hold
//! nothing it needs ([`Region::declare_free`]) and when it uses them again
//! ([`Region::declare_used`]); the session then never sends them (dynamic
//! self-ballooning, Hines et al.).

use std::sync::Mutex;

use lmig_core::model::{PageRun, PageSet};

use super::Region;
use crate::error::{MemError, Result};

/// A region's free pages: all of them, and those freed since the session
/// last took them.
#[derive(Debug)]
pub(crate) struct FreePages {
    sets: Mutex<Option<FreeSets>>,
}

#[derive(Debug)]
struct FreeSets {
    /// Declared free and not declared in use since.
    all: PageSet,
    /// Declared free since the last [`FreePages::take_freed`].
    since: PageSet,
}

impl FreePages {
    /// No page declared free.
    pub(crate) fn new() -> Self {
        Self {
            sets: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<FreeSets>> {
        self.sets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Region {
    /// The page run `offset..offset + len` covers, refused unless both are
    /// page aligned, `len > 0` and the range lies inside the region.
    fn free_range(&self, offset: usize, len: usize) -> Result<PageRun> {
        let ps = self.page_size();
        let bad = |reason| MemError::BadRange {
            region: self.id(),
            offset,
            len,
            reason,
        };
        if len == 0 {
            return Err(bad("the length is zero"));
        }
        if !offset.is_multiple_of(ps) || !len.is_multiple_of(ps) {
            return Err(bad("offset and length must be multiples of the page size"));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(self.out_of_bounds(offset, len));
        }
        let count = u32::try_from(len / ps).map_err(|_| bad("more than 2^32 pages"))?;
        Ok(PageRun::new(self.id(), (offset / ps) as u64, count))
    }

    /// Declare `offset..offset + len` (page aligned, inside the region)
    /// free: its content means nothing to the program. The pages are given
    /// back to the kernel now (`MADV_DONTNEED`, `MADV_REMOVE` for shared
    /// memory) and read as zero; a migration never sends them — the first
    /// round and a post-copy freeze send them as zero runs, unread, and the
    /// destination maps them empty — and their digests are those of zero
    /// pages on both sides. Declaring pages already free again is harmless.
    ///
    /// **The rule for reuse**: call [`Region::declare_used`] before writing
    /// a free page again. A free page written anyway is still sent when the
    /// migration's dirty tracker sees the write (any write after the
    /// tracker started): a declaration only spares the pages clean since
    /// it. A write made before the migration started to a page still
    /// declared free is not seen, and that page arrives empty.
    #[doc(alias = "MADV_DONTNEED")]
    #[doc(alias = "MADV_REMOVE")]
    pub fn declare_free(&self, offset: usize, len: usize) -> Result<()> {
        let run = self.free_range(offset, len)?;
        // Discarded first, marked after: a session that sees the mark finds
        // the page empty (or written since, which its tracker reports).
        self.mapping()
            .discard(offset, len, self.backing().discard_advice())
            .map_err(|e| MemError::os("madvise(discard free pages)", self.describe(), e))?;
        let mut sets = self.free.lock();
        let sets = sets.get_or_insert_with(|| FreeSets {
            all: PageSet::new(self.pages()),
            since: PageSet::new(self.pages()),
        });
        sets.all.insert_range(run.first, u64::from(run.count));
        sets.since.insert_range(run.first, u64::from(run.count));
        Ok(())
    }

    /// Declare `offset..offset + len` (page aligned, inside the region) in
    /// use again: call it before writing pages declared free. From then on
    /// they migrate like any other page. Pages that were not free are
    /// left as they are.
    pub fn declare_used(&self, offset: usize, len: usize) -> Result<()> {
        let run = self.free_range(offset, len)?;
        if let Some(sets) = self.free.lock().as_mut() {
            sets.all.remove_range(run.first, u64::from(run.count));
            sets.since.remove_range(run.first, u64::from(run.count));
        }
        Ok(())
    }

    /// Add the pages declared free (and not in use again) to `pages`, a
    /// set over this region. False, with nothing added, when nothing was
    /// ever declared free.
    pub fn free_pages(&self, pages: &mut PageSet) -> Result<bool> {
        self.check_set(pages)?;
        match self.free.lock().as_ref() {
            Some(sets) => {
                pages.union_with(&sets.all);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Add the pages declared free since the previous call to `pages` (a
    /// set over this region) and forget them.
    pub(crate) fn take_freed(&self, pages: &mut PageSet) -> Result<()> {
        self.check_set(pages)?;
        if let Some(sets) = self.free.lock().as_mut() {
            pages.union_with(&sets.since);
            sets.since.clear();
        }
        Ok(())
    }
}
