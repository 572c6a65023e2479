//! [`RegionSink`]: the state a region set needs as a sink — which pages may
//! hold data, pre-faulting, and the switch into and out of post-copy.
//!
//! Outside post-copy a run is written with the low-level page writes of
//! [`crate::memory`]; in post-copy it is handed to `Postcopy::place`, which
//! fills missing pages atomically. Neither of those imports this module, and
//! this module does not import the region set that holds it.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lmig_core::model::{PageRun, PageSet, RegionPages};

use crate::error::{MemError, Result};
use crate::memory::{DataBits, Region, write_data_run, zero_data_run};
use crate::postcopy::{Postcopy, PostcopyOptions, PostcopyStats, Residency};

/// The sink state of a region set: which pages may hold data, whether pages
/// are pre-faulted, and post-copy while it runs.
///
/// Methods that place a run take the region and its index (the order of
/// the set's regions), already looked up; the run is checked here against
/// the region before any byte moves.
#[derive(Debug)]
pub(crate) struct RegionSink {
    /// Post-copy state while post-copy runs.
    postcopy: RwLock<Option<Arc<Postcopy>>>,
    options: PostcopyOptions,
    /// Final statistics of the last post-copy that ended.
    stats: Mutex<PostcopyStats>,
    /// Per region, which pages may hold data: a zero run over pages known
    /// to read as zero needs no work.
    data: Vec<DataBits>,
    prefault: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RegionSink {
    /// A sink over `regions`, every page counted as holding data.
    pub(crate) fn new(regions: &[Region]) -> Self {
        Self {
            postcopy: RwLock::new(None),
            options: PostcopyOptions::default(),
            stats: Mutex::new(PostcopyStats::default()),
            data: regions
                .iter()
                .map(|r| DataBits::new(r.pages(), true))
                .collect(),
            prefault: true,
        }
    }

    pub(crate) fn set_prefault(&mut self, on: bool) {
        self.prefault = on;
    }

    pub(crate) fn set_postcopy_options(&mut self, options: PostcopyOptions) {
        self.options = options;
    }

    /// Whether a post-copy fault wait spins before it blocks.
    pub(crate) fn fault_wait_spins(&self) -> bool {
        !self.options.spin.is_zero()
    }

    fn active_postcopy(&self) -> Option<Arc<Postcopy>> {
        self.postcopy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn postcopy_stats(&self) -> PostcopyStats {
        match self.active_postcopy() {
            Some(pc) => pc.stats(),
            None => lock(&self.stats).clone(),
        }
    }

    /// Pages post-copy still waits for (0 outside post-copy).
    pub(crate) fn postcopy_missing(&self) -> u64 {
        self.active_postcopy().map_or(0, |pc| pc.missing_pages())
    }

    pub(crate) fn residency(&self) -> Option<Residency> {
        self.active_postcopy()
            .map(|postcopy| Residency { postcopy })
    }

    pub(crate) fn hold_missing(&self) -> Result<()> {
        self.active_postcopy()
            .map_or(Ok(()), |pc| pc.hold_missing())
    }

    pub(crate) fn postcopy_missing_set(&self) -> Option<RegionPages> {
        self.active_postcopy().map(|pc| pc.missing_set())
    }

    pub(crate) fn in_postcopy(&self) -> bool {
        self.active_postcopy().is_some()
    }

    /// Switch into post-copy: register `regions` for missing-page faults.
    pub(crate) fn begin_postcopy(&self, regions: &[Region], missing: &RegionPages) -> Result<()> {
        let mut slot = self.postcopy.write().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(MemError::TrackerState {
                tracker: "post-copy",
                detail: "begin_postcopy called twice",
            });
        }
        let pc = Postcopy::begin(regions, missing, self.options)?;
        *slot = Some(Arc::new(pc));
        Ok(())
    }

    pub(crate) fn wait_fault(&self, timeout: Duration) -> Result<Option<PageRun>> {
        self.wait_fault_or(None, timeout)
    }

    /// [`Self::wait_fault`], ending early also when `also` turns readable.
    pub(crate) fn wait_fault_or(
        &self,
        also: Option<std::os::fd::RawFd>,
        timeout: Duration,
    ) -> Result<Option<PageRun>> {
        match self.active_postcopy() {
            Some(pc) => pc.wait_fault_or(also, timeout),
            None => {
                std::thread::sleep(timeout);
                Ok(None)
            }
        }
    }

    /// Post-copy: the runs needed now, without waiting (see
    /// [`crate::postcopy`]'s `take_faults`); none outside post-copy.
    pub(crate) fn take_faults(&self, runs: &mut Vec<PageRun>, max: usize) -> Result<usize> {
        self.active_postcopy()
            .map_or(Ok(0), |pc| pc.take_faults(runs, max))
    }

    /// Switch out of post-copy; refuses while pages are missing.
    pub(crate) fn end_postcopy(&self) -> Result<()> {
        let mut slot = self.postcopy.write().unwrap_or_else(|p| p.into_inner());
        let Some(pc) = slot.as_ref() else {
            return Ok(());
        };
        pc.end(false)?;
        *lock(&self.stats) = pc.stats();
        *slot = None;
        Ok(())
    }

    /// Switch out of post-copy even though pages are missing: only for
    /// memory nothing runs on (a migration that failed before `Commit`),
    /// since a touch of a missing page then reads zeros.
    pub(crate) fn discard_postcopy(&self) {
        let mut slot = self.postcopy.write().unwrap_or_else(|p| p.into_inner());
        if let Some(pc) = slot.take() {
            if let Err(e) = pc.end(true) {
                debug!(error = %e, "discarding post-copy: ending it failed");
            }
            *lock(&self.stats) = pc.stats();
        }
    }

    /// Place `src` into the pages of `run` in `region` (index `i`).
    pub(crate) fn write_run(
        &self,
        i: usize,
        region: &Region,
        run: &PageRun,
        src: &[u8],
    ) -> Result<()> {
        let data = &self.data[i];
        let bytes = region.check_len(run, src.len())?;
        match self.active_postcopy() {
            None => write_data_run(region, data, run, bytes, src, self.prefault),
            Some(pc) => {
                data.set(run.first, run.count.into(), true);
                pc.place(region, run, Some(src))
            }
        }
    }

    /// Zero the pages of `run` in `region` (index `i`).
    pub(crate) fn zero_run(&self, i: usize, region: &Region, run: &PageRun) -> Result<()> {
        let data = &self.data[i];
        region.run_bytes(run)?;
        match self.active_postcopy() {
            None => zero_data_run(region, data, run),
            Some(pc) => {
                data.set(run.first, run.count.into(), true);
                pc.place(region, run, None)
            }
        }
    }

    /// Learn which pages of `regions` may hold data ([`Region::populated`](crate::Region::populated))
    /// so that zero runs over the others need no work and data runs into
    /// them are pre-faulted. Called by `prepare`, before any page is placed.
    pub(crate) fn learn_populated(&self, regions: &[Region]) -> Result<()> {
        for (r, data) in regions.iter().zip(&self.data) {
            let mut set = PageSet::new(r.pages());
            if r.populated(&mut set)? {
                data.fill(false);
                for (first, count) in set.runs() {
                    data.set(first, count, true);
                }
            } else {
                data.fill(true);
            }
        }
        Ok(())
    }

    /// Every page reads as zero (fresh mappings, or all given back).
    pub(crate) fn forget_data(&self) {
        self.data.iter().for_each(|d| d.fill(false));
    }
}
