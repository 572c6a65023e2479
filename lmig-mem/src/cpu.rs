//! The CPU class of the migration's bulk work: Linux `SCHED_IDLE`, for
//! the hooks [`SourceConfig::idle_lanes`](lmig_core::session::SourceConfig::idle_lanes)
//! and [`DestinationConfig::idle_receive`](lmig_core::session::DestinationConfig::idle_receive).
//!
//! A `SCHED_IDLE` thread runs only on CPU time no other thread wants, and
//! when a thread of the normal class wakes up on its CPU the kernel
//! preempts it at once (at its next return to user space or `cond_resched`
//! on a kernel without preemption), where a nice-19 thread of the normal
//! class keeps the CPU until its slice runs out. The program's own threads
//! (an event loop woken by a client) then barely wait for a CPU behind the
//! pre-copy rounds.
//!
//! Going back from `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE`
//! allowing nice 0: both functions lower nothing where they could not
//! raise it back (they return `false`; the session then runs at the
//! normal class).

use std::collections::HashSet;
use std::sync::Mutex;

use crate::sys::sched::{self, SCHED_IDLE, SCHED_OTHER};

/// Whether a thread of this process may leave `SCHED_IDLE` again:
/// `CAP_SYS_NICE` in the effective set, or an `RLIMIT_NICE` soft limit
/// allowing nice 0 (20).
pub fn may_leave_idle() -> bool {
    let cap_sys_nice = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
            u64::from_str_radix(hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 23) != 0);
    if cap_sys_nice {
        return true;
    }
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NICE)
        .is_ok_and(|(soft, _)| soft >= 20)
}

/// The calling thread: `true` moves it from the normal class to
/// `SCHED_IDLE`, `false` moves it back (a thread in another class, e.g.
/// real-time, is left alone). Returns whether the thread is now where it
/// was asked to be; `false` also when it could not come back from
/// `SCHED_IDLE` later ([`may_leave_idle`]), so that it is never lowered
/// for good. For [`SourceConfig::idle_lanes`](lmig_core::session::SourceConfig::idle_lanes).
pub fn idle_thread(idle: bool) -> bool {
    if idle && !may_leave_idle() {
        return false;
    }
    move_thread(0, idle).unwrap_or(false)
}

/// Move thread `tid` (0: the calling one) between the normal class and
/// `SCHED_IDLE`; `Ok(true)` when it is where it was asked to be.
fn move_thread(tid: i32, idle: bool) -> std::io::Result<bool> {
    let attr = sched::get(tid)?;
    let (from, to) = if idle {
        (SCHED_OTHER, SCHED_IDLE)
    } else {
        (SCHED_IDLE, SCHED_OTHER)
    };
    if attr.policy == to {
        return Ok(true);
    }
    if attr.policy != from {
        return Ok(false);
    }
    match sched::set_policy(tid, &attr, to) {
        Ok(()) => Ok(true),
        Err(e) => {
            debug!(tid = tid, idle = idle, error = %e, "thread class kept");
            Ok(false)
        }
    }
}

/// Threads that were in `SCHED_IDLE` already when [`idle_process`]
/// lowered the others: it leaves them there when it raises them back.
/// `None` while the process is not lowered.
static LOWERED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// The threads of this process (`/proc/self/task`).
fn threads() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every thread of this process: `true` moves those of the normal class
/// to `SCHED_IDLE`; `false` moves back every thread in `SCHED_IDLE` but
/// those that were there before (threads started meanwhile by a lowered
/// thread inherited its class and come back too). Returns whether the
/// process is now where it was asked to be; lowering does nothing and
/// returns `false` where the threads could not come back
/// ([`may_leave_idle`]). For a destination whose program does not run
/// yet during pre-copy: every thread of the process then receives
/// ([`DestinationConfig::idle_receive`](lmig_core::session::DestinationConfig::idle_receive)).
pub fn idle_process(idle: bool) -> bool {
    let mut lowered = LOWERED.lock().unwrap_or_else(|p| p.into_inner());
    if idle {
        if lowered.is_some() {
            return true;
        }
        if !may_leave_idle() {
            return false;
        }
        let mut before = HashSet::new();
        for tid in threads() {
            match sched::get(tid) {
                Ok(a) if a.policy == SCHED_IDLE => {
                    before.insert(tid);
                }
                // A thread that ended meanwhile, or one of another class:
                // `move_thread` leaves the latter alone.
                _ => {
                    let _ = move_thread(tid, true);
                }
            }
        }
        *lowered = Some(before);
        return true;
    }
    let Some(before) = lowered.take() else {
        return true;
    };
    let mut all = true;
    for tid in threads().into_iter().filter(|t| !before.contains(t)) {
        // A thread that ended meanwhile has nothing to raise.
        if let Ok(ok) = move_thread(tid, false) {
            all &= ok;
        }
    }
    all
}

/// Whether thread `tid` of this process (0: the calling one) is in
/// `SCHED_IDLE` (`false` when it cannot be told).
pub fn is_idle(tid: i32) -> bool {
    sched::get(tid).is_ok_and(|a| a.policy == SCHED_IDLE)
}

/// The calling thread's id (`gettid`), for [`is_idle`].
pub fn current_tid() -> i32 {
    sched::gettid()
}
