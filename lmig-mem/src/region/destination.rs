//! [`DestinationRegions`]: a destination sink that maps the source's layout
//! itself.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use lmig_core::MemorySink;
use lmig_core::model::{PageRun, RegionLayout, RegionPages};

use super::set::RegionSet;
use crate::error::{MemError, Result};
use crate::memory::Backing;
use crate::postcopy::{PostcopyOptions, PostcopyStats};

/// A destination [`MemorySink`] that maps the source's layout in `prepare`
/// (each region at its fixed address when it has one) and pre-faults it.
///
/// After the migration, [`DestinationRegions::into_regions`] hands the
/// regions to the program.
#[derive(Debug)]
pub struct DestinationRegions {
    backing: Backing,
    thp: bool,
    prefault: bool,
    postcopy_options: PostcopyOptions,
    set: OnceLock<RegionSet>,
    preparing: Mutex<()>,
}

impl DestinationRegions {
    /// Map regions with `backing` when `prepare` is called; pre-fault them.
    pub fn new(backing: Backing) -> Self {
        Self {
            backing,
            thp: false,
            prefault: true,
            postcopy_options: PostcopyOptions::default(),
            set: OnceLock::new(),
            preparing: Mutex::new(()),
        }
    }

    /// Ask for transparent huge pages.
    #[must_use]
    pub fn transparent_huge_pages(mut self, on: bool) -> Self {
        self.thp = on;
        self
    }

    /// Pre-fault pages run by run when their first data arrives (default
    /// true; false for a post-copy destination). See [`RegionSet::set_prefault`].
    #[must_use]
    pub fn prefault(mut self, on: bool) -> Self {
        self.prefault = on;
        self
    }

    /// How post-copy handles faults (see [`crate::postcopy`]).
    #[must_use]
    pub fn postcopy_options(mut self, options: PostcopyOptions) -> Self {
        self.postcopy_options = options;
        self
    }

    /// Post-copy statistics (empty before `prepare`).
    pub fn postcopy_stats(&self) -> PostcopyStats {
        self.set
            .get()
            .map(RegionSet::postcopy_stats)
            .unwrap_or_default()
    }

    /// The regions, once `prepare` mapped them.
    pub fn regions(&self) -> Option<&RegionSet> {
        self.set.get()
    }

    /// Take the regions (after the migration).
    pub fn into_regions(self) -> Option<RegionSet> {
        self.set.into_inner()
    }

    fn set(&self) -> Result<&RegionSet> {
        self.set.get().ok_or(MemError::NotPrepared)
    }
}

impl MemorySink for DestinationRegions {
    fn prepare(&self, layout: &RegionLayout) -> lmig_core::Result<()> {
        let _one_at_a_time = self.preparing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(set) = self.set.get() {
            set.check_layout(layout)?;
            return Ok(set.learn_populated()?);
        }
        // Fresh mappings read as zero: nothing to learn, nothing faulted in
        // until data arrives.
        let mut set = RegionSet::from_layout(layout, self.backing, self.thp)?;
        set.set_prefault(self.prefault);
        set.set_postcopy_options(self.postcopy_options);
        let _ = self.set.set(set);
        Ok(())
    }

    fn write_pages(&self, run: &PageRun, data: &[u8]) -> lmig_core::Result<()> {
        Ok(self.set()?.write_run(run, data)?)
    }

    fn zero_pages(&self, run: &PageRun) -> lmig_core::Result<()> {
        Ok(self.set()?.zero_run(run)?)
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        Ok(self.set()?.read_run(run, dst)?)
    }

    fn begin_postcopy(&self, missing: &RegionPages) -> lmig_core::Result<()> {
        Ok(self.set()?.begin_postcopy(missing)?)
    }

    fn wait_fault(&self, timeout: Duration) -> lmig_core::Result<Option<PageRun>> {
        Ok(self.set()?.wait_fault(timeout)?)
    }

    fn hold_missing(&self) -> lmig_core::Result<()> {
        Ok(self.set()?.hold_missing()?)
    }

    fn waits_fault_or(&self) -> bool {
        true
    }

    fn fault_wait_spins(&self) -> bool {
        self.set().is_ok_and(|s| s.fault_wait_spins())
    }

    fn wait_fault_or(
        &self,
        also: Option<std::os::fd::RawFd>,
        timeout: Duration,
    ) -> lmig_core::Result<Option<PageRun>> {
        Ok(self.set()?.wait_fault_or(also, timeout)?)
    }

    fn take_faults(&self, runs: &mut Vec<PageRun>, max: usize) -> lmig_core::Result<usize> {
        Ok(self.set()?.take_faults(runs, max)?)
    }

    fn end_postcopy(&self) -> lmig_core::Result<()> {
        Ok(self.set()?.end_postcopy()?)
    }

    fn urgent_thread(&self) {
        crate::postcopy::urgent_thread();
    }

    fn background_thread(&self) {
        crate::postcopy::background_thread();
    }

    fn residency(&self) -> Option<std::sync::Arc<dyn lmig_core::PageResidency>> {
        MemorySink::residency(self.set.get()?)
    }

    /// The migration failed: give the received pages back to the kernel
    /// (private memory loses them, shared memory gets holes punched). The
    /// mappings stay, empty (zero), so a new attempt with the same layout
    /// can use them.
    fn discard(&self) {
        let Some(set) = self.set.get() else { return };
        // Before `Commit` nothing runs here: no thread waits on a missing page.
        set.sink.discard_postcopy();
        let mut all = true;
        for r in set.regions() {
            all &= r
                .mapping()
                .discard(0, r.len(), r.backing().discard_advice())
                .is_ok();
        }
        if all {
            set.forget_data();
        }
    }
}
