//! kvd end to end in three network namespaces: a live migration with busy
//! clients, and the failure paths (wrong key, no destination) that must leave
//! kvd serving on A with every connection intact. And kvd's loop in
//! post-copy with a slow source: a request for a missing key is parked
//! while other clients are served.

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
        plaintext: false,
        max_freeze_ms: None,
        queued_mib: 0.0,
        queued_rcvbuf: scenario::queued::RCVBUF,
        cancel_at_pct: None,
        bandwidth_mbps: None,
        migrate_back: false,
        external: None,
        placement: scenario::split::Placement::Unplaced,
        dry_precopy_mbps: None,
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
        // Pre-copy also moves kvd on, from B back to A, through B's admin
        // socket (the clients go on; every key is read back at A).
        let opts = Options {
            migrate_back: mode == "precopy",
            ..options(mode, None)
        };
        let r = scenario::run(&opts).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(r.migrated, "{mode}: {:?}", r.error);
        assert_served_every_key(&r, mode);
        // The destination's admin socket answers once it serves.
        assert!(
            r.destination_keys.is_some_and(|k| k >= 20_000),
            "{mode}: {:?}",
            r.destination_keys
        );
        if opts.migrate_back {
            assert_eq!(
                r.source_socket_removed,
                Some(true),
                "A ended and removed its admin socket"
            );
            let back = r.back.as_ref().expect("moved back");
            assert!(back.is_ok(), "B -> A: {back:?}");
        }
        assert!(r.load.requests_ok > 0, "{mode}");
        // The clients' latency per phase: before the migration always; in
        // pre-copy when rounds ran; in post-copy when pages came after
        // `Commit`.
        let p = r.phases;
        let switched = r.source.as_ref().is_some_and(|s| s.switched_to_postcopy);
        assert!(p.baseline_p99_ms.is_some(), "{mode}: {p:?}");
        assert_eq!(
            p.precopy_p99_ms.is_some(),
            mode != "postcopy",
            "{mode}: {p:?}"
        );
        assert_eq!(
            p.postcopy_p99_ms.is_some(),
            mode == "postcopy" || switched,
            "{mode}: {p:?}"
        );
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
    // Hybrid on hot memory (1000 MB/s dirtied over 64 MiB, sent at most at
    // 250 MB/s: each round leaves more dirty than it sent, on any host; on
    // an unlimited link a fast round could leave little enough to freeze):
    // the default policy switches to post-copy, and every page and key
    // arrives.
    let hot = Options {
        dirty_mbps: 1000.0,
        bandwidth_mbps: Some(250.0),
        ..options("hybrid", None)
    };
    let r = scenario::run(&hot).unwrap_or_else(|e| panic!("hot hybrid: {e}"));
    assert!(r.migrated, "hot hybrid: {:?}", r.error);
    let s = r.source.as_ref().expect("source figures");
    assert!(s.switched_to_postcopy, "hot hybrid: {}", s.policy);
    assert_served_every_key(&r, "hot hybrid");
    assert_eq!(r.destination.as_ref().map(|d| d.verified), Some(true));
    assert!(r.phases.postcopy_p99_ms.is_some(), "{:?}", r.phases);
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
    // Frames in clear on a trusted link (LMIG_PLAINTEXT_TRUSTED_LINK_ONLY=1
    // on both kvds): the same migration, and kvd says nothing protected it.
    let plain = Options {
        plaintext: true,
        ..options("precopy", None)
    };
    let r = scenario::run(&plain).unwrap_or_else(|e| panic!("plaintext: {e}"));
    assert!(r.migrated, "plaintext: {:?}", r.error);
    assert_served_every_key(&r, "plaintext");
    let cipher = r.source.as_ref().map(|s| s.cipher.clone());
    assert_eq!(cipher.as_deref(), Some("none"), "plaintext");
    // 8 MiB of replies left queued in kvd's sockets (clients with closed
    // windows): the freeze captures them, and after the move every byte
    // arrives, in order. With the clients' 4 KiB receive buffers kvd's
    // queues hold ~2 KiB buffers; with the kernel's default the buffers
    // are larger and the clients' own buffers take part of the replies.
    for rcvbuf in [scenario::queued::RCVBUF, 0] {
        let queued = Options {
            queued_mib: 8.0,
            queued_rcvbuf: rcvbuf,
            ..options("precopy", None)
        };
        let r = scenario::run(&queued).unwrap_or_else(|e| panic!("queued {rcvbuf}: {e}"));
        assert!(r.migrated, "queued {rcvbuf}: {:?}", r.error);
        assert_served_every_key(&r, "queued");
        let (conns, asked, verified) = r.queued.clone().expect("queued connections");
        assert_eq!(conns, 50, "queued: one per client connection, at most 100");
        assert_eq!(verified, Ok(()), "queued {rcvbuf}: every reply read back");
        let captured = r.source.as_ref().map_or(0, |s| s.queued_bytes);
        let least = if rcvbuf == 0 { 1 } else { asked / 2 };
        assert!(
            captured >= least && captured <= asked,
            "queued {rcvbuf}: {captured} of {asked} bytes asked were in kvd's sockets at the freeze"
        );
    }
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
    // An operator's cancel half-way through round 0 (the migration held
    // to 40 MB/s: round 0 of 64 MiB lasts over a second): kvd serves on at
    // A with every connection, reply and key; a cancel with nothing
    // running, before and after, says so.
    let cancel = Options {
        cancel_at_pct: Some(50.0),
        bandwidth_mbps: Some(40.0),
        ..options("precopy", None)
    };
    let r = scenario::run(&cancel).unwrap_or_else(|e| panic!("cancel: {e}"));
    assert!(!r.migrated, "cancel: migrated anyway");
    assert!(r.cancelled, "cancel: {:?}", r.error);
    let (round, fraction) = r.cancelled_at.expect("cancelled at");
    assert_eq!(round, 0, "cancel: in round 0");
    assert!((0.5..1.0).contains(&fraction), "cancel: at {fraction}");
    assert_eq!(r.source_serving, Some(true), "cancel: {:?}", r.error);
    assert_eq!(r.load.conns_broken, 0, "cancel: {:?}", r.load.first_error);
    assert_eq!(
        r.load.requests_failed, 0,
        "cancel: {:?}",
        r.load.first_error
    );
    assert!(r.load.requests_ok > 100, "cancel");
    let keys = r.keys.expect("keys were loaded");
    assert_eq!((keys.checked, keys.wrong), (20_000, 0), "cancel");
    assert_eq!(r.cancel_answers.len(), 2);
    for a in &r.cancel_answers {
        assert!(a.contains("no migration is running"), "cancel: {a}");
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

/// kvd's admin socket on loopback (no namespaces, no clients): a silent
/// admin client blocks nobody, on either side; bad commands and a cancel
/// with nothing running get clear answers; a migration slowed by
/// `bandwidth_mbps` shows in `status`, takes a new limit while it runs,
/// refuses a second `migrate`, and a `cancel` leaves kvd serving. (A
/// migration that goes through, the destination's admin socket after it
/// and the source's socket file removed: in the namespace test above.)
#[test]
fn kvd_admin_socket_serves_operators() {
    if !privileged() {
        return;
    }
    let admin = Admin::start();
    let (a, b) = (admin.dir.join("a.sock"), admin.dir.join("b.sock"));
    // Silent clients on both sockets, held through the test.
    let _silent_a = std::os::unix::net::UnixStream::connect(&a).unwrap();
    let _silent_b = std::os::unix::net::UnixStream::connect(&b).unwrap();
    assert!(ask(&a, "stats").contains("\"keys\":0"));
    assert!(ask(&b, "stats").contains("\"state\":\"waiting\""));
    assert!(ask(&b, "status").contains("\"state\":\"waiting\""));
    assert!(ask(&a, "populate 5000").contains("\"keys\":5000"));
    assert!(ask(&a, "cancel").contains("no migration is running"));
    assert!(ask(&a, "set bandwidth_mbps=5").contains("no migration is running"));
    for bad in [
        "frobnicate",
        "migrate nowhere",
        "migrate 127.0.0.1:1 speed=3",
    ] {
        let answer = ask(&a, bad);
        assert!(
            answer.contains("\"error\"") && answer.contains("\"commands\""),
            "{bad}: {answer}"
        );
    }

    // At 5 MB/s round 0 lasts seconds (its data pages, some 18 MB, go
    // last, after the zero pages).
    let target = format!("127.0.0.1:{}", admin.incoming);
    let mut migrate = Conn::open(&a, &format!("migrate {target} bandwidth_mbps=5"));
    let status = wait_status(&a, |s| s.contains("\"phase\":\"precopy\""));
    assert!(status.contains("\"bandwidth_limit_mbps\":5.0"), "{status}");
    assert!(ask(&a, "set bandwidth_mbps=6").contains("\"ok\":true"));
    let status = wait_status(&a, |s| s.contains("\"bandwidth_limit_mbps\":6.0"));
    assert!(status.contains("\"state\":\"migrating\""), "{status}");
    assert!(
        ask(&a, &format!("migrate {target}")).contains("already running"),
        "one migration at a time"
    );
    assert!(ask(&a, "cancel").contains("\"cancelled\":true"));
    let second = ask(&a, "cancel");
    assert!(
        second.contains("\"already\":true") || second.contains("no migration is running"),
        "{second}"
    );
    let answer = migrate.last_line();
    assert!(
        answer.contains("\"cancelled\":true") && answer.contains("\"source_serving\":true"),
        "{answer}"
    );
    assert!(ask(&a, "stats").contains("\"keys\":5000"), "A serves on");
    assert!(ask(&a, "status").contains("\"state\":\"serving\""));

    // The destination is still waiting: the cancelled attempt left it
    // nothing.
    assert!(ask(&b, "status").contains("\"state\":\"waiting\""));
}

/// Two kvds on loopback with admin sockets in a directory of their own;
/// killed (by pid) and the directory removed on drop.
struct Admin {
    dir: std::path::PathBuf,
    incoming: u16,
    source: std::process::Child,
    destination: std::process::Child,
}

impl Admin {
    fn start() -> Self {
        use std::io::BufRead;
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("lmig-kvd-admin-{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (listen, incoming) = (
            20_000 + (pid % 20_000) as u16,
            40_000 + (pid % 20_000) as u16,
        );
        let key = "5a".repeat(32);
        let kvd = |args: &[String]| {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_kvd"));
            c.args(args)
                .env("LMIG_KEY", &key)
                .stdout(std::process::Stdio::piped());
            let mut child = c.spawn().unwrap();
            // Up to its first event line (listening / waiting): the admin
            // socket exists by then.
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert!(line.contains("\"event\""), "{line}");
            // Keep draining its events so that it never blocks on stdout.
            std::thread::spawn(move || for _ in out.lines().map_while(Result::ok) {});
            child
        };
        let s = |v: &str| v.to_string();
        let source = kvd(&[
            s("--listen"),
            format!("127.0.0.1:{listen}"),
            s("--mib"),
            s("64"),
            s("--admin"),
            dir.join("a.sock").display().to_string(),
        ]);
        let destination = kvd(&[
            s("--incoming"),
            format!("127.0.0.1:{incoming}"),
            s("--admin"),
            dir.join("b.sock").display().to_string(),
        ]);
        Self {
            dir,
            incoming,
            source,
            destination,
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        for c in [&mut self.source, &mut self.destination] {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An admin connection that sent one command.
struct Conn {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    _stream: std::os::unix::net::UnixStream,
}

impl Conn {
    fn open(path: &std::path::Path, line: &str) -> Self {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A hang is a failure, not a stuck test.
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        writeln!(s, "{line}").unwrap();
        Self {
            reader: std::io::BufReader::new(s.try_clone().unwrap()),
            _stream: s,
        }
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("an answer");
        l.trim().to_string()
    }

    /// The last line (`migrate` streams progress lines first).
    fn last_line(&mut self) -> String {
        // Bounded: a migration of 64 MiB writes a few progress lines.
        for _ in 0..10_000 {
            let l = self.line();
            if !l.starts_with("{\"progress\"") && !l.starts_with("{\"resumed_ns\"") {
                return l;
            }
        }
        panic!("no answer after 10,000 progress lines");
    }
}

/// One command, its one-line answer.
fn ask(path: &std::path::Path, line: &str) -> String {
    Conn::open(path, line).line()
}

/// `status` until `ok` says so (bounded: 60 s).
fn wait_status(path: &std::path::Path, ok: impl Fn(&str) -> bool) -> String {
    for _ in 0..6000 {
        let s = ask(path, "status");
        if ok(&s) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("status never said so");
}

/// The source's memory, with one page held back until the test opens the
/// gate: the slow source.
struct Gated {
    set: lmig_mem::RegionSet,
    page: u64,
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl lmig_core::MemorySource for Gated {
    fn layout(&self) -> lmig_core::model::RegionLayout {
        lmig_core::MemorySource::layout(&self.set)
    }
    fn read_pages(&self, run: &lmig_core::model::PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        if (run.first..run.end()).contains(&self.page) {
            let open = self.open.lock().unwrap();
            // Bounded: the test opens the gate, or fails after a minute.
            let (open, _) = self
                .opened
                .wait_timeout_while(open, Duration::from_secs(60), |o| !*o)
                .unwrap();
            assert!(*open, "the gate was never opened");
        }
        self.set.read_pages(run, dst)
    }
}

fn send_get(s: &mut std::net::TcpStream, key: &str) {
    use std::io::Write;
    let req = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    s.write_all(req.as_bytes()).unwrap();
}

/// Read one bulk reply (bounded by the socket's read timeout).
fn read_bulk(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !(got.ends_with(b"\r\n") && got.iter().filter(|&&c| c == b'\n').count() >= 2) {
        let n = s.read(&mut b).expect("a reply before the read timeout");
        assert!(n > 0, "closed");
        got.extend_from_slice(&b[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[test]
fn postcopy_parks_a_missing_key_and_serves_the_others() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use lmig_core::model::RegionId;
    use lmig_core::session::{Destination, Mode, Source, SourceConfig};
    use lmig_core::testing::{NullProgram, channel_pair};
    use lmig_examples::kvd::server::{Server, Wake};
    use lmig_examples::kvd::store::Store;
    use lmig_mem::{Backing, DestinationRegions, ManualTracker, RegionOptions, RegionSet};

    const R: RegionId = RegionId(1);
    let region = RegionOptions::new(R, 1 << 20).map().unwrap();
    let store = Store::format(&region);
    let page = |k: &str| store.home_offset(k.as_bytes()) as u64 / 4096;
    // Two keys whose pages (home and next) are apart and off the header.
    let cold = (0..1000)
        .map(|i| format!("cold{i}"))
        .find(|k| page(k) > 1)
        .unwrap();
    let warm = (0..1000)
        .map(|i| format!("warm{i}"))
        .find(|k| page(k) > 1 && page(k).abs_diff(page(&cold)) > 2)
        .unwrap();
    store.set(cold.as_bytes(), b"frozen").unwrap();
    store.set(warm.as_bytes(), b"here").unwrap();
    let gated = Gated {
        page: page(&cold),
        set: RegionSet::new([region]).unwrap(),
        open: std::sync::Mutex::new(false),
        opened: std::sync::Condvar::new(),
    };
    let layout = lmig_core::MemorySource::layout(&gated);
    let (a, b) = channel_pair(2);
    let dst = Arc::new(DestinationRegions::new(Backing::Private).prefault(false));

    std::thread::scope(|s| {
        let source = std::thread::Builder::new()
            .name("kvd-test-source".into())
            .spawn_scoped(s, || {
                let config = SourceConfig::default().with_mode(Mode::Postcopy);
                Source::new(
                    &a,
                    &gated,
                    ManualTracker::new(&layout),
                    NullProgram::default(),
                )
                .with_config(config)
                .run()
            })
            .unwrap();
        let resumed = match Destination::new(b, dst.clone(), NullProgram::default()).start() {
            Ok(r) => r,
            Err(e) if lmig_core::testing::privileged("kvd post-copy parking", &e.to_string()) => {
                panic!("post-copy unavailable: {e}")
            }
            Err(e) => {
                eprintln!("skipped: {e}");
                *gated.open.lock().unwrap() = true;
                gated.opened.notify_all();
                let _ = source.join();
                return;
            }
        };
        let residency = resumed
            .residency
            .clone()
            .expect("post-copy: a residency handle");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = Server::new(listener, Vec::new()).unwrap();
        server.set_residency(residency, R).unwrap();
        // Ends the loop whatever happens below (else the scope waits for it).
        struct Stop(lmig_examples::kvd::server::Control);
        impl Drop for Stop {
            fn drop(&mut self) {
                if self.0.park().is_ok() {
                    self.0.wake(Wake::Exit);
                }
            }
        }
        let stop = Stop(server.control());
        let dst = &*dst;
        let loop_thread = s.spawn(move || {
            // Reading the header faults until page 0 is here (the loop
            // itself parks only requests).
            let store = Store::open(dst.regions().unwrap().get(R).unwrap()).unwrap();
            server.run(&store)
        });

        struct Open<'g>(&'g Gated);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                *self.0.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
                self.0.opened.notify_all();
            }
        }
        let _open_on_failure = Open(&gated);
        let connect = || {
            let c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            c
        };
        let (mut a_client, mut b_client) = (connect(), connect());
        send_get(&mut b_client, &warm);
        assert_eq!(read_bulk(&mut b_client), "$4\r\nhere\r\n");
        // A asks for the key the slow source holds back: parked.
        // (B's first request may have parked too, until its page came.)
        let counters = stop.0.counters.clone();
        let before = counters.parked.load(Ordering::Acquire);
        send_get(&mut a_client, &cold);
        for _ in 0..60_000 {
            if counters.parked.load(Ordering::Acquire) > before {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let parked = counters.parked.load(Ordering::Acquire);
        assert_eq!(parked, before + 1, "A's request parked");
        // B is served meanwhile, twice: the loop is not blocked.
        for _ in 0..2 {
            send_get(&mut b_client, &warm);
            assert_eq!(read_bulk(&mut b_client), "$4\r\nhere\r\n");
        }
        a_client.set_nonblocking(true).unwrap();
        let mut none = [0u8; 16];
        let early = std::io::Read::read(&mut a_client, &mut none);
        assert_eq!(
            early.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "A cannot be answered before its page came"
        );
        a_client.set_nonblocking(false).unwrap();
        *gated.open.lock().unwrap() = true;
        gated.opened.notify_all();
        assert_eq!(
            read_bulk(&mut a_client),
            "$6\r\nfrozen\r\n",
            "A served once it came"
        );
        assert_eq!(
            counters.parked.load(Ordering::Acquire),
            parked,
            "B's warm requests never parked"
        );
        let report = resumed.after_commit.join().unwrap();
        assert_eq!(
            report.verification,
            lmig_core::protocol::Verification::Verified
        );
        source.join().unwrap().unwrap();
        drop(stop);
        loop_thread.join().unwrap().unwrap();
    });
}

/// More pipelined input than one pass reads (64 reads of 16 KiB) waiting in
/// the socket before kvd accepts it: readiness is edge-triggered, so no new
/// event reports the rest, and every request must still be answered (the
/// connection is served again after the next poll).
#[test]
fn pipelined_input_beyond_one_pass_is_all_served() {
    use std::io::{Read, Write};

    use lmig_core::model::RegionId;
    use lmig_examples::kvd::server::{Server, Wake};
    use lmig_examples::kvd::store::Store;
    use lmig_mem::RegionOptions;
    use nix::sys::socket::{setsockopt, sockopt};

    const REQUEST: &[u8] = b"*2\r\n$3\r\nGET\r\n$4\r\nnone\r\n";
    const REPLY: &[u8] = b"$-1\r\n";
    const COUNT: usize = (4 << 20) / REQUEST.len();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // A receive buffer that holds all of it before kvd reads (inherited by
    // the accepted socket); above rmem_max, so CAP_NET_ADMIN.
    if setsockopt(&listener, sockopt::RcvBufForce, &(16 << 20)).is_err() {
        assert!(!privileged(), "SO_RCVBUFFORCE refused to root");
        return;
    }
    let addr = listener.local_addr().unwrap();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    client
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let input = REQUEST.repeat(COUNT);
    client
        .write_all(&input)
        .expect("the whole input fits the receive buffer");

    let region = RegionOptions::new(RegionId(1), 1 << 20).map().unwrap();
    let store = Store::format(&region);
    let mut server = Server::new(listener, Vec::new()).unwrap();
    let control = server.control();
    let answered = std::thread::scope(|s| {
        let loop_ = s.spawn(|| server.run(&store));
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (mut got, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
        while got.len() < COUNT * REPLY.len() {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        control.park().unwrap();
        control.wake(Wake::Exit);
        loop_.join().unwrap().unwrap();
        got
    });
    assert_eq!(
        answered.len(),
        COUNT * REPLY.len(),
        "every request answered"
    );
    assert!(answered.chunks(REPLY.len()).all(|r| r == REPLY));
}
