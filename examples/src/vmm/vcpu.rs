//! The vCPU: its start in 64-bit ring 3, its state, and the thread that
//! runs it and handles the guest's port writes.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use lmig_mem::track::kvm::{EXIT_DIRTY_RING_FULL, KvmDirtyRing};
use serde::{Deserialize, Serialize};

use super::guest::{
    CODE_AT, GDT_AT, P_HB_TSC, P_TOUCH, P_TSC_PER_MS, PARAMS_AT, PML4_AT, PORT_CHECK,
    PORT_HEARTBEAT, PORT_IDLE, PORT_READY, PORT_TOUCHED, STACK_TOP, TSS_AT, USER_CS, USER_DS,
};
use super::{GuestMemory, VcpuPriority, VmmError, kvm_err};

/// `IA32_TSC`.
const MSR_TSC: u32 = 0x10;
/// At most this many heartbeats are kept (the gap figures cover all).
const LOG_CAP: usize = 1 << 20;

/// What a migration carries of the vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    #[serde(with = "fpu_serde")]
    pub fpu: kvm_fpu,
    /// The guest TSC (the guest times its heartbeats with it).
    pub tsc: u64,
}

impl VcpuState {
    /// The guest's first instruction: 64-bit ring 3 at [`CODE_AT`],
    /// identity paging from [`PML4_AT`], IOPL 3. `base` are the vCPU's
    /// current special registers (KVM's defaults), adjusted.
    #[must_use]
    pub fn start(mut sregs: kvm_sregs, fpu: kvm_fpu) -> Self {
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: USER_CS,
            type_: 0xb,
            present: 1,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: USER_DS,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: TSS_AT,
            limit: 0x67,
            selector: 0x28,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            ..code
        };
        sregs.gdt.base = GDT_AT;
        sregs.gdt.limit = 5 * 8 - 1;
        // No IDT: any exception ends in a triple fault (KVM_EXIT_SHUTDOWN).
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        // CR0: PE | MP | ET | NE | WP | PG.
        sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
        sregs.cr3 = PML4_AT;
        // CR4: PAE | OSFXSR | OSXMMEXCPT.
        sregs.cr4 = 0x20 | 0x200 | 0x400;
        // EFER: LME | LMA.
        sregs.efer = 0x100 | 0x400;
        let regs = kvm_regs {
            rip: CODE_AT,
            rsp: STACK_TOP,
            // Bit 1 always set; IOPL = 3 (port I/O from ring 3).
            rflags: 0x2 | 0x3000,
            ..Default::default()
        };
        Self {
            regs,
            sregs,
            fpu,
            tsc: 0,
        }
    }

    /// Read the state of a stopped vCPU.
    pub fn capture(vcpu: &VcpuFd) -> Result<Self, VmmError> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_TSC,
            ..Default::default()
        }])
        .map_err(|e| VmmError::BadInput(format!("msr list: {e:?}")))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if read != 1 {
            return Err(VmmError::BadInput(
                "KVM_GET_MSRS did not read IA32_TSC".into(),
            ));
        }
        Ok(Self {
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
            tsc: msrs.as_slice()[0].data,
        })
    }

    /// Load this state into `vcpu` (`tsc` 0: leave the TSC as it is).
    pub fn apply(&self, vcpu: &VcpuFd) -> Result<(), VmmError> {
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        if self.tsc != 0 {
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_TSC,
                data: self.tsc,
                ..Default::default()
            }])
            .map_err(|e| VmmError::BadInput(format!("msr list: {e:?}")))?;
            if vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))? != 1 {
                return Err(VmmError::BadInput(
                    "KVM_SET_MSRS did not set IA32_TSC".into(),
                ));
            }
        }
        Ok(())
    }
}

/// One heartbeat as the host saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Heartbeat {
    /// The guest's counter (low 32 bits).
    pub count: u32,
    /// The guest's TSC when it sent it.
    pub tsc: u64,
    /// Host `CLOCK_MONOTONIC` in ns when the VMM handled it (the same
    /// clock in every namespace of the host).
    pub host_ns: u64,
    /// The vCPU thread's time on a CPU so far (its `schedstat`), ns: with
    /// [`Self::wait_ns`], what a gap between two heartbeats was made of.
    pub cpu_ns: u64,
    /// The vCPU thread's time runnable, waiting for a CPU, so far, ns.
    pub wait_ns: u64,
}

/// Heartbeats with host timestamps (the first 2^20 kept), and the
/// longest gap between consecutive ones.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct HeartbeatLog {
    /// The heartbeats, in order.
    pub beats: Vec<Heartbeat>,
    /// How many arrived (also past the cap).
    pub total: u64,
    /// The last one.
    pub last: Option<Heartbeat>,
    /// The longest host interval between consecutive heartbeats, ns.
    pub max_gap_ns: u64,
}

impl HeartbeatLog {
    fn push(&mut self, beat: Heartbeat) {
        if let Some(last) = self.last {
            self.max_gap_ns = self
                .max_gap_ns
                .max(beat.host_ns.saturating_sub(last.host_ns));
        }
        if self.beats.len() < LOG_CAP {
            self.beats.push(beat);
        }
        self.total += 1;
        self.last = Some(beat);
    }
}

/// Host `CLOCK_MONOTONIC` in ns.
#[must_use]
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// What the VMM asks of the vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

/// State shared by the VMM and its vCPU thread.
#[derive(Debug)]
struct Ctl {
    want: Want,
    /// The vCPU is out of `KVM_RUN` and will not enter it (paused).
    parked: bool,
    /// Captured while parked.
    captured: Option<VcpuState>,
    ready: bool,
    checks: Vec<u32>,
    failed: Option<String>,
    log: HeartbeatLog,
    /// Touches the guest reported ([`PORT_TOUCHED`]).
    touched: u64,
    /// The thread's id (for its `schedstat`), once it runs.
    tid: Option<i32>,
    /// ns the thread slept on purpose: idle (the guest said so) or parked.
    asleep_ns: u64,
}

/// The control block: one mutex, one condition variable.
#[derive(Debug)]
pub(super) struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            ctl: Mutex::new(Ctl {
                want: Want::Run,
                parked: false,
                captured: None,
                ready: false,
                checks: Vec::new(),
                failed: None,
                log: HeartbeatLog::default(),
                touched: 0,
                tid: None,
                asleep_ns: 0,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wait (bounded) until `done` holds; a guest failure ends the wait.
    fn wait_for<T>(
        &self,
        what: &'static str,
        timeout: Duration,
        mut done: impl FnMut(&mut Ctl) -> Option<T>,
    ) -> Result<T, VmmError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut ctl = self.lock();
        loop {
            if let Some(v) = done(&mut ctl) {
                return Ok(v);
            }
            if let Some(why) = &ctl.failed {
                return Err(VmmError::GuestExit(why.clone()));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(VmmError::Timeout(what));
            }
            ctl = self
                .cv
                .wait_timeout(ctl, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

/// The vCPU thread: runs the vCPU, logs heartbeats, parks on request.
#[derive(Debug)]
pub struct VcpuThread {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<Result<VcpuFd, VmmError>>>,
    spawned: std::time::Instant,
    memory: Arc<GuestMemory>,
}

/// Where the vCPU thread's time went since it started ([`VcpuThread::time`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VcpuTime {
    /// Wall time since the thread was spawned.
    pub wall: Duration,
    /// On a CPU (the guest's and the VMM's code).
    pub running: Duration,
    /// Runnable, waiting for a CPU (`schedstat` run delay).
    pub runnable: Duration,
    /// Asleep on purpose: the guest idle, or the vCPU paused.
    pub asleep: Duration,
    /// The rest: blocked in the kernel, which for a running guest is
    /// waiting for missing pages (post-copy userfaultfd faults taken
    /// inside `KVM_RUN` or by the VMM's own reads of guest memory).
    pub blocked: Duration,
}

impl VcpuThread {
    /// Start running `vcpu` (its state already set) on a thread of its own.
    pub fn spawn(vcpu: VcpuFd, memory: Arc<GuestMemory>) -> Result<Self, VmmError> {
        Self::spawn_with_ring(vcpu, memory, None, VcpuPriority::default())
    }

    /// [`Self::spawn`] for a VM with KVM's dirty ring: a full ring
    /// (`KVM_EXIT_DIRTY_RING_FULL`) is harvested for lmig's tracker
    /// ([`KvmDirtyRing::on_full_exit`]) and the vCPU runs on; the thread
    /// sets its `priority` first.
    pub fn spawn_with_ring(
        vcpu: VcpuFd,
        memory: Arc<GuestMemory>,
        ring: Option<KvmDirtyRing>,
        priority: VcpuPriority,
    ) -> Result<Self, VmmError> {
        let shared = Shared::new();
        let for_thread = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("lmig-vcpu0".into())
            .spawn({
                let memory = Arc::clone(&memory);
                move || run(vcpu, &memory, &for_thread, ring.as_ref(), priority)
            })
            .map_err(|e| VmmError::Sys("spawn vCPU thread", e))?;
        Ok(Self {
            shared,
            handle: Some(handle),
            spawned: std::time::Instant::now(),
            memory,
        })
    }

    /// Ask the guest to rewrite the qword at guest physical `at` (its own
    /// write, through KVM) and wait until it did.
    pub fn touch(&self, at: u64, timeout: Duration) -> Result<(), VmmError> {
        if at == 0 {
            return Err(VmmError::BadInput("touch at guest address 0".into()));
        }
        let before = self.shared.lock().touched;
        self.memory.write_u64(PARAMS_AT + P_TOUCH, at)?;
        self.shared.wait_for("the guest's touch", timeout, |c| {
            (c.touched > before).then_some(())
        })
    }

    /// Where the thread's time went since it was spawned, from its
    /// `/proc/self/task/<tid>/schedstat` (time on a CPU, time runnable)
    /// and its own count of deliberate sleeps; the rest is time blocked.
    pub fn time(&self) -> Result<VcpuTime, VmmError> {
        let wall = self.spawned.elapsed();
        let (tid, asleep_ns) = {
            let c = self.shared.lock();
            (c.tid, c.asleep_ns)
        };
        let tid =
            tid.ok_or_else(|| VmmError::BadInput("the vCPU thread has not started".into()))?;
        let path = format!("/proc/self/task/{tid}/schedstat");
        let text =
            std::fs::read_to_string(&path).map_err(|e| VmmError::Sys("read schedstat", e))?;
        let mut fields = text.split_whitespace().map(str::parse::<u64>);
        let mut next = || {
            fields
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| VmmError::BadInput(format!("{path}: {text:?}")))
        };
        let running = Duration::from_nanos(next()?);
        let runnable = Duration::from_nanos(next()?);
        let asleep = Duration::from_nanos(asleep_ns);
        Ok(VcpuTime {
            wall,
            running,
            runnable,
            asleep,
            blocked: wall.saturating_sub(running + runnable + asleep),
        })
    }

    /// The thread's id (once it has started).
    #[must_use]
    pub fn tid(&self) -> Option<i32> {
        self.shared.lock().tid
    }

    /// Wait until the guest has filled its buffer.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), VmmError> {
        self.shared
            .wait_for("the guest to fill its buffer", timeout, |c| {
                c.ready.then_some(())
            })
    }

    /// Wait for the next buffer-check result (wrong qwords; 0 = passed).
    pub fn wait_check(&self, timeout: Duration) -> Result<u32, VmmError> {
        self.shared
            .wait_for("the guest's buffer check", timeout, |c| {
                (!c.checks.is_empty()).then(|| c.checks.remove(0))
            })
    }

    /// Stop the vCPU out of `KVM_RUN` and capture its state; it stays
    /// parked until [`resume`](Self::resume) or [`stop`](Self::stop).
    pub fn pause(&self) -> Result<VcpuState, VmmError> {
        self.shared.lock().want = Want::Pause;
        self.shared.cv.notify_all();
        self.shared
            .wait_for("the vCPU to stop", Duration::from_secs(10), |c| {
                if c.parked { c.captured.take() } else { None }
            })
    }

    /// Let a paused vCPU run again.
    pub fn resume(&self) {
        self.shared.lock().want = Want::Run;
        self.shared.cv.notify_all();
    }

    /// The heartbeats so far.
    #[must_use]
    pub fn heartbeats(&self) -> HeartbeatLog {
        self.shared.lock().log.clone()
    }

    /// Stop the thread (at the next exit, within ~1 ms) and take the vCPU back.
    pub fn stop(mut self) -> Result<VcpuFd, VmmError> {
        self.shared.lock().want = Want::Stop;
        self.shared.cv.notify_all();
        self.join()
    }

    fn join(&mut self) -> Result<VcpuFd, VmmError> {
        let handle = self
            .handle
            .take()
            .ok_or_else(|| VmmError::BadInput("vCPU thread already joined".into()))?;
        handle
            .join()
            .map_err(|_| VmmError::GuestExit("the vCPU thread panicked".into()))?
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.shared.lock().want = Want::Stop;
            self.shared.cv.notify_all();
            let _ = self.join();
        }
    }
}

/// The vCPU loop. Returns the vCPU when asked to stop; a guest that stops
/// unexpectedly ends it with an error (also recorded for waiters).
fn run(
    mut vcpu: VcpuFd,
    memory: &GuestMemory,
    shared: &Shared,
    ring: Option<&KvmDirtyRing>,
    priority: VcpuPriority,
) -> Result<VcpuFd, VmmError> {
    shared.lock().tid = Some(nix::unistd::gettid().as_raw());
    let schedstat = std::fs::File::open("/proc/thread-self/schedstat").ok();
    let result = priority
        .apply()
        .and_then(|()| run_loop(&mut vcpu, memory, shared, ring, schedstat.as_ref()));
    if let Err(e) = &result {
        shared.lock().failed = Some(match e {
            VmmError::GuestExit(why) => why.clone(),
            other => other.to_string(),
        });
        shared.cv.notify_all();
    }
    result.map(|()| vcpu)
}

fn run_loop(
    vcpu: &mut VcpuFd,
    memory: &GuestMemory,
    shared: &Shared,
    ring: Option<&KvmDirtyRing>,
    schedstat: Option<&std::fs::File>,
) -> Result<(), VmmError> {
    loop {
        if park(vcpu, shared)? {
            return Ok(());
        }
        let exit = vcpu.run().map_err(kvm_err("KVM_RUN"))?;
        let host_ns = monotonic_ns();
        match exit {
            VcpuExit::IoOut(port, data) => {
                let mut word = [0u8; 4];
                let n = data.len().min(4);
                word[..n].copy_from_slice(&data[..n]);
                let value = u32::from_le_bytes(word);
                if port == PORT_IDLE {
                    idle(shared, value, memory.read_u64(PARAMS_AT + P_TSC_PER_MS)?);
                    continue;
                }
                let mut ctl = shared.lock();
                match port {
                    PORT_HEARTBEAT => {
                        let tsc = memory.read_u64(PARAMS_AT + P_HB_TSC)?;
                        let (cpu_ns, wait_ns) = schedstat.map_or((0, 0), read_schedstat);
                        ctl.log.push(Heartbeat {
                            count: value,
                            tsc,
                            host_ns,
                            cpu_ns,
                            wait_ns,
                        });
                        continue;
                    }
                    PORT_READY => ctl.ready = true,
                    PORT_CHECK => ctl.checks.push(value),
                    PORT_TOUCHED => ctl.touched += 1,
                    other => {
                        return Err(VmmError::GuestExit(format!(
                            "write to unknown port {other:#x}"
                        )));
                    }
                }
                drop(ctl);
                shared.cv.notify_all();
            }
            VcpuExit::Hlt => return Err(VmmError::GuestExit("HLT".into())),
            VcpuExit::Shutdown => {
                return Err(VmmError::GuestExit("shutdown (triple fault)".into()));
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(VmmError::GuestExit(format!(
                    "VM entry failed (reason {reason:#x}, cpu {cpu})"
                )));
            }
            VcpuExit::InternalError => {
                return Err(VmmError::GuestExit(
                    "KVM internal error (emulation failure)".into(),
                ));
            }
            VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL) if ring.is_some() => {
                if let Some(ring) = ring {
                    ring.on_full_exit()?;
                }
            }
            other => return Err(VmmError::GuestExit(format!("unexpected exit {other:?}"))),
        }
    }
}

/// The calling thread's time on a CPU and time runnable (ns), from its
/// open `/proc/thread-self/schedstat` (one `pread`); zeros if unreadable.
fn read_schedstat(file: &std::fs::File) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 96];
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    let text = std::str::from_utf8(&buf[..n]).unwrap_or("");
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0));
    (fields.next().unwrap_or(0), fields.next().unwrap_or(0))
}

/// Spin this close to the guest's next deadline rather than sleep through it.
const IDLE_MARGIN: Duration = Duration::from_micros(150);

/// The guest has nothing to do for `ticks` TSC ticks: sleep the vCPU
/// thread (less a margin, woken early by a pause or stop request).
fn idle(shared: &Shared, ticks: u32, tsc_per_ms: u64) {
    if tsc_per_ms == 0 {
        return;
    }
    let ns = u64::from(ticks) * 1_000_000 / tsc_per_ms;
    let Some(sleep) = Duration::from_nanos(ns).checked_sub(IDLE_MARGIN) else {
        return;
    };
    let ctl = shared.lock();
    let t = std::time::Instant::now();
    let (mut ctl, _) = shared
        .cv
        .wait_timeout_while(ctl, sleep, |c| c.want == Want::Run)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ctl.asleep_ns += t.elapsed().as_nanos() as u64;
}

/// Honour a pause or stop request: returns true to stop. Parked, the vCPU
/// captures its state once and waits for `Run` or `Stop`.
fn park(vcpu: &mut VcpuFd, shared: &Shared) -> Result<bool, VmmError> {
    let mut ctl = shared.lock();
    match ctl.want {
        Want::Run => return Ok(false),
        Want::Stop => return Ok(true),
        Want::Pause => {}
    }
    // Complete the exit's I/O (the OUT's RIP advance happens on the next
    // KVM_RUN): with immediate_exit set, KVM_RUN finishes it and returns
    // EINTR without running the guest (KVM API doc, "immediate_exit").
    vcpu.set_kvm_immediate_exit(1);
    let settled = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match settled {
        Err(e) if e.errno() == nix::errno::Errno::EINTR as i32 => {}
        Err(e) => return Err(kvm_err("KVM_RUN (immediate_exit)")(e)),
        Ok(()) => {
            return Err(VmmError::BadInput(
                "KVM_RUN with immediate_exit ran the guest".into(),
            ));
        }
    }
    ctl.captured = Some(VcpuState::capture(vcpu)?);
    ctl.parked = true;
    shared.cv.notify_all();
    let t = std::time::Instant::now();
    while ctl.want == Want::Pause {
        ctl = shared
            .cv
            .wait(ctl)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    ctl.asleep_ns += t.elapsed().as_nanos() as u64;
    ctl.parked = false;
    Ok(ctl.want == Want::Stop)
}

/// `kvm_fpu` has no serde support in kvm-bindings: its fields, mirrored.
mod fpu_serde {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Fpu {
        fpr: [[u8; 16]; 8],
        fcw: u16,
        fsw: u16,
        ftwx: u8,
        last_opcode: u16,
        last_ip: u64,
        last_dp: u64,
        xmm: [[u8; 16]; 16],
        mxcsr: u32,
    }

    pub(super) fn serialize<S: Serializer>(f: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_fpu, D::Error> {
        let f = Fpu::deserialize(d)?;
        Ok(kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        })
    }
}
