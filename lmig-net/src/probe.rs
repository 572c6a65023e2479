//! lmig-net's part of the kernel probe: TCP repair, the network lock, raw
//! and packet sockets and `pidfd_getfd`, as [`lmig_core::probe`] verdicts.
//!
//! Each check works on fresh sockets of its own, in the calling thread's
//! network namespace, and closes them before returning; the lock check
//! installs a lock for documentation addresses and removes it again. The
//! probe leaves no fd and no nftables table behind, and never panics.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use lmig_core::probe::{Capability, Report, Verdict};

use crate::error::NetError;
use crate::sys::{self, RepairMode};

/// The remedy for a refused privileged socket operation.
const NET_ADMIN_FIX: &str =
    "run as root or grant CAP_NET_ADMIN (in the sockets' network namespace)";
/// The remedy for a refused raw or packet socket.
const NET_RAW_FIX: &str = "run as root or grant CAP_NET_RAW";

/// Probe the network side on this kernel, for this process's privileges, in
/// the calling thread's network namespace: [`Capability::TcpRepair`],
/// [`Capability::NetworkLock`], [`Capability::RawSockets`],
/// [`Capability::PacketSockets`] and [`Capability::PidfdGetfd`].
///
/// The lock check removes lock tables of dead processes first, as
/// [`crate::lock::NetLock::install`] does.
#[must_use = "the report is the probe's only output"]
pub fn probe() -> Report {
    let mut report = Report::new();
    report.push(Capability::TcpRepair, tcp_repair());
    report.push(Capability::NetworkLock, network_lock());
    report.push(Capability::RawSockets, raw_sockets());
    report.push(Capability::PacketSockets, packet_sockets());
    report.push(Capability::PidfdGetfd, pidfd_getfd());
    report
}

fn refused(what: &str, e: &io::Error) -> String {
    format!("{what} refused ({e})")
}

fn is_eperm(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

fn tcp_repair() -> Verdict {
    let fd = match sys::socket(libc::AF_INET, libc::SOCK_STREAM, 0) {
        Ok(fd) => fd,
        Err(e) => {
            return Verdict::missing(
                refused("socket(AF_INET, SOCK_STREAM)", &e),
                "a kernel with IPv4 TCP",
            );
        }
    };
    if let Err(e) = sys::tcp_repair(fd.as_fd(), RepairMode::On) {
        let fix = if is_eperm(&e) {
            NET_ADMIN_FIX
        } else {
            "Linux >= 3.5 with TCP_REPAIR"
        };
        return Verdict::missing(refused("TCP_REPAIR on a fresh socket", &e), fix);
    }
    if let Err(e) = sys::repair_window(fd.as_fd()) {
        return Verdict::missing(
            refused("TCP_REPAIR_WINDOW", &e),
            "Linux >= 4.13 for TCP_REPAIR_WINDOW",
        );
    }
    // The socket was never connected: closing it sends nothing.
    Verdict::ok("TCP_REPAIR and TCP_REPAIR_WINDOW on a fresh socket")
}

/// The remedy a lock error names.
fn lock_fix(e: &NetError) -> &'static str {
    match e {
        NetError::Unsupported { needs, .. } if needs.contains("CAP_NET_ADMIN") => NET_ADMIN_FIX,
        NetError::Unsupported { needs, .. } if needs.contains("NFT_COMPAT") => {
            "modprobe nft_compat xt_NFQUEUE (CONFIG_NFT_COMPAT, CONFIG_NETFILTER_XT_TARGET_NFQUEUE)"
        }
        NetError::Unsupported { .. } => {
            "modprobe nf_tables nfnetlink_queue (CONFIG_NF_TABLES, CONFIG_NETFILTER_NETLINK_QUEUE)"
        }
        _ => {
            "run as root; modprobe nf_tables nft_compat xt_NFQUEUE nfnetlink_queue \
             (CONFIG_NF_TABLES, CONFIG_NFT_COMPAT, CONFIG_NETFILTER_XT_TARGET_NFQUEUE, \
             CONFIG_NETFILTER_NETLINK_QUEUE)"
        }
    }
}

fn network_lock() -> Verdict {
    match crate::lock::probe() {
        Ok(()) => Verdict::ok(
            "nftables table with an NFQUEUE rule (nft_compat + xt_NFQUEUE) installed and \
             removed; NFQUEUE bound (nfnetlink_queue)",
        ),
        Err(e) => {
            let fix = lock_fix(&e);
            Verdict::missing(e.to_string(), fix)
        }
    }
}

fn raw_sockets() -> Verdict {
    let r = sys::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
    socket_verdict(
        r.map(drop),
        "socket(AF_INET, SOCK_RAW, IPPROTO_RAW)",
        "a kernel with raw IP sockets",
    )
}

fn packet_sockets() -> Verdict {
    let r = sys::packet::packet_dgram_socket(0);
    socket_verdict(
        r.map(drop),
        "socket(AF_PACKET, SOCK_DGRAM)",
        "modprobe af_packet (CONFIG_PACKET)",
    )
}

/// A raw or packet socket's verdict: refused for want of `CAP_NET_RAW`, or
/// for want of `kernel` (any other error).
fn socket_verdict(opened: io::Result<()>, call: &str, kernel: &str) -> Verdict {
    match opened {
        Ok(()) => Verdict::ok(call),
        Err(e) if is_eperm(&e) => Verdict::missing(refused(call, &e), NET_RAW_FIX),
        Err(e) => Verdict::missing(refused(call, &e), kernel),
    }
}

fn pidfd_getfd() -> Verdict {
    let fix = |e: &io::Error| {
        if e.raw_os_error() == Some(libc::ENOSYS) {
            "Linux >= 5.6 for pidfd_open and pidfd_getfd"
        } else {
            "a kernel allowing pidfd_getfd on the own process (a security module may refuse it)"
        }
    };
    let pidfd = match sys::pidfd_open(std::process::id() as i32) {
        Ok(fd) => fd,
        Err(e) => return Verdict::missing(refused("pidfd_open", &e), fix(&e)),
    };
    // Any fd of ours will do: the pidfd itself.
    match sys::pidfd_getfd(pidfd.as_fd(), pidfd.as_raw_fd()) {
        Ok(_dup) => Verdict::ok(
            "pidfd_getfd on the own process; taking another process's socket also needs \
             ptrace access to it (same user, or CAP_SYS_PTRACE)",
        ),
        Err(e) => Verdict::missing(refused("pidfd_getfd", &e), fix(&e)),
    }
}

#[cfg(test)]
mod tests {
    use lmig_core::probe::Status;

    use super::*;

    #[test]
    fn lock_fix_names_the_module_or_privilege() {
        let unsupported = |needs| NetError::Unsupported {
            feature: "network lock (nftables + NFQUEUE)",
            needs,
        };
        assert_eq!(
            lock_fix(&unsupported(
                "CAP_NET_ADMIN in the host's network namespace"
            )),
            NET_ADMIN_FIX
        );
        assert!(
            lock_fix(&unsupported(
                "CONFIG_NF_TABLES and CONFIG_NETFILTER_NETLINK_QUEUE"
            ))
            .contains("modprobe nf_tables nfnetlink_queue")
        );
        assert!(
            lock_fix(&unsupported(
                "CONFIG_NFT_COMPAT with CONFIG_NETFILTER_XT_TARGET_NFQUEUE"
            ))
            .contains("modprobe nft_compat xt_NFQUEUE")
        );
        let other = NetError::sys(
            "nftables lock install",
            "t",
            io::Error::from_raw_os_error(libc::EINVAL),
        );
        assert!(lock_fix(&other).contains("nfnetlink_queue"));
    }

    #[test]
    fn socket_verdicts_tell_privilege_from_kernel() {
        let v = socket_verdict(Ok(()), "socket(AF_PACKET, SOCK_DGRAM)", "k");
        assert_eq!(v.status(), Status::Ok);
        let v = socket_verdict(
            Err(io::Error::from_raw_os_error(libc::EPERM)),
            "socket(X)",
            "k",
        );
        assert_eq!(v.status(), Status::Missing);
        assert_eq!(v.fix(), Some(NET_RAW_FIX));
        assert!(v.to_string().starts_with("socket(X) refused ("), "{v}");
        let v = socket_verdict(
            Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
            "socket(AF_PACKET, SOCK_DGRAM)",
            "modprobe af_packet (CONFIG_PACKET)",
        );
        assert_eq!(v.fix(), Some("modprobe af_packet (CONFIG_PACKET)"));
    }
}
