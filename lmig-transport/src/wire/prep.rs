//! The codec of [`SocketPrep`], one socket of a `SocketPlan`.
//!
//! ```text
//! SocketPrep  u64 id, u8 kind, addr local, opt addr peer,
//!             u8 options (bit 0: SockOpts follow, bit 1: TcpOpts follow,
//!             bit 2: the timestamp clock follows),
//!             [SockOpts], [TcpOpts], [u32 ts_clock]
//! ```
//!
//! The options and the clock are the socket's when it was planned: the
//! destination sets them on the prepared socket before the freeze.

use bytes::BufMut;
use lmig_core::model::{SockOpts, SocketKind, SocketPrep, TcpOpts};

use super::reader::{Reader, addr_len, opt_addr_len, put_addr, put_opt_addr};
use super::records::Codec;
use super::{Result, WireError};

/// Bit of the options byte: [`SockOpts`] follow.
const HAS_SOCK: u8 = 1;
/// Bit of the options byte: [`TcpOpts`] follow.
const HAS_TCP: u8 = 2;
/// Bit of the options byte: `ts_clock` follows.
const HAS_CLOCK: u8 = 4;

wire_map! {
    /// A socket kind on the wire (the same numbers as the record tags).
    SocketKind: kind_to_u8, kind_from_u8 {
        TcpEstablished = 1,
        TcpListen = 2,
        Udp = 3,
    }
    unknown |k| WireError::bad("socket kind", format!("unknown kind {k}"))
}

impl Codec for SocketPrep {
    const MIN_LEN: usize = 8 + 1 + 7 + 1 + 1;
    fn buffer_len(&self) -> usize {
        8 + 1
            + addr_len(&self.local)
            + opt_addr_len(&self.peer)
            + 1
            + self.sock.as_ref().map_or(0, Codec::buffer_len)
            + self.tcp.as_ref().map_or(0, Codec::buffer_len)
            + self.ts_clock.map_or(0, |_| 4)
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        buf.put_u64_le(self.id);
        buf.put_u8(kind_to_u8(self.kind));
        put_addr(buf, &self.local);
        put_opt_addr(buf, &self.peer);
        let flags = if self.sock.is_some() { HAS_SOCK } else { 0 }
            | if self.tcp.is_some() { HAS_TCP } else { 0 }
            | if self.ts_clock.is_some() {
                HAS_CLOCK
            } else {
                0
            };
        buf.put_u8(flags);
        if let Some(s) = &self.sock {
            s.emit(buf);
        }
        if let Some(t) = &self.tcp {
            t.emit(buf);
        }
        if let Some(c) = self.ts_clock {
            buf.put_u32_le(c);
        }
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        let id = r.u64()?;
        let kind = kind_from_u8(r.u8()?)?;
        let local = r.addr("local")?;
        let peer = r.opt_addr("peer")?;
        match (kind, peer) {
            (SocketKind::TcpEstablished, None) => {
                return Err(WireError::bad(
                    "socket prep",
                    "established TCP without a peer",
                ));
            }
            (SocketKind::TcpListen, Some(_)) => {
                return Err(WireError::bad("socket prep", "listener with a peer"));
            }
            (_, Some(p)) if p.is_ipv4() != local.is_ipv4() => {
                return Err(WireError::bad("socket prep", "mixed address families"));
            }
            _ => {}
        }
        let flags = r.u8()?;
        if flags & !(HAS_SOCK | HAS_TCP | HAS_CLOCK) != 0 {
            return Err(WireError::bad(
                "socket prep",
                format!("unknown option bits {flags:#x}"),
            ));
        }
        let sock = match flags & HAS_SOCK {
            0 => None,
            _ => Some(SockOpts::parse(r)?),
        };
        let tcp = match flags & HAS_TCP {
            0 => None,
            _ => Some(TcpOpts::parse(r)?),
        };
        let ts_clock = match flags & HAS_CLOCK {
            0 => None,
            _ => Some(r.u32()?),
        };
        Ok(SocketPrep {
            id,
            kind,
            local,
            peer,
            sock,
            tcp,
            ts_clock,
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::wire::records::tests::roundtrip;

    fn conn_prep() -> SocketPrep {
        SocketPrep {
            id: 7,
            kind: SocketKind::TcpEstablished,
            local: "[2001:db8::1]:80".parse().unwrap(),
            peer: Some("[2001:db8::2]:40000".parse().unwrap()),
            sock: Some(SockOpts {
                reuse_addr: true,
                rcvbuf: 1 << 20,
                bind_device: Some("eth0".into()),
                ..SockOpts::default()
            }),
            tcp: Some(TcpOpts {
                nodelay: true,
                keepalive: true,
                keep_idle: 30,
                congestion: Some("reno".into()),
                ..TcpOpts::default()
            }),
            ts_clock: Some(0xfeed_0002),
        }
    }

    #[test]
    fn preps_round_trip_with_and_without_options() {
        roundtrip(&SocketPrep {
            id: 9,
            kind: SocketKind::Udp,
            local: "198.51.100.1:53".parse().unwrap(),
            peer: Some("198.51.100.2:53".parse().unwrap()),
            sock: None,
            tcp: None,
            ts_clock: None,
        });
        roundtrip(&conn_prep());
        roundtrip(&SocketPrep {
            tcp: None,
            ..conn_prep()
        });
        roundtrip(&SocketPrep {
            sock: None,
            ..conn_prep()
        });
        roundtrip(&SocketPrep {
            ts_clock: None,
            ..conn_prep()
        });
        let rec = lmig_core::model::SocketRecord::Tcp(crate::wire::records::tests::conn());
        let prep = rec.prep();
        assert!(prep.sock.is_some() && prep.tcp.is_some());
        roundtrip(&prep);
    }

    #[test]
    fn unknown_option_bits_are_refused() {
        let p = conn_prep();
        let mut buf = Vec::new();
        p.emit(&mut buf);
        // After id, kind and the addresses: the options byte.
        let at = 8 + 1 + addr_len(&p.local) + opt_addr_len(&p.peer);
        assert_eq!(buf[at], HAS_SOCK | HAS_TCP | HAS_CLOCK);
        let mut bad = buf.clone();
        bad[at] |= 8;
        let e = SocketPrep::parse(&mut Reader::new(Bytes::from(bad), "t")).unwrap_err();
        assert!(e.to_string().contains("option bits"), "{e}");
    }
}
