//! The post-copy push held off until the destination's program says the
//! work it parked after the resume has run (`PageResidency::settled`,
//! `Message::DemandSettled` on the urgent lane), over real TCP with real
//! userfaultfd: the word ends the hold-off before its bound (the source's
//! report says so), and a program that never says it leaves the hold-off
//! to its bound.
//!
//! Needs userfaultfd with kernel-mode faults (root here); fails loudly
//! without it (`LMIG_SKIP_PRIVILEGED=1` makes that a visible skip). No
//! timing is asserted; every wait is bounded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lmig_core::PageResidency;
use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, DestinationConfig, Mode, SourceConfig};
use lmig_core::testing::NullProgram;
use lmig_mem::{Backing, DestinationRegions, RegionSet};
use lmig_transport::ChannelConfig;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

mod postcopy_tcp;

use postcopy_tcp::PS;

const PAGES: u64 = 512;
const R: RegionId = RegionId(5);

/// The salt of this file's page pattern.
const SALT: u8 = 0xA5;

fn pattern(page: u64) -> Vec<u8> {
    postcopy_tcp::pattern(page, SALT)
}

fn config() -> ChannelConfig {
    postcopy_tcp::config(b"settled test key, 32 bytes long!")
}

/// What the destination's program saw and the session reported.
struct Outcome {
    source: lmig_core::session::SourceReport,
    dest: lmig_core::session::DestinationReport,
}

/// Both sides' silence bounds (the destination's `idle_timeout`, the
/// source's `done_timeout`) in the tests whose hold-off stays below them.
const SILENCE: Duration = Duration::from_secs(30);

/// Migrate a region in post-copy with the push held off until settled
/// (bound `holdoff`); the destination's program asks for one page through
/// its residency handle, waits until it is in, and says it settled if
/// `say_settled`, after a burst of asked runs and faults
/// ([`burst_program`]) if `burst`. Each side gives up on the other after `silence` without
/// a message; the pages take at most `bandwidth` bytes a second (0: no
/// limit). `None` when skipped (no userfaultfd).
fn migrate(
    what: &str,
    holdoff: Duration,
    say_settled: bool,
    burst: bool,
    (silence, bandwidth): (Duration, u64),
) -> Option<Outcome> {
    let src = postcopy_tcp::source_region(R, PAGES, SALT);
    let dst = Arc::new(DestinationRegions::new(Backing::Private).prefault(false));
    let (listener, target) = postcopy_tcp::listen(config());
    let dest = {
        let dst = dst.clone();
        std::thread::spawn(move || {
            let channel = listener.accept_timeout(Duration::from_secs(20)).unwrap();
            let resumed = Destination::new(channel, dst.clone(), NullProgram::default())
                .with_config(
                    // A source gone for good (its `Done` timeout): fail
                    // within seconds instead of reconnecting for minutes.
                    DestinationConfig::default()
                        .with_idle_timeout(silence)
                        .with_pause_limit(Duration::from_secs(5)),
                )
                .start()?;
            let residency = resumed.residency.clone().expect("post-copy: a residency");
            if burst {
                burst_program(&*residency, dst.regions().unwrap());
            }
            program(&*residency, say_settled);
            resumed.after_commit.join()
        })
    };
    let cfg = SourceConfig::default()
        .with_mode(Mode::Postcopy)
        .with_verify(true)
        .with_ready_timeout(Duration::from_secs(30))
        .with_done_timeout(silence)
        .with_push_holdoff(holdoff)
        .with_push_holdoff_until_settled(true)
        .with_bandwidth_limit(bandwidth);
    let source = postcopy_tcp::run_source(&target, config(), &src, cfg);
    let dest = dest.join().unwrap();
    let dest = match dest {
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
    Some(Outcome { source, dest })
}

/// The destination's program: asks for page 7 without touching it, waits
/// (bounded) until it is in, then says it settled if told to.
fn program(residency: &dyn PageResidency, say_settled: bool) {
    let run = PageRun::new(R, 7, 1);
    if !residency.request(&run, 42).unwrap() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut ready = Vec::new();
        while !ready.contains(&42) {
            assert!(Instant::now() < deadline, "page 7 never came");
            let mut fds = [PollFd::new(residency.ready_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(100u16)).unwrap();
            ready.extend(residency.take_ready());
        }
    }
    assert!(residency.is_resident(&run).unwrap());
    if say_settled {
        residency.settled();
        // Said again: nothing more happens.
        residency.settled();
    }
}

/// Runs asked for at once by [`burst_program`], and the pages its two
/// threads touch meanwhile.
const BURST: std::ops::Range<u64> = 100..228;
const TOUCHED: [u64; 2] = [300, 400];

/// A program asking for a burst of runs at once while two of its threads
/// touch missing pages: with the push held off, only the session's
/// requests bring them (the faults and the asked runs taken together,
/// `MemorySink::take_faults`). Every waiter is told and every toucher reads
/// its page, each within a bound far below the hold-off's.
fn burst_program(residency: &dyn PageResidency, set: &RegionSet) {
    let region = set.get(R).unwrap();
    std::thread::scope(|s| {
        let touchers: Vec<_> = TOUCHED
            .into_iter()
            .map(|p| {
                let region = &region;
                s.spawn(move || {
                    let mut v = vec![0u8; PS];
                    region.read_at(p as usize * PS, &mut v).unwrap();
                    (p, v)
                })
            })
            .collect();
        let mut waiting = Vec::new();
        for p in BURST {
            if !residency.request(&PageRun::new(R, p, 1), p).unwrap() {
                waiting.push(p);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ready = Vec::new();
        while ready.len() < waiting.len() && Instant::now() < deadline {
            let mut fds = [PollFd::new(residency.ready_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(100u16)).unwrap();
            ready.extend(residency.take_ready());
        }
        ready.sort_unstable();
        assert_eq!(
            ready, waiting,
            "every asked run came, each waiter told once"
        );
        for t in touchers {
            let (p, v) = t.join().unwrap();
            assert_eq!(v, pattern(p), "toucher of page {p}");
        }
    });
    for p in BURST {
        assert!(residency.is_resident(&PageRun::new(R, p, 1)).unwrap());
    }
}

fn check(what: &str, o: &Outcome, settled: bool) {
    assert_eq!(
        o.source.holdoff_settled, settled,
        "{what}: the hold-off ended on the program's word"
    );
    check_complete(what, o);
    assert!(o.source.requested_pages >= 1, "{what}: page 7 asked for");
}

/// Both sides verified and every page placed once.
fn check_complete(what: &str, o: &Outcome) {
    assert_eq!(o.dest.verification, Verification::Verified, "{what}");
    assert_eq!(o.source.verification, Verification::Verified, "{what}");
    assert_eq!(
        o.dest.postcopy_pages, PAGES,
        "{what}: every page placed once"
    );
}

/// [`check_complete`], and neither side warned (of a silence taken for a
/// lost peer, a reconnection).
fn check_quiet(what: &str, o: &Outcome) {
    check_complete(what, o);
    assert!(o.dest.warnings.is_empty(), "{what}: {:?}", o.dest.warnings);
    assert!(
        o.source.warnings.is_empty(),
        "{what}: {:?}",
        o.source.warnings
    );
}

/// A hold-off bounded at 3 s ends on the program's word, before its bound
/// (the source's report says which ended it).
#[test]
fn the_programs_word_ends_the_push_holdoff() {
    let what = "post-copy, push held off until settled";
    let Some(o) = migrate(what, Duration::from_secs(3), true, false, (SILENCE, 0)) else {
        return;
    };
    check(what, &o, true);
}

/// A program that never says it: the hold-off ends at its bound and every
/// page still arrives.
#[test]
fn without_the_programs_word_the_holdoff_ends_at_its_bound() {
    let what = "post-copy, never settled";
    let Some(o) = migrate(what, Duration::from_millis(300), false, false, (SILENCE, 0)) else {
        return;
    };
    check(what, &o, false);
}

/// A hold-off longer than both sides' silence bounds (scaled down: 1 s
/// bounds, a 3 s hold-off nobody ends early): neither side takes the
/// hold-off for a lost peer. The destination hears pages pushed as signs
/// of life while the push is held off, and the source does not count the
/// destination's silence while it still has pages to push. Before, the
/// destination gave up (or, over TCP, reconnected) after its
/// `idle_timeout` and the source failed waiting for `Done` after its
/// `done_timeout`, so any hold-off bound above 30 s failed a session with
/// the defaults.
#[test]
fn a_holdoff_longer_than_the_silence_bounds_completes() {
    let what = "post-copy, hold-off beyond the idle timeouts";
    let Some(o) = migrate(
        what,
        Duration::from_secs(3),
        false,
        false,
        (Duration::from_secs(1), 0),
    ) else {
        return;
    };
    check(what, &o, false);
    check_quiet(what, &o);
}

/// A push longer than the source's silence bound (scaled: 1 s bounds, 2 MiB
/// at 1 MiB/s, no hold-off): the destination has nothing to say while
/// pages come, and the source does not take that for a lost destination.
/// Before, the source failed waiting for `Done` after its `done_timeout`
/// whenever the push lasted longer (60 s by default: a slow link, a
/// bandwidth limit, a large memory).
#[test]
fn a_push_longer_than_the_sources_silence_bound_completes() {
    let what = "post-copy, a push slower than the done timeout";
    let bounds = (Duration::from_secs(1), 1 << 20);
    let Some(o) = migrate(what, Duration::ZERO, false, false, bounds) else {
        return;
    };
    // Page 7 may come with the push before it is asked for: `check`'s
    // request count does not apply.
    check_quiet(what, &o);
}

/// A burst of asked runs and two faulting threads, served before the push
/// (held off for up to 60 s, far beyond the program's own 10 s bound): no
/// fault and no asked run is lost, every page arrives once and right.
#[test]
fn a_burst_of_asked_runs_and_faults_is_served_before_the_push() {
    let what = "post-copy, a burst of asked runs with faults";
    let Some(o) = migrate(what, Duration::from_secs(60), true, true, (SILENCE, 0)) else {
        return;
    };
    check(what, &o, true);
    let asked = BURST.end - BURST.start + TOUCHED.len() as u64;
    assert!(
        o.source.requested_pages >= asked,
        "{what}: {} pages asked for, {asked} expected",
        o.source.requested_pages
    );
}
