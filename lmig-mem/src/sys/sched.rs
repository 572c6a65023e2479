//! A thread's scheduling class: `sched_getattr` / `sched_setattr` on any
//! thread of this process, to move the migration's bulk threads to
//! `SCHED_IDLE` and back ([`crate::cpu`]).

use std::io;

/// `SCHED_OTHER`, the normal (fair) class.
pub(crate) const SCHED_OTHER: u32 = libc::SCHED_OTHER as u32;
/// `SCHED_IDLE`: runs only on CPU time no other thread wants; a waking
/// thread of another class preempts it at once.
pub(crate) const SCHED_IDLE: u32 = libc::SCHED_IDLE as u32;

/// `struct sched_attr` of `<linux/sched/types.h>`, its first version
/// (`SCHED_ATTR_SIZE_VER0`, 48 bytes). (`sys::set_thread_slice` keeps a
/// private copy of the same layout.)
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Attr {
    size: u32,
    /// `SCHED_OTHER`, `SCHED_IDLE`, `SCHED_FIFO`, ...
    pub(crate) policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// `sched_getattr(tid)`: the scheduling attributes of thread `tid` (0:
/// the calling thread).
#[doc(alias = "sched_getattr")]
pub(crate) fn get(tid: i32) -> io::Result<Attr> {
    let mut attr = Attr::default();
    let size = std::mem::size_of::<Attr>() as u32;
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a live,
    // properly aligned VER0 `sched_attr` of exactly that size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut Attr,
            size,
            0,
        )
    };
    if rc == 0 {
        Ok(attr)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `sched_setattr(tid)` with `attr` moved to class `policy` (its nice
/// value, and a fair thread's slice, kept). Leaving `SCHED_IDLE` needs
/// `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows the thread's nice value
/// (`EPERM` otherwise); entering it needs nothing for a thread of ours.
#[doc(alias = "sched_setattr")]
pub(crate) fn set_policy(tid: i32, attr: &Attr, policy: u32) -> io::Result<()> {
    let attr = Attr {
        size: std::mem::size_of::<Attr>() as u32,
        policy,
        // A fair thread's flags: none (`SCHED_FLAG_RESET_ON_FORK` kept).
        flags: attr.flags & libc::SCHED_FLAG_RESET_ON_FORK as u64,
        priority: 0,
        deadline: 0,
        period: 0,
        ..*attr
    };
    // SAFETY: sched_setattr reads `attr.size` bytes from a live, properly
    // laid out VER0 `sched_attr` and writes nothing.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const Attr, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `gettid()`.
pub(crate) fn gettid() -> i32 {
    // SAFETY: gettid takes nothing and cannot fail.
    unsafe { libc::gettid() }
}
