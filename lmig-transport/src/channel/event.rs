//! What a stream's reader reports to the channel: the messages it decodes,
//! then the stream's end or failure. Below both the lanes' reader threads
//! (`lanes.rs`) and the urgent stream read in place (`urgent.rs`).

use std::time::Duration;

use lmig_core::protocol::Message;

use super::conn::{FrameReader, ReadOutcome};
use crate::error::TransportError;
use crate::wire::WireItem;

/// What a reader reports: messages, then the stream's end or failure, each
/// tagged with the generation of the streams it came from.
pub(super) enum Event {
    Msg(Message),
    Eof(u32),
    Failed(u32, TransportError),
}

/// The next message of a stream, or its end, as a reader reports it.
pub(super) fn read_event(reader: &mut FrameReader, generation: u32) -> Event {
    to_event(reader.next("while receiving"), generation)
}

/// [`read_event`] on a stream whose read timeout is the caller's wait:
/// `None` when it passed before a frame began ([`FrameReader::next_within`]).
pub(super) fn read_event_within(
    reader: &mut FrameReader,
    generation: u32,
    patience: Duration,
) -> Option<Event> {
    match reader.next_within("while receiving", patience) {
        Ok(None) => None,
        Ok(Some(outcome)) => Some(to_event(Ok(outcome), generation)),
        Err(e) => Some(Event::Failed(generation, e)),
    }
}

fn to_event(read: Result<ReadOutcome, TransportError>, generation: u32) -> Event {
    match read {
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
