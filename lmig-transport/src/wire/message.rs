//! Message bodies: the payload of each message kind.
//!
//! ```text
//! Regions     u32 count, count × { u32 id, u64 len, u32 page_size, opt u64 fixed_addr }
//! Pages       PagesHeader (21 bytes, below), then the page bytes (Raw) or nothing (Zero)
//! RoundEnd    u32 round, u64 pages, u64 zero_pages, u64 dirty_pages
//! SocketPlan  u32 count, count × SocketPrep
//! Sockets     bool last, u32 count, count × SocketRecord
//! State       u32 version, then the state bytes
//! Handover    u64 pages_total, bool verify, u32 count, count × PageRun (post-copy runs)
//! Ready       (empty)
//! Prepared    u64 pages placed
//! Commit      (empty)
//! PageRequest u32 region, u64 first, u32 count
//! Digests     u32 count, count × { u32 region, [u8; 32] hash }
//! Resync      u32 count, count × PageRun
//! Done        u8 0 = not checked | 1 = verified | 2 = mismatch, then u32 region
//! Abort       u16 length, UTF-8 reason (at most MAX_REASON_BYTES)
//! Split       a tag byte, then one split-memory message (see `wire/split.rs`)
//! QueueEstimate u64 bytes (at most MAX_QUEUE_ESTIMATE)
//! SocketsActive (empty)
//! DemandSettled (empty)
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use lmig_core::model::{
    MAX_REGIONS, PageRun, ProgramState, RegionId, RegionInfo, RegionLayout, SocketPrep,
    SocketRecord,
};
use lmig_core::protocol::{
    Handover, MAX_POSTCOPY_RUNS, MAX_QUEUE_ESTIMATE, MAX_REASON_BYTES, MAX_SOCKETS_PER_MESSAGE,
    Message, PageData, RegionDigest, RoundSummary, Verification,
};

use super::frame::{Frame, FrameRepr, Kind};
use super::pages::{PagesHeader, emit_pages_header, parse_pages};
use super::reader::{Reader, put_string};
use super::records::Codec;
use super::shared::{self, Body};
use super::{MAX_MESSAGE_BYTES, Result, WireError};

wire_enum! {
    /// The tag byte of a `Done` body (the verification's outcome).
    enum DoneTag [] {
        NotChecked = 0 => "not checked",
        Verified = 1 => "verified",
        Mismatch = 2 => "mismatch",
    }
    unknown |v| WireError::bad("verification", format!("tag {v}"))
}

fn put_list<T: Codec>(buf: &mut BytesMut, items: &[T]) {
    buf.put_u32_le(items.len() as u32);
    for i in items {
        i.emit(buf);
    }
}

fn list_len<T: Codec>(items: &[T]) -> usize {
    4 + items.iter().map(Codec::buffer_len).sum::<usize>()
}

fn parse_list<T: Codec>(r: &mut Reader, field: &'static str, cap: usize) -> Result<Vec<T>> {
    let n = r.count(field, T::MIN_LEN, cap)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(T::parse(r)?);
    }
    Ok(v)
}

fn check_runs(runs: &[PageRun]) -> Result<()> {
    for run in runs {
        if run.count == 0 || run.first.checked_add(u64::from(run.count)).is_none() {
            return Err(WireError::bad(
                "page run",
                format!("{run:?} is empty or overflows"),
            ));
        }
    }
    Ok(())
}

fn too_long(what: &'static str, len: usize, cap: usize) -> Result<()> {
    if len > cap {
        return Err(WireError::TooLong { what, len, cap });
    }
    Ok(())
}

/// A queue estimate over [`MAX_QUEUE_ESTIMATE`] is refused (it sizes
/// memory the receiver writes at once).
fn check_estimate(bytes: u64) -> Result<()> {
    if bytes > MAX_QUEUE_ESTIMATE {
        return Err(WireError::bad(
            "queue estimate",
            format!("{bytes} bytes, over the {MAX_QUEUE_ESTIMATE} allowed"),
        ));
    }
    Ok(())
}

/// The frame kind of a message.
pub fn kind_of(msg: &Message) -> Kind {
    match msg {
        Message::Regions(_) => Kind::Regions,
        Message::Pages(_) => Kind::Pages,
        Message::RoundEnd(_) => Kind::RoundEnd,
        Message::SocketPlan(_) => Kind::SocketPlan,
        Message::Sockets { .. } => Kind::Sockets,
        Message::State(_) => Kind::State,
        Message::Handover(_) => Kind::Handover,
        Message::Ready => Kind::Ready,
        Message::Prepared { .. } => Kind::Prepared,
        Message::Commit => Kind::Commit,
        Message::PageRequest(_) => Kind::PageRequest,
        Message::Digests(_) => Kind::Digests,
        Message::Resync(_) => Kind::Resync,
        Message::Done(_) => Kind::Done,
        Message::Abort { .. } => Kind::Abort,
        Message::Split(_) => Kind::Split,
        Message::QueueEstimate { .. } => Kind::QueueEstimate,
        Message::SocketsActive => Kind::SocketsActive,
        Message::DemandSettled => Kind::DemandSettled,
    }
}

/// Encode a message body as its parts in order: the message's own fields,
/// freshly written, and page, state or socket queue bytes, shared, never
/// copied (none of the parts empty).
///
/// Fails for messages the receiver would reject for their size or content
/// (an abort reason over the cap, an invalid socket record, …).
pub(crate) fn emit_body(msg: &Message) -> Result<(Kind, Vec<Bytes>)> {
    let kind = kind_of(msg);
    let mut head = BytesMut::new();
    let mut tail = Bytes::new();
    // Parts before `head` (a `Sockets` message's shared queues).
    let mut body = Body::default();
    match msg {
        Message::Regions(layout) => {
            let regions = layout.regions();
            too_long("region list", regions.len(), MAX_REGIONS)?;
            head.reserve(list_len(regions));
            put_list(&mut head, regions);
        }
        Message::Pages(batch) => {
            head.resize(PagesHeader::<&[u8]>::LEN, 0);
            emit_pages_header(batch, &mut head);
            if let PageData::Raw(data) = &batch.data {
                tail = data.clone();
            }
        }
        Message::RoundEnd(s) => s.emit(&mut head),
        Message::SocketPlan(preps) => {
            too_long("socket plan", preps.len(), MAX_SOCKETS_PER_MESSAGE)?;
            head.reserve(list_len(preps));
            put_list(&mut head, preps);
        }
        Message::Sockets { records, last } => {
            too_long("socket records", records.len(), MAX_SOCKETS_PER_MESSAGE)?;
            for r in records {
                r.validate()
                    .map_err(|e| WireError::invalid("socket record", e))?;
            }
            body = Body::with_capacity(5 + shared::fresh_len(records));
            body.head.put_u8(u8::from(*last));
            shared::put_records(&mut body, records);
        }
        Message::State(state) => {
            state
                .validate()
                .map_err(|e| WireError::invalid("program state", e))?;
            head.put_u32_le(state.version);
            tail = state.data.clone();
        }
        Message::Handover(h) => {
            too_long("post-copy runs", h.postcopy.len(), MAX_POSTCOPY_RUNS)?;
            check_runs(&h.postcopy)?;
            head.reserve(9 + list_len(&h.postcopy));
            head.put_u64_le(h.pages_total);
            head.put_u8(u8::from(h.verify));
            put_list(&mut head, &h.postcopy);
        }
        Message::Digests(d) => {
            too_long("digest list", d.len(), MAX_REGIONS)?;
            head.reserve(list_len(d));
            put_list(&mut head, d);
        }
        Message::Resync(runs) => {
            too_long("resync runs", runs.len(), MAX_POSTCOPY_RUNS)?;
            check_runs(runs)?;
            head.reserve(list_len(runs));
            put_list(&mut head, runs);
        }
        Message::Ready | Message::Commit | Message::SocketsActive | Message::DemandSettled => {}
        Message::Prepared { placed } => head.put_u64_le(*placed),
        Message::PageRequest(run) => {
            check_runs(std::slice::from_ref(run))?;
            run.emit(&mut head);
        }
        Message::Done(v) => match v {
            Verification::NotChecked => head.put_u8(DoneTag::NotChecked.to_u8()),
            Verification::Verified => head.put_u8(DoneTag::Verified.to_u8()),
            Verification::Mismatch(r) => {
                head.put_u8(DoneTag::Mismatch.to_u8());
                head.put_u32_le(r.0);
            }
        },
        Message::Abort { reason } => {
            too_long("abort reason", reason.len(), MAX_REASON_BYTES)?;
            put_string(&mut head, reason);
        }
        Message::Split(m) => tail = super::split::emit(m, &mut head)?,
        Message::QueueEstimate { bytes } => {
            check_estimate(*bytes)?;
            head.put_u64_le(*bytes);
        }
    }
    body.head.unsplit(head);
    let parts = body.finish(tail);
    too_long(
        "message",
        parts.iter().map(Bytes::len).sum(),
        MAX_MESSAGE_BYTES,
    )?;
    Ok((kind, parts))
}

/// Decode the body of a message of `kind` (a whole, reassembled payload).
///
/// Byte strings in the result (page content, state, socket queues) are
/// slices of `payload`: no copy.
pub fn parse_message_body(kind: Kind, payload: Bytes) -> Result<Message> {
    if kind == Kind::Pages {
        return parse_pages(payload).map(Message::Pages);
    }
    if kind == Kind::Split {
        return super::split::parse(payload).map(Message::Split);
    }
    let mut r = Reader::new(payload, kind.name());
    let msg = match kind {
        Kind::Regions => {
            let regions: Vec<RegionInfo> = parse_list(&mut r, "region list", MAX_REGIONS)?;
            Message::Regions(
                RegionLayout::new(regions).map_err(|e| WireError::invalid("region layout", e))?,
            )
        }
        Kind::RoundEnd => Message::RoundEnd(RoundSummary::parse(&mut r)?),
        Kind::SocketPlan => Message::SocketPlan(parse_list::<SocketPrep>(
            &mut r,
            "socket plan",
            MAX_SOCKETS_PER_MESSAGE,
        )?),
        Kind::Sockets => {
            let last = r.bool("last")?;
            let records =
                parse_list::<SocketRecord>(&mut r, "socket records", MAX_SOCKETS_PER_MESSAGE)?;
            Message::Sockets { records, last }
        }
        Kind::State => {
            let version = r.u32()?;
            let state = ProgramState {
                version,
                data: r.rest(),
            };
            state
                .validate()
                .map_err(|e| WireError::invalid("program state", e))?;
            Message::State(state)
        }
        Kind::Handover => Message::Handover(Handover {
            pages_total: r.u64()?,
            verify: r.bool("verify")?,
            postcopy: parse_list::<PageRun>(&mut r, "post-copy runs", MAX_POSTCOPY_RUNS)?,
        }),
        Kind::Digests => Message::Digests(parse_list::<RegionDigest>(
            &mut r,
            "digest list",
            MAX_REGIONS,
        )?),
        Kind::Resync => Message::Resync(parse_list::<PageRun>(
            &mut r,
            "resync runs",
            MAX_POSTCOPY_RUNS,
        )?),
        Kind::Ready => Message::Ready,
        Kind::Prepared => Message::Prepared { placed: r.u64()? },
        Kind::Commit => Message::Commit,
        Kind::SocketsActive => Message::SocketsActive,
        Kind::DemandSettled => Message::DemandSettled,
        Kind::PageRequest => Message::PageRequest(PageRun::parse(&mut r)?),
        Kind::Done => Message::Done(match DoneTag::from_u8(r.u8()?)? {
            DoneTag::NotChecked => Verification::NotChecked,
            DoneTag::Verified => Verification::Verified,
            DoneTag::Mismatch => Verification::Mismatch(RegionId(r.u32()?)),
        }),
        Kind::Abort => Message::Abort {
            reason: r.string("abort reason", MAX_REASON_BYTES)?,
        },
        Kind::QueueEstimate => {
            let bytes = r.u64()?;
            check_estimate(bytes)?;
            Message::QueueEstimate { bytes }
        }
        k => {
            return Err(WireError::bad(
                "frame kind",
                format!("{} is a handshake frame, not a message", k.name()),
            ));
        }
    };
    r.finish()?;
    Ok(msg)
}

/// Decode one complete, unfragmented frame holding a message (a zero-copy
/// slice of `buf` for page content).
pub fn parse_message(buf: Bytes) -> Result<Message> {
    let frame = Frame::new_checked(&buf[..])?;
    let repr = FrameRepr::parse(&frame)?;
    if repr.more() {
        return Err(WireError::Fragment(
            "a fragment where a whole message was expected",
        ));
    }
    let end = super::HEADER_LEN + repr.length as usize;
    if buf.len() != end {
        return Err(WireError::TrailingBytes(buf.len() - end, repr.kind.name()));
    }
    parse_message_body(repr.kind, buf.slice(super::HEADER_LEN..end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::encode_message;
    use lmig_core::protocol::PageBatch;

    #[test]
    fn pages_bytes() {
        let data = Bytes::from(vec![0xabu8; 4096]);
        let msg = Message::Pages(PageBatch {
            round: 3,
            run: PageRun::new(RegionId(1), 64, 1),
            data: PageData::Raw(data.clone()),
        });
        let wire = encode_message(&msg).unwrap().to_vec();
        assert_eq!(wire.len(), 16 + 21 + 4096);
        assert_eq!(&wire[0..8], &[b'L', b'M', b'I', b'G', 1, 0, 2, 0]);
        assert_eq!(&wire[8..12], &(21u32 + 4096).to_le_bytes());
        assert_eq!(
            &wire[16..37],
            &[
                3, 0, 0, 0, 1, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1
            ]
        );
        let wire = Bytes::from(wire);
        let back = parse_message(wire.clone()).unwrap();
        assert_eq!(back, msg);
        // Zero copy: the page bytes point into the receive buffer.
        let Message::Pages(PageBatch {
            data: PageData::Raw(d),
            ..
        }) = back
        else {
            unreachable!()
        };
        assert_eq!(d.as_ptr(), wire[37..].as_ptr());
    }

    #[test]
    fn pages_bad_sizes() {
        let mk = |count: u32, kind: u8, data: usize| {
            let mut b = vec![0u8; 21 + data];
            b[16..20].copy_from_slice(&count.to_le_bytes());
            b[20] = kind;
            parse_message_body(Kind::Pages, Bytes::from(b))
        };
        assert!(mk(1, 1, 4096).is_ok());
        assert!(mk(2, 1, 4096).is_err(), "2 KiB pages");
        assert!(mk(1, 1, 4097).is_err());
        assert!(mk(0, 1, 4096).is_err());
        assert!(mk(1, 0, 0).is_ok());
        assert!(mk(1, 0, 1).is_err(), "bytes after zero pages");
        assert!(mk(1, 2, 0).is_err(), "unknown data kind");
        assert!(parse_message_body(Kind::Pages, Bytes::from_static(&[0; 20])).is_err());
    }

    #[test]
    fn small_messages_bytes() {
        let wire = encode_message(&Message::Done(Verification::Mismatch(RegionId(5))))
            .unwrap()
            .to_vec();
        assert_eq!(&wire[16..], &[2, 5, 0, 0, 0]);
        let wire = encode_message(&Message::Abort {
            reason: "no".into(),
        })
        .unwrap()
        .to_vec();
        assert_eq!(&wire[16..], &[2, 0, b'n', b'o']);
        assert!(parse_message_body(Kind::Done, Bytes::from_static(&[3])).is_err());
        assert!(
            parse_message_body(Kind::Ready, Bytes::from_static(&[0])).is_err(),
            "trailing"
        );
        // `SocketsActive` is empty: a header only, and nothing may trail it.
        let wire = encode_message(&Message::SocketsActive).unwrap().to_vec();
        assert_eq!(wire.len(), 16);
        assert_eq!(
            parse_message_body(Kind::SocketsActive, Bytes::new()).unwrap(),
            Message::SocketsActive
        );
        assert!(parse_message_body(Kind::SocketsActive, Bytes::from_static(&[0])).is_err());
        assert!(parse_message_body(Kind::Hello, Bytes::new()).is_err());
        let long = "x".repeat(MAX_REASON_BYTES + 1);
        assert!(encode_message(&Message::Abort { reason: long }).is_err());
    }
}
