//! Sockets: captured at the source, restored at the destination.

use crate::error::{MigrationError, Result};
use crate::model::{SocketPrep, SocketRecord};

/// The program's sockets on the source.
pub trait SocketSource: Send {
    /// Sockets the destination may prepare before the freeze.
    fn plan(&mut self) -> Result<Vec<SocketPrep>> {
        Ok(Vec::new())
    }

    /// The IP addresses that move to the destination with the sockets (the
    /// service addresses a network lock holds at the freeze). The session
    /// refuses to migrate over a channel using one of them
    /// ([`MigrationError::ChannelOnMovedAddress`]): the lock would hold the
    /// channel's own traffic. Empty (the default) when no address moves.
    fn moved_addresses(&self) -> Vec<std::net::IpAddr> {
        Vec::new()
    }

    /// At the freeze: stop the kernel from answering for the sockets (network
    /// lock) and put them in repair mode. Must not lose incoming packets.
    fn freeze(&mut self) -> Result<()> {
        Ok(())
    }

    /// Capture every socket, handing records to `emit` batch by batch so the
    /// destination can restore batch k while batch k+1 is captured.
    fn capture(&mut self, emit: &mut dyn FnMut(Vec<SocketRecord>) -> Result<()>) -> Result<()>;

    /// Before the freeze, after each pre-copy round: the bytes now queued in
    /// the sockets (received and unread, sent and unacknowledged, unsent),
    /// which the freeze will carry besides the dirty pages. The convergence
    /// policy counts them in the estimated freeze
    /// ([`crate::policy::RoundStats::queued_bytes`]); an implementation may
    /// also get ready to capture that much. An estimate: 0 (the default)
    /// when unknown.
    fn queued_bytes(&mut self) -> Result<u64> {
        Ok(0)
    }

    /// The migration failed before `Commit`: leave repair mode, unlock, keep serving.
    fn abort(&mut self) -> Result<()>;

    /// After `Commit`: close the sockets without FIN or RST, hand the service
    /// address and any held packets over to the destination.
    fn release(&mut self) -> Result<()>;
}

/// The program's sockets on the destination.
///
/// Order: `prepare` (before the freeze), `restore` (each batch, in the
/// freeze), then `activate` at `Commit` — after which the program takes its
/// sockets from the sink in the [`Resumption`](crate::session::Resumption) —
/// or `discard` if the attempt failed. See [the module docs](crate::traits).
pub trait SocketSink: Send {
    /// Before the freeze: create sockets, enter repair mode, set options, bind.
    fn prepare(&mut self, plan: &[SocketPrep]) -> Result<()> {
        let _ = plan;
        Ok(())
    }

    /// Restore one batch (in repair mode; not yet talking to peers).
    ///
    /// Records come from the peer: validate each one
    /// ([`SocketRecord::validate`]), restore the valid ones, and report the
    /// invalid ones by name. Returning `Err` aborts the migration (before
    /// `Commit`); a sink may instead tolerate bad records and keep them for
    /// its own report.
    fn restore(&mut self, batch: Vec<SocketRecord>) -> Result<()>;

    /// After `Commit`: leave repair mode, take over the address, release held packets.
    fn activate(&mut self) -> Result<()>;

    /// The migration failed before `Commit`: close everything restored, silently.
    fn discard(&mut self);
}

/// A program without sockets to move.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSockets;

impl SocketSource for NoSockets {
    fn capture(&mut self, _emit: &mut dyn FnMut(Vec<SocketRecord>) -> Result<()>) -> Result<()> {
        Ok(())
    }
    fn abort(&mut self) -> Result<()> {
        Ok(())
    }
    fn release(&mut self) -> Result<()> {
        Ok(())
    }
}

impl SocketSink for NoSockets {
    fn restore(&mut self, batch: Vec<SocketRecord>) -> Result<()> {
        match batch.first() {
            None => Ok(()),
            Some(_) => Err(MigrationError::Unsupported {
                feature: "socket migration",
                needs: "a SocketSink on the destination (lmig-net); the source sent sockets",
            }),
        }
    }
    fn activate(&mut self) -> Result<()> {
        Ok(())
    }
    fn discard(&mut self) {}
}
