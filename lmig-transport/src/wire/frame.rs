//! The frame header: a zero-copy view and its high-level representation.

use lmig_core::protocol::PROTOCOL_VERSION;

use super::{FLAG_MORE, MAX_FRAME_PAYLOAD, Result, WireError};

/// The first four bytes of every frame: ASCII `LMIG`.
pub const MAGIC: [u8; 4] = *b"LMIG";

/// Length of the frame header.
pub const HEADER_LEN: usize = 16;

/// Oldest protocol version accepted: the previous one, but never 0.
pub const MIN_VERSION: u16 = if PROTOCOL_VERSION > 1 {
    PROTOCOL_VERSION - 1
} else {
    1
};

mod field {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: Range<usize> = 4..6;
    pub const KIND: usize = 6;
    pub const FLAGS: usize = 7;
    pub const LENGTH: Range<usize> = 8..12;
    pub const CHECKSUM: Range<usize> = 12..16;
    pub const PAYLOAD: usize = 16;
}

wire_enum! {
    /// What a frame carries (kind 0 is invalid; the handshake's kinds are
    /// 0x40 and above).
    #[non_exhaustive]
    pub enum Kind [pub] {
        /// `Message::Regions`.
        Regions = 1 => "Regions",
        /// `Message::Pages`.
        Pages = 2 => "Pages",
        /// `Message::RoundEnd`.
        RoundEnd = 3 => "RoundEnd",
        /// `Message::SocketPlan`.
        SocketPlan = 4 => "SocketPlan",
        /// `Message::Sockets`.
        Sockets = 5 => "Sockets",
        /// `Message::State`.
        State = 6 => "State",
        /// `Message::Handover`.
        Handover = 7 => "Handover",
        /// `Message::Ready`.
        Ready = 8 => "Ready",
        /// `Message::Commit`.
        Commit = 9 => "Commit",
        /// `Message::PageRequest`.
        PageRequest = 10 => "PageRequest",
        /// `Message::Done`.
        Done = 11 => "Done",
        /// `Message::Abort`.
        Abort = 12 => "Abort",
        /// `Message::Digests`.
        Digests = 13 => "Digests",
        /// `Message::Resync`.
        Resync = 14 => "Resync",
        /// `Message::Prepared`.
        Prepared = 15 => "Prepared",
        /// `Message::Split` (split memory; a tag byte names the message).
        Split = 16 => "Split",
        /// `Message::QueueEstimate`.
        QueueEstimate = 17 => "QueueEstimate",
        /// `Message::SocketsActive`.
        SocketsActive = 18 => "SocketsActive",
        /// `Message::DemandSettled`.
        DemandSettled = 19 => "DemandSettled",
        /// Handshake: the dialer's hello.
        Hello = 0x40 => "Hello",
        /// Handshake: the listener's challenge.
        Challenge = 0x41 => "Challenge",
        /// Handshake: the dialer's proof.
        Proof = 0x42 => "Proof",
        /// Handshake: the listener's proof; the stream is authenticated.
        Accept = 0x43 => "Accept",
        /// Handshake: authentication refused; the connection closes.
        Reject = 0x44 => "Reject",
        /// Handshake: a Noise handshake message (encrypted streams).
        KeyExchange = 0x45 => "KeyExchange",
    }
    unknown |v| WireError::BadKind(v)
}

/// The first handshake kind: kinds from here on are only allowed before
/// authentication.
pub(crate) const FIRST_HANDSHAKE_KIND: u8 = 0x40;

impl Kind {
    /// Is this a handshake frame (only allowed before authentication)?
    pub fn is_handshake(self) -> bool {
        self.to_u8() >= FIRST_HANDSHAKE_KIND
    }
}

/// A read/write view of a frame in a buffer (header then payload).
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// A view without any check; accessors may panic on a short buffer.
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// A view after [`Frame::check_len`]: no accessor can panic.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// Check that the buffer holds the header and the whole payload, and
    /// that the payload length is within [`MAX_FRAME_PAYLOAD`].
    pub fn check_len(&self) -> Result<()> {
        let buf = self.buffer.as_ref();
        if buf.len() < HEADER_LEN {
            return Err(WireError::Truncated {
                what: "frame header",
                needed: HEADER_LEN,
                available: buf.len(),
            });
        }
        let len = self.length() as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(WireError::TooLong {
                what: "frame payload",
                len,
                cap: MAX_FRAME_PAYLOAD,
            });
        }
        if buf.len() < HEADER_LEN + len {
            return Err(WireError::Truncated {
                what: "frame payload",
                needed: HEADER_LEN + len,
                available: buf.len(),
            });
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The magic field, little-endian.
    pub fn magic(&self) -> u32 {
        u32::from_le_bytes(
            self.buffer.as_ref()[field::MAGIC]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// The protocol version field.
    pub fn version(&self) -> u16 {
        u16::from_le_bytes(
            self.buffer.as_ref()[field::VERSION]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// The raw kind field.
    pub fn kind(&self) -> u8 {
        self.buffer.as_ref()[field::KIND]
    }

    /// The flags field.
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    /// The payload length field.
    pub fn length(&self) -> u32 {
        u32::from_le_bytes(
            self.buffer.as_ref()[field::LENGTH]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// The checksum field.
    pub fn checksum(&self) -> u32 {
        u32::from_le_bytes(
            self.buffer.as_ref()[field::CHECKSUM]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// The payload (after `check_len`).
    pub fn payload(&self) -> &[u8] {
        let len = self.length() as usize;
        &self.buffer.as_ref()[field::PAYLOAD..field::PAYLOAD + len]
    }

    /// Does the checksum field match the payload?
    pub fn verify_checksum(&self) -> bool {
        crc32c::crc32c(self.payload()) == self.checksum()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Set the magic field.
    pub fn set_magic(&mut self) {
        self.buffer.as_mut()[field::MAGIC].copy_from_slice(&MAGIC);
    }

    /// Set the version field.
    pub fn set_version(&mut self, v: u16) {
        self.buffer.as_mut()[field::VERSION].copy_from_slice(&v.to_le_bytes());
    }

    /// Set the kind field.
    pub fn set_kind(&mut self, kind: Kind) {
        self.buffer.as_mut()[field::KIND] = kind as u8;
    }

    /// Set the flags field.
    pub fn set_flags(&mut self, flags: u8) {
        self.buffer.as_mut()[field::FLAGS] = flags;
    }

    /// Set the length field.
    pub fn set_length(&mut self, len: u32) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&len.to_le_bytes());
    }

    /// Set the checksum field.
    pub fn set_checksum(&mut self, crc: u32) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The checked contents of a frame header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FrameRepr {
    /// Protocol version.
    pub version: u16,
    /// What the frame carries.
    pub kind: Kind,
    /// Flags ([`FLAG_MORE`]).
    pub flags: u8,
    /// Payload length.
    pub length: u32,
    /// CRC-32C of the payload.
    pub checksum: u32,
}

impl FrameRepr {
    /// The header for `payload_len` bytes with checksum `checksum`, current version.
    pub fn new(kind: Kind, flags: u8, payload_len: usize, checksum: u32) -> Result<Self> {
        if payload_len > MAX_FRAME_PAYLOAD {
            return Err(WireError::TooLong {
                what: "frame payload",
                len: payload_len,
                cap: MAX_FRAME_PAYLOAD,
            });
        }
        Ok(Self {
            version: PROTOCOL_VERSION,
            kind,
            flags,
            length: payload_len as u32,
            checksum,
        })
    }

    /// Check the header fields (magic, version, kind, flags, length) of a
    /// frame whose header is present; the payload may still be missing.
    pub fn parse_header<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<Self> {
        let available = frame.buffer.as_ref().len();
        if available < HEADER_LEN {
            return Err(WireError::Truncated {
                what: "frame header",
                needed: HEADER_LEN,
                available,
            });
        }
        if frame.magic() != u32::from_le_bytes(MAGIC) {
            return Err(WireError::BadMagic {
                found: frame.magic(),
            });
        }
        let version = frame.version();
        if !(MIN_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(WireError::BadVersion {
                found: version,
                min: MIN_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        let kind = Kind::from_u8(frame.kind())?;
        let flags = frame.flags();
        if flags & !FLAG_MORE != 0 {
            return Err(WireError::BadFlags(flags));
        }
        if flags & FLAG_MORE != 0 && kind.is_handshake() {
            return Err(WireError::BadFlags(flags));
        }
        let length = frame.length();
        if length as usize > MAX_FRAME_PAYLOAD {
            return Err(WireError::TooLong {
                what: "frame payload",
                len: length as usize,
                cap: MAX_FRAME_PAYLOAD,
            });
        }
        Ok(Self {
            version,
            kind,
            flags,
            length,
            checksum: frame.checksum(),
        })
    }

    /// Parse a whole frame: header checks, length, then the checksum.
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<Self> {
        let repr = Self::parse_header(frame)?;
        frame.check_len()?;
        let actual = crc32c::crc32c(frame.payload());
        if actual != repr.checksum {
            return Err(WireError::BadChecksum {
                expected: repr.checksum,
                actual,
            });
        }
        Ok(repr)
    }

    /// Length of the header ([`HEADER_LEN`]).
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Write the header into the first [`HEADER_LEN`] bytes of `frame`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut Frame<T>) {
        frame.set_magic();
        frame.set_version(self.version);
        frame.set_kind(self.kind);
        frame.set_flags(self.flags);
        frame.set_length(self.length);
        frame.set_checksum(self.checksum);
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut buf = [0u8; HEADER_LEN];
        self.emit(&mut Frame::new_unchecked(&mut buf[..]));
        buf
    }

    /// More frames of this message follow.
    pub fn more(&self) -> bool {
        self.flags & FLAG_MORE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_numbers_are_pinned() {
        let pinned: Vec<(u8, &str)> = Kind::ALL.iter().map(|k| (k.to_u8(), k.name())).collect();
        assert_eq!(
            pinned,
            [
                (1, "Regions"),
                (2, "Pages"),
                (3, "RoundEnd"),
                (4, "SocketPlan"),
                (5, "Sockets"),
                (6, "State"),
                (7, "Handover"),
                (8, "Ready"),
                (9, "Commit"),
                (10, "PageRequest"),
                (11, "Done"),
                (12, "Abort"),
                (13, "Digests"),
                (14, "Resync"),
                (15, "Prepared"),
                (16, "Split"),
                (17, "QueueEstimate"),
                (18, "SocketsActive"),
                (19, "DemandSettled"),
                (0x40, "Hello"),
                (0x41, "Challenge"),
                (0x42, "Proof"),
                (0x43, "Accept"),
                (0x44, "Reject"),
                (0x45, "KeyExchange"),
            ]
        );
        for k in Kind::ALL {
            assert_eq!(Kind::from_u8(k.to_u8()), Ok(*k));
            assert_eq!(k.is_handshake(), k.to_u8() >= 0x40, "{k:?}");
        }
        for bad in [0, 20, 0x3f, 0x46, 0xff] {
            assert_eq!(Kind::from_u8(bad), Err(WireError::BadKind(bad)));
        }
    }

    // A Ready frame: empty payload, CRC-32C of nothing is 0.
    static READY: [u8; 16] = [
        b'L', b'M', b'I', b'G', 0x01, 0x00, 0x08, 0x00, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    // An Abort frame with reason "x": payload 01 00 78, CRC-32C 0x..
    fn abort_x() -> Vec<u8> {
        let payload = [0x01u8, 0x00, b'x'];
        let crc = crc32c::crc32c(&payload);
        let mut v = vec![b'L', b'M', b'I', b'G', 0x01, 0x00, 12, 0x00, 3, 0, 0, 0];
        v.extend_from_slice(&crc.to_le_bytes());
        v.extend_from_slice(&payload);
        v
    }

    #[test]
    fn deconstruct() {
        let f = Frame::new_checked(&READY[..]).unwrap();
        assert_eq!(f.magic(), u32::from_le_bytes(*b"LMIG"));
        assert_eq!(f.version(), 1);
        assert_eq!(f.kind(), 8);
        assert_eq!(f.flags(), 0);
        assert_eq!(f.length(), 0);
        assert_eq!(f.checksum(), 0);
        assert!(f.verify_checksum());
        let repr = FrameRepr::parse(&f).unwrap();
        assert_eq!(repr.kind, Kind::Ready);
    }

    #[test]
    fn construct() {
        let repr = FrameRepr::new(Kind::Ready, 0, 0, 0).unwrap();
        assert_eq!(repr.to_bytes(), READY);
    }

    #[test]
    fn payload_and_checksum() {
        let bytes = abort_x();
        let f = Frame::new_checked(&bytes[..]).unwrap();
        assert_eq!(f.payload(), &[1, 0, b'x']);
        assert_eq!(FrameRepr::parse(&f).unwrap().kind, Kind::Abort);
    }

    #[test]
    fn truncated() {
        assert!(matches!(
            Frame::new_checked(&READY[..15]),
            Err(WireError::Truncated { .. })
        ));
        let bytes = abort_x();
        assert!(matches!(
            Frame::new_checked(&bytes[..bytes.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn oversized() {
        let mut b = READY;
        b[8..12].copy_from_slice(&((MAX_FRAME_PAYLOAD as u32) + 1).to_le_bytes());
        assert!(matches!(
            Frame::new_checked(&b[..]),
            Err(WireError::TooLong { .. })
        ));
        assert!(matches!(
            FrameRepr::parse_header(&Frame::new_unchecked(&b[..])),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn wrong_magic() {
        let mut b = READY;
        b[0] = b'X';
        assert!(matches!(
            FrameRepr::parse(&Frame::new_unchecked(&b[..])),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn wrong_version() {
        for v in [0u16, PROTOCOL_VERSION + 1, 0xffff] {
            let mut b = READY;
            b[4..6].copy_from_slice(&v.to_le_bytes());
            assert!(matches!(
                FrameRepr::parse(&Frame::new_unchecked(&b[..])),
                Err(WireError::BadVersion { .. })
            ));
        }
    }

    #[test]
    fn wrong_checksum() {
        let mut bytes = abort_x();
        *bytes.last_mut().unwrap() ^= 1;
        assert!(matches!(
            FrameRepr::parse(&Frame::new_unchecked(&bytes[..])),
            Err(WireError::BadChecksum { .. })
        ));
    }

    #[test]
    fn unknown_kind_and_flags() {
        for k in [0u8, 20, 0x3f, 0x46, 0xff] {
            let mut b = READY;
            b[6] = k;
            assert_eq!(
                FrameRepr::parse(&Frame::new_unchecked(&b[..])),
                Err(WireError::BadKind(k))
            );
        }
        let mut b = READY;
        b[7] = 0x02;
        assert_eq!(
            FrameRepr::parse(&Frame::new_unchecked(&b[..])),
            Err(WireError::BadFlags(2))
        );
    }
}
