//! # lmig-net
//!
//! Socket capture and restore for live migration: established TCP
//! connections (IPv4 and IPv6, half-closed ones included), TCP listeners and
//! UDP sockets move from one host to another without the peers noticing.
//!
//! * [`NetSource`] implements [`lmig_core::traits::SocketSource`]: the program
//!   hands over its sockets (owned fds with its own ids, or fds taken from
//!   another process with [`take_fd_from_process`]); at the freeze they enter
//!   TCP repair mode, are captured in batches on several threads without
//!   consuming anything, and are closed in repair mode (no FIN, no RST) after
//!   `Commit` — or leave repair mode and keep serving after an abort.
//! * [`NetSink`] implements [`lmig_core::traits::SocketSink`]: before the
//!   freeze it creates, puts in repair mode and binds a socket for every
//!   planned connection; during the freeze it restores batch k while the
//!   source captures batch k+1; after `Commit` it activates them and hands
//!   them back by id, typed ([`NetSink::take_restored`]: `TcpStream`,
//!   `TcpListener`, `UdpSocket`) or as fds ([`NetSink::take_fds`]). An event
//!   loop can register each one with its poller as soon as it exists
//!   ([`NetSink::on_register`], borrowed fds). With
//!   [`SinkConfig::unsent_in_background`] the bytes a connection never
//!   sent are written after activation, while the program runs, behind
//!   the [`UnsentTails`] gate (the program writes nothing to a connection
//!   it says is pending).
//! * [`ProgramSockets`] is the source side of a program that serves its
//!   sockets from an event loop: it implements [`SocketOwner`] (lend the
//!   sockets for a look, park the loop and hand them over, take them back),
//!   and the adapter plans from duplicates while the loop serves, takes the
//!   sockets at the freeze and gives every one back on abort.
//! * `topology` (feature `test-topology`): network namespaces for tests
//!   and demos.
//! * [`lock`] and [`handoff`]: the network lock (one nftables table per
//!   family, packets held in NFQUEUE, never dropped) and the service-address
//!   handoff; [`HandoffSource`] / [`HandoffSink`] wrap any `SocketSource` /
//!   `SocketSink`. Held packets are released in order, paced by the room in
//!   the UDP sockets' receive buffers ([`lock::InOrder`]);
//!   [`HandoffConfig::check_channel`] refuses a migration channel over a
//!   service address that moves.
//! * [`probe()`]: what this kernel and these privileges offer for TCP
//!   repair, the network lock, raw and packet sockets and `pidfd_getfd`, one
//!   [`lmig_core::probe::Verdict`] each naming the fix when missing
//!   (`lmig_mem::probe` gives the memory part).
//!
//! ## Guarantees
//!
//! * Nothing is read out of a source socket: queues are peeked, so an abort
//!   loses no byte and no datagram.
//! * Repair mode is held by RAII ([`RepairGuard`], and [`NetSource`]'s `Drop`):
//!   every error path before `Commit` leaves it.
//! * An impossible record is rejected with an error naming the connection;
//!   the rest of the batch is restored ([`NetError::Partial`]).
//! * No per-connection process, firewall rule or netlink round trip: a
//!   connection costs a fixed number of system calls on each side.
//!
//! ## Non-goals
//!
//! The network lock and the address handoff (packets held during the freeze,
//! the service address moving) are issue 6; [`NetworkLock`] is the hook it
//! plugs into. Unix sockets, raw sockets, SCTP and TCP-AO/MD5 are not moved.
//! File status flags (`O_NONBLOCK`) are not part of the record: restored
//! sockets are blocking unless [`SinkConfig::nonblocking`] asks otherwise.
//!
//! ## Kernel requirements
//!
//! Linux >= 4.13 (`TCP_REPAIR_WINDOW`, `TCP_REPAIR_OFF_NO_WP`); `SO_PEEK_OFF`
//! on UDP (>= 4.1); `pidfd_getfd` (>= 5.6) for [`take_fd_from_process`].
//! `CAP_NET_ADMIN` in the sockets' network namespace on both hosts (repair
//! mode, raw sockets for injected FINs and datagrams, `IP_TRANSPARENT`).
//!
//! ## Stable types
//!
//! Settings (`…Config`, `…Options`) are `#[non_exhaustive]` structs with
//! public fields: build one from `Default::default()` (or from its `new`
//! when some values are required) and chain its `#[must_use]`
//! `with_<field>` setters. Reports, statistics, events and the enums that
//! may grow (errors, phases, modes, outcomes, verdicts) are
//! `#[non_exhaustive]` too: read their fields, match them with a `_` arm.
//! A field or variant added later is then no breaking change. The
//! protocol's messages and records (lmig-core's `model`, `protocol` and
//! `split`, lmig-transport's handshake messages) stay exhaustive: a
//! variant added there is a new protocol version.
//!
//! ## Example
//!
//! ```no_run
//! use lmig_core::traits::{SocketSink, SocketSource};
//! use lmig_net::{NetSink, NetSource, NetSourceConfig, SinkConfig};
//! # fn conn() -> std::net::TcpStream { unimplemented!() }
//! // Source: hand the program's connection over under id 7.
//! let mut src = NetSource::new(NetSourceConfig::default())?;
//! src.add(7, conn().into())?;
//! // Destination (another host; here the same process for brevity).
//! let mut dst = NetSink::new(SinkConfig::default())?;
//! dst.prepare(&src.plan()?)?;           // before the freeze
//! src.freeze()?;                        // repair mode
//! let mut batches = Vec::new();
//! src.capture(&mut |b| { batches.push(b); Ok(()) })?;
//! src.release()?;                       // after Commit; frees the 4-tuple here
//! for b in batches { dst.restore(b)?; }
//! dst.activate()?;
//! let fds = dst.take_fds();             // id -> OwnedFd
//! let stream = std::net::TcpStream::from(fds.into_iter().next().unwrap().1);
//! # let _ = stream;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]

// First: its macros (`debug!`, `info!`, `warn!`, `error!`, `phase_span!`)
// are in scope in every module below.
#[macro_use]
mod log;

mod arena;
mod error;
mod fd;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod handoff;
mod inject;
mod listen;
pub mod lock;
mod opts;
mod probe;
mod program;
mod repair;
mod restored;
mod sink;
mod source;
#[cfg(feature = "bench-internals")]
pub mod sys;
#[cfg(not(feature = "bench-internals"))]
pub(crate) mod sys;
pub mod tcp;
#[cfg(feature = "test-topology")]
pub mod topology;
mod udp;
mod unsent;

pub use error::{NetError, Result, SocketFailure};
pub use fd::take_fd_from_process;
#[allow(deprecated)]
pub use handoff::{Handoff, Locked};
pub use handoff::{HandoffConfig, HandoffSink, HandoffSource, ServiceAddr};
pub use probe::probe;
pub use program::{PLAN_FD_RESERVE, ProgramSockets, SocketOwner};
pub use repair::{RepairExit, RepairGuard};
pub use restored::{RestoredSocket, SocketView};
pub use sink::{NetSink, SinkConfig};
#[allow(deprecated)]
pub use source::SourceConfig;
pub use source::{NetSource, NetSourceConfig, NetworkLock};
pub use sys::{lowest_thread_priority, raise_nofile_limit};
pub use unsent::UnsentTails;
