//! An opt-in CPU for the threads of the post-copy fault path.
//!
//! A fault's round trip is a strict chain of wake-ups: the destination's
//! fault thread sends the request, the source's request server answers it,
//! the destination's reply thread places the page. On a host with few CPUs
//! (measured on 2 vCPUs with both ends on one host) each wake-up that
//! crosses to the other CPU costs several µs (an inter-processor
//! interrupt, in a VM an exit to the host): the same TCP round trip takes
//! ~8.5 µs on one CPU and ~15–22 µs across two. Holding the chain's
//! threads on one CPU makes those wake-ups local; the push and the rest of
//! the program keep the other CPUs.
//!
//! Off by default: which CPU suits depends on the host (its other work,
//! where the program's own threads run), so the embedder chooses.

use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::error::{MemError, Result};

/// No CPU chosen.
const NONE: usize = usize::MAX;

/// The CPU chosen with [`set_fault_path_cpu`] (`NONE`: none).
static FAULT_PATH_CPU: AtomicUsize = AtomicUsize::new(NONE);

/// Hold the threads of this process's post-copy fault path on `cpu`
/// (`None`, the default: leave them to the scheduler).
///
/// The threads are those that call
/// [`MemorySink::urgent_thread`](lmig_core::MemorySink::urgent_thread) or
/// [`MemorySource::urgent_thread`](lmig_core::MemorySource::urgent_thread)
/// of lmig-mem's region sets: the destination's fault and reply threads
/// and the source's request server. It applies to those that start after
/// the call (a session's post-copy threads start at its resume). A thread
/// that cannot be held there (the CPU went offline, or the thread's
/// cpuset changed since) keeps running where it may, said at debug level.
///
/// # Errors
/// [`MemError::Os`] (`EINVAL`) if `cpu` is not one this process may run
/// on; the setting is then unchanged.
pub fn set_fault_path_cpu(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else {
        FAULT_PATH_CPU.store(NONE, Ordering::Relaxed);
        return Ok(());
    };
    let allowed = sched_getaffinity(Pid::from_raw(0))
        .map_err(|e| MemError::os("sched_getaffinity", "this thread", e.into()))?;
    if cpu >= CpuSet::count() || cpu == NONE || !allowed.is_set(cpu).unwrap_or(false) {
        return Err(MemError::os(
            "sched_getaffinity",
            format!("the fault path's CPU {cpu} (not one this process may run on)"),
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    FAULT_PATH_CPU.store(cpu, Ordering::Relaxed);
    Ok(())
}

/// The CPU chosen with [`set_fault_path_cpu`], if any.
pub fn fault_path_cpu() -> Option<usize> {
    match FAULT_PATH_CPU.load(Ordering::Relaxed) {
        NONE => None,
        cpu => Some(cpu),
    }
}

/// Hold the calling thread on the chosen CPU, if one was chosen.
pub(super) fn hold_on_fault_path_cpu() {
    let Some(cpu) = fault_path_cpu() else {
        return;
    };
    let mut one = CpuSet::new();
    let held = one
        .set(cpu)
        .and_then(|()| sched_setaffinity(Pid::from_raw(0), &one));
    match held {
        Ok(()) => debug!(cpu, "post-copy fault path: thread held on its CPU"),
        Err(e) => debug!(cpu, error = %e, "post-copy fault path: thread not held on its CPU"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUs the calling thread may run on.
    fn allowed() -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect()
    }

    /// One test for the process-wide setting (tests run in parallel).
    #[test]
    fn a_chosen_cpu_holds_the_fault_path_threads_and_a_bad_one_is_refused() {
        let cpus = allowed();
        let last = *cpus.last().unwrap();
        // Default: none, and a fault-path thread keeps all its CPUs.
        assert_eq!(fault_path_cpu(), None);
        let untouched = std::thread::spawn(|| {
            super::super::urgent_thread();
            allowed()
        })
        .join()
        .unwrap();
        assert_eq!(untouched, cpus);
        // A CPU this process may not run on is refused, the setting kept.
        for bad in [CpuSet::count(), usize::MAX, usize::MAX - 1] {
            assert!(matches!(
                set_fault_path_cpu(Some(bad)),
                Err(MemError::Os { source, .. }) if source.raw_os_error() == Some(libc::EINVAL)
            ));
            assert_eq!(fault_path_cpu(), None);
        }
        set_fault_path_cpu(Some(last)).unwrap();
        assert_eq!(fault_path_cpu(), Some(last));
        let held = std::thread::spawn(|| {
            super::super::urgent_thread();
            allowed()
        })
        .join()
        .unwrap();
        // Only the fault-path thread is held, not the thread that chose.
        assert_eq!(held, vec![last]);
        assert_eq!(allowed(), cpus);
        set_fault_path_cpu(None).unwrap();
        assert_eq!(fault_path_cpu(), None);
        let after = std::thread::spawn(|| {
            super::super::urgent_thread();
            allowed()
        })
        .join()
        .unwrap();
        assert_eq!(after, cpus);
    }
}
