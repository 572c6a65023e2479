//! `--split-cpus`, an experiment that changes placement (never a default):
//! the program (kvd's loop and its background writer on A) and the clients
//! on one CPU, the migration (A's admin threads, which run the session and
//! start its senders, and the whole destination process) on another, so
//! that the migration's own CPU work cannot delay the loop. What is left of
//! the clients' pre-copy p99 then follows kvd itself (write-protect faults,
//! the tracker's re-protect, memory bandwidth), not CPU sharing.
//!
//! Affinity is inherited by the threads a thread starts, so pinning every
//! thread there is once the clients are connected (before the baseline's
//! window, which thus has the same placement) places the ones started
//! later too.

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use super::Error;

/// The two CPUs: the program's and the migration's (the first two this
/// process may run on).
#[derive(Copy, Clone, Debug)]
pub struct SplitCpus {
    /// kvd's loop, its writer and the clients.
    pub program: usize,
    /// The session's threads and the destination.
    pub migration: usize,
}

/// Names of A's threads that belong to the migration side: the admin
/// server and its connections (one of which runs the session).
const MIGRATION_THREADS: &[&str] = &["kvd-admin", "kvd-signals"];

impl SplitCpus {
    /// The first two CPUs this process may use; an error with fewer.
    pub fn new() -> Result<Self, Error> {
        let set = sched_getaffinity(Pid::from_raw(0))?;
        let mut cpus = (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false));
        match (cpus.next(), cpus.next()) {
            (Some(program), Some(migration)) => Ok(Self { program, migration }),
            _ => Err("--split-cpus needs two CPUs".into()),
        }
    }

    /// Pin the calling thread to the program's CPU (the clients).
    pub fn pin_self_to_program(&self) -> Result<(), Error> {
        pin(0, self.program)
    }

    /// Every thread of the source kvd `pid`: the admin threads to the
    /// migration's CPU, the others (the loop, the writer) to the program's.
    pub fn place_source(&self, pid: u32) -> Result<(), Error> {
        for (tid, name) in threads(pid)? {
            let migration = MIGRATION_THREADS.iter().any(|m| name.starts_with(m));
            pin(
                tid,
                if migration {
                    self.migration
                } else {
                    self.program
                },
            )?;
        }
        Ok(())
    }

    /// Every thread of the destination kvd `pid` to the migration's CPU.
    pub fn place_destination(&self, pid: u32) -> Result<(), Error> {
        for (tid, _) in threads(pid)? {
            pin(tid, self.migration)?;
        }
        Ok(())
    }
}

/// Thread `tid` (0: the calling one) on `cpu` only. A thread that ended
/// meanwhile is no error.
fn pin(tid: i32, cpu: usize) -> Result<(), Error> {
    let mut one = CpuSet::new();
    one.set(cpu)?;
    match sched_setaffinity(Pid::from_raw(tid), &one) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(format!("pinning thread {tid} to CPU {cpu}: {e}").into()),
    }
}

/// The threads of process `pid`: id and name.
fn threads(pid: u32) -> Result<Vec<(i32, String)>, Error> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let name = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        out.push((tid, name.trim().to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_threads_are_listed_with_names() {
        let me = threads(std::process::id()).expect("own threads");
        let own = nix::unistd::gettid().as_raw();
        assert!(me.iter().any(|(tid, _)| *tid == own), "{me:?}");
    }
}
