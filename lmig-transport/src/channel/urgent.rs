//! The urgent stream read by its consumer itself (post-copy).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lmig_core::MigrationError;
use lmig_core::protocol::Message;

use super::conn::FrameReader;
use super::event::{Event, read_event};
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
/// A reader taken over gets a read timeout ([`ChannelConfig::handshake_timeout`]):
/// `recv_urgent` reads only once bytes are there, and a peer that stops in
/// the middle of a frame fails the stream instead of holding the consumer.
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
}

impl DirectUrgent {
    pub(super) fn new(config: &ChannelConfig) -> Self {
        Self {
            wanted: AtomicBool::new(false),
            slot: Mutex::new(None),
            frame_timeout: config.handshake_timeout,
            write_timeout: config.write_timeout,
        }
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

    /// [`lmig_core::Channel::recv_urgent`]: the next urgent message,
    /// queued by the reader thread or read here once it handed over.
    pub(super) fn recv(
        &self,
        queue: &EventQueue<Event>,
        closed: &AtomicBool,
        timeout: Duration,
    ) -> lmig_core::Result<Option<Message>> {
        let deadline = Instant::now() + timeout;
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
            let now = Instant::now();
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
            match self.read_direct(slot, queue, deadline.saturating_duration_since(now)) {
                DirectRead::Msg(m) => return Ok(Some(m)),
                DirectRead::Idle => return Ok(None),
                DirectRead::Ended => {}
            }
        }
    }

    /// Read the next message from the handed-over reader in `slot`,
    /// waiting at most `wait` for its first bytes. The stream's end or
    /// failure goes to `recv`, like a reader thread's.
    fn read_direct(
        &self,
        mut slot: MutexGuard<'_, Slot>,
        queue: &EventQueue<Event>,
        wait: Duration,
    ) -> DirectRead {
        let Some((generation, reader)) = slot.as_mut() else {
            return DirectRead::Ended;
        };
        let ev = match reader.conn().wait_readable(wait) {
            Ok(false) => return DirectRead::Idle,
            Ok(true) => match read_event(reader, *generation) {
                Event::Msg(m) => return DirectRead::Msg(m),
                // Bytes were there: a timeout is a frame that stopped half-way.
                Event::Failed(g, TransportError::Timeout { .. }) => Event::Failed(
                    g,
                    TransportError::Timeout {
                        waiting_for: "the rest of a frame on the urgent stream",
                        after: self.frame_timeout,
                    },
                ),
                ev => ev,
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
