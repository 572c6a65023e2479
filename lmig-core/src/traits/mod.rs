//! The traits every backend implements. A session is generic over them;
//! `lmig-mem`, `lmig-net` and `lmig-transport` provide the real backends and
//! a program may provide its own.
//!
//! Blanket impls for `&mut T` / `&T` let a caller lend a backend to a session
//! and keep it afterwards: after an aborted migration the program still owns
//! its memory, tracker and sockets, intact.
//!
//! ## When the destination calls what
//!
//! One attempt, in this order (the destination's session thread unless
//! said otherwise):
//!
//! 1. [`MemorySink::prepare`] when `Regions` arrives, then
//!    [`SocketSink::prepare`] with the source's plan, before the freeze;
//! 2. [`MemorySink::write_pages`] / [`MemorySink::zero_pages`] for every
//!    pre-copy and freeze page (from several threads at once);
//! 3. in the freeze, [`SocketSink::restore`] batch by batch (on the
//!    session's `lmig-restore` thread, beside the pages),
//!    [`StateSink::restore`] with the program's state, and
//!    [`MemorySink::begin_postcopy`] if pages are left for after `Commit`;
//!    all before `Ready`;
//! 4. a failure before `Commit`: [`SocketSink::discard`],
//!    [`StateSink::discard`], [`MemorySink::discard`], in that order, and
//!    nothing else;
//! 5. at `Commit`: [`SocketSink::activate`], then [`StateSink::resume`];
//!    then the session hands the program its
//!    [`Resumption`](crate::session::Resumption) (state sink, socket sink,
//!    memory) and goes on on its `lmig-after-commit` thread;
//! 6. after `Commit`, on that thread and its helpers: post-copy
//!    ([`MemorySink::wait_fault`], placements, [`MemorySink::end_postcopy`]),
//!    then [`MemorySink::read_pages`] for the digest check.
//!
//! [`Observer::event`] sees the [`Phase`]s in the order `Setup`,
//! `Precopy(n)`…, `Frozen`, `AwaitReady`, `Committed`, [`Postcopy`](Phase::Postcopy),
//! `Done` — or `Aborted` in place of what follows a failure before `Commit`.
//!
//! The source calls [`StateSource::pause`], [`SocketSource::freeze`] and
//! [`SocketSource::capture`] in the freeze; on a failure before `Commit`
//! (a bound or a cancel included) [`SocketSource::abort`] then
//! [`StateSource::resume`]; after `Commit`, [`StateSource::committed`] then
//! [`SocketSource::release`].

mod channel;
mod forward;
mod memory;
mod observer;
mod program;
mod sockets;

pub use channel::Channel;
pub use memory::{DirtyClearer, DirtyTracker, MemorySink, MemorySource, PageResidency};
pub use observer::{Event, NoObserver, Observer, Phase};
pub use program::{StateSink, StateSource};
pub use sockets::{NoSockets, SocketSink, SocketSource};
