//! The post-copy fault path's messages encoded without allocating: a
//! `PageRequest`, or a `Pages` message that fits one frame (a one-page
//! reply), as a header and message head in a caller's buffer plus the page
//! bytes, borrowed. The bytes are those [`encode_message`] and
//! [`encode_message_sealed`] give (`tests` checks it); every other message
//! goes through them.
//!
//! [`encode_message`]: super::encode_message
//! [`encode_message_sealed`]: super::encode_message_sealed

use bytes::Bytes;
use lmig_core::model::PageRun;
use lmig_core::protocol::{Message, PageData};

use super::frame::{FrameRepr, HEADER_LEN, Kind};
use super::message::check_runs;
use super::pages::{PagesHeader, emit_pages_header};
use super::records::Codec;
use super::{MAX_FRAME_PAYLOAD, Result};

/// Room for a small message's frame header and message head.
pub(crate) const SMALL_HEAD: usize = HEADER_LEN + PagesHeader::<&[u8]>::LEN;

/// `msg` encoded into `head` (its first `.0` bytes) and the page bytes that
/// follow it (`.1`), when it is a `PageRequest` or a `Pages` message that
/// fits one frame; `None` for any other message. `sealed`: the frame's
/// checksum is 0, as [`encode_message_sealed`](super::encode_message_sealed) writes it.
///
/// # Errors
/// As [`encode_message`](super::encode_message) for the same message (a
/// request for an empty or overflowing run).
pub(crate) fn encode_small<'m>(
    msg: &'m Message,
    sealed: bool,
    head: &mut [u8; SMALL_HEAD],
) -> Result<Option<(usize, Option<&'m Bytes>)>> {
    let (kind, body_len, data) = match msg {
        Message::PageRequest(run) => {
            check_runs(std::slice::from_ref(run))?;
            let mut at = &mut head[HEADER_LEN..];
            run.emit(&mut at);
            (Kind::PageRequest, <PageRun as Codec>::MIN_LEN, None)
        }
        Message::Pages(batch) => {
            let data = match &batch.data {
                PageData::Raw(d) => Some(d),
                PageData::Zero => None,
            };
            let len = PagesHeader::<&[u8]>::LEN;
            if len + data.map_or(0, Bytes::len) > MAX_FRAME_PAYLOAD {
                return Ok(None);
            }
            emit_pages_header(batch, &mut head[HEADER_LEN..HEADER_LEN + len]);
            (Kind::Pages, len, data)
        }
        _ => return Ok(None),
    };
    let body = &head[HEADER_LEN..HEADER_LEN + body_len];
    let payload = body_len + data.map_or(0, Bytes::len);
    let crc = if sealed {
        0
    } else {
        let crc = crc32c::crc32c(body);
        data.map_or(crc, |d| crc32c::crc32c_append(crc, d))
    };
    let header = FrameRepr::new(kind, 0, payload, crc)?.to_bytes();
    head[..HEADER_LEN].copy_from_slice(&header);
    Ok(Some((HEADER_LEN + body_len, data)))
}

#[cfg(test)]
mod tests {
    use lmig_core::model::RegionId;
    use lmig_core::protocol::PageBatch;

    use super::super::{encode_message, encode_message_sealed};
    use super::*;

    fn small(msg: &Message, sealed: bool) -> Option<Vec<u8>> {
        let mut head = [0u8; SMALL_HEAD];
        let (n, data) = encode_small(msg, sealed, &mut head).unwrap()?;
        let mut v = head[..n].to_vec();
        if let Some(d) = data {
            v.extend_from_slice(d);
        }
        Some(v)
    }

    fn pages(count: u32, data: PageData) -> Message {
        Message::Pages(PageBatch {
            round: 3,
            run: PageRun::new(RegionId(7), 1 << 40, count),
            data,
        })
    }

    #[test]
    fn small_messages_encode_to_the_same_bytes_as_the_general_path() {
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let msgs = [
            Message::PageRequest(PageRun::new(RegionId(2), 99, 1)),
            Message::PageRequest(PageRun::new(RegionId(u32::MAX), u64::MAX - 64, 64)),
            pages(1, PageData::Raw(Bytes::from(page.clone()))),
            pages(2, PageData::Raw(Bytes::from([page.clone(), page].concat()))),
            pages(64, PageData::Zero),
        ];
        for msg in &msgs {
            let plain = small(msg, false).expect("a small message");
            assert_eq!(plain, encode_message(msg).unwrap().to_vec(), "{msg:?}");
            let sealed = small(msg, true).expect("a small message");
            assert_eq!(sealed, encode_message_sealed(msg).unwrap().to_vec());
            assert_ne!(plain, sealed, "the checksum differs");
        }
    }

    #[test]
    fn other_messages_and_pages_over_a_frame_take_the_general_path() {
        let big = Bytes::from(vec![1u8; MAX_FRAME_PAYLOAD]);
        for msg in [
            Message::Ready,
            Message::Prepared { placed: 3 },
            pages(1, PageData::Raw(big)),
        ] {
            assert_eq!(small(&msg, true), None, "{}", msg.name());
        }
        // A request the general path refuses is refused here too.
        for run in [
            PageRun::new(RegionId(1), 5, 0),
            PageRun::new(RegionId(1), u64::MAX, 2),
        ] {
            let msg = Message::PageRequest(run);
            assert!(encode_message(&msg).is_err());
            let mut head = [0u8; SMALL_HEAD];
            assert!(encode_small(&msg, true, &mut head).is_err());
        }
    }
}
