//! A channel that misbehaves at one chosen message: the generalisation of
//! [`CutChannel`](super::CutChannel) that the fault-injection suite
//! (`examples/src/bench/faults.rs`, `lmig-bench faults`) drives through every
//! protocol step.
//!
//! # Counting
//!
//! A [`FaultChannel`] wraps one end and counts every message *that end*
//! handles, sends and receives together, in the order it handles them
//! (from 1): `send`, `send_pages`, `send_urgent`, `send_lane`, each message
//! of `send_urgent_many`, and each message `recv` or `recv_urgent` returns.
//! Every other [`Channel`] method is forwarded to the wrapped channel
//! (`urgent_fd` too: a destination's post-copy fault path runs in one
//! thread over a `FaultChannel` as over the channel it wraps). Counting per end (not across both ends) keeps the
//! index a property of one side's state machine; a suite wraps the source's
//! end for some runs and the destination's for others. Pages sent on several
//! lanes at once are counted in the order their sends start, so the index of
//! a page message may differ by a few between runs; the protocol steps
//! around them (layout, freeze, `Ready`, `Commit`, digests, `Done`) keep
//! theirs. Run once with [`Fault::never`] and read
//! [`FaultChannel::messages`] to learn how many indices a migration has.
//!
//! Corruption and truncation belong on the real wire, under the encryption:
//! the suite does those with a byte-level proxy in front of
//! `lmig-transport`'s TCP channel, not here.

use std::os::fd::RawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::error::{MigrationError, Result};
use crate::protocol::{Message, PageBatch};
use crate::traits::Channel;

/// What a [`FaultChannel`] does at its fault index.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultKind {
    /// The connection breaks: the operation fails and the channel is shut
    /// down, as if the link dropped or this side died there.
    Break,
    /// The operation hangs for the given time (choose it longer than the
    /// peer's timeouts), then the connection breaks; a message being sent or
    /// received is lost.
    Stall(Duration),
    /// The message is sent twice, or delivered twice to this side.
    Duplicate,
}

impl FaultKind {
    /// A short name for reports: `"break"`, `"stall"`, `"duplicate"`.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Break => "break",
            FaultKind::Stall(_) => "stall",
            FaultKind::Duplicate => "duplicate",
        }
    }
}

/// Where and how a [`FaultChannel`] misbehaves.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fault {
    /// What happens.
    pub kind: FaultKind,
    /// At which message this end handles (from 1; 0 never fires).
    pub at: u32,
    /// Instead of an index: the first message of this name (as
    /// [`Message::name`] gives it) this end handles. Where messages of
    /// several lanes interleave, a protocol step's index may move by one
    /// between runs; its name does not.
    pub on: Option<&'static str>,
}

impl Fault {
    /// `kind` at message `at`.
    pub fn new(kind: FaultKind, at: u32) -> Self {
        Self { kind, at, on: None }
    }

    /// `kind` at the first message named `name` this end handles.
    pub fn on_message(kind: FaultKind, name: &'static str) -> Self {
        Self {
            kind,
            at: 0,
            on: Some(name),
        }
    }

    /// No fault: for the run that counts the messages.
    pub fn never() -> Self {
        Self {
            kind: FaultKind::Break,
            at: 0,
            on: None,
        }
    }
}

/// One channel end that misbehaves at one message; see the module docs.
pub struct FaultChannel<C> {
    inner: C,
    fault: Fault,
    count: AtomicU32,
    fired: Mutex<Option<(u32, &'static str)>>,
    /// The name of the thread that met the fault.
    fired_on: Mutex<Option<String>>,
    broken: AtomicBool,
    /// A received message to deliver a second time.
    again: Mutex<Option<Message>>,
    /// The same for the urgent lane ([`Channel::recv_urgent`]).
    again_urgent: Mutex<Option<Message>>,
}

/// What happens to the operation being counted.
enum Step {
    Pass,
    Twice,
    Fail,
}

impl<C: Channel> FaultChannel<C> {
    /// Wrap `inner`, misbehaving at `fault`.
    pub fn new(inner: C, fault: Fault) -> Self {
        Self {
            inner,
            fault,
            count: AtomicU32::new(0),
            fired: Mutex::new(None),
            fired_on: Mutex::new(None),
            broken: AtomicBool::new(false),
            again: Mutex::new(None),
            again_urgent: Mutex::new(None),
        }
    }

    /// Messages this end handled so far (sent and received).
    pub fn messages(&self) -> u32 {
        self.count.load(Ordering::SeqCst)
    }

    /// The index and name of the message the fault hit, once it fired.
    pub fn fired(&self) -> Option<(u32, &'static str)> {
        *self.fired.lock().expect("poisoned")
    }

    /// The name of the thread whose send or receive met the fault (the
    /// session's roles run in named threads: a test can tell which one
    /// saw it), once it fired; `""` for a thread without a name.
    pub fn fired_thread(&self) -> Option<String> {
        self.fired_on.lock().expect("poisoned").clone()
    }

    /// The wrapped channel.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    fn closed() -> MigrationError {
        MigrationError::channel_closed("connection broken (fault injected)")
    }

    fn check_open(&self) -> Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(Self::closed());
        }
        Ok(())
    }

    fn break_now(&self) -> MigrationError {
        self.broken.store(true, Ordering::SeqCst);
        self.inner.shutdown();
        Self::closed()
    }

    /// Count one message named `name` and decide what happens to it.
    fn step(&self, name: &'static str) -> Step {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        let mut fired = self.fired.lock().expect("poisoned");
        let hit = match self.fault.on {
            Some(wanted) => wanted == name && fired.is_none(),
            None => n == self.fault.at,
        };
        if !hit {
            return Step::Pass;
        }
        *fired = Some((n, name));
        drop(fired);
        let thread = std::thread::current().name().unwrap_or("").to_owned();
        *self.fired_on.lock().expect("poisoned") = Some(thread);
        match self.fault.kind {
            FaultKind::Break => Step::Fail,
            FaultKind::Stall(d) => {
                std::thread::sleep(d);
                Step::Fail
            }
            FaultKind::Duplicate => Step::Twice,
        }
    }

    fn sending(&self, name: &'static str, send: impl Fn() -> Result<()>) -> Result<()> {
        self.check_open()?;
        match self.step(name) {
            Step::Pass => send(),
            Step::Twice => {
                send()?;
                send()
            }
            Step::Fail => Err(self.break_now()),
        }
    }

    /// Count a message received from the inner channel; a duplicate is
    /// kept in `again` (the slot of the lane it came on).
    fn received(
        &self,
        got: Result<Option<Message>>,
        again: &Mutex<Option<Message>>,
    ) -> Result<Option<Message>> {
        let Some(msg) = got? else {
            return Ok(None);
        };
        match self.step(msg.name()) {
            Step::Pass => Ok(Some(msg)),
            Step::Twice => {
                *again.lock().expect("poisoned") = Some(msg.clone());
                Ok(Some(msg))
            }
            Step::Fail => Err(self.break_now()),
        }
    }

    /// The duplicate kept in `again`, counted (it is a message received too).
    fn take_again(&self, again: &Mutex<Option<Message>>) -> Option<Message> {
        let m = again.lock().expect("poisoned").take()?;
        self.count.fetch_add(1, Ordering::SeqCst);
        Some(m)
    }
}

impl<C: Channel> Channel for FaultChannel<C> {
    fn warm_receive(&self, bytes: u64) {
        self.inner.warm_receive(bytes)
    }

    fn send(&self, msg: &Message) -> Result<()> {
        self.sending(msg.name(), || self.inner.send(msg))
    }

    fn send_pages(&self, lane: usize, batch: &PageBatch) -> Result<()> {
        self.sending("Pages", || self.inner.send_pages(lane, batch))
    }

    fn send_urgent(&self, msg: &Message) -> Result<()> {
        self.sending(msg.name(), || self.inner.send_urgent(msg))
    }

    /// Each message counted as [`Channel::send_urgent`] counts it; those
    /// before a break still go out (in one write, as the inner channel
    /// sends them), the one it hits and the rest do not.
    fn send_urgent_many(&self, msgs: &[Message]) -> Result<()> {
        self.check_open()?;
        let mut out = Vec::with_capacity(msgs.len());
        for msg in msgs {
            match self.step(msg.name()) {
                Step::Pass => out.push(msg.clone()),
                Step::Twice => out.extend([msg.clone(), msg.clone()]),
                Step::Fail => {
                    self.inner.send_urgent_many(&out)?;
                    return Err(self.break_now());
                }
            }
        }
        self.inner.send_urgent_many(&out)
    }

    fn send_lane(&self, lane: usize, msg: &Message) -> Result<()> {
        self.sending(msg.name(), || self.inner.send_lane(lane, msg))
    }

    fn data_lanes(&self) -> usize {
        self.inner.data_lanes()
    }

    fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
        self.inner.ip_addresses()
    }

    fn flush(&self) -> Result<()> {
        self.check_open()?;
        self.inner.flush()
    }

    fn recv(&self, timeout: Option<Duration>) -> Result<Option<Message>> {
        self.check_open()?;
        if let Some(m) = self.take_again(&self.again) {
            return Ok(Some(m));
        }
        let got = self.inner.recv(timeout);
        self.check_open()?;
        self.received(got, &self.again)
    }

    /// A duplicate of an urgent message comes again on the urgent lane
    /// (before anything else there, without the lane's descriptor turning
    /// readable: a message already in the channel's buffers, as
    /// [`Channel::urgent_fd`] allows).
    fn recv_urgent(&self, timeout: Duration) -> Result<Option<Message>> {
        self.check_open()?;
        if let Some(m) = self.take_again(&self.again_urgent) {
            return Ok(Some(m));
        }
        let got = self.inner.recv_urgent(timeout);
        if let Err(MigrationError::Unsupported { .. }) = got {
            return got;
        }
        self.check_open()?;
        self.received(got, &self.again_urgent)
    }

    fn reconnect(&self) -> Result<()> {
        self.inner.reconnect()
    }

    fn shutdown(&self) {
        self.inner.shutdown()
    }

    /// The inner channel's descriptor, so a destination's fault path runs
    /// in one thread over this channel as over the inner one; a message
    /// then read through [`Channel::recv_urgent`] meets the fault as any
    /// other. Once broken: the error every other call gives.
    fn urgent_fd(&self) -> Result<Option<RawFd>> {
        self.check_open()?;
        self.inner.urgent_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{RegionId, RegionInfo, RegionLayout};
    use crate::session::{Destination, DestinationConfig, Source, SourceConfig};
    use crate::testing::{MarkTracker, NullProgram, VecMemory, channel_pair};

    const T: Option<Duration> = Some(Duration::from_secs(5));

    #[test]
    fn break_fails_that_message_and_every_later_one() {
        let (a, b) = channel_pair(1);
        let a = FaultChannel::new(a, Fault::new(FaultKind::Break, 2));
        a.send(&Message::Ready).unwrap();
        assert!(a.send(&Message::Commit).is_err());
        assert!(a.send(&Message::Ready).is_err());
        assert_eq!(a.fired(), Some((2, "Commit")));
        assert_eq!(b.recv(T).unwrap(), Some(Message::Ready));
        assert!(b.recv(T).is_err(), "the peer sees the break");
    }

    /// `send_urgent_many` counts each message: those before the break go
    /// out, the one it hits and the rest do not; `send_lane` counts too.
    #[test]
    fn a_batch_of_urgent_messages_breaks_at_its_message() {
        let (a, b) = channel_pair(1);
        let a = FaultChannel::new(a, Fault::new(FaultKind::Break, 3));
        a.send_lane(0, &Message::Ready).unwrap();
        let batch = [Message::Ready, Message::Commit, Message::Ready];
        assert!(a.send_urgent_many(&batch).is_err());
        assert_eq!(a.fired(), Some((3, "Commit")));
        assert_eq!(a.fired_thread().as_deref(), std::thread::current().name());
        assert_eq!(b.recv(T).unwrap(), Some(Message::Ready), "send_lane");
        assert_eq!(b.recv(T).unwrap(), Some(Message::Ready), "before the break");
        assert!(b.recv(T).is_err(), "nothing after it; the link is gone");
        assert!(a.urgent_fd().is_err(), "broken: every call fails");
        let (a, _b) = channel_pair(1);
        let a = FaultChannel::new(a, Fault::new(FaultKind::Duplicate, 1));
        a.send_urgent_many(&batch[..1]).unwrap();
        assert_eq!(a.messages(), 1);
        assert!(
            matches!(a.urgent_fd(), Err(MigrationError::Unsupported { .. })),
            "the inner channel's answer"
        );
    }

    /// Both test channels answer `ip_addresses` as the channel they wrap:
    /// the source's refusal of a channel on a moving address is seen
    /// through them (it was not through either before), and `CutChannel`
    /// counts sends on every lane.
    #[test]
    fn wrappers_forward_the_channels_addresses() {
        struct OnIp(crate::testing::PairEnd);
        impl Channel for OnIp {
            fn send(&self, msg: &Message) -> Result<()> {
                self.0.send(msg)
            }
            fn recv(&self, timeout: Option<Duration>) -> Result<Option<Message>> {
                self.0.recv(timeout)
            }
            fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
                vec!["198.51.100.7".parse().unwrap()]
            }
        }
        let (a, b) = channel_pair(1);
        let want = OnIp(a).ip_addresses();
        assert_eq!(
            FaultChannel::new(OnIp(b), Fault::never()).ip_addresses(),
            want
        );
        let (a, _b) = channel_pair(1);
        let cut = crate::testing::CutChannel::new(OnIp(a), crate::testing::Cut::Send("Ready", 2));
        assert_eq!(cut.ip_addresses(), want);
        cut.send_lane(0, &Message::Ready).unwrap();
        assert!(
            cut.send_urgent(&Message::Ready).is_err(),
            "the second Ready"
        );
        assert!(cut.was_cut());
    }

    #[test]
    fn duplicate_sends_twice_and_delivers_twice() {
        let (a, b) = channel_pair(1);
        let a = FaultChannel::new(a, Fault::new(FaultKind::Duplicate, 1));
        let b = FaultChannel::new(b, Fault::new(FaultKind::Duplicate, 3));
        a.send(&Message::Ready).unwrap();
        a.send(&Message::Commit).unwrap();
        assert_eq!(b.recv(T).unwrap(), Some(Message::Ready));
        assert_eq!(b.recv(T).unwrap(), Some(Message::Ready));
        assert_eq!(b.recv(T).unwrap(), Some(Message::Commit));
        assert_eq!(b.recv(T).unwrap(), Some(Message::Commit));
        assert_eq!((a.messages(), b.messages()), (2, 4));
    }

    #[test]
    fn stall_holds_the_message_then_breaks() {
        let (a, b) = channel_pair(1);
        let a = FaultChannel::new(
            a,
            Fault::new(FaultKind::Stall(Duration::from_millis(20)), 1),
        );
        assert!(a.send(&Message::Ready).is_err());
        assert!(b.recv(T).is_err(), "nothing arrives; the link is gone");
    }

    /// A break at every message of either end of a VecMemory migration:
    /// before `Commit` the source program runs on with its memory, after it
    /// the destination holds every page.
    #[test]
    fn a_break_at_every_message_keeps_the_commit_rule() {
        let layout =
            RegionLayout::new(vec![RegionInfo::new(RegionId(1), 32 * 4096, 4096).unwrap()])
                .unwrap();
        let src_mem = VecMemory::new(&layout);
        for p in 0..32u64 {
            src_mem.fill(RegionId(1), p, &[p as u8 + 1; 64]);
        }
        let image = src_mem.snapshot(RegionId(1));
        let run = |fs: Fault, fd: Fault| {
            let (a, b) = channel_pair(2);
            let (a, b) = (FaultChannel::new(a, fs), FaultChannel::new(b, fd));
            let dst_mem = VecMemory::new(&layout);
            let mut sp = NullProgram::default();
            let mut dp = NullProgram::default();
            let mut tracker = MarkTracker::new(&layout);
            let cfg = SourceConfig {
                ready_timeout: Duration::from_secs(2),
                done_timeout: Duration::from_secs(2),
                batch_pages: 4,
                ..SourceConfig::default()
            };
            std::thread::scope(|s| {
                let d = s.spawn(|| {
                    let r = Destination::new(&b, &dst_mem, &mut dp)
                        .with_config(DestinationConfig {
                            idle_timeout: Duration::from_secs(2),
                            ..DestinationConfig::default()
                        })
                        .run();
                    b.shutdown();
                    r
                });
                let _ = Source::new(&a, &src_mem, &mut tracker, &mut sp)
                    .with_config(cfg)
                    .run();
                a.shutdown();
                let _ = d.join().unwrap();
            });
            if !sp.committed {
                assert!(!sp.is_paused(), "source left paused ({fs:?} {fd:?})");
                assert!(!dp.committed, "destination ran without Commit");
            } else if dp.committed {
                assert_eq!(dst_mem.snapshot(RegionId(1)), image, "{fs:?} {fd:?}");
            }
            assert_eq!(src_mem.snapshot(RegionId(1)), image);
            (a.messages(), b.messages())
        };
        let (ns, nd) = run(Fault::never(), Fault::never());
        assert!(ns > 5 && nd > 5, "a migration has messages: {ns} {nd}");
        for at in 1..=ns {
            run(Fault::new(FaultKind::Break, at), Fault::never());
        }
        for at in 1..=nd {
            run(Fault::never(), Fault::new(FaultKind::Break, at));
        }
    }

    /// One migration of 32 pages over a pair wrapped in `fs` / `fd`; the
    /// programs, the results and the message counts. Bounded: a session
    /// that waits forever fails the test instead of hanging it.
    #[allow(clippy::type_complexity)]
    fn bounded_run(
        src_mem: std::sync::Arc<VecMemory>,
        fs: Fault,
        fd: Fault,
    ) -> (
        NullProgram,
        NullProgram,
        Result<crate::session::SourceReport>,
        Result<crate::session::DestinationReport>,
        Vec<u8>,
        (u32, u32),
    ) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let layout = MemorySource::layout(&*src_mem);
            let (a, b) = channel_pair(2);
            let (a, b) = (FaultChannel::new(a, fs), FaultChannel::new(b, fd));
            let dst_mem = VecMemory::new(&layout);
            let mut sp = NullProgram::default();
            let mut dp = NullProgram::default();
            let mut tracker = MarkTracker::new(&layout);
            let cfg = SourceConfig {
                ready_timeout: Duration::from_secs(2),
                done_timeout: Duration::from_secs(2),
                batch_pages: 4,
                ..SourceConfig::default()
            };
            let (rs, rd) = std::thread::scope(|s| {
                let d = s.spawn(|| {
                    let r = Destination::new(&b, &dst_mem, &mut dp)
                        .with_config(DestinationConfig {
                            idle_timeout: Duration::from_secs(2),
                            ..DestinationConfig::default()
                        })
                        .run();
                    b.shutdown();
                    r
                });
                let rs = Source::new(&a, &*src_mem, &mut tracker, &mut sp)
                    .with_config(cfg)
                    .run();
                a.shutdown();
                (rs, d.join().unwrap())
            });
            let counts = (a.messages(), b.messages());
            let _ = tx.send((sp, dp, rs, rd, dst_mem.snapshot(RegionId(1)), counts));
        });
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the migration hung ({fs:?} {fd:?})"))
    }

    fn filled() -> (std::sync::Arc<VecMemory>, Vec<u8>) {
        let layout =
            RegionLayout::new(vec![RegionInfo::new(RegionId(1), 32 * 4096, 4096).unwrap()])
                .unwrap();
        let mem = VecMemory::new(&layout);
        for p in 0..32u64 {
            mem.fill(RegionId(1), p, &[p as u8 + 1; 64]);
        }
        let image = mem.snapshot(RegionId(1));
        (std::sync::Arc::new(mem), image)
    }

    use crate::traits::MemorySource;

    /// A message delivered twice, at every message of either end: the
    /// sessions end (never wait forever); before `Commit` a duplicate is a
    /// protocol error (the source resumes, the destination discards; one
    /// refused after `Ready` may cross `Commit`: then the one-way window's
    /// reported outcome); a duplicate after `Commit` (a second `Ready` at
    /// the source, a second `Commit` or `Digests` at the destination) is
    /// ignored and the migration completes.
    #[test]
    fn a_duplicate_at_every_message_ends_and_keeps_the_commit_rule() {
        let (_, _, _, _, _, (ns, nd)) = bounded_run(filled().0, Fault::never(), Fault::never());
        let faults = (1..=ns)
            .map(|at| (Fault::new(FaultKind::Duplicate, at), Fault::never()))
            .chain((1..=nd).map(|at| (Fault::never(), Fault::new(FaultKind::Duplicate, at))));
        for (fs, fd) in faults {
            let (mem, image) = filled();
            let (sp, dp, rs, rd, dst, _) = bounded_run(mem.clone(), fs, fd);
            if sp.committed && !dp.committed {
                // A duplicate the destination refused after `Ready` (a
                // second `Handover`) while `Commit` was on its way: the
                // one-way window, reported on both sides.
                assert!(
                    matches!(rs, Err(MigrationError::CommitUnconfirmed { .. })),
                    "{fs:?} {fd:?} {rs:?}"
                );
                assert!(!rd.unwrap_err().after_commit(), "{fs:?} {fd:?}");
                assert_eq!(sp.resumed, 0, "resumed after Commit: {fs:?} {fd:?}");
                assert_eq!(mem.handed_over(), Some(false));
            } else if sp.committed {
                assert_eq!(dst, image, "{fs:?} {fd:?}");
                assert!(
                    rs.is_ok(),
                    "a duplicate after Commit fails the source: {fs:?} {fd:?} {rs:?}"
                );
            } else {
                assert!(!sp.is_paused(), "source left paused ({fs:?} {fd:?})");
                assert!(!dp.committed, "destination ran without Commit");
                assert!(rs.unwrap_err().source_may_run());
            }
            assert_eq!(mem.snapshot(RegionId(1)), image);
        }
    }

    /// The one-way window: the destination loses `Commit` (its end breaks
    /// as it arrives). The destination discards and never runs; the source
    /// never resumes, reports `CommitUnconfirmed`, keeps every byte, and a
    /// second migration of the same memory is refused with
    /// `HandedOverBefore { confirmed: false }` (nothing sent but `Abort`,
    /// the program not touched). After a confirmed migration the refusal
    /// says `confirmed: true`.
    #[test]
    fn a_lost_commit_is_reported_and_the_next_attempt_says_so() {
        let (mem, image) = filled();
        let (_, _, rs, _, _, (_, nd)) = bounded_run(mem.clone(), Fault::never(), Fault::never());
        assert!(rs.is_ok());
        assert_eq!(mem.handed_over(), Some(true));
        let again = bounded_run(mem, Fault::never(), Fault::never());
        assert!(
            matches!(
                again.2,
                Err(MigrationError::HandedOverBefore { confirmed: true })
            ),
            "{:?}",
            again.2
        );
        assert!(matches!(again.3, Err(MigrationError::PeerAborted { .. })));

        // The destination breaks as `Commit` arrives (by name: its index
        // moves by one between runs where page lanes interleave with it).
        let _ = nd;
        let (mem, _) = filled();
        let lost = Fault::on_message(FaultKind::Break, "Commit");
        let (sp, dp, rs, rd, _, _) = bounded_run(mem.clone(), Fault::never(), lost);
        let e = rs.unwrap_err();
        assert!(matches!(e, MigrationError::CommitUnconfirmed { .. }), "{e}");
        assert!(!e.source_may_run());
        assert!(sp.committed && sp.paused == 1 && sp.resumed == 0, "{sp:?}");
        assert!(!dp.committed && dp.discarded, "{dp:?}");
        assert!(!rd.unwrap_err().after_commit());
        assert_eq!(
            mem.snapshot(RegionId(1)),
            image,
            "the source keeps every byte"
        );
        assert_eq!(mem.handed_over(), Some(false));
        let (sp2, dp2, rs2, rd2, _, _) = bounded_run(mem, Fault::never(), Fault::never());
        let e = rs2.unwrap_err();
        assert!(
            matches!(e, MigrationError::HandedOverBefore { confirmed: false }),
            "{e}"
        );
        assert!(e.to_string().contains("never confirmed"), "{e}");
        assert!(!e.source_may_run());
        assert_eq!(
            (sp2.paused, sp2.resumed),
            (0, 0),
            "the program is not touched"
        );
        assert!(!dp2.committed);
        assert!(
            matches!(rd2, Err(MigrationError::PeerAborted { .. })),
            "{rd2:?}"
        );
    }
}
