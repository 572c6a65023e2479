//! The address and neighbour operations of the handoff, over rtnetlink
//! (`NETLINK_ROUTE`): what `ip address add/del`, `ip address show`,
//! `ip link show` and `ip neighbour get` send. The messages are built in
//! [`crate::sys::rtnl`]; errors here name the operation and the address.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::config::ServiceAddr;
use crate::error::{NetError, Result};
use crate::sys::netlink::{F_ACK, F_CREATE, F_DUMP, F_REPLACE, F_REQUEST, MsgBuf, NlSocket};
use crate::sys::rtnl::{
    self, IFA_ADDRESS, IFA_LOCAL, IFLA_ADDRESS, NDA_DST, NDA_LLADDR, NTF_USE, NUD_VALID,
    RTM_DELADDR, RTM_GETADDR, RTM_GETNEIGH, RTM_NEWADDR, RTM_NEWNEIGH, addr_msg, get_link_attrs,
    ifaddrmsg, neigh_msg, parse_ifaddrmsg, parse_ndmsg,
};

pub(super) fn if_index(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|e| NetError::sys("if_nametoindex", name.to_string(), e.into()))
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

pub(super) fn route_socket() -> Result<NlSocket> {
    NlSocket::route().map_err(|e| NetError::sys("netlink socket", "NETLINK_ROUTE", e))
}

pub(super) fn add_address_with(nl: &mut NlSocket, ifindex: u32, addr: &ServiceAddr) -> Result<()> {
    let seq = nl.next_seq();
    let flags = F_REQUEST | F_ACK | F_CREATE | F_REPLACE;
    let m = addr_msg(RTM_NEWADDR, flags, ifindex, addr.addr, addr.prefix_len, seq);
    nl.transact(m.bytes(), 1).map_err(|e| {
        NetError::sys(
            "RTM_NEWADDR",
            format!("{}/{}", addr.addr, addr.prefix_len),
            e,
        )
    })
}

pub(super) fn remove_address_with(
    nl: &mut NlSocket,
    ifindex: u32,
    addr: &ServiceAddr,
) -> Result<()> {
    let seq = nl.next_seq();
    let m = addr_msg(
        RTM_DELADDR,
        F_REQUEST | F_ACK,
        ifindex,
        addr.addr,
        addr.prefix_len,
        seq,
    );
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
pub(super) fn wait_local(nl: &mut NlSocket, addr: IpAddr, timeout: Duration) -> Result<()> {
    rtnl::wait_local(nl, addr, timeout).map_err(|e| {
        NetError::sys(
            "RTM_GETROUTE",
            format!("{addr} (not local after it was added)"),
            e,
        )
    })
}

/// `RTM_GETLINK`: the link-layer (MAC) address of interface `ifindex`.
#[doc(alias = "RTM_GETLINK")]
pub fn link_address(ifindex: u32) -> Result<[u8; 6]> {
    let mut mac = None;
    get_link_attrs(&mut route_socket()?, ifindex, |t, v| {
        if t == IFLA_ADDRESS {
            mac = <[u8; 6]>::try_from(v).ok().or(mac);
        }
    })
    .map_err(|e| NetError::sys("RTM_GETLINK", format!("interface {ifindex}"), e))?;
    mac.ok_or(NetError::NotMigratable {
        what: format!("interface {ifindex}"),
        reason: "it has no Ethernet address to announce the service address from".into(),
    })
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
