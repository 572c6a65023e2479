//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`, feature `kvm`), re-exported
//! from [`track::kvm`](super): each vCPU has a ring of the pages it
//! dirtied, which user space harvests while the guest runs, and
//! `KVM_RESET_DIRTY_RINGS` write-protects the harvested pages again.
//!
//! Against the bitmap ([`KvmDirtyLog`](super::KvmDirtyLog)), a collect
//! costs what was dirtied, not the size of guest RAM: no bitmap of every
//! page is fetched or scanned. In return the VMM takes part: the ring is
//! enabled before any vCPU is created ([`KvmDirtyRing::enable`]), each
//! vCPU's ring is mapped ([`KvmDirtyRing::add_vcpu`]), and a vCPU whose
//! ring fills exits `KVM_RUN` with [`EXIT_DIRTY_RING_FULL`], which the VMM
//! answers with [`KvmDirtyRing::on_full_exit`] before running it again
//! (the entries it harvests are kept for the tracker's next collect).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{VcpuFd, VmFd};
use lmig_core::DirtyTracker;
use lmig_core::model::RegionPages;

use super::{KvmDirtyLog, KvmSlot, Mapped, map_slots, slot_error};
use crate::error::{MemError, Result};
use crate::region::RegionSet;
use crate::sys::kvm::{self, DirtyRing};

/// `KVM_EXIT_DIRTY_RING_FULL`: the exit reason (`kvm_run.exit_reason`) of
/// a vCPU whose dirty ring is full.
pub const EXIT_DIRTY_RING_FULL: u32 = kvm::EXIT_DIRTY_RING_FULL;

const NAME: &str = "kvm-dirty-ring";

/// The rings and what was harvested from them but not collected yet.
#[derive(Debug, Default)]
struct Rings {
    rings: Vec<DirtyRing>,
    /// `(slot, page offset in the slot)` harvested, not yet collected.
    pending: Vec<(u32, u64)>,
}

#[derive(Debug)]
struct Shared {
    /// A duplicate of the VM's fd, for `KVM_RESET_DIRTY_RINGS`.
    vm: OwnedFd,
    bytes: u32,
    rings: Mutex<Rings>,
    full_exits: AtomicU64,
    harvested: AtomicU64,
}

/// A VM's dirty rings: a cheap handle, cloned to the VMM's vCPU threads
/// (for [`Self::on_full_exit`]) and to the tracker.
#[derive(Clone, Debug)]
pub struct KvmDirtyRing {
    shared: Arc<Shared>,
}

impl KvmDirtyRing {
    /// Turn on `vm`'s dirty ring, `bytes` per vCPU (`None`: the largest
    /// KVM offers; else rounded down to a power of two, at most that).
    /// Must come before the VM's first vCPU is created (KVM refuses it
    /// after). [`MemError::Unsupported`] where KVM has no dirty ring.
    pub fn enable(vm: &VmFd, bytes: Option<u32>) -> Result<Self> {
        let max = KvmDirtyLog::probe(vm).dirty_ring_bytes;
        if max == 0 {
            return Err(MemError::Unsupported {
                feature: "KVM dirty ring (KVM_CAP_DIRTY_LOG_RING)",
                needs: "Linux >= 5.11 on x86_64",
            });
        }
        let max = u32::try_from(max).unwrap_or(1 << 31);
        let want = bytes.unwrap_or(max).min(max);
        let bytes = if want == 0 {
            0
        } else {
            1 << (31 - want.leading_zeros())
        };
        if bytes < 4096 {
            return Err(MemError::TrackerState {
                tracker: NAME,
                detail: "a KVM dirty ring smaller than a page",
            });
        }
        kvm::enable_dirty_ring(vm, bytes).map_err(|e| {
            MemError::os(
                "KVM_ENABLE_CAP",
                "KVM_CAP_DIRTY_LOG_RING (before any vCPU is created)",
                e,
            )
        })?;
        let dup = kvm::dup_vm(vm).map_err(|e| MemError::os("dup", "the VM's fd", e))?;
        Ok(Self {
            shared: Arc::new(Shared {
                vm: dup,
                bytes,
                rings: Mutex::new(Rings::default()),
                full_exits: AtomicU64::new(0),
                harvested: AtomicU64::new(0),
            }),
        })
    }

    /// Bytes of each vCPU's ring.
    pub fn bytes(&self) -> u32 {
        self.shared.bytes
    }

    /// Map the ring of a vCPU of this VM (created after [`Self::enable`]).
    pub fn add_vcpu(&self, vcpu: &VcpuFd) -> Result<()> {
        let ring = DirtyRing::map_vcpu(vcpu, self.shared.bytes)
            .map_err(|e| MemError::os("mmap", "a vCPU's KVM dirty ring", e))?;
        self.lock().rings.push(ring);
        Ok(())
    }

    /// For the VMM, when a vCPU exits with [`EXIT_DIRTY_RING_FULL`]:
    /// harvest every ring (kept for the tracker's next collect) and reset
    /// them, so the vCPU can run again. Returns the entries harvested.
    pub fn on_full_exit(&self) -> Result<u64> {
        self.shared.full_exits.fetch_add(1, Ordering::Relaxed);
        let mut rings = self.lock();
        self.harvest(&mut rings)
    }

    /// How many times a vCPU's ring filled up ([`Self::on_full_exit`]).
    pub fn full_exits(&self) -> u64 {
        self.shared.full_exits.load(Ordering::Relaxed)
    }

    /// Entries harvested so far (each a page written once since its last
    /// reset).
    pub fn harvested(&self) -> u64 {
        self.shared.harvested.load(Ordering::Relaxed)
    }

    /// The tracker of `slots` of `vm` (the VM this ring was enabled on)
    /// over `regions`; the slots are checked as for
    /// [`KvmDirtyLog::new`]. Entries of other slots are ignored.
    pub fn tracker<'vm>(
        &self,
        vm: &'vm VmFd,
        regions: &RegionSet,
        slots: &[KvmSlot],
    ) -> Result<KvmRingTracker<'vm>> {
        if self.lock().rings.is_empty() {
            return Err(MemError::TrackerState {
                tracker: NAME,
                detail: "no vCPU ring mapped (KvmDirtyRing::add_vcpu)",
            });
        }
        Ok(KvmRingTracker {
            ring: self.clone(),
            slots: map_slots(vm, regions, slots)?,
            logging: false,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Rings> {
        self.shared
            .rings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Harvest every ring into `pending`, then `KVM_RESET_DIRTY_RINGS`.
    fn harvest(&self, rings: &mut Rings) -> Result<u64> {
        let Rings { rings, pending } = rings;
        let mut taken = 0u64;
        for ring in rings.iter_mut() {
            taken += u64::from(ring.harvest(|slot, offset| pending.push((slot, offset))));
        }
        if taken > 0 {
            kvm::reset_dirty_rings(self.shared.vm.as_fd())
                .map_err(|e| MemError::os("KVM_RESET_DIRTY_RINGS", "the VM", e))?;
        }
        self.shared.harvested.fetch_add(taken, Ordering::Relaxed);
        Ok(taken)
    }
}

/// lmig's tracker over KVM's dirty rings ([`KvmDirtyRing::tracker`]).
///
/// `start` turns `KVM_MEM_LOG_DIRTY_PAGES` on for its slots (KVM
/// write-protects them; each first write then lands in the writing vCPU's
/// ring); `collect` harvests the rings, resets them and reports the pages;
/// `stop` turns logging off and drops what is left in the rings.
#[derive(Debug)]
pub struct KvmRingTracker<'vm> {
    ring: KvmDirtyRing,
    slots: Vec<Mapped<'vm>>,
    logging: bool,
}

impl KvmRingTracker<'_> {
    /// The rings (for their counters).
    pub fn ring(&self) -> &KvmDirtyRing {
        &self.ring
    }

    fn set_logging(&mut self, on: bool) -> Result<()> {
        for s in &self.slots {
            s.log
                .set_logging(on)
                .map_err(|e| slot_error("KVM_SET_USER_MEMORY_REGION", s, e))?;
        }
        self.logging = on;
        Ok(())
    }

    /// Harvest, reset, and drop everything harvested.
    fn discard(&self) -> Result<()> {
        let mut rings = self.ring.lock();
        self.ring.harvest(&mut rings)?;
        rings.pending.clear();
        Ok(())
    }

    fn collect_into(&self, dirty: &mut RegionPages) -> Result<()> {
        if !self.logging {
            return Err(MemError::TrackerState {
                tracker: NAME,
                detail: "collect() before start()",
            });
        }
        let mut rings = self.ring.lock();
        self.ring.harvest(&mut rings)?;
        for (slot, offset) in rings.pending.drain(..) {
            let Some(m) = self.slots.iter().find(|m| m.slot == slot) else {
                continue;
            };
            if offset >= m.log.pages() {
                return Err(MemError::TrackerState {
                    tracker: NAME,
                    detail: "a dirty-ring entry past its slot's end",
                });
            }
            dirty
                .get_mut(m.region)
                .map_err(|_| MemError::UnknownRegion { region: m.region })?
                .insert(m.first_page + offset);
        }
        Ok(())
    }
}

impl DirtyTracker for KvmRingTracker<'_> {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Drop stale entries, then turn logging on for every slot.
    fn start(&mut self) -> lmig_core::Result<()> {
        if self.logging {
            self.set_logging(false)?;
        }
        self.discard()?;
        Ok(self.set_logging(true)?)
    }

    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        Ok(self.collect_into(dirty)?)
    }

    /// The same as `collect`: a ring holds only what was written.
    fn collect_paused(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        Ok(self.collect_into(dirty)?)
    }

    fn stop(&mut self) -> lmig_core::Result<()> {
        self.set_logging(false)?;
        Ok(self.discard()?)
    }
}

impl Drop for KvmRingTracker<'_> {
    fn drop(&mut self) {
        if self.logging {
            if let Err(e) = self.set_logging(false) {
                debug!(error = %e, "dropping the KVM dirty-ring tracker: turning logging off failed");
            }
        }
    }
}
