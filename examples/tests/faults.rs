//! The fault-injection suite (issue 20, item 4): one migration per fault
//! point — break, stall, duplicate at every message index of each end, and
//! byte corruption / truncation on the encrypted TCP wire — in pre-copy,
//! post-copy and hybrid, with real userfaultfd regions; after each point
//! the suite checks that nothing was lost or wrong and nothing leaked (see
//! `lmig_examples::bench::faults`).
//!
//! Needs userfaultfd (write-protect and kernel-mode missing faults): fails
//! loudly without it; `LMIG_SKIP_PRIVILEGED=1` turns that, without root,
//! into a visible skip. No timing is asserted.

use lmig_examples::bench::faults::{Args, run_suite};

#[test]
fn every_protocol_step_survives_every_fault() {
    if !lmig_core::testing::privileged(
        "faults::every_protocol_step_survives_every_fault",
        "userfaultfd write-protect and post-copy",
    ) {
        return;
    }
    let args = Args {
        // The killed side runs as `lmig-bench faults-peer`.
        peer_exe: Some(env!("CARGO_BIN_EXE_lmig-bench").into()),
        ..Args::default()
    };
    let sum = run_suite(&args, &mut |_, _| {});
    let line = sum.line();
    eprintln!("fault suite: {line}");
    for k in &sum.known {
        eprintln!("KNOWN FAILURE {k}");
    }
    for f in &sum.failures {
        eprintln!("FAILED {f}");
    }
    assert!(sum.points >= 200, "too few fault points: {line}");
    assert!(
        sum.failures.is_empty(),
        "{} fault point(s) failed: {line}\n{}",
        sum.failures.len(),
        sum.failures.join("\n")
    );
    assert_eq!(sum.wrong_pages, 0, "{line}");
    assert_eq!(
        sum.lost_bytes, sum.known_lost_bytes,
        "bytes lost outside known failures: {line}"
    );
    assert_eq!(sum.leaks, 0, "{line}");
    assert_eq!(
        sum.passed + sum.known_failures,
        sum.points,
        "every point passed or is a stated known failure: {line}"
    );
}
