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

use lmig_core::protocol::Message;

use super::conn::{Conn, FrameReader, ReadOutcome};
use super::queue::EventQueue;
use super::urgent::DirectUrgent;
use super::{Stream, Streams, lock};
use crate::error::TransportError;
use crate::wire::{EncodedFrames, WireItem};

/// Name of the urgent stream's reader thread.
const URGENT_READER: &str = "lmig-rx-urgent";

/// Bytes a data lane gathers before writing (frames larger than this go out directly).
const DATA_BUFFER: usize = 256 << 10;

/// What a reader reports: messages, then the stream's end or failure, each
/// tagged with the generation of the streams it came from.
pub(super) enum Event {
    Msg(Message),
    Eof(u32),
    Failed(u32, TransportError),
}

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
            Lane::Data(i) => frames.write_to(&mut *lock(&self.data[i % self.data.len()])),
        }
    }

    /// Push out what the data lanes buffered.
    pub(super) fn flush_data(&self) -> io::Result<()> {
        for d in &self.data {
            lock(d).flush()?;
        }
        Ok(())
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
            let _ = queue.push(
                Event::Failed(
                    generation,
                    TransportError::io("spawning a reader thread", e),
                ),
                false,
            );
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

/// The next message of a stream, or its end, as a reader reports it.
pub(super) fn read_event(reader: &mut FrameReader, generation: u32) -> Event {
    match reader.next("while receiving") {
        Ok(ReadOutcome::Item(WireItem::Message(m))) => Event::Msg(m),
        Ok(ReadOutcome::Item(WireItem::Handshake(h))) => Event::Failed(
            generation,
            TransportError::Handshake {
                detail: format!("{} frame after authentication", h.kind().name()),
            },
        ),
        Ok(ReadOutcome::Eof) => Event::Eof(generation),
        Err(e) => Event::Failed(generation, e),
    }
}
