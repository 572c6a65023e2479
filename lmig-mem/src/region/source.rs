//! The source side of a [`RegionSet`]: its [`MemorySource`] implementation.

use lmig_core::MemorySource;
use lmig_core::model::{PageRun, RegionLayout, RegionPages};

use super::set::RegionSet;

impl MemorySource for RegionSet {
    fn layout(&self) -> RegionLayout {
        self.layout.clone()
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
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
