//! One safe function per kernel operation lmig-net uses.
//!
//! Every `unsafe` block of the crate lives here, each with the invariant it
//! relies on. Functions take `BorrowedFd<'_>` and hand out `OwnedFd`; errors
//! are plain [`std::io::Error`]s that the callers wrap into
//! [`crate::NetError`] with the operation and connection they belong to.
//! Generic socket calls go through socket2 and nix; what they do not offer
//! (TCP repair, options by number, the queue ioctls, `pidfd`) is raw.
//!
//! | file | role |
//! |---|---|
//! | `sock` | socket options by number, queue ioctls, peek, send, addresses |
//! | `repair` | TCP repair mode, queues, sequences, options, window, timestamp |
//! | `tcp_info` | `TCP_INFO`, `TCP_MAXSEG` |
//! | `process` | `pidfd`, the fd limit, a thread's CPU time |
//! | `netns` | network namespaces and mounts for the test topology |
//! | `prio` | thread priority |
//! | `mem` | prefaulting memory the freeze fills |
//! | `netlink`, `rtnl`, `nft`, `packet` | netlink sockets and messages, rtnetlink, nftables/NFQUEUE numbers, `AF_PACKET` |
//! | `diag` | `NETLINK_SOCK_DIAG`: UDP sockets and their receive-buffer use, TCP queue bytes |
//!
//! Not default public API: the crate's tests and the benchmark reach it with
//! the feature `bench-internals`.
#![allow(unsafe_code)]

pub(crate) mod diag;
mod errno;
mod mem;
pub(crate) mod netlink;
#[cfg(feature = "test-topology")]
mod netns;
pub(crate) mod nft;
pub(crate) mod packet;
mod prio;
mod process;
mod repair;
pub(crate) mod rtnl;
mod sock;
mod tcp_info;

pub(crate) use mem::prefault_spare;
#[cfg(feature = "test-topology")]
pub(crate) use netns::{bind_mount, detach_mount, make_shared, unshare_net};
#[cfg(feature = "test-topology")]
pub use netns::{command_in_netns, setns_net};
pub use prio::{idle_thread_policy, lowest_thread_priority};
#[cfg(feature = "bench-internals")]
pub use process::thread_cpu_time;
pub use process::{fd_room, pidfd_getfd, pidfd_open, raise_nofile_limit};
pub use repair::{
    RepairMode, TCPOPT_MAXSEG, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP, TCPOPT_WINDOW, TcpQueue,
    TcpRepairOpt, TcpRepairWindowRaw, monotonic_ms, queue_seq, realtime_ms, repair_window,
    set_queue_seq, set_repair_options, set_repair_queue, set_repair_window, set_tcp_timestamp,
    tcp_repair, tcp_timestamp,
};
pub use sock::{
    bind, connect, family_of, getsockopt_int, getsockopt_string, inq, listen, local_addr, outq,
    outq_nsd, peek, peek_from, peek_off, peer_addr, poll_one, send, send_to, set_peek_off,
    setsockopt_int, setsockopt_string, shutdown, socket, socket_cookie,
};
#[cfg(feature = "bench-internals")]
pub use sock::{is_nonblocking, set_nonblocking};
// `TcpInfo` is named by the benchmark only (feature `bench-internals`).
#[cfg_attr(not(feature = "bench-internals"), allow(unused_imports))]
pub use tcp_info::{
    TCP_INFO_NOTSENT_LEN, TCPI_OPT_SACK, TCPI_OPT_TIMESTAMPS, TCPI_OPT_USEC_TS, TCPI_OPT_WSCALE,
    TcpInfo, tcp_info, tcp_info_len, tcp_maxseg,
};
