//! KVM's dirty log of one memory slot (feature `kvm`): turning
//! `KVM_MEM_LOG_DIRTY_PAGES` on and off (`KVM_SET_USER_MEMORY_REGION` with
//! the slot's own range), `KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`, and
//! the `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` / dirty-ring probes. The struct
//! layouts and numbers are those of `<linux/kvm.h>`; kvm-ioctls 0.25 has no
//! `KVM_CLEAR_DIRTY_LOG` and allocates a bitmap per `KVM_GET_DIRTY_LOG`.
//!
//! [`SlotLog`] holds the invariant that makes the bitmap ioctls safe: its
//! slot was (re-)registered by [`SlotLog::set_logging`] with exactly
//! `pages` pages, so KVM reads or writes at most `pages.div_ceil(64)`
//! words of a bitmap.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES, kvm_enable_cap, kvm_userspace_memory_region,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::{IOC_READ, IOC_WRITE, ioc, ioctl_ptr};

/// `KVMIO`.
const KVMIO: u8 = 0xAE;

/// `struct kvm_dirty_log`.
#[repr(C)]
#[derive(Debug, Default)]
struct KvmDirtyLog {
    slot: u32,
    padding1: u32,
    dirty_bitmap: u64,
}
const _: () = assert!(size_of::<KvmDirtyLog>() == 16);

/// `struct kvm_clear_dirty_log`.
#[repr(C)]
#[derive(Debug, Default)]
struct KvmClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    dirty_bitmap: u64,
}
const _: () = assert!(size_of::<KvmClearDirtyLog>() == 24);

/// `KVM_GET_DIRTY_LOG` = `_IOW(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: u64 = ioc(IOC_WRITE, KVMIO, 0x42, size_of::<KvmDirtyLog>());
/// `KVM_CLEAR_DIRTY_LOG` = `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: u64 = ioc(
    IOC_READ | IOC_WRITE,
    KVMIO,
    0xc0,
    size_of::<KvmClearDirtyLog>(),
);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: `KVM_GET_DIRTY_LOG` only reads;
/// `KVM_CLEAR_DIRTY_LOG` resets and write-protects.
pub(crate) const MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET`: turning logging on sets every bit and
/// write-protects nothing (the clears do, range by range).
pub(crate) const INITIALLY_SET: u64 = 1 << 1;

/// What the VM's KVM offers for dirty logging.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Caps {
    /// `KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`: the flags.
    pub manual_protect: u64,
    /// `KVM_CHECK_EXTENSION(KVM_CAP_DIRTY_LOG_RING)`: the largest ring, bytes.
    pub ring_bytes: u64,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` is offered.
    pub ring_acq_rel: bool,
}

/// `KVM_CHECK_EXTENSION` of the dirty-log capabilities on `vm`.
#[doc(alias = "KVM_CHECK_EXTENSION")]
pub(crate) fn caps(vm: &VmFd) -> Caps {
    let positive = |v: i32| u64::try_from(v).unwrap_or(0);
    Caps {
        manual_protect: positive(
            vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)),
        ),
        ring_bytes: positive(vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_DIRTY_LOG_RING))),
        ring_acq_rel: vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL))
            > 0,
    }
}

/// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)` (0 turns it off).
#[doc(alias = "KVM_ENABLE_CAP")]
pub(crate) fn set_manual_protect(vm: &VmFd, flags: u64) -> io::Result<()> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = flags;
    vm.enable_cap(&cap)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// One memory slot of a VM whose dirty log a tracker reads.
#[derive(Debug)]
pub(crate) struct SlotLog<'vm> {
    vm: &'vm VmFd,
    slot: u32,
    guest_phys_addr: u64,
    host_addr: u64,
    pages: u64,
    page_size: u64,
    flags: u32,
}

impl<'vm> SlotLog<'vm> {
    /// Slot `slot` of `vm`: `pages` pages of `page_size` at guest physical
    /// `guest_phys_addr`, host address `host_addr`, flags `flags` besides
    /// logging. Nothing is issued yet.
    pub(crate) fn new(
        vm: &'vm VmFd,
        slot: u32,
        guest_phys_addr: u64,
        host_addr: u64,
        pages: u64,
        page_size: u64,
        flags: u32,
    ) -> Self {
        Self {
            vm,
            slot,
            guest_phys_addr,
            host_addr,
            pages,
            page_size,
            flags,
        }
    }

    /// Pages of the slot.
    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    /// `KVM_SET_USER_MEMORY_REGION` of the slot with its own range and
    /// flags, plus `KVM_MEM_LOG_DIRTY_PAGES` when `on`. KVM refuses (EINVAL)
    /// a registration whose host address or size differs from the slot's.
    #[doc(alias = "KVM_SET_USER_MEMORY_REGION")]
    pub(crate) fn set_logging(&self, on: bool) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: if on {
                self.flags | KVM_MEM_LOG_DIRTY_PAGES
            } else {
                self.flags
            },
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.pages * self.page_size,
            userspace_addr: self.host_addr,
        };
        // SAFETY: the VMM registered this slot over this host range (an
        // lmig region: mapped while the region lives, the VMM's contract of
        // `ForeignMemory::new`); re-registering with the same range only
        // changes its flags, never what memory KVM maps.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn words(&self) -> usize {
        self.pages.div_ceil(64) as usize
    }

    /// `KVM_GET_DIRTY_LOG` into `bitmap` (at least `pages.div_ceil(64)`
    /// words). Without manual protection KVM also resets the log and
    /// write-protects the pages it returned; with it, only reads.
    #[doc(alias = "KVM_GET_DIRTY_LOG")]
    pub(crate) fn get(&self, bitmap: &mut [u64]) -> io::Result<()> {
        if bitmap.len() < self.words() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut arg = KvmDirtyLog {
            slot: self.slot,
            padding1: 0,
            dirty_bitmap: bitmap.as_mut_ptr() as u64,
        };
        let vm = borrow(self.vm);
        // SAFETY: KVM_GET_DIRTY_LOG takes a `struct kvm_dirty_log *` and
        // writes ALIGN(npages, 64) / 8 bytes to `dirty_bitmap`; the slot has
        // `pages` pages (registered so by `set_logging`, which KVM refuses
        // with another size), and `bitmap` holds at least that many words.
        unsafe { ioctl_ptr(vm, KVM_GET_DIRTY_LOG, &mut arg)? };
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG` of pages `first..first + count` (`first` a
    /// multiple of 64; `count` too unless it reaches the slot's end): the
    /// bits set in `bitmap` (bit 0 = page `first`) are reset and those
    /// pages write-protected again.
    #[doc(alias = "KVM_CLEAR_DIRTY_LOG")]
    pub(crate) fn clear(&self, first: u64, count: u64, bitmap: &[u64]) -> io::Result<()> {
        let end = first.checked_add(count);
        let aligned = first.is_multiple_of(64)
            && (count.is_multiple_of(64) || end == Some(self.pages))
            && end.is_some_and(|e| e <= self.pages);
        if !aligned || (bitmap.len() as u64) < count.div_ceil(64) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut arg = KvmClearDirtyLog {
            slot: self.slot,
            num_pages: u32::try_from(count)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            first_page: first,
            dirty_bitmap: bitmap.as_ptr() as u64,
        };
        let vm = borrow(self.vm);
        // SAFETY: KVM_CLEAR_DIRTY_LOG takes a `struct kvm_clear_dirty_log *`
        // and only reads ALIGN(num_pages, 64) / 8 bytes of `dirty_bitmap`,
        // which `bitmap` holds (checked); the range lies in the slot.
        unsafe { ioctl_ptr(vm, KVM_CLEAR_DIRTY_LOG, &mut arg)? };
        Ok(())
    }
}

/// `KVM_RESET_DIRTY_RINGS` = `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: u64 = ioc(0, KVMIO, 0xc7, 0);
/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page for user space.
const GFN_DIRTY: u32 = 1 << 0;
/// `KVM_DIRTY_GFN_F_RESET`: user space harvested it; KVM may reset it.
const GFN_RESET: u32 = 1 << 1;
/// `KVM_EXIT_DIRTY_RING_FULL`: a vCPU's ring is (softly) full; user space
/// harvests and resets the rings before running it again.
pub const EXIT_DIRTY_RING_FULL: u32 = 31;

/// `KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING, bytes)`: every vCPU created
/// from now on has a dirty ring of `bytes` (a power of two). KVM refuses
/// it once a vCPU exists.
#[doc(alias = "KVM_ENABLE_CAP")]
pub(crate) fn enable_dirty_ring(vm: &VmFd, bytes: u32) -> io::Result<()> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = u64::from(bytes);
    vm.enable_cap(&cap)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

/// `KVM_RESET_DIRTY_RINGS` on the VM `vm`: KVM write-protects again the
/// pages of every harvested entry of every vCPU's ring and frees those
/// entries. Returns how many it reset.
#[doc(alias = "KVM_RESET_DIRTY_RINGS")]
pub(crate) fn reset_dirty_rings(vm: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches no
    // memory of ours.
    let r = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as libc::c_ulong, 0) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// One vCPU's dirty ring, mapped from its fd (`struct kvm_dirty_gfn`
/// entries at page `KVM_DIRTY_LOG_PAGE_OFFSET` of the vCPU fd). The mapping
/// holds its own reference to the vCPU file: it stays valid after the fd
/// closes, until dropped.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    /// The first `kvm_dirty_gfn` (16 bytes: flags, slot, offset).
    base: std::ptr::NonNull<u8>,
    entries: u32,
    /// The next entry to harvest (free-running, taken modulo `entries`).
    next: u32,
}

// SAFETY: the ring is shared memory with KVM, accessed only through atomic
// loads and stores of each entry's flags and plain reads of a harvested
// entry; `DirtyRing` is used by one thread at a time (`&mut self`).
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Map the ring of `bytes` (as enabled) of the vCPU `vcpu`.
    pub(crate) fn map_vcpu(vcpu: &VcpuFd, bytes: u32) -> io::Result<Self> {
        // SAFETY: the fd is open while `vcpu` lives, and the borrow ends
        // with this call (the mapping holds its own file reference).
        let fd = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) };
        Self::map(fd, bytes)
    }

    fn map(vcpu: BorrowedFd<'_>, bytes: u32) -> io::Result<Self> {
        if !bytes.is_power_of_two() || bytes < 16 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let page = super::page_size() as libc::off_t;
        let offset = libc::off_t::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a new shared mapping of the vCPU fd's dirty-ring pages
        // (KVM's documented mmap offset and size); it overlaps no existing
        // memory of ours and is unmapped only in `Drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = std::ptr::NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self {
            base,
            entries: bytes / 16,
            next: 0,
        })
    }

    /// Take every dirty entry from the next on, in order, handing
    /// `(slot, offset)` to `found` and marking it harvested (KVM frees it
    /// at the next [`reset_dirty_rings`]). Returns how many.
    pub(crate) fn harvest(&mut self, mut found: impl FnMut(u32, u64)) -> u32 {
        use std::sync::atomic::{AtomicU32, Ordering};
        let mut taken = 0;
        while taken < self.entries {
            let at = (self.next % self.entries) as usize * 16;
            // SAFETY: `at + 16 <= entries * 16 = bytes`, inside the
            // mapping; the entry's first u32 is its flags, 4-aligned (the
            // mapping is page-aligned), which KVM and this thread access
            // atomically (KVM: WRITE_ONCE/smp_store_release).
            let flags = unsafe { &*self.base.as_ptr().add(at).cast::<AtomicU32>() };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: as above; KVM wrote slot and offset before setting
            // the dirty flag (release), which the acquire load saw, and
            // does not write them again until the entry is reset.
            let (slot, offset) = unsafe {
                let e = self.base.as_ptr().add(at);
                (
                    e.add(4).cast::<u32>().read_volatile(),
                    e.add(8).cast::<u64>().read_volatile(),
                )
            };
            found(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            taken += 1;
        }
        taken
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made, of this size, used by no one else.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.entries as usize * 16);
        }
    }
}

/// A duplicate of the VM's fd (for ioctls from threads that do not hold
/// the `VmFd`).
pub(crate) fn dup_vm(vm: &VmFd) -> io::Result<std::os::fd::OwnedFd> {
    borrow(vm).try_clone_to_owned()
}

/// The VM's fd, borrowed for one ioctl.
fn borrow(vm: &VmFd) -> BorrowedFd<'_> {
    // SAFETY: the fd is open while `vm` lives, and the borrow cannot
    // outlive `vm`.
    unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctl numbers of `<linux/kvm.h>` (x86_64).
    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        assert_eq!(KVM_RESET_DIRTY_RINGS, 0xaec7);
    }
}
