//! Per-page hashes and region digests used to verify a migration.
//!
//! See the protocol module: the destination hashes each page as it places
//! it, the source hashes its frozen memory after `Commit`, and both reduce
//! the per-page hashes of a region to one [`RegionDigest`].

use crate::error::Result;
use crate::model::{PageRun, RegionId, RegionLayout};
use crate::protocol::RegionDigest;
use crate::traits::MemorySource;

/// Hash of one page's bytes.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// The hash of the latest content of every page of every region.
#[derive(Clone, Debug)]
pub struct PageHashes {
    regions: Vec<(RegionId, u32, Vec<u64>)>,
}

impl PageHashes {
    /// Hashes for `layout`, every page initially the hash of a zero page.
    pub fn new(layout: &RegionLayout) -> Self {
        Self {
            regions: layout
                .regions()
                .iter()
                .map(|r| {
                    let zero = page_hash(&vec![0u8; r.page_size as usize]);
                    (r.id, r.page_size, vec![zero; r.pages() as usize])
                })
                .collect(),
        }
    }

    fn slot(&mut self, run: &PageRun) -> Option<(u32, &mut [u64])> {
        let (_, ps, hashes) = self
            .regions
            .iter_mut()
            .find(|(id, _, _)| *id == run.region)?;
        let first = usize::try_from(run.first).ok()?;
        let end = first.checked_add(run.count as usize)?;
        hashes.get_mut(first..end).map(|h| (*ps, h))
    }

    /// Record the content of `run` (exactly `run.count` pages of data).
    /// Runs outside the layout are ignored (the caller checked them).
    pub fn record(&mut self, run: &PageRun, data: &[u8]) {
        if let Some((ps, slots)) = self.slot(run) {
            for (slot, page) in slots.iter_mut().zip(data.chunks_exact(ps as usize)) {
                *slot = page_hash(page);
            }
        }
    }

    /// Record hashes computed beforehand with [`page_hash`], one per page
    /// of `run` (a thread can hash outside a lock and record inside it).
    pub fn record_hashes(&mut self, run: &PageRun, hashes: &[u64]) {
        if let Some((_, slots)) = self.slot(run) {
            for (slot, h) in slots.iter_mut().zip(hashes) {
                *slot = *h;
            }
        }
    }

    /// Record that every page of `run` is zero.
    pub fn record_zero(&mut self, run: &PageRun) {
        if let Some((ps, slots)) = self.slot(run) {
            let zero = page_hash(&vec![0u8; ps as usize]);
            slots.iter_mut().for_each(|s| *s = zero);
        }
    }

    /// One digest per region.
    pub fn digests(&self) -> Vec<RegionDigest> {
        self.regions
            .iter()
            .map(|(id, _, hashes)| {
                let mut h = blake3::Hasher::new();
                for x in hashes {
                    h.update(&x.to_le_bytes());
                }
                RegionDigest {
                    region: *id,
                    hash: *h.finalize().as_bytes(),
                }
            })
            .collect()
    }

    /// Hash every page of `memory` (used by the source after `Commit`).
    pub fn of_memory(memory: &dyn MemorySource, layout: &RegionLayout) -> Result<Self> {
        const CHUNK: u64 = 256;
        let mut hashes = Self::new(layout);
        let mut buf = Vec::new();
        for r in layout.regions() {
            let mut first = 0;
            while first < r.pages() {
                let count = CHUNK.min(r.pages() - first) as u32;
                let run = PageRun::new(r.id, first, count);
                buf.resize(r.bytes(u64::from(count)) as usize, 0);
                memory.read_pages(&run, &mut buf)?;
                hashes.record(&run, &buf);
                first += u64::from(count);
            }
        }
        Ok(hashes)
    }
}

/// Compare the source's digests with ours; the first region that differs, if any.
pub fn first_mismatch(ours: &[RegionDigest], theirs: &[RegionDigest]) -> Option<RegionId> {
    for o in ours {
        match theirs.iter().find(|t| t.region == o.region) {
            Some(t) if t.hash == o.hash => {}
            _ => return Some(o.region),
        }
    }
    theirs
        .iter()
        .find(|t| !ours.iter().any(|o| o.region == t.region))
        .map(|t| t.region)
}
