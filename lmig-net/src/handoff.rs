//! Lossless network handoff: the service addresses move from the source
//! host to the destination host while packets sent to them are held, never
//! dropped, and no client waits for a retransmission timeout.
//!
//! # Design
//!
//! Both hosts run a [`NetLock`] on the service
//! addresses (NFQUEUE at `prerouting`, so a packet is held whether or not
//! the address is still local).
//!
//! ```text
//! source (Locked<S>)                          destination (Handoff<S>)
//!  new: install lock (disengaged)              new: install + engage lock
//!                                              (the address is not here: nothing matches yet)
//!  ── freeze ──
//!  freeze: engage lock, then S::freeze         restore: S::restore (repair mode)
//!   (packets to the service are held; with     (copies sent on early wait in
//!   direct forwarding their copies go on to     this lock)
//!   the destination as they arrive)
//!  ── Commit ──  (the commit rule: nothing below happens before it)
//!  release: remove address (netlink)           activate: add address (netlink, IPv6 nodad),
//!                                                        gratuitous ARP / unsolicited NA,
//!           take held packets (one DROP                  S::activate (repair off),
//!           batch verdict), send on those not            then on a thread, while the
//!           sent early (straight to the                  program resumes: flush set,
//!           destination, or routed once the              ACCEPT held (one batch verdict),
//!           address is gone)                             delete table
//!           keep forwarding what still arrives
//!           (clients not yet switched by the
//!           announcement) until quiet, then
//!           flush set, drop table;
//!           S::release (closed in repair mode)
//! ── abort (before Commit only) ──
//!  abort: S::abort (repair off), flush set,    discard: S::discard, flush set,
//!         ACCEPT held, delete table:                    delete table (copies sent
//!         the source serves on                          early go with it); the
//!                                                       address was never added
//! ```
//!
//! The source removes the address only after `Commit` was written and the
//! destination adds it only after `Commit` was received, so the address is
//! never served from both sides by the program. Re-injected packets leave the
//! source once the address is gone, so they route to the destination; if the
//! destination has not taken the address yet, the source's neighbour
//! resolution waits for the destination's announcement (which also answers
//! a pending resolution) and the packets go out then. At the destination
//! they are held like direct packets until the sockets left repair mode.
//!
//! # Announcements
//!
//! A gratuitous ARP request (`sip = tip = service`) is sent on an
//! `AF_PACKET` socket; an unsolicited neighbour advertisement with the
//! override flag to ff02::1 (hop limit 255) from the service address on a
//! raw ICMPv6 socket. Linux peers update an existing neighbour entry from
//! either at once (no `arp_accept` needed for existing entries). No external
//! binary runs on the freeze path.
//!
//! # Requirements
//!
//! Those of [`crate::lock`], plus CAP_NET_ADMIN/CAP_NET_RAW for addresses,
//! raw and packet sockets. The service addresses should be used by the
//! migrating program only: everything sent to them is held during the freeze.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lmig_core::model::{SocketPrep, SocketRecord};
use lmig_core::traits::{SocketSink, SocketSource};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::error::{NetError, Result};
use crate::lock::{HeldPacket, LockConfig, NetLock, SETTLE};
use crate::sys::netlink::{Attrs, F_ACK, F_CREATE, F_DUMP, F_REPLACE, F_REQUEST, MsgBuf, NlSocket};
use crate::sys::packet;
use crate::sys::rtnl::{
    IFA_ADDRESS, IFA_F_NODAD, IFA_FLAGS, IFA_LOCAL, IFINFOMSG_LEN, IFLA_ADDRESS, NDA_DST,
    NDA_LLADDR, NTF_USE, NUD_VALID, RTA_DST, RTM_DELADDR, RTM_GETADDR, RTM_GETLINK, RTM_GETNEIGH,
    RTM_GETROUTE, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWROUTE, RTN_LOCAL, ifaddrmsg,
    ifinfomsg, ndmsg, parse_ifaddrmsg, parse_ndmsg, rtmsg_lookup, rtmsg_type,
};

/// One service address with its prefix length as configured on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAddr {
    /// The address clients connect to.
    pub addr: IpAddr,
    /// Its prefix length on the interface (e.g. 24, 64, or 32/128 for a host address).
    pub prefix_len: u8,
}

impl ServiceAddr {
    /// `addr/prefix_len`.
    pub fn new(addr: impl Into<IpAddr>, prefix_len: u8) -> Self {
        Self {
            addr: addr.into(),
            prefix_len,
        }
    }
}

/// Settings of one side of the handoff.
#[derive(Clone, Debug)]
pub struct HandoffConfig {
    /// The service addresses that move (IPv4 and/or IPv6).
    pub addrs: Vec<ServiceAddr>,
    /// The interface carrying them on this host (e.g. `"eth0"`); looked up in
    /// the network namespace of the calling thread.
    pub interface: String,
    /// Source only: after the handoff, keep forwarding packets that still
    /// arrive here until none came for this long (default 250 ms) ...
    pub quiet: Duration,
    /// ... or at most this long (default 3 s).
    pub linger: Duration,
    /// Packets the lock may hold (default 65,536).
    pub queue_maxlen: u32,
    /// Receive buffer for held packet copies (default 64 MiB).
    pub rcvbuf: usize,
    /// Source only: the destination host's own address on this link (for
    /// example its migration address). When set, held packets go straight to
    /// its link-layer address, learnt before the freeze from the neighbour
    /// table. Without it (or when that host is not a known neighbour on
    /// `interface`) they are routed to the service address, which costs an
    /// ARP or neighbour exchange the destination only answers once it holds
    /// the address, and the kernel queues few packets meanwhile (the rest
    /// are dropped and the clients retransmit).
    pub forward_to: Option<IpAddr>,
    /// Source only, with direct forwarding ([`HandoffConfig::forward_to`]
    /// resolved): send copies of held packets on to the destination already
    /// during the freeze, as they arrive (default false). The destination's
    /// lock holds them until its sockets are live; the originals stay held
    /// here until the end, so an abort still delivers them here (and the
    /// destination drops its copies with its lock), and after `Commit` only
    /// the last few are left to send. Without it every held packet is sent
    /// after `Commit`, while the clients wait (about 10 µs each here).
    ///
    /// Off by default: it moves that work into the freeze, which is worth
    /// it only where the freeze is not short of CPU. With source and
    /// destination on one 2-core host (`lmig-bench migrate`, 1000
    /// connections) it made the freeze 6-7 ms longer and saved 3-5 ms after
    /// `Commit`.
    pub forward_early: bool,
}

impl HandoffConfig {
    /// These addresses on `interface`, default timings and capacities.
    pub fn new(addrs: impl IntoIterator<Item = ServiceAddr>, interface: impl Into<String>) -> Self {
        Self {
            addrs: addrs.into_iter().collect(),
            interface: interface.into(),
            quiet: Duration::from_millis(250),
            linger: Duration::from_secs(3),
            queue_maxlen: 65_536,
            rcvbuf: 64 << 20,
            forward_to: None,
            forward_early: false,
        }
    }

    /// Forward held packets straight to this destination host (see
    /// [`HandoffConfig::forward_to`]).
    pub fn forward_to(mut self, host: IpAddr) -> Self {
        self.forward_to = Some(host);
        self
    }

    fn lock_config(&self, copy_payload: bool) -> LockConfig {
        LockConfig {
            addrs: self.addrs.iter().map(|a| a.addr).collect(),
            queue_maxlen: self.queue_maxlen,
            rcvbuf: self.rcvbuf,
            copy_payload,
        }
    }
}

/// What one side of a handoff did, for reports and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HandoffStats {
    /// Time to engage the lock (source: at the freeze).
    pub lock: Duration,
    /// Time to unlock (destination: flush + batch verdict + table removal;
    /// source: the same after an abort, or the final cleanup after a handoff).
    pub unlock: Duration,
    /// Destination: time of the one batch verdict that lets the held packets
    /// through (the kernel delivers them to the sockets inside that call, so
    /// it grows with the number of held packets, not of connections).
    pub release: Duration,
    /// Time to remove (source) or add and announce (destination) the addresses.
    pub address_move: Duration,
    /// Packets held by the lock (source: re-injected towards the destination).
    pub held: u64,
    /// Packets lost (queue or buffer overrun, failed re-injection).
    pub dropped: u64,
    /// Source: held packets go straight to the destination host's
    /// link-layer address ([`HandoffConfig::forward_to`] resolved).
    pub forwarded_direct: bool,
    /// Source: time to take the held packets and send them on at the
    /// handoff (the stragglers after it are not counted).
    pub forward: Duration,
    /// Source: held packets sent on during the freeze already
    /// ([`HandoffConfig::forward_early`]).
    pub forwarded_early: u64,
}

fn if_index(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|e| NetError::sys("if_nametoindex", name.to_string(), e.into()))
}

fn addr_msg(kind: u16, flags: u16, ifindex: u32, a: &ServiceAddr, seq: u32) -> MsgBuf {
    let mut m = MsgBuf::new();
    let (family, bytes) = match a.addr {
        IpAddr::V4(v) => (libc::AF_INET as u8, v.octets().to_vec()),
        IpAddr::V6(v) => (libc::AF_INET6 as u8, v.octets().to_vec()),
    };
    m.begin(kind, flags, seq)
        .raw(&ifaddrmsg(family, a.prefix_len, ifindex))
        .attr(IFA_LOCAL, &bytes);
    if a.addr.is_ipv4() || kind == RTM_NEWADDR {
        m.attr(IFA_ADDRESS, &bytes);
    }
    if a.addr.is_ipv6() && kind == RTM_NEWADDR {
        m.attr_u32(IFA_FLAGS, IFA_F_NODAD);
    }
    m.end();
    m
}

/// `RTM_NEWADDR`: add `addr` to interface `ifindex` (IPv6 without duplicate
/// address detection, so it is usable at once). Replaces an existing one.
#[doc(alias = "RTM_NEWADDR")]
pub fn add_address(ifindex: u32, addr: &ServiceAddr) -> Result<()> {
    add_address_with(&mut route_socket()?, ifindex, addr)
}

/// `RTM_DELADDR`: remove `addr` from interface `ifindex`; an address that
/// is not there is not an error.
#[doc(alias = "RTM_DELADDR")]
pub fn remove_address(ifindex: u32, addr: &ServiceAddr) -> Result<()> {
    remove_address_with(&mut route_socket()?, ifindex, addr)
}

fn route_socket() -> Result<NlSocket> {
    NlSocket::route().map_err(|e| NetError::sys("netlink socket", "NETLINK_ROUTE", e))
}

fn add_address_with(nl: &mut NlSocket, ifindex: u32, addr: &ServiceAddr) -> Result<()> {
    let seq = nl.next_seq();
    let m = addr_msg(
        RTM_NEWADDR,
        F_REQUEST | F_ACK | F_CREATE | F_REPLACE,
        ifindex,
        addr,
        seq,
    );
    nl.transact(m.bytes(), 1).map_err(|e| {
        NetError::sys(
            "RTM_NEWADDR",
            format!("{}/{}", addr.addr, addr.prefix_len),
            e,
        )
    })
}

fn remove_address_with(nl: &mut NlSocket, ifindex: u32, addr: &ServiceAddr) -> Result<()> {
    let seq = nl.next_seq();
    let m = addr_msg(RTM_DELADDR, F_REQUEST | F_ACK, ifindex, addr, seq);
    match nl.transact(m.bytes(), 1) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(NetError::sys(
            "RTM_DELADDR",
            format!("{}/{}", addr.addr, addr.prefix_len),
            e,
        )),
    }
}

/// `RTM_GETADDR`: the IPv4 and IPv6 addresses of interface `ifindex`
/// (link-local ones included), with their prefix lengths.
#[doc(alias = "RTM_GETADDR")]
pub fn addresses(ifindex: u32) -> Result<Vec<ServiceAddr>> {
    let mut nl = route_socket()?;
    let seq = nl.next_seq();
    let mut m = MsgBuf::new();
    m.begin(RTM_GETADDR, F_REQUEST | F_DUMP, seq)
        .raw(&ifaddrmsg(0, 0, 0))
        .end();
    let mut out = Vec::new();
    nl.dump(m.bytes(), |kind, payload| {
        if kind != RTM_NEWADDR {
            return;
        }
        let Some((_, prefix_len, index, attrs)) = parse_ifaddrmsg(payload) else {
            return;
        };
        if index != ifindex {
            return;
        }
        // IFA_LOCAL is the address itself (IFA_ADDRESS the peer on
        // point-to-point links); IPv6 has only IFA_ADDRESS.
        let (mut local, mut address) = (None, None);
        for (t, v) in attrs {
            let ip = match v.len() {
                4 => <[u8; 4]>::try_from(v).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(v).ok().map(IpAddr::from),
                _ => None,
            };
            match t {
                IFA_LOCAL => local = ip,
                IFA_ADDRESS => address = ip,
                _ => {}
            }
        }
        if let Some(ip) = local.or(address) {
            out.push(ServiceAddr::new(ip, prefix_len));
        }
    })
    .map_err(|e| NetError::sys("RTM_GETADDR", format!("interface {ifindex}"), e))?;
    Ok(out)
}

/// `RTM_GETROUTE` until `addr` routes as `RTN_LOCAL`, at most `timeout`.
fn wait_local(nl: &mut NlSocket, addr: IpAddr, timeout: Duration) -> Result<()> {
    let (family, bytes, len) = match addr {
        IpAddr::V4(v) => (libc::AF_INET as u8, v.octets().to_vec(), 32u8),
        IpAddr::V6(v) => (libc::AF_INET6 as u8, v.octets().to_vec(), 128u8),
    };
    let start = Instant::now();
    // Bounded by `timeout`.
    loop {
        let seq = nl.next_seq();
        let mut m = MsgBuf::new();
        m.begin(RTM_GETROUTE, F_REQUEST, seq)
            .raw(&rtmsg_lookup(family, len))
            .attr(RTA_DST, &bytes)
            .end();
        let mut local = false;
        let r = nl.dump(m.bytes(), |kind, payload| {
            if kind == RTM_NEWROUTE && rtmsg_type(payload) == Some(RTN_LOCAL) {
                local = true;
            }
        });
        if local {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(NetError::sys(
                "RTM_GETROUTE",
                format!("{addr} (not local after it was added)"),
                r.err()
                    .unwrap_or_else(|| io::Error::from(io::ErrorKind::TimedOut)),
            ));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// `RTM_GETLINK`: the link-layer (MAC) address of interface `ifindex`.
#[doc(alias = "RTM_GETLINK")]
pub fn link_address(ifindex: u32) -> Result<[u8; 6]> {
    let mut nl = route_socket()?;
    let seq = nl.next_seq();
    let mut m = MsgBuf::new();
    m.begin(RTM_GETLINK, F_REQUEST, seq)
        .raw(&ifinfomsg(ifindex, 0, 0))
        .end();
    let mut mac = None;
    nl.dump(m.bytes(), |kind, payload| {
        if kind != RTM_NEWLINK {
            return;
        }
        for (t, v) in Attrs::new(payload.get(IFINFOMSG_LEN..).unwrap_or(&[])) {
            if t == IFLA_ADDRESS && v.len() == 6 {
                let mut a = [0u8; 6];
                a.copy_from_slice(v);
                mac = Some(a);
            }
        }
    })
    .map_err(|e| NetError::sys("RTM_GETLINK", format!("interface {ifindex}"), e))?;
    mac.ok_or(NetError::NotMigratable {
        what: format!("interface {ifindex}"),
        reason: "it has no Ethernet address to announce the service address from".into(),
    })
}

/// A neighbour-table message (`struct ndmsg` + `NDA_DST`) about `ip` on
/// interface `ifindex`, and the address bytes.
fn neigh_msg(
    kind: u16,
    flags: u16,
    ifindex: u32,
    ip: IpAddr,
    ntf: u8,
    seq: u32,
) -> (MsgBuf, Vec<u8>) {
    let (family, bytes) = match ip {
        IpAddr::V4(v) => (libc::AF_INET as u8, v.octets().to_vec()),
        IpAddr::V6(v) => (libc::AF_INET6 as u8, v.octets().to_vec()),
    };
    let mut m = MsgBuf::new();
    m.begin(kind, flags, seq)
        .raw(&ndmsg(family, ifindex, 0, ntf))
        .attr(NDA_DST, &bytes)
        .end();
    (m, bytes)
}

/// `RTM_GETNEIGH`: the link-layer address of neighbour `ip` on interface
/// `ifindex`, if the neighbour table holds a valid entry for it.
#[doc(alias = "RTM_GETNEIGH")]
pub fn neighbour_address(ifindex: u32, ip: IpAddr) -> Result<Option<[u8; 6]>> {
    let mut nl = route_socket()?;
    let seq = nl.next_seq();
    let (m, bytes) = neigh_msg(RTM_GETNEIGH, F_REQUEST, ifindex, ip, 0, seq);
    let mut mac = None;
    let r = nl.dump(m.bytes(), |kind, payload| {
        if kind != RTM_NEWNEIGH {
            return;
        }
        let Some((_, index, state, attrs)) = parse_ndmsg(payload) else {
            return;
        };
        if index != ifindex || state & NUD_VALID == 0 {
            return;
        }
        let (mut dst, mut ll) = (None, None);
        for (t, v) in attrs {
            match t {
                NDA_DST => dst = Some(v.to_vec()),
                NDA_LLADDR if v.len() == 6 => ll = Some(v),
                _ => {}
            }
        }
        if let (Some(d), Some(l)) = (dst, ll) {
            if d == bytes {
                let mut a = [0u8; 6];
                a.copy_from_slice(l);
                mac = Some(a);
            }
        }
    });
    match r {
        Ok(()) => Ok(mac),
        // No entry for it.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(NetError::sys("RTM_GETNEIGH", ip.to_string(), e)),
    }
}

/// [`neighbour_address`], asking the kernel to resolve it (an ARP request
/// or neighbour solicitation, `NTF_USE`) when the table has no valid entry,
/// and waiting for the answer at most `timeout`.
pub fn resolve_neighbour(ifindex: u32, ip: IpAddr, timeout: Duration) -> Result<Option<[u8; 6]>> {
    if let Some(mac) = neighbour_address(ifindex, ip)? {
        return Ok(Some(mac));
    }
    let mut nl = route_socket()?;
    let seq = nl.next_seq();
    let flags = F_REQUEST | F_ACK | F_CREATE;
    let (m, _) = neigh_msg(RTM_NEWNEIGH, flags, ifindex, ip, NTF_USE, seq);
    nl.transact(m.bytes(), 1)
        .map_err(|e| NetError::sys("RTM_NEWNEIGH (NTF_USE)", ip.to_string(), e))?;
    let start = Instant::now();
    // Bounded by `timeout`.
    while start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(1));
        if let Some(mac) = neighbour_address(ifindex, ip)? {
            return Ok(Some(mac));
        }
    }
    Ok(None)
}

/// Sends gratuitous ARPs and unsolicited neighbour advertisements for the
/// service addresses out of one interface. Sockets and the interface's
/// address are set up by [`Announcer::new`], before the freeze.
#[derive(Debug)]
pub struct Announcer {
    ifindex: u32,
    mac: [u8; 6],
    arp: std::os::fd::OwnedFd,
    icmp6: Vec<(Ipv6Addr, Socket)>,
}

impl Announcer {
    /// Prepare announcements of `addrs` out of `ifindex` (all sockets are
    /// opened here, in the calling thread's network namespace).
    pub fn new(ifindex: u32, addrs: &[ServiceAddr]) -> Result<Self> {
        let mac = link_address(ifindex)?;
        let arp =
            packet::packet_dgram_socket(packet::ETH_P_ARP).map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM) => NetError::Unsupported {
                    feature: "gratuitous ARP",
                    needs: "CAP_NET_RAW in the host's network namespace",
                },
                _ => NetError::sys("socket(AF_PACKET)", format!("interface {ifindex}"), e),
            })?;
        let mut icmp6 = Vec::new();
        for a in addrs {
            if let IpAddr::V6(v6) = a.addr {
                let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
                    .and_then(|s| {
                        s.set_multicast_hops_v6(255)?;
                        s.set_multicast_if_v6(ifindex)?;
                        Ok(s)
                    })
                    .map_err(|e| {
                        NetError::sys("socket(SOCK_RAW, IPPROTO_ICMPV6)", v6.to_string(), e)
                    })?;
                icmp6.push((v6, s));
            }
        }
        Ok(Self {
            ifindex,
            mac,
            arp,
            icmp6,
        })
    }

    /// Announce every address in `addrs` (which must be on the interface now
    /// and, for IPv6, have been given to [`Announcer::new`]).
    pub fn announce(&mut self, addrs: &[ServiceAddr]) -> Result<()> {
        for a in addrs {
            match a.addr {
                IpAddr::V4(v4) => {
                    let mut p = Vec::with_capacity(28);
                    p.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
                    p.extend_from_slice(&self.mac);
                    p.extend_from_slice(&v4.octets());
                    p.extend_from_slice(&[0; 6]);
                    p.extend_from_slice(&v4.octets());
                    packet::send_to_broadcast(
                        std::os::fd::AsFd::as_fd(&self.arp),
                        self.ifindex,
                        packet::ETH_P_ARP,
                        &p,
                    )
                    .map_err(|e| NetError::sys("send gratuitous ARP", v4.to_string(), e))?;
                }
                IpAddr::V6(v6) => self.advertise(v6).map_err(|e| {
                    NetError::sys(
                        "send unsolicited neighbour advertisement",
                        v6.to_string(),
                        e,
                    )
                })?,
            }
        }
        Ok(())
    }

    fn advertise(&mut self, target: Ipv6Addr) -> io::Result<()> {
        let Some(i) = self.icmp6.iter().position(|(a, _)| *a == target) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "address not prepared",
            ));
        };
        let s = &self.icmp6[i].1;
        // The source address must be the service address (now local).
        s.bind(&SockAddr::from(SocketAddrV6::new(target, 0, 0, 0)))?;
        let mut na = Vec::with_capacity(32);
        na.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
        na.extend_from_slice(&target.octets());
        na.extend_from_slice(&[2, 1]);
        na.extend_from_slice(&self.mac);
        let all_nodes = SocketAddrV6::new(
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            0,
            0,
            self.ifindex,
        );
        s.send_to(&na, &SockAddr::from(all_nodes))?;
        // A socket binds once: make a fresh one for a later announcement.
        if let Ok(fresh) = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)) {
            let _ = fresh.set_multicast_hops_v6(255);
            let _ = fresh.set_multicast_if_v6(self.ifindex);
            self.icmp6[i].1 = fresh;
        }
        Ok(())
    }
}

/// Sends held IP packets again, unchanged: straight to the destination
/// host's link-layer address when it is known ([`Reinjector::direct`]),
/// otherwise through this host's routing (raw sockets with the header
/// included).
#[derive(Debug)]
pub struct Reinjector {
    v4: Socket,
    v6: Socket,
    direct: Option<Direct>,
}

/// The link-layer path of a [`Reinjector`].
#[derive(Debug)]
struct Direct {
    fd: std::os::fd::OwnedFd,
    ifindex: u32,
    mac: [u8; 6],
}

impl Reinjector {
    /// Open the raw sockets (before the freeze).
    pub fn new() -> Result<Self> {
        let open = |d: Domain| {
            Socket::new(d, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).map_err(|e| match e
                .raw_os_error()
            {
                Some(libc::EPERM) => NetError::Unsupported {
                    feature: "re-injecting held packets",
                    needs: "CAP_NET_RAW in the host's network namespace",
                },
                _ => NetError::sys("socket(SOCK_RAW, IPPROTO_RAW)", "re-injection", e),
            })
        };
        Ok(Self {
            v4: open(Domain::IPV4)?,
            v6: open(Domain::IPV6)?,
            direct: None,
        })
    }

    /// Send every packet out of interface `ifindex` to link-layer address
    /// `mac` (the destination host), without routing or address resolution.
    pub fn direct(mut self, ifindex: u32, mac: [u8; 6]) -> Result<Self> {
        let fd = packet::packet_dgram_socket(0)
            .map_err(|e| NetError::sys("socket(AF_PACKET)", format!("interface {ifindex}"), e))?;
        self.direct = Some(Direct { fd, ifindex, mac });
        Ok(self)
    }

    /// Packets go straight to a link-layer address ([`Reinjector::direct`]).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Send one IP packet (IPv4 or IPv6, from its header on) to its destination.
    pub fn send(&self, pkt: &[u8]) -> io::Result<()> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "not an IP packet");
        if let Some(d) = &self.direct {
            let proto = match pkt.first().map(|b| b >> 4) {
                Some(4) if pkt.len() >= 20 => packet::ETH_P_IP,
                Some(6) if pkt.len() >= 40 => packet::ETH_P_IPV6,
                _ => return Err(bad()),
            };
            return packet::send_to(
                std::os::fd::AsFd::as_fd(&d.fd),
                d.ifindex,
                proto,
                d.mac,
                pkt,
            );
        }
        match pkt.first().map(|b| b >> 4) {
            Some(4) if pkt.len() >= 20 => {
                let d = std::net::Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
                self.v4
                    .send_to(pkt, &SockAddr::from(SocketAddr::new(d.into(), 0)))?;
                Ok(())
            }
            Some(6) if pkt.len() >= 40 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(&pkt[24..40]);
                self.v6.send_to(
                    pkt,
                    &SockAddr::from(SocketAddr::new(Ipv6Addr::from(o).into(), 0)),
                )?;
                Ok(())
            }
            _ => Err(bad()),
        }
    }

    /// Send every packet; returns how many could not be sent.
    pub fn send_all(&self, pkts: &[HeldPacket]) -> u64 {
        pkts.iter().filter(|p| self.send(&p.data).is_err()).count() as u64
    }
}

/// The source side of the handoff: the lock, and after `Commit` the address
/// removal and the forwarding of held packets.
#[derive(Debug)]
pub struct SourceHandoff {
    cfg: HandoffConfig,
    ifindex: u32,
    route: NlSocket,
    lock: Option<NetLock>,
    reinject: Option<Reinjector>,
    stats: Arc<Mutex<HandoffStats>>,
    forwarder: Option<JoinHandle<()>>,
    /// During the freeze: the thread forwarding copies early (it holds the
    /// lock and the re-injector until stopped).
    early: Option<EarlyForwarder>,
}

/// Sends copies of held packets on as they arrive, originals kept.
#[derive(Debug)]
struct EarlyForwarder {
    stop: Arc<AtomicBool>,
    /// Gives back the lock, the re-injector, how many of the lock's held
    /// packets were sent on (a prefix), and how many sends failed.
    thread: JoinHandle<(NetLock, Reinjector, usize, u64)>,
}

impl EarlyForwarder {
    fn start(mut lock: NetLock, reinject: Reinjector) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("lmig-handoff-early".into())
            .spawn(move || {
                let (mut sent, mut failed) = (0usize, 0u64);
                // Bounded by the session: `stop` is set at the handoff or the
                // abort, which follow the freeze.
                while !stopped.load(Ordering::Acquire) {
                    if lock.collect_for(EARLY_STEP).is_err() {
                        break;
                    }
                    let held = lock.held();
                    if held.len() > sent {
                        failed += reinject.send_all(&held[sent..]);
                        sent = held.len();
                    }
                }
                (lock, reinject, sent, failed)
            })
            .map_err(|e| NetError::sys("spawn", "handoff early forwarder", e))?;
        Ok(Self { stop, thread })
    }

    fn stop(self) -> Option<(NetLock, Reinjector, usize, u64)> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().ok()
    }
}

/// How long the early forwarder waits for packets before it looks at its
/// stop flag again (the handoff waits at most this long for it).
const EARLY_STEP: Duration = Duration::from_micros(500);

impl SourceHandoff {
    /// Install the lock (disengaged) and open the re-injection sockets. Run
    /// before the freeze: an error here changes nothing and the program keeps
    /// serving. Leftover lock tables of crashed runs are removed.
    pub fn new(cfg: HandoffConfig) -> Result<Self> {
        let ifindex = if_index(&cfg.interface)?;
        let route = route_socket()?;
        let lock = NetLock::install(cfg.lock_config(true))?;
        let mut reinject = Reinjector::new()?;
        let mut stats = HandoffStats::default();
        if let Some(host) = cfg.forward_to {
            // Unresolvable (another link, no answer): routed, as without it.
            if let Ok(Some(mac)) = resolve_neighbour(ifindex, host, Duration::from_secs(1)) {
                reinject = reinject.direct(ifindex, mac)?;
                stats.forwarded_direct = true;
            }
        }
        Ok(Self {
            cfg,
            ifindex,
            route,
            lock: Some(lock),
            reinject: Some(reinject),
            stats: Arc::new(Mutex::new(stats)),
            forwarder: None,
            early: None,
        })
    }

    /// The lock (for its table name and queue number).
    pub fn lock_ref(&self) -> Option<&NetLock> {
        self.lock.as_ref()
    }

    /// At the freeze: hold every packet sent to the service addresses.
    pub fn lock(&mut self) -> Result<()> {
        let lock = self.lock.as_mut().ok_or(NetError::Phase {
            op: "lock",
            detail: "the handoff already happened or was aborted",
        })?;
        let t = Instant::now();
        lock.engage()?;
        self.stats.lock().map(|mut s| s.lock = t.elapsed()).ok();
        let direct = self
            .stats
            .lock()
            .map(|s| s.forwarded_direct)
            .unwrap_or(false);
        if direct && self.cfg.forward_early {
            if let (Some(lock), Some(reinject)) = (self.lock.take(), self.reinject.take()) {
                self.early = Some(EarlyForwarder::start(lock, reinject)?);
            }
        }
        Ok(())
    }

    /// Stop the early forwarder (if any): the lock and the re-injector come
    /// back; returns how many held packets it sent on.
    fn stop_early(&mut self) -> usize {
        let Some(early) = self.early.take() else {
            return 0;
        };
        match early.stop() {
            Some((lock, reinject, sent, failed)) => {
                self.lock = Some(lock);
                self.reinject = Some(reinject);
                if let Ok(mut s) = self.stats.lock() {
                    s.dropped += failed;
                }
                sent
            }
            // The thread panicked with the lock: its table goes with this
            // process (owner flag); nothing is left to hand over.
            None => 0,
        }
    }

    /// Before `Commit` only: let held packets continue here and remove the lock.
    /// (Copies sent on early are held by the destination's lock, which drops
    /// them when the destination gives up.)
    pub fn unlock(&mut self) -> Result<()> {
        self.stop_early();
        let Some(mut lock) = self.lock.take() else {
            return Ok(());
        };
        let t = Instant::now();
        let n = lock.unlock()?;
        let dropped = lock.kernel_dropped() + lock.stats().dropped;
        if let Ok(mut s) = self.stats.lock() {
            s.unlock = t.elapsed();
            s.held += n;
            s.dropped += dropped;
        }
        Ok(())
    }

    /// After `Commit` (sockets closed): remove the addresses, re-inject every
    /// held packet towards the destination and keep forwarding what still
    /// arrives on a background thread until [`HandoffConfig::quiet`].
    pub fn hand_over(&mut self) -> Result<()> {
        let sent_early = self.stop_early();
        let (Some(mut lock), Some(reinject)) = (self.lock.take(), self.reinject.take()) else {
            return Err(NetError::Phase {
                op: "hand over",
                detail: "the handoff already happened or was aborted",
            });
        };
        let direct = reinject.is_direct();
        let mut first_err = None;
        let mut remove_addresses = |route: &mut NlSocket| {
            let t = Instant::now();
            for a in &self.cfg.addrs {
                if let Err(e) = remove_address_with(route, self.ifindex, a) {
                    first_err.get_or_insert(e);
                }
            }
            t.elapsed()
        };
        // Routed re-injection needs the address gone first (or the packets
        // come back here); sent straight to the destination's link-layer
        // address they need not wait for it.
        let mut moved = Duration::ZERO;
        if !direct {
            moved = remove_addresses(&mut self.route);
        }
        let t = Instant::now();
        // Every original is dropped here; the copies sent early are at the
        // destination already.
        let held = lock.take_held()?;
        let failed = reinject.send_all(held.get(sent_early..).unwrap_or_default());
        let forward = t.elapsed();
        if direct {
            moved = remove_addresses(&mut self.route);
        }
        if let Ok(mut s) = self.stats.lock() {
            s.forward = forward;
            s.address_move = moved;
            s.held += held.len() as u64;
            s.forwarded_early += sent_early.min(held.len()) as u64;
            s.dropped += failed;
        }
        let stats = Arc::clone(&self.stats);
        let (quiet, linger) = (self.cfg.quiet, self.cfg.linger);
        self.forwarder = Some(
            std::thread::Builder::new()
                .name("lmig-handoff-fwd".into())
                .spawn(move || forward_until_quiet(lock, reinject, quiet, linger, stats))
                .map_err(|e| NetError::sys("spawn", "handoff forwarder", e))?,
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Wait for the forwarder (bounded by [`HandoffConfig::linger`]) and return the figures.
    pub fn finish(&mut self) -> HandoffStats {
        self.stop_early();
        if let Some(h) = self.forwarder.take() {
            let _ = h.join();
        }
        self.stats()
    }

    /// The figures so far.
    pub fn stats(&self) -> HandoffStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

fn forward_until_quiet(
    mut lock: NetLock,
    reinject: Reinjector,
    quiet: Duration,
    linger: Duration,
    stats: Arc<Mutex<HandoffStats>>,
) {
    let start = Instant::now();
    let mut last = Instant::now();
    let step = Duration::from_millis(10).min(quiet.max(Duration::from_millis(1)));
    // Bounded by `linger`.
    while start.elapsed() < linger && last.elapsed() < quiet {
        match lock.collect_for(step) {
            Ok(0) => {}
            Ok(_) => {
                last = Instant::now();
                if let Ok(held) = lock.take_held() {
                    let failed = reinject.send_all(&held);
                    if let Ok(mut s) = stats.lock() {
                        s.held += held.len() as u64;
                        s.dropped += failed;
                    }
                }
            }
            Err(_) => break,
        }
    }
    let t = Instant::now();
    let _ = lock.disengage();
    let mut held = lock.take_held().unwrap_or_default();
    let unlock = t.elapsed();
    let mut failed = reinject.send_all(&held);
    let mut count = held.len() as u64;
    // Stragglers queued while the set was flushed (see crate::lock), then
    // the table; bounded by SETTLE.
    let end = Instant::now() + SETTLE;
    while let Some(left) = end
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
    {
        if matches!(lock.collect_for(left), Ok(n) if n > 0) {
            held = lock.take_held().unwrap_or_default();
            failed += reinject.send_all(&held);
            count += held.len() as u64;
        }
    }
    let _ = lock.remove_tables();
    let dropped = lock.kernel_dropped() + lock.stats().dropped;
    if let Ok(mut s) = stats.lock() {
        s.unlock = unlock;
        s.held += count;
        s.dropped += failed + dropped;
    }
}

impl Drop for SourceHandoff {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The destination side of the handoff: holds packets until the restored
/// sockets are live, takes over and announces the addresses.
#[derive(Debug)]
pub struct DestHandoff {
    cfg: HandoffConfig,
    ifindex: u32,
    route: NlSocket,
    lock: Option<NetLock>,
    announcer: Announcer,
    stats: HandoffStats,
    reaper: Option<JoinHandle<Released>>,
}

/// What the background release of the held packets measured.
struct Released {
    unlock: Duration,
    release: Duration,
    held: u64,
    dropped: u64,
}

impl DestHandoff {
    /// Before the freeze: look the interface up, open the sockets and install
    /// and engage the lock (nothing matches until the address arrives here).
    /// Everything is opened in the calling thread's network namespace; later
    /// calls may come from any thread.
    pub fn new(cfg: HandoffConfig) -> Result<Self> {
        let ifindex = if_index(&cfg.interface)?;
        let route = route_socket()?;
        let announcer = Announcer::new(ifindex, &cfg.addrs)?;
        // The destination only lets held packets through: no copies needed.
        let mut lock = NetLock::install(cfg.lock_config(false))?;
        lock.engage()?;
        Ok(Self {
            cfg,
            ifindex,
            route,
            lock: Some(lock),
            announcer,
            stats: HandoffStats::default(),
            reaper: None,
        })
    }

    /// After `Commit`: add the addresses here and announce them.
    pub fn take_over(&mut self) -> Result<()> {
        let t = Instant::now();
        for a in &self.cfg.addrs {
            add_address_with(&mut self.route, self.ifindex, a)?;
        }
        // IPv6 makes an added address local from a workqueue, a moment after
        // RTM_NEWADDR returned: a held packet let through before that is
        // dropped (Ip6InAddrErrors). Wait until the kernel routes it locally.
        for a in &self.cfg.addrs {
            if a.addr.is_ipv6() {
                wait_local(&mut self.route, a.addr, Duration::from_secs(2))?;
            }
        }
        self.announcer.announce(&self.cfg.addrs)?;
        self.stats.address_move = t.elapsed();
        Ok(())
    }

    /// After the restored sockets left repair mode: let held packets through
    /// and remove the lock, on a background thread (joined by
    /// [`finish`](Self::finish) or `Drop`), so the program resumes meanwhile.
    ///
    /// The kernel delivers the held packets to the sockets inside the batch
    /// verdict, one TCP receive each (tens of ms for thousands): the program
    /// serves what is already in its sockets while that runs. The set is
    /// flushed first (nothing new is queued), the held packets get one batch
    /// verdict, stragglers theirs for [`SETTLE`], and the table goes last;
    /// a failing step does not stop the later ones (a table left behind
    /// would hold the service's packets forever). [`HandoffStats::unlock`]
    /// and [`HandoffStats::release`] are known after `finish`.
    pub fn release_held(&mut self) -> Result<()> {
        let Some(mut lock) = self.lock.take() else {
            return Ok(());
        };
        self.reaper = Some(
            std::thread::Builder::new()
                .name("lmig-handoff-unlock".into())
                .spawn(move || {
                    let t = Instant::now();
                    let flushed = lock.disengage().is_ok();
                    let unlock = t.elapsed();
                    let t = Instant::now();
                    let _ = lock.accept_all();
                    let release = t.elapsed();
                    let mut held = 0;
                    let end = Instant::now() + SETTLE;
                    // Bounded by SETTLE.
                    while let Some(left) = end
                        .checked_duration_since(Instant::now())
                        .filter(|d| !d.is_zero())
                    {
                        if matches!(lock.collect_for(left), Ok(n) if n > 0) {
                            held += lock.accept_held().unwrap_or(0);
                        }
                    }
                    let removed = lock.remove_tables().is_ok();
                    // Packets still queued when a step failed are dropped
                    // with the table: count at least one.
                    let lost = u64::from(!(flushed && removed));
                    Released {
                        unlock,
                        release,
                        held,
                        dropped: lock.kernel_dropped() + lock.stats().dropped + lost,
                    }
                })
                .map_err(|e| NetError::sys("spawn", "handoff unlock", e))?,
        );
        Ok(())
    }

    /// Wait for the background unlock (bounded by [`SETTLE`]) and return the figures.
    pub fn finish(&mut self) -> HandoffStats {
        if let Some(h) = self.reaper.take() {
            if let Ok(r) = h.join() {
                self.stats.unlock = r.unlock;
                self.stats.release = r.release;
                self.stats.held += r.held;
                self.stats.dropped += r.dropped;
            }
        }
        self.stats
    }

    /// The migration failed before `Commit`: remove the lock (the address
    /// was never added here).
    pub fn discard(&mut self) {
        if let Some(mut lock) = self.lock.take() {
            let _ = lock.unlock();
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> HandoffStats {
        self.stats
    }
}

impl Drop for DestHandoff {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A [`SocketSource`] with the network lock and the address handoff around
/// it: `freeze` locks before `S::freeze`, `abort` unlocks after `S::abort`,
/// `release` hands the address and the held packets over, then runs
/// `S::release` (the sockets are in repair mode: closing them later sends
/// nothing, and the clients do not wait for it).
#[derive(Debug)]
pub struct Locked<S> {
    inner: S,
    handoff: SourceHandoff,
}

impl<S: SocketSource> Locked<S> {
    /// Wrap `inner`; installs the lock now (see [`SourceHandoff::new`]).
    pub fn new(inner: S, cfg: HandoffConfig) -> Result<Self> {
        Ok(Self {
            inner,
            handoff: SourceHandoff::new(cfg)?,
        })
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped source, mutably.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The handoff (figures, [`SourceHandoff::finish`]).
    pub fn handoff(&mut self) -> &mut SourceHandoff {
        &mut self.handoff
    }
}

impl<S: SocketSource> SocketSource for Locked<S> {
    fn plan(&mut self) -> lmig_core::Result<Vec<SocketPrep>> {
        self.inner.plan()
    }

    fn freeze(&mut self) -> lmig_core::Result<()> {
        self.handoff.lock()?;
        self.inner.freeze()
    }

    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        self.inner.capture(emit)
    }

    fn abort(&mut self) -> lmig_core::Result<()> {
        let inner = self.inner.abort();
        let lock = self.handoff.unlock();
        inner?;
        Ok(lock?)
    }

    fn release(&mut self) -> lmig_core::Result<()> {
        // Address and held packets first: closing thousands of sockets in
        // repair mode takes milliseconds the clients should not wait for,
        // and the closed sockets stay silent either way (repair mode).
        let handoff = self.handoff.hand_over();
        let inner = self.inner.release();
        inner?;
        Ok(handoff?)
    }
}

/// A [`SocketSink`] with the destination half of the handoff: `new`
/// installs the lock, `activate` takes the address over, activates the sockets
/// and then lets the held packets through on a background thread (see
/// [`DestHandoff::release_held`]); `discard` removes the lock.
#[derive(Debug)]
pub struct Handoff<S> {
    inner: S,
    handoff: DestHandoff,
}

impl<S: SocketSink> Handoff<S> {
    /// Wrap `inner`; installs the destination's lock now, in the calling
    /// thread's network namespace (see [`DestHandoff::new`]).
    pub fn new(inner: S, cfg: HandoffConfig) -> Result<Self> {
        Ok(Self {
            inner,
            handoff: DestHandoff::new(cfg)?,
        })
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped sink, mutably (e.g. to take the restored fds).
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The handoff (figures, [`DestHandoff::finish`]).
    pub fn handoff(&mut self) -> &mut DestHandoff {
        &mut self.handoff
    }
}

impl<S: SocketSink> SocketSink for Handoff<S> {
    fn prepare(&mut self, plan: &[SocketPrep]) -> lmig_core::Result<()> {
        self.inner.prepare(plan)
    }

    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        self.inner.restore(batch)
    }

    fn activate(&mut self) -> lmig_core::Result<()> {
        let take = self.handoff.take_over();
        let inner = self.inner.activate();
        let release = self.handoff.release_held();
        take?;
        inner?;
        Ok(release?)
    }

    fn discard(&mut self) {
        self.inner.discard();
        self.handoff.discard();
    }
}

impl crate::NetworkLock for SourceHandoff {
    fn lock(&mut self, _sockets: &[SocketPrep]) -> Result<()> {
        SourceHandoff::lock(self)
    }

    fn unlock(&mut self) -> Result<()> {
        SourceHandoff::unlock(self)
    }

    fn release(&mut self) -> Result<()> {
        self.hand_over()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_messages_carry_prefix_and_nodad() {
        let a = ServiceAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100), 64);
        let m = addr_msg(RTM_NEWADDR, F_REQUEST, 3, &a, 1);
        let b = m.bytes();
        assert_eq!(b[16], libc::AF_INET6 as u8);
        assert_eq!(b[17], 64);
        assert_eq!(u32::from_ne_bytes([b[20], b[21], b[22], b[23]]), 3);
        let attrs: Vec<_> = Attrs::new(&b[24..]).map(|(t, _)| t).collect();
        assert_eq!(attrs, vec![IFA_LOCAL, IFA_ADDRESS, IFA_FLAGS]);
    }
}
