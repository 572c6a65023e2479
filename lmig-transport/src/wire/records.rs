//! Codecs of the records inside messages: regions, page runs, socket records.
//!
//! Each record has a fixed field order (see the module docs of
//! [`crate::wire`] for the primitive encodings). `parse` reads exactly one
//! record and leaves the rest; the message decoders call lmig-core's
//! `validate()` on the whole.

use bytes::{BufMut, Bytes};
use lmig_core::model::{
    MAX_CONGESTION_NAME, MAX_QUEUE_BYTES, MAX_UDP_DATAGRAMS, PageRun, RegionId, RegionInfo,
    SockOpts, SocketRecord, TcpConnState, TcpListenState, TcpOpts, TcpRepairWindow, TcpStateKind,
    UdpDatagram, UdpSockState,
};
use lmig_core::protocol::{RegionDigest, RoundSummary};

use super::reader::{Reader, addr_len, opt_addr_len, put_addr, put_bool, put_opt_addr, put_string};
use super::{Result, WireError};

/// Longest interface name in `SO_BINDTODEVICE` (IFNAMSIZ - 1).
const MAX_DEVICE_NAME: usize = 15;
/// Longest UDP datagram.
const MAX_DATAGRAM: usize = 65_535;

/// The binary form of one record: `buffer_len` bytes written by `emit`,
/// read back by `parse`.
pub trait Codec: Sized {
    /// Encoded length.
    fn buffer_len(&self) -> usize;
    /// Append the encoding to `buf`.
    fn emit(&self, buf: &mut dyn BufMut);
    /// Read one record; errors on truncated or invalid input.
    #[doc(hidden)]
    fn parse(r: &mut Reader) -> Result<Self>;
    /// Smallest possible encoding (for count checks before allocation).
    #[doc(hidden)]
    const MIN_LEN: usize;

    /// The encoding as a vector.
    fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.buffer_len());
        self.emit(&mut buf);
        buf
    }

    /// Decode exactly one record from `buf` (no trailing bytes).
    fn decode(buf: Bytes) -> Result<Self> {
        let mut r = Reader::new(buf, "record");
        let v = Self::parse(&mut r)?;
        r.finish()?;
        Ok(v)
    }
}

fn opt_str_len(s: &Option<String>) -> usize {
    1 + s.as_ref().map_or(0, |s| 2 + s.len())
}

fn put_opt_str(buf: &mut dyn BufMut, s: &Option<String>) {
    match s {
        None => buf.put_u8(0),
        Some(s) => {
            buf.put_u8(1);
            put_string(buf, s);
        }
    }
}

fn opt_str(r: &mut Reader, field: &'static str, cap: usize) -> Result<Option<String>> {
    Ok(if r.tag(field)? {
        Some(r.string(field, cap)?)
    } else {
        None
    })
}

impl Codec for RegionInfo {
    const MIN_LEN: usize = 4 + 8 + 4 + 1;
    fn buffer_len(&self) -> usize {
        Self::MIN_LEN + if self.fixed_addr.is_some() { 8 } else { 0 }
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        buf.put_u32_le(self.id.0);
        buf.put_u64_le(self.len);
        buf.put_u32_le(self.page_size);
        match self.fixed_addr {
            None => buf.put_u8(0),
            Some(a) => {
                buf.put_u8(1);
                buf.put_u64_le(a);
            }
        }
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        let id = RegionId(r.u32()?);
        let len = r.u64()?;
        let page_size = r.u32()?;
        let fixed_addr = if r.tag("fixed_addr")? {
            Some(r.u64()?)
        } else {
            None
        };
        let info = RegionInfo {
            id,
            len,
            page_size,
            fixed_addr,
        };
        info.validate()
            .map_err(|e| WireError::invalid("region", e))?;
        Ok(info)
    }
}

impl Codec for PageRun {
    const MIN_LEN: usize = 4 + 8 + 4;
    fn buffer_len(&self) -> usize {
        Self::MIN_LEN
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        buf.put_u32_le(self.region.0);
        buf.put_u64_le(self.first);
        buf.put_u32_le(self.count);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        let run = PageRun::new(RegionId(r.u32()?), r.u64()?, r.u32()?);
        if run.count == 0 {
            return Err(WireError::bad("page run", "zero pages"));
        }
        if run.first.checked_add(u64::from(run.count)).is_none() {
            return Err(WireError::bad("page run", "end overflows"));
        }
        Ok(run)
    }
}

impl Codec for RoundSummary {
    const MIN_LEN: usize = 4 + 8 * 3;
    fn buffer_len(&self) -> usize {
        Self::MIN_LEN
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        buf.put_u32_le(self.round);
        buf.put_u64_le(self.pages);
        buf.put_u64_le(self.zero_pages);
        buf.put_u64_le(self.dirty_pages);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        let s = RoundSummary {
            round: r.u32()?,
            pages: r.u64()?,
            zero_pages: r.u64()?,
            dirty_pages: r.u64()?,
        };
        if s.zero_pages > s.pages {
            return Err(WireError::bad(
                "round summary",
                "more zero pages than pages",
            ));
        }
        Ok(s)
    }
}

impl Codec for RegionDigest {
    const MIN_LEN: usize = 4 + 32;
    fn buffer_len(&self) -> usize {
        Self::MIN_LEN
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        buf.put_u32_le(self.region.0);
        buf.put_slice(&self.hash);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        Ok(RegionDigest {
            region: RegionId(r.u32()?),
            hash: r.array()?,
        })
    }
}

impl Codec for SockOpts {
    const MIN_LEN: usize = 1 + 1 + 4 * 4 + 1 + 1 + 1;
    fn buffer_len(&self) -> usize {
        Self::MIN_LEN - 1 + opt_str_len(&self.bind_device)
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        put_bool(buf, self.reuse_addr);
        put_bool(buf, self.reuse_port);
        buf.put_u32_le(self.rcvbuf);
        buf.put_u32_le(self.sndbuf);
        buf.put_u32_le(self.mark);
        buf.put_u32_le(self.priority);
        buf.put_u8(self.tos);
        put_bool(buf, self.v6only);
        put_opt_str(buf, &self.bind_device);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        Ok(SockOpts {
            reuse_addr: r.bool("reuse_addr")?,
            reuse_port: r.bool("reuse_port")?,
            rcvbuf: r.u32()?,
            sndbuf: r.u32()?,
            mark: r.u32()?,
            priority: r.u32()?,
            tos: r.u8()?,
            v6only: r.bool("v6only")?,
            bind_device: opt_str(r, "bind_device", MAX_DEVICE_NAME)?,
        })
    }
}

impl Codec for TcpOpts {
    const MIN_LEN: usize = 2 + 4 * 4 + 1;
    fn buffer_len(&self) -> usize {
        Self::MIN_LEN - 1 + opt_str_len(&self.congestion)
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        put_bool(buf, self.nodelay);
        put_bool(buf, self.keepalive);
        buf.put_u32_le(self.keep_idle);
        buf.put_u32_le(self.keep_intvl);
        buf.put_u32_le(self.keep_cnt);
        buf.put_u32_le(self.user_timeout);
        put_opt_str(buf, &self.congestion);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        Ok(TcpOpts {
            nodelay: r.bool("nodelay")?,
            keepalive: r.bool("keepalive")?,
            keep_idle: r.u32()?,
            keep_intvl: r.u32()?,
            keep_cnt: r.u32()?,
            user_timeout: r.u32()?,
            congestion: opt_str(r, "congestion", MAX_CONGESTION_NAME)?,
        })
    }
}

impl Codec for TcpRepairWindow {
    const MIN_LEN: usize = 4 * 5;
    fn buffer_len(&self) -> usize {
        Self::MIN_LEN
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        buf.put_u32_le(self.snd_wl1);
        buf.put_u32_le(self.snd_wnd);
        buf.put_u32_le(self.max_window);
        buf.put_u32_le(self.rcv_wnd);
        buf.put_u32_le(self.rcv_wup);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        Ok(TcpRepairWindow {
            snd_wl1: r.u32()?,
            snd_wnd: r.u32()?,
            max_window: r.u32()?,
            rcv_wnd: r.u32()?,
            rcv_wup: r.u32()?,
        })
    }
}

wire_map! {
    /// A TCP state on the wire.
    TcpStateKind: state_kind_to_u8, state_kind_from_u8 {
        Established = 0,
        CloseWait = 1,
        FinWait1 = 2,
        FinWait2 = 3,
        Closing = 4,
        LastAck = 5,
    }
    unknown |v| WireError::bad("TCP state", format!("unknown state {v}"))
}

impl Codec for TcpConnState {
    const MIN_LEN: usize = 8
        + 7
        + 7
        + 1
        + 4
        + 4
        + 4
        + 4
        + 4
        + 4
        + 2
        + 3
        + 4
        + 1
        + SockOpts::MIN_LEN
        + TcpOpts::MIN_LEN;
    fn buffer_len(&self) -> usize {
        8 + addr_len(&self.local)
            + addr_len(&self.peer)
            + 1
            + 4
            + 4
            + 4
            + self.send_queue.len()
            + 4
            + 4
            + self.recv_queue.len()
            + 4
            + 2
            + 3
            + 4
            + 1
            + self.window.map_or(0, |w| w.buffer_len())
            + self.sock.buffer_len()
            + self.tcp.buffer_len()
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        emit_tcp_front(self, buf);
        buf.put_slice(&self.send_queue);
        buf.put_u32_le(self.unsent_len);
        buf.put_u32_le(self.recv_queue.len() as u32);
        buf.put_slice(&self.recv_queue);
        emit_tcp_back(self, buf);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        Ok(TcpConnState {
            id: r.u64()?,
            local: r.addr("local")?,
            peer: r.addr("peer")?,
            state: state_kind_from_u8(r.u8()?)?,
            snd_seq: r.u32()?,
            rcv_seq: r.u32()?,
            send_queue: r.blob("send queue", MAX_QUEUE_BYTES)?,
            unsent_len: r.u32()?,
            recv_queue: r.blob("receive queue", MAX_QUEUE_BYTES)?,
            mss: r.u32()?,
            snd_wscale: r.u8()?,
            rcv_wscale: r.u8()?,
            wscale_ok: r.bool("wscale_ok")?,
            sack_ok: r.bool("sack_ok")?,
            timestamps_ok: r.bool("timestamps_ok")?,
            timestamp: r.u32()?,
            window: if r.tag("window")? {
                Some(TcpRepairWindow::parse(r)?)
            } else {
                None
            },
            sock: SockOpts::parse(r)?,
            tcp: TcpOpts::parse(r)?,
        })
    }
}

/// A TCP record's fields before its send queue's bytes (up to and with
/// the queue's length).
pub(super) fn emit_tcp_front(c: &TcpConnState, buf: &mut dyn BufMut) {
    buf.put_u64_le(c.id);
    put_addr(buf, &c.local);
    put_addr(buf, &c.peer);
    buf.put_u8(state_kind_to_u8(c.state));
    buf.put_u32_le(c.snd_seq);
    buf.put_u32_le(c.rcv_seq);
    buf.put_u32_le(c.send_queue.len() as u32);
}

/// A TCP record's fields after its receive queue's bytes.
pub(super) fn emit_tcp_back(c: &TcpConnState, buf: &mut dyn BufMut) {
    buf.put_u32_le(c.mss);
    buf.put_u8(c.snd_wscale);
    buf.put_u8(c.rcv_wscale);
    put_bool(buf, c.wscale_ok);
    put_bool(buf, c.sack_ok);
    put_bool(buf, c.timestamps_ok);
    buf.put_u32_le(c.timestamp);
    match &c.window {
        None => buf.put_u8(0),
        Some(w) => {
            buf.put_u8(1);
            w.emit(buf);
        }
    }
    c.sock.emit(buf);
    c.tcp.emit(buf);
}

impl Codec for TcpListenState {
    const MIN_LEN: usize = 8 + 7 + 4 + SockOpts::MIN_LEN + TcpOpts::MIN_LEN;
    fn buffer_len(&self) -> usize {
        8 + addr_len(&self.local) + 4 + self.sock.buffer_len() + self.tcp.buffer_len()
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        buf.put_u64_le(self.id);
        put_addr(buf, &self.local);
        buf.put_u32_le(self.backlog);
        self.sock.emit(buf);
        self.tcp.emit(buf);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        Ok(TcpListenState {
            id: r.u64()?,
            local: r.addr("local")?,
            backlog: r.u32()?,
            sock: SockOpts::parse(r)?,
            tcp: TcpOpts::parse(r)?,
        })
    }
}

impl Codec for UdpDatagram {
    const MIN_LEN: usize = 7 + 4;
    fn buffer_len(&self) -> usize {
        addr_len(&self.from) + 4 + self.data.len()
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        put_addr(buf, &self.from);
        buf.put_u32_le(self.data.len() as u32);
        buf.put_slice(&self.data);
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        Ok(UdpDatagram {
            from: r.addr("datagram sender")?,
            data: r.blob("datagram", MAX_DATAGRAM)?,
        })
    }
}

impl Codec for UdpSockState {
    const MIN_LEN: usize = 8 + 7 + 1 + SockOpts::MIN_LEN + 4;
    fn buffer_len(&self) -> usize {
        8 + addr_len(&self.local)
            + opt_addr_len(&self.peer)
            + self.sock.buffer_len()
            + 4
            + self.recv_queue.iter().map(Codec::buffer_len).sum::<usize>()
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        buf.put_u64_le(self.id);
        put_addr(buf, &self.local);
        put_opt_addr(buf, &self.peer);
        self.sock.emit(buf);
        buf.put_u32_le(self.recv_queue.len() as u32);
        for d in &self.recv_queue {
            d.emit(buf);
        }
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        let id = r.u64()?;
        let local = r.addr("local")?;
        let peer = r.opt_addr("peer")?;
        let sock = SockOpts::parse(r)?;
        let n = r.count("pending datagrams", UdpDatagram::MIN_LEN, MAX_UDP_DATAGRAMS)?;
        let mut recv_queue = Vec::with_capacity(n);
        for _ in 0..n {
            recv_queue.push(UdpDatagram::parse(r)?);
        }
        Ok(UdpSockState {
            id,
            local,
            peer,
            sock,
            recv_queue,
        })
    }
}

wire_enum! {
    /// The type byte of a socket record.
    pub(super) enum RecordTag [] {
        Tcp = 1 => "tcp",
        Listen = 2 => "listen",
        Udp = 3 => "udp",
    }
    unknown |t| WireError::bad("socket record", format!("unknown type {t}"))
}

impl Codec for SocketRecord {
    const MIN_LEN: usize = 1 + TcpListenState::MIN_LEN;
    fn buffer_len(&self) -> usize {
        1 + match self {
            Self::Tcp(s) => s.buffer_len(),
            Self::Listen(s) => s.buffer_len(),
            Self::Udp(s) => s.buffer_len(),
        }
    }
    fn emit(&self, buf: &mut dyn BufMut) {
        match self {
            Self::Tcp(s) => {
                buf.put_u8(RecordTag::Tcp.to_u8());
                s.emit(buf);
            }
            Self::Listen(s) => {
                buf.put_u8(RecordTag::Listen.to_u8());
                s.emit(buf);
            }
            Self::Udp(s) => {
                buf.put_u8(RecordTag::Udp.to_u8());
                s.emit(buf);
            }
        }
    }
    fn parse(r: &mut Reader) -> Result<Self> {
        let rec = match RecordTag::from_u8(r.u8()?)? {
            RecordTag::Tcp => Self::Tcp(TcpConnState::parse(r)?),
            RecordTag::Listen => Self::Listen(TcpListenState::parse(r)?),
            RecordTag::Udp => Self::Udp(UdpSockState::parse(r)?),
        };
        rec.validate()
            .map_err(|e| WireError::invalid("socket record", e))?;
        Ok(rec)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn conn() -> TcpConnState {
        TcpConnState {
            id: 7,
            local: "198.51.100.1:80".parse().unwrap(),
            peer: "198.51.100.9:40000".parse().unwrap(),
            state: TcpStateKind::Established,
            snd_seq: 1000,
            rcv_seq: 5000,
            send_queue: Bytes::from_static(b"hello world"),
            unsent_len: 5,
            recv_queue: Bytes::from_static(b"req"),
            mss: 1448,
            snd_wscale: 7,
            rcv_wscale: 7,
            wscale_ok: true,
            sack_ok: true,
            timestamps_ok: true,
            timestamp: 123,
            window: Some(TcpRepairWindow {
                snd_wl1: 5003,
                snd_wnd: 65535,
                max_window: 65535,
                rcv_wnd: 65535,
                rcv_wup: 5003,
            }),
            sock: SockOpts {
                bind_device: Some("eth0".into()),
                ..SockOpts::default()
            },
            tcp: TcpOpts {
                congestion: Some("cubic".into()),
                ..TcpOpts::default()
            },
        }
    }

    pub(crate) fn roundtrip<T: Codec + PartialEq + std::fmt::Debug>(v: &T) -> Vec<u8> {
        let mut buf = Vec::new();
        v.emit(&mut buf);
        assert_eq!(buf.len(), v.buffer_len());
        let mut r = Reader::new(Bytes::from(buf.clone()), "test");
        assert_eq!(&T::parse(&mut r).unwrap(), v);
        r.finish().unwrap();
        for cut in 0..buf.len() {
            let mut r = Reader::new(Bytes::copy_from_slice(&buf[..cut]), "test");
            assert!(T::parse(&mut r).is_err(), "truncated at {cut} parsed");
        }
        buf
    }

    #[test]
    fn page_run_bytes() {
        let buf = roundtrip(&PageRun::new(RegionId(2), 0x1_0000_0001, 64));
        assert_eq!(buf, [2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 64, 0, 0, 0]);
        let zero = [2u8, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        assert!(PageRun::parse(&mut Reader::new(Bytes::copy_from_slice(&zero), "t")).is_err());
    }

    #[test]
    fn region_bytes() {
        let r = RegionInfo::new(RegionId(1), 8192, 4096).unwrap();
        let buf = roundtrip(&r);
        assert_eq!(
            buf,
            [1, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]
        );
        let mut bad = buf.clone();
        bad[13] = 0x11; // page size 0x1100: not a power of two
        assert!(RegionInfo::parse(&mut Reader::new(Bytes::from(bad), "t")).is_err());
        roundtrip(&r.at_fixed_addr(0x7000_0000).unwrap());
    }

    #[test]
    fn socket_records_roundtrip() {
        roundtrip(&SocketRecord::Tcp(conn()));
        let mut v6 = conn();
        v6.local = "[2001:db8::1]:80".parse().unwrap();
        v6.peer = "[2001:db8::2%3]:40000".parse().unwrap();
        v6.window = None;
        roundtrip(&SocketRecord::Tcp(v6));
        roundtrip(&SocketRecord::Listen(TcpListenState {
            id: 1,
            local: "[2001:db8::1]:80".parse().unwrap(),
            backlog: 128,
            sock: SockOpts {
                reuse_addr: true,
                v6only: true,
                ..SockOpts::default()
            },
            tcp: TcpOpts::default(),
        }));
        roundtrip(&SocketRecord::Udp(UdpSockState {
            id: 3,
            local: "198.51.100.1:53".parse().unwrap(),
            peer: None,
            sock: SockOpts::default(),
            recv_queue: vec![UdpDatagram {
                from: "198.51.100.7:5000".parse().unwrap(),
                data: Bytes::from_static(b"query"),
            }],
        }));
    }

    #[test]
    fn impossible_records_rejected() {
        let mut c = conn();
        c.unsent_len = 1000;
        let mut buf = Vec::new();
        SocketRecord::Tcp(c).emit(&mut buf);
        let e = SocketRecord::parse(&mut Reader::new(Bytes::from(buf), "t")).unwrap_err();
        assert!(matches!(e, WireError::Invalid { .. }), "{e}");

        let mut buf = Vec::new();
        SocketRecord::Tcp(conn()).emit(&mut buf);
        buf[0] = 9; // record type
        assert!(SocketRecord::parse(&mut Reader::new(Bytes::from(buf), "t")).is_err());
    }

    #[test]
    fn queue_length_over_cap_rejected_before_allocation() {
        let mut buf = Vec::new();
        SocketRecord::Tcp(conn()).emit(&mut buf);
        // send-queue length field: tag(1) + id(8) + local(7) + peer(7) + state(1) + seqs(8)
        let at = 1 + 8 + 7 + 7 + 1 + 8;
        buf[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = SocketRecord::parse(&mut Reader::new(Bytes::from(buf), "t")).unwrap_err();
        assert!(matches!(e, WireError::TooLong { .. }), "{e}");
    }
}
