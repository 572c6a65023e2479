//! The vCPU thread's scheduling: its nice value, real-time priority and
//! CPU ([`VcpuPriority`]).

use super::VmmError;

/// The vCPU thread's scheduling priority, set by the thread itself before
/// it first runs the vCPU (a thread inherits its creator's otherwise: on a
/// destination, the receiving thread's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VcpuPriority {
    /// Its nice value (`None`: the creating thread's).
    pub nice: Option<i32>,
    /// `SCHED_FIFO` at this priority (1-99; root). The guest's heartbeat
    /// then waits for no normal thread (the migration's own included) past
    /// that thread's next preemption point; the guest here sleeps between
    /// heartbeats, so it takes little CPU from them. `None`: normal
    /// scheduling.
    pub realtime: Option<i32>,
    /// Run only on this CPU (`None`: wherever the creating thread may).
    /// With the VMM's other threads kept off it
    /// ([`set_thread_cpus`](super::set_thread_cpus)), the vCPU never waits
    /// for one of them to leave the kernel: a wakeup does not move a
    /// real-time thread off a CPU whose normal thread is inside a long
    /// system call, and this kernel (no preemption) lets that finish.
    pub cpu: Option<usize>,
}

impl VcpuPriority {
    /// Set on the calling thread (the vCPU thread, before its first run).
    pub(super) fn apply(self) -> Result<(), VmmError> {
        if let Some(cpu) = self.cpu {
            super::sys::set_thread_cpus(&[cpu])?;
        }
        if let Some(nice) = self.nice {
            super::sys::set_thread_nice(nice)?;
        }
        if let Some(priority) = self.realtime {
            super::sys::set_thread_fifo(priority)?;
        }
        Ok(())
    }
}
