//! The fault-injection suite (issue 20, item 4): one migration per fault
//! point — break, stall, duplicate at every message index of each end,
//! byte corruption / truncation on the encrypted TCP wire, `SIGKILL` of
//! either side at each phase, link cuts in namespaces — in pre-copy,
//! post-copy and hybrid, with real userfaultfd regions; after each point
//! the suite checks that nothing was lost or wrong and nothing leaked (see
//! `lmig_examples::bench::faults`). CI runs [`Args::ci`], a subset sized
//! to stay within minutes (stalls, which cost a timeout each, at fewer
//! indices; one wire offset per stream and direction); `lmig-bench faults`
//! runs the whole suite, and `LMIG_FAULTS_FULL=1` runs it here.
//!
//! Needs userfaultfd (write-protect and kernel-mode missing faults),
//! namespaces and `SIGKILL` of its own children: fails loudly without
//! them; `LMIG_SKIP_PRIVILEGED=1` turns that, without root, into a visible
//! skip. No timing is asserted: every point is bounded, and a point that
//! hangs fails with its name.

use lmig_examples::bench::faults::conns;
use lmig_examples::bench::faults::{Args, run_suite};
use lmig_net::topology::Topology;

#[test]
fn every_protocol_step_survives_every_fault() {
    if !lmig_core::testing::privileged(
        "faults::every_protocol_step_survives_every_fault",
        "userfaultfd write-protect and post-copy",
    ) {
        return;
    }
    // The killed side runs as `lmig-bench faults-peer`.
    let exe = env!("CARGO_BIN_EXE_lmig-bench").into();
    let mut args = if std::env::var_os("LMIG_FAULTS_FULL").is_some() {
        Args {
            peer_exe: Some(exe),
            ..Args::default()
        }
    } else {
        Args::ci(exe)
    };
    // To debug one point: LMIG_FAULTS_ONLY="Hybrid duplicate Source #27/".
    args.only = std::env::var("LMIG_FAULTS_ONLY").ok();
    args.verbose = std::env::var_os("LMIG_FAULTS_VERBOSE").is_some();
    let verbose = args.verbose;
    let mut last = std::time::Instant::now();
    let sum = run_suite(&args, &mut |what, v| {
        if verbose {
            eprintln!("[{:?}] {what}: {:?}", last.elapsed(), v.problems);
            last = std::time::Instant::now();
        }
    });
    let line = sum.line();
    eprintln!("fault suite: {line}");
    for f in &sum.failures {
        eprintln!("FAILED {f}");
    }
    if args.only.is_none() {
        assert!(sum.points >= 200, "too few fault points: {line}");
    }
    assert!(
        sum.failures.is_empty(),
        "{} fault point(s) failed: {line}\n{}",
        sum.failures.len(),
        sum.failures.join("\n")
    );
    assert_eq!(sum.passed, sum.points, "every point passed: {line}");
    assert_eq!(sum.wrong_pages, 0, "{line}");
    assert_eq!(sum.lost_bytes, 0, "{line}");
    assert_eq!(sum.leaks, 0, "{line}");
}

/// The socket checks of the suite see what they check: a connection in
/// repair mode, a lock table of this process, bytes that do not arrive.
#[test]
fn the_socket_checks_see_a_leak_and_a_lost_byte() {
    if !lmig_core::testing::privileged(
        "faults::the_socket_checks_see_a_leak_and_a_lost_byte",
        "network namespaces, CAP_NET_ADMIN for TCP repair and nftables",
    ) {
        return;
    }
    let topo = Topology::new().expect("topology");
    topo.add_service_address(&topo.a).expect("service address");
    assert_eq!(conns::holds_service(&topo.a).unwrap().len(), 2);
    assert!(conns::holds_service(&topo.b).unwrap().is_empty());
    let (mut client, socks) = conns::open(&topo).expect("connections");
    use std::os::fd::AsFd;
    let fd = socks.tcp[0].as_fd();
    assert!(!conns::in_repair(fd));
    lmig_net::sys::tcp_repair(fd, lmig_net::sys::RepairMode::On).expect("repair on");
    assert!(conns::in_repair(fd), "repair mode is seen");
    lmig_net::sys::tcp_repair(fd, lmig_net::sys::RepairMode::Off).expect("repair off");
    assert!(!conns::in_repair(fd));

    assert!(conns::lock_tables(&topo.a).unwrap().is_empty());
    let name = format!("{}{}_999", lmig_net::lock::TABLE_PREFIX, std::process::id());
    topo.a
        .run(move || lmig_net::lock::testing::add_table(false, &name))
        .unwrap()
        .expect("add a table");
    assert_eq!(
        conns::lock_tables(&topo.a).unwrap().len(),
        1,
        "a table is seen"
    );

    // The connections swapped and the UDP socket missing: bytes are lost.
    let mut tcp = socks.tcp;
    tcp.reverse();
    let x = conns::exchange(&mut client, tcp, None);
    assert!(x.lost_bytes > 0 && x.problems.len() >= 3, "{x:?}");
}
