//! Where the threads of the post-copy fault path run.
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
//! [`FaultPathAffinity`] says where: left to the scheduler, a CPU the
//! embedder names, or [`FaultPathAffinity::Together`], one CPU chosen
//! without a number (the highest-numbered one the first of these threads
//! may run on, so that the two ends of a migration on one host choose the
//! same).

use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::error::{MemError, Result};

/// Where this process holds the threads of its post-copy fault path
/// ([`set_fault_path_affinity`]).
#[non_exhaustive]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum FaultPathAffinity {
    /// Left to the scheduler (the default).
    #[default]
    Free,
    /// Held on this CPU ([`set_fault_path_cpu`]).
    Cpu(usize),
    /// Held together on one CPU that needs no number: the highest-numbered
    /// CPU the first of them may run on when it starts, kept for the later
    /// ones (of this and later sessions). If a thread may not run there
    /// (the CPU went offline, or the process's cpuset changed), the
    /// highest it may run on becomes the chosen one. The rule needs no
    /// exchange: the two ends of a migration on one host that may run on
    /// the same CPUs choose the same one, so no step of a fault's round
    /// trip crosses CPUs (measured: when each end chose the CPU its first
    /// thread happened to start on and the two differed, the fault's p99
    /// was 1.1–4.5 ms against ~0.2 ms on one CPU).
    Together,
}

/// Encoding of the mode in [`MODE`]: `FREE`, `TOGETHER`, or a CPU number.
const FREE: usize = usize::MAX;
const TOGETHER: usize = usize::MAX - 1;

/// The mode chosen with [`set_fault_path_affinity`].
static MODE: AtomicUsize = AtomicUsize::new(FREE);

/// In [`FaultPathAffinity::Together`]: the CPU chosen by the first thread
/// (`FREE`: none yet).
static TOGETHER_CPU: AtomicUsize = AtomicUsize::new(FREE);

/// Hold the threads of this process's post-copy fault path as `mode` says.
///
/// The threads are those that call
/// [`MemorySink::urgent_thread`](lmig_core::MemorySink::urgent_thread) or
/// [`MemorySource::urgent_thread`](lmig_core::MemorySource::urgent_thread)
/// of lmig-mem's region sets: the destination's fault and reply threads
/// and the source's request server. It applies to those that start after
/// the call (a session's post-copy threads start at its resume). A thread
/// that cannot be held where the mode says keeps running where it may,
/// said at debug level. Setting [`FaultPathAffinity::Together`] again
/// forgets the CPU chosen before.
///
/// # Errors
/// [`MemError::Os`] (`EINVAL`) for a [`FaultPathAffinity::Cpu`] that is not
/// one this process may run on; the setting is then unchanged.
pub fn set_fault_path_affinity(mode: FaultPathAffinity) -> Result<()> {
    let encoded = match mode {
        FaultPathAffinity::Free => FREE,
        FaultPathAffinity::Together => TOGETHER,
        FaultPathAffinity::Cpu(cpu) => {
            let allowed = sched_getaffinity(Pid::from_raw(0))
                .map_err(|e| MemError::os("sched_getaffinity", "this thread", e.into()))?;
            if cpu >= CpuSet::count() || cpu >= TOGETHER || !allowed.is_set(cpu).unwrap_or(false) {
                return Err(MemError::os(
                    "sched_getaffinity",
                    format!("the fault path's CPU {cpu} (not one this process may run on)"),
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                ));
            }
            cpu
        }
    };
    TOGETHER_CPU.store(FREE, Ordering::Relaxed);
    MODE.store(encoded, Ordering::Relaxed);
    Ok(())
}

/// The mode chosen with [`set_fault_path_affinity`] (or
/// [`set_fault_path_cpu`]).
pub fn fault_path_affinity() -> FaultPathAffinity {
    match MODE.load(Ordering::Relaxed) {
        FREE => FaultPathAffinity::Free,
        TOGETHER => FaultPathAffinity::Together,
        cpu => FaultPathAffinity::Cpu(cpu),
    }
}

/// Hold the threads of this process's post-copy fault path on `cpu`
/// (`None`, the default: leave them to the scheduler): the same as
/// [`set_fault_path_affinity`] with [`FaultPathAffinity::Cpu`] or
/// [`FaultPathAffinity::Free`].
///
/// # Errors
/// [`MemError::Os`] (`EINVAL`) if `cpu` is not one this process may run
/// on; the setting is then unchanged.
pub fn set_fault_path_cpu(cpu: Option<usize>) -> Result<()> {
    set_fault_path_affinity(cpu.map_or(FaultPathAffinity::Free, FaultPathAffinity::Cpu))
}

/// The CPU chosen with [`set_fault_path_cpu`], if any (`None` also in
/// [`FaultPathAffinity::Together`]).
pub fn fault_path_cpu() -> Option<usize> {
    match fault_path_affinity() {
        FaultPathAffinity::Cpu(cpu) => Some(cpu),
        _ => None,
    }
}

/// In [`FaultPathAffinity::Together`]: the CPU the fault path's threads
/// are held on, once the first of them chose it (`None` before that, and
/// in the other modes).
pub fn fault_path_together_cpu() -> Option<usize> {
    match (fault_path_affinity(), TOGETHER_CPU.load(Ordering::Relaxed)) {
        (FaultPathAffinity::Together, cpu) if cpu != FREE => Some(cpu),
        _ => None,
    }
}

/// Hold the calling thread on `cpu` alone.
fn hold_on(cpu: usize) -> nix::Result<()> {
    let mut one = CpuSet::new();
    one.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &one)
}

/// Hold the calling thread where the chosen mode says.
pub(super) fn hold_on_fault_path_cpu() {
    match fault_path_affinity() {
        FaultPathAffinity::Free => {}
        FaultPathAffinity::Cpu(cpu) => match hold_on(cpu) {
            Ok(()) => debug!(cpu, "post-copy fault path: thread held on its CPU"),
            Err(e) => debug!(cpu, error = %e, "post-copy fault path: thread not held on its CPU"),
        },
        FaultPathAffinity::Together => hold_together(),
    }
}

/// The highest-numbered CPU the calling thread may run on.
fn highest_allowed() -> nix::Result<usize> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    (0..CpuSet::count())
        .rev()
        .find(|&c| set.is_set(c).unwrap_or(false))
        .ok_or(nix::errno::Errno::EINVAL)
}

/// [`FaultPathAffinity::Together`]: hold the calling thread on the CPU the
/// first one chose; the first chooses the highest-numbered CPU it may run
/// on, and so does a thread the chosen CPU refuses.
fn hold_together() {
    let chosen = TOGETHER_CPU.load(Ordering::Relaxed);
    if chosen != FREE {
        match hold_on(chosen) {
            Ok(()) => {
                debug!(
                    cpu = chosen,
                    "post-copy fault path: thread held with the others"
                );
                return;
            }
            Err(e) => debug!(
                cpu = chosen,
                error = %e,
                "post-copy fault path: the chosen CPU refused, choosing again"
            ),
        }
    }
    let here = match highest_allowed() {
        Ok(cpu) => cpu,
        Err(e) => {
            debug!(error = %e, "post-copy fault path: no CPU to hold the thread on");
            return;
        }
    };
    // Two threads choosing at once: the first to store wins and the other
    // follows it.
    let cpu =
        match TOGETHER_CPU.compare_exchange(chosen, here, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => here,
            Err(winner) => winner,
        };
    match hold_on(cpu) {
        Ok(()) => debug!(cpu, "post-copy fault path: thread held, CPU chosen"),
        Err(e) => debug!(cpu, error = %e, "post-copy fault path: thread not held"),
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
        together_holds_the_threads_on_one_cpu_and_a_refused_cpu_is_chosen_again(&cpus);
        set_fault_path_cpu(None).unwrap();
        assert_eq!(fault_path_affinity(), FaultPathAffinity::Free);
    }

    /// Part of the test above (the setting is process-wide).
    fn together_holds_the_threads_on_one_cpu_and_a_refused_cpu_is_chosen_again(cpus: &[usize]) {
        let fault_path_thread = || {
            std::thread::spawn(|| {
                super::super::urgent_thread();
                allowed()
            })
            .join()
            .unwrap()
        };
        set_fault_path_affinity(FaultPathAffinity::Together).unwrap();
        assert_eq!(fault_path_affinity(), FaultPathAffinity::Together);
        assert_eq!(fault_path_cpu(), None);
        assert_eq!(fault_path_together_cpu(), None, "nothing chosen yet");
        // The first thread is held on one CPU, the highest it may run on
        // (the same in every process with the same CPUs), the next ones on
        // the same.
        let first = fault_path_thread();
        assert_eq!(first.len(), 1, "first thread held on one CPU: {first:?}");
        let chosen = first[0];
        assert_eq!(Some(&chosen), cpus.last());
        assert_eq!(fault_path_together_cpu(), Some(chosen));
        for _ in 0..3 {
            assert_eq!(fault_path_thread(), vec![chosen]);
        }
        assert_eq!(allowed(), cpus, "the thread that chose is not held");
        // A chosen CPU the threads may no longer run on (as if it went
        // offline: one the machine does not have) does not stop the next
        // thread: it chooses the highest CPU it may run on, and later
        // threads follow.
        let gone = CpuSet::count() - 1;
        assert!(!cpus.contains(&gone));
        TOGETHER_CPU.store(gone, Ordering::Relaxed);
        let again = fault_path_thread();
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(Some(&again[0]), cpus.last());
        assert_eq!(TOGETHER_CPU.load(Ordering::Relaxed), again[0]);
        assert_eq!(fault_path_thread(), again);
        // Choosing the mode again forgets the CPU.
        set_fault_path_affinity(FaultPathAffinity::Together).unwrap();
        assert_eq!(TOGETHER_CPU.load(Ordering::Relaxed), FREE);
        assert_eq!(fault_path_together_cpu(), None);
    }
}
