//! A checked cursor over a received payload: every read checks the remaining
//! length first and returns an error instead of panicking.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use bytes::{Buf, BufMut, Bytes};

use super::{Result, WireError};

/// Reads fields from a payload; byte strings are zero-copy slices.
#[derive(Debug, Clone)]
pub struct Reader {
    buf: Bytes,
    what: &'static str,
}

impl Reader {
    /// A reader over `buf`; `what` names the message in errors.
    pub fn new(buf: Bytes, what: &'static str) -> Self {
        Self { buf, what }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn need(&self, n: usize) -> Result<()> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what: self.what,
                needed: n,
                available: self.buf.len(),
            });
        }
        Ok(())
    }

    /// Error unless every byte was read.
    pub fn finish(&self) -> Result<()> {
        if !self.buf.is_empty() {
            return Err(WireError::TrailingBytes(self.buf.len(), self.what));
        }
        Ok(())
    }

    pub fn u8(&mut self) -> Result<u8> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16> {
        self.need(2)?;
        Ok(self.buf.get_u16_le())
    }

    pub fn u32(&mut self) -> Result<u32> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }

    pub fn u64(&mut self) -> Result<u64> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }

    pub fn bool(&mut self, field: &'static str) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::bad(field, format!("boolean byte {v}"))),
        }
    }

    /// An option tag: false for 0, true for 1.
    pub fn tag(&mut self, field: &'static str) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::bad(field, format!("option tag {v}"))),
        }
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.need(N)?;
        let mut a = [0u8; N];
        self.buf.copy_to_slice(&mut a);
        Ok(a)
    }

    /// `n` bytes, as a slice of the payload (no copy).
    pub fn bytes(&mut self, n: usize) -> Result<Bytes> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    /// Everything left, as a slice of the payload (no copy).
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// A `u32` length then that many bytes, at most `cap`.
    pub fn blob(&mut self, field: &'static str, cap: usize) -> Result<Bytes> {
        let len = self.u32()? as usize;
        if len > cap {
            return Err(WireError::TooLong {
                what: field,
                len,
                cap,
            });
        }
        self.bytes(len)
    }

    /// A `u16` length then UTF-8, at most `cap` bytes.
    pub fn string(&mut self, field: &'static str, cap: usize) -> Result<String> {
        let len = self.u16()? as usize;
        if len > cap {
            return Err(WireError::TooLong {
                what: field,
                len,
                cap,
            });
        }
        let b = self.bytes(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::bad(field, "not UTF-8"))
    }

    /// A `u32` element count, checked against the remaining bytes given the
    /// smallest encoding of one element, and against `cap`.
    pub fn count(&mut self, field: &'static str, min_elem: usize, cap: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > cap {
            return Err(WireError::TooLong {
                what: field,
                len: n,
                cap,
            });
        }
        let needed = n.saturating_mul(min_elem.max(1));
        if needed > self.buf.len() {
            return Err(WireError::Truncated {
                what: field,
                needed,
                available: self.buf.len(),
            });
        }
        Ok(n)
    }

    pub fn addr(&mut self, field: &'static str) -> Result<SocketAddr> {
        let family = self.u8()?;
        match Family::from_u8(family) {
            Ok(Family::V4) => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                let port = self.u16()?;
                Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
            Ok(Family::V6) => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let port = self.u16()?;
                let flow = self.u32()?;
                let scope = self.u32()?;
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)))
            }
            Err(_) => Err(WireError::bad(field, format!("address family {family}"))),
        }
    }

    pub fn opt_addr(&mut self, field: &'static str) -> Result<Option<SocketAddr>> {
        Ok(if self.tag(field)? {
            Some(self.addr(field)?)
        } else {
            None
        })
    }
}

wire_enum! {
    /// The family byte of a socket address.
    enum Family [] {
        V4 = 4 => "IPv4",
        V6 = 6 => "IPv6",
    }
    // Callers name the field in their own error.
    unknown |f| WireError::bad("address family", format!("{f}"))
}

/// Encoded length of a socket address.
pub fn addr_len(a: &SocketAddr) -> usize {
    match a {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => 1 + 16 + 2 + 4 + 4,
    }
}

pub fn put_addr(buf: &mut (impl BufMut + ?Sized), a: &SocketAddr) {
    match a {
        SocketAddr::V4(a) => {
            buf.put_u8(Family::V4.to_u8());
            buf.put_slice(&a.ip().octets());
            buf.put_u16_le(a.port());
        }
        SocketAddr::V6(a) => {
            buf.put_u8(Family::V6.to_u8());
            buf.put_slice(&a.ip().octets());
            buf.put_u16_le(a.port());
            buf.put_u32_le(a.flowinfo());
            buf.put_u32_le(a.scope_id());
        }
    }
}

pub fn opt_addr_len(a: &Option<SocketAddr>) -> usize {
    1 + a.as_ref().map_or(0, addr_len)
}

pub fn put_opt_addr(buf: &mut (impl BufMut + ?Sized), a: &Option<SocketAddr>) {
    match a {
        None => buf.put_u8(0),
        Some(a) => {
            buf.put_u8(1);
            put_addr(buf, a);
        }
    }
}

/// Strings are emitted with a `u16` length; callers check caps first.
pub fn put_string(buf: &mut (impl BufMut + ?Sized), s: &str) {
    buf.put_u16_le(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

pub fn put_bool(buf: &mut (impl BufMut + ?Sized), b: bool) {
    buf.put_u8(u8::from(b));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_are_errors() {
        let mut r = Reader::new(Bytes::from_static(&[1, 2, 3]), "test");
        assert!(r.u32().is_err());
        assert_eq!(r.u16().unwrap(), 0x0201);
        assert!(r.u16().is_err());
        assert_eq!(r.u8().unwrap(), 3);
        r.finish().unwrap();
    }

    #[test]
    fn count_checked_before_allocation() {
        // Claims 2^32-1 elements of 8 bytes with 4 bytes left.
        let mut r = Reader::new(
            Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]),
            "t",
        );
        assert!(r.count("list", 8, usize::MAX).is_err());
    }

    #[test]
    fn addresses() {
        let v4 = [4u8, 198, 51, 100, 1, 0x50, 0x00];
        let mut r = Reader::new(Bytes::copy_from_slice(&v4), "t");
        assert_eq!(r.addr("a").unwrap(), "198.51.100.1:80".parse().unwrap());
        let mut out = Vec::new();
        put_addr(&mut out, &"198.51.100.1:80".parse().unwrap());
        assert_eq!(out, v4);
        let mut r = Reader::new(Bytes::from_static(&[5, 0, 0]), "t");
        assert!(r.addr("a").is_err());
    }
}
