//! The socket queue estimate goes ahead of the freeze: after a pre-copy
//! round whose estimate is not 0 the source sends `QueueEstimate`, the
//! destination gets that much receive memory ready (`warm_receive`) before
//! the first `Sockets` batch, and gives it back (`warm_receive(0)`) once
//! the freeze's messages are in. An estimate of 0 sends nothing.

use std::sync::Mutex;
use std::time::Duration;

use lmig_core::model::{RegionId, SocketRecord, TcpListenState};
use lmig_core::protocol::{MAX_QUEUE_ESTIMATE, Message, Verification};
use lmig_core::session::{Destination, Source};
use lmig_core::testing::{MarkTracker, NullProgram, PairEnd, VecMemory, channel_pair, one_region};
use lmig_core::{Channel, SocketSink, SocketSource};

const PAGES: u64 = 64;

/// Sockets whose queues hold `queued` bytes by their estimate.
struct Queued {
    queued: u64,
    asked: usize,
}

impl SocketSource for Queued {
    fn freeze(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        emit(vec![SocketRecord::Listen(TcpListenState {
            id: 1,
            local: "127.0.0.1:1".parse().unwrap(),
            backlog: 1,
            sock: Default::default(),
            tcp: Default::default(),
        })])
    }
    fn queued_bytes(&mut self) -> lmig_core::Result<u64> {
        self.asked += 1;
        Ok(self.queued)
    }
    fn abort(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn release(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Sink(usize);

impl SocketSink for Sink {
    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        self.0 += batch.len();
        Ok(())
    }
    fn activate(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn discard(&mut self) {}
}

/// The destination's channel end: what it was asked to warm, and the
/// messages it received, in order (`warm(n)` among them).
struct Recording {
    inner: PairEnd,
    log: Mutex<Vec<String>>,
}

impl Channel for Recording {
    fn send(&self, msg: &Message) -> lmig_core::Result<()> {
        self.inner.send(msg)
    }
    fn recv(&self, timeout: Option<Duration>) -> lmig_core::Result<Option<Message>> {
        let got = self.inner.recv(timeout)?;
        if let Some(m) = &got {
            let entry = match m {
                Message::QueueEstimate { bytes } => format!("estimate {bytes}"),
                m => m.name().to_string(),
            };
            self.log.lock().unwrap().push(entry);
        }
        Ok(got)
    }
    fn warm_receive(&self, bytes: u64) {
        self.log.lock().unwrap().push(format!("warm {bytes}"));
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// One migration with sockets estimating `queued` bytes: the destination's log.
fn migrate(queued: u64) -> Vec<String> {
    let layout = one_region(RegionId(1), PAGES);
    let src = VecMemory::labelled(&layout, RegionId(1), 0..PAGES);
    let dst = VecMemory::empty();
    let (a, b) = channel_pair(1);
    let b = Recording {
        inner: b,
        log: Mutex::default(),
    };
    let mut tracker = MarkTracker::new(&layout);
    let mut program = NullProgram::default();
    let mut sockets = Queued { queued, asked: 0 };
    let mut sink = Sink::default();
    let (s, d) = std::thread::scope(|s| {
        let d = s.spawn(|| {
            Destination::new(&b, &dst, NullProgram::default())
                .with_sockets(&mut sink)
                .run()
        });
        let r = Source::new(&a, &src, &mut tracker, &mut program)
            .with_sockets(&mut sockets)
            .run();
        (r, d.join().unwrap())
    });
    assert_eq!(s.expect("source").verification, Verification::Verified);
    d.expect("destination");
    assert!(sockets.asked > 0, "the policy asked for the estimate");
    assert_eq!(sink.0, 1, "the record was restored");
    assert_eq!(dst.snapshot(RegionId(1)), src.snapshot(RegionId(1)));
    b.log.into_inner().unwrap()
}

#[test]
fn the_estimate_warms_the_destination_before_the_freeze_and_is_given_back_after() {
    let log = migrate(5 << 20);
    let pos = |e: &str| log.iter().position(|l| l == e);
    let estimate = pos("estimate 5242880").expect("the estimate was sent");
    let warm = pos("warm 5242880").expect("the destination warmed its receive memory");
    let sockets = pos("Sockets").expect("the freeze's socket batches");
    let handover = pos("Handover").expect("handover");
    let given_back = pos("warm 0").expect("the rest given back");
    assert!(
        estimate < warm && warm < sockets && handover < given_back,
        "in that order: {log:?}"
    );
}

#[test]
fn an_estimate_of_zero_sends_and_warms_nothing() {
    let log = migrate(0);
    assert!(
        !log.iter().any(|l| l.starts_with("estimate")),
        "no estimate sent: {log:?}"
    );
    assert!(
        !log.iter().any(|l| l.starts_with("warm") && l != "warm 0"),
        "nothing warmed: {log:?}"
    );
}

#[test]
fn an_estimate_over_the_cap_is_sent_capped() {
    let log = migrate(u64::MAX);
    let cap = format!("estimate {MAX_QUEUE_ESTIMATE}");
    assert!(log.contains(&cap), "{log:?}");
}
