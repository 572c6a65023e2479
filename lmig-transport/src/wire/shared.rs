//! A message body written as fresh bytes with large byte strings shared
//! between them: the socket queues of a `Sockets` message go to the wire
//! as they were captured, without a copy into the message's buffer.
//!
//! With megabytes queued in the freeze, that copy (into memory faulted in
//! page by page) cost as much as the capture's own read of the queues.
//! The bytes on the wire are exactly those of [`Codec::emit`].

use bytes::{BufMut, Bytes, BytesMut};
use lmig_core::model::{SocketRecord, TcpConnState};

use super::records::{Codec, RecordTag, emit_tcp_back, emit_tcp_front};

/// Byte strings shorter than this are copied: below it a part of its own
/// costs more (an I/O slice, and an encrypted stream gathers them anyway).
pub(super) const SHARE_MIN: usize = 4096;

/// A body under construction: the parts written so far and the fresh bytes
/// after them.
#[derive(Debug, Default)]
pub(super) struct Body {
    parts: Vec<Bytes>,
    /// Fresh bytes after the last part.
    pub head: BytesMut,
}

impl Body {
    /// A body whose fresh bytes have room for `fresh` bytes.
    pub(super) fn with_capacity(fresh: usize) -> Self {
        Self {
            parts: Vec::new(),
            head: BytesMut::with_capacity(fresh),
        }
    }

    /// Append `b`: shared if it is large, copied if it is small.
    pub(super) fn put_shared(&mut self, b: &Bytes) {
        if b.len() < SHARE_MIN {
            self.head.put_slice(b);
            return;
        }
        if !self.head.is_empty() {
            self.parts.push(self.head.split().freeze());
        }
        self.parts.push(b.clone());
    }

    /// Append `tail` (shared, as it is) and end: the parts in order, none empty.
    pub(super) fn finish(mut self, tail: Bytes) -> Vec<Bytes> {
        if !self.head.is_empty() {
            self.parts.push(self.head.freeze());
        }
        if !tail.is_empty() {
            self.parts.push(tail);
        }
        self.parts
    }
}

/// A TCP record's queue bytes that [`Body::put_shared`] shares.
fn shared_len(c: &TcpConnState) -> usize {
    [&c.send_queue, &c.recv_queue]
        .into_iter()
        .map(|q| if q.len() >= SHARE_MIN { q.len() } else { 0 })
        .sum()
}

/// The fresh bytes `records` need in a body (their queues shared).
pub(super) fn fresh_len(records: &[SocketRecord]) -> usize {
    records
        .iter()
        .map(|r| match r {
            SocketRecord::Tcp(c) => r.buffer_len() - shared_len(c),
            _ => r.buffer_len(),
        })
        .sum()
}

/// Append `records` as a list ([`Codec::emit`]'s bytes), sharing their
/// large queues.
pub(super) fn put_records(body: &mut Body, records: &[SocketRecord]) {
    body.head.put_u32_le(records.len() as u32);
    for r in records {
        let SocketRecord::Tcp(c) = r else {
            r.emit(&mut body.head);
            continue;
        };
        body.head.put_u8(RecordTag::Tcp.to_u8());
        emit_tcp_front(c, &mut body.head);
        body.put_shared(&c.send_queue);
        body.head.put_u32_le(c.unsent_len);
        body.head.put_u32_le(c.recv_queue.len() as u32);
        body.put_shared(&c.recv_queue);
        emit_tcp_back(c, &mut body.head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, send: usize, recv: usize) -> SocketRecord {
        let bytes = |n: usize, seed: u8| -> Bytes {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        };
        let Some(SocketRecord::Tcp(mut c)) = crate::fuzzing::sample_records()
            .into_iter()
            .find(|r| matches!(r, SocketRecord::Tcp(_)))
        else {
            panic!("the samples hold a TCP record");
        };
        c.id = id;
        c.send_queue = bytes(send, id as u8);
        c.unsent_len = (send / 2) as u32;
        c.recv_queue = bytes(recv, !(id as u8));
        SocketRecord::Tcp(c)
    }

    #[test]
    fn shared_bodies_are_the_bytes_of_emit_and_share_large_queues() {
        let records = vec![
            record(1, 0, 0),
            record(2, SHARE_MIN - 1, 10),
            record(3, SHARE_MIN, SHARE_MIN + 7),
            record(4, 1 << 20, 0),
        ];
        let mut plain = Vec::new();
        plain.put_u32_le(records.len() as u32);
        for r in &records {
            r.emit(&mut plain);
        }
        let mut body = Body::with_capacity(fresh_len(&records) + 4);
        put_records(&mut body, &records);
        let cap = body.head.capacity();
        let parts = body.finish(Bytes::new());
        assert_eq!(parts.concat(), plain, "the same bytes as a copied encoding");
        assert!(parts.iter().all(|p| !p.is_empty()));
        let queues: Vec<&Bytes> = records
            .iter()
            .filter_map(|r| match r {
                SocketRecord::Tcp(c) => Some([&c.send_queue, &c.recv_queue]),
                _ => None,
            })
            .flatten()
            .filter(|q| q.len() >= SHARE_MIN)
            .collect();
        assert_eq!(queues.len(), 3);
        for q in queues {
            assert!(
                parts
                    .iter()
                    .any(|p| p.as_ptr() == q.as_ptr() && p.len() == q.len()),
                "a queue of {} bytes is shared, not copied",
                q.len()
            );
        }
        assert!(
            cap < 3 * SHARE_MIN,
            "the fresh buffer holds no large queue ({cap} bytes)"
        );
    }
}
