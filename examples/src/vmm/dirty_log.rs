//! KVM's dirty log as lmig's [`DirtyLog`](lmig_mem::DirtyLog): `start` turns
//! `KVM_MEM_LOG_DIRTY_PAGES` on for guest RAM's memory slot,
//! `fetch_and_reset` is `KVM_GET_DIRTY_LOG` (which returns the pages the
//! guest wrote since the last call and write-protects them again), `stop`
//! turns logging off. Wrapped in [`lmig_mem::DirtyLogTracker`] it is the
//! session's tracker (`lmig-bench vm --tracker kvm`).

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use lmig_core::BoxError;
use lmig_core::model::{RegionInfo, RegionLayout};
use lmig_mem::{DirtyLog, DirtyLogTracker};

use super::{GUEST_REGION, GuestMemory, Machine, VmmError, kvm_err};

/// KVM's dirty log of a [`Machine`]'s guest RAM (memory slot 0).
#[derive(Debug)]
pub struct KvmDirtyLog<'m> {
    vm: &'m VmFd,
    memory: &'m GuestMemory,
}

impl<'m> KvmDirtyLog<'m> {
    /// The dirty log of `machine`'s guest RAM.
    #[must_use]
    pub fn new(machine: &'m Machine) -> Self {
        Self {
            vm: machine.vm(),
            memory: machine.memory(),
        }
    }

    /// Wrapped as lmig's tracker over `machine`'s regions.
    #[must_use]
    pub fn tracker(machine: &'m Machine) -> DirtyLogTracker<Self> {
        DirtyLogTracker::new(machine.regions().layout(), Self::new(machine))
    }
}

impl DirtyLog for KvmDirtyLog<'_> {
    fn fetch_and_reset(&mut self, region: &RegionInfo, bitmap: &mut [u64]) -> Result<(), BoxError> {
        if region.id != GUEST_REGION {
            return Err(
                VmmError::BadInput(format!("region {:?} is not guest RAM", region.id)).into(),
            );
        }
        let log = self
            .vm
            .get_dirty_log(0, self.memory.len())
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let n = bitmap.len().min(log.len());
        bitmap[..n].copy_from_slice(&log[..n]);
        Ok(())
    }

    fn start(&mut self, _layout: &RegionLayout) -> Result<(), BoxError> {
        Ok(self.memory.register(self.vm, 0, KVM_MEM_LOG_DIRTY_PAGES)?)
    }

    fn stop(&mut self) -> Result<(), BoxError> {
        Ok(self.memory.register(self.vm, 0, 0)?)
    }
}
