//! Fuzz entry points (feature `fuzzing`) for what lmig-net parses: netlink
//! datagrams (messages, nested attributes, error answers), the NFQUEUE
//! packets the lock holds, and the rtnetlink neighbour and address dumps
//! the handoff reads. `fuzz/fuzz_targets/<name>.rs` calls [`run`];
//! `lmig-net/tests/fuzz_corpus.rs` replays the checked-in corpus on stable.
//!
//! Each entry point checks what must hold for any input (no panic, every
//! slice inside the input, counts bounded by its length) and panics otherwise.

use crate::lock::{HeldPacket, LockStats, parse_packets};
use crate::sys::netlink::{Attrs, Messages, MsgBuf};
use crate::sys::nft::{NFQNL_MSG_PACKET, queue_type};
use crate::sys::rtnl;

/// The targets of this module.
pub const TARGETS: &[&str] = &["netlink", "nfqueue_packets", "rtnl_dump"];

/// Run target `name` on `data`; false for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "netlink" => netlink(data),
        "nfqueue_packets" => nfqueue_packets(data),
        "rtnl_dump" => rtnl_dump(data),
        _ => return false,
    }
    true
}

/// `inner` lies within `outer`.
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    inner.is_empty() || (i >= o && i + inner.len() <= o + outer.len())
}

/// Attributes, nested ones tried as nests too, to `depth` levels.
fn walk_attrs(data: &[u8], buf: &[u8], depth: u32) -> usize {
    let mut n = 0;
    for (_, value) in Attrs::new(buf) {
        assert!(within(data, value), "an attribute outside the input");
        n += 1;
        if depth > 0 {
            n += walk_attrs(data, value, depth - 1);
        }
    }
    n
}

/// A netlink datagram: every message and attribute (nested to four levels)
/// lies inside it, each message takes at least its 16-byte header, and an
/// error answer's code is read without panicking.
pub fn netlink(data: &[u8]) {
    let mut messages = 0;
    for m in Messages::new(data) {
        assert!(within(data, m.payload), "a payload outside the input");
        messages += 1;
        let _ = m.error_code();
        let attrs = walk_attrs(data, m.payload, 4);
        assert!(
            attrs <= data.len(),
            "{attrs} attributes in {} bytes",
            data.len()
        );
    }
    assert!(
        messages <= data.len() / 16,
        "{messages} messages in {} bytes",
        data.len()
    );
}

/// An NFQUEUE datagram as the lock reads it: the packets it adds are the
/// count it returns, and none is longer than the input.
pub fn nfqueue_packets(data: &[u8]) {
    let mut out: Vec<HeldPacket> = Vec::new();
    let mut stats = LockStats::default();
    let n = parse_packets(data, &mut out, &mut stats);
    assert_eq!(n, out.len());
    assert_eq!(stats.held, n as u64);
    assert!(out.iter().all(|p| p.data.len() <= data.len()));
}

/// An rtnetlink dump as the handoff reads it: neighbour and address
/// messages and their attributes.
pub fn rtnl_dump(data: &[u8]) {
    for m in Messages::new(data) {
        let _ = rtnl::rtmsg_type(m.payload);
        if let Some((_, _, _, attrs)) = rtnl::parse_ndmsg(m.payload) {
            for (_, v) in attrs {
                assert!(within(data, v), "a neighbour attribute outside the input");
            }
        }
        if let Some((_, _, _, attrs)) = rtnl::parse_ifaddrmsg(m.payload) {
            for (_, v) in attrs {
                assert!(within(data, v), "an address attribute outside the input");
            }
        }
    }
}

/// Seed inputs for target `name`.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "netlink" | "nfqueue_packets" => {
            // Two held packets (id, then the IP packet), as NFQUEUE sends them.
            let mut m = MsgBuf::new();
            for id in [7u32, 8] {
                m.begin(queue_type(NFQNL_MSG_PACKET), 0, id)
                    .nfgen(libc::AF_INET as u8, 0)
                    .attr(1, &[id.to_be_bytes(), [8, 0, 1, 0]].concat())
                    .attr(10, &[0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 6, 0, 0])
                    .end();
            }
            let nested = {
                let mut n = MsgBuf::new();
                n.begin(16, 0, 1).nest(1).attr_u32(2, 3).unnest().end();
                n.bytes().to_vec()
            };
            vec![m.bytes().to_vec(), nested]
        }
        "rtnl_dump" => {
            let mut m = MsgBuf::new();
            m.begin(rtnl::RTM_NEWNEIGH, 0, 1)
                .raw(&[libc::AF_INET as u8, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0])
                .attr(rtnl::NDA_DST, &[198, 51, 100, 2])
                .attr(rtnl::NDA_LLADDR, &[2, 0, 0, 0, 0, 2])
                .end();
            m.begin(rtnl::RTM_NEWADDR, 0, 2)
                .raw(&[libc::AF_INET as u8, 24, 0, 0, 2, 0, 0, 0])
                .attr(rtnl::IFA_ADDRESS, &[198, 51, 100, 100])
                .end();
            vec![m.bytes().to_vec()]
        }
        _ => Vec::new(),
    }
}
