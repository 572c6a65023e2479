//! The destination's post-copy fault path in one thread
//! (`DestinationConfig::one_fault_thread`: the thread that forwards a
//! fault waits for its reply in the same `poll` as the userfaultfd and
//! places it) and in two, over real TCP with real userfaultfd.
//!
//! The push is held off until the program says its parked work ran
//! (`PageResidency::settled`), with a bound far beyond the touches: every
//! page the program touches before it says so comes as the reply to its
//! fault (the hold-off's sign of life, a page every 500 ms, comes only
//! after the touches, which take well under that here; on a host slow
//! enough for them to take longer, each such page may spare one fault, and
//! the fault count allows for as many as their time could hold). A reply not placed (or a fault lost) leaves the program
//! blocked until that bound, and the source's report then says the
//! hold-off ended on its bound, not on the program's word: the test fails.
//!
//! Needs userfaultfd with kernel-mode faults (root here); fails loudly
//! without it (`LMIG_SKIP_PRIVILEGED=1` makes that a visible skip). No
//! timing is asserted; every wait is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lmig_core::PageResidency;
use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, DestinationConfig, Mode, SourceConfig};
use lmig_core::testing::NullProgram;
use lmig_mem::{Backing, DestinationRegions, PostcopyOptions};
use lmig_transport::ChannelConfig;

mod postcopy_tcp;

use postcopy_tcp::PS;
const PAGES: u64 = 2048;
/// Pages the program touches (each a fault answered by a reply) before it
/// says its parked work ran.
const TOUCHED: u64 = 300;
const R: RegionId = RegionId(6);
/// The push's hold-off bound: far beyond the test's run.
const HOLDOFF: Duration = Duration::from_secs(120);
/// How long the program may take to touch its pages (well under a second
/// here) before its pages are poisoned to release it: a lost reply makes
/// the test fail then, instead of hanging (the page the source sent as
/// that reply is never pushed again).
const WATCHDOG: Duration = Duration::from_secs(60);

/// The salt of this file's page pattern.
const SALT: u8 = 0x3C;

fn pattern(page: u64) -> Vec<u8> {
    postcopy_tcp::pattern(page, SALT)
}

fn config() -> ChannelConfig {
    postcopy_tcp::config(b"one fault thread key, 32 bytes!!")
}

/// What the sessions reported, and the sink's count of fault waits a
/// reply ended.
struct Outcome {
    source: lmig_core::session::SourceReport,
    dest: lmig_core::session::DestinationReport,
    also_woke: u64,
    wrong: u64,
    /// From the destination's connection to its program's word (the
    /// hold-off lies within).
    took: Duration,
}

/// The source's sign of life while the push is held off: one page at
/// least this often (lmig-core's `HOLDOFF_BEAT`).
const BEAT: Duration = Duration::from_millis(500);

/// Migrate a region in post-copy, the destination's fault path in one
/// thread or two (`None`: the library's choice), its sink's fault wait
/// spinning `spin`; its program touches [`TOUCHED`] pages (scattered), then
/// says it settled. `None` when skipped (no userfaultfd).
fn migrate(what: &str, one: Option<bool>, spin: Duration) -> Option<Outcome> {
    let src = postcopy_tcp::source_region(R, PAGES, SALT);
    let dst = Arc::new(
        DestinationRegions::new(Backing::Private)
            .prefault(false)
            .postcopy_options(PostcopyOptions::default().with_spin(spin)),
    );
    let (listener, target) = postcopy_tcp::listen(config());
    let dest = {
        let dst = dst.clone();
        std::thread::spawn(move || {
            let channel = listener.accept_timeout(Duration::from_secs(20)).unwrap();
            let began = Instant::now();
            let config = DestinationConfig::default()
                .with_idle_timeout(Duration::from_secs(30))
                .with_pause_limit(Duration::from_secs(5));
            let config = match one {
                Some(one) => config.with_one_fault_thread(one),
                None => config,
            };
            let resumed = Destination::new(channel, dst.clone(), NullProgram::default())
                .with_config(config)
                .start()?;
            let residency = resumed.residency.clone().expect("post-copy: a residency");
            let wrong = watched(&dst, &*residency);
            let took = began.elapsed();
            resumed.after_commit.join().map(|r| (r, wrong, took))
        })
    };
    let cfg = SourceConfig::default()
        .with_mode(Mode::Postcopy)
        .with_verify(true)
        .with_ready_timeout(Duration::from_secs(30))
        .with_done_timeout(Duration::from_secs(30))
        .with_push_holdoff(HOLDOFF)
        .with_push_holdoff_until_settled(true);
    let source = postcopy_tcp::run_source(&target, config(), &src, cfg);
    let (dest, wrong, took) = match dest.join().unwrap() {
        Ok(d) => d,
        Err(e) => {
            if lmig_core::testing::privileged(what, &e.to_string()) {
                panic!("{what}: destination failed: {e}");
            }
            return None;
        }
    };
    let source = source.unwrap_or_else(|e| panic!("{what}: source failed: {e}"));
    postcopy_tcp::assert_pages(what, &dst, R, PAGES, SALT);
    let also_woke = dst.postcopy_stats().also_woke;
    Some(Outcome {
        source,
        dest,
        also_woke,
        wrong,
        took,
    })
}

/// The destination's program: reads [`TOUCHED`] pages spread over the
/// region (each a fault: nothing is pushed before it says it settled),
/// then says it settled. Returns how many it read wrong.
fn program(dst: &DestinationRegions, residency: &dyn PageResidency) -> u64 {
    let set = dst.regions().expect("the regions are mapped");
    let mut wrong = 0;
    let mut v = vec![0u8; PS];
    for i in 0..TOUCHED {
        let p = (i * 997) % PAGES;
        set.get(R)
            .unwrap()
            .read_at(p as usize * PS, &mut v)
            .unwrap();
        if v != pattern(p) {
            wrong += 1;
        }
    }
    residency.settled();
    wrong
}

/// [`program`], released after [`WATCHDOG`] if it is still blocked: every
/// page gets a poison pattern (never zeros), which it counts as wrong.
fn watched(dst: &DestinationRegions, residency: &dyn PageResidency) -> u64 {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let program = s.spawn(|| {
            let wrong = program(dst, residency);
            done.store(true, Ordering::Release);
            wrong
        });
        let deadline = Instant::now() + WATCHDOG;
        while !done.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !done.load(Ordering::Acquire) {
            let set = dst.regions().expect("the regions are mapped");
            let poison = vec![0xEEu8; PS];
            for p in 0..PAGES {
                // A page placed meanwhile refuses the poison: fine.
                let _ = set.write_run(&PageRun::new(R, p, 1), &poison);
            }
        }
        program.join().expect("the program panicked")
    })
}

fn check(what: &str, o: &Outcome) {
    assert_eq!(o.wrong, 0, "{what}: the program read wrong content");
    assert!(
        o.source.holdoff_settled,
        "{what}: every touched page came as a reply, and the word after them"
    );
    // Pages pushed as signs of life before the word: at most one per
    // whole beat of the time from the connection to the word (none when
    // that is under a beat, as it is on any but a starved host).
    let beats = (o.took.as_millis() / BEAT.as_millis()) as u64;
    assert!(
        o.dest.network_faults + beats >= TOUCHED,
        "{what}: each touch a request ({}, the program took {:?})",
        o.dest.network_faults,
        o.took
    );
    assert_eq!(o.dest.verification, Verification::Verified, "{what}");
    assert_eq!(o.source.verification, Verification::Verified, "{what}");
    assert_eq!(
        o.dest.postcopy_pages, PAGES,
        "{what}: every page placed once"
    );
    assert_eq!(o.dest.duplicate_pages, 0, "{what}: nothing placed twice");
}

/// One thread forwards the faults and places the replies: each touched
/// page arrives as its reply, and the thread waited for them on the
/// urgent lane's descriptor with the userfaultfd (a wait a reply ended).
#[test]
fn one_thread_answers_every_fault() {
    let what = "post-copy, one fault-path thread";
    let Some(o) = migrate(what, Some(true), Duration::ZERO) else {
        return;
    };
    check(what, &o);
    assert!(o.also_woke >= 1, "{what}: a reply ended a fault wait");
}

/// Two threads (the fault thread, the reply thread): the same, and the
/// fault thread never waits on the urgent lane.
#[test]
fn two_threads_answer_every_fault() {
    let what = "post-copy, a fault thread and a reply thread";
    let Some(o) = migrate(what, Some(false), Duration::ZERO) else {
        return;
    };
    check(what, &o);
    assert_eq!(o.also_woke, 0, "{what}: no wait on the urgent lane");
}

/// The default (`one_fault_thread: None`): one thread exactly when the
/// sink's fault wait spins — a reply ends a fault wait with the spin, never
/// without it (the fault thread then never waits on the urgent lane).
#[test]
fn by_default_one_thread_exactly_when_the_sink_spins() {
    let what = "post-copy, the default fault path, a spinning sink";
    let Some(o) = migrate(what, None, Duration::from_micros(200)) else {
        return;
    };
    check(what, &o);
    assert!(
        o.also_woke >= 1,
        "{what}: one thread (a reply ended a wait)"
    );
    let what = "post-copy, the default fault path, a sink that does not spin";
    let Some(o) = migrate(what, None, Duration::ZERO) else {
        return;
    };
    check(what, &o);
    assert_eq!(o.also_woke, 0, "{what}: two threads");
}
