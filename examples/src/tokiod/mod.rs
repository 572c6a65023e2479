//! tokiod: a key-value service on a tokio runtime, one task per connection,
//! whose data lives in an lmig region and which migrates itself live to
//! another host. It is the second daemon built on lmig's public API, beside
//! kvd, and speaks the same RESP subset, admin commands and event lines, so
//! the scenario behind `lmig-bench migrate` drives either (`--server tokio`).
//!
//! How it meets lmig:
//!
//! * **Park** ([`service::Control::park`]): a watch switch asks every
//!   connection task to stop; each hands back its socket
//!   (`tokio::net::TcpStream::into_std`, which leaves the runtime's poller)
//!   and its buffered bytes, and the acceptor hands back the listener. A
//!   task serves what it read before it waits again (no `.await` between a
//!   read and its replies), so the buffers it hands back are only a
//!   request's unfinished part and replies the socket did not take yet:
//!   they travel in the program state.
//! * **Abort** ([`service::Control::resume`]): the same sockets are adopted
//!   again (`from_std`) as new tasks, their buffers served first.
//! * **Commit**, at the destination: the restored sockets
//!   ([`lmig_net::NetSink::take_restored`]) become tasks on the runtime,
//!   the listener an acceptor.
//!
//! The runtime has one thread (`current_thread`): the store is a
//! single-writer table in migrated memory, as kvd's loop uses it, and two
//! vCPUs are better spent on the migration's own threads than on a second
//! worker stealing tasks.

pub mod cli;
pub mod commands;
pub mod dirtier;
pub mod migrate;
pub mod service;
pub mod state;
