//! rtnetlink (`NETLINK_ROUTE`): the message types, attribute numbers and
//! fixed headers of `<linux/rtnetlink.h>`, `<linux/if_link.h>`,
//! `<linux/if_addr.h>`, `<linux/neighbour.h>` and `<linux/veth.h>`, and one
//! function per link operation the test topology needs (what `ip link add`
//! and `ip link set` send).
//!
//! Every number is named here once; callers build messages with
//! [`MsgBuf`] and these names. Fixed headers are built as byte arrays in
//! the kernel's layout (native byte order), their sizes pinned by the tests.

use std::io;
use std::net::IpAddr;

use super::netlink::{Attrs, F_REQUEST, MsgBuf, NlSocket};

/// `RTM_NEWLINK`: create a link, or change one (`ip link set`).
pub(crate) const RTM_NEWLINK: u16 = 16;
/// `RTM_GETLINK`.
pub(crate) const RTM_GETLINK: u16 = 18;
/// `RTM_NEWADDR`.
pub(crate) const RTM_NEWADDR: u16 = 20;
/// `RTM_DELADDR`.
pub(crate) const RTM_DELADDR: u16 = 21;
/// `RTM_GETADDR`.
pub(crate) const RTM_GETADDR: u16 = 22;
/// `RTM_NEWROUTE`.
pub(crate) const RTM_NEWROUTE: u16 = 24;
/// `RTM_GETROUTE`.
pub(crate) const RTM_GETROUTE: u16 = 26;
/// `RTM_NEWNEIGH`.
pub(crate) const RTM_NEWNEIGH: u16 = 28;
#[cfg(feature = "test-topology")]
/// `RTM_DELNEIGH`.
pub(crate) const RTM_DELNEIGH: u16 = 29;
/// `RTM_GETNEIGH`.
pub(crate) const RTM_GETNEIGH: u16 = 30;

/// `IFLA_ADDRESS`: the link-layer address.
pub(crate) const IFLA_ADDRESS: u16 = 1;
#[cfg(feature = "test-topology")]
/// `IFLA_IFNAME`.
pub(crate) const IFLA_IFNAME: u16 = 3;
#[cfg(feature = "test-topology")]
/// `IFLA_MASTER`: ifindex of the bridge a port belongs to.
pub(crate) const IFLA_MASTER: u16 = 10;
#[cfg(feature = "test-topology")]
/// `IFLA_OPERSTATE` (RFC 2863 state, one byte).
pub(crate) const IFLA_OPERSTATE: u16 = 16;
#[cfg(feature = "test-topology")]
/// `IF_OPER_UP`.
pub(crate) const IF_OPER_UP: u8 = 6;
#[cfg(feature = "test-topology")]
/// `IFLA_LINKINFO` (nested: `IFLA_INFO_*`).
pub(crate) const IFLA_LINKINFO: u16 = 18;
#[cfg(feature = "test-topology")]
/// `IFLA_NET_NS_FD`: create or move the link into the namespace of this fd.
pub(crate) const IFLA_NET_NS_FD: u16 = 28;
#[cfg(feature = "test-topology")]
/// `IFLA_INFO_KIND`: `"veth"`, `"bridge"`, ...
pub(crate) const IFLA_INFO_KIND: u16 = 1;
#[cfg(feature = "test-topology")]
/// `IFLA_INFO_DATA` (nested, kind-specific).
pub(crate) const IFLA_INFO_DATA: u16 = 2;
#[cfg(feature = "test-topology")]
/// `VETH_INFO_PEER`: an `ifinfomsg` followed by the peer's `IFLA_*` attributes.
pub(crate) const VETH_INFO_PEER: u16 = 1;
#[cfg(feature = "test-topology")]
/// `IFF_UP`.
pub(crate) const IFF_UP: u32 = 0x1;

/// `IFA_ADDRESS`.
pub(crate) const IFA_ADDRESS: u16 = 1;
/// `IFA_LOCAL`.
pub(crate) const IFA_LOCAL: u16 = 2;
/// `IFA_FLAGS` (u32, supersedes `ifa_flags`).
pub(crate) const IFA_FLAGS: u16 = 8;
/// `IFA_F_NODAD`: no duplicate address detection.
pub(crate) const IFA_F_NODAD: u32 = 0x02;

/// `RTA_DST`.
pub(crate) const RTA_DST: u16 = 1;
/// `RTN_LOCAL`: a route type (`rtm_type`), the address is this host's.
pub(crate) const RTN_LOCAL: u8 = 2;

/// `NDA_DST`.
pub(crate) const NDA_DST: u16 = 1;
/// `NDA_LLADDR`.
pub(crate) const NDA_LLADDR: u16 = 2;
/// `NTF_USE`: ask the kernel to resolve the entry.
pub(crate) const NTF_USE: u8 = 0x01;
/// `NUD_PERMANENT`.
pub(crate) const NUD_PERMANENT: u16 = 0x80;
/// `NUD_NOARP`.
pub(crate) const NUD_NOARP: u16 = 0x40;
/// `NUD_VALID`: PERMANENT | NOARP | REACHABLE | PROBE | STALE | DELAY.
pub(crate) const NUD_VALID: u16 = NUD_PERMANENT | NUD_NOARP | 0x02 | 0x10 | 0x04 | 0x08;

/// Length of `struct ifinfomsg`.
pub(crate) const IFINFOMSG_LEN: usize = 16;
/// Length of `struct ifaddrmsg`.
pub(crate) const IFADDRMSG_LEN: usize = 8;
/// Length of `struct ndmsg`.
pub(crate) const NDMSG_LEN: usize = 12;
/// Length of `struct rtmsg`.
pub(crate) const RTMSG_LEN: usize = 12;

/// `struct ifinfomsg { family, pad, type, index, flags, change }`.
pub(crate) fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut h = [0u8; IFINFOMSG_LEN];
    // ifi_family AF_UNSPEC, ifi_type 0.
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

/// `struct ifaddrmsg { family, prefixlen, flags, scope, index }`.
pub(crate) fn ifaddrmsg(family: u8, prefix_len: u8, index: u32) -> [u8; IFADDRMSG_LEN] {
    let mut h = [0u8; IFADDRMSG_LEN];
    h[0] = family;
    h[1] = prefix_len;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h
}

/// `struct ndmsg { family, pad, pad, ifindex, state, flags, type }`.
pub(crate) fn ndmsg(family: u8, index: u32, state: u16, flags: u8) -> [u8; NDMSG_LEN] {
    let mut h = [0u8; NDMSG_LEN];
    h[0] = family;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..10].copy_from_slice(&state.to_ne_bytes());
    h[10] = flags;
    h
}

/// `struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type, flags }`
/// for a route lookup of one destination.
pub(crate) fn rtmsg_lookup(family: u8, dst_len: u8) -> [u8; RTMSG_LEN] {
    let mut h = [0u8; RTMSG_LEN];
    h[0] = family;
    h[1] = dst_len;
    h
}

/// The `rtm_type` of a `struct rtmsg` payload.
pub(crate) fn rtmsg_type(payload: &[u8]) -> Option<u8> {
    payload.get(7).copied()
}

/// `RTM_GETROUTE` for `addr`: whether this host routes it as `RTN_LOCAL`,
/// i.e. a packet sent to it is delivered here. An IPv6 address answers
/// false for a moment after `RTM_NEWADDR` (even with `IFA_F_NODAD`): the
/// kernel inserts its local route from a work item.
pub(crate) fn routes_locally(nl: &mut NlSocket, addr: IpAddr) -> io::Result<bool> {
    let (family, bytes) = family_and_bytes(addr);
    let len = if addr.is_ipv4() { 32 } else { 128 };
    let seq = nl.next_seq();
    let mut m = MsgBuf::new();
    m.begin(RTM_GETROUTE, F_REQUEST, seq)
        .raw(&rtmsg_lookup(family, len))
        .attr(RTA_DST, &bytes)
        .end();
    let mut local = false;
    nl.dump(m.bytes(), |kind, payload| {
        if kind == RTM_NEWROUTE && rtmsg_type(payload) == Some(RTN_LOCAL) {
            local = true;
        }
    })?;
    Ok(local)
}

/// [`routes_locally`] until it holds, at most `timeout` (polled every
/// 50 µs). The error is the last lookup's, or `TimedOut`.
pub(crate) fn wait_local(
    nl: &mut NlSocket,
    addr: IpAddr,
    timeout: std::time::Duration,
) -> io::Result<()> {
    let start = std::time::Instant::now();
    // Bounded by `timeout`.
    loop {
        let r = routes_locally(nl, addr);
        if let Ok(true) = r {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(r
                .err()
                .unwrap_or_else(|| io::Error::from(io::ErrorKind::TimedOut)));
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// `(ifindex, state)` and the attributes of an `RTM_NEWNEIGH` payload.
pub(crate) fn parse_ndmsg(payload: &[u8]) -> Option<(u8, u32, u16, Attrs<'_>)> {
    let h = payload.get(..NDMSG_LEN)?;
    let index = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
    let state = u16::from_ne_bytes([h[8], h[9]]);
    Some((h[0], index, state, Attrs::new(&payload[NDMSG_LEN..])))
}

/// `(family, prefix_len, ifindex)` and the attributes of an `RTM_NEWADDR` payload.
pub(crate) fn parse_ifaddrmsg(payload: &[u8]) -> Option<(u8, u8, u32, Attrs<'_>)> {
    let h = payload.get(..IFADDRMSG_LEN)?;
    let index = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
    Some((h[0], h[1], index, Attrs::new(&payload[IFADDRMSG_LEN..])))
}

/// The family and bytes of an IP address (`AF_INET` 4 bytes, `AF_INET6` 16).
fn family_and_bytes(ip: IpAddr) -> (u8, Vec<u8>) {
    match ip {
        IpAddr::V4(v) => (libc::AF_INET as u8, v.octets().to_vec()),
        IpAddr::V6(v) => (libc::AF_INET6 as u8, v.octets().to_vec()),
    }
}

/// An address message (`struct ifaddrmsg` + `IFA_LOCAL`) about
/// `addr/prefix_len` on interface `ifindex`: `IFA_ADDRESS` too for IPv4 and
/// for `RTM_NEWADDR`, and a new IPv6 address gets `IFA_F_NODAD` (usable at
/// once, no duplicate address detection).
pub(crate) fn addr_msg(
    kind: u16,
    flags: u16,
    ifindex: u32,
    addr: IpAddr,
    prefix_len: u8,
    seq: u32,
) -> MsgBuf {
    let mut m = MsgBuf::new();
    let (family, bytes) = family_and_bytes(addr);
    m.begin(kind, flags, seq)
        .raw(&ifaddrmsg(family, prefix_len, ifindex))
        .attr(IFA_LOCAL, &bytes);
    if addr.is_ipv4() || kind == RTM_NEWADDR {
        m.attr(IFA_ADDRESS, &bytes);
    }
    if addr.is_ipv6() && kind == RTM_NEWADDR {
        m.attr_u32(IFA_FLAGS, IFA_F_NODAD);
    }
    m.end();
    m
}

/// A neighbour-table message (`struct ndmsg` + `NDA_DST`) about `ip` on
/// interface `ifindex`, and the address bytes.
pub(crate) fn neigh_msg(
    kind: u16,
    flags: u16,
    ifindex: u32,
    ip: IpAddr,
    ntf: u8,
    seq: u32,
) -> (MsgBuf, Vec<u8>) {
    let (family, bytes) = family_and_bytes(ip);
    let mut m = MsgBuf::new();
    m.begin(kind, flags, seq)
        .raw(&ndmsg(family, ifindex, 0, ntf))
        .attr(NDA_DST, &bytes)
        .end();
    (m, bytes)
}

/// `RTM_GETLINK` on link `index`: calls `visit` with every attribute of
/// the answer (`IFLA_*`).
#[doc(alias = "RTM_GETLINK")]
pub(crate) fn get_link_attrs(
    nl: &mut NlSocket,
    index: u32,
    mut visit: impl FnMut(u16, &[u8]),
) -> io::Result<()> {
    let seq = nl.next_seq();
    let mut m = MsgBuf::new();
    m.begin(RTM_GETLINK, F_REQUEST, seq)
        .raw(&ifinfomsg(index, 0, 0))
        .end();
    nl.dump(m.bytes(), |kind, payload| {
        if kind == RTM_NEWLINK {
            for (t, v) in Attrs::new(payload.get(IFINFOMSG_LEN..).unwrap_or(&[])) {
                visit(t, v);
            }
        }
    })
}

#[cfg(feature = "test-topology")]
/// The link and neighbour operations of the test topology (feature
/// `test-topology`).
mod link {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    use super::super::netlink::{F_ACK, F_CREATE, F_DUMP, F_EXCL, F_REQUEST, MsgBuf, NlSocket};
    use super::*;

    fn transact_one(nl: &mut NlSocket, m: &MsgBuf) -> io::Result<()> {
        nl.transact(m.bytes(), m.acks)
    }

    /// `RTM_NEWLINK` with `IFLA_INFO_KIND "bridge"` (`ip link add <name> type bridge`).
    #[doc(alias = "RTM_NEWLINK")]
    pub(crate) fn add_bridge(nl: &mut NlSocket, name: &str) -> io::Result<()> {
        let seq = nl.next_seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_NEWLINK, F_REQUEST | F_ACK | F_CREATE | F_EXCL, seq)
            .raw(&ifinfomsg(0, 0, 0))
            .attr_str(IFLA_IFNAME, name)
            .nest_unflagged(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "bridge")
            .unnest()
            .end();
        transact_one(nl, &m)
    }

    /// `RTM_NEWLINK` with `IFLA_INFO_KIND "veth"`: a pair `name` (here) and
    /// `peer`, created in the network namespace `peer_ns` (`ip link add <name>
    /// type veth peer name <peer> netns <ns>`).
    #[doc(alias = "RTM_NEWLINK")]
    pub(crate) fn add_veth(
        nl: &mut NlSocket,
        name: &str,
        peer: &str,
        peer_ns: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let seq = nl.next_seq();
        let fd = u32::try_from(peer_ns.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        let mut m = MsgBuf::new();
        m.begin(RTM_NEWLINK, F_REQUEST | F_ACK | F_CREATE | F_EXCL, seq)
            .raw(&ifinfomsg(0, 0, 0))
            .attr_str(IFLA_IFNAME, name)
            .nest_unflagged(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "veth")
            .nest_unflagged(IFLA_INFO_DATA)
            .nest_unflagged(VETH_INFO_PEER)
            .raw(&ifinfomsg(0, 0, 0))
            .attr_str(IFLA_IFNAME, peer)
            .attr_u32(IFLA_NET_NS_FD, fd)
            .unnest()
            .unnest()
            .unnest()
            .end();
        transact_one(nl, &m)
    }

    /// `RTM_NEWLINK` on link `index`: set it up, and make it a port of bridge
    /// `master` when given (`ip link set <dev> [master <br>] up`).
    #[doc(alias = "RTM_NEWLINK")]
    pub(crate) fn set_link_up(
        nl: &mut NlSocket,
        index: u32,
        master: Option<u32>,
    ) -> io::Result<()> {
        let seq = nl.next_seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_NEWLINK, F_REQUEST | F_ACK, seq)
            .raw(&ifinfomsg(index, IFF_UP, IFF_UP));
        if let Some(master) = master {
            m.attr_u32(IFLA_MASTER, master);
        }
        m.end();
        transact_one(nl, &m)
    }

    /// `RTM_NEWLINK` on link `index`: set it down (`ip link set <dev> down`).
    #[doc(alias = "RTM_NEWLINK")]
    pub(crate) fn set_link_down(nl: &mut NlSocket, index: u32) -> io::Result<()> {
        let seq = nl.next_seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_NEWLINK, F_REQUEST | F_ACK, seq)
            .raw(&ifinfomsg(index, 0, IFF_UP));
        m.end();
        transact_one(nl, &m)
    }

    /// `RTM_GETLINK` on link `index`: is its operational state `IF_OPER_UP`?
    /// (The kernel sets it, and activates the link's queueing discipline,
    /// from a work queue a moment after the link came up; a packet sent
    /// before that is dropped.)
    #[doc(alias = "IFLA_OPERSTATE")]
    pub(crate) fn link_oper_up(nl: &mut NlSocket, index: u32) -> io::Result<bool> {
        let mut up = false;
        get_link_attrs(nl, index, |t, v| {
            up |= t == IFLA_OPERSTATE && v.first() == Some(&IF_OPER_UP);
        })?;
        Ok(up)
    }

    /// `RTM_GETNEIGH` dump: `(family, destination)` of every entry on link
    /// `index` whose state is in `states`.
    #[doc(alias = "RTM_GETNEIGH")]
    pub(crate) fn neighbours(
        nl: &mut NlSocket,
        index: u32,
        states: u16,
    ) -> io::Result<Vec<(u8, Vec<u8>)>> {
        let seq = nl.next_seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_GETNEIGH, F_REQUEST | F_DUMP, seq)
            .raw(&ndmsg(0, 0, 0, 0))
            .end();
        let mut out = Vec::new();
        nl.dump(m.bytes(), |kind, payload| {
            if kind != RTM_NEWNEIGH {
                return;
            }
            let Some((family, ifindex, state, attrs)) = parse_ndmsg(payload) else {
                return;
            };
            if ifindex != index || state & states == 0 {
                return;
            }
            if let Some((_, dst)) = attrs.into_iter().find(|(t, _)| *t == NDA_DST) {
                out.push((family, dst.to_vec()));
            }
        })?;
        Ok(out)
    }

    /// `RTM_DELNEIGH`: remove the entry for `dst` (address bytes of `family`)
    /// on link `index`.
    #[doc(alias = "RTM_DELNEIGH")]
    pub(crate) fn del_neighbour(
        nl: &mut NlSocket,
        index: u32,
        family: u8,
        dst: &[u8],
    ) -> io::Result<()> {
        let seq = nl.next_seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_DELNEIGH, F_REQUEST | F_ACK, seq)
            .raw(&ndmsg(family, index, 0, 0))
            .attr(NDA_DST, dst)
            .end();
        transact_one(nl, &m)
    }
}
#[cfg(feature = "test-topology")]
pub(crate) use link::{
    add_bridge, add_veth, del_neighbour, link_oper_up, neighbours, set_link_down, set_link_up,
};

#[cfg(test)]
mod tests {
    use super::super::netlink::F_REQUEST;
    use super::super::netlink::Messages;
    use super::*;

    #[test]
    fn address_messages_carry_prefix_and_nodad() {
        let a = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
        let m = addr_msg(RTM_NEWADDR, F_REQUEST, 3, a.into(), 64, 1);
        let b = m.bytes();
        assert_eq!(b[16], libc::AF_INET6 as u8);
        assert_eq!(b[17], 64);
        assert_eq!(u32::from_ne_bytes([b[20], b[21], b[22], b[23]]), 3);
        let attrs: Vec<_> = Attrs::new(&b[24..]).map(|(t, _)| t).collect();
        assert_eq!(attrs, vec![IFA_LOCAL, IFA_ADDRESS, IFA_FLAGS]);
    }

    #[test]
    fn address_removal_v4_names_local_and_address_without_flags() {
        let m = addr_msg(RTM_DELADDR, F_REQUEST, 5, [198, 51, 100, 7].into(), 24, 1);
        let b = m.bytes();
        assert_eq!(b[16], libc::AF_INET as u8);
        assert_eq!(b[17], 24);
        let attrs: Vec<_> = Attrs::new(&b[24..]).collect();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0], (IFA_LOCAL, &[198, 51, 100, 7][..]));
        assert_eq!(attrs[1], (IFA_ADDRESS, &[198, 51, 100, 7][..]));
    }

    #[test]
    fn neighbour_message_names_the_destination() {
        let (m, bytes) = neigh_msg(RTM_GETNEIGH, F_REQUEST, 4, [198, 51, 100, 9].into(), 0, 1);
        assert_eq!(bytes, [198, 51, 100, 9]);
        let b = m.bytes();
        let (family, index, _, mut attrs) = parse_ndmsg(&b[16..]).unwrap();
        assert_eq!((family, index), (libc::AF_INET as u8, 4));
        assert_eq!(attrs.next(), Some((NDA_DST, &[198, 51, 100, 9][..])));
    }

    /// The numbers of `<linux/rtnetlink.h>` and friends, as the kernel has them.
    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(IFLA_OPERSTATE, libc::IFLA_OPERSTATE);
        assert_eq!(IF_OPER_UP, libc::IF_OPER_UP as u8);
        assert_eq!(RTM_NEWLINK, libc::RTM_NEWLINK);
        assert_eq!(RTM_GETLINK, libc::RTM_GETLINK);
        assert_eq!(RTM_NEWADDR, libc::RTM_NEWADDR);
        assert_eq!(RTM_DELADDR, libc::RTM_DELADDR);
        assert_eq!(RTM_GETADDR, libc::RTM_GETADDR);
        assert_eq!(RTM_NEWROUTE, libc::RTM_NEWROUTE);
        assert_eq!(RTM_GETROUTE, libc::RTM_GETROUTE);
        assert_eq!(RTM_NEWNEIGH, libc::RTM_NEWNEIGH);
        assert_eq!(RTM_DELNEIGH, libc::RTM_DELNEIGH);
        assert_eq!(RTM_GETNEIGH, libc::RTM_GETNEIGH);
        assert_eq!(IFLA_ADDRESS, libc::IFLA_ADDRESS);
        assert_eq!(IFLA_IFNAME, libc::IFLA_IFNAME);
        assert_eq!(IFLA_MASTER, libc::IFLA_MASTER);
        assert_eq!(IFLA_LINKINFO, libc::IFLA_LINKINFO);
        assert_eq!(IFLA_NET_NS_FD, libc::IFLA_NET_NS_FD);
        assert_eq!(IFLA_INFO_KIND, libc::IFLA_INFO_KIND);
        assert_eq!(IFLA_INFO_DATA, libc::IFLA_INFO_DATA);
        assert_eq!(IFF_UP, libc::IFF_UP as u32);
        assert_eq!(IFA_ADDRESS, libc::IFA_ADDRESS);
        assert_eq!(IFA_LOCAL, libc::IFA_LOCAL);
        assert_eq!(IFA_FLAGS, libc::IFA_FLAGS);
        assert_eq!(IFA_F_NODAD, libc::IFA_F_NODAD);
        assert_eq!(RTA_DST, libc::RTA_DST);
        assert_eq!(RTN_LOCAL, libc::RTN_LOCAL);
        assert_eq!(NDA_DST, libc::NDA_DST);
        assert_eq!(NDA_LLADDR, libc::NDA_LLADDR);
        assert_eq!(NTF_USE, libc::NTF_USE);
        assert_eq!(NUD_PERMANENT, libc::NUD_PERMANENT);
        assert_eq!(NUD_NOARP, libc::NUD_NOARP);
        assert_eq!(
            NUD_VALID,
            libc::NUD_PERMANENT
                | libc::NUD_NOARP
                | libc::NUD_REACHABLE
                | libc::NUD_PROBE
                | libc::NUD_STALE
                | libc::NUD_DELAY
        );
        assert_eq!(IFINFOMSG_LEN, size_of::<libc::ifinfomsg>());
        assert_eq!(IFADDRMSG_LEN, size_of::<libc::ifaddrmsg>());
        // libc has no `ndmsg` / `rtmsg`: u8 family, 2 pad, i32 ifindex,
        // u16 state, u8 flags, u8 type; 9 u8 fields + u32 flags.
        assert_eq!(NDMSG_LEN, 1 + 1 + 2 + 4 + 2 + 1 + 1);
        assert_eq!(RTMSG_LEN, 8 + 4);
    }

    #[test]
    fn ndmsg_round_trips() {
        let h = ndmsg(10, 7, NUD_NOARP, NTF_USE);
        let mut p = h.to_vec();
        p.extend_from_slice(&[8, 0, NDA_DST as u8, 0, 1, 2, 3, 4]);
        let (family, index, state, attrs) = parse_ndmsg(&p).unwrap();
        assert_eq!((family, index, state), (10, 7, NUD_NOARP));
        assert_eq!(
            attrs.collect::<Vec<_>>(),
            vec![(NDA_DST, &[1u8, 2, 3, 4][..])]
        );
    }

    /// The veth request nests the peer's `ifinfomsg` and attributes inside
    /// `IFLA_LINKINFO / IFLA_INFO_DATA / VETH_INFO_PEER`, as iproute2 does
    /// (no `NLA_F_NESTED`).
    #[test]
    fn veth_request_layout() {
        let mut m = MsgBuf::new();
        m.begin(RTM_NEWLINK, F_REQUEST, 1)
            .raw(&ifinfomsg(0, 0, 0))
            .attr_str(IFLA_IFNAME, "p")
            .nest_unflagged(IFLA_LINKINFO)
            .attr_str(IFLA_INFO_KIND, "veth")
            .nest_unflagged(IFLA_INFO_DATA)
            .nest_unflagged(VETH_INFO_PEER)
            .raw(&ifinfomsg(0, 0, 0))
            .attr_str(IFLA_IFNAME, "eth0")
            .attr_u32(IFLA_NET_NS_FD, 9)
            .unnest()
            .unnest()
            .unnest()
            .end();
        let msg = Messages::new(m.bytes()).next().unwrap();
        let attrs: Vec<_> = Attrs::new(&msg.payload[IFINFOMSG_LEN..]).collect();
        assert_eq!(attrs[0], (IFLA_IFNAME, &b"p\0"[..]));
        assert_eq!(attrs[1].0, IFLA_LINKINFO);
        // After ifinfomsg (16) and IFLA_IFNAME (8): the raw type field of
        // IFLA_LINKINFO carries no NLA_F_NESTED flag.
        let raw_type = u16::from_ne_bytes([msg.payload[26], msg.payload[27]]);
        assert_eq!(raw_type, IFLA_LINKINFO);
        let info: Vec<_> = Attrs::new(attrs[1].1).collect();
        assert_eq!(info[0], (IFLA_INFO_KIND, &b"veth\0"[..]));
        let data: Vec<_> = Attrs::new(info[1].1).collect();
        assert_eq!(data[0].0, VETH_INFO_PEER);
        let peer = data[0].1;
        assert_eq!(&peer[..IFINFOMSG_LEN], &[0u8; IFINFOMSG_LEN]);
        let peer_attrs: Vec<_> = Attrs::new(&peer[IFINFOMSG_LEN..]).collect();
        assert_eq!(
            peer_attrs,
            vec![
                (IFLA_IFNAME, &b"eth0\0"[..]),
                (IFLA_NET_NS_FD, &9u32.to_ne_bytes()[..])
            ]
        );
    }
}
