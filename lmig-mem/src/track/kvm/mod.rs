//! KVM's dirty log as a [`DirtyLog`] (feature `kvm`): a VMM's memory slots
//! mapped onto lmig regions, read with `KVM_GET_DIRTY_LOG` and, where the
//! kernel offers `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, reset with
//! `KVM_CLEAR_DIRTY_LOG` in chunks; or, where the kernel offers
//! `KVM_CAP_DIRTY_LOG_RING`, KVM's per-vCPU dirty rings ([`KvmDirtyRing`]).
//!
//! Why chunks: without manual protection, `KVM_GET_DIRTY_LOG` resets the
//! whole slot's log and write-protects every page it returns while holding
//! KVM's MMU lock, so a vCPU faulting meanwhile waits for all of it. With
//! it, the get only reads, and each clear of [`CLEAR_CHUNK_PAGES`] pages
//! holds the lock for that chunk alone. With `KVM_DIRTY_LOG_INITIALLY_SET`
//! turning logging on write-protects nothing (every bit starts set), and
//! the fetch the tracker discards at `start` write-protects guest memory
//! chunk by chunk, before round 0 reads it.
//!
//! Only writes made through KVM (the guest's, and KVM's own on its behalf)
//! are logged: a VMM that writes guest memory itself (device emulation)
//! marks those pages too, e.g. with a [`DirtyMarker`](crate::DirtyMarker)
//! beside this log — or uses the uffd-wp tracker on the same mapping,
//! which sees both.
//!
//! ```no_run
//! # fn demo(vm: &kvm_ioctls::VmFd, regions: &lmig_mem::RegionSet) -> Result<(), Box<dyn std::error::Error>> {
//! use lmig_core::DirtyTracker;
//! use lmig_mem::RegionId;
//! use lmig_mem::track::kvm::{KvmDirtyLog, KvmSlot};
//! // Slot 0 at guest physical 0 is all of region 1.
//! let log = KvmDirtyLog::new(vm, regions, &[KvmSlot::new(0, 0, RegionId(1))])?;
//! println!("{}", log.support());
//! let mut tracker = log.tracker(regions.layout());
//! tracker.start()?;
//! # Ok(()) }
//! ```

use std::fmt;

use kvm_ioctls::VmFd;
use lmig_core::BoxError;
use lmig_core::model::{RegionId, RegionInfo, RegionLayout};

use super::dirty_log::{DirtyLog, DirtyLogTracker};
use crate::error::{MemError, Result};
use crate::region::RegionSet;
use crate::sys::kvm::{self, INITIALLY_SET, MANUAL_PROTECT_ENABLE, SlotLog};

mod ring;
pub use ring::{EXIT_DIRTY_RING_FULL, KvmDirtyRing, KvmRingTracker};

/// Pages reset and write-protected by one `KVM_CLEAR_DIRTY_LOG` call
/// (4 MiB of 4 KiB pages): a vCPU faulting meanwhile waits for one chunk.
pub const CLEAR_CHUNK_PAGES: u64 = 1024;

/// One KVM memory slot over pages of an lmig region: the slot as the VMM
/// registered it (`KVM_SET_USER_MEMORY_REGION`), and where it lies in the
/// region. Its host address must be the region's at `first_page`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvmSlot {
    /// The slot number (address space in the high 16 bits).
    pub slot: u32,
    /// Its guest physical address.
    pub guest_phys_addr: u64,
    /// Its flags besides `KVM_MEM_LOG_DIRTY_PAGES` (e.g. `KVM_MEM_READONLY`),
    /// kept when logging is turned on and off.
    pub flags: u32,
    /// The region it maps.
    pub region: RegionId,
    /// The region page it starts at.
    pub first_page: u64,
    /// Its length in pages; `None`: to the region's end.
    pub pages: Option<u64>,
}

impl KvmSlot {
    /// Slot `slot` at `guest_phys_addr` maps all of `region`.
    #[must_use]
    pub fn new(slot: u32, guest_phys_addr: u64, region: RegionId) -> Self {
        Self {
            slot,
            guest_phys_addr,
            flags: 0,
            region,
            first_page: 0,
            pages: None,
        }
    }

    /// The slot maps `pages` pages of the region from `first_page` on.
    #[must_use]
    pub fn part(mut self, first_page: u64, pages: u64) -> Self {
        self.first_page = first_page;
        self.pages = Some(pages);
        self
    }

    /// The slot's other flags.
    #[must_use]
    pub fn flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }
}

/// What the VM's KVM offers for dirty logging ([`KvmDirtyLog::probe`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvmDirtySupport {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: `KVM_CLEAR_DIRTY_LOG` resets the log.
    pub manual_protect: bool,
    /// `KVM_DIRTY_LOG_INITIALLY_SET` is offered with it.
    pub initially_set: bool,
    /// `KVM_CAP_DIRTY_LOG_RING`: the largest per-vCPU ring in bytes (0: none).
    pub dirty_ring_bytes: u64,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` is offered.
    pub dirty_ring_acq_rel: bool,
}

impl fmt::Display for KvmDirtySupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.manual_protect, self.initially_set) {
            (true, true) => f.write_str("KVM dirty log: manual protect + initially set")?,
            (true, false) => f.write_str("KVM dirty log: manual protect")?,
            _ => f.write_str("KVM dirty log: KVM_GET_DIRTY_LOG only")?,
        }
        if self.dirty_ring_bytes > 0 {
            write!(
                f,
                "; dirty ring offered (up to {} KiB per vCPU{}; see KvmDirtyRing)",
                self.dirty_ring_bytes / 1024,
                if self.dirty_ring_acq_rel {
                    ", acq/rel"
                } else {
                    ""
                }
            )
        } else {
            f.write_str("; no dirty ring")
        }
    }
}

/// A region's slot and where it lies in the region.
#[derive(Debug)]
pub(super) struct Mapped<'vm> {
    pub(super) region: RegionId,
    pub(super) first_page: u64,
    pub(super) slot: u32,
    pub(super) log: SlotLog<'vm>,
}

/// `slots` of `vm` over `regions`, checked: each inside its region, no two
/// overlapping or sharing a number.
pub(super) fn map_slots<'vm>(
    vm: &'vm VmFd,
    regions: &RegionSet,
    slots: &[KvmSlot],
) -> Result<Vec<Mapped<'vm>>> {
    let mut mapped: Vec<Mapped<'vm>> = Vec::with_capacity(slots.len());
    for s in slots {
        let region = regions.get(s.region)?;
        let total = region.pages();
        let pages = s
            .pages
            .unwrap_or_else(|| total.saturating_sub(s.first_page));
        let bad = |detail: String| MemError::InvalidRegion {
            region: s.region,
            detail,
        };
        if pages == 0 || s.first_page.checked_add(pages).is_none_or(|e| e > total) {
            return Err(bad(format!(
                "KVM slot {} maps pages {}..+{pages}, the region has {total}",
                s.slot, s.first_page
            )));
        }
        for m in &mapped {
            let overlap = m.region == s.region
                && m.first_page < s.first_page + pages
                && s.first_page < m.first_page + m.log.pages();
            if overlap || slots.iter().filter(|o| o.slot == s.slot).count() > 1 {
                return Err(bad(format!(
                    "KVM slot {} overlaps another slot or repeats its number",
                    s.slot
                )));
            }
        }
        let page_size = region.page_size() as u64;
        let host = region.as_ptr() as u64 + s.first_page * page_size;
        mapped.push(Mapped {
            region: s.region,
            first_page: s.first_page,
            slot: s.slot,
            log: SlotLog::new(
                vm,
                s.slot,
                s.guest_phys_addr,
                host,
                pages,
                page_size,
                s.flags,
            ),
        });
    }
    Ok(mapped)
}

/// KVM's dirty log of a VM's memory slots, by lmig region.
///
/// Turning manual protection on (`start`) applies to the whole VM: a VMM
/// that reads the dirty log of other slots itself must then clear them
/// with `KVM_CLEAR_DIRTY_LOG` too. `stop` turns it off again.
#[derive(Debug)]
pub struct KvmDirtyLog<'vm> {
    vm: &'vm VmFd,
    slots: Vec<Mapped<'vm>>,
    support: KvmDirtySupport,
    manual: bool,
    scratch: Vec<u64>,
}

impl<'vm> KvmDirtyLog<'vm> {
    /// What `vm`'s KVM offers (`KVM_CHECK_EXTENSION`).
    pub fn probe(vm: &VmFd) -> KvmDirtySupport {
        let caps = kvm::caps(vm);
        KvmDirtySupport {
            manual_protect: caps.manual_protect & MANUAL_PROTECT_ENABLE != 0,
            initially_set: caps.manual_protect & INITIALLY_SET != 0,
            dirty_ring_bytes: caps.ring_bytes,
            dirty_ring_acq_rel: caps.ring_acq_rel,
        }
    }

    /// The log of `slots` of `vm`, over `regions`. Each slot must lie
    /// inside its region, no two may overlap or share a number. Manual
    /// protection is used where the kernel offers it.
    pub fn new(vm: &'vm VmFd, regions: &RegionSet, slots: &[KvmSlot]) -> Result<Self> {
        let mapped = map_slots(vm, regions, slots)?;
        let support = Self::probe(vm);
        Ok(Self {
            vm,
            slots: mapped,
            support,
            manual: support.manual_protect,
            scratch: Vec::new(),
        })
    }

    /// Do not use manual protection even where offered: every fetch is one
    /// `KVM_GET_DIRTY_LOG` that resets the whole slot (to compare).
    #[must_use]
    pub fn without_manual_protect(mut self) -> Self {
        self.manual = false;
        self
    }

    /// What the kernel offers.
    pub fn support(&self) -> KvmDirtySupport {
        self.support
    }

    /// How fetches reset the log: `"get"` (`KVM_GET_DIRTY_LOG` alone),
    /// `"get+clear"`, or `"get+clear, initially set"`.
    pub fn method(&self) -> &'static str {
        match (self.manual, self.support.initially_set) {
            (false, _) => "get",
            (true, false) => "get+clear",
            (true, true) => "get+clear, initially set",
        }
    }

    /// Wrapped as lmig's tracker over `layout` (the regions' layout).
    pub fn tracker(self, layout: &RegionLayout) -> DirtyLogTracker<Self> {
        DirtyLogTracker::new(layout, self)
    }

    fn os(&self, call: &'static str, slot: &Mapped<'_>, e: std::io::Error) -> MemError {
        slot_error(call, slot, e)
    }

    /// Read one slot's log into `self.scratch` and, in manual mode, reset
    /// it `chunk` pages per call (chunks without a set bit are skipped).
    fn fetch_slot(&mut self, i: usize, chunk: u64) -> Result<()> {
        let slot = &self.slots[i];
        let pages = slot.log.pages();
        self.scratch.clear();
        self.scratch.resize(pages.div_ceil(64) as usize, 0);
        slot.log
            .get(&mut self.scratch)
            .map_err(|e| self.os("KVM_GET_DIRTY_LOG", slot, e))?;
        if !self.manual {
            return Ok(());
        }
        let mut first = 0;
        while first < pages {
            let count = chunk.min(pages - first);
            let words = &self.scratch[(first / 64) as usize..(first + count).div_ceil(64) as usize];
            if words.iter().any(|w| *w != 0) {
                slot.log
                    .clear(first, count, words)
                    .map_err(|e| self.os("KVM_CLEAR_DIRTY_LOG", slot, e))?;
            }
            first += count;
        }
        Ok(())
    }

    fn set_logging(&self, on: bool) -> Result<()> {
        for s in &self.slots {
            s.log
                .set_logging(on)
                .map_err(|e| self.os("KVM_SET_USER_MEMORY_REGION", s, e))?;
        }
        Ok(())
    }
}

/// An error of `call` on `slot`, naming its region.
pub(super) fn slot_error(call: &'static str, slot: &Mapped<'_>, e: std::io::Error) -> MemError {
    MemError::os(
        call,
        format!(
            "the KVM slot over region {} (page {})",
            slot.region, slot.first_page
        ),
        e,
    )
}

/// OR the first `count` bits of `src` into `dst` from bit `at` on.
fn or_bits(dst: &mut [u64], at: u64, src: &[u64], count: u64) {
    for (w, word) in src.iter().enumerate() {
        let base = w as u64 * 64;
        if base >= count {
            break;
        }
        let valid = count - base;
        let mut bits = if valid < 64 {
            word & ((1u64 << valid) - 1)
        } else {
            *word
        };
        while bits != 0 {
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let page = at + base + b;
            if let Some(d) = dst.get_mut((page / 64) as usize) {
                *d |= 1 << (page % 64);
            }
        }
    }
}

impl KvmDirtyLog<'_> {
    fn fetch_region(&mut self, region: &RegionInfo, bitmap: &mut [u64], chunk: u64) -> Result<()> {
        for i in 0..self.slots.len() {
            if self.slots[i].region != region.id {
                continue;
            }
            self.fetch_slot(i, chunk)?;
            let (at, pages) = (self.slots[i].first_page, self.slots[i].log.pages());
            or_bits(bitmap, at, &self.scratch, pages);
        }
        Ok(())
    }
}

impl DirtyLog for KvmDirtyLog<'_> {
    fn fetch_and_reset(&mut self, region: &RegionInfo, bitmap: &mut [u64]) -> Result<(), BoxError> {
        Ok(self.fetch_region(region, bitmap, CLEAR_CHUNK_PAGES)?)
    }

    /// The guest is paused: one `KVM_CLEAR_DIRTY_LOG` per slot.
    fn fetch_and_reset_paused(
        &mut self,
        region: &RegionInfo,
        bitmap: &mut [u64],
    ) -> Result<(), BoxError> {
        Ok(self.fetch_region(region, bitmap, u64::MAX)?)
    }

    /// Turn manual protection on (with initially-set where offered), then
    /// `KVM_MEM_LOG_DIRTY_PAGES` on every slot.
    fn start(&mut self, _layout: &RegionLayout) -> Result<(), BoxError> {
        if self.manual {
            let mut flags = MANUAL_PROTECT_ENABLE;
            if self.support.initially_set {
                flags |= INITIALLY_SET;
            }
            kvm::set_manual_protect(self.vm, flags).map_err(|e| {
                MemError::os("KVM_ENABLE_CAP", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", e)
            })?;
        }
        Ok(self.set_logging(true)?)
    }

    /// Turn logging off on every slot, and manual protection off.
    fn stop(&mut self) -> Result<(), BoxError> {
        self.set_logging(false)?;
        if self.manual {
            kvm::set_manual_protect(self.vm, 0).map_err(|e| {
                MemError::os(
                    "KVM_ENABLE_CAP",
                    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (off)",
                    e,
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::or_bits;

    #[test]
    fn or_bits_places_a_slot_log_at_its_region_offset() {
        let mut dst = [0u64; 3];
        // Aligned: words copied, bits past `count` dropped.
        or_bits(&mut dst, 64, &[0b101, u64::MAX], 66);
        assert_eq!(dst, [0, 0b101, 0b11]);
        // Unaligned: bit 0 of the slot is page 63 of the region.
        let mut dst = [0u64; 2];
        or_bits(&mut dst, 63, &[0b11], 2);
        assert_eq!(dst, [1 << 63, 1]);
        // Never past the region's bitmap.
        let mut dst = [0u64; 1];
        or_bits(&mut dst, 60, &[0xff], 8);
        assert_eq!(dst, [0xf << 60]);
    }
}
