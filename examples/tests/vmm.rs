//! The micro-VMM (issue 21): a guest in 64-bit ring 3 on real KVM fills its
//! buffer, sends heartbeats, dirties pages and checks its buffer; bad input
//! (no KVM device, a guest that faults) gets clear errors.

use std::time::Duration;

use lmig_core::testing::privileged;
use lmig_examples::vmm::guest::{BUFFER_AT, halting_program, pattern};
use lmig_examples::vmm::{Machine, MachineConfig, VmmError};

fn needs_kvm(test: &str) -> bool {
    privileged(test, "/dev/kvm (root)")
}

/// ~200 ms of guest: heartbeats count up one by one, at least a guest
/// millisecond apart; the guest's own buffer check passes while it dirties
/// pages, and sees one qword the host corrupted.
#[test]
fn guest_runs_heartbeats_and_checks_its_buffer() {
    if !needs_kvm("guest_runs_heartbeats_and_checks_its_buffer") {
        return;
    }
    let mut m = Machine::new(MachineConfig::new(64)).expect("machine");
    m.boot(8).expect("boot");
    m.start().expect("start");
    m.vcpu()
        .unwrap()
        .wait_ready(Duration::from_secs(30))
        .expect("guest filled its buffer");
    std::thread::sleep(Duration::from_millis(200));
    let log = m.heartbeats().unwrap();
    let tsc_per_ms = u64::from(m.tsc_khz());
    assert!(
        log.beats.len() >= 2,
        "heartbeats arrived: {}",
        log.beats.len()
    );
    for w in log.beats.windows(2) {
        assert_eq!(w[1].count, w[0].count + 1, "heartbeats count up by one");
        assert!(
            w[1].tsc - w[0].tsc >= tsc_per_ms,
            "heartbeats at least 1 ms of guest TSC apart"
        );
    }
    let mut host_gaps: Vec<u64> = log
        .beats
        .windows(2)
        .map(|w| w[1].host_ns - w[0].host_ns)
        .collect();
    host_gaps.sort_unstable();
    eprintln!(
        "{} heartbeats in ~200 ms; host interval median {:.3} ms, max {:.3} ms",
        log.beats.len(),
        host_gaps[host_gaps.len() / 2] as f64 / 1e6,
        log.max_gap_ns as f64 / 1e6
    );
    assert!(m.dirtied().unwrap() > 0, "the guest dirtied pages");
    assert_eq!(
        m.check_buffer(Duration::from_secs(30)).expect("check"),
        0,
        "the buffer check passes"
    );
    // A qword the guest never dirties (the last word of the buffer's page
    // 3), corrupted by the host: the guest's check counts it.
    let at = BUFFER_AT + 3 * 4096 + 4088;
    assert_eq!(m.memory().read_u64(at).unwrap(), pattern(at));
    m.memory().write_u64(at, !pattern(at)).unwrap();
    assert_eq!(
        m.check_buffer(Duration::from_secs(30)).expect("check"),
        1,
        "the check sees the corruption"
    );
    m.stop().expect("stop");
}

/// No KVM device: a clear error naming /dev/kvm.
#[test]
fn missing_kvm_is_a_clear_error() {
    let err = Machine::new(MachineConfig::new(64).kvm_path("/nonexistent/kvm")).unwrap_err();
    assert!(matches!(err, VmmError::NoKvm(_)), "{err:?}");
    assert!(err.to_string().contains("/dev/kvm"), "{err}");
}

/// A guest that executes `hlt` in ring 3 faults, and with no IDT the fault
/// becomes a triple fault: the VMM reports it instead of hanging.
#[test]
fn faulting_guest_is_a_clear_error() {
    if !needs_kvm("faulting_guest_is_a_clear_error") {
        return;
    }
    let mut m = Machine::new(MachineConfig::new(8).program(halting_program())).expect("machine");
    m.boot(0).expect("boot");
    m.start().expect("start");
    let err = m
        .vcpu()
        .unwrap()
        .wait_ready(Duration::from_secs(30))
        .unwrap_err();
    assert!(matches!(err, VmmError::GuestExit(_)), "{err:?}");
    eprintln!("{err}");
    assert!(
        m.stop().is_err(),
        "the vCPU thread ended with the guest's failure"
    );
}

/// Bad sizes are refused before KVM is touched.
#[test]
fn bad_guest_size_is_refused() {
    for mib in [0, 3, 8192] {
        let err = Machine::new(MachineConfig::new(mib)).unwrap_err();
        assert!(matches!(err, VmmError::BadInput(_)), "{mib}: {err:?}");
    }
}
