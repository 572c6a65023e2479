//! The kernel probe (`lmig_mem::probe`): every capability this test suite
//! relies on is reported OK as root; as `nobody` the probe still answers,
//! naming what is missing and how to fix it.

use lmig_core::probe::{Capability, Status, Verdict};
use lmig_core::testing::{privileged, rerun_as_nobody};

/// The tests count this process's fds: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This process's open fds, as "number:target". A probe leaks one if an fd
/// is open after it that was not before; an fd another thread closed
/// meanwhile (a finished test's reader of a child's output) is not the
/// probe's, and neither is the listing's own fd nor one closed while it was
/// listed (its target no longer reads).
fn open_fds() -> std::collections::BTreeSet<String> {
    let listing = format!("/proc/{}/fd", std::process::id());
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().to_string_lossy().into_owned();
            let target = std::fs::read_link(format!("/proc/self/fd/{n}")).ok()?;
            let target = target.display().to_string();
            (target != listing).then(|| format!("{n}:{target}"))
        })
        .collect()
}

fn assert_no_new_fds(before: &std::collections::BTreeSet<String>) {
    let after = open_fds();
    let new: Vec<&String> = after.difference(before).collect();
    assert!(new.is_empty(), "the probe left fds open: {new:?}");
}

#[test]
fn probe_as_root_reports_what_the_tests_use() {
    if !privileged(
        "probe_as_root_reports_what_the_tests_use",
        "kernel-mode userfaultfd",
    ) {
        return;
    }
    let report = lmig_mem::probe();
    println!("{report}");
    let dirty = report
        .get(Capability::DirtyTracking)
        .expect("dirty tracking probed");
    match dirty {
        // tracker_conformance and the sessions' tests run on uffd-wp.
        Verdict::Ok { detail } => assert!(detail.contains("uffd-wp + PAGEMAP_SCAN"), "{detail}"),
        other => panic!("dirty tracking: {other}"),
    }
    let post = report.get(Capability::PostCopy).expect("post-copy probed");
    match post {
        // postcopy tests use kernel-mode faults, MISSING on shmem and MINOR on memfd.
        Verdict::Ok { detail } => {
            assert!(detail.contains("kernel-mode faults allowed"), "{detail}");
            assert!(detail.contains("MINOR on shmem/memfd: yes"), "{detail}");
        }
        other => panic!("post-copy: {other}"),
    }
    // The tracker the probe names is the one best_tracker picks.
    let set = lmig_mem::RegionSet::new(vec![
        lmig_mem::RegionOptions::new(lmig_mem::RegionId(1), 1 << 16)
            .map()
            .unwrap(),
    ])
    .unwrap();
    let (_t, choice) = lmig_mem::best_tracker(&set).unwrap();
    assert_eq!(choice.picked, lmig_mem::TrackerKind::UffdWp);
}

#[test]
fn probe_as_nobody_names_the_fix() {
    if !privileged("probe_as_nobody_names_the_fix", "switching to user nobody") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = rerun_as_nobody("probe_child_as_nobody");
    assert!(out.contains("probe child checked"), "{out}");
}

/// The child half of [`probe_as_nobody_names_the_fix`], run as `nobody`.
#[test]
#[ignore = "run by probe_as_nobody_names_the_fix as user nobody"]
fn probe_child_as_nobody() {
    let fds = open_fds();
    let report = lmig_mem::probe();
    println!("{report}");
    assert_no_new_fds(&fds);
    assert_eq!(report.findings().len(), 2);
    // uffd-wp works with UFFD_USER_MODE_ONLY (the kernel resolves the faults).
    let dirty = report.get(Capability::DirtyTracking).unwrap();
    assert!(dirty.is_usable(), "{dirty}");
    let post = report.get(Capability::PostCopy).unwrap();
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap();
    if sysctl.trim() == "0" {
        // Without CAP_SYS_PTRACE or the device node, only user-mode faults.
        assert_ne!(post.status(), Status::Ok, "{post}");
        let fix = post.fix().unwrap();
        assert!(fix.contains("CAP_SYS_PTRACE"), "{fix}");
        assert!(post.to_string().contains("CAP_SYS_PTRACE: no"), "{post}");
    }
    println!("probe child checked");
}
