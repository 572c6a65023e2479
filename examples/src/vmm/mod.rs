//! A KVM micro-VMM whose running guest lmig migrates: the demo of how a VMM
//! embeds lmig (issue 21).
//!
//! * **Memory**: guest RAM is a memfd the VMM maps `MAP_SHARED` and gives
//!   both to KVM (`KVM_SET_USER_MEMORY_REGION`, two slots: the first 2 MiB
//!   and the buffer) and to lmig ([`lmig_mem::Region::adopt`] with
//!   `ForeignBacking::SharedFile`, one region per slot): the [`Machine`]
//!   holds the adopted [`lmig_mem::RegionSet`], which is the session's
//!   memory source (and, on a destination, its sink).
//! * **Dirty log**: either lmig's uffd-wp tracker on the VMM's mapping, or
//!   KVM's own log through `lmig_mem::track::kvm` ([`Machine::dirty_log`]
//!   maps the slots onto the regions).
//! * **The vCPU**: one, started straight in 64-bit ring 3 (see [`guest`]) —
//!   on this machine's nested KVM guest ring-0 code is emulated and slow,
//!   ring-3 code runs at full speed. Its thread ([`VcpuThread`]) handles
//!   the guest's port writes: heartbeats every millisecond of guest TSC,
//!   logged with host timestamps ([`HeartbeatLog`]), and buffer checks.
//! * **vCPU state**: [`VcpuState`] (general, special and FPU registers and
//!   the TSC MSR) is what pausing the vCPU captures and what a destination
//!   sets before running it.
//!
//! * **Scheduling**: [`VcpuPriority`] (nice, `SCHED_FIFO`, a CPU of its
//!   own), set by the vCPU thread itself on the source and on the
//!   destination alike; `lmig-bench vm` runs pre-copy with a real-time vCPU
//!   pinned away from the migration's threads (why: docs/benchmarks.md,
//!   issue 21 fourth session).
//!
//! Pausing: the vCPU thread looks at its control word after every exit
//! from `KVM_RUN`; the guest exits at least every millisecond (its
//! heartbeat), so a pause takes at most ~1 ms without signalling the
//! thread out of `KVM_RUN`.

pub mod asm;
pub mod guest;
mod machine;
pub mod migrate;
mod priority;
mod sys;
mod vcpu;

pub use machine::{GUEST_REGION, GUEST_SLOT, LOW_REGION, LOW_SLOT, Machine, MachineConfig};
pub use priority::VcpuPriority;
pub use sys::{GuestMemory, set_thread_cpus, set_thread_fifo, set_thread_nice};
pub use vcpu::{Heartbeat, HeartbeatLog, VcpuState, VcpuThread, VcpuTime};

/// Why the micro-VMM failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// `/dev/kvm` is missing or cannot be opened.
    #[error("KVM is not available: cannot open /dev/kvm ({0}); the micro-VMM needs KVM and root")]
    NoKvm(std::io::Error),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, std::io::Error),
    /// A system call failed.
    #[error("{0} failed: {1}")]
    Sys(&'static str, std::io::Error),
    /// The guest stopped in a way a running guest never does.
    #[error("the guest stopped unexpectedly: {0}")]
    GuestExit(String),
    /// Bad configuration or state.
    #[error("bad input: {0}")]
    BadInput(String),
    /// lmig refused the guest memory.
    #[error(transparent)]
    Mem(#[from] lmig_mem::MemError),
    /// Waiting for the guest timed out.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Map a KVM ioctl's error to [`VmmError::Kvm`] naming the ioctl.
fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(what, std::io::Error::from_raw_os_error(e.errno()))
}
