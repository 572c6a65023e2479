//! The body of a `Split` frame (kind 16): one split-memory message.
//!
//! ```text
//! tag u8, then
//!  1 Attach   u32 from, u32 to, RegionInfo
//!  2 Fetch    u64 epoch, PageRun
//!  3 Data     u32 from, u64 epoch, then a Pages body (PagesHeader + page bytes)
//!  4 NotHeld  u32 from, u64 epoch, PageRun
//!  5 Sync     u64 seq
//!  6 Synced   u64 seq, u64 pages
//!  7 Send     u32 to, u16 length + UTF-8 endpoint, u64 epoch, u32 count, count × PageRun
//!  8 Sent     u32 from, u32 to, u64 epoch, u64 pages, u64 missing
//!  9 Relay    u32 to, u16 length + UTF-8 endpoint, u64 epoch
//! 10 Forget   u64 epoch, u32 count, count × PageRun
//! 11 Refused  u16 length + UTF-8 reason (at most MAX_REASON_BYTES)
//! ```
//!
//! Page content of `Data` is a slice of the receive buffer (no copy).

use bytes::{BufMut, Bytes, BytesMut};
use lmig_core::model::{PageRun, RegionInfo};
use lmig_core::protocol::{MAX_REASON_BYTES, PageBatch, PageData};
use lmig_core::split::{HostId, MAX_ENDPOINT_BYTES, MAX_SPLIT_RUNS, SplitMessage};

use super::pages::{PagesHeader, emit_pages_header, parse_pages};
use super::reader::{Reader, put_string};
use super::records::Codec;
use super::{Result, WireError};

wire_enum! {
    /// The tag byte naming a split-memory message.
    enum Tag [] {
        Attach = 1 => "Attach",
        Fetch = 2 => "Fetch",
        Data = 3 => "Data",
        NotHeld = 4 => "NotHeld",
        Sync = 5 => "Sync",
        Synced = 6 => "Synced",
        Send = 7 => "Send",
        Sent = 8 => "Sent",
        Relay = 9 => "Relay",
        Forget = 10 => "Forget",
        Refused = 11 => "Refused",
    }
    unknown |t| WireError::bad("split message tag", format!("{t}"))
}

fn check_run(run: &PageRun) -> Result<()> {
    if run.count == 0 || run.first.checked_add(u64::from(run.count)).is_none() {
        return Err(WireError::bad(
            "page run",
            format!("{run:?} is empty or overflows"),
        ));
    }
    Ok(())
}

fn check_len(what: &'static str, len: usize, cap: usize) -> Result<()> {
    if len > cap {
        return Err(WireError::TooLong { what, len, cap });
    }
    Ok(())
}

fn put_runs(head: &mut BytesMut, runs: &[PageRun]) -> Result<()> {
    check_len("split runs", runs.len(), MAX_SPLIT_RUNS)?;
    runs.iter().try_for_each(check_run)?;
    head.reserve(4 + runs.len() * PageRun::MIN_LEN);
    head.put_u32_le(runs.len() as u32);
    for r in runs {
        r.emit(head);
    }
    Ok(())
}

fn parse_runs(r: &mut Reader) -> Result<Vec<PageRun>> {
    let n = r.count("split runs", PageRun::MIN_LEN, MAX_SPLIT_RUNS)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(PageRun::parse(r)?);
    }
    Ok(v)
}

/// Encode `msg` as a head (fields) and a tail (page bytes, shared).
pub(crate) fn emit(msg: &SplitMessage, head: &mut BytesMut) -> Result<Bytes> {
    let mut tail = Bytes::new();
    match msg {
        SplitMessage::Attach { from, to, region } => {
            region
                .validate()
                .map_err(|e| WireError::invalid("region", e))?;
            head.put_u8(Tag::Attach.to_u8());
            head.put_u32_le(from.0);
            head.put_u32_le(to.0);
            region.emit(head);
        }
        SplitMessage::Fetch { epoch, run } => {
            check_run(run)?;
            head.put_u8(Tag::Fetch.to_u8());
            head.put_u64_le(*epoch);
            run.emit(head);
        }
        SplitMessage::Data { from, epoch, batch } => {
            check_run(&batch.run)?;
            head.put_u8(Tag::Data.to_u8());
            head.put_u32_le(from.0);
            head.put_u64_le(*epoch);
            let at = head.len();
            head.resize(at + PagesHeader::<&[u8]>::LEN, 0);
            emit_pages_header(batch, &mut head[at..]);
            if let PageData::Raw(d) = &batch.data {
                tail = d.clone();
            }
        }
        SplitMessage::NotHeld { from, epoch, run } => {
            check_run(run)?;
            head.put_u8(Tag::NotHeld.to_u8());
            head.put_u32_le(from.0);
            head.put_u64_le(*epoch);
            run.emit(head);
        }
        SplitMessage::Sync { seq } => {
            head.put_u8(Tag::Sync.to_u8());
            head.put_u64_le(*seq);
        }
        SplitMessage::Synced { seq, pages } => {
            head.put_u8(Tag::Synced.to_u8());
            head.put_u64_le(*seq);
            head.put_u64_le(*pages);
        }
        SplitMessage::Send {
            to,
            endpoint,
            epoch,
            runs,
        } => {
            check_len("endpoint", endpoint.len(), MAX_ENDPOINT_BYTES)?;
            head.put_u8(Tag::Send.to_u8());
            head.put_u32_le(to.0);
            put_string(head, endpoint);
            head.put_u64_le(*epoch);
            put_runs(head, runs)?;
        }
        SplitMessage::Sent {
            from,
            to,
            epoch,
            pages,
            missing,
        } => {
            head.put_u8(Tag::Sent.to_u8());
            head.put_u32_le(from.0);
            head.put_u32_le(to.0);
            head.put_u64_le(*epoch);
            head.put_u64_le(*pages);
            head.put_u64_le(*missing);
        }
        SplitMessage::Relay {
            to,
            endpoint,
            epoch,
        } => {
            check_len("endpoint", endpoint.len(), MAX_ENDPOINT_BYTES)?;
            head.put_u8(Tag::Relay.to_u8());
            head.put_u32_le(to.0);
            put_string(head, endpoint);
            head.put_u64_le(*epoch);
        }
        SplitMessage::Forget { epoch, runs } => {
            head.put_u8(Tag::Forget.to_u8());
            head.put_u64_le(*epoch);
            put_runs(head, runs)?;
        }
        SplitMessage::Refused { reason } => {
            check_len("refusal reason", reason.len(), MAX_REASON_BYTES)?;
            head.put_u8(Tag::Refused.to_u8());
            put_string(head, reason);
        }
    }
    Ok(tail)
}

/// Decode the body of a `Split` frame.
pub(crate) fn parse(payload: Bytes) -> Result<SplitMessage> {
    let mut r = Reader::new(payload, "Split");
    let msg = match Tag::from_u8(r.u8()?)? {
        Tag::Attach => SplitMessage::Attach {
            from: HostId(r.u32()?),
            to: HostId(r.u32()?),
            region: RegionInfo::parse(&mut r)?,
        },
        Tag::Fetch => {
            let epoch = r.u64()?;
            SplitMessage::Fetch {
                epoch,
                run: PageRun::parse(&mut r)?,
            }
        }
        Tag::Data => {
            let from = HostId(r.u32()?);
            let epoch = r.u64()?;
            let batch: PageBatch = parse_pages(r.rest())?;
            return Ok(SplitMessage::Data { from, epoch, batch });
        }
        Tag::NotHeld => {
            let from = HostId(r.u32()?);
            let epoch = r.u64()?;
            SplitMessage::NotHeld {
                from,
                epoch,
                run: PageRun::parse(&mut r)?,
            }
        }
        Tag::Sync => SplitMessage::Sync { seq: r.u64()? },
        Tag::Synced => SplitMessage::Synced {
            seq: r.u64()?,
            pages: r.u64()?,
        },
        Tag::Send => {
            let to = HostId(r.u32()?);
            let endpoint = r.string("endpoint", MAX_ENDPOINT_BYTES)?;
            let epoch = r.u64()?;
            SplitMessage::Send {
                to,
                endpoint,
                epoch,
                runs: parse_runs(&mut r)?,
            }
        }
        Tag::Sent => SplitMessage::Sent {
            from: HostId(r.u32()?),
            to: HostId(r.u32()?),
            epoch: r.u64()?,
            pages: r.u64()?,
            missing: r.u64()?,
        },
        Tag::Relay => SplitMessage::Relay {
            to: HostId(r.u32()?),
            endpoint: r.string("endpoint", MAX_ENDPOINT_BYTES)?,
            epoch: r.u64()?,
        },
        Tag::Forget => {
            let epoch = r.u64()?;
            SplitMessage::Forget {
                epoch,
                runs: parse_runs(&mut r)?,
            }
        }
        Tag::Refused => SplitMessage::Refused {
            reason: r.string("refusal reason", MAX_REASON_BYTES)?,
        },
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use lmig_core::model::RegionId;
    use lmig_core::protocol::Message;

    use super::*;
    use crate::wire::{Kind, encode_message, parse_message, parse_message_body};

    #[test]
    fn data_bytes_and_zero_copy() {
        let msg = Message::Split(SplitMessage::Data {
            from: HostId(3),
            epoch: 7,
            batch: PageBatch {
                round: 0,
                run: PageRun::new(RegionId(1), 2, 1),
                data: PageData::Raw(Bytes::from(vec![9u8; 4096])),
            },
        });
        let wire = Bytes::from(encode_message(&msg).unwrap().to_vec());
        assert_eq!(wire[6], 16, "frame kind Split");
        assert_eq!(&wire[16..29], &[3, 3, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        let back = parse_message(wire.clone()).unwrap();
        assert_eq!(back, msg);
        let Message::Split(SplitMessage::Data { batch, .. }) = back else {
            unreachable!()
        };
        let PageData::Raw(d) = batch.data else {
            unreachable!()
        };
        assert_eq!(d.as_ptr(), wire[16 + 13 + 21..].as_ptr());
    }

    #[test]
    fn bad_bodies() {
        let body = |b: &[u8]| parse_message_body(Kind::Split, Bytes::copy_from_slice(b));
        assert!(body(&[]).is_err());
        assert!(body(&[0]).is_err(), "tag 0");
        assert!(body(&[12]).is_err(), "unknown tag");
        assert!(body(&[5, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(), "trailing");
        assert!(body(&[5, 1, 0, 0, 0, 0, 0, 0, 0]).is_ok());
        // Fetch of zero pages.
        let mut f = vec![2u8];
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[1, 0, 0, 0]);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&[0; 4]);
        assert!(body(&f).is_err());
        // A run count over what the bytes could hold.
        let mut s = vec![10u8];
        s.extend_from_slice(&[0; 8]);
        s.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(body(&s).is_err());
        let long = "x".repeat(MAX_ENDPOINT_BYTES + 1);
        assert!(
            encode_message(&Message::Split(SplitMessage::Relay {
                to: HostId(1),
                endpoint: long,
                epoch: 0
            }))
            .is_err()
        );
    }
}
