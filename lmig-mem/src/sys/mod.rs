//! The only place of this crate that talks to the kernel through `unsafe`:
//! mappings and raw copies ([`mapping`]), the promise behind adopted
//! memory ([`foreign`]), userfaultfd ([`uffd`]), the
//! `PAGEMAP_SCAN` ioctl ([`pagemap`]) and, with feature `kvm`, KVM's dirty
//! log (`kvm`). Everything above this module is safe
//! code built on the safe functions exported here.
#![allow(unsafe_code)]

pub(crate) mod foreign;
#[cfg(feature = "kvm")]
pub(crate) mod kvm;
pub(crate) mod mapping;
pub(crate) mod pagemap;
pub(crate) mod sched;
pub(crate) mod uffd;

/// `setpriority(PRIO_PROCESS, gettid(), nice)`: the calling thread's nice
/// value (Linux keeps it per thread). Lowering it below 0 needs
/// `CAP_SYS_NICE` (or `RLIMIT_NICE`); without, `EACCES`.
#[doc(alias = "setpriority")]
pub(crate) fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take plain integers and touch no memory.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `struct sched_attr` of `<linux/sched/types.h>`, its first version
/// (`SCHED_ATTR_SIZE_VER0`, 48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// `sched_setattr(gettid(), {SCHED_OTHER, nice, runtime: slice_ns})`: the
/// calling thread's nice value and, since Linux 6.12, its EEVDF slice
/// (`sched_runtime` of a fair-class thread; the kernel clamps it to
/// 0.1–100 ms). A thread with a slice shorter than the running thread's
/// preempts it when it wakes, instead of waiting for that thread's slice
/// to run out (0.75–3 ms on a busy CPU). Older kernels ignore the runtime
/// of a fair thread; `EPERM` without `CAP_SYS_NICE` for a nice below 0.
#[doc(alias = "sched_setattr")]
pub(crate) fn set_thread_slice(nice: i32, slice_ns: u64) -> std::io::Result<()> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: slice_ns,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr reads `attr.size` bytes from a live, properly
    // laid out `sched_attr` (VER0) and writes nothing; pid 0 = this thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `_IOC(dir, type, nr, size)` of `<asm-generic/ioctl.h>` (x86_64, arm64 layout).
pub(crate) const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
/// `_IOC_WRITE`.
pub(crate) const IOC_WRITE: u64 = 1;
/// `_IOC_READ`.
pub(crate) const IOC_READ: u64 = 2;

/// The data ranges `[start, end)` of the file `fd` inside `from..from + len`
/// (absolute file offsets),
/// found with `lseek(SEEK_DATA)` / `lseek(SEEK_HOLE)`: every byte outside
/// them reads as zero (a hole). For shmem (memfd) a page counts as data when
/// it is in the page cache (written, or read once) or swapped out.
#[doc(alias = "SEEK_DATA")]
#[doc(alias = "SEEK_HOLE")]
pub(crate) fn data_ranges(
    fd: std::os::fd::BorrowedFd<'_>,
    from: u64,
    len: u64,
    mut found: impl FnMut(u64, u64),
) -> std::io::Result<()> {
    use nix::unistd::{Whence, lseek};
    let stop = from.saturating_add(len);
    let mut at = from;
    while at < stop {
        let start = match lseek(fd, at as libc::off_t, Whence::SeekData) {
            Ok(s) => s as u64,
            // No data at or after `at`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= stop {
            break;
        }
        let end = match lseek(fd, start as libc::off_t, Whence::SeekHole) {
            Ok(e) => (e as u64).min(stop),
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            // No progress: never spin.
            return Err(std::io::Error::other(format!(
                "SEEK_HOLE from {start} returned {end}"
            )));
        }
        found(start, end);
        at = end;
    }
    Ok(())
}

/// The system's base page size (`sysconf(_SC_PAGESIZE)`).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n <= 0 { 4096 } else { n as usize }
}

/// Run an `ioctl` whose argument is a pointer to `arg`, returning its
/// non-negative result or the errno.
///
/// # Safety
/// `request` must be an ioctl of `fd` whose argument is exactly a `*mut T`
/// (the kernel reads and/or writes `size_of::<T>()` bytes through it), and
/// any pointers inside `*arg` must be valid for what that ioctl does with them.
pub(crate) unsafe fn ioctl_ptr<T>(
    fd: std::os::fd::BorrowedFd<'_>,
    request: u64,
    arg: &mut T,
) -> std::io::Result<libc::c_int> {
    use std::os::fd::AsRawFd;
    // SAFETY: the caller guarantees `request` takes a `*mut T`; `arg` is a
    // valid, exclusive reference for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
