//! tokiod end to end in three network namespaces, driven by the same
//! scenario as kvd: a live migration with busy clients (every connection
//! kept, every `INCR` answered once and right, every key read back at the
//! destination), and failed attempts (a destination killed in the freeze,
//! a wrong key, a freeze past its bound) after which tokiod serves on at
//! the source with every connection.

use std::time::Duration;

use lmig_examples::scenario::{self, Fault, Options, Report};

fn privileged() -> bool {
    lmig_core::testing::privileged("tokiod tests", "network namespaces, TCP repair, nftables")
}

const KEYS: u64 = 20_000;
const CONNS: usize = 40;

fn options(fault: Option<Fault>) -> Options {
    Options {
        rate: 5_000.0,
        dirty_mbps: 20.0,
        keys: KEYS,
        warmup: Duration::from_millis(500),
        after: Duration::from_millis(500),
        kvd: (env!("CARGO_BIN_EXE_tokiod").into(), Vec::new()),
        fault,
        ..Options::new("precopy", 64, CONNS).expect("the test's own path")
    }
}

/// Every connection kept, every reply right, requests answered, every
/// loaded key read back through the service address.
fn assert_served_on(r: &Report, what: &str) {
    assert_eq!(r.load.conns_kept, CONNS, "{what}: {:?}", r.load.first_error);
    assert_eq!(r.load.conns_broken, 0, "{what}: {:?}", r.load.first_error);
    assert_eq!(
        r.load.requests_failed, 0,
        "{what}: {:?}",
        r.load.first_error
    );
    assert!(
        r.load.requests_ok > 100,
        "{what}: {} requests",
        r.load.requests_ok
    );
    let keys = r.keys.expect("keys were loaded");
    assert_eq!(keys.checked, KEYS, "{what}");
    assert_eq!(
        keys.wrong, 0,
        "{what}: first wrong key {:?}",
        keys.first_wrong
    );
}

// The scenarios share the machine's nftables/NFQUEUE resources and CPU:
// run them one after another in one test.
#[test]
fn tokiod_migrates_live_and_serves_on_after_failed_attempts() {
    if !privileged() {
        return;
    }
    let r = scenario::run(&options(None)).unwrap_or_else(|e| panic!("migration: {e}"));
    assert!(r.migrated, "migration: {:?}", r.error);
    assert_served_on(&r, "migration");
    let source = r.source.as_ref().expect("the source's figures");
    let dest = r.destination.as_ref().expect("the destination's figures");
    assert!(source.verified && dest.verified, "{source:?} {dest:?}");
    // Every client connection and the listener moved.
    assert_eq!(dest.sockets, CONNS as u64 + 1, "{dest:?}");

    // The destination killed as the freeze reaches it: the source takes
    // its sockets back, serves on, and migrates again to a fresh one.
    let fault = Fault::KillDestinationInFreeze { after_us: 0 };
    let r = scenario::run(&options(Some(fault))).unwrap_or_else(|e| panic!("{fault:?}: {e}"));
    assert_eq!(r.attempts, 2, "{fault:?}");
    assert_eq!(
        r.first_attempt_source_serving,
        Some(true),
        "{fault:?}: {:?}",
        r.first_attempt_error
    );
    assert!(r.migrated, "{fault:?}: the second attempt: {:?}", r.error);
    assert_served_on(&r, "a destination killed in the freeze");

    // Refused before anything moved: the service never stopped.
    let r =
        scenario::run(&options(Some(Fault::WrongKey))).unwrap_or_else(|e| panic!("wrong key: {e}"));
    assert!(!r.migrated, "wrong key");
    assert!(r.error.is_some(), "wrong key: the failure is reported");
    assert_eq!(r.source_serving, Some(true), "wrong key: {:?}", r.error);
    assert_served_on(&r, "wrong key");

    // Aborted in the freeze (a bound no migration meets): every task had
    // handed its socket back; the abort adopts them all into the runtime
    // again, with the bytes they held.
    let bounded = Options {
        max_freeze_ms: Some(1.0),
        ..options(None)
    };
    let r = scenario::run(&bounded).unwrap_or_else(|e| panic!("max freeze: {e}"));
    assert!(!r.migrated, "max freeze: migrated in under 1 ms?");
    assert!(r.aborted_by_deadline, "max freeze: {:?}", r.error);
    assert_eq!(r.source_serving, Some(true), "max freeze: {:?}", r.error);
    assert_served_on(&r, "max freeze");
}
