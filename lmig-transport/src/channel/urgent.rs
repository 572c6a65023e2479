//! The urgent stream read by its consumer itself (post-copy).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lmig_core::MigrationError;
use lmig_core::protocol::Message;

use super::conn::{Conn, FrameReader};
use super::event::{Event, read_event_within};
use super::queue::EventQueue;
use super::{ChannelConfig, lock};
use crate::error::TransportError;

/// The urgent stream's reader and its generation, once handed over.
type Slot = Option<(u32, FrameReader)>;

/// What one direct read of the urgent stream gave.
enum DirectRead {
    /// A message.
    Msg(Message),
    /// Nothing arrived in time.
    Idle,
    /// The stream ended or failed; its event is queued for `recv`.
    Ended,
}

/// The urgent stream read by its consumer itself.
///
/// At first a reader thread reads the urgent stream like any other and
/// queues its messages. Once a consumer calls [`Channel::recv_urgent`](lmig_core::Channel::recv_urgent)
/// (post-copy's dedicated urgent thread), the reader thread hands its reader
/// over here after its next message and ends, and `recv_urgent` reads the
/// stream directly: a page request or reply then wakes the thread that acts
/// on it, not a reader thread that has to wake it in turn (one thread
/// wake-up less per request and per reply). Readers of later
/// generations (after `reconnect`) go straight here.
///
/// `recv_urgent` waits for the next message in `read` itself, not in a
/// `poll` before it (one system call fewer per post-copy request and per
/// reply): the socket's read timeout is the caller's wait in whole
/// milliseconds, set again only when that changes (a consumer waits the
/// same tick each time). A wait under 1 ms (or none) looks with `poll`.
/// Once a frame has begun, a peer that stops in its middle fails the
/// stream after [`ChannelConfig::handshake_timeout`] instead of holding the
/// consumer ([`FrameReader::next_within`]).
///
/// Within [`ChannelConfig::urgent_spin`] of this side's last urgent send,
/// `recv_urgent` busy-polls the stream (yielding the CPU between looks)
/// before it sleeps: the answer then finds its thread running, one wake-up
/// fewer on the post-copy fault path (see [`DirectUrgent::spin_readable`]).
pub(super) struct DirectUrgent {
    /// A consumer called `recv_urgent`.
    wanted: AtomicBool,
    /// The urgent stream's reader and its generation, once handed over.
    slot: Mutex<Slot>,
    /// Longest a started frame may take to arrive in full.
    frame_timeout: Duration,
    /// The stream's write timeout (the socket's timeouts are shared by its
    /// reading and writing halves).
    write_timeout: Option<Duration>,
    /// The read timeout set on the handed-over stream, in ms (0: the
    /// frame timeout `put` set). Changed under the slot's lock.
    read_wait_ms: AtomicU64,
    /// How long after an urgent send a receive busy-polls.
    spin: Duration,
    /// The clock's origin for `sent_at`.
    epoch: Instant,
    /// When this side last sent on the urgent stream, in ns since `epoch`
    /// plus one (0: never).
    sent_at: AtomicU64,
    /// Messages found by the busy-poll (not by a sleep in `poll`).
    spin_hits: AtomicU64,
}

impl DirectUrgent {
    pub(super) fn new(config: &ChannelConfig) -> Self {
        Self {
            wanted: AtomicBool::new(false),
            slot: Mutex::new(None),
            frame_timeout: config.handshake_timeout,
            write_timeout: config.write_timeout,
            read_wait_ms: AtomicU64::new(0),
            spin: config.urgent_spin,
            epoch: Instant::now(),
            sent_at: AtomicU64::new(0),
            spin_hits: AtomicU64::new(0),
        }
    }

    /// This side just sent on the urgent stream: an answer may follow
    /// within a round trip.
    pub(super) fn note_sent(&self) {
        if self.spin.is_zero() {
            return;
        }
        let ns = self
            .epoch
            .elapsed()
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64;
        self.sent_at.store(ns + 1, Ordering::Release);
    }

    /// Until when a receive busy-polls: `urgent_spin` after the last send.
    fn spin_until(&self) -> Option<Instant> {
        match self.sent_at.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns - 1) + self.spin),
        }
    }

    /// Busy-poll `conn` until it is readable, at most until `spin_until`
    /// and `limit`. Between looks (each a `poll` with no timeout) the CPU
    /// goes to any other runnable thread: on a machine with few CPUs the
    /// thread that is to send the answer may need this one's. Returns
    /// whether bytes are there (`false`: the caller sleeps in `poll`).
    fn spin_readable(&self, conn: &dyn Conn, limit: Instant) -> io::Result<bool> {
        let Some(until) = self.spin_until() else {
            return Ok(false);
        };
        let until = until.min(limit);
        // Bounded by `until`: the clock moves on between looks.
        while Instant::now() < until {
            if conn.wait_readable(Duration::ZERO)? {
                self.spin_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(true);
            }
            std::thread::yield_now();
        }
        Ok(false)
    }

    /// Get ready to wait until `limit` for the next frame: in `read`, with
    /// the wait (whole ms, rounded down) as the socket's read timeout;
    /// under 1 ms with `poll`. Returns whether to read now (`false`: the
    /// poll found nothing in time).
    fn wait_in_read(&self, conn: &dyn Conn, limit: Instant) -> io::Result<bool> {
        // The clock read again just before the wait: a read never waits
        // past `limit` (the whole ms rounded down).
        let left = limit.saturating_duration_since(Instant::now());
        let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 {
            return conn.wait_readable(left);
        }
        if self.read_wait_ms.load(Ordering::Relaxed) != ms {
            conn.set_timeouts(Some(Duration::from_millis(ms)), self.write_timeout)?;
            self.read_wait_ms.store(ms, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Hand `reader` of `generation` to the consumer (unless a later
    /// generation's is there already).
    pub(super) fn put(&self, slot: &mut Slot, generation: u32, reader: FrameReader) {
        if slot.as_ref().is_some_and(|(g, _)| *g > generation) {
            return;
        }
        if let Err(e) = reader
            .conn()
            .set_timeouts(Some(self.frame_timeout), self.write_timeout)
        {
            debug!(error = %e, "setting the urgent stream's timeouts failed");
        }
        self.read_wait_ms.store(0, Ordering::Relaxed);
        *slot = Some((generation, reader));
    }

    /// A consumer called `recv_urgent`: the reader thread hands over.
    pub(super) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// The slot, locked.
    pub(super) fn slot(&self) -> MutexGuard<'_, Slot> {
        lock(&self.slot)
    }

    /// [`lmig_core::Channel::urgent_fd`]: the handed-over stream's
    /// descriptor; `None` while a reader thread still reads the stream
    /// (until the first message after the first [`Self::recv`]), after the
    /// stream ended, or when it has none.
    pub(super) fn fd(&self) -> Option<RawFd> {
        self.slot().as_ref().and_then(|(_, r)| r.conn().raw_fd())
    }

    /// [`lmig_core::Channel::recv_urgent`]: the next urgent message,
    /// queued by the reader thread or read here once it handed over.
    pub(super) fn recv(
        &self,
        queue: &EventQueue<Event>,
        closed: &AtomicBool,
        timeout: Duration,
    ) -> lmig_core::Result<Option<Message>> {
        // Two clock reads on the way to a direct read (not four): this
        // one, which the first look reuses (a later one, after a queued
        // event that was not a message or a stream that ended, reads the
        // clock again), and the one just before the wait.
        let start = Instant::now();
        let deadline = start + timeout;
        let mut first = true;
        self.wanted.store(true, Ordering::Release);
        loop {
            if closed.load(Ordering::Acquire) {
                return Err(MigrationError::channel_closed("the channel was shut down"));
            }
            let slot = self.slot();
            // What the reader thread queued comes first; its end or failure
            // went to `recv`.
            match queue.try_pop_urgent() {
                Some(Event::Msg(m)) => return Ok(Some(m)),
                Some(_) => continue,
                None => {}
            }
            let now = if std::mem::take(&mut first) {
                start
            } else {
                Instant::now()
            };
            if slot.is_none() {
                drop(slot);
                // The reader thread still reads: its next message wakes us
                // (and hands its reader over).
                match queue.pop_urgent(deadline) {
                    Some(Event::Msg(m)) => return Ok(Some(m)),
                    Some(_) => continue,
                    None if Instant::now() >= deadline => return Ok(None),
                    None => continue,
                }
            }
            // A zero timeout still takes a message already there (a
            // consumer draining what arrived together).
            if now >= deadline && !timeout.is_zero() {
                return Ok(None);
            }
            match self.read_direct(slot, queue, deadline) {
                DirectRead::Msg(m) => return Ok(Some(m)),
                DirectRead::Idle => return Ok(None),
                DirectRead::Ended => {}
            }
        }
    }

    /// Read the next message from the handed-over reader in `slot`,
    /// waiting at most until `limit` for its first bytes. The stream's end
    /// or failure goes to `recv`, like a reader thread's.
    fn read_direct(
        &self,
        mut slot: MutexGuard<'_, Slot>,
        queue: &EventQueue<Event>,
        limit: Instant,
    ) -> DirectRead {
        let Some((generation, reader)) = slot.as_mut() else {
            return DirectRead::Ended;
        };
        let ready = match self.spin_readable(reader.conn(), limit) {
            Ok(true) => Ok(true),
            Ok(false) => self.wait_in_read(reader.conn(), limit),
            Err(e) => Err(e),
        };
        let ev = match ready {
            Ok(false) => return DirectRead::Idle,
            Ok(true) => match read_event_within(reader, *generation, self.frame_timeout) {
                None => return DirectRead::Idle,
                Some(Event::Msg(m)) => return DirectRead::Msg(m),
                // A frame began: a timeout is one that stopped half-way.
                Some(Event::Failed(g, TransportError::Timeout { .. })) => Event::Failed(
                    g,
                    TransportError::Timeout {
                        waiting_for: "the rest of a frame on the urgent stream",
                        after: self.frame_timeout,
                    },
                ),
                Some(ev) => ev,
            },
            Err(e) => {
                let ev = Event::Failed(
                    *generation,
                    TransportError::io("waiting on the urgent stream", e),
                );
                *slot = None;
                drop(slot);
                if queue.push(ev, false).is_err() {
                    debug!("the urgent stream failed after the channel closed");
                }
                return DirectRead::Ended;
            }
        };
        if let Some((_, r)) = slot.take() {
            r.conn().shutdown_conn();
        }
        drop(slot);
        if queue.push(ev, false).is_err() {
            debug!("the urgent stream ended after the channel closed");
        }
        DirectRead::Ended
    }
}

#[cfg(test)]
mod tests {
    use super::super::pipe::{PipeEnd, pipe};
    use std::io::Write;

    use super::*;
    use crate::AuthKey;
    use crate::wire::{HEADER_LEN, encode_message};

    impl DirectUrgent {
        fn spin_hits(&self) -> u64 {
            self.spin_hits.load(Ordering::Relaxed)
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    /// A consumer reading an urgent stream over a pipe directly (spinning
    /// `spin` after a send), and the peer's end.
    fn direct(spin: Duration) -> (DirectUrgent, PipeEnd) {
        let config = ChannelConfig::new(AuthKey::new([1u8; 32]).unwrap()).with_urgent_spin(spin);
        let direct = DirectUrgent::new(&config);
        let (ours, theirs) = pipe();
        let mut reader = FrameReader::new(Box::new(ours));
        reader.set_authenticated();
        direct.put(&mut direct.slot(), 0, reader);
        (direct, theirs)
    }

    fn request(page: u64) -> Message {
        Message::PageRequest(lmig_core::model::PageRun::new(
            lmig_core::model::RegionId(1),
            page,
            1,
        ))
    }

    /// Send `msg` from the peer's end after `delay`, on a thread of its own.
    fn send_after(
        peer: PipeEnd,
        delay: Duration,
        msg: Message,
    ) -> std::thread::JoinHandle<PipeEnd> {
        std::thread::spawn(move || {
            let mut peer = peer;
            std::thread::sleep(delay);
            encode_message(&msg).unwrap().write_to(&mut peer).unwrap();
            peer
        })
    }

    /// A consumer reading an urgent stream over a pipe directly, whose
    /// frames may pause up to `patience` half-way; the peer's end.
    fn direct_patient(patience: Duration) -> (DirectUrgent, PipeEnd) {
        let config =
            ChannelConfig::new(AuthKey::new([1u8; 32]).unwrap()).with_handshake_timeout(patience);
        let direct = DirectUrgent::new(&config);
        let (ours, theirs) = pipe();
        let mut reader = FrameReader::new(Box::new(ours));
        reader.set_authenticated();
        direct.put(&mut direct.slot(), 0, reader);
        (direct, theirs)
    }

    /// Write `bytes` from the peer's end in pieces cut at `cuts`, pausing
    /// `pause` before each later piece, on a thread of its own.
    fn send_in_pieces(
        peer: PipeEnd,
        bytes: Vec<u8>,
        cuts: Vec<usize>,
        pause: Duration,
    ) -> std::thread::JoinHandle<PipeEnd> {
        std::thread::spawn(move || {
            let mut peer = peer;
            let mut from = 0;
            for (i, to) in cuts.into_iter().chain([bytes.len()]).enumerate() {
                if i > 0 {
                    std::thread::sleep(pause);
                }
                // A stream given up is closed: the rest has nowhere to go.
                if peer.write_all(&bytes[from..to]).is_err() {
                    break;
                }
                from = to;
            }
            peer
        })
    }

    #[test]
    fn a_wait_in_read_ends_idle_and_loses_nothing() {
        let (direct, mut peer) = direct_patient(Duration::from_secs(10));
        let (q, closed) = (EventQueue::new(4), AtomicBool::new(false));
        let short = Duration::from_millis(30);
        // Nothing sent: the read times out, as an idle wait, not a failure.
        assert_eq!(direct.recv(&q, &closed, short).unwrap(), None);
        // The wait left in whole ms (scheduling may have taken a few).
        let set = || direct.read_wait_ms.load(Ordering::Relaxed);
        assert!((20..30).contains(&set()), "{}", set());
        assert!(q.pop(Some(Instant::now())).is_none());
        assert_eq!(direct.recv(&q, &closed, short).unwrap(), None);
        assert!((20..30).contains(&set()), "{}", set());
        encode_message(&request(1))
            .unwrap()
            .write_to(&mut peer)
            .unwrap();
        assert_eq!(direct.recv(&q, &closed, WAIT).unwrap(), Some(request(1)));
        let long = set();
        assert!((9000..10_000).contains(&long), "{long}");
        // Under 1 ms left: a look with `poll`, the timeout kept.
        let tiny = Duration::from_micros(500);
        assert_eq!(direct.recv(&q, &closed, tiny).unwrap(), None);
        assert_eq!(direct.recv(&q, &closed, Duration::ZERO).unwrap(), None);
        assert_eq!(set(), long);
        // A frame paused half-way (in its header, then in its payload) for
        // longer than the caller's wait arrives whole, and the next after it.
        let mut two = encode_message(&request(2)).unwrap().to_vec();
        two.extend(encode_message(&request(3)).unwrap().to_vec());
        let cuts = vec![3, HEADER_LEN + 2];
        let peer = send_in_pieces(peer, two, cuts, Duration::from_millis(80));
        let mut got = Vec::new();
        for _ in 0..200 {
            if let Some(m) = direct.recv(&q, &closed, short).unwrap() {
                got.push(m);
            }
            if got.len() == 2 {
                break;
            }
        }
        assert_eq!(got, vec![request(2), request(3)]);
        assert!(q.pop(Some(Instant::now())).is_none(), "no failure reported");
        let _peer = peer.join().unwrap();
    }

    #[test]
    fn a_frame_stopped_half_way_fails_the_stream_after_its_patience() {
        let (direct, peer) = direct_patient(Duration::from_millis(150));
        let (q, closed) = (EventQueue::new(4), AtomicBool::new(false));
        let frame = encode_message(&request(4)).unwrap().to_vec();
        // The rest comes well after the patience.
        let peer = send_in_pieces(peer, frame, vec![HEADER_LEN + 1], Duration::from_secs(2));
        let short = Duration::from_millis(30);
        let mut out = None;
        for _ in 0..200 {
            out = direct.recv(&q, &closed, short).unwrap();
            if direct.slot().is_none() {
                break;
            }
        }
        assert_eq!(out, None, "no message from a broken frame");
        assert!(direct.slot().is_none(), "the stream was given up");
        match q.pop(Some(Instant::now())) {
            Some(Event::Failed(0, TransportError::Timeout { waiting_for, .. })) => {
                assert_eq!(waiting_for, "the rest of a frame on the urgent stream");
            }
            _ => panic!("the stream's failure is queued for recv"),
        }
        let _peer = peer.join().unwrap();
    }

    #[cfg(feature = "fuzzing")]
    #[test]
    fn a_record_stopped_half_way_fails_the_sealed_stream_after_its_patience() {
        use super::super::secure::seal;
        use crate::auth::KeyMode;
        let (dialer, listener) = crate::noise::keys_for_fuzzing();
        let config = ChannelConfig::new(AuthKey::new([1u8; 32]).unwrap())
            .with_handshake_timeout(Duration::from_millis(150));
        let direct = DirectUrgent::new(&config);
        let (ours, peer) = pipe();
        let mut raw = FrameReader::new(ours.try_clone_conn().unwrap());
        raw.set_authenticated();
        let (reader, _writer) = seal(raw, Box::new(ours), Some(listener), KeyMode::Noise);
        direct.put(&mut direct.slot(), 0, reader);
        // One record holding the frame; the rest of it comes far too late.
        let (_, mut w) = dialer.split(std::io::empty(), Vec::new());
        encode_message(&request(5))
            .unwrap()
            .write_to(&mut w)
            .unwrap();
        let peer = send_in_pieces(peer, w.into_inner(), vec![5], Duration::from_secs(2));
        let (q, closed) = (EventQueue::new(4), AtomicBool::new(false));
        let short = Duration::from_millis(30);
        for _ in 0..200 {
            assert_eq!(direct.recv(&q, &closed, short).unwrap(), None);
            if direct.slot().is_none() {
                break;
            }
        }
        assert!(direct.slot().is_none(), "the stream was given up");
        assert!(matches!(
            q.pop(Some(Instant::now())),
            Some(Event::Failed(0, TransportError::Timeout { .. }))
        ));
        let _peer = peer.join().unwrap();
    }

    #[test]
    fn a_reply_arriving_during_the_spin_is_received_once() {
        // A spin longer than the test: the reply can only be found by it.
        let (direct, peer) = direct(Duration::from_secs(30));
        let (q, closed) = (EventQueue::new(4), AtomicBool::new(false));
        direct.note_sent();
        let peer = send_after(peer, Duration::from_millis(20), request(7));
        assert_eq!(direct.recv(&q, &closed, WAIT).unwrap(), Some(request(7)));
        assert_eq!(direct.spin_hits(), 1);
        let _peer = peer.join().unwrap();
        // Once: nothing more, neither at once nor within a short wait (the
        // spin stops at the caller's timeout).
        assert_eq!(direct.recv(&q, &closed, Duration::ZERO).unwrap(), None);
        let short = Duration::from_millis(30);
        assert_eq!(direct.recv(&q, &closed, short).unwrap(), None);
        assert_eq!(direct.spin_hits(), 1);
        assert!(q.try_pop_urgent().is_none());
    }

    #[test]
    fn a_reply_arriving_after_the_spin_wakes_the_sleeping_receiver_once() {
        let (direct, peer) = direct(Duration::from_micros(50));
        let (q, closed) = (EventQueue::new(4), AtomicBool::new(false));
        direct.note_sent();
        // Sent well after the spin ended: the receiver sleeps in `poll`.
        let peer = send_after(peer, Duration::from_millis(50), request(8));
        assert_eq!(direct.recv(&q, &closed, WAIT).unwrap(), Some(request(8)));
        let mut peer = peer.join().unwrap();
        assert_eq!(direct.spin_hits(), 0);
        assert_eq!(direct.recv(&q, &closed, Duration::ZERO).unwrap(), None);
        // With no send of ours there is no spin at all.
        let (idle, idle_peer) = super::tests::direct(Duration::from_secs(30));
        let idle_peer = send_after(idle_peer, Duration::from_millis(20), request(9));
        assert_eq!(idle.recv(&q, &closed, WAIT).unwrap(), Some(request(9)));
        assert_eq!(idle.spin_hits(), 0);
        let _ = idle_peer.join().unwrap();
        // Both messages of a pair sent together are taken once each.
        direct.note_sent();
        for p in [10, 11] {
            encode_message(&request(p))
                .unwrap()
                .write_to(&mut peer)
                .unwrap();
        }
        assert_eq!(direct.recv(&q, &closed, WAIT).unwrap(), Some(request(10)));
        assert_eq!(direct.recv(&q, &closed, WAIT).unwrap(), Some(request(11)));
        assert_eq!(direct.recv(&q, &closed, Duration::ZERO).unwrap(), None);
    }
}
