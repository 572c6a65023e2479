//! The destination side of a [`RegionSet`]: placing pages, the post-copy
//! switch, and its [`MemorySink`] implementation, all delegating to the
//! set's [`RegionSink`](super::sink_state::RegionSink).

use std::sync::Arc;
use std::time::Duration;

use lmig_core::model::{PageRun, RegionLayout, RegionPages};
use lmig_core::{MemorySink, PageResidency};

use super::set::RegionSet;
use crate::error::Result;
use crate::postcopy::{PostcopyOptions, PostcopyStats, Residency};

impl RegionSet {
    /// Whether pages are pre-faulted (`MADV_POPULATE_WRITE`, run by run)
    /// just before the first data is copied into them, rather than taking
    /// one fault per page in the copy (default true). Pages that only ever
    /// receive zero runs are never faulted in. Turn it off for a post-copy
    /// destination.
    pub fn set_prefault(&mut self, on: bool) {
        self.sink.set_prefault(on);
    }

    /// How post-copy handles faults (see [`crate::postcopy`]).
    pub fn set_postcopy_options(&mut self, options: PostcopyOptions) {
        self.sink.set_postcopy_options(options);
    }

    /// Whether a post-copy fault wait spins before it blocks
    /// ([`PostcopyOptions::spin`]).
    pub fn fault_wait_spins(&self) -> bool {
        self.sink.fault_wait_spins()
    }

    /// Post-copy statistics: live while post-copy runs, final after it ended.
    pub fn postcopy_stats(&self) -> PostcopyStats {
        self.sink.postcopy_stats()
    }

    /// Is post-copy running (pages registered for missing-page faults)?
    pub fn in_postcopy(&self) -> bool {
        self.sink.in_postcopy()
    }

    /// Post-copy: drop the stale content of `missing` and register the
    /// regions for missing-page faults. See [`crate::postcopy`].
    pub fn begin_postcopy(&self, missing: &RegionPages) -> Result<()> {
        self.sink.begin_postcopy(&self.regions, missing)
    }

    /// Post-copy: wait up to `timeout` for a touch of a missing page.
    pub fn wait_fault(&self, timeout: Duration) -> Result<Option<PageRun>> {
        self.sink.wait_fault(timeout)
    }

    /// Post-copy: [`Self::wait_fault`], returning `None` early also when
    /// `also` (a descriptor of the caller's, not read here) turns readable.
    pub fn wait_fault_or(
        &self,
        also: Option<std::os::fd::RawFd>,
        timeout: Duration,
    ) -> Result<Option<PageRun>> {
        self.sink.wait_fault_or(also, timeout)
    }

    /// Post-copy: append to `runs`, without waiting, up to `max` runs
    /// needed now — the faults there first, then the runs the program
    /// asked for ([`Residency::request`](crate::postcopy::Residency::request)) — and return how many
    /// (the userfaultfd is read once for them all).
    pub fn take_faults(&self, runs: &mut Vec<PageRun>, max: usize) -> Result<usize> {
        self.sink.take_faults(runs, max)
    }

    /// Post-copy: unregister the regions. Refuses while pages are missing
    /// ([`MemError::PostcopyIncomplete`](crate::MemError::PostcopyIncomplete)).
    pub fn end_postcopy(&self) -> Result<()> {
        self.sink.end_postcopy()
    }

    /// Post-copy: the residency handle (see [`crate::postcopy::Residency`]),
    /// `None` outside post-copy (every page is here).
    pub fn residency(&self) -> Option<Residency> {
        self.sink.residency()
    }

    /// Post-copy with nobody serving faults any more (the source lost for
    /// good): every page that is not missing — a zero page never touched
    /// included — is made present, so it reads without a fault handler;
    /// the missing pages stay missing (their touchers blocked).
    pub fn hold_missing(&self) -> Result<()> {
        self.sink.hold_missing()
    }

    /// Post-copy: pages still missing (0 outside post-copy). After the
    /// source was lost for good they stay missing and their touchers stay
    /// blocked: nothing here ever fills them with zeros.
    pub fn postcopy_missing(&self) -> u64 {
        self.sink.postcopy_missing()
    }

    /// Post-copy: which pages are still missing (a copy; `None` outside
    /// post-copy). A program paused by a lost source can read every page
    /// not in it without blocking.
    pub fn postcopy_missing_pages(&self) -> Option<RegionPages> {
        self.sink.postcopy_missing_set()
    }

    /// Write the pages of `run` (checked against the region before any byte
    /// moves). In post-copy, missing pages are filled atomically and their
    /// waiters woken.
    pub fn write_run(&self, run: &PageRun, src: &[u8]) -> Result<()> {
        let i = self.index_of(run.region)?;
        self.sink.write_run(i, &self.regions[i], run, src)
    }

    /// Zero the pages of `run` (checked first). In post-copy, missing pages
    /// are filled atomically and their waiters woken.
    ///
    /// Outside post-copy only the pages that may hold data are touched:
    /// short runs of them are cleared with a memset, longer ones
    /// ([`DISCARD_PAGES`](crate::region::DISCARD_PAGES) and more) are given back to the kernel
    /// (`MADV_DONTNEED` for private memory, `MADV_REMOVE` for shared memory),
    /// after which they read as zero without occupying memory.
    pub fn zero_run(&self, run: &PageRun) -> Result<()> {
        let i = self.index_of(run.region)?;
        self.sink.zero_run(i, &self.regions[i], run)
    }

    /// Learn which pages may hold data; see [`RegionSink::learn_populated`].
    pub(crate) fn learn_populated(&self) -> Result<()> {
        self.sink.learn_populated(&self.regions)
    }

    /// Every page was given back to the kernel: all read as zero.
    pub(crate) fn forget_data(&self) {
        self.sink.forget_data();
    }
}

impl MemorySink for RegionSet {
    /// Check the offered layout against these regions and learn which
    /// pages already hold data ([`Region::populated`](crate::Region::populated)). Nothing is
    /// pre-faulted up front: a page is faulted in when its first data
    /// arrives (see [`RegionSet::set_prefault`]), and free memory never is.
    fn prepare(&self, layout: &RegionLayout) -> lmig_core::Result<()> {
        self.check_layout(layout)?;
        self.learn_populated()?;
        Ok(())
    }

    fn write_pages(&self, run: &PageRun, data: &[u8]) -> lmig_core::Result<()> {
        Ok(self.write_run(run, data)?)
    }

    fn zero_pages(&self, run: &PageRun) -> lmig_core::Result<()> {
        Ok(self.zero_run(run)?)
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        Ok(self.read_run(run, dst)?)
    }

    fn begin_postcopy(&self, missing: &RegionPages) -> lmig_core::Result<()> {
        Ok(RegionSet::begin_postcopy(self, missing)?)
    }

    fn wait_fault(&self, timeout: Duration) -> lmig_core::Result<Option<PageRun>> {
        Ok(RegionSet::wait_fault(self, timeout)?)
    }

    fn hold_missing(&self) -> lmig_core::Result<()> {
        Ok(RegionSet::hold_missing(self)?)
    }

    fn waits_fault_or(&self) -> bool {
        true
    }

    fn fault_wait_spins(&self) -> bool {
        RegionSet::fault_wait_spins(self)
    }

    fn wait_fault_or(
        &self,
        also: Option<std::os::fd::RawFd>,
        timeout: Duration,
    ) -> lmig_core::Result<Option<PageRun>> {
        Ok(RegionSet::wait_fault_or(self, also, timeout)?)
    }

    fn take_faults(&self, runs: &mut Vec<PageRun>, max: usize) -> lmig_core::Result<usize> {
        Ok(RegionSet::take_faults(self, runs, max)?)
    }

    fn end_postcopy(&self) -> lmig_core::Result<()> {
        Ok(RegionSet::end_postcopy(self)?)
    }

    fn urgent_thread(&self) {
        crate::postcopy::urgent_thread();
    }

    fn background_thread(&self) {
        crate::postcopy::background_thread();
    }

    fn residency(&self) -> Option<Arc<dyn PageResidency>> {
        RegionSet::residency(self).map(|r| Arc::new(r) as Arc<dyn PageResidency>)
    }
}
