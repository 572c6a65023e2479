//! Migrating the running guest with lmig: the vCPU is the program
//! ([`VmSource`] pauses it and captures its [`VcpuState`], [`VmSink`] sets
//! the state on the destination's vCPU and runs it), guest RAM is the
//! adopted region set (source memory and destination sink).

use std::sync::Arc;

use kvm_ioctls::VcpuFd;
use lmig_core::model::ProgramState;
use lmig_core::session::{
    Destination, DestinationReport, Mode, Source, SourceConfig, SourceReport,
};
use lmig_core::{Channel, DirtyTracker, MigrationError, StateSink, StateSource};

use super::vcpu::monotonic_ns;
use super::{GuestMemory, Machine, VcpuPriority, VcpuState, VcpuThread, VmmError};

/// Version of the vCPU state format (JSON of [`VcpuState`]).
pub const STATE_VERSION: u32 = 1;

fn backend(what: &'static str, e: VmmError) -> MigrationError {
    MigrationError::backend(what, e)
}

/// The running guest on the source, as lmig's program.
#[derive(Debug)]
pub struct VmSource<'m> {
    vcpu: &'m VcpuThread,
    state: Option<VcpuState>,
    /// `CLOCK_MONOTONIC` ns when the vCPU last stopped.
    pub paused_ns: Option<u64>,
    /// `Commit` went out: the guest must never run here again.
    pub committed: bool,
}

impl<'m> VmSource<'m> {
    /// The program around `machine`'s running vCPU.
    pub fn new(machine: &'m Machine) -> Result<Self, VmmError> {
        Ok(Self {
            vcpu: machine.vcpu()?,
            state: None,
            paused_ns: None,
            committed: false,
        })
    }
}

impl StateSource for VmSource<'_> {
    fn pause(&mut self) -> lmig_core::Result<()> {
        self.state = Some(
            self.vcpu
                .pause()
                .map_err(|e| backend("pause the vCPU", e))?,
        );
        self.paused_ns = Some(monotonic_ns());
        Ok(())
    }

    fn capture(&mut self) -> lmig_core::Result<ProgramState> {
        let state = self
            .state
            .as_ref()
            .ok_or_else(|| backend("capture the vCPU", VmmError::BadInput("not paused".into())))?;
        let data = serde_json::to_vec(state)
            .map_err(|e| backend("encode the vCPU state", VmmError::BadInput(e.to_string())))?;
        Ok(ProgramState::new(STATE_VERSION, data))
    }

    fn resume(&mut self) -> lmig_core::Result<()> {
        self.state = None;
        self.vcpu.resume();
        Ok(())
    }

    fn committed(&mut self) {
        self.committed = true;
    }
}

/// The guest on the destination: its vCPU (not running yet) until `Commit`.
#[derive(Debug)]
pub struct VmSink {
    vcpu: Option<VcpuFd>,
    memory: Arc<GuestMemory>,
    state: Option<VcpuState>,
    thread: Option<VcpuThread>,
    priority: VcpuPriority,
    /// `CLOCK_MONOTONIC` ns when the vCPU started running here.
    pub resumed_ns: Option<u64>,
}

impl StateSink for VmSink {
    fn restore(&mut self, state: ProgramState) -> lmig_core::Result<()> {
        if state.version != STATE_VERSION {
            return Err(backend(
                "restore the vCPU",
                VmmError::BadInput(format!(
                    "vCPU state version {} (this VMM reads {STATE_VERSION})",
                    state.version
                )),
            ));
        }
        let decoded: VcpuState = serde_json::from_slice(&state.data)
            .map_err(|e| backend("decode the vCPU state", VmmError::BadInput(e.to_string())))?;
        self.state = Some(decoded);
        Ok(())
    }

    fn resume(&mut self) -> lmig_core::Result<()> {
        let none = || {
            backend(
                "resume the vCPU",
                VmmError::BadInput("no vCPU state or vCPU".into()),
            )
        };
        let state = self.state.take().ok_or_else(none)?;
        let vcpu = self.vcpu.take().ok_or_else(none)?;
        state
            .apply(&vcpu)
            .map_err(|e| backend("set the vCPU state", e))?;
        self.thread = Some(
            VcpuThread::spawn_with_ring(vcpu, Arc::clone(&self.memory), None, self.priority)
                .map_err(|e| backend("run the vCPU", e))?,
        );
        self.resumed_ns = Some(monotonic_ns());
        Ok(())
    }

    fn discard(&mut self) {
        self.state = None;
    }
}

/// What a migration of the guest did, on the source.
#[derive(Debug)]
#[non_exhaustive]
pub struct MigratedOut {
    /// The session's report.
    pub report: SourceReport,
    /// When the vCPU stopped here (`CLOCK_MONOTONIC` ns).
    pub paused_ns: Option<u64>,
}

/// Migrate `machine`'s running guest over `channel` with `tracker` (over
/// `machine.regions()`). `Ok`: the guest runs on the destination and this
/// vCPU stays parked for good (`Commit` went out; stop it with
/// [`Machine::stop`]). `Err` before `Commit`: the guest runs on here.
pub fn migrate_out(
    machine: &Machine,
    channel: impl Channel,
    tracker: impl DirtyTracker,
    mode: Mode,
) -> Result<MigratedOut, MigrationError> {
    let mut program = VmSource::new(machine).map_err(|e| backend("the source VM", e))?;
    // LMIG_VMM_YIELD=1: the rounds' senders yield the CPU to the vCPU
    // thread. Off by default: measured on this 2-vCPU host (pre-copy,
    // 100 MB/s, 3 runs each) it lengthened the guest's heartbeat gap (14-19
    // ms against 7-11, KVM's dirty log); why is not established yet.
    let yield_to_guest = std::env::var_os("LMIG_VMM_YIELD").is_some_and(|v| v == "1");
    let config = SourceConfig::default()
        .with_mode(mode)
        .with_verify(true)
        .with_yield_to_program(yield_to_guest);
    let result = Source::new(channel, machine.regions(), tracker, &mut program)
        .with_config(config)
        .run();
    result.map(|report| MigratedOut {
        report,
        paused_ns: program.paused_ns,
    })
}

/// What a migration of the guest did, on the destination.
#[derive(Debug)]
#[non_exhaustive]
pub struct MigratedIn {
    /// The session's report.
    pub report: DestinationReport,
    /// When the vCPU started here (`CLOCK_MONOTONIC` ns).
    pub resumed_ns: Option<u64>,
}

/// Receive a guest into `machine` (built with the source's size, not
/// booted, not started) over `channel`; after `Ok` its vCPU runs.
pub fn receive(machine: &mut Machine, channel: impl Channel) -> Result<MigratedIn, MigrationError> {
    let (vcpu, memory) = machine
        .take_vcpu()
        .map_err(|e| backend("the destination VM", e))?;
    let mut sink = VmSink {
        vcpu: Some(vcpu),
        memory,
        state: None,
        thread: None,
        priority: machine.vcpu_priority(),
        resumed_ns: None,
    };
    let result = Destination::new(channel, machine.regions(), &mut sink).run();
    if let Some(thread) = sink.thread.take() {
        machine.attach(thread);
    } else if let Some(vcpu) = sink.vcpu.take() {
        machine.give_back(vcpu);
    }
    result.map(|report| MigratedIn {
        report,
        resumed_ns: sink.resumed_ns,
    })
}
