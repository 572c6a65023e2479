//! Post-copy when the source is lost after `Commit`, with real userfaultfd
//! and real TCP (lmig-transport through a proxy in this process): the link
//! is cut and refused at several points of the transfer while the
//! destination program reads every page from four threads.
//!
//! Each read is either right, or its thread stays blocked until a source
//! comes back: never a zero page, never a stale one. Lost for good, the
//! destination reports `PostcopyPaused` with the count of pages still
//! missing (which stay missing: `end_postcopy` refuses, the blocked threads
//! stay blocked); a source that comes back finishes the migration, verified,
//! with every page placed once.
//!
//! Needs root (userfaultfd with kernel-mode faults); without it, a visible
//! skip with `LMIG_SKIP_PRIVILEGED=1`. No timing is asserted; every loop is
//! bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, DestinationConfig, Mode, Source, SourceConfig};
use lmig_core::testing::NullProgram;
use lmig_core::{Event, MemorySource, MigrationError, StateSink};
use lmig_mem::{
    Backing, DestinationRegions, ManualTracker, PostcopyOptions, RegionOptions, RegionSet,
};
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, StreamChannel, connect};

const PS: usize = 4096;
const R: RegionId = RegionId(5);
const PAGES: u64 = 4096;
const READERS: u64 = 4;

fn page_pattern(page: u64) -> Vec<u8> {
    let mut v = vec![0u8; PS];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u64 ^ page.wrapping_mul(2654435761)) as u8 | 1;
    }
    v[..8].copy_from_slice(&page.to_le_bytes());
    v
}

fn source_set() -> RegionSet {
    let r = RegionOptions::new(R, PAGES * PS as u64).map().unwrap();
    for p in 0..PAGES {
        r.write_at(p as usize * PS, &page_pattern(p)).unwrap();
    }
    RegionSet::new([r]).unwrap()
}

/// Forwards TCP connections; `lose` cuts them all and refuses new ones
/// until `heal`.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    refuse: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn new(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let refuse = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, r, st) = (conns.clone(), refuse.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                if r.load(Ordering::Acquire) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                down.set_nonblocking(false).unwrap();
                let Ok(up) = TcpStream::connect(target) else {
                    continue;
                };
                for (from, to) in [(&down, &up), (&up, &down)] {
                    let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
                let mut list = c.lock().unwrap();
                list.push(down);
                list.push(up);
            }
        });
        Self {
            addr,
            conns,
            refuse,
            stop,
        }
    }

    fn lose(&self) {
        self.refuse.store(true, Ordering::Release);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.refuse.store(false, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.lose();
    }
}

fn channel_config(reconnect: Duration) -> ChannelConfig {
    let key = AuthKey::new(b"post-copy loss key, 32 bytes....").unwrap();
    let mut c = ChannelConfig::new(key)
        .with_data_streams(2)
        .with_bandwidth_limit(8 << 20);
    c.reconnect_timeout = reconnect;
    c.handshake_timeout = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(2);
    c.write_timeout = Some(Duration::from_secs(10));
    c
}

struct Resume(Arc<AtomicBool>);

impl StateSink for Resume {
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// What the program's reader threads saw.
#[derive(Default)]
struct Reads {
    /// Reads that returned the source's content.
    right: AtomicU64,
    /// Reads that returned anything else (zeros, stale or poison).
    wrong: AtomicU64,
}

/// How the source is lost.
#[derive(Copy, Clone, Debug)]
enum Loss {
    /// Never comes back: the destination gives up after its pause limit.
    ForGood,
    /// The link is refused for this long (longer than the destination's
    /// idle timeout: post-copy pauses), then heals.
    ReturnsAfter(Duration),
}

struct Outcome {
    dest: lmig_core::Result<lmig_core::session::DestinationReport>,
    events: Vec<Event>,
    missing_after: u64,
    placed: u64,
}

/// Migrate [`PAGES`] pages in post-copy; lose the source once `at_pct` %
/// of the pages are placed; readers read every page (each reader a quarter,
/// in a scattered order). Lost for good: once the destination returned,
/// check that the missing pages stay missing, then place them by hand (from
/// the source's memory) to release the blocked readers.
fn lose_source(what: &str, at_pct: u64, loss: Loss, reads: &Reads) -> Option<Outcome> {
    let src = source_set();
    let layout = MemorySource::layout(&src);
    let dst = DestinationRegions::new(Backing::Private)
        .prefault(false)
        .postcopy_options(PostcopyOptions::default());
    let (source_done, reconnect) = match loss {
        Loss::ForGood => (Duration::from_secs(3), Duration::from_secs(3)),
        Loss::ReturnsAfter(_) => (Duration::from_secs(60), Duration::from_secs(60)),
    };
    // The destination's reconnection attempts are short (it counts them
    // against its idle timeout); the source dials for as long as it waits.
    let listener = Listener::bind(
        &Endpoint::Tcp("127.0.0.1:0".parse().unwrap()),
        channel_config(Duration::from_millis(500)),
    )
    .unwrap();
    let Endpoint::Tcp(target) = listener.local_endpoint().clone() else {
        unreachable!()
    };
    let proxy = Proxy::new(target);
    let go = Arc::new(AtomicBool::new(false));
    let finished = AtomicBool::new(false);
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let out = std::thread::scope(|s| {
        let source = s.spawn(|| {
            let channel: StreamChannel =
                connect(&Endpoint::Tcp(proxy.addr), channel_config(reconnect)).unwrap();
            let cfg = SourceConfig::default()
                .with_mode(Mode::Postcopy)
                .with_verify(true)
                .with_ready_timeout(Duration::from_secs(30))
                .with_done_timeout(source_done);
            let r = Source::new(
                &channel,
                &src,
                ManualTracker::new(&layout),
                NullProgram::default(),
            )
            .with_config(cfg)
            .run();
            lmig_core::Channel::shutdown(&channel);
            r
        });
        let dest = s.spawn(|| {
            let channel = listener.accept_timeout(Duration::from_secs(20)).unwrap();
            let seen = events.clone();
            let record = move |e: &Event| {
                if matches!(
                    e,
                    Event::PostcopyPaused { .. } | Event::PostcopyResumed { .. }
                ) {
                    seen.lock().unwrap().push(e.clone());
                }
            };
            let r = Destination::new(&channel, &dst, Resume(go.clone()))
                .with_observer(record)
                .with_config(
                    DestinationConfig::default()
                        .with_idle_timeout(Duration::from_secs(1))
                        .with_pause_limit(Some(match loss {
                            Loss::ForGood => Duration::from_secs(2),
                            Loss::ReturnsAfter(_) => Duration::from_secs(60),
                        })),
                )
                .run();
            finished.store(true, Ordering::Release);
            r
        });
        let readers: Vec<_> = (0..READERS)
            .map(|k| {
                let (go, dst, finished) = (&go, &dst, &finished);
                s.spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !go.load(Ordering::Acquire) {
                        if finished.load(Ordering::Acquire) || Instant::now() > deadline {
                            return;
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    let r = dst.regions().unwrap().get(R).unwrap();
                    let mut page = vec![0u8; PS];
                    for i in (k..PAGES).step_by(READERS as usize) {
                        let p = (i * 2503) % PAGES;
                        r.read_at(p as usize * PS, &mut page).unwrap();
                        if page == page_pattern(p) {
                            reads.right.fetch_add(1, Ordering::Relaxed);
                        } else {
                            reads.wrong.fetch_add(1, Ordering::Relaxed);
                        }
                        // Slower than the push: most pages arrive pushed.
                        std::thread::sleep(Duration::from_micros(300));
                    }
                })
            })
            .collect();
        // Lose the source once `at_pct` % of the pages are in.
        let target = PAGES * at_pct / 100;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !finished.load(Ordering::Acquire) && Instant::now() < deadline {
            let placed = dst.regions().map(|r| {
                (
                    r.in_postcopy() && go.load(Ordering::Acquire),
                    PAGES - r.postcopy_missing(),
                )
            });
            if let Some((true, placed)) = placed {
                if placed >= target {
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        proxy.lose();
        if let Loss::ReturnsAfter(down) = loss {
            std::thread::sleep(down);
            proxy.heal();
        }
        let dest = dest.join().unwrap();
        let set = dst.regions().unwrap();
        let missing_after = set.postcopy_missing();
        if dest.is_err() {
            // Missing pages stay missing: no unregistering, no zeros.
            assert!(set.end_postcopy().is_err() || missing_after == 0, "{what}");
            // Readers still running are blocked, or read right pages only.
            // A source that came back would place the pages: do it by hand.
            let mut page = vec![0u8; PS];
            for p in 0..PAGES {
                page.copy_from_slice(&page_pattern(p));
                set.write_run(&PageRun::new(R, p, 1), &page).unwrap();
            }
        }
        for r in readers {
            r.join().unwrap();
        }
        let _ = source.join().unwrap();
        Outcome {
            dest,
            events: events.lock().unwrap().clone(),
            missing_after,
            placed: dst.postcopy_stats().placed,
        }
    });
    Some(out)
}

fn skip_without_uffd(what: &str) -> bool {
    !lmig_core::testing::privileged(what, "userfaultfd with kernel-mode faults")
}

/// Lost for good at three points: `PostcopyPaused` with the pages still
/// missing, which stay missing (their readers blocked) until placed; not
/// one read returned anything but the source's content.
#[test]
fn source_lost_for_good_pauses_and_never_reads_a_wrong_page() {
    for at in [5, 40, 80] {
        let what = format!("lost for good at {at}%");
        if skip_without_uffd(&what) {
            return;
        }
        let reads = Reads::default();
        let o = lose_source(&what, at, Loss::ForGood, &reads).unwrap();
        let missing = match o.dest.as_ref().map_err(MigrationError::cause) {
            Err(MigrationError::PostcopyPaused { missing_pages, .. }) => *missing_pages,
            Ok(_) => {
                // Every page arrived before the loss was noticed: nothing to
                // pause for (a legitimate outcome, counted right below).
                0
            }
            Err(e) => panic!("{what}: expected PostcopyPaused, got {e}"),
        };
        if missing > 0 {
            assert_eq!(o.missing_after, missing, "{what}: missing pages changed");
            assert!(
                o.events
                    .iter()
                    .any(|e| matches!(e, Event::PostcopyPaused { missing_pages, .. } if *missing_pages >= missing)),
                "{what}: no PostcopyPaused event: {:?}",
                o.events
            );
        }
        assert_eq!(
            reads.wrong.load(Ordering::Relaxed),
            0,
            "{what}: wrong pages read"
        );
        assert_eq!(
            reads.right.load(Ordering::Relaxed),
            PAGES,
            "{what}: every page read"
        );
        println!(
            "{what}: {missing} pages missing when the destination gave up, {} placed by the session",
            o.placed
        );
    }
}

/// The link is refused for longer than the destination's idle timeout
/// (post-copy pauses, readers of missing pages block), then heals: the
/// source comes back, the migration finishes verified, every page placed
/// once, every read right.
#[test]
fn source_that_comes_back_resumes_postcopy() {
    for at in [20, 60] {
        let what = format!("lost at {at}%, back after 2.5 s");
        if skip_without_uffd(&what) {
            return;
        }
        let reads = Reads::default();
        let o = lose_source(
            &what,
            at,
            Loss::ReturnsAfter(Duration::from_millis(2500)),
            &reads,
        )
        .unwrap();
        let report = o
            .dest
            .unwrap_or_else(|e| panic!("{what}: destination failed: {e}"));
        assert_eq!(report.verification, Verification::Verified, "{what}");
        assert_eq!(o.missing_after, 0, "{what}");
        assert_eq!(
            o.placed, report.postcopy_pages,
            "{what}: a page placed twice"
        );
        assert_eq!(report.postcopy_pages, PAGES, "{what}");
        assert!(
            o.events
                .iter()
                .any(|e| matches!(e, Event::PostcopyPaused { .. })),
            "{what}: post-copy never paused: {:?}",
            report.warnings
        );
        assert!(
            o.events
                .iter()
                .any(|e| matches!(e, Event::PostcopyResumed { .. })),
            "{what}: {:?}",
            report.warnings
        );
        assert_eq!(
            reads.wrong.load(Ordering::Relaxed),
            0,
            "{what}: wrong pages read"
        );
        assert_eq!(reads.right.load(Ordering::Relaxed), PAGES, "{what}");
    }
}
