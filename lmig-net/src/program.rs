//! [`ProgramSockets`]: the [`SocketSource`] of a program that serves its
//! sockets from an event loop, over the small contract the program
//! implements ([`SocketOwner`]: lend the sockets for a look, park the loop
//! and hand them over, take them back).
//!
//! What every such daemon needs, and what it does here:
//!
//! * **plan**, while the loop serves: the sockets are lent for a moment
//!   ([`SocketOwner::lend`]), duplicated, and the duplicates read (kind,
//!   addresses, options) after the loop got them back. A socket that cannot
//!   be duplicated or read now is read at the freeze instead. The
//!   duplicates never take the program's last [`PLAN_FD_RESERVE`] fds: with
//!   less room than sockets the plan lends them again for the rest (a
//!   server with 10,000 connections under a 20,000 limit lends twice).
//! * **freeze**: the loop hands its sockets over ([`SocketOwner::park`]);
//!   only their identity is checked against the plan (on the capture
//!   threads), so the freeze makes no system call per socket here.
//! * **abort**: every socket leaves repair mode and goes back to the loop
//!   ([`SocketOwner::resume`]) with every byte of its queues, a socket the
//!   freeze refused included.
//! * **release**, after `Commit`: the sockets are closed in repair mode
//!   (no FIN, no RST).
//!
//! ## Call order
//!
//! The source session calls, for one attempt: `lend` (from `plan`, before
//! the freeze) — `StateSource::pause` — `park` (from `freeze`) — then
//! either `released` (after `Commit`) or `resume` (after an abort, before
//! `StateSource::resume`). Wrapped in a [`crate::HandoffSource`] the
//! order is the same (the lock is engaged before `park`, lifted after
//! `resume`).

use std::collections::HashSet;
use std::os::fd::{BorrowedFd, OwnedFd};

use lmig_core::model::{SocketPrep, SocketRecord};
use lmig_core::traits::SocketSource;
use lmig_core::{BoxError, MigrationError};

use crate::error::NetError;
use crate::source::{NetSource, NetSourceConfig};
use crate::sys;

/// Fds the plan leaves free while it holds its duplicates: for the
/// program's own accepts (kvd's admin socket, its clients) and lmig's own
/// (channel streams, netlink). The plan duplicates at most the rest at a
/// time, and lends the sockets again for those left over.
pub const PLAN_FD_RESERVE: u64 = 256;

/// The program's side of [`ProgramSockets`]: its event loop can stop using
/// its sockets and hand them over, and serve them again.
///
/// Ids are the program's own (any `u64`, one per socket, the same across
/// `lend`, `park` and `resume`); the destination hands the restored sockets
/// back under them.
pub trait SocketOwner: Send {
    /// At the freeze (after the program's `StateSource::pause`): the loop
    /// stops using its sockets and hands every one over, owned (its own
    /// fds, not duplicates: a server near its open-file limit has no room
    /// for a second fd per socket). If the program's pause parked the loop
    /// already, return what it handed over there. Until `resume` the loop
    /// must not touch them.
    fn park(&mut self) -> Result<Vec<(u64, OwnedFd)>, BoxError>;

    /// After an aborted attempt: serve on with `sockets`, every socket
    /// `park` handed over (same ids, queues intact, out of repair mode).
    /// If the program's `StateSource::resume` (called right after) wakes
    /// the loop, keep them for it.
    fn resume(&mut self, sockets: Vec<(u64, OwnedFd)>) -> Result<(), BoxError>;

    /// Before the freeze, while the program serves: show every socket to
    /// `show` (borrowed) for a moment; [`ProgramSockets`] duplicates each
    /// one there and reads the duplicates after `lend` returns. Called
    /// again, for the sockets not duplicated yet, when the process has
    /// fewer fds to spare than sockets ([`PLAN_FD_RESERVE`]).
    ///
    /// The default parks the loop, shows what it handed over and resumes
    /// it. A program whose `park` only hands over what its
    /// `StateSource::pause` parked must override it (park and wake its loop
    /// itself, or show the fds from wherever it keeps them).
    fn lend(&mut self, show: &mut dyn FnMut(u64, BorrowedFd<'_>)) -> Result<(), BoxError> {
        let sockets = self.park()?;
        for (id, fd) in &sockets {
            show(*id, std::os::fd::AsFd::as_fd(fd));
        }
        self.resume(sockets)
    }

    /// After `Commit`, right before the handed-over sockets are closed (in
    /// repair mode: the peers hear nothing). The program must never serve
    /// them again; nothing to do by default.
    fn released(&mut self) {}
}

/// A [`SocketSource`] over a program's event loop ([`SocketOwner`]); see
/// the module docs for what each step does.
#[derive(Debug)]
pub struct ProgramSockets<O> {
    owner: O,
    cfg: NetSourceConfig,
    /// Planned before the freeze, not yet holding any socket.
    planned: Option<NetSource>,
    /// Holding the sockets from the freeze on.
    net: Option<NetSource>,
    /// Sockets the freeze refused (not TCP or UDP, ids given twice): they go
    /// back to the program with the others at the abort.
    refused: Vec<(u64, OwnedFd)>,
}

fn program_err(what: &'static str, e: BoxError) -> MigrationError {
    MigrationError::backend(what, e)
}

impl<O: SocketOwner> ProgramSockets<O> {
    /// The sockets of `owner`'s loop, captured with `cfg`.
    pub fn new(owner: O, cfg: NetSourceConfig) -> Self {
        Self {
            owner,
            cfg,
            planned: None,
            net: None,
            refused: Vec::new(),
        }
    }

    /// The program's side.
    pub fn owner(&self) -> &O {
        &self.owner
    }

    /// The program's side, mutably.
    pub fn owner_mut(&mut self) -> &mut O {
        &mut self.owner
    }

    /// The sockets handed over at the freeze (until the abort gives them
    /// back), e.g. for [`NetSource::gone`].
    pub fn net(&self) -> Option<&NetSource> {
        self.net.as_ref()
    }

    /// One lend: duplicates (about a microsecond each, read after the loop
    /// got its sockets back) of at most `budget` sockets not in `seen`;
    /// true if some were left for another pass.
    fn lend_dups(
        &mut self,
        seen: &HashSet<u64>,
        budget: usize,
    ) -> lmig_core::Result<(Vec<(u64, OwnedFd)>, bool)> {
        let mut dups = Vec::new();
        let mut more = false;
        self.owner
            .lend(&mut |id, fd| {
                if seen.contains(&id) || more {
                    return;
                }
                if dups.len() >= budget {
                    more = true;
                    return;
                }
                match fd.try_clone_to_owned() {
                    Ok(dup) => dups.push((id, dup)),
                    // Out of fds after all (the program opened some): the
                    // next pass, once these are read and closed.
                    Err(e) if e.raw_os_error() == Some(libc::EMFILE) => more = true,
                    // Read at the freeze.
                    Err(_) => {}
                }
            })
            .map_err(|e| program_err("program sockets (lend)", e))?;
        Ok((dups, more))
    }

    /// Give the sockets of a freeze that cannot go on back to the loop;
    /// returns the error to report.
    fn give_back(&mut self, sockets: Vec<(u64, OwnedFd)>, err: MigrationError) -> MigrationError {
        match self.owner.resume(sockets) {
            Ok(()) => err,
            Err(e) => program_err(
                "program sockets",
                format!("{e} (while giving the sockets back after: {err})").into(),
            ),
        }
    }
}

impl<O: SocketOwner> SocketSource for ProgramSockets<O> {
    fn plan(&mut self) -> lmig_core::Result<Vec<SocketPrep>> {
        let mut net = NetSource::new(self.cfg.clone())?;
        let mut plan = Vec::new();
        let mut seen = HashSet::new();
        // Bounded: a pass that duplicates nothing ends it, and every other
        // one plans sockets not seen before.
        loop {
            let budget = sys::fd_room().map_or(usize::MAX, |room| {
                room.saturating_sub(PLAN_FD_RESERVE) as usize
            });
            let (dups, more) = self.lend_dups(&seen, budget)?;
            if dups.is_empty() {
                break;
            }
            for (id, dup) in dups {
                seen.insert(id);
                // Not planned: read at the freeze instead.
                if let Ok(prep) = net.plan_fd(id, std::os::fd::AsFd::as_fd(&dup)) {
                    plan.push(prep);
                }
            }
            if !more {
                break;
            }
        }
        self.planned = Some(net);
        Ok(plan)
    }

    fn freeze(&mut self) -> lmig_core::Result<()> {
        let sockets = self
            .owner
            .park()
            .map_err(|e| program_err("program sockets (park)", e))?;
        let planned = self.planned.take().map(Ok);
        let net = match planned.unwrap_or_else(|| NetSource::new(self.cfg.clone())) {
            Ok(net) => self.net.insert(net),
            Err(e) => return Err(self.give_back(sockets, e.into())),
        };
        // Every socket is handed over even if one is refused, so that the
        // abort gives them all back; the first refusal fails the freeze.
        let mut first_err: Option<NetError> = None;
        for (id, fd) in sockets {
            if let Err((e, fd)) = net.add_or_return(id, fd) {
                first_err.get_or_insert(e);
                self.refused.push((id, fd));
            }
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(net.freeze_sockets()?),
        }
    }

    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        let net = self.net.as_mut().ok_or(NetError::Phase {
            op: "capture",
            detail: "the program's sockets were not handed over",
        })?;
        net.capture_sockets(emit)
    }

    /// From the plan's sockets (by their cookies, one `sock_diag` dump: the
    /// loop is not asked for its sockets again), 0 before `plan`.
    fn queued_bytes(&mut self) -> lmig_core::Result<u64> {
        match self.planned.as_mut() {
            Some(net) => Ok(net.queued_bytes()?),
            None => Ok(0),
        }
    }

    fn abort(&mut self) -> lmig_core::Result<()> {
        let Some(mut net) = self.net.take() else {
            return Ok(());
        };
        let aborted = net.abort_sockets();
        let mut sockets = net.into_fds();
        sockets.append(&mut self.refused);
        self.owner
            .resume(sockets)
            .map_err(|e| program_err("program sockets (resume)", e))?;
        Ok(aborted?)
    }

    fn release(&mut self) -> lmig_core::Result<()> {
        self.owner.released();
        let net = self.net.as_mut().ok_or(NetError::Phase {
            op: "release",
            detail: "the program's sockets were not handed over",
        })?;
        // Refused sockets never got this far (the freeze failed).
        Ok(net.release_sockets()?)
    }
}
