//! Soft-dirty tracking (`/proc/self/clear_refs` + pagemap bit 55), for
//! kernels built with `CONFIG_MEM_SOFT_DIRTY` that lack `PAGEMAP_SCAN`.
//!
//! Limitation: the kernel offers no atomic read-and-clear for soft-dirty
//! bits. `collect` reads the bits, then clears them with `clear_refs`; a page
//! written between the two is lost. The tracker is exact only if the program's
//! writers are paused during `collect` (CRIU's pre-dump freezes the task for
//! the same reason). Soft-dirty bits are per process and `clear_refs` resets
//! them all: use at most one soft-dirty tracker per process, and do not probe
//! while it runs. Prefer [`crate::track::UffdWpTracker`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use lmig_core::DirtyTracker;
use lmig_core::model::{RegionId, RegionPages};

use super::range::{TrackedRange, open_pagemap};
use crate::error::{MemError, Result};
use crate::region::{RegionOptions, RegionSet};

const NAME: &str = "soft-dirty";
/// Pagemap entry bit 55: the pte is soft-dirty.
const PM_SOFT_DIRTY: u64 = 1 << 55;
/// Entries read per `pread` (512 KiB).
const CHUNK_ENTRIES: usize = 64 * 1024;

const UNSUPPORTED: MemError = MemError::Unsupported {
    feature: "soft-dirty",
    needs: "a kernel built with CONFIG_MEM_SOFT_DIRTY=y (clear_refs accepted \"4\", but pagemap bit 55 \
            never set after a write)",
};

/// Dirty tracking by soft-dirty bits. See the module docs for its limitation.
#[derive(Debug)]
pub struct SoftDirtyTracker {
    ranges: Vec<TrackedRange>,
    pagemap: File,
    clear_refs: File,
    buf: Vec<u8>,
    started: bool,
}

fn open_clear_refs() -> Result<File> {
    OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => MemError::Unsupported {
                feature: "soft-dirty",
                needs: "/proc/self/clear_refs (CONFIG_PROC_PAGE_MONITOR)",
            },
            _ => MemError::os("open", "/proc/self/clear_refs", e),
        })
}

fn clear_soft_dirty(clear_refs: &mut File) -> Result<()> {
    clear_refs
        .write_all(b"4")
        .map_err(|e| MemError::os("write(\"4\")", "/proc/self/clear_refs", e))
}

fn entry(pagemap: &File, addr: u64, page_size: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    pagemap
        .read_exact_at(&mut b, addr / page_size * 8)
        .map_err(|e| MemError::os("pread", "/proc/self/pagemap", e))?;
    Ok(u64::from_ne_bytes(b))
}

impl SoftDirtyTracker {
    /// Does this kernel track soft-dirty bits? Maps one page, clears the bits
    /// (process-wide), writes the page and looks for bit 55.
    pub fn probe() -> Result<()> {
        let page = crate::sys::page_size();
        let probe = RegionOptions::new(RegionId(u32::MAX), page as u64).map()?;
        probe.write_at(0, &[1])?;
        let mut clear_refs = open_clear_refs()?;
        if let Err(e) = clear_soft_dirty(&mut clear_refs) {
            return Err(match e {
                MemError::Os { ref source, .. } if source.raw_os_error() == Some(libc::EINVAL) => {
                    UNSUPPORTED
                }
                other => other,
            });
        }
        probe.write_at(0, &[2])?;
        let pagemap = open_pagemap()?;
        let e = entry(&pagemap, probe.as_ptr() as u64, page as u64)?;
        if e & PM_SOFT_DIRTY == 0 {
            return Err(UNSUPPORTED);
        }
        Ok(())
    }

    /// A tracker over every region of `regions` (probes first).
    pub fn new(regions: &RegionSet) -> Result<Self> {
        Self::probe()?;
        Ok(Self {
            ranges: TrackedRange::of(regions),
            pagemap: open_pagemap()?,
            clear_refs: open_clear_refs()?,
            buf: vec![0; CHUNK_ENTRIES * 8],
            started: false,
        })
    }

    fn collect_into(&mut self, dirty: &mut RegionPages) -> Result<()> {
        if !self.started {
            return Err(MemError::TrackerState {
                tracker: NAME,
                detail: "collect() before start()",
            });
        }
        for r in &self.ranges {
            let set = dirty
                .get_mut(r.id)
                .map_err(|_| MemError::UnknownRegion { region: r.id })?;
            let pages = r.len / r.page_size;
            let mut p = 0u64;
            while p < pages {
                let n = (pages - p).min(CHUNK_ENTRIES as u64) as usize;
                let bytes = &mut self.buf[..n * 8];
                self.pagemap
                    .read_exact_at(bytes, (r.start / r.page_size + p) * 8)
                    .map_err(|e| MemError::os("pread", "/proc/self/pagemap", e))?;
                for (i, c) in bytes.chunks_exact(8).enumerate() {
                    let e = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
                    if e & PM_SOFT_DIRTY != 0 {
                        set.insert(p + i as u64);
                    }
                }
                p += n as u64;
            }
        }
        clear_soft_dirty(&mut self.clear_refs)
    }
}

impl DirtyTracker for SoftDirtyTracker {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&mut self) -> lmig_core::Result<()> {
        clear_soft_dirty(&mut self.clear_refs)?;
        self.started = true;
        Ok(())
    }

    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        Ok(self.collect_into(dirty)?)
    }

    fn stop(&mut self) -> lmig_core::Result<()> {
        self.started = false;
        Ok(())
    }
}
