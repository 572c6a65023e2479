//! The machine: KVM, one memory slot of guest RAM adopted as an lmig
//! region, one vCPU.

use std::ffi::CString;
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use lmig_mem::track::kvm::{KvmDirtyLog, KvmDirtyRing, KvmRingTracker, KvmSlot};
use lmig_mem::{RegionId, RegionSet};

use super::guest::{
    self, BUFFER_AT, CODE_AT, GDT_AT, MAX_BYTES, P_BUF_PAGES, P_BUF_START, P_COMMAND, P_DIRTIED,
    P_DIRTY_PER_MS, P_TSC_PER_MS, PAGE, PARAMS_AT,
};
use super::{GuestMemory, HeartbeatLog, VcpuPriority, VcpuState, VcpuThread, VmmError, kvm_err};

/// The lmig region of guest RAM's first 2 MiB (GDT, page tables,
/// parameters, code, stack), KVM slot [`LOW_SLOT`] (the same on both sides).
pub const LOW_REGION: RegionId = RegionId(20);
/// The lmig region of the rest of guest RAM, the guest's buffer from
/// [`BUFFER_AT`](guest::BUFFER_AT) on: KVM slot [`GUEST_SLOT`]. Its page
/// `p` is guest physical `BUFFER_AT + p * 4096`.
pub const GUEST_REGION: RegionId = RegionId(21);
/// KVM slot of [`LOW_REGION`].
pub const LOW_SLOT: u32 = 0;
/// KVM slot of [`GUEST_REGION`].
pub const GUEST_SLOT: u32 = 1;

/// How to build a [`Machine`].
#[derive(Clone, Debug)]
#[must_use]
#[non_exhaustive]
pub struct MachineConfig {
    /// Guest RAM in MiB (a multiple of 2, at least 4, at most 4096).
    pub mib: u64,
    /// The KVM device (`/dev/kvm`).
    pub kvm_path: String,
    /// The guest program placed at [`CODE_AT`](guest::CODE_AT).
    pub program: Vec<u8>,
    /// Turn on KVM's dirty ring before creating the vCPU (for lmig's
    /// ring tracker, [`Machine::dirty_ring_tracker`]): `Some(bytes)` per
    /// vCPU (`0`: the largest KVM offers).
    pub dirty_ring: Option<u32>,
    /// The vCPU thread's scheduling priority (on a destination too, where
    /// the thread starts at `Commit`).
    pub vcpu_priority: VcpuPriority,
}

impl MachineConfig {
    /// `mib` MiB of guest RAM running [`guest::program`].
    pub fn new(mib: u64) -> Self {
        Self {
            mib,
            kvm_path: "/dev/kvm".into(),
            program: guest::program(),
            dirty_ring: None,
            vcpu_priority: VcpuPriority::default(),
        }
    }
    /// Run the vCPU thread at nice value `nice` (below 0 needs root).
    pub fn vcpu_nice(mut self, nice: i32) -> Self {
        self.vcpu_priority.nice = Some(nice);
        self
    }
    /// Run the vCPU thread in `SCHED_FIFO` at `priority` (1-99, needs
    /// root): see [`VcpuPriority::realtime`].
    pub fn vcpu_realtime(mut self, priority: i32) -> Self {
        self.vcpu_priority.realtime = Some(priority);
        self
    }
    /// Run the vCPU thread on CPU `cpu` only: see [`VcpuPriority::cpu`].
    pub fn vcpu_cpu(mut self, cpu: usize) -> Self {
        self.vcpu_priority.cpu = Some(cpu);
        self
    }
    /// Turn on KVM's dirty ring, `bytes` per vCPU (0: the largest offered).
    pub fn dirty_ring(mut self, bytes: u32) -> Self {
        self.dirty_ring = Some(bytes);
        self
    }
    /// Another KVM device path (tests: a missing one).
    pub fn kvm_path(mut self, path: impl Into<String>) -> Self {
        self.kvm_path = path.into();
        self
    }
    /// Another guest program.
    pub fn program(mut self, program: Vec<u8>) -> Self {
        self.program = program;
        self
    }
}

/// A micro-VM. Fields drop in order: the vCPU thread, the vCPU, the lmig
/// regions, the VM (its memory slot), and only then guest memory.
#[derive(Debug)]
pub struct Machine {
    thread: Option<VcpuThread>,
    vcpu: Option<VcpuFd>,
    /// KVM's dirty ring, when the config asked for it (before `vm`: its
    /// ring mappings go first).
    ring: Option<KvmDirtyRing>,
    regions: RegionSet,
    vm: VmFd,
    _kvm: Kvm,
    memory: Arc<GuestMemory>,
    tsc_khz: u32,
    config: MachineConfig,
    stopped_log: HeartbeatLog,
}

impl Machine {
    /// Open KVM, map guest RAM, give it to KVM as two memory slots and
    /// adopt them as lmig regions [`LOW_REGION`] and [`GUEST_REGION`],
    /// create the vCPU. Nothing runs yet.
    pub fn new(config: MachineConfig) -> Result<Self, VmmError> {
        let bytes = config.mib << 20;
        if config.mib < 4 || !config.mib.is_multiple_of(2) || bytes > MAX_BYTES {
            return Err(VmmError::BadInput(format!(
                "guest of {} MiB (2 MiB steps, 4 to 4096)",
                config.mib
            )));
        }
        let path = CString::new(config.kvm_path.clone())
            .map_err(|_| VmmError::BadInput("KVM path".into()))?;
        let kvm = Kvm::new_with_path(&path)
            .map_err(|e| VmmError::NoKvm(std::io::Error::from_raw_os_error(e.errno())))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let len = usize::try_from(bytes).map_err(|_| VmmError::BadInput("guest size".into()))?;
        let memory = Arc::new(GuestMemory::new(len)?);
        memory.register(&vm, LOW_SLOT, 0, BUFFER_AT)?;
        memory.register(&vm, GUEST_SLOT, BUFFER_AT, bytes - BUFFER_AT)?;
        let regions = RegionSet::new([
            memory.adopt(LOW_REGION, 0, BUFFER_AT)?,
            memory.adopt(GUEST_REGION, BUFFER_AT, bytes - BUFFER_AT)?,
        ])?;
        let ring = match config.dirty_ring {
            Some(bytes) => Some(KvmDirtyRing::enable(&vm, (bytes > 0).then_some(bytes))?),
            None => None,
        };
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        if let Some(ring) = &ring {
            ring.add_vcpu(&vcpu)?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let tsc_khz = vcpu.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        Ok(Self {
            thread: None,
            vcpu: Some(vcpu),
            ring,
            regions,
            vm,
            _kvm: kvm,
            memory,
            tsc_khz,
            config,
            stopped_log: HeartbeatLog::default(),
        })
    }

    /// Write the guest's GDT, page tables, parameters and program, and set
    /// the vCPU to its first instruction (64-bit ring 3).
    pub fn boot(&mut self, dirty_pages_per_ms: u64) -> Result<(), VmmError> {
        let bytes = self.config.mib << 20;
        if self.config.program.len() as u64 > BUFFER_AT - CODE_AT {
            return Err(VmmError::BadInput("guest program too long".into()));
        }
        let m = &self.memory;
        m.write(GDT_AT, &guest::gdt())?;
        for (at, table) in guest::page_tables(bytes) {
            m.write(at, &table)?;
        }
        m.write(CODE_AT, &self.config.program)?;
        m.write_u64(PARAMS_AT + P_TSC_PER_MS, u64::from(self.tsc_khz))?;
        m.write_u64(PARAMS_AT + P_BUF_START, BUFFER_AT)?;
        m.write_u64(PARAMS_AT + P_BUF_PAGES, (bytes - BUFFER_AT) / PAGE)?;
        m.write_u64(PARAMS_AT + P_COMMAND, 0)?;
        self.set_dirty_rate(dirty_pages_per_ms)?;
        let vcpu = self
            .vcpu
            .as_ref()
            .ok_or_else(|| VmmError::BadInput("the vCPU is running".into()))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        VcpuState::start(sregs, fpu).apply(vcpu)
    }

    /// Run the vCPU (from its current state) on its thread.
    pub fn start(&mut self) -> Result<(), VmmError> {
        let vcpu = self
            .vcpu
            .take()
            .ok_or_else(|| VmmError::BadInput("the vCPU is running".into()))?;
        self.thread = Some(VcpuThread::spawn_with_ring(
            vcpu,
            Arc::clone(&self.memory),
            self.ring.clone(),
            self.config.vcpu_priority,
        )?);
        Ok(())
    }

    /// Set a migrated vCPU state (the destination, before [`start`](Self::start)).
    pub fn restore(&mut self, state: &VcpuState) -> Result<(), VmmError> {
        let vcpu = self
            .vcpu
            .as_ref()
            .ok_or_else(|| VmmError::BadInput("the vCPU is running".into()))?;
        state.apply(vcpu)
    }

    /// Take the (not running) vCPU out, with guest memory, to run it
    /// elsewhere (a migration's destination program).
    pub(super) fn take_vcpu(&mut self) -> Result<(VcpuFd, Arc<GuestMemory>), VmmError> {
        let vcpu = self
            .vcpu
            .take()
            .ok_or_else(|| VmmError::BadInput("the vCPU is running".into()))?;
        Ok((vcpu, Arc::clone(&self.memory)))
    }

    /// The vCPU thread's configured priority.
    pub(super) fn vcpu_priority(&self) -> VcpuPriority {
        self.config.vcpu_priority
    }

    /// The vCPU runs now on `thread`.
    pub(super) fn attach(&mut self, thread: VcpuThread) {
        self.thread = Some(thread);
    }

    /// The vCPU taken with `take_vcpu` did not start.
    pub(super) fn give_back(&mut self, vcpu: VcpuFd) {
        self.vcpu = Some(vcpu);
    }

    /// The running vCPU's thread.
    pub fn vcpu(&self) -> Result<&VcpuThread, VmmError> {
        self.thread
            .as_ref()
            .ok_or_else(|| VmmError::BadInput("the vCPU is not running".into()))
    }

    /// Stop the vCPU thread (if running) and keep the vCPU.
    pub fn stop(&mut self) -> Result<(), VmmError> {
        if let Some(thread) = self.thread.take() {
            self.stopped_log = thread.heartbeats();
            self.vcpu = Some(thread.stop()?);
        }
        Ok(())
    }

    /// Ask the guest to dirty `pages` pages per millisecond.
    pub fn set_dirty_rate(&self, pages: u64) -> Result<(), VmmError> {
        self.memory.write_u64(PARAMS_AT + P_DIRTY_PER_MS, pages)
    }

    /// Pages the guest has dirtied so far (its own count).
    pub fn dirtied(&self) -> Result<u64, VmmError> {
        self.memory.read_u64(PARAMS_AT + P_DIRTIED)
    }

    /// Ask the running guest to check its buffer; wait for the number of
    /// wrong qwords (0: the check passed).
    pub fn check_buffer(&self, timeout: Duration) -> Result<u32, VmmError> {
        self.memory.write_u64(PARAMS_AT + P_COMMAND, 1)?;
        self.vcpu()?.wait_check(timeout)
    }

    /// The heartbeats so far (of the last run, once the vCPU stopped).
    #[must_use]
    pub fn heartbeats(&self) -> HeartbeatLog {
        self.thread
            .as_ref()
            .map_or_else(|| self.stopped_log.clone(), VcpuThread::heartbeats)
    }

    /// Guest RAM as lmig regions (the session's memory source or sink).
    #[must_use]
    pub fn regions(&self) -> &RegionSet {
        &self.regions
    }

    /// The VM.
    #[must_use]
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Guest RAM's KVM memory slots, as lmig's KVM dirty log maps them
    /// onto the regions.
    #[must_use]
    pub fn kvm_slots(&self) -> [KvmSlot; 2] {
        [
            KvmSlot::new(LOW_SLOT, 0, LOW_REGION),
            KvmSlot::new(GUEST_SLOT, BUFFER_AT, GUEST_REGION),
        ]
    }

    /// KVM's dirty log of guest RAM (lmig's `track::kvm`): wrap it with
    /// [`KvmDirtyLog::tracker`] to make it the session's tracker.
    pub fn dirty_log(&self) -> Result<KvmDirtyLog<'_>, VmmError> {
        Ok(KvmDirtyLog::new(
            &self.vm,
            &self.regions,
            &self.kvm_slots(),
        )?)
    }

    /// lmig's tracker over KVM's dirty ring of guest RAM's slots; the
    /// machine must have been built with [`MachineConfig::dirty_ring`].
    pub fn dirty_ring_tracker(&self) -> Result<KvmRingTracker<'_>, VmmError> {
        let ring = self.ring.as_ref().ok_or_else(|| {
            VmmError::BadInput("the machine was built without KVM's dirty ring".into())
        })?;
        Ok(ring.tracker(&self.vm, &self.regions, &self.kvm_slots())?)
    }

    /// KVM's dirty ring, when the machine was built with it.
    #[must_use]
    pub fn dirty_ring(&self) -> Option<&KvmDirtyRing> {
        self.ring.as_ref()
    }

    /// Guest RAM.
    #[must_use]
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The vCPU's TSC frequency in kHz (ticks per ms).
    #[must_use]
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }
}
