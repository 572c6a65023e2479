//! Netlink sockets and messages for the network lock and the address
//! handoff: nftables batches, NFQUEUE, rtnetlink addresses and links.
//!
//! Everything here is safe code over `nix`'s netlink socket; messages are
//! built in a byte buffer with the layout of `<linux/netlink.h>`
//! (`nlmsghdr`, `nfgenmsg`, `nlattr`, 4-byte alignment, network byte order
//! inside netfilter attributes).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

/// `NLM_F_REQUEST`.
pub(crate) const F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`.
pub(crate) const F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH` (`NLM_F_DUMP`).
pub(crate) const F_DUMP: u16 = 0x300;
/// `NLM_F_REPLACE`.
pub(crate) const F_REPLACE: u16 = 0x100;
/// `NLM_F_CREATE`.
pub(crate) const F_CREATE: u16 = 0x400;
#[cfg(feature = "test-topology")]
/// `NLM_F_EXCL`: fail with `EEXIST` instead of changing an existing object.
pub(crate) const F_EXCL: u16 = 0x200;
/// `NLM_F_MULTI`.
const F_MULTI: u16 = 0x2;
/// `NLMSG_ERROR`.
const MSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
const MSG_DONE: u16 = 3;
/// `NLA_F_NESTED`.
const NLA_F_NESTED: u16 = 0x8000;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A netlink socket of one protocol, bound to the kernel-assigned port id,
/// in the network namespace of the thread that opened it.
#[derive(Debug)]
pub(crate) struct NlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl NlSocket {
    /// `socket(AF_NETLINK, SOCK_RAW, proto)` + `bind`.
    pub(crate) fn open(proto: SockProtocol) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            proto,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Self { fd, seq: 1 })
    }

    /// `NETLINK_ROUTE`.
    pub(crate) fn route() -> io::Result<Self> {
        Self::open(SockProtocol::NetlinkRoute)
    }

    /// `NETLINK_NETFILTER`.
    pub(crate) fn netfilter() -> io::Result<Self> {
        Self::open(SockProtocol::NetlinkNetFilter)
    }

    /// A fresh sequence number.
    pub(crate) fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// `SO_RCVBUFFORCE` (root) falling back to `SO_RCVBUF`. An overrun is
    /// then reported by `recv` as `ENOBUFS` (packets were lost).
    pub(crate) fn set_rcvbuf(&self, bytes: usize) -> io::Result<()> {
        if setsockopt(&self.fd, sockopt::RcvBufForce, &bytes).is_err() {
            setsockopt(&self.fd, sockopt::RcvBuf, &bytes)?;
        }
        Ok(())
    }

    /// `send(2)` of a whole buffer of messages to the kernel.
    pub(crate) fn send(&self, buf: &[u8]) -> io::Result<()> {
        let n = send(self.fd.as_raw_fd(), buf, MsgFlags::empty())?;
        if n != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            ));
        }
        Ok(())
    }

    /// `recv(2)` of one datagram (possibly several messages).
    pub(crate) fn recv(&self, buf: &mut [u8], dontwait: bool) -> io::Result<usize> {
        let flags = if dontwait {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        Ok(recv(self.fd.as_raw_fd(), buf, flags)?)
    }

    /// Wait until the socket is readable or `timeout` passed; true if readable.
    pub(crate) fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let t = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, t) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Send `buf` and wait for `acks` acknowledgements (messages sent with
    /// `NLM_F_ACK`), returning the first error the kernel reported.
    /// Bounded: gives up after `acks + 64` datagrams or 2 s without one.
    pub(crate) fn transact(&self, buf: &[u8], acks: usize) -> io::Result<()> {
        self.send(buf)?;
        let mut rx = vec![0u8; 64 * 1024];
        let mut seen = 0usize;
        let mut first_err: Option<io::Error> = None;
        let mut rounds = 0usize;
        while seen < acks {
            rounds += 1;
            if rounds > acks + 64 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink: too many replies",
                ));
            }
            if !self.wait_readable(Duration::from_secs(2))? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink: no answer from the kernel",
                ));
            }
            let n = self.recv(&mut rx, true)?;
            for msg in Messages::new(&rx[..n]) {
                if msg.kind == MSG_ERROR {
                    seen += 1;
                    let errno = msg.error_code();
                    if errno != 0 && first_err.is_none() {
                        first_err = Some(io::Error::from_raw_os_error(errno));
                    }
                }
            }
            if first_err.is_some() {
                // An error in a batch aborts it; remaining acks may not come.
                break;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Send a dump request and collect the payloads of every answer until `NLMSG_DONE`.
    pub(crate) fn dump(&self, buf: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        self.send(buf)?;
        let mut rx = vec![0u8; 64 * 1024];
        for _ in 0..100_000 {
            if !self.wait_readable(Duration::from_secs(2))? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "netlink: dump did not finish",
                ));
            }
            let n = self.recv(&mut rx, true)?;
            for msg in Messages::new(&rx[..n]) {
                match msg.kind {
                    MSG_DONE => return Ok(()),
                    MSG_ERROR => {
                        let errno = msg.error_code();
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(errno));
                        }
                        return Ok(());
                    }
                    k => {
                        each(k, msg.payload);
                        if msg.flags & F_MULTI == 0 {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "netlink: dump too long",
        ))
    }
}

/// One received netlink message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    /// `nlmsg_type`.
    pub(crate) kind: u16,
    /// `nlmsg_flags`.
    pub(crate) flags: u16,
    /// Everything after the `nlmsghdr`.
    pub(crate) payload: &'a [u8],
}

impl Message<'_> {
    /// For `NLMSG_ERROR`: the positive errno, 0 for an acknowledgement.
    pub(crate) fn error_code(&self) -> i32 {
        match self.payload.get(0..4) {
            // The kernel sends -errno; a value with no positive counterpart
            // (i32::MIN, from a corrupt message) is a protocol error.
            Some(b) => i32::from_ne_bytes([b[0], b[1], b[2], b[3]])
                .checked_neg()
                .unwrap_or(libc::EPROTO),
            None => libc::EPROTO,
        }
    }
}

/// Iterator over the messages of one datagram; stops at the first malformed header.
pub(crate) struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Messages<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;
    fn next(&mut self) -> Option<Message<'a>> {
        let hdr = self.buf.get(0..16)?;
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        if len < 16 || len > self.buf.len() {
            self.buf = &[];
            return None;
        }
        let kind = u16::from_ne_bytes([hdr[4], hdr[5]]);
        let flags = u16::from_ne_bytes([hdr[6], hdr[7]]);
        let payload = &self.buf[16..len];
        self.buf = self.buf.get(align4(len)..).unwrap_or(&[]);
        Some(Message {
            kind,
            flags,
            payload,
        })
    }
}

/// Iterator over `nlattr`s: `(type without flags, value)`.
pub(crate) struct Attrs<'a> {
    buf: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<(u16, &'a [u8])> {
        let hdr = self.buf.get(0..4)?;
        let len = u16::from_ne_bytes([hdr[0], hdr[1]]) as usize;
        if len < 4 || len > self.buf.len() {
            self.buf = &[];
            return None;
        }
        let kind = u16::from_ne_bytes([hdr[2], hdr[3]]) & 0x3fff;
        let value = &self.buf[4..len];
        self.buf = self.buf.get(align4(len)..).unwrap_or(&[]);
        Some((kind, value))
    }
}

/// Builds a buffer of netlink messages (a batch when several).
#[derive(Debug, Default)]
pub(crate) struct MsgBuf {
    buf: Vec<u8>,
    msg_start: usize,
    nests: Vec<usize>,
    /// Messages with `NLM_F_ACK` in the buffer.
    pub(crate) acks: usize,
}

impl MsgBuf {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The bytes to send.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Start a message with its `nlmsghdr`.
    pub(crate) fn begin(&mut self, kind: u16, flags: u16, seq: u32) -> &mut Self {
        self.msg_start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        if flags & F_ACK != 0 {
            self.acks += 1;
        }
        self
    }

    /// Append a fixed header (e.g. `nfgenmsg`, `ifaddrmsg`) right after the `nlmsghdr`.
    pub(crate) fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    /// `struct nfgenmsg { family, version = NFNETLINK_V0, res_id (BE) }`.
    pub(crate) fn nfgen(&mut self, family: u8, res_id: u16) -> &mut Self {
        let b = res_id.to_be_bytes();
        self.raw(&[family, 0, b[0], b[1]])
    }

    /// Close the current message (fills in its length).
    pub(crate) fn end(&mut self) -> &mut Self {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// An attribute with raw bytes.
    pub(crate) fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = (4 + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
        self
    }

    /// A NUL-terminated string attribute.
    pub(crate) fn attr_str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(kind, &v)
    }

    /// A big-endian u32 attribute (netfilter's convention).
    pub(crate) fn attr_be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_be_bytes())
    }

    /// A host-order u32 attribute (rtnetlink's convention).
    pub(crate) fn attr_u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    /// Open a nested attribute.
    pub(crate) fn nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    #[cfg(feature = "test-topology")]
    /// Open a nested attribute without `NLA_F_NESTED`, as iproute2 sends
    /// rtnetlink's link info (the kernel parses those nests leniently and
    /// `VETH_INFO_PEER` is not even declared nested).
    pub(crate) fn nest_unflagged(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    /// Close the innermost nested attribute.
    pub(crate) fn unnest(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_parses_nested_attributes() {
        let mut m = MsgBuf::new();
        m.begin(0x0a00, F_REQUEST | F_ACK, 7).nfgen(2, 0);
        m.attr_str(1, "t").nest(4).attr_be32(1, 3).unnest().end();
        assert_eq!(m.acks, 1);
        let msgs: Vec<_> = Messages::new(m.bytes()).collect();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].kind, 0x0a00);
        let attrs: Vec<_> = Attrs::new(&msgs[0].payload[4..]).collect();
        assert_eq!(attrs[0], (1, &b"t\0"[..]));
        assert_eq!(attrs[1].0, 4);
        let inner: Vec<_> = Attrs::new(attrs[1].1).collect();
        assert_eq!(inner, vec![(1, &3u32.to_be_bytes()[..])]);
    }

    #[test]
    fn an_error_code_without_a_positive_errno_is_a_protocol_error() {
        let empty = Message {
            kind: MSG_ERROR,
            flags: 0,
            payload: &[],
        };
        assert_eq!(empty.error_code(), libc::EPROTO);
        let payload = i32::MIN.to_ne_bytes();
        let msg = Message {
            kind: MSG_ERROR,
            flags: 0,
            payload: &payload,
        };
        assert_eq!(msg.error_code(), libc::EPROTO);
        let payload = (-libc::ENOENT).to_ne_bytes();
        let msg = Message {
            kind: MSG_ERROR,
            flags: 0,
            payload: &payload,
        };
        assert_eq!(msg.error_code(), libc::ENOENT);
    }

    #[test]
    fn malformed_lengths_stop_iteration() {
        let bad = [0xffu8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(Messages::new(&bad).count(), 0);
        assert_eq!(Attrs::new(&[2, 0, 1, 0]).count(), 0);
    }
}
