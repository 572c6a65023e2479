//! [`NetSink`]: the program's sockets on the destination host, an
//! implementation of [`SocketSink`].

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use lmig_core::model::{SocketKind, SocketPrep, SocketRecord, TcpListenState, UdpSockState};
use lmig_core::traits::SocketSink;

use crate::error::{NetError, Result, SocketFailure};
use crate::inject::Injector;
use crate::opts::Defaults;
use crate::repair::RepairExit;
use crate::restored::{Register, RestoredSocket, SocketView};
use crate::sys;
use crate::tcp::{self, PendingActivation};
use crate::udp::{self, RestoredUdp};
use crate::unsent::{Tail, UnsentTails, UnsentWriter};

mod config;
mod prepared;
mod split;

pub use config::SinkConfig;
use prepared::{Prepared, clock_fits, prepare_conn};
use split::{split_in_place, split_work};

#[derive(Debug)]
enum Restored {
    Tcp {
        id: u64,
        fd: OwnedFd,
        pending: PendingActivation,
        /// The socket is the one `prepare` made (listed by `prepared_fds`).
        prepared: bool,
    },
    Listen {
        fd: OwnedFd,
        state: Box<TcpListenState>,
    },
    Udp {
        r: RestoredUdp,
        state: Box<UdpSockState>,
    },
}

impl Restored {
    fn id(&self) -> u64 {
        match self {
            Self::Tcp { id, .. } => *id,
            Self::Listen { state, .. } => state.id,
            Self::Udp { state, .. } => state.id,
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp { fd, .. } | Self::Listen { fd, .. } => fd.as_fd(),
            Self::Udp { r, .. } => r.fd.as_fd(),
        }
    }

    fn kind(&self) -> SocketKind {
        match self {
            Self::Tcp { .. } => SocketKind::TcpEstablished,
            Self::Listen { .. } => SocketKind::TcpListen,
            Self::Udp { .. } => SocketKind::Udp,
        }
    }

    fn view(&self) -> SocketView<'_> {
        SocketView {
            id: self.id(),
            kind: self.kind(),
            fd: self.fd(),
            prepared: self.was_prepared(),
        }
    }

    fn was_prepared(&self) -> bool {
        matches!(self, Self::Tcp { prepared: true, .. })
    }

    fn into_fd(self) -> (u64, OwnedFd) {
        match self {
            Self::Tcp { id, fd, .. } => (id, fd),
            Self::Listen { fd, state } => (state.id, fd),
            Self::Udp { r, state } => (state.id, r.fd),
        }
    }
}

/// The program's sockets on the destination.
///
/// * `prepare` (before the freeze): for every established connection of the
///   plan, `socket`, repair mode, `bind` and the options the plan carries
///   (`TCP_NODELAY`, keep-alive, ...); nothing of the frozen state is
///   needed. In the freeze a record whose options differ from its plan's
///   (changed by the program after the plan) gets a new socket instead.
/// * `restore` (per batch, during the freeze): records are validated
///   ([`SocketRecord::validate`]); an impossible record is rejected with an
///   error naming the connection and the others are restored. Sockets stay in
///   repair mode: the peers hear nothing.
///   Whatever can refuse is done here, before `Commit`: listeners bind and
///   listen, UDP sockets bind (see [`crate::tcp`]).
/// * `activate` (after `Commit`): received FINs and pending datagrams are
///   injected, repair mode is left, never-sent bytes written.
/// * `discard`: every restored socket is closed in repair mode, silently.
///
/// Then [`NetSink::take_restored`] gives the program its sockets back by id,
/// typed ([`RestoredSocket`]), or [`NetSink::take_fds`] as plain fds.
///
/// A program with a poller can register every socket before it is handed
/// out: [`NetSink::on_register`] shows each one, borrowed, as soon as it
/// exists (the prepared ones right after `prepare`, before the freeze; the
/// others as `activate` starts).
pub struct NetSink {
    cfg: SinkConfig,
    defaults: Defaults,
    prepared: HashMap<u64, Prepared>,
    restored: Vec<Restored>,
    seen: HashSet<u64>,
    ready: HashMap<u64, OwnedFd>,
    /// Kinds of the ready sockets that are not established connections.
    ready_kinds: HashMap<u64, SocketKind>,
    register: Option<Register>,
    failures: Vec<SocketFailure>,
    /// With [`SinkConfig::unsent_in_background`]: the gate, and the writer
    /// once activation started it.
    tails: Option<UnsentTails>,
    writer: Option<UnsentWriter>,
}

impl std::fmt::Debug for NetSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetSink")
            .field("prepared", &self.prepared.len())
            .field("restored", &self.restored.len())
            .field("ready", &self.ready.len())
            .field("failures", &self.failures.len())
            .finish()
    }
}

fn fail(id: u64, e: NetError) -> SocketFailure {
    SocketFailure {
        id,
        error: Box::new(e),
    }
}

impl NetSink {
    /// An empty sink; probes a fresh socket's default options in the calling
    /// thread's network namespace.
    pub fn new(cfg: SinkConfig) -> Result<Self> {
        let tails = match cfg.unsent_in_background {
            true => Some(UnsentTails::new()?),
            false => None,
        };
        Ok(Self {
            tails,
            writer: None,
            cfg,
            defaults: Defaults::probe()?,
            prepared: HashMap::new(),
            restored: Vec::new(),
            seen: HashSet::new(),
            ready: HashMap::new(),
            ready_kinds: HashMap::new(),
            register: None,
            failures: Vec::new(),
        })
    }

    /// Extra `socket(2)` type flags for restored sockets.
    fn socket_flags(&self) -> i32 {
        if self.cfg.nonblocking {
            libc::SOCK_NONBLOCK
        } else {
            0
        }
    }

    /// Prepare, as [`SocketSink::prepare`]. A socket that cannot be prepared
    /// is simply created at restore; a missing privilege fails at once.
    pub fn prepare_sockets(&mut self, plan: &[SocketPrep]) -> Result<()> {
        // The freeze fills these: sized now, they do not grow (copying
        // into memory fresh from the kernel) while the program is paused.
        self.restored.reserve(plan.len());
        sys::prefault_spare(&mut self.restored);
        self.seen.reserve(plan.len());
        self.ready.reserve(plan.len());
        for p in plan.iter().filter(|p| p.kind == SocketKind::TcpEstablished) {
            if self.prepared.contains_key(&p.id) {
                continue;
            }
            match prepare_conn(p, &self.defaults, self.socket_flags()) {
                Ok((fd, clock)) => {
                    if let Some(register) = &mut self.register {
                        register(SocketView {
                            id: p.id,
                            kind: SocketKind::TcpEstablished,
                            fd: fd.as_fd(),
                            prepared: true,
                        });
                    }
                    let opts = Box::new((p.sock.clone(), p.tcp.clone()));
                    self.prepared.insert(p.id, Prepared { fd, opts, clock });
                }
                Err(e @ NetError::Unsupported { .. }) => return Err(e),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Restore one batch, as [`SocketSink::restore`].
    pub fn restore_batch(&mut self, batch: Vec<SocketRecord>) -> Result<()> {
        let total = batch.len();
        let mut work = Vec::with_capacity(batch.len());
        let mut failures = Vec::new();
        for rec in batch {
            let id = rec.id();
            if let Err(e) = rec.validate() {
                failures.push(fail(id, NetError::InvalidRecord(e)));
                continue;
            }
            if !self.seen.insert(id) {
                failures.push(fail(
                    id,
                    NetError::BadId {
                        id,
                        detail: "restored twice",
                    },
                ));
                continue;
            }
            let prepared = match &rec {
                SocketRecord::Tcp(_) => self.prepared.remove(&id),
                _ => None,
            };
            work.push((rec, prepared));
        }
        let (defaults, flags) = (&self.defaults, self.socket_flags());
        let results = split_work(work, self.cfg.threads, |(rec, prepared), _inj| {
            let id = rec.id();
            restore_one(rec, prepared, defaults, flags).map_err(|e| fail(id, e))
        });
        for r in results {
            match r {
                Ok(x) => self.restored.push(x),
                Err(f) => {
                    // A failed id may be sent again (e.g. fixed), so forget it.
                    self.seen.remove(&f.id);
                    failures.push(f)
                }
            }
        }
        self.finish(total, failures)
    }

    fn finish(&mut self, total: usize, failures: Vec<SocketFailure>) -> Result<()> {
        if failures.is_empty() {
            return Ok(());
        }
        if self.cfg.tolerate_bad_records {
            self.failures.extend(failures);
            Ok(())
        } else {
            Err(NetError::Partial { total, failures })
        }
    }

    /// Activate, as [`SocketSink::activate`]: every restored socket starts talking.
    /// Sockets prepared for connections that no record restored (closed by
    /// their peer before the freeze) are closed here, in repair mode: they
    /// never connected.
    pub fn activate_sockets(&mut self) -> Result<()> {
        self.prepared.clear();
        if let Some(register) = &mut self.register {
            for r in self.restored.iter().filter(|r| !r.was_prepared()) {
                register(r.view());
            }
        }
        let mut restored = std::mem::take(&mut self.restored);
        let total = restored.len();
        let exit = self.cfg.exit;
        let defer = self.tails.is_some();
        // In place: moving thousands of records into per-thread lists would
        // fill memory fresh from the kernel while the program waits.
        let failed = split_in_place(&mut restored, self.cfg.activate_threads, |r, inj| {
            activate_one(r, exit, inj, defer).err()
        });
        let mut failed = failed.into_iter().peekable();
        let mut failures = Vec::new();
        let mut tails = Vec::new();
        for (i, mut r) in restored.into_iter().enumerate() {
            match failed.next_if(|(at, _)| *at == i) {
                // Dropped here: a socket that failed to activate is closed.
                Some((_, e)) => failures.push(fail(r.id(), e)),
                None => {
                    if defer {
                        if let Err(e) = take_tail(&mut r, &mut tails) {
                            failures.push(fail(r.id(), e));
                            continue;
                        }
                    }
                    let kind = r.kind();
                    let (id, fd) = r.into_fd();
                    if kind != SocketKind::TcpEstablished {
                        self.ready_kinds.insert(id, kind);
                    }
                    self.ready.insert(id, fd);
                }
            }
        }
        if let (Some(gate), false) = (&self.tails, tails.is_empty()) {
            self.writer = UnsentWriter::spawn(gate, tails);
        }
        self.finish(total, failures)
    }

    /// The gate of the never-sent bytes written after activation
    /// ([`SinkConfig::unsent_in_background`]; `None` without it). Take it
    /// before activation (e.g. before the session starts) and honour its
    /// contract from the moment the program gets its sockets.
    pub fn unsent_tails(&self) -> Option<UnsentTails> {
        self.tails.clone()
    }

    /// Wait for the never-sent bytes' writer (if any) to finish.
    pub fn join_unsent(&mut self) {
        if let Some(w) = self.writer.take() {
            w.join();
        }
    }

    /// Close everything prepared or restored, in repair mode: peers see nothing.
    pub fn discard_sockets(&mut self) {
        self.prepared.clear();
        self.ready_kinds.clear();
        self.restored.clear();
        self.seen.clear();
    }

    /// The restored sockets, by the program's id (after `activate`).
    pub fn take_fds(&mut self) -> HashMap<u64, OwnedFd> {
        self.ready_kinds.clear();
        std::mem::take(&mut self.ready)
    }

    /// One restored socket by id (after `activate`).
    pub fn take(&mut self, id: u64) -> Option<OwnedFd> {
        self.ready_kinds.remove(&id);
        self.ready.remove(&id)
    }

    /// The restored sockets, by the program's id, typed by kind (after
    /// `activate`): `TcpStream`, `TcpListener` or `UdpSocket`,
    /// non-blocking when [`SinkConfig::nonblocking`] is set. What is not
    /// taken is closed with the sink.
    pub fn take_restored(&mut self) -> HashMap<u64, RestoredSocket> {
        let mut kinds = std::mem::take(&mut self.ready_kinds);
        std::mem::take(&mut self.ready)
            .into_iter()
            .map(|(id, fd)| {
                let kind = kinds.remove(&id).unwrap_or(SocketKind::TcpEstablished);
                (id, RestoredSocket::new(kind, fd))
            })
            .collect()
    }

    /// Show every socket to `register` as soon as the sink makes it, before
    /// [`NetSink::take_restored`] hands it out: the connections `prepare`
    /// makes, right after it (before the freeze; the restore fills these
    /// very sockets), and the sockets made in the freeze (listeners, UDP
    /// sockets, connections not in the plan) as `activate` starts. Together
    /// that is every socket the sink hands out, so an event loop can have
    /// them all in its poller before it serves, with no system call per
    /// socket after the commit. A socket shown and then closed by the sink
    /// (prepared for a connection no record restored or whose options the
    /// program changed after the plan, failed to restore or activate, or
    /// discarded with the attempt) leaves an epoll set by
    /// itself; its number may come again with another socket.
    ///
    /// The callback runs on the thread that calls `prepare` / `activate`
    /// (the session's); keep it short (an `epoll_ctl`).
    pub fn on_register(&mut self, register: impl FnMut(SocketView<'_>) + Send + 'static) {
        self.register = Some(Box::new(register));
    }

    /// The sockets `prepare` made (before the freeze), borrowed; see
    /// [`NetSink::on_register`] for what a program does with them.
    pub fn prepared_sockets(&self) -> impl Iterator<Item = SocketView<'_>> {
        self.prepared.iter().map(|(id, p)| SocketView {
            id: *id,
            kind: SocketKind::TcpEstablished,
            fd: p.fd.as_fd(),
            prepared: true,
        })
    }

    /// The sockets restored so far and waiting for activation, borrowed, in
    /// the order they were restored (a later batch comes after an earlier
    /// one's sockets). They are the sockets handed out after activation.
    pub fn pending_sockets(&self) -> impl Iterator<Item = SocketView<'_>> {
        self.restored.iter().map(Restored::view)
    }

    /// The sockets waiting for activation that `prepare` did not make
    /// (listeners, UDP sockets, connections made in the freeze): with
    /// [`NetSink::prepared_sockets`], every socket handed out after activation.
    pub fn unprepared_sockets(&self) -> impl Iterator<Item = SocketView<'_>> {
        self.restored
            .iter()
            .filter(|r| !r.was_prepared())
            .map(Restored::view)
    }

    /// The fds of the sockets restored so far and waiting for activation,
    /// by the program's id. They are the fds [`NetSink::take_fds`] hands
    /// out after activation: a program can register them with its poller
    /// while [`NetSink::activate_sockets`] runs, instead of after it (one
    /// system call per connection less after the commit). A socket that
    /// fails to activate is closed, and its number may be reused.
    #[deprecated(note = "raw fd numbers need `unsafe` to use: use `pending_sockets` (borrowed)")]
    pub fn pending_fds(&self) -> Vec<(u64, RawFd)> {
        self.pending_sockets()
            .map(|v| (v.id, v.fd.as_raw_fd()))
            .collect()
    }

    /// The fds of the sockets made by `prepare` (before the freeze), by the
    /// program's id. The restore fills these very sockets, so a program can
    /// register them with its poller before the freeze and leave nothing of
    /// that to the freeze; after the restore,
    /// [`NetSink::unprepared_fds`] lists the sockets it made instead. A
    /// prepared socket that no record restores (its connection closed
    /// before the freeze), or whose restore fails, is closed (which also
    /// takes it out of an epoll set).
    ///
    /// A prepared socket is in repair mode and not connected yet: `poll`
    /// reports `POLLHUP` for it until the restore connects it.
    #[deprecated(
        note = "raw fd numbers need `unsafe` to use: use `prepared_sockets` (borrowed) or `on_register`"
    )]
    pub fn prepared_fds(&self) -> Vec<(u64, RawFd)> {
        self.prepared_sockets()
            .map(|v| (v.id, v.fd.as_raw_fd()))
            .collect()
    }

    /// The sockets waiting for activation that are not ones
    /// [`NetSink::prepared_fds`] listed: listeners, UDP sockets, and
    /// connections made in the freeze (not in the plan, or restored again
    /// after a failed attempt). With `prepared_fds`, this is every socket
    /// [`NetSink::take_fds`] hands out after activation.
    #[deprecated(
        note = "raw fd numbers need `unsafe` to use: use `unprepared_sockets` (borrowed) or `on_register`"
    )]
    pub fn unprepared_fds(&self) -> Vec<(u64, RawFd)> {
        self.unprepared_sockets()
            .map(|v| (v.id, v.fd.as_raw_fd()))
            .collect()
    }

    /// Sockets restored so far and waiting for activation.
    pub fn restored_len(&self) -> usize {
        self.restored.len()
    }

    /// Records that failed (kept when [`SinkConfig::tolerate_bad_records`]).
    pub fn failures(&self) -> &[SocketFailure] {
        &self.failures
    }
}

fn restore_one(
    rec: SocketRecord,
    prepared: Option<Prepared>,
    d: &Defaults,
    flags: i32,
) -> Result<Restored> {
    match rec {
        SocketRecord::Tcp(c) => {
            // A prepared socket with options the record does not want is
            // dropped here (closed in repair mode: silently).
            let prepared = prepared.filter(|p| !p.set_otherwise(&c));
            let was_prepared = prepared.is_some();
            let (fd, clock_set) = match prepared {
                Some(p) => {
                    p.finish(&c, d)?;
                    let clock_set = p
                        .clock
                        .is_some_and(|off| clock_fits(&c, off, sys::monotonic_ms()));
                    (p.fd, clock_set)
                }
                None => (
                    prepare_conn(&SocketRecord::Tcp(c.clone()).prep(), d, flags)?.0,
                    false,
                ),
            };
            let pending = tcp::restore_established(fd.as_fd(), &c, clock_set)?;
            Ok(Restored::Tcp {
                id: c.id,
                fd,
                pending,
                prepared: was_prepared,
            })
        }
        SocketRecord::Listen(l) => {
            let fd = crate::listen::restore_listener(&l, d, flags)?;
            Ok(Restored::Listen {
                fd,
                state: Box::new(l),
            })
        }
        SocketRecord::Udp(u) => {
            let r = udp::restore_udp(&u, d, flags)?;
            Ok(Restored::Udp {
                r,
                state: Box::new(u),
            })
        }
    }
}

fn activate_one(r: &mut Restored, exit: RepairExit, inj: &mut Injector, defer: bool) -> Result<()> {
    match r {
        Restored::Tcp {
            id, fd, pending, ..
        } => tcp::activate_established(fd.as_fd(), *id, pending, exit, inj, defer),
        // Listening since the restore.
        Restored::Listen { .. } => Ok(()),
        Restored::Udp { state, .. } => udp::activate_udp(state, inj),
    }
}

/// An activated connection's never-sent bytes, for the writer (with a
/// reference to the socket of its own: the program may close its fd).
fn take_tail(r: &mut Restored, tails: &mut Vec<Tail>) -> Result<()> {
    let Restored::Tcp {
        id, fd, pending, ..
    } = r
    else {
        return Ok(());
    };
    let bytes = pending.take_unsent();
    if bytes.is_empty() {
        return Ok(());
    }
    let what = || format!("TCP connection {id}");
    match fd.try_clone() {
        Ok(fd) => {
            tails.push(Tail { id: *id, fd, bytes });
            Ok(())
        }
        // No second reference: written here, before the program has it.
        Err(_) => tcp::write_unsent(fd.as_fd(), &bytes, &what),
    }
}

impl SocketSink for NetSink {
    fn prepare(&mut self, plan: &[SocketPrep]) -> lmig_core::Result<()> {
        Ok(self.prepare_sockets(plan)?)
    }

    fn restore(&mut self, batch: Vec<SocketRecord>) -> lmig_core::Result<()> {
        Ok(self.restore_batch(batch)?)
    }

    fn activate(&mut self) -> lmig_core::Result<()> {
        Ok(self.activate_sockets()?)
    }

    fn discard(&mut self) {
        self.discard_sockets()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefaulting_spare_capacity_leaves_the_vector_as_it_was() {
        let mut v: Vec<u64> = vec![7, 8, 9];
        v.reserve(100_000);
        let cap = v.capacity();
        sys::prefault_spare(&mut v);
        assert_eq!((v.as_slice(), v.capacity()), (&[7, 8, 9][..], cap));
        v.extend(0..100_000);
        assert_eq!((v.len(), v.capacity()), (100_003, cap));
        let mut full = vec![1u8; 4];
        full.shrink_to_fit();
        sys::prefault_spare(&mut full);
        assert_eq!(full, [1, 1, 1, 1]);
    }
}
