//! The lmig wire format: frames, and a codec for every protocol message.
//!
//! # Frame
//!
//! Every message travels in one or more frames. A frame is a fixed 16-byte
//! little-endian header followed by its payload:
//!
//! ```text
//!  0       4       6    7     8          12         16
//!  +-------+-------+----+-----+----------+----------+------------------+
//!  | magic |version|kind|flags|  length  |  crc32c  | payload (length) |
//!  | "LMIG"|  u16  | u8 | u8  |   u32    |   u32    |                  |
//!  +-------+-------+----+-----+----------+----------+------------------+
//! ```
//!
//! * `magic` is the ASCII bytes `LMIG`.
//! * `version` is [`PROTOCOL_VERSION`](lmig_core::protocol::PROTOCOL_VERSION);
//!   the receiver accepts the current and the previous version (never 0).
//! * `kind` names the message ([`Kind`]); kind 0 is invalid.
//! * `flags`: bit 0 ([`FLAG_MORE`]) says the message continues in the next
//!   frame; every other bit must be zero.
//! * `length` is the payload length, at most [`MAX_FRAME_PAYLOAD`] (64 MiB):
//!   a peer can never make a receiver allocate more than that for one frame.
//! * `crc32c` is the CRC-32C (Castagnoli) of the payload; 0 in protocol
//!   message frames on a sealed stream (Noise records or TLS: the record
//!   layer's AEAD tag authenticates every byte, see `Security`), where the
//!   receiver does not check it ([`encode_message_sealed`],
//!   [`MessageDecoder::sealed`]). Handshake frames always carry it.
//!
//! A message whose encoding exceeds [`MAX_FRAME_PAYLOAD`] (a large program
//! state, a socket with big queues, a batch of huge pages) is split into
//! several frames of the same kind, all but the last with [`FLAG_MORE`]. The
//! receiver reassembles at most [`MAX_MESSAGE_BYTES`]; the reassembly buffer
//! grows only as bytes actually arrive. Messages that fit one frame (every
//! page batch of 4 KiB and 2 MiB pages) are decoded without copying: page
//! content is a [`Bytes`](bytes::Bytes) slice of the receive buffer.
//!
//! # Message bodies
//!
//! Integers are little-endian, `bool` is one byte 0 or 1, `Option<T>` a tag
//! byte 0 or 1 then `T`, strings a `u16` length then UTF-8, lists a `u32`
//! count then the elements, socket addresses a family byte (4 or 6) then the
//! address, port, and for IPv6 the flow info and scope id. Decoders are
//! strict: unknown tags, non-canonical booleans and trailing bytes are
//! errors, counts are checked against the remaining bytes before anything is
//! allocated, and the records are checked with lmig-core's `validate()`.

mod codec;
mod frame;
mod handshake;
mod message;
mod pages;
mod prep;
mod reader;
mod records;
mod shared;
mod split;

pub use codec::{
    EncodedFrames, FrameDecoder, MessageDecoder, WireItem, encode_handshake, encode_message,
    encode_message_sealed,
};
pub use frame::{Frame, FrameRepr, HEADER_LEN, Kind, MAGIC, MIN_VERSION};
pub use handshake::{
    Accept, Challenge, Handshake, Hello, KeyExchange, MAX_DATA_STREAMS, MAX_KEY_EXCHANGE,
    NONCE_LEN, Proof, Reject, RejectReason, SESSION_ID_LEN, StreamRole, TAG_LEN,
};
pub use message::{parse_message, parse_message_body};
pub use pages::PagesHeader;
pub use records::Codec;

/// Largest payload of one frame (64 MiB).
pub const MAX_FRAME_PAYLOAD: usize = 64 << 20;

/// Largest message, reassembled from several frames: one batch of 64 pages
/// of 2 MiB, or one 1 GiB huge page, or the largest program state, plus room
/// for the message's own fields.
pub const MAX_MESSAGE_BYTES: usize = (1 << 30) + (1 << 20);

/// The message continues in the next frame (same kind).
pub const FLAG_MORE: u8 = 1 << 0;

/// A frame or a message that cannot be decoded (or encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The buffer ends before the structure does.
    #[error("truncated {what}: needs {needed} bytes, {available} available")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes there.
        available: usize,
    },
    /// The frame does not start with the lmig magic.
    #[error("bad magic {found:#010x}: not an lmig frame")]
    BadMagic {
        /// The first four bytes, little-endian.
        found: u32,
    },
    /// A protocol version this side does not speak.
    #[error("unsupported protocol version {found} (this side speaks {min}..={max})")]
    BadVersion {
        /// The version in the frame.
        found: u16,
        /// Oldest version accepted.
        min: u16,
        /// Newest version accepted.
        max: u16,
    },
    /// A frame kind that is 0 or unknown.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// Flag bits this version does not define.
    #[error("unknown frame flags {0:#04x}")]
    BadFlags(u8),
    /// A length over a cap.
    #[error("{what} of {len} bytes exceeds the cap of {cap}")]
    TooLong {
        /// What is too long.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// The payload does not match its checksum.
    #[error("checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    BadChecksum {
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the payload received.
        actual: u32,
    },
    /// A field holds a value the format does not allow.
    #[error("invalid {field}: {detail}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Bytes left over after the message.
    #[error("{0} trailing bytes after the {1} message")]
    TrailingBytes(usize, &'static str),
    /// The fragments of one message disagree.
    #[error("fragmented message: {0}")]
    Fragment(&'static str),
    /// lmig-core rejected the decoded record.
    #[error("{what} rejected: {detail}")]
    Invalid {
        /// What was decoded.
        what: &'static str,
        /// lmig-core's reason.
        detail: String,
    },
}

impl WireError {
    pub(crate) fn bad(field: &'static str, detail: impl Into<String>) -> Self {
        Self::BadValue {
            field,
            detail: detail.into(),
        }
    }

    pub(crate) fn invalid(what: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Invalid {
            what,
            detail: e.to_string(),
        }
    }
}

/// Result of the wire codecs.
pub type Result<T, E = WireError> = std::result::Result<T, E>;
