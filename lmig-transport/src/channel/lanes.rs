//! The stream hand-over: how the streams of one generation become lanes
//! and reader threads, and how what those read reaches the consumer.
//!
//! ```text
//!  Streams (control, data 0..n, urgent), each a writer and a FrameReader
//!     │ Lanes::split
//!     ├──▶ Lanes: one writer per lane; Lane::Data(i) goes to data lane i mod n
//!     └──▶ LaneReader per stream ("lmig-rx-control", "lmig-rx-data<i>", "lmig-rx-urgent")
//!             │ frames decoded into Events: Msg, then one Eof or Failed (tagged with the generation)
//!             ▼
//!          EventQueue ──▶ recv          (urgent messages overtake queued bulk pages)
//!             and, once a consumer calls recv_urgent, the urgent LaneReader hands
//!             its FrameReader over to DirectUrgent (`urgent.rs`) and ends
//! ```
//!
//! A reader ends after its stream's end or failure (reported once) or when
//! the queue is closed (the channel is gone); nobody joins it.

use std::io::{self, BufWriter, Write};
use std::sync::{Arc, Mutex};
use std::thread;

use super::conn::{Conn, FrameReader};
use super::event::{Event, read_event};
use super::queue::EventQueue;
use super::urgent::DirectUrgent;
use super::{Stream, Streams, lock};
use crate::error::TransportError;
use crate::wire::EncodedFrames;

/// Name of the urgent stream's reader thread.
const URGENT_READER: &str = "lmig-rx-urgent";

/// Bytes a data lane gathers before writing (frames larger than this go out directly).
const DATA_BUFFER: usize = 256 << 10;

/// Bytes gathered for one write of several urgent messages
/// ([`Lanes::write_urgent_many`]); more go out in further writes.
const URGENT_BATCH: usize = 256 << 10;

/// Where a message is sent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Lane {
    Control,
    /// A data lane: the index wraps around the data lanes there are.
    Data(usize),
    Urgent,
}

impl Lane {
    /// The stream's name, for errors.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Control => "control",
            Self::Data(_) => "data",
            Self::Urgent => "urgent",
        }
    }
}

/// The writing halves of one generation.
pub(super) struct Lanes {
    control: Mutex<Box<dyn Conn>>,
    /// Data lanes buffer small frames (single pages) into larger writes;
    /// [`lmig_core::Channel::flush`] pushes them out.
    data: Vec<Mutex<BufWriter<Box<dyn Conn>>>>,
    urgent: Mutex<Box<dyn Conn>>,
    /// Handles to shut every connection down.
    all: Vec<Box<dyn Conn>>,
}

impl Lanes {
    /// Hand the streams of `generation` over: their writers become lanes,
    /// their readers [`LaneReader`]s (control, data in lane order, urgent).
    pub(super) fn split(streams: Streams, generation: u32) -> (Self, Vec<LaneReader>) {
        let mut all = Vec::new();
        let mut readers = Vec::new();
        let mut take = |s: Stream, name: String| {
            if let Ok(c) = s.writer.try_clone_conn() {
                all.push(c);
            }
            if let Ok(c) = s.reader.conn().try_clone_conn() {
                all.push(c);
            }
            readers.push(LaneReader::new(name, s.reader, generation));
            s.writer
        };
        let control = Mutex::new(take(streams.control, "lmig-rx-control".into()));
        let data = streams
            .data
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let w = take(s, format!("lmig-rx-data{i}"));
                Mutex::new(BufWriter::with_capacity(DATA_BUFFER, w))
            })
            .collect();
        let urgent = Mutex::new(take(streams.urgent, URGENT_READER.into()));
        let lanes = Self {
            control,
            data,
            urgent,
            all,
        };
        (lanes, readers)
    }

    /// How many data lanes there are.
    pub(super) fn data_lanes(&self) -> usize {
        self.data.len()
    }

    /// Write `frames` on `lane` (a data lane's may stay buffered until
    /// [`Lanes::flush_data`]).
    pub(super) fn write(&self, lane: Lane, frames: &EncodedFrames) -> io::Result<()> {
        match lane {
            Lane::Control => frames.write_to(&mut **lock(&self.control)),
            Lane::Urgent => frames.write_to(&mut **lock(&self.urgent)),
            Lane::Data(i) => {
                let mut lane = lock(&self.data[i % self.data.len()]);
                if frames.len() < DATA_BUFFER {
                    return frames.write_to(&mut *lane);
                }
                // A frame of a whole chunk: what is buffered goes first, then
                // the frame in one vectored write of its own. Through the
                // `BufWriter` its header would leave alone (a syscall, and on
                // an encrypted stream a record, of a few bytes), as
                // `BufWriter` cannot know that the connection gathers slices.
                lane.flush()?;
                frames.write_to(&mut **lane.get_mut())
            }
        }
    }

    /// Write several messages' `frames` on the urgent stream, in order,
    /// gathered into writes of up to [`URGENT_BATCH`] bytes: one system call
    /// (and on an encrypted stream one record) for many small post-copy
    /// requests or replies instead of one each.
    pub(super) fn write_urgent_many(&self, frames: &[EncodedFrames]) -> io::Result<()> {
        let total: usize = frames.iter().map(EncodedFrames::len).sum();
        let mut conn = lock(&self.urgent);
        // No larger a buffer than the messages need: a few requests are a
        // few dozen bytes.
        let mut out = BufWriter::with_capacity(total.min(URGENT_BATCH), &mut **conn);
        for f in frames {
            f.write_to(&mut out)?;
        }
        out.flush()
    }

    /// Push out what the data lanes buffered.
    pub(super) fn flush_data(&self) -> io::Result<()> {
        for d in &self.data {
            lock(d).flush()?;
        }
        Ok(())
    }

    /// The IP addresses of both ends of every connection (TCP only).
    pub(super) fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
        let mut ips: Vec<_> = self
            .all
            .iter()
            .flat_map(|c| [c.local_ip(), c.peer_ip()])
            .flatten()
            .collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// Shut every connection of the generation down (its readers then end).
    pub(super) fn shutdown(&self) {
        for c in &self.all {
            c.shutdown_conn();
        }
    }
}

/// A stream's reader thread ("lmig-rx-…"): decodes frames into [`Event`]s
/// for the channel's queue. The urgent stream's reader hands its
/// [`FrameReader`] to [`DirectUrgent`] once a consumer reads it directly.
pub(super) struct LaneReader {
    name: String,
    reader: FrameReader,
    generation: u32,
}

impl LaneReader {
    fn new(name: String, reader: FrameReader, generation: u32) -> Self {
        Self {
            name,
            reader,
            generation,
        }
    }

    /// Read large frames into `area` while it has room (`warm.rs`).
    pub(super) fn set_warm(&mut self, area: Arc<super::warm::WarmArea>) {
        self.reader.set_warm(area);
    }

    /// Is this the urgent stream's reader?
    fn urgent(&self) -> bool {
        self.name == URGENT_READER
    }

    /// Start reading into `queue`; the urgent stream's reader goes straight
    /// to `direct` if a consumer reads it already. A thread that cannot be
    /// started is reported as the stream's failure.
    pub(super) fn start(self, queue: &Arc<EventQueue<Event>>, direct: &Arc<DirectUrgent>) {
        if self.urgent() && direct.wanted() {
            direct.put(&mut direct.slot(), self.generation, self.reader);
            return;
        }
        let generation = self.generation;
        if let Err(e) = self.spawn(queue.clone(), direct.clone()) {
            warn!(error = %e, "a reader thread could not start: the stream counts as failed");
            let failed = Event::Failed(
                generation,
                TransportError::io("spawning a reader thread", e),
            );
            if queue.push(failed, false).is_err() {
                debug!("the channel closed before a reader thread's failure was queued");
            }
        }
    }

    /// Start the thread; its handle joins once the stream ended, failed or
    /// was handed over, or the queue closed.
    pub(super) fn spawn(
        self,
        queue: Arc<EventQueue<Event>>,
        direct: Arc<DirectUrgent>,
    ) -> io::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || self.run(&queue, &direct))
    }

    fn run(mut self, queue: &EventQueue<Event>, direct: &DirectUrgent) {
        // Messages of the urgent stream overtake queued bulk pages; its end
        // or failure queues behind them like any other stream's.
        let urgent_stream = self.urgent();
        let generation = self.generation;
        loop {
            let ev = read_event(&mut self.reader, generation);
            let last = !matches!(ev, Event::Msg(_));
            if urgent_stream && !last && direct.wanted() {
                // Queued and handed over under the slot's lock, so the
                // consumer takes this message before reading the next.
                let mut slot = direct.slot();
                if queue.push(ev, true).is_err() {
                    self.reader.conn().shutdown_conn();
                    return;
                }
                if !self.reader.has_partial() {
                    direct.put(&mut slot, generation, self.reader);
                    return;
                }
                continue;
            }
            if queue.push(ev, urgent_stream && !last).is_err() || last {
                self.reader.conn().shutdown_conn();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    use lmig_core::model::{PageRun, RegionId};
    use lmig_core::protocol::{PageBatch, PageData};

    use lmig_core::protocol::Message;

    use super::super::ChannelConfig;
    use super::super::conn::ReadOutcome;
    use super::super::pipe::{PipeEnd, pipe};
    use super::*;
    use crate::AuthKey;
    use crate::wire::{
        Handshake, Reject, RejectReason, WireItem, encode_handshake, encode_message,
    };

    const WAIT: Duration = Duration::from_secs(10);

    /// An authenticated stream over a pipe, and the peer's end of it.
    fn stream() -> (Stream, PipeEnd) {
        let (ours, theirs) = pipe();
        let mut reader = FrameReader::new(ours.try_clone_conn().unwrap());
        reader.set_authenticated();
        let stream = Stream {
            writer: Box::new(ours),
            reader,
            cipher: "none".into(),
        };
        (stream, theirs)
    }

    /// The streams of a channel with `n` data lanes; the peers' ends in the
    /// same order (control, data…, urgent).
    fn streams(n: usize) -> (Streams, Vec<PipeEnd>) {
        let (control, c) = stream();
        let (urgent, u) = stream();
        let (data, mut peers): (Vec<_>, Vec<_>) = (0..n).map(|_| stream()).unzip();
        peers.insert(0, c);
        peers.push(u);
        let streams = Streams {
            control,
            data,
            urgent,
        };
        (streams, peers)
    }

    fn pages(first: u64) -> Message {
        Message::Pages(PageBatch {
            round: 1,
            run: PageRun::new(RegionId(1), first, 1),
            data: PageData::Zero,
        })
    }

    fn send(peer: &mut PipeEnd, msg: &Message) {
        encode_message(msg).unwrap().write_to(peer).unwrap();
    }

    /// The next message the peer received.
    fn received(peer: &PipeEnd) -> Message {
        let mut r = FrameReader::new(peer.try_clone_conn().unwrap());
        r.set_authenticated();
        match r.next("test").unwrap() {
            ReadOutcome::Item(WireItem::Message(m)) => m,
            _ => panic!("no message"),
        }
    }

    fn queue() -> Arc<EventQueue<Event>> {
        Arc::new(EventQueue::new(16))
    }

    fn direct() -> Arc<DirectUrgent> {
        let config = ChannelConfig::new(AuthKey::new([1u8; 32]).unwrap());
        Arc::new(DirectUrgent::new(&config))
    }

    fn next(q: &EventQueue<Event>) -> Event {
        q.pop(Some(Instant::now() + WAIT)).expect("an event")
    }

    #[test]
    fn split_hands_every_stream_over_in_plan_order() {
        let (streams, _peers) = streams(3);
        let (lanes, readers) = Lanes::split(streams, 7);
        assert_eq!(lanes.data_lanes(), 3);
        let names: Vec<&str> = readers.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lmig-rx-control",
                "lmig-rx-data0",
                "lmig-rx-data1",
                "lmig-rx-data2",
                "lmig-rx-urgent"
            ]
        );
        assert!(readers.iter().all(|r| r.generation == 7));
        let urgent: Vec<bool> = readers.iter().map(LaneReader::urgent).collect();
        assert_eq!(urgent, [false, false, false, false, true]);
        // Every connection (writer and reader halves) can be shut down.
        assert_eq!(lanes.all.len(), 2 * 5);
    }

    #[test]
    fn each_lane_writes_on_its_own_stream_and_data_lanes_wrap() {
        let (streams, peers) = streams(3);
        let (lanes, _readers) = Lanes::split(streams, 0);
        let frames = |m: &Message| encode_message(m).unwrap();
        lanes
            .write(Lane::Control, &frames(&Message::Ready))
            .unwrap();
        lanes
            .write(Lane::Urgent, &frames(&Message::Commit))
            .unwrap();
        // Lane 4 of 3 is data lane 1; data lanes buffer until flushed.
        lanes.write(Lane::Data(4), &frames(&pages(40))).unwrap();
        assert!(!peers[2].wait_readable(Duration::ZERO).unwrap());
        lanes.flush_data().unwrap();
        assert_eq!(received(&peers[0]), Message::Ready);
        assert_eq!(received(&peers[2]), pages(40));
        assert_eq!(received(&peers[4]), Message::Commit);
        for quiet in [1, 3] {
            assert!(
                !peers[quiet].wait_readable(Duration::ZERO).unwrap(),
                "stream {quiet} got bytes"
            );
        }
        assert_eq!(
            [Lane::Control, Lane::Data(9), Lane::Urgent].map(Lane::name),
            ["control", "data", "urgent"]
        );
    }

    #[test]
    fn shutdown_ends_every_stream_of_the_generation() {
        let (streams, peers) = streams(2);
        let (lanes, _readers) = Lanes::split(streams, 0);
        lanes.shutdown();
        let frames = encode_message(&Message::Ready).unwrap();
        assert!(lanes.write(Lane::Control, &frames).is_err());
        let mut r = FrameReader::new(peers[1].try_clone_conn().unwrap());
        assert!(matches!(r.next("test"), Ok(ReadOutcome::Eof)));
    }

    #[test]
    fn a_reader_queues_messages_in_order_then_its_end() {
        let (streams, mut peers) = streams(1);
        let (_lanes, readers) = Lanes::split(streams, 3);
        let q = queue();
        let data = readers.into_iter().nth(1).unwrap();
        let thread = data.spawn(q.clone(), direct()).unwrap();
        send(&mut peers[1], &pages(1));
        send(&mut peers[1], &pages(2));
        peers[1].shutdown_conn();
        assert!(matches!(next(&q), Event::Msg(m) if m == pages(1)));
        assert!(matches!(next(&q), Event::Msg(m) if m == pages(2)));
        assert!(matches!(next(&q), Event::Eof(3)));
        thread.join().unwrap();
    }

    #[test]
    fn bad_bytes_on_a_lane_fail_its_stream() {
        let (streams, mut peers) = streams(1);
        let (_lanes, readers) = Lanes::split(streams, 5);
        let q = queue();
        let control = readers.into_iter().next().unwrap();
        let thread = control.spawn(q.clone(), direct()).unwrap();
        peers[0].write_all(b"this is no lmig frame").unwrap();
        match next(&q) {
            Event::Failed(5, TransportError::Wire(_)) => {}
            Event::Failed(g, e) => panic!("generation {g}: {e}"),
            _ => panic!("bad bytes were not an error"),
        }
        thread.join().unwrap();
    }

    #[test]
    fn a_handshake_frame_after_authentication_fails_the_stream() {
        let (streams, mut peers) = streams(1);
        let (_lanes, readers) = Lanes::split(streams, 0);
        let q = queue();
        let control = readers.into_iter().next().unwrap();
        let thread = control.spawn(q.clone(), direct()).unwrap();
        send(&mut peers[0], &Message::Ready);
        let reject = Handshake::Reject(Reject {
            reason: RejectReason::AuthFailed,
        });
        encode_handshake(&reject)
            .unwrap()
            .write_to(&mut peers[0])
            .unwrap();
        assert!(matches!(next(&q), Event::Msg(Message::Ready)));
        match next(&q) {
            Event::Failed(0, TransportError::Handshake { detail }) => {
                assert_eq!(detail, "Reject frame after authentication");
            }
            _ => panic!("a handshake frame was accepted after authentication"),
        }
        thread.join().unwrap();
    }

    #[test]
    fn the_urgent_reader_hands_its_stream_to_the_consumer_and_back() {
        let (streams, mut peers) = streams(1);
        let (_lanes, readers) = Lanes::split(streams, 2);
        let (q, direct, closed) = (queue(), direct(), AtomicBool::new(false));
        let urgent = readers.into_iter().last().unwrap();
        let thread = urgent.spawn(q.clone(), direct.clone()).unwrap();
        let u = peers.len() - 1;
        // Before anyone asks, the reader thread queues urgent messages.
        send(&mut peers[u], &Message::Ready);
        assert!(matches!(next(&q), Event::Msg(Message::Ready)));
        // The consumer asks: the reader queues its next message and hands over.
        assert_eq!(direct.recv(&q, &closed, Duration::ZERO).unwrap(), None);
        send(&mut peers[u], &Message::Commit);
        thread.join().unwrap();
        assert!(matches!(&*direct.slot(), Some((2, _))));
        let got = direct.recv(&q, &closed, WAIT).unwrap();
        assert_eq!(got, Some(Message::Commit));
        // From now on the consumer reads the stream itself.
        send(&mut peers[u], &pages(9));
        assert_eq!(direct.recv(&q, &closed, WAIT).unwrap(), Some(pages(9)));
        // Its end goes back to the queue, for `recv`, like a reader's.
        peers[u].shutdown_conn();
        let got = direct.recv(&q, &closed, Duration::from_millis(50)).unwrap();
        assert_eq!(got, None);
        assert!(direct.slot().is_none());
        assert!(matches!(next(&q), Event::Eof(2)));
    }

    #[test]
    fn a_later_generation_goes_straight_to_the_consumer() {
        let (q, direct, closed) = (queue(), direct(), AtomicBool::new(false));
        assert_eq!(direct.recv(&q, &closed, Duration::ZERO).unwrap(), None);
        let (streams, mut peers) = streams(1);
        let (_lanes, readers) = Lanes::split(streams, 4);
        let urgent = readers.into_iter().last().unwrap();
        urgent.start(&q, &direct);
        assert!(matches!(&*direct.slot(), Some((4, _))));
        // An older generation's reader does not replace it.
        let (old, _old_peer) = stream();
        direct.put(&mut direct.slot(), 3, old.reader);
        assert!(matches!(&*direct.slot(), Some((4, _))));
        let u = peers.len() - 1;
        send(&mut peers[u], &Message::Ready);
        let got = direct.recv(&q, &closed, WAIT).unwrap();
        assert_eq!(got, Some(Message::Ready));
    }

    #[test]
    fn a_frame_cut_half_way_fails_the_urgent_stream() {
        let (q, direct, closed) = (queue(), direct(), AtomicBool::new(false));
        assert_eq!(direct.recv(&q, &closed, Duration::ZERO).unwrap(), None);
        let (streams, mut peers) = streams(1);
        let (_lanes, readers) = Lanes::split(streams, 1);
        readers.into_iter().last().unwrap().start(&q, &direct);
        let u = peers.len() - 1;
        let wire = encode_message(&pages(1)).unwrap().to_vec();
        peers[u].write_all(&wire[..wire.len() - 3]).unwrap();
        peers[u].shutdown_conn();
        let got = direct.recv(&q, &closed, Duration::from_millis(50)).unwrap();
        assert_eq!(got, None);
        match next(&q) {
            Event::Failed(1, TransportError::Closed { .. }) => {}
            Event::Failed(g, e) => panic!("generation {g}: {e}"),
            _ => panic!("a cut frame was not an error"),
        }
    }
}
