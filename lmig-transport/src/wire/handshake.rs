//! Handshake messages: the mutual authentication of every stream
//! (see [`crate::auth`] for the protocol).
//!
//! ```text
//! Hello      [u8;16] session, u8 role, u16 index, u16 data_streams, u32 generation, [u8;32] nonce
//! Challenge  [u8;32] nonce
//! Proof      [u8;32] HMAC-SHA256 tag
//! Accept     [u8;32] HMAC-SHA256 tag
//! Reject     u8 reason
//! KeyExchange  1..=128 bytes: one Noise handshake message (see crate::noise)
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::Kind;
use super::reader::Reader;
use super::{Result, WireError};

/// Length of a session id.
pub const SESSION_ID_LEN: usize = 16;
/// Length of a nonce.
pub const NONCE_LEN: usize = 32;
/// Length of an authentication tag (HMAC-SHA256).
pub const TAG_LEN: usize = 32;
/// Longest `KeyExchange` body (a Noise handshake message; ours are 48 bytes).
pub const MAX_KEY_EXCHANGE: usize = 128;
/// Most data streams one channel may have.
pub const MAX_DATA_STREAMS: u16 = 64;

wire_enum! {
    /// What a stream carries inside its channel.
    pub enum StreamRole [pub(crate)] {
        /// The control lane (index 0).
        Control = 1 => "control",
        /// Data lane `index`.
        Data = 2 => "data",
        /// The urgent lane for post-copy (index 0).
        Urgent = 3 => "urgent",
    }
    unknown |v| WireError::bad("stream role", format!("{v}"))
}

/// The dialer opens a stream: which channel and lane it is for, and its nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The channel's session id, chosen at random by the dialer; every
    /// stream of one channel carries the same one.
    pub session: [u8; SESSION_ID_LEN],
    /// The stream's role.
    pub role: StreamRole,
    /// Lane index (data streams), 0 otherwise.
    pub index: u16,
    /// Data streams of the channel (1..=64).
    pub data_streams: u16,
    /// 0 for the first connection, +1 at every reconnect.
    pub generation: u32,
    /// The dialer's fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Hello {
    const LEN: usize = SESSION_ID_LEN + 1 + 2 + 2 + 4 + NONCE_LEN;
}

/// The listener's fresh random nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// The dialer's proof that it holds the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    /// HMAC-SHA256 over the transcript.
    pub tag: [u8; TAG_LEN],
}

/// The listener's proof that it holds the key; the stream is now authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    /// HMAC-SHA256 over the transcript.
    pub tag: [u8; TAG_LEN],
}

wire_enum! {
    /// Why a stream was refused. Deliberately coarse: a failing peer learns nothing.
    ///
    /// On the wire a single byte: `AuthFailed` 1, `Unexpected` 2, `BadStream` 3,
    /// `Timeout` 4, `Busy` 5.
    pub enum RejectReason [pub(crate)] {
        /// Authentication failed (wrong key, replayed handshake).
        AuthFailed = 1 => "AuthFailed",
        /// A frame other than the next handshake step arrived (or bytes that
        /// are not a frame).
        Unexpected = 2 => "Unexpected",
        /// The stream does not fit the channel (role, index, session, generation).
        BadStream = 3 => "BadStream",
        /// The handshake did not complete within the listener's deadline.
        Timeout = 4 => "Timeout",
        /// The listener had too many unauthenticated connections in flight and
        /// dropped this one, which had made the least progress.
        Busy = 5 => "Busy",
    }
    unknown |v| WireError::bad("reject reason", format!("{v}"))
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AuthFailed => "authentication failed (wrong key or replayed handshake)",
            Self::Unexpected => "unexpected frame during the handshake",
            Self::BadStream => "the stream does not fit the channel",
            Self::Timeout => "the handshake took too long",
            Self::Busy => "too many unauthenticated connections",
        })
    }
}

/// The listener refuses the stream and closes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// Why.
    pub reason: RejectReason,
}

/// A Noise handshake message, pipelined with the proofs on encrypted
/// streams: the dialer's after its `Proof`, the listener's after its `Accept`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyExchange {
    /// The Noise message (1..=[`MAX_KEY_EXCHANGE`] bytes).
    pub message: Bytes,
}

/// One handshake message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// Dialer → listener.
    Hello(Hello),
    /// Listener → dialer.
    Challenge(Challenge),
    /// Dialer → listener.
    Proof(Proof),
    /// Listener → dialer.
    Accept(Accept),
    /// Either way; ends the connection.
    Reject(Reject),
    /// Either way, on encrypted streams.
    KeyExchange(KeyExchange),
}

impl Handshake {
    /// The frame kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello(_) => Kind::Hello,
            Self::Challenge(_) => Kind::Challenge,
            Self::Proof(_) => Kind::Proof,
            Self::Accept(_) => Kind::Accept,
            Self::Reject(_) => Kind::Reject,
            Self::KeyExchange(_) => Kind::KeyExchange,
        }
    }

    /// Encoded body length.
    pub fn buffer_len(&self) -> usize {
        match self {
            Self::Hello(_) => Hello::LEN,
            Self::Challenge(_) => NONCE_LEN,
            Self::Proof(_) | Self::Accept(_) => TAG_LEN,
            Self::Reject(_) => 1,
            Self::KeyExchange(k) => k.message.len(),
        }
    }

    /// The body bytes.
    pub fn emit(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.buffer_len());
        match self {
            Self::Hello(h) => {
                b.put_slice(&h.session);
                b.put_u8(h.role.to_u8());
                b.put_u16_le(h.index);
                b.put_u16_le(h.data_streams);
                b.put_u32_le(h.generation);
                b.put_slice(&h.nonce);
            }
            Self::Challenge(c) => b.put_slice(&c.nonce),
            Self::Proof(p) => b.put_slice(&p.tag),
            Self::Accept(a) => b.put_slice(&a.tag),
            Self::Reject(r) => b.put_u8(r.reason.to_u8()),
            Self::KeyExchange(k) => b.put_slice(&k.message),
        }
        b.freeze()
    }

    /// Parse the body of a handshake frame of `kind`.
    pub fn parse(kind: Kind, payload: Bytes) -> Result<Self> {
        let mut r = Reader::new(payload, kind.name());
        let hs = match kind {
            Kind::Hello => {
                let session = r.array()?;
                let role = StreamRole::from_u8(r.u8()?)?;
                let index = r.u16()?;
                let data_streams = r.u16()?;
                let generation = r.u32()?;
                let nonce = r.array()?;
                if data_streams == 0 || data_streams > MAX_DATA_STREAMS {
                    return Err(WireError::bad(
                        "data streams",
                        format!("{data_streams} not in 1..=64"),
                    ));
                }
                let index_ok = match role {
                    StreamRole::Data => index < data_streams,
                    StreamRole::Control | StreamRole::Urgent => index == 0,
                };
                if !index_ok {
                    return Err(WireError::bad(
                        "stream index",
                        format!("{index} for {role:?}"),
                    ));
                }
                Self::Hello(Hello {
                    session,
                    role,
                    index,
                    data_streams,
                    generation,
                    nonce,
                })
            }
            Kind::Challenge => Self::Challenge(Challenge { nonce: r.array()? }),
            Kind::Proof => Self::Proof(Proof { tag: r.array()? }),
            Kind::Accept => Self::Accept(Accept { tag: r.array()? }),
            Kind::Reject => Self::Reject(Reject {
                reason: RejectReason::from_u8(r.u8()?)?,
            }),
            Kind::KeyExchange => {
                let message = r.rest();
                if message.is_empty() || message.len() > MAX_KEY_EXCHANGE {
                    return Err(WireError::bad(
                        "key exchange",
                        format!("{} bytes not in 1..={MAX_KEY_EXCHANGE}", message.len()),
                    ));
                }
                Self::KeyExchange(KeyExchange { message })
            }
            k => {
                return Err(WireError::bad(
                    "frame kind",
                    format!("{} is a message, not a handshake frame", k.name()),
                ));
            }
        };
        r.finish()?;
        Ok(hs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_and_reason_numbers_are_pinned() {
        let roles: Vec<(u8, &str)> = StreamRole::ALL
            .iter()
            .map(|r| (r.to_u8(), r.name()))
            .collect();
        assert_eq!(roles, [(1, "control"), (2, "data"), (3, "urgent")]);
        let reasons: Vec<u8> = RejectReason::ALL.iter().map(|r| r.to_u8()).collect();
        assert_eq!(reasons, [1, 2, 3, 4, 5]);
        assert_eq!(RejectReason::from_u8(5), Ok(RejectReason::Busy));
        assert!(StreamRole::from_u8(0).is_err());
        assert!(StreamRole::from_u8(4).is_err());
        assert!(RejectReason::from_u8(0).is_err());
        assert!(RejectReason::from_u8(6).is_err());
    }

    fn hello() -> Hello {
        Hello {
            session: [7; 16],
            role: StreamRole::Data,
            index: 1,
            data_streams: 2,
            generation: 0,
            nonce: [9; 32],
        }
    }

    #[test]
    fn hello_bytes() {
        let hs = Handshake::Hello(hello());
        let b = hs.emit();
        assert_eq!(b.len(), 57);
        assert_eq!(&b[16..25], &[2, 1, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(Handshake::parse(Kind::Hello, b).unwrap(), hs);
    }

    #[test]
    fn reject_codes_are_pinned() {
        let all = [
            (RejectReason::AuthFailed, 1),
            (RejectReason::Unexpected, 2),
            (RejectReason::BadStream, 3),
            (RejectReason::Timeout, 4),
            (RejectReason::Busy, 5),
        ];
        for (reason, code) in all {
            let hs = Handshake::Reject(Reject { reason });
            assert_eq!(&hs.emit()[..], &[code]);
            assert_eq!(Handshake::parse(Kind::Reject, hs.emit()).unwrap(), hs);
        }
    }

    #[test]
    fn hello_bad_index() {
        let mut h = hello();
        h.index = 2;
        assert!(Handshake::parse(Kind::Hello, Handshake::Hello(h).emit()).is_err());
        let mut h = hello();
        h.role = StreamRole::Control;
        assert!(Handshake::parse(Kind::Hello, Handshake::Hello(h).emit()).is_err());
        let mut h = hello();
        h.data_streams = 65;
        assert!(Handshake::parse(Kind::Hello, Handshake::Hello(h).emit()).is_err());
    }

    #[test]
    fn short_and_long_bodies() {
        assert!(Handshake::parse(Kind::Challenge, Bytes::from_static(&[0; 31])).is_err());
        assert!(Handshake::parse(Kind::Challenge, Bytes::from_static(&[0; 33])).is_err());
        assert!(Handshake::parse(Kind::Reject, Bytes::from_static(&[0])).is_err());
        assert!(Handshake::parse(Kind::Reject, Bytes::from_static(&[6])).is_err());
        assert!(Handshake::parse(Kind::Ready, Bytes::new()).is_err());
        assert!(Handshake::parse(Kind::KeyExchange, Bytes::new()).is_err());
        assert!(Handshake::parse(Kind::KeyExchange, Bytes::from_static(&[0; 129])).is_err());
        let kx = Handshake::parse(Kind::KeyExchange, Bytes::from_static(&[3; 48])).unwrap();
        assert_eq!(kx.emit(), Bytes::from_static(&[3; 48]));
    }
}
