//! Where the scenario puts its threads: by default nowhere (the scheduler
//! places everything). Two placements are experiments, never a default.
//!
//! `--client-cpu N` ([`Pins::clients`]) splits the host's share of the
//! clients' latency from the library's: the bench's client load runs on the
//! same CPUs as kvd and the migration, where a deployment has its clients on
//! other hosts. It pins the client load thread to CPU N and, with
//! `loop_off`, kvd's loop (the source's main thread) to every other CPU it
//! may use; nothing else moves (the migration's threads, kvd's writer and the
//! destination stay where the scheduler puts them). Placed once the clients
//! are connected, before the baseline's window, so the baseline and the
//! pre-copy phase are measured with one placement. `--migration-cpu M`
//! ([`Pins::migration`]) pins the migration's threads (the source's
//! session, senders and receivers; the whole destination) to CPU M, as an
//! operator pins a VMM's migration threads; with `--client-cpu` or alone.
//!
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

/// A placement of the scenario's threads.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// The scheduler's (the default).
    #[default]
    Unplaced,
    /// `--split-cpus`: [`SplitCpus`].
    Split,
    /// `--client-cpu`, `--loop-off-client-cpu`, `--migration-cpu`.
    Pinned(Pins),
}

/// Single threads or groups pinned, everything else left to the scheduler.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins {
    /// The client load thread on this CPU only.
    pub clients: Option<usize>,
    /// The source kvd's loop on every CPU but the clients' one.
    pub loop_off_clients: bool,
    /// The migration on this CPU only: the source's admin threads (which
    /// run the session and start its senders and receivers, which inherit
    /// it) and every thread of the destination.
    pub migration: Option<usize>,
}

/// A [`Placement`] checked against the CPUs this process may use.
#[derive(Copy, Clone, Debug)]
pub enum Placer {
    /// Nothing placed.
    Unplaced,
    /// [`Placement::Split`].
    Split(SplitCpus),
    /// [`Placement::Pinned`], checked.
    Pinned(Pins),
}

impl Placer {
    /// `placement` checked: every CPU named must be one this process may
    /// use, and the loop kept off the clients' CPU needs another one.
    pub fn new(placement: Placement) -> Result<Self, Error> {
        Ok(match placement {
            Placement::Unplaced => Self::Unplaced,
            Placement::Split => Self::Split(SplitCpus::new()?),
            Placement::Pinned(pins) => {
                let allowed = allowed_cpus()?;
                for cpu in pins.clients.iter().chain(&pins.migration) {
                    if !allowed.contains(cpu) {
                        return Err(format!("CPU {cpu}: not one of {allowed:?}").into());
                    }
                }
                if pins.loop_off_clients && (pins.clients.is_none() || allowed.len() < 2) {
                    return Err("--loop-off-client-cpu needs --client-cpu and two CPUs".into());
                }
                Self::Pinned(pins)
            }
        })
    }

    /// Called on the client load's thread before it connects.
    pub fn place_clients(&self) -> Result<(), Error> {
        match self {
            Self::Unplaced => Ok(()),
            Self::Split(cpus) => cpus.pin_self_to_program(),
            Self::Pinned(pins) => pins.clients.map_or(Ok(()), |cpu| pin(0, cpu)),
        }
    }

    /// The source kvd `pid` and the destination `dest` (when there is one),
    /// once every client is connected and before the baseline.
    pub fn place_kvd(&self, pid: u32, dest: Option<u32>) -> Result<(), Error> {
        match self {
            Self::Unplaced => Ok(()),
            Self::Split(cpus) => {
                cpus.place_source(pid)?;
                dest.map_or(Ok(()), |d| cpus.place_destination(d))
            }
            Self::Pinned(pins) => {
                // kvd's loop is its main thread (tid = pid); the threads it
                // started before (its writer) keep their affinity.
                if let (Some(cpu), true) = (pins.clients, pins.loop_off_clients) {
                    let others: Vec<usize> =
                        allowed_cpus()?.into_iter().filter(|&c| c != cpu).collect();
                    pin_set(pid as i32, &others)?;
                }
                if let Some(cpu) = pins.migration {
                    for (tid, name) in threads(pid)? {
                        if MIGRATION_THREADS.iter().any(|m| name.starts_with(m)) {
                            pin(tid, cpu)?;
                        }
                    }
                    for (tid, _) in dest.map(threads).transpose()?.unwrap_or_default() {
                        pin(tid, cpu)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// The CPUs this process may use.
fn allowed_cpus() -> Result<Vec<usize>, Error> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

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
        let mut cpus = allowed_cpus()?.into_iter();
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
    pin_set(tid, &[cpu])
}

/// Thread `tid` (0: the calling one) on `cpus` only. A thread that ended
/// meanwhile is no error.
fn pin_set(tid: i32, cpus: &[usize]) -> Result<(), Error> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    match sched_setaffinity(Pid::from_raw(tid), &set) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(format!("pinning thread {tid} to CPUs {cpus:?}: {e}").into()),
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

    fn affinity(tid: i32) -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(tid)).expect("affinity");
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect()
    }

    /// A real process that waits (a stand-in for a kvd), killed and reaped
    /// by the caller.
    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep")
    }

    #[test]
    fn pins_place_the_clients_the_loop_and_the_destination_and_read_back() {
        let allowed = allowed_cpus().expect("cpus");
        let cpu = *allowed.last().expect("a CPU");
        let placer = Placer::new(Placement::Pinned(Pins {
            clients: Some(cpu),
            loop_off_clients: allowed.len() > 1,
            migration: Some(allowed[0]),
        }))
        .expect("placer");
        // The client load's thread: on `cpu` only.
        let on = std::thread::spawn(move || {
            placer.place_clients().expect("pinned");
            affinity(0)
        })
        .join()
        .expect("thread");
        assert_eq!(on, vec![cpu]);
        // Real processes: the source's main thread (kvd's loop) on every
        // CPU but `cpu`, every thread of the destination on the migration's.
        let (mut source, mut dest) = (sleeper(), sleeper());
        let placed = placer.place_kvd(source.id(), Some(dest.id()));
        let (seen, seen_dest) = (affinity(source.id() as i32), affinity(dest.id() as i32));
        for child in [&mut source, &mut dest] {
            child.kill().expect("kill our child");
            child.wait().expect("reaped");
        }
        placed.expect("placed");
        if allowed.len() > 1 {
            let others: Vec<usize> = allowed.iter().copied().filter(|&c| c != cpu).collect();
            assert_eq!(seen, others);
        } else {
            assert_eq!(seen, allowed, "one CPU: the loop is left where it was");
        }
        assert_eq!(seen_dest, vec![allowed[0]]);
    }

    #[test]
    fn client_cpu_refuses_a_cpu_this_process_cannot_use() {
        let bad = CpuSet::count() + 1;
        let pins = |clients, migration| {
            Placer::new(Placement::Pinned(Pins {
                clients,
                loop_off_clients: false,
                migration,
            }))
        };
        assert!(pins(Some(bad), None).is_err());
        assert!(pins(None, Some(bad)).is_err());
        assert!(pins(Some(0), Some(0)).is_ok());
    }

    #[test]
    fn this_process_threads_are_listed_with_names() {
        let me = threads(std::process::id()).expect("own threads");
        let own = nix::unistd::gettid().as_raw();
        assert!(me.iter().any(|(tid, _)| *tid == own), "{me:?}");
    }
}
