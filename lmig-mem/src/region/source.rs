//! The source side of a [`RegionSet`]: its [`MemorySource`] implementation.

use lmig_core::MemorySource;
use lmig_core::model::{PageRun, RegionLayout, RegionPages};

use super::set::RegionSet;

impl MemorySource for RegionSet {
    fn layout(&self) -> RegionLayout {
        self.layout.clone()
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        #[cfg(feature = "bench-internals")]
        crate::postcopy::note_read(run);
        Ok(self.read_run(run, dst)?)
    }

    /// Zero pages are tested in place and never copied.
    fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> lmig_core::Result<bool> {
        self.get(run.region)?.find_zero_pages(run, zero)?;
        Ok(true)
    }

    /// See [`Region::populated`](crate::Region::populated); a region that cannot tell counts as all data.
    fn populated(&self, pages: &mut RegionPages) -> lmig_core::Result<bool> {
        let mut any = false;
        for r in &self.regions {
            let set = pages.get_mut(r.id())?;
            if r.populated(set)? {
                any = true;
            } else {
                set.insert_range(0, r.pages());
            }
        }
        Ok(any)
    }

    fn urgent_thread(&self) {
        crate::postcopy::urgent_thread();
    }

    fn background_thread(&self) {
        crate::postcopy::background_thread();
    }

    /// Kept for the set's life: a later session over it is refused.
    fn mark_handed_over(&self, confirmed: bool) {
        self.handed_over
            .store(1 + u8::from(confirmed), std::sync::atomic::Ordering::SeqCst);
    }

    fn handed_over(&self) -> Option<bool> {
        match self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            n => Some(n == 2),
        }
    }

    /// See [`Region::declare_free`](crate::Region::declare_free).
    fn free_pages(&self, free: &mut RegionPages) -> lmig_core::Result<bool> {
        let mut any = false;
        for r in &self.regions {
            any |= r.free_pages(free.get_mut(r.id())?)?;
        }
        Ok(any)
    }

    fn take_freed(&self, freed: &mut RegionPages) -> lmig_core::Result<()> {
        for r in &self.regions {
            r.take_freed(freed.get_mut(r.id())?)?;
        }
        Ok(())
    }
}
