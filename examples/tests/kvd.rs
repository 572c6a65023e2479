//! kvd end to end in three network namespaces: a live migration with busy
//! clients, and the failure paths (wrong key, no destination) that must leave
//! kvd serving on A with every connection intact.

use std::time::Duration;

use lmig_examples::scenario::{self, Fault, Options};

fn privileged() -> bool {
    lmig_core::testing::privileged("kvd tests", "network namespaces, TCP repair, nftables")
}

fn options(mode: &str, fault: Option<Fault>) -> Options {
    Options {
        mib: 64,
        conns: 50,
        rate: 5_000.0,
        mode: mode.into(),
        dirty_mbps: 20.0,
        keys: 20_000,
        warmup: Duration::from_millis(500),
        after: Duration::from_millis(500),
        streams: 2,
        progress: false,
        svg: None,
        kvd: (env!("CARGO_BIN_EXE_kvd").into(), Vec::new()),
        fault,
        tls: false,
        max_freeze_ms: None,
        queued_mib: 0.0,
    }
}

// The scenarios share the machine's nftables/NFQUEUE resources and CPU:
// run them one after another in one test.
#[test]
fn kvd_migrates_live_and_survives_failed_migrations() {
    if !privileged() {
        return;
    }
    for mode in ["precopy", "postcopy", "hybrid"] {
        let r = scenario::run(&options(mode, None)).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(r.migrated, "{mode}: {:?}", r.error);
        assert_served_every_key(&r, mode);
        assert!(r.load.requests_ok > 0, "{mode}");
        let verified = r.destination.as_ref().map(|d| d.verified);
        assert_eq!(verified, Some(true), "{mode}: {:?}", r.destination);
        // Every client connection joined the destination's poller as the
        // sink prepared it, before the freeze (`NetSink::on_register`).
        let early = r.registered_before_commit.unwrap_or(0);
        let conns = options(mode, None).conns as u64;
        assert!(
            early >= conns,
            "{mode}: {early} of {conns} connections registered before Commit"
        );
        let cipher = r.source.as_ref().map(|s| s.cipher.clone());
        assert_eq!(
            cipher.as_deref(),
            Some("Noise_NNpsk0_25519_AESGCM_SHA256"),
            "{mode}"
        );
    }
    // Over TLS 1.3 with certificates made for the run: the same migration,
    // and kvd says it ran over TLS.
    let tls = Options {
        tls: true,
        ..options("precopy", None)
    };
    let r = scenario::run(&tls).unwrap_or_else(|e| panic!("tls: {e}"));
    assert!(r.migrated, "tls: {:?}", r.error);
    assert_served_every_key(&r, "tls");
    let cipher = r
        .source
        .as_ref()
        .map(|s| s.cipher.clone())
        .unwrap_or_default();
    assert!(cipher.starts_with("TLS 1.3 TLS13_"), "tls: {cipher:?}");
    // 8 MiB of replies left queued in kvd's sockets (clients with closed
    // windows): the freeze captures them, and after the move every byte
    // arrives, in order.
    let queued = Options {
        queued_mib: 8.0,
        ..options("precopy", None)
    };
    let r = scenario::run(&queued).unwrap_or_else(|e| panic!("queued: {e}"));
    assert!(r.migrated, "queued: {:?}", r.error);
    assert_served_every_key(&r, "queued");
    let (conns, asked, verified) = r.queued.clone().expect("queued connections");
    assert_eq!(conns, 50, "queued: one per client connection, at most 100");
    assert_eq!(verified, Ok(()), "queued: every reply read back");
    let captured = r.source.as_ref().map_or(0, |s| s.queued_bytes);
    assert!(
        captured >= asked / 2 && captured <= asked,
        "queued: {captured} of {asked} bytes asked were in kvd's sockets at the freeze"
    );
    // A destination killed in the freeze (at its first socket record, a
    // little later, and just before `Ready`): the source serves on with
    // every connection, then migrates to a fresh destination, and every key
    // answers there.
    for after_us in [0, 300, 1_000_000] {
        let fault = Fault::KillDestinationInFreeze { after_us };
        let r = scenario::run(&options("precopy", Some(fault)))
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(r.attempts, 2, "{fault:?}");
        assert!(
            r.first_attempt_error.is_some(),
            "{fault:?}: the first attempt failed"
        );
        assert_eq!(
            r.first_attempt_source_serving,
            Some(true),
            "{fault:?}: {:?}",
            r.first_attempt_error
        );
        assert!(r.migrated, "{fault:?}: the second attempt: {:?}", r.error);
        assert_served_every_key(&r, &format!("{fault:?}"));
    }
    // Strangers at the destination's door (garbage, a 4 GiB length, a
    // message before authentication, a wrong key, a replayed and a truncated
    // handshake, idle connections held through the migration): each is
    // refused and the real migration goes through.
    let r = scenario::run(&options("precopy", Some(Fault::Strangers)))
        .unwrap_or_else(|e| panic!("strangers: {e}"));
    assert!(r.migrated, "strangers: {:?}", r.error);
    assert!(r.refused >= 6, "strangers: {} refusals logged", r.refused);
    assert_served_every_key(&r, "strangers");
    for fault in [Fault::WrongKey, Fault::NoDestination] {
        let r = scenario::run(&options("precopy", Some(fault)))
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert!(!r.migrated, "{fault:?}");
        let err = r.error.clone().unwrap_or_default();
        assert!(!err.is_empty(), "{fault:?}: the failure is reported");
        assert_eq!(r.source_serving, Some(true), "{fault:?}: {:?}", r.error);
        // kvd kept serving on A: every connection intact, every reply right,
        // and requests were answered after the failed attempt.
        assert_eq!(
            r.load.conns_broken, 0,
            "{fault:?}: {:?}",
            r.load.first_error
        );
        assert_eq!(
            r.load.requests_failed, 0,
            "{fault:?}: {:?}",
            r.load.first_error
        );
        assert!(r.load.requests_ok > 100, "{fault:?}");
        let keys = r.keys.expect("keys were loaded");
        assert_eq!((keys.checked, keys.wrong), (20_000, 0), "{fault:?}");
    }
    // A freeze bound no migration of 50 connections can meet (1 ms, to the
    // destination's `Ready`): the source aborts on it and serves on, every
    // connection and every key intact.
    let bounded = Options {
        max_freeze_ms: Some(1.0),
        ..options("precopy", None)
    };
    let r = scenario::run(&bounded).unwrap_or_else(|e| panic!("max freeze: {e}"));
    assert!(!r.migrated, "max freeze: migrated in under 1 ms?");
    assert!(r.aborted_by_deadline, "max freeze: {:?}", r.error);
    assert_eq!(r.source_serving, Some(true), "max freeze: {:?}", r.error);
    assert_eq!(
        r.load.conns_broken, 0,
        "max freeze: {:?}",
        r.load.first_error
    );
    assert_eq!(
        r.load.requests_failed, 0,
        "max freeze: {:?}",
        r.load.first_error
    );
    assert!(r.load.requests_ok > 100, "max freeze");
    let keys = r.keys.expect("keys were loaded");
    assert_eq!((keys.checked, keys.wrong), (20_000, 0), "max freeze");
}

/// Every connection kept, every reply right, every loaded key read back.
fn assert_served_every_key(r: &scenario::Report, what: &str) {
    assert_eq!(r.load.conns_broken, 0, "{what}: {:?}", r.load.first_error);
    assert_eq!(
        r.load.requests_failed, 0,
        "{what}: {:?}",
        r.load.first_error
    );
    let verified = r.source.as_ref().map(|s| s.verified);
    assert_eq!(verified, Some(true), "{what}: {:?}", r.source);
    let keys = r.keys.expect("keys were loaded");
    assert_eq!(keys.checked, 20_000, "{what}");
    assert_eq!(
        keys.wrong, 0,
        "{what}: first wrong key {:?}",
        keys.first_wrong
    );
}
