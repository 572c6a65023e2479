//! The kernel probe (`lmig_net::probe`): every capability this test suite
//! relies on is reported OK as root, and the probe leaves no fd and no
//! nftables table behind; as `nobody` the privileged capabilities are
//! reported missing with their fix, without a panic.

use std::sync::Mutex;

use lmig_core::probe::{Capability, Status, Verdict};
use lmig_core::testing::{privileged, rerun_as_nobody};

/// The tests count this process's fds: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

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

fn our_tables() -> Vec<String> {
    let prefix = format!("lmig_lock_{}_", std::process::id());
    lmig_net::lock::testing::tables()
        .unwrap()
        .into_iter()
        .filter(|t| t.contains(&prefix))
        .collect()
}

#[test]
fn probe_as_root_reports_what_the_tests_use() {
    if !privileged(
        "probe_as_root_reports_what_the_tests_use",
        "TCP repair, nftables, raw sockets",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fds = open_fds();
    let report = lmig_net::probe();
    println!("{report}");
    assert_no_new_fds(&fds);
    assert_eq!(our_tables(), Vec::<String>::new(), "the probe left a table");
    // Every one of these is used by this crate's tests (repair, lock,
    // re-injection and announces, take_fd_from_process).
    for cap in [
        Capability::TcpRepair,
        Capability::NetworkLock,
        Capability::RawSockets,
        Capability::PacketSockets,
        Capability::PidfdGetfd,
    ] {
        match report.get(cap) {
            Some(Verdict::Ok { .. }) => {}
            other => panic!("{cap}: {other:?}"),
        }
    }
    assert_eq!(report.findings().len(), 5);
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
    let report = lmig_net::probe();
    println!("{report}");
    assert_no_new_fds(&fds);
    for (cap, fix) in [
        (Capability::TcpRepair, "CAP_NET_ADMIN"),
        (Capability::NetworkLock, "CAP_NET_ADMIN"),
        (Capability::RawSockets, "CAP_NET_RAW"),
        (Capability::PacketSockets, "CAP_NET_RAW"),
    ] {
        let v = report.get(cap).unwrap();
        assert_eq!(v.status(), Status::Missing, "{cap}: {v}");
        assert!(v.fix().unwrap().contains(fix), "{cap}: {v}");
        assert!(
            v.to_string().contains("refused") || cap == Capability::NetworkLock,
            "{cap}: {v}"
        );
    }
    // The own process is always ours to take fds from.
    let pidfd = report.get(Capability::PidfdGetfd).unwrap();
    assert_eq!(pidfd.status(), Status::Ok, "{pidfd}");
    println!("probe child checked");
}
