//! Encoding into frames (vectored, zero-copy for page data) and the stream
//! decoders (tokio-util's `Decoder` contract: `Ok(None)` = need more bytes).

use std::io::{self, IoSlice, Write};

use bytes::{Bytes, BytesMut};
use lmig_core::protocol::Message;

use super::frame::{Frame, FrameRepr, HEADER_LEN, Kind};
use super::handshake::Handshake;
use super::message::{emit_body, parse_message_body};
use super::{FLAG_MORE, MAX_FRAME_PAYLOAD, MAX_MESSAGE_BYTES, Result, WireError};

/// One encoded frame: its header and its payload's parts, which are shared
/// (not copied) slices of the message's bytes.
#[derive(Clone, Debug)]
struct EncodedFrame {
    header: [u8; HEADER_LEN],
    parts: Vec<Bytes>,
}

/// A message encoded as one or more frames, ready for a vectored write.
#[derive(Clone, Debug)]
pub struct EncodedFrames {
    frames: Vec<EncodedFrame>,
    len: usize,
}

impl EncodedFrames {
    /// Total bytes on the wire (headers included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: every message has at least a header.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of frames (more than one only for messages over
    /// [`MAX_FRAME_PAYLOAD`]).
    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }

    /// Write every frame with vectored writes: the headers and the payload
    /// parts go to the writer as they are, nothing is gathered into a new buffer.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        let n = self.frames.iter().map(|f| 1 + f.parts.len()).sum();
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(n);
        for f in &self.frames {
            slices.push(IoSlice::new(&f.header));
            slices.extend(f.parts.iter().map(|p| IoSlice::new(p)));
        }
        write_all_vectored(w, &mut slices)
    }

    /// The frames as one vector (copies; for tests, fuzzing and seeds).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for f in &self.frames {
            v.extend_from_slice(&f.header);
            for p in &f.parts {
                v.extend_from_slice(p);
            }
        }
        v
    }
}

/// `Write::write_all_vectored` (unstable in std) on stable.
fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write whole frame",
                ));
            }
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether frames carry the CRC-32C of their payload or 0 (sealed streams,
/// whose record layer authenticates every byte).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checksum {
    Crc32c,
    Sealed,
}

fn checksum(how: Checksum, parts: &[Bytes]) -> u32 {
    match how {
        Checksum::Crc32c => parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p)),
        Checksum::Sealed => 0,
    }
}

/// Cut `parts` (none empty) into frames of at most [`MAX_FRAME_PAYLOAD`]
/// bytes, slicing, never copying.
fn frames_of(kind: Kind, parts: Vec<Bytes>, how: Checksum) -> Result<EncodedFrames> {
    let total: usize = parts.iter().map(Bytes::len).sum();
    if total <= MAX_FRAME_PAYLOAD {
        let crc = checksum(how, &parts);
        let header = FrameRepr::new(kind, 0, total, crc)?.to_bytes();
        return Ok(EncodedFrames {
            frames: vec![EncodedFrame { header, parts }],
            len: HEADER_LEN + total,
        });
    }
    let mut frames = Vec::with_capacity(total.div_ceil(MAX_FRAME_PAYLOAD));
    let (mut off, mut cur) = (0, Vec::new());
    let mut room = MAX_FRAME_PAYLOAD.min(total);
    for mut p in parts {
        // Bounded: each round moves at least one byte of `p` into a frame.
        while !p.is_empty() {
            let n = p.len().min(room);
            cur.push(p.split_to(n));
            room -= n;
            if room == 0 {
                let len: usize = cur.iter().map(Bytes::len).sum();
                off += len;
                let flags = if off < total { FLAG_MORE } else { 0 };
                let header = FrameRepr::new(kind, flags, len, checksum(how, &cur))?.to_bytes();
                frames.push(EncodedFrame {
                    header,
                    parts: std::mem::take(&mut cur),
                });
                room = MAX_FRAME_PAYLOAD.min(total - off);
            }
        }
    }
    Ok(EncodedFrames {
        len: total + frames.len() * HEADER_LEN,
        frames,
    })
}

/// Encode a protocol message. Page and state bytes are referenced, not copied.
pub fn encode_message(msg: &Message) -> Result<EncodedFrames> {
    let (kind, parts) = emit_body(msg)?;
    frames_of(kind, parts, Checksum::Crc32c)
}

/// Encode a protocol message for a sealed stream (Noise records or TLS,
/// whose AEAD tags authenticate every byte): as [`encode_message`], with
/// the checksum field 0 instead of the payload's CRC-32C, which would only
/// repeat, weaker, what the record layer already checks.
pub fn encode_message_sealed(msg: &Message) -> Result<EncodedFrames> {
    let (kind, parts) = emit_body(msg)?;
    frames_of(kind, parts, Checksum::Sealed)
}

/// Encode a handshake message (always one small frame).
pub fn encode_handshake(hs: &Handshake) -> Result<EncodedFrames> {
    frames_of(hs.kind(), vec![hs.emit()], Checksum::Crc32c)
}

/// Splits a byte stream into checked frames.
///
/// Follows tokio-util's `Decoder` contract: `Ok(Some(frame))` consumes the
/// frame's bytes from `src`, `Ok(None)` means more bytes are needed (and
/// `src` was reserved for the rest of the frame, at most
/// [`MAX_FRAME_PAYLOAD`]), `Err` means the stream is corrupt and must be closed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    _private: (),
}

impl FrameDecoder {
    /// A decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next whole frame: its checked header and its payload (a slice of
    /// `src`'s buffer, no copy).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<(FrameRepr, Bytes)>> {
        if src.len() < HEADER_LEN {
            // Reject a wrong magic as early as possible.
            let n = src.len().min(4);
            if src[..n] != super::MAGIC[..n] {
                let mut m = [0u8; 4];
                m[..n].copy_from_slice(&src[..n]);
                return Err(WireError::BadMagic {
                    found: u32::from_le_bytes(m),
                });
            }
            return Ok(None);
        }
        let repr = FrameRepr::parse_header(&Frame::new_unchecked(&src[..HEADER_LEN]))?;
        let total = HEADER_LEN + repr.length as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let frame = src.split_to(total).freeze();
        let payload = frame.slice(HEADER_LEN..);
        let actual = crc32c::crc32c(&payload);
        if actual != repr.checksum {
            return Err(WireError::BadChecksum {
                expected: repr.checksum,
                actual,
            });
        }
        Ok(Some((repr, payload)))
    }
}

/// What a stream carries: protocol messages after authentication, handshake
/// messages before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireItem {
    /// A protocol message.
    Message(Message),
    /// A handshake message.
    Handshake(Handshake),
}

/// Decodes a byte stream into messages: frames, reassembly of fragmented
/// messages (at most [`MAX_MESSAGE_BYTES`]), then the message codecs.
///
/// Same contract as [`FrameDecoder::decode`].
#[derive(Debug, Default)]
pub struct MessageDecoder {
    frames: FrameDecoder,
    partial: Option<(Kind, BytesMut)>,
    /// Protocol message frames are not checked against their checksum
    /// field ([`MessageDecoder::sealed`]).
    sealed: bool,
}

impl MessageDecoder {
    /// A decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next whole message, or `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<WireItem>> {
        loop {
            let Some((repr, payload)) = self.frames.decode(src)? else {
                return Ok(None);
            };
            if let Some(item) = self.push(repr, payload)? {
                return Ok(Some(item));
            }
        }
    }

    /// For a sealed stream (the record layer below authenticated every
    /// byte): [`MessageDecoder::decode_frame`] no longer checks protocol
    /// message frames' checksum field, which [`encode_message_sealed`]
    /// sets to 0. Handshake frames are still checked.
    pub fn sealed(&mut self) {
        self.sealed = true;
    }

    /// Decode one whole frame held in `frame` (header and payload, nothing
    /// more): the message, or `Ok(None)` if it was a fragment and more
    /// frames are needed. Page content is a slice of `frame`.
    pub fn decode_frame(&mut self, frame: Bytes) -> Result<Option<WireItem>> {
        let view = Frame::new_checked(&frame[..])?;
        let header = FrameRepr::parse_header(&view)?;
        let repr = if self.sealed && !header.kind.is_handshake() {
            header
        } else {
            FrameRepr::parse(&view)?
        };
        let end = HEADER_LEN + repr.length as usize;
        if frame.len() != end {
            return Err(WireError::TrailingBytes(
                frame.len() - end,
                repr.kind.name(),
            ));
        }
        self.push(repr, frame.slice(HEADER_LEN..))
    }

    fn push(&mut self, repr: FrameRepr, payload: Bytes) -> Result<Option<WireItem>> {
        if repr.kind.is_handshake() {
            if self.partial.is_some() {
                return Err(WireError::Fragment(
                    "handshake frame inside a fragmented message",
                ));
            }
            return Handshake::parse(repr.kind, payload).map(|h| Some(WireItem::Handshake(h)));
        }
        if repr.more() && payload.is_empty() {
            return Err(WireError::Fragment("empty fragment"));
        }
        match self.partial.as_mut() {
            Some((kind, buf)) => {
                if *kind != repr.kind {
                    return Err(WireError::Fragment("fragments of different kinds"));
                }
                if buf.len() + payload.len() > MAX_MESSAGE_BYTES {
                    return Err(WireError::TooLong {
                        what: "fragmented message",
                        len: buf.len() + payload.len(),
                        cap: MAX_MESSAGE_BYTES,
                    });
                }
                buf.extend_from_slice(&payload);
                if repr.more() {
                    return Ok(None);
                }
                let (kind, buf) = self.partial.take().unwrap_or((repr.kind, BytesMut::new()));
                parse_message_body(kind, buf.freeze()).map(|m| Some(WireItem::Message(m)))
            }
            None if repr.more() => {
                let mut buf = BytesMut::with_capacity(payload.len() * 2);
                buf.extend_from_slice(&payload);
                self.partial = Some((repr.kind, buf));
                Ok(None)
            }
            None => parse_message_body(repr.kind, payload).map(|m| Some(WireItem::Message(m))),
        }
    }

    /// Is the decoder in the middle of a fragmented message?
    pub fn has_partial(&self) -> bool {
        self.partial.is_some()
    }
}

#[cfg(test)]
mod tests {
    use lmig_core::model::{PageRun, ProgramState, RegionId};
    use lmig_core::protocol::{PageBatch, PageData};

    use super::*;

    fn feed_bytewise(wire: &[u8]) -> Vec<WireItem> {
        let mut dec = MessageDecoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[*b]);
            while let Some(item) = dec.decode(&mut buf).unwrap() {
                out.push(item);
            }
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn stream_decoder_needs_more() {
        let a = encode_message(&Message::Ready).unwrap().to_vec();
        let b = encode_message(&Message::Abort {
            reason: "bye".into(),
        })
        .unwrap()
        .to_vec();
        let wire = [a, b].concat();
        let items = feed_bytewise(&wire);
        assert_eq!(
            items,
            vec![
                WireItem::Message(Message::Ready),
                WireItem::Message(Message::Abort {
                    reason: "bye".into()
                })
            ]
        );
    }

    #[test]
    fn sealed_frames_carry_no_checksum_and_only_sealed_decoders_skip_it() {
        let msg = Message::Abort {
            reason: "bye".into(),
        };
        let plain = encode_message(&msg).unwrap().to_vec();
        let sealed = encode_message_sealed(&msg).unwrap().to_vec();
        // Same frame but for the checksum field, which is 0.
        assert_eq!(plain[..12], sealed[..12]);
        assert_eq!(plain[16..], sealed[16..]);
        assert_ne!(plain[12..16], [0; 4]);
        assert_eq!(sealed[12..16], [0; 4]);
        let mut dec = MessageDecoder::new();
        dec.sealed();
        assert_eq!(
            dec.decode_frame(Bytes::from(sealed.clone())).unwrap(),
            Some(WireItem::Message(msg.clone()))
        );
        // An unsealed decoder still checks (a plaintext stream).
        assert!(matches!(
            MessageDecoder::new().decode_frame(Bytes::from(sealed)),
            Err(WireError::BadChecksum { .. })
        ));
        // A sealed decoder still checks handshake frames, and everything else.
        let mut hs = encode_handshake(&Handshake::Reject(crate::wire::Reject {
            reason: crate::wire::RejectReason::Busy,
        }))
        .unwrap()
        .to_vec();
        *hs.last_mut().unwrap() ^= 1;
        assert!(matches!(
            dec.decode_frame(Bytes::from(hs)),
            Err(WireError::BadChecksum { .. })
        ));
        let mut bad_len = encode_message_sealed(&msg).unwrap().to_vec();
        bad_len.push(0);
        assert!(dec.decode_frame(Bytes::from(bad_len)).is_err());
    }

    #[test]
    fn stream_decoder_errors() {
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::from(&b"HTTP"[..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(WireError::BadMagic { .. })
        ));
        let mut wire = encode_message(&Message::Abort {
            reason: "bye".into(),
        })
        .unwrap()
        .to_vec();
        *wire.last_mut().unwrap() = b'!';
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(
            FrameDecoder::new().decode(&mut buf),
            Err(WireError::BadChecksum { .. })
        ));
        // A length over the cap is refused from the header alone.
        let mut wire = encode_message(&Message::Ready).unwrap().to_vec();
        wire[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(
            FrameDecoder::new().decode(&mut buf),
            Err(WireError::TooLong { .. })
        ));
        assert!(
            buf.capacity() < 1 << 20,
            "no allocation for a refused frame"
        );
    }

    #[test]
    fn fragmented_state_reassembles() {
        let data = Bytes::from(vec![0x5au8; MAX_FRAME_PAYLOAD + 10]);
        let msg = Message::State(ProgramState::new(3, data));
        let enc = encode_message(&msg).unwrap();
        assert_eq!(enc.frame_count(), 2);
        let wire = enc.to_vec();
        assert_eq!(wire[7], FLAG_MORE);
        let mut dec = MessageDecoder::new();
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(WireItem::Message(msg)));
    }

    #[test]
    fn fragments_of_mixed_kinds_rejected() {
        let data = Bytes::from(vec![0u8; MAX_FRAME_PAYLOAD + 1]);
        let wire = encode_message(&Message::State(ProgramState::new(1, data)))
            .unwrap()
            .to_vec();
        let first = &wire[..HEADER_LEN + MAX_FRAME_PAYLOAD];
        let ready = encode_message(&Message::Ready).unwrap().to_vec();
        let mut buf = BytesMut::from(&[first, &ready[..]].concat()[..]);
        let mut dec = MessageDecoder::new();
        assert!(matches!(dec.decode(&mut buf), Err(WireError::Fragment(_))));
    }

    #[test]
    fn socket_queues_shared_across_frames_decode_to_the_same_records() {
        // Two queues of 40 MiB: the second straddles the 64 MiB frame limit.
        let mut records = crate::fuzzing::sample_records();
        let Some(lmig_core::model::SocketRecord::Tcp(c)) = records
            .iter_mut()
            .find(|r| matches!(r, lmig_core::model::SocketRecord::Tcp(_)))
        else {
            panic!("the samples hold a TCP record");
        };
        let n = 40 << 20;
        c.send_queue = (0..n).map(|j| (j % 251) as u8).collect();
        c.unsent_len = (n / 2) as u32;
        c.recv_queue = Bytes::from(vec![0x33; n]);
        let msg = Message::Sockets {
            records,
            last: true,
        };
        for (enc, sealed) in [
            (encode_message(&msg).unwrap(), false),
            (encode_message_sealed(&msg).unwrap(), true),
        ] {
            assert_eq!(enc.frame_count(), 2);
            let mut out = Vec::new();
            enc.write_to(&mut out).unwrap();
            assert_eq!(out.len(), enc.len());
            let mut dec = MessageDecoder::new();
            if sealed {
                dec.sealed();
            }
            let (first, second) = out.split_at(HEADER_LEN + MAX_FRAME_PAYLOAD);
            assert_eq!(
                dec.decode_frame(Bytes::copy_from_slice(first)).unwrap(),
                None
            );
            let got = dec.decode_frame(Bytes::copy_from_slice(second)).unwrap();
            assert_eq!(
                got,
                Some(WireItem::Message(msg.clone())),
                "sealed: {sealed}"
            );
        }
    }

    #[test]
    fn vectored_write_matches_to_vec() {
        let msg = Message::Pages(PageBatch {
            round: 0,
            run: PageRun::new(RegionId(0), 0, 2),
            data: PageData::Raw(Bytes::from(vec![1u8; 8192])),
        });
        let enc = encode_message(&msg).unwrap();
        let mut out = Vec::new();
        enc.write_to(&mut out).unwrap();
        assert_eq!(out, enc.to_vec());
        assert_eq!(out.len(), enc.len());
    }
}
