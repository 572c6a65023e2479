//! Post-copy with real userfaultfd: the sink alone (every backing, faults
//! taken in user and kernel mode, bad input), then whole sessions over real
//! TCP (lmig-transport) where the destination program touches its pages as
//! soon as it resumes — pure post-copy, hybrid, and recovery after the TCP
//! connections are cut at several points.
//!
//! Tests need userfaultfd with kernel-mode faults (root here); they fail
//! loudly without it, and `LMIG_SKIP_PRIVILEGED=1` turns that, without root, into a
//! visible skip. No timing is asserted; every loop is bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lmig_core::model::{PageRun, RegionId, RegionPages};
use lmig_core::policy::{Decision, Policy, RoundStats};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, DestinationConfig, Mode, Source, SourceConfig};
use lmig_core::testing::NullProgram;
use lmig_core::{MemorySink, MemorySource, StateSink};
use lmig_mem::{
    Backing, DestinationRegions, ManualTracker, MemError, PostcopyOptions, RegionOptions, RegionSet,
};
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, StreamChannel, connect};

const PS: usize = 4096;

/// Fail loudly when userfaultfd post-copy is unavailable; without root and
/// with `LMIG_SKIP_PRIVILEGED=1`, a visible skip instead.
fn privileged(what: &str, e: &dyn std::fmt::Display) -> bool {
    // Skips only without root (the shared rule); as root this is a failure.
    if !lmig_core::testing::privileged(what, &e.to_string()) {
        return false;
    }
    panic!("{what}: userfaultfd post-copy unavailable: {e}");
}

fn page_pattern(region: RegionId, page: u64) -> Vec<u8> {
    let mut v = vec![0u8; PS];
    if page % 7 == 3 {
        return v; // some zero pages
    }
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u64 ^ page.wrapping_mul(2654435761) ^ (u64::from(region.0) * 977)) as u8;
    }
    v[..8].copy_from_slice(&page.to_le_bytes());
    v
}

fn source_set(backing: Backing, pages: &[(RegionId, u64)]) -> RegionSet {
    let set = RegionSet::new(pages.iter().map(|&(id, n)| {
        RegionOptions::new(id, n * PS as u64)
            .backing(backing)
            .map()
            .unwrap()
    }))
    .unwrap();
    for &(id, n) in pages {
        let r = set.get(id).unwrap();
        for p in 0..n {
            r.write_at(p as usize * PS, &page_pattern(id, p)).unwrap();
        }
    }
    set
}

fn read_page(set: &RegionSet, id: RegionId, page: u64) -> Vec<u8> {
    let mut v = vec![0u8; PS];
    set.get(id)
        .unwrap()
        .read_at(page as usize * PS, &mut v)
        .unwrap();
    v
}

/// After a failure, release the program's threads blocked on missing pages
/// so that the test can report: every page gets a poison pattern (never
/// zeros), which the touchers count as wrong.
fn release_with_poison(set: &RegionSet, id: RegionId) {
    let poison = vec![0xEEu8; PS];
    for p in 0..set.get(id).unwrap().pages() {
        let _ = set.write_run(&PageRun::new(id, p, 1), &poison);
    }
}

/// The sink alone: stale content dropped, faults reported, pages placed with
/// the right content, threads blocked in user mode and in a `read()` system
/// call both released; for every backing.
#[test]
fn sink_serves_faults_for_every_backing() {
    for backing in [Backing::Private, Backing::SharedAnonymous, Backing::Memfd] {
        let regions = [(RegionId(1), 64u64), (RegionId(2), 16u64)];
        let src = source_set(backing, &regions);
        let dst = DestinationRegions::new(backing);
        dst.prepare(&MemorySource::layout(&src)).unwrap();
        // Pre-copy placed stale content everywhere.
        for &(id, n) in &regions {
            for p in 0..n {
                dst.write_pages(&PageRun::new(id, p, 1), &[0xEE; PS])
                    .unwrap();
            }
        }
        let layout = MemorySource::layout(&src);
        let mut missing = RegionPages::empty(&layout);
        for p in (0..64).filter(|p| p % 3 != 0) {
            missing.get_mut(RegionId(1)).unwrap().insert(p);
        }
        missing.get_mut(RegionId(2)).unwrap().insert_range(0, 16);
        // Pages not missing got their final content in pre-copy.
        for p in (0..64).filter(|p| p % 3 == 0) {
            dst.write_pages(
                &PageRun::new(RegionId(1), p, 1),
                &page_pattern(RegionId(1), p),
            )
            .unwrap();
        }
        if let Err(e) = dst.begin_postcopy(&missing) {
            if !privileged("sink_serves_faults_for_every_backing", &e) {
                return;
            }
        }
        let stats = dst.postcopy_stats();
        assert_eq!(stats.minor_faults, backing == Backing::Memfd, "{backing:?}");
        // Ending early is refused: the program would read zeros.
        assert!(dst.end_postcopy().is_err());

        let stop = AtomicBool::new(false);
        let placed = Mutex::new(missing.clone());
        std::thread::scope(|s| {
            // The "session": answers faults first, pushes the rest slowly.
            let handler = s.spawn(|| {
                let place = |run: PageRun| {
                    let mut m = placed.lock().unwrap();
                    if !m.get(run.region).unwrap().contains(run.first) {
                        return;
                    }
                    let data = page_pattern(run.region, run.first);
                    if data.iter().all(|&b| b == 0) {
                        dst.zero_pages(&run).unwrap();
                    } else {
                        dst.write_pages(&run, &data).unwrap();
                    }
                    m.get_mut(run.region).unwrap().remove(run.first);
                };
                let mut rounds = 0;
                while !stop.load(Ordering::Acquire) {
                    rounds += 1;
                    assert!(rounds < 100_000, "handler loop bound");
                    match dst.wait_fault(Duration::from_millis(2)).unwrap() {
                        Some(run) => place(run),
                        None => {
                            let next = placed.lock().unwrap().chunked_runs(1).next();
                            match next {
                                Some(run) => place(run),
                                None => break,
                            }
                        }
                    }
                }
            });
            // The "program": touches missing pages in user mode, and lets
            // the kernel write one in a read() system call.
            let set = dst.regions().unwrap();
            let (r, w) = std::io::pipe().unwrap();
            (&w).write_all(b"kernel-mode fault").unwrap();
            let region2 = set.get(RegionId(2)).unwrap();
            // SAFETY: 17 bytes into page 5 of a live, writable region; no
            // Rust reference covers region memory.
            let n = unsafe { libc::read(r.as_raw_fd(), region2.as_ptr().add(5 * PS).cast(), 17) };
            assert_eq!(n, 17, "read() into a missing page ({backing:?})");
            for p in [40u64, 1, 63, 2, 17] {
                assert_eq!(
                    read_page(set, RegionId(1), p),
                    page_pattern(RegionId(1), p),
                    "page {p} ({backing:?})"
                );
            }
            handler.join().unwrap();
            stop.store(true, Ordering::Release);
        });
        let set = dst.regions().unwrap();
        for &(id, n) in &regions {
            for p in 0..n {
                let mut want = page_pattern(id, p);
                if id == RegionId(2) && p == 5 {
                    want[..17].copy_from_slice(b"kernel-mode fault");
                }
                assert_eq!(read_page(set, id, p), want, "{id} page {p} ({backing:?})");
            }
        }
        dst.end_postcopy().unwrap();
        let stats = dst.postcopy_stats();
        assert_eq!(stats.placed, 64 - 22 + 16, "{backing:?}: {stats:?}");
        assert!(stats.requested >= 1, "{backing:?}: {stats:?}");
    }
}

/// Bad input to the sink: a run outside a region or of the wrong length is
/// refused before anything is placed; a page written twice is filled once
/// (the second write is a plain write of a present page).
#[test]
fn sink_refuses_bad_runs_and_never_fills_twice() {
    let src = source_set(Backing::Private, &[(RegionId(1), 8)]);
    let dst = DestinationRegions::new(Backing::Private);
    dst.prepare(&MemorySource::layout(&src)).unwrap();
    let layout = MemorySource::layout(&src);
    let missing = RegionPages::full(&layout);
    if let Err(e) = dst.begin_postcopy(&missing) {
        if !privileged("sink_refuses_bad_runs_and_never_fills_twice", &e) {
            return;
        }
    }
    assert!(
        dst.write_pages(&PageRun::new(RegionId(1), 8, 1), &[1; PS])
            .is_err()
    );
    assert!(
        dst.write_pages(&PageRun::new(RegionId(1), 7, 2), &[1; 2 * PS])
            .is_err()
    );
    assert!(
        dst.write_pages(&PageRun::new(RegionId(9), 0, 1), &[1; PS])
            .is_err()
    );
    assert!(
        dst.write_pages(&PageRun::new(RegionId(1), 0, 1), &[1; 2 * PS])
            .is_err()
    );
    assert!(dst.zero_pages(&PageRun::new(RegionId(1), 0, 0)).is_err());
    for p in 0..8 {
        dst.write_pages(
            &PageRun::new(RegionId(1), p, 1),
            &page_pattern(RegionId(1), p),
        )
        .unwrap();
    }
    dst.write_pages(&PageRun::new(RegionId(1), 2, 1), &[7; PS])
        .unwrap();
    let stats = dst.postcopy_stats();
    assert_eq!(stats.placed, 8, "{stats:?}");
    assert_eq!(
        read_page(dst.regions().unwrap(), RegionId(1), 2),
        vec![7; PS]
    );
    // Nothing faulted: wait_fault returns after its timeout.
    assert_eq!(dst.wait_fault(Duration::from_millis(5)).unwrap(), None);
    dst.end_postcopy().unwrap();
    assert!(matches!(
        RegionSet::new([RegionOptions::new(RegionId(1), PS as u64).map().unwrap()])
            .unwrap()
            .end_postcopy(),
        Ok(())
    ));
    let _ = MemError::PostcopyIncomplete { missing: 1 };
}

// ---------------------------------------------------------------------------
// Whole sessions over real TCP.

/// A TCP proxy between the two sides that can cut every connection at once
/// (both directions shut down) and refuse connections for a while (the
/// channel "killed and restarted").
struct Proxy {
    addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    refuse: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    cuts: AtomicUsize,
}

impl Proxy {
    fn new(target: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let refuse = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, st) = (conns.clone(), refuse.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                let (down, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                };
                if r.load(Ordering::Acquire) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                down.set_nonblocking(false).unwrap();
                let Ok(up) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = up.set_nodelay(true);
                let _ = down.set_nodelay(true);
                let mut list = c.lock().unwrap();
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                list.push(down);
                list.push(up);
            }
        });
        Self {
            addr,
            conns,
            refuse,
            stop,
            cuts: AtomicUsize::new(0),
        }
    }

    /// Cut every connection now.
    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.cuts.fetch_add(1, Ordering::Relaxed);
    }

    /// Cut, and refuse new connections for `down`.
    fn kill_for(&self, down: Duration) {
        self.refuse.store(true, Ordering::Release);
        self.cut();
        std::thread::sleep(down);
        self.refuse.store(false, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cut();
    }
}

fn config(limit: Option<u64>) -> ChannelConfig {
    let key = AuthKey::new(b"post-copy test key, 32 bytes...!").unwrap();
    let mut c = ChannelConfig::new(key).with_data_streams(2);
    c.reconnect_timeout = Duration::from_secs(20);
    c.handshake_timeout = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(5);
    c.write_timeout = Some(Duration::from_secs(20));
    if let Some(l) = limit {
        c = c.with_bandwidth_limit(l);
    }
    c
}

/// The destination program: a thread that touches every page (in
/// `order`) as soon as `resume` is called and checks its content.
struct Toucher {
    go: Arc<AtomicBool>,
}

impl StateSink for Toucher {
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.go.store(true, Ordering::Release);
        Ok(())
    }
}

/// Switch to post-copy after `rounds` pre-copy rounds.
struct SwitchAfter(u32);

impl Policy for SwitchAfter {
    fn decide(&mut self, stats: &RoundStats, _: bool) -> Decision {
        if stats.round + 1 >= self.0 {
            Decision::Postcopy
        } else {
            Decision::Continue
        }
    }
    fn estimate(&self) -> lmig_core::policy::Estimate {
        lmig_core::policy::Estimate::default()
    }
}

struct Outcome {
    source: lmig_core::session::SourceReport,
    dest: lmig_core::session::DestinationReport,
    placed: u64,
    bad_touches: u64,
    cuts: usize,
    /// Fault waits a reply ended (the destination's one fault-path thread).
    also_woke: u64,
}

/// A (chunked) list of touch orders.
fn touch_order(pages: u64, random: bool) -> Vec<u64> {
    let mut v: Vec<u64> = (0..pages).collect();
    if random {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    v
}

/// Migrate `pages` pages of one private region, `mode`, over TCP through a
/// proxy; `disrupt` runs on its own thread with the proxy and the
/// destination sink (it may cut the link).
fn migrate(
    what: &str,
    pages: u64,
    mode: Mode,
    random: bool,
    limit: Option<u64>,
    disrupt: impl Fn(&Proxy, &DestinationRegions, &AtomicBool, &AtomicBool) + Send + Sync,
) -> Option<Outcome> {
    migrate_with(
        what,
        pages,
        mode,
        random,
        limit,
        &Tune::source(&|c| c),
        disrupt,
    )
}

/// What a test changes in [`migrate_with`]: the source's config (e.g. the
/// post-copy push held off), the destination's fault path in one thread or
/// two (`DestinationConfig::one_fault_thread`).
struct Tune<'a> {
    source: &'a (dyn Fn(SourceConfig) -> SourceConfig + Sync),
    /// `None`: the library's choice (one thread when the sink spins).
    one_fault_thread: Option<bool>,
}

impl<'a> Tune<'a> {
    /// The source's config changed by `source`, the destination's default.
    fn source(source: &'a (dyn Fn(SourceConfig) -> SourceConfig + Sync)) -> Self {
        Self {
            source,
            one_fault_thread: None,
        }
    }
}

/// [`migrate`] with the configs changed by `tune`.
fn migrate_with(
    what: &str,
    pages: u64,
    mode: Mode,
    random: bool,
    limit: Option<u64>,
    tune: &Tune<'_>,
    disrupt: impl Fn(&Proxy, &DestinationRegions, &AtomicBool, &AtomicBool) + Send + Sync,
) -> Option<Outcome> {
    const R: RegionId = RegionId(3);
    let src = source_set(Backing::Private, &[(R, pages)]);
    let layout = MemorySource::layout(&src);
    let tracker = ManualTracker::new(&layout);
    let marker = tracker.marker();
    let dst = Arc::new(
        DestinationRegions::new(Backing::Private)
            .prefault(mode != Mode::Postcopy)
            .postcopy_options(PostcopyOptions::default()),
    );
    let listener = Listener::bind(
        &Endpoint::Tcp("127.0.0.1:0".parse().unwrap()),
        config(limit),
    )
    .unwrap();
    let Endpoint::Tcp(target) = listener.local_endpoint().clone() else {
        unreachable!()
    };
    let proxy = Proxy::new(target);
    let go = Arc::new(AtomicBool::new(false));
    let finished = AtomicBool::new(false);
    let bad_touches = AtomicU64::new(0);
    let writer_stop = AtomicBool::new(false);
    let proxy_addr = proxy.addr;
    let out = std::thread::scope(|s| {
        let source = s.spawn(|| {
            let channel: StreamChannel =
                connect(&Endpoint::Tcp(proxy_addr), config(limit)).unwrap();
            let cfg = (tune.source)(
                SourceConfig::default()
                    .with_mode(mode)
                    .with_verify(true)
                    .with_ready_timeout(Duration::from_secs(30))
                    .with_done_timeout(Duration::from_secs(30)),
            );
            let program = Pauser {
                stop: &writer_stop,
                inner: NullProgram::default(),
            };
            let r = Source::new(&channel, &src, tracker, program)
                .with_policy(SwitchAfter(2))
                .with_config(cfg)
                .run();
            lmig_core::Channel::shutdown(&channel);
            r
        });
        // Hybrid: a writer dirties pages during pre-copy (same content
        // rewritten, marked), so some pages stay dirty for post-copy.
        if mode == Mode::Hybrid {
            let src = &src;
            let marker = &marker;
            let writer_stop = &writer_stop;
            s.spawn(move || {
                let mut i = 0u64;
                let mut n = 0u64;
                while !writer_stop.load(Ordering::Acquire) && n < 2_000_000 {
                    let p = (i * 7919) % (pages / 4);
                    src.get(R)
                        .unwrap()
                        .write_at(p as usize * PS, &page_pattern(R, p))
                        .unwrap();
                    marker.mark(R, p).unwrap();
                    i += 1;
                    n += 1;
                    if n.is_multiple_of(64) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            });
        }
        let dest = s.spawn(|| {
            let config = DestinationConfig::default().with_idle_timeout(Duration::from_secs(30));
            let channel = listener.accept_timeout(Duration::from_secs(20)).unwrap();
            let r = Destination::new(&channel, dst.clone(), Toucher { go: go.clone() })
                .with_config(match tune.one_fault_thread {
                    Some(one) => config.with_one_fault_thread(one),
                    None => config,
                })
                .run();
            finished.store(true, Ordering::Release);
            (r, channel)
        });
        // The program: touches every page as soon as it resumes.
        let toucher = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !go.load(Ordering::Acquire) {
                assert!(Instant::now() < deadline, "{what}: never resumed");
                if finished.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            let set = dst.regions().unwrap();
            for p in touch_order(pages, random) {
                if read_page(set, R, p) != page_pattern(R, p) {
                    bad_touches.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        disrupt(&proxy, &dst, &finished, &go);
        // Bounded: a destination that failed for good leaves the program
        // blocked on missing pages; release it so the test reports instead
        // of hanging.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !toucher.is_finished() {
            if (dest.is_finished() && !go.load(Ordering::Acquire)) || Instant::now() > deadline {
                break;
            }
            // With every page here the toucher cannot block, only be slow
            // (a loaded machine): wait for it. With pages still missing
            // after the destination ended, give it 200 ms, then poison.
            if dest.is_finished() && dst.postcopy_stats().missing > 0 {
                std::thread::sleep(Duration::from_millis(200));
                if !toucher.is_finished() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if !toucher.is_finished() {
            if let Some(r) = dst.regions() {
                release_with_poison(r, R);
            }
        }
        toucher.join().unwrap();
        let (dr, channel) = dest.join().unwrap();
        let sr = source.join().unwrap();
        drop(channel);
        (sr, dr)
    });
    let (sr, dr) = out;
    let dest = match dr {
        Ok(d) => d,
        Err(e) => {
            let e = e.to_string();
            if !lmig_core::testing::privileged(what, "kernel-mode userfaultfd") {
                return None;
            }
            panic!("{what}: destination failed: {e}");
        }
    };
    let source = sr.unwrap_or_else(|e| panic!("{what}: source failed: {e}"));
    let stats = dst.postcopy_stats();
    // Every page's final content, read after the migration.
    let set = dst.regions().unwrap();
    for p in 0..pages {
        assert_eq!(read_page(set, R, p), page_pattern(R, p), "{what}: page {p}");
    }
    Some(Outcome {
        source,
        dest,
        placed: stats.placed,
        also_woke: stats.also_woke,
        bad_touches: bad_touches.load(Ordering::Relaxed),
        cuts: proxy.cuts.load(Ordering::Relaxed),
    })
}

/// The source program: pausing stops the hybrid writer.
struct Pauser<'a> {
    stop: &'a AtomicBool,
    inner: NullProgram,
}

impl lmig_core::StateSource for Pauser<'_> {
    fn pause(&mut self) -> lmig_core::Result<()> {
        self.stop.store(true, Ordering::Release);
        self.inner.pause()
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        lmig_core::StateSource::resume(&mut self.inner)
    }
}

fn check(what: &str, o: &Outcome, pages: u64) {
    assert_eq!(o.dest.verification, Verification::Verified, "{what}");
    assert_eq!(o.source.verification, Verification::Verified, "{what}");
    assert_eq!(o.bad_touches, 0, "{what}: the program saw wrong content");
    // Each missing page placed exactly once, by the sink's own count.
    assert_eq!(o.placed, o.dest.postcopy_pages, "{what}");
    let _ = pages;
}

/// How often [`raced`] runs a migration at most.
const RACE_ATTEMPTS: usize = 5;

/// `run` (a post-copy whose program touches every page as soon as it
/// resumes) again until the program asked for at least one page by a
/// fault, at most [`RACE_ATTEMPTS`] times: on a loaded machine the push can
/// place every page before the program's thread gets a CPU, and such a run
/// raced nothing. Every attempt's content is checked; the last attempt is
/// returned, so the caller's `network_faults >= 1` still fails when no
/// attempt raced.
fn raced(what: &str, run: impl Fn() -> Option<Outcome>) -> Option<Outcome> {
    let mut attempt = 1;
    loop {
        let o = run()?;
        if o.dest.network_faults >= 1 || attempt == RACE_ATTEMPTS {
            return Some(o);
        }
        check(what, &o, 0);
        eprintln!(
            "{what}: attempt {attempt}: every page pushed before the program touched one; again"
        );
        attempt += 1;
    }
}

/// [`check`], and every page sent once and placed once, with at least one
/// asked for by a fault.
fn check_each_page_once(what: &str, o: &Outcome, pages: u64) {
    check(what, o, pages);
    assert_eq!(o.dest.postcopy_pages, pages, "{what}");
    assert_eq!(o.dest.duplicate_pages, 0, "{what}");
    assert_eq!(
        o.source.postcopy_pages, pages,
        "{what}: every page sent once"
    );
    assert!(o.dest.network_faults >= 1, "{what}: asked for meanwhile");
}

#[test]
fn postcopy_over_tcp_program_touches_pages_at_once() {
    for random in [false, true] {
        let what = format!("postcopy random={random}");
        let Some(o) = raced(&what, || {
            migrate(&what, 4096, Mode::Postcopy, random, None, |_, _, _, _| {})
        }) else {
            return;
        };
        check_each_page_once(&what, &o, 4096);
    }
}

/// The fault path held together with no CPU number
/// ([`lmig_mem::FaultPathAffinity::Together`], process-wide while this test
/// runs; the other tests of this file only run the same threads held): every
/// page arrives once and right, the program's faults answered.
#[test]
fn postcopy_with_the_fault_path_together_places_every_page_once() {
    use lmig_mem::{FaultPathAffinity, set_fault_path_affinity};
    let what = "postcopy, fault path together";
    set_fault_path_affinity(FaultPathAffinity::Together).unwrap();
    let o = raced(what, || {
        migrate(what, 4096, Mode::Postcopy, true, None, |_, _, _, _| {})
    });
    set_fault_path_affinity(FaultPathAffinity::Free).unwrap();
    let Some(o) = o else {
        return;
    };
    check_each_page_once(what, &o, 4096);
}

/// The push held off after the resume: the program's requests are
/// answered meanwhile, the push starts after (at most the hold-off later),
/// and every page arrives once and right, read in order (close behind the
/// push once it starts) or at random.
#[test]
fn postcopy_with_the_push_held_off_places_every_page_once() {
    for random in [true, false] {
        let what = format!("postcopy hold-off random={random}");
        let holdoff = Duration::from_millis(300);
        let Some(o) = raced(&what, || {
            migrate_with(
                &what,
                4096,
                Mode::Postcopy,
                random,
                None,
                &Tune::source(&|c| c.with_push_holdoff(holdoff)),
                |_, _, _, _| {},
            )
        }) else {
            return;
        };
        check_each_page_once(&what, &o, 4096);
    }
}

/// The push runs in the lowest class, and requests do not wait for its queue (resent
/// pages allowed): the program reads every page right, each page is placed
/// once, and the session ends though the program faults all along.
#[test]
fn postcopy_with_an_idle_push_places_every_page_once() {
    for random in [true, false] {
        let what = format!("postcopy idle push random={random}");
        let Some(o) = raced(&what, || {
            migrate_with(
                &what,
                4096,
                Mode::Postcopy,
                random,
                None,
                &Tune::source(&|c| {
                    c.with_idle_push(true)
                        .with_idle_lanes(Some(lmig_mem::cpu::idle_thread))
                        .with_resend_in_flight(true)
                }),
                |_, _, _, _| {},
            )
        }) else {
            return;
        };
        check(&what, &o, 4096);
        assert_eq!(
            o.dest.postcopy_pages, 4096,
            "{what}: every page placed once"
        );
        assert!(
            o.source.postcopy_pages >= 4096,
            "{what}: every page sent at least once"
        );
        assert!(o.dest.network_faults >= 1, "{what}: asked for meanwhile");
    }
}

/// Hybrid: pre-copy rounds, then post-copy for the pages still dirty;
/// pages sent and clean are not sent again.
#[test]
fn hybrid_switches_and_never_resends_clean_pages() {
    let pages = 4096;
    let Some(o) = migrate(
        "hybrid",
        pages,
        Mode::Hybrid,
        false,
        Some(200 << 20),
        |_, _, _, _| {},
    ) else {
        return;
    };
    check("hybrid", &o, pages);
    assert!(o.source.switched_to_postcopy);
    let precopy: u64 = o.source.round_stats.iter().map(|r| r.pages_sent).sum();
    assert_eq!(o.source.round_stats[0].pages_sent, pages);
    // Only pages the writer touched go again, and post-copy sends exactly
    // the pages dirty at the freeze.
    assert!(
        o.source.postcopy_pages <= pages / 4,
        "{}",
        o.source.postcopy_pages
    );
    assert_eq!(o.source.pages_sent, precopy + o.source.postcopy_pages);
    assert_eq!(o.dest.postcopy_pages, o.source.postcopy_pages);
    assert_eq!(o.dest.duplicate_pages, 0);
}

/// Recovery: the TCP connections are cut (and the link refused for a while)
/// at several points of the post-copy transfer; the migration finishes,
/// verified, with no page lost and none placed twice. The destination's
/// fault path in one thread (`DestinationConfig::one_fault_thread`), and
/// once in two (the default).
#[test]
fn recovery_after_cuts_at_several_points() {
    let pages = 8192u64;
    for (what, at, refuse, one) in [
        ("cut at the start", 0u64, Duration::ZERO, true),
        ("cut at 30%", pages * 3 / 10, Duration::ZERO, true),
        (
            "killed for 300 ms at 60%",
            pages * 6 / 10,
            Duration::from_millis(300),
            true,
        ),
        ("two cuts at 20% and 80%", pages / 5, Duration::ZERO, true),
        (
            "cut at 30%, two fault-path threads",
            pages * 3 / 10,
            Duration::ZERO,
            false,
        ),
    ] {
        let two = what.starts_with("two");
        let tune = Tune {
            source: &|c| c,
            one_fault_thread: Some(one),
        };
        let Some(o) = migrate_with(
            what,
            pages,
            Mode::Postcopy,
            true,
            Some(48 << 20),
            &tune,
            |proxy, dst, finished, resumed| {
                let mut points = vec![at];
                if two {
                    points.push(pages * 4 / 5);
                }
                for point in points {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        if finished.load(Ordering::Acquire) || Instant::now() > deadline {
                            return;
                        }
                        let s = dst
                            .regions()
                            .map(|r| (r.in_postcopy(), r.postcopy_stats().placed));
                        if let Some((true, placed)) = s {
                            // After `Commit` only: a break before it aborts.
                            if resumed.load(Ordering::Acquire) && placed >= point {
                                break;
                            }
                        }
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    if refuse.is_zero() {
                        proxy.cut();
                    } else {
                        proxy.kill_for(refuse);
                    }
                }
            },
        ) else {
            return;
        };
        check(what, &o, pages);
        assert_eq!(o.dest.postcopy_pages, pages, "{what}");
        assert!(o.cuts >= 1, "{what}: the link was cut");
        if one {
            // A request's reply ends its thread's fault wait (unless
            // nothing faulted: the push was first everywhere).
            assert!(
                o.dest.network_faults == 0 || o.also_woke >= 1,
                "{what}: one thread waited for the replies"
            );
        } else {
            assert_eq!(o.also_woke, 0, "{what}: two threads");
        }
        assert!(
            o.dest.warnings.iter().any(|w| w.contains("reconnected")),
            "{what}: {:?}",
            o.dest.warnings
        );
        println!(
            "{what}: cuts {}, duplicates dropped {}, resent by source {}",
            o.cuts,
            o.dest.duplicate_pages,
            o.source.postcopy_pages as i64 - pages as i64
        );
    }
}

/// Bad input after `Commit`, from a scripted source: a page outside the
/// region, a page of the wrong length, a page not asked for, a duplicate,
/// and a page after `Done`. Each is dropped or placed once; the program's
/// fault is answered; the migration ends verified, without a hang.
#[test]
fn bad_page_replies_are_dropped_never_placed_twice() {
    use bytes::Bytes;
    use lmig_core::Channel;
    use lmig_core::protocol::{Handover, Message, PageBatch, PageData};
    use lmig_core::verify::PageHashes;

    const R: RegionId = RegionId(4);
    let pages = 64u64;
    let src = source_set(Backing::Private, &[(R, pages)]);
    let layout = MemorySource::layout(&src);
    let (source_ch, dest_ch) = lmig_transport::pair(config(None)).unwrap();
    let dst = Arc::new(DestinationRegions::new(Backing::Private).prefault(false));
    let go = Arc::new(AtomicBool::new(false));
    let page = |p: u64| Bytes::from(page_pattern(R, p));
    let batch = |run: PageRun, data: Bytes| {
        Message::Pages(PageBatch {
            round: u32::MAX,
            run,
            data: PageData::Raw(data),
        })
    };
    let recv = |want: &str| match source_ch.recv(Some(Duration::from_secs(20))).unwrap() {
        Some(m) => m,
        None => {
            let st = dst.postcopy_stats();
            panic!(
                "no {want} within 20 s; placed {} requested {} faults {}",
                st.placed, st.requested, st.faults
            )
        }
    };
    std::thread::scope(|s| {
        let dest =
            s.spawn(|| Destination::new(&dest_ch, dst.clone(), Toucher { go: go.clone() }).run());
        source_ch.send(&Message::Regions(layout.clone())).unwrap();
        // The freeze's socket batches end with one `last` per data lane
        // (none to move here). Sent on the control lane, behind `Regions`:
        // on a data lane one could overtake it (a real source sends them
        // only in the freeze, long after).
        for _ in 0..source_ch.data_lanes() {
            let end = Message::Sockets {
                records: Vec::new(),
                last: true,
            };
            source_ch.send(&end).unwrap();
        }
        source_ch
            .send(&Message::Handover(Handover {
                pages_total: 0,
                postcopy: vec![PageRun::new(R, 0, pages as u32)],
                verify: true,
            }))
            .unwrap();
        match recv("Ready") {
            Message::Ready => {}
            other => {
                let e = format!("{other:?}");
                if !lmig_core::testing::privileged("bad_page_replies", "kernel-mode userfaultfd") {
                    return;
                }
                panic!("expected Ready, got {e}");
            }
        }
        source_ch.send(&Message::Commit).unwrap();
        // The program touches page 10; its request must come.
        let toucher = s.spawn(|| {
            while !go.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            read_page(dst.regions().unwrap(), R, 10)
        });
        let asked = match recv("PageRequest") {
            Message::PageRequest(run) => run,
            other => panic!("expected PageRequest, got {other:?}"),
        };
        assert_eq!(asked, PageRun::new(R, 10, 1));
        // Outside the region, wrong length: dropped.
        source_ch
            .send_urgent(&batch(PageRun::new(R, pages, 1), page(0)))
            .unwrap();
        source_ch
            .send_urgent(&batch(PageRun::new(RegionId(99), 0, 1), page(0)))
            .unwrap();
        // (A page of the wrong length cannot even pass the transport's
        // decoder; the session drops it too, see `place_postcopy`.)
        // The answer, then the same page again (a duplicate).
        source_ch.send_urgent(&batch(asked, page(10))).unwrap();
        source_ch
            .send_urgent(&batch(asked, Bytes::from(vec![0xAB; PS])))
            .unwrap();
        // Bounded: if the destination failed, release the program.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !toucher.is_finished() {
            if dest.is_finished() || Instant::now() > deadline {
                release_with_poison(dst.regions().unwrap(), R);
                let r = dest.join().unwrap();
                panic!("the fault was not answered; destination: {r:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(toucher.join().unwrap(), page_pattern(R, 10));
        // Pages not asked for (a push): placed once each.
        for p in (0..pages).filter(|&p| p != 10) {
            let Message::Pages(b) = batch(PageRun::new(R, p, 1), page(p)) else {
                unreachable!()
            };
            source_ch.send_pages(p as usize, &b).unwrap();
        }
        source_ch.flush().unwrap();
        let hashes = PageHashes::of_memory(&src, &layout).unwrap();
        source_ch.send(&Message::Digests(hashes.digests())).unwrap();
        match recv("Done") {
            Message::Done(v) => assert_eq!(v, Verification::Verified),
            other => panic!("expected Done, got {other:?}"),
        }
        // After `Done`: nobody places it (the destination finished).
        let _ = source_ch.send_urgent(&batch(PageRun::new(R, 3, 1), Bytes::from(vec![1; PS])));
        let report = dest.join().unwrap().unwrap();
        assert_eq!(report.postcopy_pages, pages);
        assert!(report.duplicate_pages >= 1, "{report:?}");
        assert_eq!(report.network_faults, 1);
        let bad = report
            .warnings
            .iter()
            .filter(|w| w.contains("bad page batch"))
            .count();
        assert_eq!(bad, 2, "{:?}", report.warnings);
    });
    assert_eq!(dst.postcopy_stats().placed, pages);
    for p in 0..pages {
        assert_eq!(
            read_page(dst.regions().unwrap(), R, p),
            page_pattern(R, p),
            "page {p}"
        );
    }
}
