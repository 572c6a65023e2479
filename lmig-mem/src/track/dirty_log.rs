//! An adapter for a dirty bitmap a VMM already keeps (KVM dirty log style).

use lmig_core::model::{RegionInfo, RegionLayout, RegionPages};
use lmig_core::{BoxError, DirtyTracker};

use crate::error::MemError;

/// A source of per-region dirty bitmaps, read and reset in one step, like
/// `KVM_GET_DIRTY_LOG` (or `KVM_CLEAR_DIRTY_LOG` after a get).
///
/// Closures `FnMut(&RegionInfo, &mut [u64]) -> Result<(), BoxError>`
/// implement it.
pub trait DirtyLog: Send {
    /// Set in `bitmap` (zeroed, one bit per page of `region`, bit `i % 64` of
    /// word `i / 64`) the pages written since the last call, and reset them.
    fn fetch_and_reset(&mut self, region: &RegionInfo, bitmap: &mut [u64]) -> Result<(), BoxError>;

    /// [`Self::fetch_and_reset`] while the program is paused (the freeze's
    /// final collect): no writer waits, so a log that resets in chunks to
    /// bound a writer's wait may reset in one go. The default calls
    /// `fetch_and_reset`.
    fn fetch_and_reset_paused(
        &mut self,
        region: &RegionInfo,
        bitmap: &mut [u64],
    ) -> Result<(), BoxError> {
        self.fetch_and_reset(region, bitmap)
    }

    /// Begin logging (e.g. set `KVM_MEM_LOG_DIRTY_PAGES`). The tracker then
    /// fetches and discards one log so every page starts clean.
    fn start(&mut self, layout: &RegionLayout) -> Result<(), BoxError> {
        let _ = layout;
        Ok(())
    }

    /// Stop logging.
    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<F> DirtyLog for F
where
    F: FnMut(&RegionInfo, &mut [u64]) -> Result<(), BoxError> + Send,
{
    fn fetch_and_reset(&mut self, region: &RegionInfo, bitmap: &mut [u64]) -> Result<(), BoxError> {
        self(region, bitmap)
    }
}

/// Dirty tracking through a [`DirtyLog`].
#[derive(Debug)]
pub struct DirtyLogTracker<L> {
    log: L,
    layout: RegionLayout,
    bitmap: Vec<u64>,
}

impl<L: DirtyLog> DirtyLogTracker<L> {
    /// Track the regions of `layout` through `log`.
    pub fn new(layout: &RegionLayout, log: L) -> Self {
        Self {
            log,
            layout: layout.clone(),
            bitmap: Vec::new(),
        }
    }

    fn collect_with(&mut self, dirty: &mut RegionPages, paused: bool) -> lmig_core::Result<()> {
        let layout = self.layout.clone();
        for r in layout.regions() {
            let set = dirty.get_mut(r.id)?;
            set.insert_bitmap(self.fetch(r, paused)?);
        }
        Ok(())
    }

    /// The log, back.
    pub fn into_inner(self) -> L {
        self.log
    }

    fn fetch(&mut self, region: &RegionInfo, paused: bool) -> Result<&[u64], MemError> {
        let words = region.pages().div_ceil(64) as usize;
        self.bitmap.clear();
        self.bitmap.resize(words, 0);
        let fetched = if paused {
            self.log.fetch_and_reset_paused(region, &mut self.bitmap)
        } else {
            self.log.fetch_and_reset(region, &mut self.bitmap)
        };
        fetched.map_err(|source| MemError::DirtyLog {
            region: region.id,
            source,
        })?;
        Ok(&self.bitmap)
    }
}

impl<L: DirtyLog> DirtyTracker for DirtyLogTracker<L> {
    fn name(&self) -> &'static str {
        "dirty-log"
    }

    fn start(&mut self) -> lmig_core::Result<()> {
        let layout = self.layout.clone();
        self.log
            .start(&layout)
            .map_err(|e| lmig_core::MigrationError::backend("dirty log", e))?;
        for r in layout.regions() {
            self.fetch(r, false)?;
        }
        Ok(())
    }

    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        self.collect_with(dirty, false)
    }

    fn collect_paused(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        self.collect_with(dirty, true)
    }

    fn stop(&mut self) -> lmig_core::Result<()> {
        self.log
            .stop()
            .map_err(|e| lmig_core::MigrationError::backend("dirty log", e))
    }
}
