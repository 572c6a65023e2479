//! `AF_PACKET` sockets: sending a link-layer frame (a gratuitous ARP, a held
//! IP packet forwarded to the destination host) out of one interface.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `ETH_P_ARP`.
pub(crate) const ETH_P_ARP: u16 = 0x0806;
/// `ETH_P_IP`.
pub(crate) const ETH_P_IP: u16 = 0x0800;
/// `ETH_P_IPV6`.
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;

/// `socket(AF_PACKET, SOCK_DGRAM, htons(protocol))`: the kernel adds the
/// Ethernet header from the address given to [`send_to`]. With protocol 0
/// the socket only sends (it receives nothing).
#[doc(alias = "AF_PACKET")]
pub(crate) fn packet_dgram_socket(protocol: u16) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(protocol.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor returned by socket() and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sendto(2)` of `payload` to the link-layer broadcast address
/// (ff:ff:ff:ff:ff:ff) of interface `ifindex`, as EtherType `protocol`.
pub(crate) fn send_to_broadcast(
    fd: BorrowedFd<'_>,
    ifindex: u32,
    protocol: u16,
    payload: &[u8],
) -> io::Result<()> {
    send_to(fd, ifindex, protocol, [0xff; 6], payload)
}

/// `sendto(2)` of `payload` to link-layer address `mac` on interface
/// `ifindex`, as EtherType `protocol`.
pub(crate) fn send_to(
    fd: BorrowedFd<'_>,
    ifindex: u32,
    protocol: u16,
    mac: [u8; 6],
    payload: &[u8],
) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&mac);
    // SAFETY: payload is a valid readable slice for its length; sll is a
    // fully initialised sockaddr_ll whose size is passed alongside.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
