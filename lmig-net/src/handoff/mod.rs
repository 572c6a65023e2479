//! Lossless network handoff: the service addresses move from the source
//! host to the destination host while packets sent to them are held, never
//! dropped, and no client waits for a retransmission timeout.
//!
//! # Design
//!
//! Both hosts run a [`NetLock`](crate::lock::NetLock) on the service
//! addresses (NFQUEUE at `prerouting`, so a packet is held whether or not
//! the address is still local).
//!
//! ```text
//! source (HandoffSource<S>)                   destination (HandoffSink<S>)
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
//!  abort: S::abort (repair off), ACCEPT held   discard: S::discard, flush set,
//!         in order as the sockets have room             delete table (copies sent
//!         (the rest on a thread while the               early go with it); the
//!         program reads), flush set, delete             address was never added
//!         table: the source serves on
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
//!
//! # Files
//!
//! `config` (settings and figures) sits below everything;
//! `addr` (address and neighbour operations, messages from
//! `sys::rtnl`), `announce` ([`Announcer`]), `reinject`
//! ([`Reinjector`]) and `release` (the paced release of held packets on a
//! thread) below the two sides, `source` ([`SourceHandoff`],
//! [`HandoffSource`]) and `dest` ([`DestHandoff`], [`HandoffSink`]), which
//! do not import each other.

mod addr;
mod announce;
mod config;
mod dest;
mod reinject;
mod release;
mod source;

pub use addr::{
    add_address, addresses, link_address, neighbour_address, remove_address, resolve_neighbour,
};
pub use announce::Announcer;
pub use config::{HandoffConfig, HandoffStats, ServiceAddr};
pub use dest::{DestHandoff, HandoffSink};
pub use reinject::Reinjector;
pub use source::{HandoffSource, SourceHandoff};

/// The source-side adapter under its old name.
#[deprecated(note = "renamed `HandoffSource`: the name says which side it serves")]
pub type Locked<S> = HandoffSource<S>;

/// The destination-side adapter under its old name.
#[deprecated(note = "renamed `HandoffSink`: the name says which side it serves")]
pub type Handoff<S> = HandoffSink<S>;
