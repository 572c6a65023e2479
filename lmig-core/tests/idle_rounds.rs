//! The rounds in the host's lowest CPU class (`SourceConfig::idle_lanes`,
//! `DestinationConfig::idle_receive`): asked while the rounds shrink, never
//! after a round that did not, never for the freeze; a hook that refuses,
//! or a round that outlasts the limit, never holds the migration back.
//!
//! The hooks are plain `fn`s, so each test records into statics of its own.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lmig_core::model::{RegionId, RegionLayout, RegionPages};
use lmig_core::policy::{ConvergencePolicy, Fallback, PolicyConfig};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, DestinationConfig, Source, SourceConfig};
use lmig_core::testing::{MarkTracker, NullProgram, VecMemory, channel_pair, one_region};

const PAGES: u64 = 256;

fn layout() -> RegionLayout {
    one_region(RegionId(1), PAGES)
}

fn memory(layout: &RegionLayout) -> VecMemory {
    VecMemory::labelled(layout, RegionId(1), 0..PAGES)
}

/// Round 0 leaves 2 pages dirty (the rounds shrink), every later collect
/// says every page is dirty (they stop shrinking). Counts its collects in
/// `collects`: while round `r`'s pages go out, `collects` is `r`.
struct ShrinksOnce {
    inner: MarkTracker,
    layout: RegionLayout,
    collects: &'static AtomicU32,
}

impl lmig_core::DirtyTracker for ShrinksOnce {
    fn name(&self) -> &'static str {
        "shrinks once"
    }
    fn start(&mut self) -> lmig_core::Result<()> {
        self.inner.start()
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> lmig_core::Result<()> {
        let n = self.collects.fetch_add(1, Ordering::SeqCst);
        *dirty = RegionPages::empty(&self.layout);
        if n == 0 {
            dirty.insert_run(&lmig_core::model::PageRun::new(RegionId(1), 3, 2))?;
        } else {
            *dirty = RegionPages::full(&self.layout);
        }
        Ok(())
    }
    fn stop(&mut self) -> lmig_core::Result<()> {
        self.inner.stop()
    }
}

/// Run a migration of [`memory`] with `config` at the source and `dconfig`
/// at the destination, the tracker [`ShrinksOnce`]; returns the source's
/// rounds after checking that both sides verified the memory.
fn migrate(config: SourceConfig, dconfig: DestinationConfig, collects: &'static AtomicU32) -> u32 {
    let layout = layout();
    let src = memory(&layout);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(2);
    let tracker = ShrinksOnce {
        inner: MarkTracker::new(&layout),
        layout: layout.clone(),
        collects,
    };
    // Never converges after round 1: the policy freezes after 4 rounds.
    let policy = ConvergencePolicy::new(
        PolicyConfig::default()
            .with_downtime_target(Duration::from_nanos(1))
            .with_max_rounds(4)
            .with_fallback(Fallback::Freeze),
    );
    let (s, d) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            Destination::new(&b, &dst, NullProgram::default())
                .with_config(dconfig)
                .run()
        });
        let r = Source::new(&a, &src, tracker, NullProgram::default())
            .with_policy(policy)
            .with_config(config)
            .run();
        (r, d.join().unwrap())
    });
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!(s.verification, Verification::Verified);
    assert_eq!(d.verification, Verification::Verified);
    assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
    s.rounds
}

static SPARE_COLLECTS: AtomicU32 = AtomicU32::new(0);
/// (collects when called, what was asked).
static SPARE_CALLS: Mutex<Vec<(u32, bool)>> = Mutex::new(Vec::new());

fn spare_hook(idle: bool) -> bool {
    let at = SPARE_COLLECTS.load(Ordering::SeqCst);
    SPARE_CALLS.lock().unwrap().push((at, idle));
    true
}

/// Each sender of round 0 and round 1 (round 0 shrank) is lowered; from
/// round 2 on (round 1 did not shrink) and in the freeze none is.
#[test]
fn senders_are_lowered_only_while_the_rounds_shrink() {
    let config = SourceConfig::default().with_idle_lanes(Some(spare_hook));
    let rounds = migrate(config, DestinationConfig::default(), &SPARE_COLLECTS);
    assert!(
        rounds >= 3,
        "a round after the one that did not shrink: {rounds}"
    );
    // Two data lanes: two threads per round.
    assert_calls_in_rounds_0_and_1(&SPARE_CALLS, 2, 2);
}

/// `calls` (the collect number it was made at, `true`/`false`) holds
/// `first` calls with `true` in round 0, `second` in round 1, and nothing
/// else.
fn assert_calls_in_rounds_0_and_1(calls: &Mutex<Vec<(u32, bool)>>, first: usize, second: usize) {
    let calls = calls.lock().unwrap().clone();
    let count = |round| calls.iter().filter(|c| **c == (round, true)).count();
    assert_eq!(count(0), first, "{calls:?}");
    assert_eq!(count(1), second, "{calls:?}");
    assert!(calls.iter().all(|c| c.0 <= 1 && c.1), "{calls:?}");
}

static REFUSED_COLLECTS: AtomicU32 = AtomicU32::new(0);
static REFUSED_CALLS: Mutex<Vec<bool>> = Mutex::new(Vec::new());

fn refusing_hook(idle: bool) -> bool {
    REFUSED_CALLS.lock().unwrap().push(idle);
    false
}

/// A host that refuses the lowest class (no `CAP_SYS_NICE` to come back,
/// say): the rounds run as they would without the hook, nothing is asked
/// to move back, the migration ends verified.
#[test]
fn a_refused_lowest_class_changes_nothing() {
    let config = SourceConfig::default().with_idle_lanes(Some(refusing_hook));
    let dconfig = DestinationConfig::default().with_idle_receive(Some(refusing_hook));
    migrate(config, dconfig, &REFUSED_COLLECTS);
    let calls = REFUSED_CALLS.lock().unwrap().clone();
    assert!(!calls.is_empty());
    assert!(
        calls.iter().all(|idle| *idle),
        "never moved back: {calls:?}"
    );
}

static LIMIT_COLLECTS: AtomicU32 = AtomicU32::new(0);
/// (collects when called, what was asked).
static LIMIT_CALLS: Mutex<Vec<(u32, bool)>> = Mutex::new(Vec::new());

fn limit_hook(idle: bool) -> bool {
    let at = LIMIT_COLLECTS.load(Ordering::SeqCst);
    LIMIT_CALLS.lock().unwrap().push((at, idle));
    true
}

/// A round that lasts longer than `idle_round_limit` (here: any) moves
/// its senders back before their next chunk: in round 0, where both
/// lanes have pages to send, both move down and back. (A lane with no
/// page in a round ends without a chunk, and its thread with it.)
#[test]
fn a_sender_past_the_round_limit_moves_back() {
    let config = SourceConfig::default()
        .with_idle_lanes(Some(limit_hook))
        .with_idle_round_limit(Duration::ZERO);
    migrate(config, DestinationConfig::default(), &LIMIT_COLLECTS);
    let calls = LIMIT_CALLS.lock().unwrap().clone();
    let count = |c: (u32, bool)| calls.iter().filter(|x| **x == c).count();
    assert_eq!(count((0, true)), 2, "{calls:?}");
    assert_eq!(count((0, false)), 2, "{calls:?}");
    let down = calls.iter().filter(|c| c.1).count();
    let up = calls.iter().filter(|c| !c.1).count();
    assert!(up <= down, "{calls:?}");
}

static DEST_COLLECTS: AtomicU32 = AtomicU32::new(0);
static DEST_CALLS: Mutex<Vec<bool>> = Mutex::new(Vec::new());

fn dest_hook(idle: bool) -> bool {
    DEST_CALLS.lock().unwrap().push(idle);
    true
}

/// The destination lowers its process once when receiving starts and
/// raises it once (when the first round's `RoundEnd` arrives), never
/// again.
#[test]
fn the_destination_is_lowered_once_and_raised_once() {
    let dconfig = DestinationConfig::default().with_idle_receive(Some(dest_hook));
    migrate(SourceConfig::default(), dconfig, &DEST_COLLECTS);
    assert_eq!(*DEST_CALLS.lock().unwrap(), [true, false]);
}

static DUTY_COLLECTS: AtomicU32 = AtomicU32::new(0);
static DUTY_CALLS: Mutex<Vec<(u32, bool)>> = Mutex::new(Vec::new());

fn duty_hook(idle: bool) -> bool {
    let at = DUTY_COLLECTS.load(Ordering::SeqCst);
    DUTY_CALLS.lock().unwrap().push((at, idle));
    true
}

static DUTY_REFUSED_COLLECTS: AtomicU32 = AtomicU32::new(0);

/// Senders in the lowest class at the smallest share (`idle_duty` 1 %,
/// resting up to 99 % of the time): the migration still ends with every
/// page, the rounds after the one that did not shrink run without the
/// lowest class (and so without rests), and a host that refuses the
/// class gets no rest at all.
#[test]
fn resting_senders_never_hold_the_migration_back() {
    let config = SourceConfig::default()
        .with_idle_lanes(Some(duty_hook))
        .with_idle_duty(1);
    let rounds = migrate(config, DestinationConfig::default(), &DUTY_COLLECTS);
    assert!(rounds >= 3, "{rounds}");
    let calls = DUTY_CALLS.lock().unwrap().clone();
    assert!(calls.iter().all(|c| c.0 <= 1 && c.1), "{calls:?}");
    let config = SourceConfig::default()
        .with_idle_lanes(Some(refusing_hook))
        .with_idle_duty(1);
    migrate(config, DestinationConfig::default(), &DUTY_REFUSED_COLLECTS);
}

static THREADS_COLLECTS: AtomicU32 = AtomicU32::new(0);
/// (collects when called, what was asked).
static THREADS_CALLS: Mutex<Vec<(u32, bool)>> = Mutex::new(Vec::new());

fn threads_hook(idle: bool) -> bool {
    let at = THREADS_COLLECTS.load(Ordering::SeqCst);
    THREADS_CALLS.lock().unwrap().push((at, idle));
    true
}

static THREADS_REFUSED_COLLECTS: AtomicU32 = AtomicU32::new(0);

/// One sender thread for two data lanes while in the lowest class
/// (`idle_threads` 1): each round that spares the program starts one
/// thread (one hook call, where a thread per lane makes two), every page
/// still arrives on its lane and is verified, and the rounds after the
/// one that did not shrink go on; a host that refuses the lowest class
/// still gets every page.
#[test]
fn fewer_senders_than_lanes_send_every_page() {
    let config = SourceConfig::default()
        .with_idle_lanes(Some(threads_hook))
        .with_idle_threads(1);
    let rounds = migrate(config, DestinationConfig::default(), &THREADS_COLLECTS);
    assert!(rounds >= 3, "{rounds}");
    let calls = THREADS_CALLS.lock().unwrap().clone();
    assert_eq!(calls, [(0, true), (1, true)]);
    let config = SourceConfig::default()
        .with_idle_lanes(Some(refusing_hook))
        .with_idle_threads(1);
    migrate(
        config,
        DestinationConfig::default(),
        &THREADS_REFUSED_COLLECTS,
    );
}

static PLACE_COLLECTS: AtomicU32 = AtomicU32::new(0);
/// (collects when called, what was asked) of the placement hook.
static PLACE_CALLS: Mutex<Vec<(u32, bool)>> = Mutex::new(Vec::new());

fn place_lanes_hook(_idle: bool) -> bool {
    true
}

fn place_hook(on: bool) {
    let at = PLACE_COLLECTS.load(Ordering::SeqCst);
    PLACE_CALLS.lock().unwrap().push((at, on));
}

/// `idle_place`: a sender in the lowest class is placed before each of its
/// chunks (round 0: 256 pages in 4 chunks; round 1: the 2 dirty pages in
/// one), never once the rounds stop shrinking nor in the freeze; every
/// page arrives.
#[test]
fn senders_are_placed_before_each_chunk_while_in_the_lowest_class() {
    let config = SourceConfig::default()
        .with_idle_lanes(Some(place_lanes_hook))
        .with_idle_place(Some(place_hook));
    let rounds = migrate(config, DestinationConfig::default(), &PLACE_COLLECTS);
    assert!(rounds >= 3, "{rounds}");
    assert_calls_in_rounds_0_and_1(&PLACE_CALLS, 4, 1);
}

static UNPLACE_COLLECTS: AtomicU32 = AtomicU32::new(0);
static UNPLACE_CALLS: Mutex<Vec<bool>> = Mutex::new(Vec::new());

fn unplace_hook(on: bool) {
    UNPLACE_CALLS.lock().unwrap().push(on);
}

/// A sender past the round's limit leaves the lowest class before its
/// first chunk: it is given back (`false`) and never placed.
#[test]
fn a_sender_leaving_the_lowest_class_is_given_back() {
    let config = SourceConfig::default()
        .with_idle_lanes(Some(place_lanes_hook))
        .with_idle_place(Some(unplace_hook))
        .with_idle_round_limit(Duration::ZERO);
    migrate(config, DestinationConfig::default(), &UNPLACE_COLLECTS);
    let calls = UNPLACE_CALLS.lock().unwrap().clone();
    assert!(!calls.is_empty());
    assert!(calls.iter().all(|on| !on), "{calls:?}");
}
