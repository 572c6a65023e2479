//! The freeze's `Sockets` batches travel on the data lanes
//! (`Channel::send_lane`), so they may arrive in any order across lanes,
//! and after `Handover` (which goes on the control lane). The rule: after
//! its batches the source sends one `Sockets{last: true}` on every data
//! lane, and the destination ends receiving (and may activate) only once
//! it has one from each lane. Here a channel holds back every lane but the
//! first until after `Handover`, and hands lane messages over in reverse
//! lane order: every record is still restored once, before activation. A
//! lane's end that never comes fails the migration instead of activating
//! what arrived. And the receive memory the source's queue estimate asks
//! for is clamped to the destination's `max_warm_receive`.

use std::sync::Mutex;
use std::time::Duration;

use lmig_core::model::{RegionId, SocketRecord, TcpListenState};
use lmig_core::protocol::{Message, Verification};
use lmig_core::session::{Destination, DestinationConfig, Source, SourceConfig};
use lmig_core::testing::{MarkTracker, NullProgram, PairEnd, VecMemory, channel_pair, one_region};
use lmig_core::{Channel, SocketSink, SocketSource};

const PAGES: u64 = 64;
const LANES: usize = 3;
const BATCHES: u64 = 12;
const PER_BATCH: u64 = 5;

/// Sockets captured in [`BATCHES`] batches of [`PER_BATCH`] listeners
/// (ids 0..60); their queue estimate is `queued`.
struct Batched {
    queued: u64,
}

impl SocketSource for Batched {
    fn freeze(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        for b in 0..BATCHES {
            let batch = (0..PER_BATCH)
                .map(|i| {
                    SocketRecord::Listen(TcpListenState {
                        id: b * PER_BATCH + i,
                        local: "127.0.0.1:1".parse().unwrap(),
                        backlog: 1,
                        sock: Default::default(),
                        tcp: Default::default(),
                    })
                })
                .collect();
            emit(batch)?;
        }
        Ok(())
    }
    fn queued_bytes(&mut self) -> lmig_core::Result<u64> {
        Ok(self.queued)
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
}

/// The ids restored, in order; how many there were when activated.
#[derive(Default)]
struct Sink {
    ids: Vec<u64>,
    at_activation: Option<usize>,
    discarded: bool,
}

impl SocketSink for Sink {
    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        for r in batch {
            match r {
                SocketRecord::Listen(l) => self.ids.push(l.id),
                other => panic!("unexpected record {other:?}"),
            }
        }
        Ok(())
    }
    fn activate(&mut self) -> lmig_core::Result<()> {
        self.at_activation = Some(self.ids.len());
        Ok(())
    }
    fn discard(&mut self) {
        self.discarded = true;
    }
}

/// The source's channel end. Lane 0's messages go at once; the other
/// lanes' are held back until the control lane's `Handover` went out, then
/// sent lane by lane from the last lane down (each lane's own order kept).
/// `drop_end_of` drops that lane's `last` instead.
struct Shuffling {
    inner: PairEnd,
    held: Mutex<Vec<Vec<Message>>>,
    drop_end_of: Option<usize>,
    /// Hold the `QueueEstimate`s back until after the first socket batch
    /// (the control lane slower than the data lanes).
    late_estimate: bool,
    estimates: Mutex<Vec<Message>>,
    /// Every lane a message was sent on (`None`: the control lane).
    lanes_used: Mutex<Vec<Option<usize>>>,
}

impl Shuffling {
    fn new(inner: PairEnd, drop_end_of: Option<usize>, late_estimate: bool) -> Self {
        Self {
            inner,
            held: Mutex::new(vec![Vec::new(); LANES]),
            drop_end_of,
            late_estimate,
            estimates: Mutex::default(),
            lanes_used: Mutex::default(),
        }
    }
}

impl Channel for Shuffling {
    fn send(&self, msg: &Message) -> lmig_core::Result<()> {
        if self.late_estimate && matches!(msg, Message::QueueEstimate { .. }) {
            self.estimates.lock().unwrap().push(msg.clone());
            return Ok(());
        }
        if matches!(msg, Message::Sockets { .. }) {
            self.lanes_used.lock().unwrap().push(None);
        }
        self.inner.send(msg)?;
        if matches!(msg, Message::Handover(_)) {
            let held = std::mem::take(&mut *self.held.lock().unwrap());
            for lane in held.into_iter().rev() {
                for m in lane {
                    self.inner.send(&m)?;
                }
            }
        }
        Ok(())
    }
    fn send_lane(&self, lane: usize, msg: &Message) -> lmig_core::Result<()> {
        let lane = lane % LANES;
        self.lanes_used.lock().unwrap().push(Some(lane));
        if self.drop_end_of == Some(lane) && matches!(msg, Message::Sockets { last: true, .. }) {
            return Ok(());
        }
        if lane == 0 {
            self.inner.send(msg)?;
            for m in std::mem::take(&mut *self.estimates.lock().unwrap()) {
                self.inner.send(&m)?;
            }
            return Ok(());
        }
        self.held.lock().unwrap()[lane].push(msg.clone());
        Ok(())
    }
    fn data_lanes(&self) -> usize {
        LANES
    }
    fn recv(&self, timeout: Option<Duration>) -> lmig_core::Result<Option<Message>> {
        self.inner.recv(timeout)
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// The destination's channel end: what it was asked to warm.
struct Warming {
    inner: PairEnd,
    warmed: Mutex<Vec<u64>>,
}

impl Channel for Warming {
    fn send(&self, msg: &Message) -> lmig_core::Result<()> {
        self.inner.send(msg)
    }
    fn data_lanes(&self) -> usize {
        self.inner.data_lanes()
    }
    fn recv(&self, timeout: Option<Duration>) -> lmig_core::Result<Option<Message>> {
        self.inner.recv(timeout)
    }
    fn warm_receive(&self, bytes: u64) {
        self.warmed.lock().unwrap().push(bytes);
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

struct Outcome {
    source: lmig_core::Result<Verification>,
    destination: lmig_core::Result<()>,
    sink: Sink,
    lanes_used: Vec<Option<usize>>,
    warmed: Vec<u64>,
}

fn migrate(drop_end_of: Option<usize>, queued: u64, max_warm: u64) -> Outcome {
    migrate_with(drop_end_of, false, queued, max_warm)
}

fn migrate_with(
    drop_end_of: Option<usize>,
    late_estimate: bool,
    queued: u64,
    max_warm: u64,
) -> Outcome {
    let layout = one_region(RegionId(1), PAGES);
    let src = VecMemory::labelled(&layout, RegionId(1), 0..PAGES);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(LANES);
    let a = Shuffling::new(a, drop_end_of, late_estimate);
    let b = Warming {
        inner: b,
        warmed: Mutex::default(),
    };
    let mut tracker = MarkTracker::new(&layout);
    let mut program = NullProgram::default();
    let mut sockets = Batched { queued };
    let mut sink = Sink::default();
    let dconfig = DestinationConfig::default()
        .with_idle_timeout(Duration::from_secs(2))
        .with_max_warm_receive(max_warm);
    let sconfig = SourceConfig::default().with_ready_timeout(Duration::from_secs(5));
    let (s, d) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            let r = Destination::new(&b, &dst, NullProgram::default())
                .with_sockets(&mut sink)
                .with_config(dconfig)
                .run();
            // The source sees the failure at once, not at its timeout.
            b.shutdown();
            r
        });
        let r = Source::new(&a, &src, &mut tracker, &mut program)
            .with_sockets(&mut sockets)
            .with_config(sconfig)
            .run();
        a.shutdown();
        (r, d.join().unwrap())
    });
    if s.is_ok() {
        assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
    }
    Outcome {
        source: s.map(|r| r.verification),
        destination: d.map(|_| ()),
        sink,
        lanes_used: a.lanes_used.into_inner().unwrap(),
        warmed: b.warmed.into_inner().unwrap(),
    }
}

#[test]
fn batches_on_several_lanes_arriving_after_handover_are_all_restored_before_activation() {
    let o = migrate(None, 0, 1 << 20);
    assert_eq!(o.source.expect("source"), Verification::Verified);
    o.destination.expect("destination");
    let mut ids = o.sink.ids.clone();
    ids.sort_unstable();
    let all: Vec<u64> = (0..BATCHES * PER_BATCH).collect();
    assert_eq!(ids, all, "every record restored exactly once");
    assert_eq!(
        o.sink.at_activation,
        Some(all.len()),
        "every batch was restored before activation"
    );
    // The batches did travel on several lanes (held back behind Handover),
    // and every lane carried an end.
    let used: std::collections::BTreeSet<_> = o.lanes_used.iter().collect();
    assert!(
        used.contains(&Some(0)) && used.len() > 1,
        "{:?}",
        o.lanes_used
    );
    assert!(!used.contains(&None), "no batch on the control lane");
    assert_eq!(
        o.lanes_used.iter().filter(|l| l.is_some()).count(),
        BATCHES as usize + LANES,
        "one message per batch and one end per lane"
    );
}

#[test]
fn a_lane_whose_end_never_comes_fails_the_migration_instead_of_activating() {
    let o = migrate(Some(LANES - 1), 0, 1 << 20);
    assert!(
        o.destination.is_err(),
        "the destination waited for every end"
    );
    assert!(o.source.is_err(), "no Ready came");
    assert_eq!(o.sink.at_activation, None, "nothing was activated");
    assert!(o.sink.discarded, "what arrived was discarded");
}

#[test]
fn an_estimate_above_the_destinations_bound_warms_only_the_bound() {
    let o = migrate(None, 5 << 20, 1 << 20);
    o.destination.expect("destination");
    assert!(o.warmed.contains(&(1 << 20)), "clamped: {:?}", o.warmed);
    assert!(!o.warmed.iter().any(|&w| w > 1 << 20), "{:?}", o.warmed);
    let o = migrate(None, 512 << 10, 1 << 20);
    o.destination.expect("destination");
    assert!(
        o.warmed.contains(&(512 << 10)),
        "below the bound: as estimated"
    );
}

#[test]
fn an_estimate_arriving_after_the_first_socket_batch_is_ignored() {
    let o = migrate_with(None, true, 5 << 20, 1 << 20);
    assert_eq!(o.source.expect("source"), Verification::Verified);
    o.destination.expect("destination");
    assert_eq!(o.sink.at_activation, Some((BATCHES * PER_BATCH) as usize));
    assert!(
        o.warmed.iter().all(|&w| w == 0),
        "nothing warmed in the freeze: {:?}",
        o.warmed
    );
}
