//! [`NetSource`]: the program's sockets on the source host, an
//! implementation of [`SocketSource`].

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};

use lmig_core::MigrationError;
use lmig_core::model::{SocketKind, SocketPrep, SocketRecord};
use lmig_core::traits::SocketSource;

use crate::error::{NetError, Result};
use crate::fd::{cookie_of, kind_of, take_fd_from_process};
use crate::opts::Defaults;
use crate::repair;
use crate::sys;
use crate::tcp::{self, CaptureCtx};
use crate::udp;

/// The network lock of issue 6 plugs in here: called at the freeze before any
/// socket enters repair mode, on abort after every socket left it, and at release.
///
/// It must hold (not drop) packets for the locked sockets and cost the same
/// for one connection as for ten thousand.
pub trait NetworkLock: Send {
    /// Stop the kernel from answering for `sockets` (the freeze begins).
    fn lock(&mut self, sockets: &[SocketPrep]) -> Result<()>;
    /// The migration failed: let the sockets talk again here.
    fn unlock(&mut self) -> Result<()>;
    /// `Commit` was sent and the sockets are closed: hand over what is held.
    fn release(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Settings of a [`NetSource`]: `NetSourceConfig::default()` and the
/// `with_*` setters (the struct is `#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NetSourceConfig {
    /// Records per batch handed to the session (default 256).
    pub batch_size: usize,
    /// Capture threads (default 2).
    pub threads: usize,
    /// Record `SO_RCVBUF`/`SO_SNDBUF` (default false: setting a size on the
    /// destination would lock it and turn TCP auto-tuning off, and the kernel
    /// cannot tell whether the program set it).
    pub capture_buffer_sizes: bool,
    /// Read connection addresses and options again at the freeze (default
    /// false: they are read by `plan`, before the freeze, and an option the
    /// program changes after `plan` is not carried; true moves about a dozen
    /// `getsockopt` per connection into the freeze).
    pub reread_options_at_freeze: bool,
    /// Close the released sockets on a background thread at the lowest CPU
    /// priority (default false). Closing sockets in repair mode costs time
    /// per socket: with the destination on another host that is
    /// only cleanup, and on a host the source shares with the destination
    /// (containers, tests) it takes the CPU the destination needs right
    /// after `Commit`. The peers see nothing either way (repair mode), and
    /// [`NetSource::release_sockets`] returns once every socket is in repair
    /// mode. Leave it off when the destination restores the connections in
    /// this network namespace: its `connect` needs the originals closed.
    pub close_in_background: bool,
    /// Queued bytes per batch (default 1 MiB): a batch is handed over once
    /// its records hold this much queue data, so that the destination
    /// restores the first connections' queues while the next are captured
    /// and sent, instead of waiting for one message with all of them.
    pub batch_bytes: usize,
}

impl Default for NetSourceConfig {
    fn default() -> Self {
        Self {
            batch_bytes: 1 << 20,
            batch_size: 256,
            threads: 2,
            capture_buffer_sizes: false,
            reread_options_at_freeze: false,
            close_in_background: false,
        }
    }
}

impl NetSourceConfig {
    /// Sets [`batch_bytes`](Self::batch_bytes).
    #[must_use]
    pub fn with_batch_bytes(mut self, batch_bytes: usize) -> Self {
        self.batch_bytes = batch_bytes;
        self
    }

    /// Sets [`batch_size`](Self::batch_size).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets [`threads`](Self::threads).
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Sets [`capture_buffer_sizes`](Self::capture_buffer_sizes).
    #[must_use]
    pub fn with_capture_buffer_sizes(mut self, capture_buffer_sizes: bool) -> Self {
        self.capture_buffer_sizes = capture_buffer_sizes;
        self
    }

    /// Sets [`reread_options_at_freeze`](Self::reread_options_at_freeze).
    #[must_use]
    pub fn with_reread_options_at_freeze(mut self, reread_options_at_freeze: bool) -> Self {
        self.reread_options_at_freeze = reread_options_at_freeze;
        self
    }

    /// Sets [`close_in_background`](Self::close_in_background).
    #[must_use]
    pub fn with_close_in_background(mut self, close_in_background: bool) -> Self {
        self.close_in_background = close_in_background;
        self
    }
}

/// [`NetSourceConfig`] under its old name.
#[deprecated(note = "renamed `NetSourceConfig`: lmig-core has a `SourceConfig` too")]
pub type SourceConfig = NetSourceConfig;

#[derive(Debug)]
struct Entry {
    id: u64,
    fd: OwnedFd,
    kind: SocketKind,
    /// Addresses and options of an established connection, read before the freeze.
    stat: Option<tcp::ConnStatic>,
    /// Entered repair mode (at its capture; several capture threads).
    in_repair: AtomicBool,
    /// The socket [`NetSource::plan_fd`] saw under this id (its cookie):
    /// the capture checks the socket handed over is that one.
    planned_cookie: Option<u64>,
}

/// A socket read by [`NetSource::plan_fd`] whose fd comes with [`NetSource::add`].
#[derive(Debug)]
struct Planned {
    kind: SocketKind,
    stat: Option<tcp::ConnStatic>,
    /// The socket's cookie: the capture checks it was handed the same socket.
    cookie: u64,
    prep: SocketPrep,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    Frozen,
    Released,
}

/// The program's sockets on the source.
///
/// The program hands over owned fds with its own ids ([`NetSource::add`];
/// a duplicate made with `try_clone` is fine, the kernel socket is shared),
/// and may keep serving through [`NetSource::fd`] until the freeze.
///
/// * `freeze`: the network lock (if any): from then on what the peers send
///   is held. The program must be paused by then (nothing it writes later
///   is carried). No system call per connection here.
/// * `capture`: batches of records on several threads; each established
///   connection enters repair mode just before it is read (so the freeze
///   does not start with one `setsockopt` per connection, ahead of
///   everything else); nothing is consumed. A failure half-way leaves repair
///   mode on the sockets already in it at the abort.
/// * `abort`: every socket leaves repair mode (with a window probe, so a peer
///   that sent something during the freeze is answered at once) and the lock
///   is lifted; the program keeps serving ([`NetSource::into_fds`] gives the
///   fds back). Dropping a frozen `NetSource` does the same.
/// * `release`: every socket is closed while in repair mode: no FIN, no RST,
///   the 4-tuple is free at once. Other fds of the same sockets (the
///   program's own) must be closed without leaving repair mode, which is what
///   a stopped program does. Listeners are closed normally (see [`crate::tcp`]).
pub struct NetSource {
    entries: Vec<Entry>,
    ids: HashSet<u64>,
    planned: HashMap<u64, Planned>,
    gone: Mutex<Vec<u64>>,
    cfg: NetSourceConfig,
    ctx: CaptureCtx,
    phase: Phase,
    lock: Option<Box<dyn NetworkLock>>,
}

impl std::fmt::Debug for NetSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetSource")
            .field("sockets", &self.entries.len())
            .field("phase", &self.phase)
            .finish()
    }
}

/// Put an established connection in repair mode (once). Its `SO_REUSEADDR`,
/// which repair mode overrides, was read before (in its `ConnStatic`).
fn enter_repair(e: &Entry) -> Result<()> {
    if !e.in_repair.load(Ordering::Relaxed) {
        repair::repair_on(e.fd.as_fd(), || format!("TCP connection {}", e.id))?;
        e.in_repair.store(true, Ordering::Relaxed);
    }
    Ok(())
}

fn capture_one(e: &Entry, ctx: &CaptureCtx) -> Result<SocketRecord> {
    // Here rather than in `add`, which the program calls for every socket
    // one after the other at the freeze: on the capture threads, while the
    // session sends the last pages (10,000 `fstat` were 16 ms of the freeze).
    if let Some(planned) = e.planned_cookie {
        if cookie_of(e.fd.as_fd(), e.id)? != planned {
            return Err(NetError::BadId {
                id: e.id,
                detail: "names another socket than the one planned under it",
            });
        }
    }
    match e.kind {
        SocketKind::TcpEstablished => {
            let Some(st) = &e.stat else {
                return Err(NetError::Phase {
                    op: "capture",
                    detail: "connection options were not read before the freeze",
                });
            };
            // Repair mode first: the record is read from a connection that
            // can no longer change (the lock holds what the peer sends).
            enter_repair(e)?;
            tcp::capture_established(e.fd.as_fd(), e.id, st, &ctx.arena).map(SocketRecord::Tcp)
        }
        SocketKind::TcpListen => {
            crate::listen::capture_listener(e.fd.as_fd(), e.id, ctx).map(SocketRecord::Listen)
        }
        SocketKind::Udp => udp::capture_udp(e.fd.as_fd(), e.id, ctx.buffers).map(SocketRecord::Udp),
    }
}

/// Queue bytes a record carries.
fn queued_len(r: &SocketRecord) -> usize {
    match r {
        SocketRecord::Tcp(c) => c.send_queue.len() + c.recv_queue.len(),
        _ => 0,
    }
}

/// Capture `entries` and hand their records to `emit`, in batches of at
/// most `batch_bytes` of queue data (a connection holding more is a batch
/// of its own); connections found gone are skipped and listed in `gone`.
/// `emit` returning false stops the capture (the receiver is gone).
fn capture_batch(
    entries: &[Entry],
    ctx: &CaptureCtx,
    gone: &Mutex<Vec<u64>>,
    batch_bytes: usize,
    emit: &mut dyn FnMut(Vec<SocketRecord>) -> bool,
) -> Result<()> {
    let mut out = Vec::with_capacity(entries.len());
    let mut bytes = 0;
    for e in entries {
        match capture_one(e, ctx) {
            Ok(r) => {
                let len = queued_len(&r);
                if bytes > 0 && bytes + len > batch_bytes {
                    if !emit(std::mem::take(&mut out)) {
                        return Ok(());
                    }
                    bytes = 0;
                }
                bytes += len;
                out.push(r);
            }
            Err(NetError::ConnectionGone { .. }) => {
                gone.lock().unwrap_or_else(|p| p.into_inner()).push(e.id)
            }
            Err(err) => return Err(err),
        }
    }
    if !out.is_empty() {
        emit(out);
    }
    Ok(())
}

impl NetSource {
    /// An empty set; probes the namespace's default congestion control.
    pub fn new(cfg: NetSourceConfig) -> Result<Self> {
        let defaults = Defaults::probe()?;
        Ok(Self {
            entries: Vec::new(),
            ids: HashSet::new(),
            planned: HashMap::new(),
            gone: Mutex::new(Vec::new()),
            ctx: CaptureCtx {
                buffers: cfg.capture_buffer_sizes,
                default_cc: defaults.congestion,
                arena: Default::default(),
            },
            cfg,
            phase: Phase::Running,
            lock: None,
        })
    }

    /// Install the network lock (issue 6) used at the freeze.
    pub fn set_lock(&mut self, lock: Box<dyn NetworkLock>) {
        self.lock = Some(lock);
    }

    /// Hand over a socket with the program's id for it (TCP established or
    /// listening, UDP; IPv4 or IPv6). The kind is read from the socket,
    /// unless [`NetSource::plan_fd`] read it already under this id.
    pub fn add(&mut self, id: u64, fd: OwnedFd) -> Result<()> {
        self.add_or_return(id, fd).map_err(|(e, _fd)| e)
    }

    /// [`NetSource::add`], giving a refused fd back with the error.
    pub(crate) fn add_or_return(
        &mut self,
        id: u64,
        fd: OwnedFd,
    ) -> std::result::Result<(), (NetError, OwnedFd)> {
        if self.phase != Phase::Running {
            let e = NetError::Phase {
                op: "add",
                detail: "sockets are added before the freeze",
            };
            return Err((e, fd));
        }
        if self.ids.contains(&id) {
            let e = NetError::BadId {
                id,
                detail: "given twice",
            };
            return Err((e, fd));
        }
        if self.entries.is_empty() {
            // At the freeze, thousands of sockets come one by one.
            self.entries.reserve(self.planned.len());
            self.ids.reserve(self.planned.len());
        }
        if let Some(p) = self.planned.remove(&id) {
            self.ids.insert(id);
            self.entries.push(Entry {
                id,
                fd,
                kind: p.kind,
                stat: p.stat,
                in_repair: AtomicBool::new(false),
                planned_cookie: Some(p.cookie),
            });
            return Ok(());
        }
        self.ids.insert(id);
        let kind = match kind_of(fd.as_fd(), id) {
            Ok(k) => k,
            Err(e) => {
                self.ids.remove(&id);
                return Err((e, fd));
            }
        };
        self.entries.push(Entry {
            id,
            fd,
            kind,
            stat: None,
            in_repair: AtomicBool::new(false),
            planned_cookie: None,
        });
        Ok(())
    }

    /// Read a socket before the freeze from any fd of it — the program's own,
    /// borrowed while it stays open, or a short-lived duplicate — without
    /// taking it: kind, addresses and options, as [`NetSource::plan_sockets`]
    /// does for added sockets. The program hands the socket over with
    /// [`NetSource::add`] and the same id at the freeze, which then makes no
    /// system call instead of a dozen `getsockopt`. The socket's identity
    /// (its `SO_COOKIE`) is checked at the capture, on the capture threads: a
    /// socket added under the id of another fails the capture, and with it
    /// the migration, before `Commit` (so the program serves on with all its
    /// sockets). A planned socket never added (the connection closed in
    /// between) is forgotten at the freeze.
    ///
    /// This is for programs that keep their fds until the freeze and cannot
    /// afford to read every socket there (thousands of connections).
    pub fn plan_fd(&mut self, id: u64, fd: BorrowedFd<'_>) -> Result<SocketPrep> {
        if self.phase != Phase::Running {
            return Err(NetError::Phase {
                op: "plan_fd",
                detail: "sockets are planned before the freeze",
            });
        }
        if self.ids.contains(&id) || self.planned.contains_key(&id) {
            return Err(NetError::BadId {
                id,
                detail: "given twice",
            });
        }
        let kind = kind_of(fd, id)?;
        let cookie = cookie_of(fd, id)?;
        let (prep, stat) = Self::prep(id, kind, fd, &self.ctx)?;
        self.planned.insert(
            id,
            Planned {
                kind,
                stat,
                cookie,
                prep: prep.clone(),
            },
        );
        if self.entries.capacity() < self.planned.len() {
            // The freeze moves every planned socket in here: room for them
            // now, in memory touched now (see `sys::prefault_spare`).
            self.entries.reserve(2 * self.planned.len());
            sys::prefault_spare(&mut self.entries);
            self.ids.reserve(2 * self.planned.len());
        }
        Ok(prep)
    }

    /// [`take_fd_from_process`] then [`NetSource::add`].
    pub fn add_from_process(&mut self, id: u64, pid: i32, target_fd: RawFd) -> Result<()> {
        let fd = take_fd_from_process(pid, target_fd)?;
        self.add(id, fd)
    }

    /// The socket with this id, for the program to keep serving until the freeze.
    pub fn fd(&self, id: u64) -> Option<BorrowedFd<'_>> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.fd.as_fd())
    }

    /// Connections the last capture found gone (reset or closed by the peer
    /// before it) and left out: the destination gets no socket for them, and
    /// the program treats them as closed. Released with the others.
    pub fn gone(&self) -> Vec<u64> {
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Number of sockets handed over.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No sockets handed over?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Give the fds back (after an abort, or without migrating). Sockets still
    /// in repair mode leave it first.
    pub fn into_fds(mut self) -> Vec<(u64, OwnedFd)> {
        // A failure here was reported by the abort that came first.
        if let Err(e) = self.leave_repair() {
            debug!(error = %e, "giving the fds back: leaving repair mode failed (the abort reported it)");
        }
        self.phase = Phase::Released;
        std::mem::take(&mut self.entries)
            .into_iter()
            .map(|e| (e.id, e.fd))
            .collect()
    }

    /// The plan of one socket, and for a connection its addresses and options.
    fn prep(
        id: u64,
        kind: SocketKind,
        fd: BorrowedFd<'_>,
        ctx: &CaptureCtx,
    ) -> Result<(SocketPrep, Option<tcp::ConnStatic>)> {
        let what = || format!("socket {id}");
        if kind == SocketKind::TcpEstablished {
            let st = tcp::read_static(fd, id, ctx)?;
            let info = sys::tcp_info(fd)
                .map_err(|err| NetError::sys("getsockopt(TCP_INFO)", what(), err))?;
            tcp::state_kind(info.state).map_err(|r| NetError::NotMigratable {
                what: tcp::describe_conn(id, Some(st.local), Some(st.peer)),
                reason: r.into(),
            })?;
            let prep = SocketPrep {
                id,
                kind,
                local: st.local,
                peer: Some(st.peer),
            };
            return Ok((prep, Some(st)));
        }
        let local = sys::local_addr(fd)
            .map_err(|err| NetError::sys("getsockname", what(), err))?
            .ok_or_else(|| NetError::NotMigratable {
                what: what(),
                reason: "not bound".into(),
            })?;
        let peer = match kind {
            SocketKind::TcpListen => None,
            _ => sys::peer_addr(fd).map_err(|err| NetError::sys("getpeername", what(), err))?,
        };
        Ok((
            SocketPrep {
                id,
                kind,
                local,
                peer,
            },
            None,
        ))
    }

    fn prep_entry(e: &mut Entry, ctx: &CaptureCtx) -> Result<SocketPrep> {
        let (prep, stat) = Self::prep(e.id, e.kind, e.fd.as_fd(), ctx)?;
        if stat.is_some() {
            e.stat = stat;
        }
        Ok(prep)
    }

    /// The pre-freeze plan, as [`SocketSource::plan`]: checks every
    /// connection can be moved and reads addresses and options. Sockets
    /// planned with [`NetSource::plan_fd`] are not read again.
    pub fn plan_sockets(&mut self) -> Result<Vec<SocketPrep>> {
        let ctx = &self.ctx;
        let mut plan: Vec<SocketPrep> = self
            .entries
            .iter_mut()
            .map(|e| Self::prep_entry(e, ctx))
            .collect::<Result<_>>()?;
        plan.extend(self.planned.values().map(|p| p.prep.clone()));
        Ok(plan)
    }

    /// Bytes now in the kernel queues of the connections (received and not
    /// read, sent and not acknowledged, never sent): what the freeze would
    /// capture if it began now. Connections handed over are asked
    /// (`SIOCINQ`, `SIOCOUTQ`); connections only planned
    /// ([`NetSource::plan_fd`], no fd held) are found by their cookies in
    /// one `sock_diag` dump per address family of the calling thread's
    /// network namespace (nothing is asked of the program). Also gets memory
    /// ready for that much (a quarter more, at most 1 GiB), written now so
    /// that the capture does not fault it in during the freeze (see
    /// [`SocketSource::queued_bytes`]).
    pub fn queued_bytes(&mut self) -> Result<u64> {
        let mut total = 0u64;
        let mut conns = 0u64;
        for e in &self.entries {
            if e.kind != SocketKind::TcpEstablished {
                continue;
            }
            let what = || format!("TCP connection {}", e.id);
            let inq = sys::inq(e.fd.as_fd())
                .map_err(|err| NetError::sys("ioctl(SIOCINQ)", what(), err))?;
            let outq = sys::outq(e.fd.as_fd())
                .map_err(|err| NetError::sys("ioctl(SIOCOUTQ)", what(), err))?;
            total += u64::from(inq) + u64::from(outq);
            conns += 1;
        }
        let cookies: HashSet<u64> = self
            .planned
            .values()
            .filter(|p| p.kind == SocketKind::TcpEstablished)
            .map(|p| p.cookie)
            .collect();
        if !cookies.is_empty() {
            let mut diag = sys::diag::Diag::open()
                .map_err(|e| NetError::sys("socket(NETLINK_SOCK_DIAG)", "TCP queues", e))?;
            diag.tcp_queues(&mut |cookie, rq, wq| {
                if cookies.contains(&cookie) {
                    total += u64::from(rq) + u64::from(wq);
                }
            })
            .map_err(|e| NetError::sys("SOCK_DIAG_BY_FAMILY", "TCP queues", e))?;
            conns += cookies.len() as u64;
        }
        if total > 0 {
            let room = total + total / 4 + 2 * conns;
            self.ctx
                .arena
                .reserve(usize::try_from(room).unwrap_or(usize::MAX));
        }
        Ok(total)
    }

    /// Every connection in repair mode leaves it (with a window probe, so a
    /// peer that sent something during the freeze is answered at once) as it
    /// was before: with its `SO_REUSEADDR`. The first failure is returned
    /// after every socket was tried.
    fn leave_repair(&mut self) -> Result<()> {
        let mut first = Ok(());
        for e in &mut self.entries {
            if e.in_repair.swap(false, Ordering::Relaxed) {
                let reuse = e.stat.as_ref().is_some_and(|st| st.sock.reuse_addr);
                if let Err(err) = repair::leave_repair(e.fd.as_fd(), true, reuse) {
                    if first.is_ok() {
                        first = Err(NetError::sys(
                            "TCP_REPAIR off",
                            tcp::describe_conn(
                                e.id,
                                e.stat.as_ref().map(|s| s.local),
                                e.stat.as_ref().map(|s| s.peer),
                            ),
                            err,
                        ));
                    }
                }
            }
        }
        first
    }

    /// Freeze, as [`SocketSource::freeze`], with lmig-net's error type.
    pub fn freeze_sockets(&mut self) -> Result<()> {
        if self.phase != Phase::Running {
            return Err(NetError::Phase {
                op: "freeze",
                detail: "already frozen or released",
            });
        }
        // Planned sockets the program did not hand over are gone.
        self.planned.clear();
        // Addresses and options, read before repair mode (which overrides SO_REUSEADDR).
        let reread = self.cfg.reread_options_at_freeze;
        let mut plan = Vec::with_capacity(self.entries.len());
        for e in &mut self.entries {
            if e.kind == SocketKind::TcpEstablished && (reread || e.stat.is_none()) {
                e.stat = Some(tcp::read_static(e.fd.as_fd(), e.id, &self.ctx)?);
            }
            if self.lock.is_some() {
                plan.push(match &e.stat {
                    Some(st) => SocketPrep {
                        id: e.id,
                        kind: e.kind,
                        local: st.local,
                        peer: Some(st.peer),
                    },
                    None => Self::prep_entry(e, &self.ctx)?,
                });
            }
        }
        if let Some(lock) = self.lock.as_mut() {
            lock.lock(&plan)?;
        }
        self.phase = Phase::Frozen;
        Ok(())
    }

    /// Capture, as [`SocketSource::capture`], with lmig-net's error type for
    /// the sockets and the session's for `emit`.
    pub fn capture_sockets(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        if self.phase != Phase::Frozen {
            return Err(NetError::Phase {
                op: "capture",
                detail: "the sockets must be frozen first",
            }
            .into());
        }
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let captured = self.capture_in_batches(emit);
        // What the estimate reserved and the capture did not use.
        self.ctx.arena.clear();
        captured
    }

    fn capture_in_batches(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        let n = self.entries.len();
        let bs = self.cfg.batch_size.max(1);
        let batches = n.div_ceil(bs);
        let threads = self.cfg.threads.clamp(1, 16).min(batches.max(1));
        let batch_bytes = self.cfg.batch_bytes.max(1);
        if threads <= 1 {
            for b in 0..batches {
                let mut result = Ok(());
                capture_batch(
                    &self.entries[b * bs..((b + 1) * bs).min(n)],
                    &self.ctx,
                    &self.gone,
                    batch_bytes,
                    &mut |recs| {
                        result = emit(recs);
                        result.is_ok()
                    },
                )?;
                result?;
            }
            return Ok(());
        }
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let (entries, ctx, gone) = (&self.entries[..], &self.ctx, &self.gone);
        std::thread::scope(|s| -> lmig_core::Result<()> {
            let (tx, rx) = mpsc::sync_channel::<Result<Vec<SocketRecord>>>(threads * 2);
            for _ in 0..threads {
                let tx = tx.clone();
                let (next, stop) = (&next, &stop);
                s.spawn(move || {
                    // Bounded: each round takes a new batch index until none is left.
                    while !stop.load(Ordering::Relaxed) {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= batches {
                            break;
                        }
                        let r = capture_batch(
                            &entries[b * bs..((b + 1) * bs).min(n)],
                            ctx,
                            gone,
                            batch_bytes,
                            &mut |recs| tx.send(Ok(recs)).is_ok(),
                        );
                        if let Err(e) = r {
                            let _ = tx.send(Err(e));
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                });
            }
            drop(tx);
            let mut result = Ok(());
            for r in rx.iter() {
                if result.is_err() {
                    continue;
                }
                result = match r {
                    Ok(recs) => emit(recs),
                    Err(e) => Err(MigrationError::from(e)),
                };
                if result.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            result
        })
    }

    /// Abort, as [`SocketSource::abort`].
    pub fn abort_sockets(&mut self) -> Result<()> {
        let left = self.leave_repair();
        if self.phase == Phase::Frozen {
            self.phase = Phase::Running;
            if let Some(lock) = self.lock.as_mut() {
                lock.unlock()?;
            }
        }
        left
    }

    /// Release, as [`SocketSource::release`]: close every socket in repair mode.
    pub fn release_sockets(&mut self) -> Result<()> {
        if self.phase != Phase::Frozen {
            return Err(NetError::Phase {
                op: "release",
                detail: "only frozen sockets are released",
            });
        }
        // Dropping the fds while in repair mode: no FIN, no RST. (Every
        // connection entered it at its capture; one that was not captured
        // enters it now rather than reset its peer.)
        for e in self
            .entries
            .iter()
            .filter(|e| e.kind == SocketKind::TcpEstablished)
        {
            if let Err(err) = enter_repair(e) {
                warn!(error = %err, id = e.id, "a connection could not enter repair mode before its close: its peer may see a FIN or RST");
            }
        }
        let entries = std::mem::take(&mut self.entries);
        if self.cfg.close_in_background {
            // If the thread cannot start, the closure and the sockets in it
            // are dropped here.
            if let Err(e) = std::thread::Builder::new()
                .name("lmig-net-close".into())
                .spawn(move || {
                    if let Err(e) = sys::lowest_thread_priority() {
                        debug!(error = %e, "the closing thread could not lower its priority");
                    }
                    drop(entries);
                })
            {
                debug!(error = %e, "the closing thread could not start: the sockets close here");
            }
        } else {
            drop(entries);
        }
        self.phase = Phase::Released;
        if let Some(lock) = self.lock.as_mut() {
            lock.release()?;
        }
        Ok(())
    }
}

impl SocketSource for NetSource {
    fn plan(&mut self) -> lmig_core::Result<Vec<SocketPrep>> {
        Ok(self.plan_sockets()?)
    }

    fn freeze(&mut self) -> lmig_core::Result<()> {
        Ok(self.freeze_sockets()?)
    }

    fn capture(
        &mut self,
        emit: &mut dyn FnMut(Vec<SocketRecord>) -> lmig_core::Result<()>,
    ) -> lmig_core::Result<()> {
        self.capture_sockets(emit)
    }

    fn queued_bytes(&mut self) -> lmig_core::Result<u64> {
        Ok(NetSource::queued_bytes(self)?)
    }

    fn abort(&mut self) -> lmig_core::Result<()> {
        Ok(self.abort_sockets()?)
    }

    fn release(&mut self) -> lmig_core::Result<()> {
        Ok(self.release_sockets()?)
    }
}

impl Drop for NetSource {
    fn drop(&mut self) {
        if self.phase == Phase::Frozen {
            // Never released: the migration did not commit, keep the connections alive.
            if let Err(e) = self.abort_sockets() {
                warn!(error = %e, "dropping a frozen socket source: giving the sockets back failed");
            }
        }
    }
}
