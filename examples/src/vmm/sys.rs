//! The micro-VMM's unsafe steps, each with its SAFETY note: mapping guest
//! memory (a memfd, `MAP_SHARED`), giving it to KVM and to lmig, and
//! volatile access to it (the guest writes it concurrently, so no Rust
//! reference is ever made over it).

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use lmig_mem::{ForeignBacking, ForeignMemory, Region, RegionId};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap, munmap};

use super::{VmmError, kvm_err};

/// `setpriority(PRIO_PROCESS, gettid(), nice)`: the calling thread's nice
/// value (Linux keeps one per thread); below 0 needs `CAP_SYS_NICE`.
pub fn set_thread_nice(nice: i32) -> Result<(), VmmError> {
    use nix::libc;
    // SAFETY: gettid and setpriority take plain integers and touch no memory.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(VmmError::Sys(
            "setpriority",
            std::io::Error::last_os_error(),
        ))
    }
}

/// Put the calling thread in `SCHED_FIFO` at `priority` (1-99; needs
/// `CAP_SYS_NICE`): it then runs before every normal thread as soon as it
/// is runnable, i.e. as soon as the thread holding its CPU reaches a
/// preemption point.
pub fn set_thread_fifo(priority: i32) -> Result<(), VmmError> {
    use nix::libc;
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(VmmError::Sys(
            "sched_setscheduler(SCHED_FIFO)",
            std::io::Error::last_os_error(),
        ))
    }
}

/// Let the calling thread (and the threads it starts from now on) run
/// only on the CPUs in `cpus`.
pub fn set_thread_cpus(cpus: &[usize]) -> Result<(), VmmError> {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)
            .map_err(|e| VmmError::Sys("CPU set", std::io::Error::from(e)))?;
    }
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| VmmError::Sys("sched_setaffinity", std::io::Error::from(e)))
}

/// Guest RAM: a memfd mapped shared by the VMM from offset 0. Unmapped on
/// drop; whoever adopted or registered it must be gone by then (the
/// [`Machine`](super::Machine) drops its region and VM first).
#[derive(Debug)]
pub struct GuestMemory {
    fd: OwnedFd,
    host: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, accessed only through raw
// pointers and volatile/atomic operations; no thread-bound state.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; every access is a raw volatile copy.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// A fresh memfd of `len` bytes (a multiple of 2 MiB), mapped.
    pub fn new(len: usize) -> Result<Self, VmmError> {
        let fd = memfd_create("lmig-vmm-guest", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| VmmError::Sys("memfd_create", e.into()))?;
        nix::unistd::ftruncate(
            &fd,
            i64::try_from(len).map_err(|_| VmmError::BadInput("guest size".into()))?,
        )
        .map_err(|e| VmmError::Sys("ftruncate", e.into()))?;
        let size =
            NonZeroUsize::new(len).ok_or_else(|| VmmError::BadInput("guest size 0".into()))?;
        // SAFETY: a fresh shared mapping of our own memfd, at an address the
        // kernel picks; nothing else refers to it yet.
        let host = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| VmmError::Sys("mmap guest memory", e.into()))?;
        Ok(Self {
            fd,
            host: host.cast(),
            len,
        })
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (guest memory is never empty); for clippy's `len_without_is_empty`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Give bytes `at..at + len` to KVM as slot `slot` at guest physical
    /// `at` (2 MiB aligned, inside the memory).
    pub fn register(&self, vm: &VmFd, slot: u32, at: u64, len: u64) -> Result<(), VmmError> {
        let start = self.part(at, len)?;
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: at,
            memory_size: len,
            userspace_addr: self.host.as_ptr() as u64 + start as u64,
        };
        // SAFETY: the range is our own mapping (checked in bounds), which
        // stays mapped until `self` drops; the Machine drops its VmFd (and
        // with it the slot) before its GuestMemory.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
    }

    /// Adopt bytes `at..at + len` as lmig region `id` (the memfd mapped
    /// from offset `at`).
    pub fn adopt(&self, id: RegionId, at: u64, len: u64) -> Result<Region, VmmError> {
        let start = self.part(at, len)?;
        // SAFETY: the contract of `ForeignMemory::new`: our mapping is
        // readable and writable, stays mapped until `self` drops, and the
        // Machine drops the region (and every session using it) first; the
        // backing is exactly this memfd from offset `at` (in bounds,
        // checked), never truncated; the VMM accesses it only through
        // volatile copies, never references.
        let memory =
            unsafe { ForeignMemory::new(self.host.as_ptr().wrapping_add(start), len as usize) };
        Ok(Region::adopt(
            id,
            memory,
            ForeignBacking::SharedFile {
                fd: self.fd.as_fd(),
                offset: at,
            },
        )?)
    }

    /// `at..at + len` as a byte offset: 2 MiB aligned, inside the memory.
    fn part(&self, at: u64, len: u64) -> Result<usize, VmmError> {
        let ok = at.is_multiple_of(2 << 20)
            && len.is_multiple_of(2 << 20)
            && len > 0
            && at.checked_add(len).is_some_and(|e| e <= self.len as u64);
        if !ok {
            return Err(VmmError::BadInput(format!(
                "guest range {at:#x}+{len:#x} (2 MiB steps inside {:#x})",
                self.len
            )));
        }
        usize::try_from(at).map_err(|_| VmmError::BadInput("guest address".into()))
    }

    fn check(&self, at: u64, len: usize) -> Result<usize, VmmError> {
        let at = usize::try_from(at).map_err(|_| VmmError::BadInput("guest address".into()))?;
        match at.checked_add(len) {
            Some(end) if end <= self.len && at.is_multiple_of(8) => Ok(at),
            _ => Err(VmmError::BadInput(format!(
                "guest range {at:#x}+{len} outside guest memory"
            ))),
        }
    }

    /// Fault every page of guest RAM in, writable (`MADV_POPULATE_WRITE`),
    /// as a destination VMM does before a migration arrives (QEMU's
    /// `-mem-prealloc`): the session's own pre-fault then finds nothing to
    /// do while the source's guest runs on the same CPUs.
    pub fn prefault(&self) -> Result<(), VmmError> {
        // SAFETY: our own mapping, whole; populating writes no byte of it
        // (the kernel only allocates the pages, zeroed or as they are).
        unsafe { madvise(self.host.cast(), self.len, MmapAdvise::MADV_POPULATE_WRITE) }
            .map_err(|e| VmmError::Sys("madvise(MADV_POPULATE_WRITE)", e.into()))
    }

    /// Read the qword at guest physical `at` (8-aligned).
    pub fn read_u64(&self, at: u64) -> Result<u64, VmmError> {
        let at = self.check(at, 8)?;
        // SAFETY: in bounds and aligned (checked); a volatile read of shared
        // memory the guest may write concurrently (a torn value is
        // impossible for an aligned qword on x86-64).
        Ok(unsafe { self.host.as_ptr().add(at).cast::<u64>().read_volatile() })
    }

    /// Write the qword at guest physical `at` (8-aligned).
    pub fn write_u64(&self, at: u64, value: u64) -> Result<(), VmmError> {
        let at = self.check(at, 8)?;
        // SAFETY: in bounds and aligned (checked); a volatile write, no
        // reference over guest memory.
        unsafe {
            self.host
                .as_ptr()
                .add(at)
                .cast::<u64>()
                .write_volatile(value)
        };
        Ok(())
    }

    /// Copy `bytes` to guest physical `at` (8-aligned).
    pub fn write(&self, at: u64, bytes: &[u8]) -> Result<(), VmmError> {
        let at = self.check(at, bytes.len())?;
        // SAFETY: in bounds (checked); `bytes` is our own buffer, which
        // cannot overlap guest memory (no reference into it exists).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.host.as_ptr().add(at), bytes.len())
        };
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping; KVM's slot and lmig's region over it are
        // gone (the Machine's field order drops them first).
        if let Err(e) = unsafe { munmap(self.host.cast(), self.len) } {
            eprintln!("lmig-vmm: munmap guest memory: {e}");
        }
    }
}
