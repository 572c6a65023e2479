//! After `Commit` the destination says `SocketsActive` once its sockets
//! left repair mode, and the source releases its own sockets (re-injects
//! the packets its lock held, closes them) only then, so that work does
//! not share the CPU with the activation. A destination that never says it
//! (an older one) costs at most `SourceConfig::activation_wait`; a `Done`
//! that comes instead ends the wait and the migration.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmig_core::model::{RegionId, SocketRecord, TcpListenState};
use lmig_core::protocol::{Message, Verification};
use lmig_core::session::{Destination, DestinationConfig, Source, SourceConfig, SourceReport};
use lmig_core::testing::{MarkTracker, NullProgram, PairEnd, VecMemory, channel_pair, one_region};
use lmig_core::{Channel, SocketSink, SocketSource};

const PAGES: u64 = 32;
const SOCKETS: u64 = 4;

/// What happened to the sockets, in order, on both sides.
type Log = Arc<Mutex<Vec<&'static str>>>;

struct Listeners {
    log: Log,
}

impl SocketSource for Listeners {
    fn freeze(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        emit(
            (0..SOCKETS)
                .map(|id| {
                    SocketRecord::Listen(TcpListenState {
                        id,
                        local: "127.0.0.1:1".parse().unwrap(),
                        backlog: 1,
                        sock: Default::default(),
                        tcp: Default::default(),
                    })
                })
                .collect(),
        )
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        self.log.lock().unwrap().push("aborted");
        Ok(())
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        self.log.lock().unwrap().push("released");
        Ok(())
    }
}

/// A sink whose activation takes a while (as 10,000 connections do).
struct SlowSink {
    log: Log,
    restored: u64,
}

impl SocketSink for SlowSink {
    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        self.restored += batch.len() as u64;
        Ok(())
    }
    fn activate(&mut self) -> lmig_core::Result<()> {
        std::thread::sleep(Duration::from_millis(30));
        self.log.lock().unwrap().push("activated");
        Ok(())
    }
    fn discard(&mut self) {
        self.log.lock().unwrap().push("discarded");
    }
}

/// The destination's end, as an older destination: it never sends
/// `SocketsActive` (dropped here) when `old` is set.
struct Dest {
    inner: PairEnd,
    old: bool,
}

impl Channel for Dest {
    fn send(&self, msg: &Message) -> lmig_core::Result<()> {
        if self.old && matches!(msg, Message::SocketsActive) {
            return Ok(());
        }
        self.inner.send(msg)
    }
    fn data_lanes(&self) -> usize {
        self.inner.data_lanes()
    }
    fn recv(&self, timeout: Option<Duration>) -> lmig_core::Result<Option<Message>> {
        self.inner.recv(timeout)
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// Migrate with the given source settings; the source's report and the log.
fn migrate(old_destination: bool, config: SourceConfig) -> (SourceReport, Vec<&'static str>) {
    let layout = one_region(RegionId(1), PAGES);
    let src = VecMemory::labelled(&layout, RegionId(1), 0..PAGES);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(2);
    let b = Dest {
        inner: b,
        old: old_destination,
    };
    let log = Log::default();
    let mut tracker = MarkTracker::new(&layout);
    let mut program = NullProgram::default();
    let mut sockets = Listeners { log: log.clone() };
    let mut sink = SlowSink {
        log: log.clone(),
        restored: 0,
    };
    let dconfig = DestinationConfig::default().with_idle_timeout(Duration::from_secs(5));
    let config = config.with_ready_timeout(Duration::from_secs(5));
    let (s, d) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            let r = Destination::new(&b, &dst, NullProgram::default())
                .with_sockets(&mut sink)
                .with_config(dconfig)
                .run();
            b.shutdown();
            r
        });
        let r = Source::new(&a, &src, &mut tracker, &mut program)
            .with_sockets(&mut sockets)
            .with_config(config)
            .run();
        a.shutdown();
        (r, d.join().unwrap())
    });
    let s = s.expect("the source's migration");
    d.expect("the destination's migration");
    assert_eq!(sink.restored, SOCKETS);
    assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
    let log = log.lock().unwrap().clone();
    (s, log)
}

fn waited_in_vain(report: &SourceReport) -> bool {
    report
        .warnings
        .iter()
        .any(|w| w.contains("did not say its sockets were active"))
}

#[test]
fn the_source_releases_its_sockets_once_the_destination_activated_them() {
    let (report, log) = migrate(false, SourceConfig::default());
    // The activation takes 30 ms and the source would release at once
    // without the message: it releases after it.
    assert_eq!(log, ["activated", "released"]);
    assert_eq!(report.verification, Verification::Verified);
    assert!(!waited_in_vain(&report), "{:?}", report.warnings);
}

#[test]
fn a_destination_that_never_says_it_costs_the_bound_and_nothing_else() {
    let config = SourceConfig::default().with_activation_wait(Duration::from_millis(200));
    let (report, log) = migrate(true, config);
    assert!(log.contains(&"released"), "{log:?}");
    assert!(log.contains(&"activated"), "{log:?}");
    assert_eq!(report.verification, Verification::Verified);
    assert!(waited_in_vain(&report), "{:?}", report.warnings);
}

#[test]
fn a_done_during_the_wait_ends_it_and_the_migration() {
    // Without digests an older destination says `Done` right after its
    // activation: the wait takes it as the end of the migration (a long
    // bound shows it did not wait the bound out: `done_timeout` would fail
    // the source if `Done` were dropped).
    let config = SourceConfig::default()
        .with_verify(false)
        .with_activation_wait(Duration::from_secs(30))
        .with_done_timeout(Duration::from_secs(5));
    let (report, log) = migrate(true, config);
    assert_eq!(report.verification, Verification::NotChecked);
    assert_eq!(log, ["activated", "released"]);
    assert!(!waited_in_vain(&report), "{:?}", report.warnings);
}

#[test]
fn no_wait_releases_at_commit_as_before() {
    let config = SourceConfig::default().with_activation_wait(Duration::ZERO);
    let (report, log) = migrate(true, config);
    assert!(log.contains(&"released") && log.contains(&"activated"));
    assert_eq!(report.verification, Verification::Verified);
    assert!(!waited_in_vain(&report), "{:?}", report.warnings);
}
