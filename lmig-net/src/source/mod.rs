//! [`NetSource`]: the program's sockets on the source host, an
//! implementation of [`SocketSource`].

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use lmig_core::model::{SocketKind, SocketPrep, SocketRecord};
use lmig_core::traits::SocketSource;

use crate::error::{NetError, Result};
use crate::fd::{cookie_of, kind_of, take_fd_from_process};
use crate::opts::Defaults;
use crate::repair;
use crate::sys;
use crate::tcp::{self, CaptureCtx};

mod capture;
mod config;

use capture::enter_repair;
pub use config::NetSourceConfig;
#[allow(deprecated)]
pub use config::SourceConfig;

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
#[derive(Debug)]
struct Entry {
    id: u64,
    fd: OwnedFd,
    kind: SocketKind,
    /// Addresses and options of an established connection, read before the
    /// freeze (boxed: the freeze moves a pointer per socket, not the options).
    stat: Option<Box<tcp::ConnStatic>>,
    /// Entered repair mode (at its capture; several capture threads).
    in_repair: AtomicBool,
    /// The socket [`NetSource::plan_fd`] saw under this id (its cookie):
    /// the capture checks the socket handed over is that one.
    planned_cookie: Option<u64>,
}

/// A connection's timestamp clock, given by its offset from
/// `CLOCK_MONOTONIC` (`ConnStatic::ts_offset`), as an offset from
/// `CLOCK_REALTIME` instead ([`SocketPrep::ts_clock`]): the clock a
/// destination on another host shares.
fn clock_against_realtime(mono_offset: u32) -> u32 {
    let mono = sys::monotonic_ms();
    mono.wrapping_add(mono_offset)
        .wrapping_sub(sys::realtime_ms())
}

/// A socket read by [`NetSource::plan_fd`] whose fd comes with [`NetSource::add`].
#[derive(Debug)]
struct Planned {
    kind: SocketKind,
    /// Moved into the socket's [`Entry`] when it is handed over.
    stat: Option<Box<tcp::ConnStatic>>,
    /// The socket's cookie: the capture checks it was handed the same socket.
    cookie: u64,
    prep: SocketPrep,
    /// Handed over by [`NetSource::add`] (a second `add` is refused).
    taken: bool,
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
    /// Ids added without a plan (planned ones are marked `taken` instead).
    ids: HashSet<u64>,
    /// In the order planned; `planned_at` finds them by id. The freeze's
    /// `add` marks one taken and moves out a pointer: nothing is removed
    /// from a map or copied per socket while the program is paused (that
    /// was ~3 ms of a 10,000-connection freeze).
    planned: Vec<Planned>,
    planned_at: HashMap<u64, usize>,
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
impl NetSource {
    /// An empty set; probes the namespace's default congestion control.
    pub fn new(cfg: NetSourceConfig) -> Result<Self> {
        let defaults = Defaults::probe()?;
        Ok(Self {
            entries: Vec::new(),
            ids: HashSet::new(),
            planned: Vec::new(),
            planned_at: HashMap::new(),
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
        let twice = || NetError::BadId {
            id,
            detail: "given twice",
        };
        if self.entries.is_empty() {
            // At the freeze, thousands of sockets come one by one.
            self.entries.reserve(self.planned.len());
        }
        if let Some(&at) = self.planned_at.get(&id) {
            let p = &mut self.planned[at];
            if p.taken {
                return Err((twice(), fd));
            }
            p.taken = true;
            self.entries.push(Entry {
                id,
                fd,
                kind: p.kind,
                stat: p.stat.take(),
                in_repair: AtomicBool::new(false),
                planned_cookie: Some(p.cookie),
            });
            return Ok(());
        }
        if !self.ids.insert(id) {
            return Err((twice(), fd));
        }
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
        if self.ids.contains(&id) || self.planned_at.contains_key(&id) {
            return Err(NetError::BadId {
                id,
                detail: "given twice",
            });
        }
        let kind = kind_of(fd, id)?;
        let cookie = cookie_of(fd, id)?;
        let (prep, stat) = Self::prep(id, kind, fd, &self.ctx)?;
        self.planned_at.insert(id, self.planned.len());
        self.planned.push(Planned {
            kind,
            stat: stat.map(Box::new),
            cookie,
            prep: prep.clone(),
            taken: false,
        });
        if self.entries.capacity() < self.planned.len() {
            // The freeze moves every planned socket in here: room for them
            // now, in memory touched now (see `sys::prefault_spare`).
            self.entries.reserve(2 * self.planned.len());
            sys::prefault_spare(&mut self.entries);
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
            // The options and the timestamp clock as planned: the
            // destination sets them before the freeze.
            let ms_clock = info.options & sys::TCPI_OPT_TIMESTAMPS != 0
                && info.options & sys::TCPI_OPT_USEC_TS == 0;
            let prep = SocketPrep {
                id,
                kind,
                local: st.local,
                peer: Some(st.peer),
                sock: Some(st.sock.clone()),
                tcp: Some(st.tcp.clone()),
                ts_clock: st
                    .ts_offset
                    .filter(|_| ms_clock)
                    .map(clock_against_realtime),
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
                sock: None,
                tcp: None,
                ts_clock: None,
            },
            None,
        ))
    }

    fn prep_entry(e: &mut Entry, ctx: &CaptureCtx) -> Result<SocketPrep> {
        let (prep, stat) = Self::prep(e.id, e.kind, e.fd.as_fd(), ctx)?;
        if let Some(stat) = stat {
            e.stat = Some(Box::new(stat));
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
        plan.extend(
            self.planned
                .iter()
                .filter(|p| !p.taken)
                .map(|p| p.prep.clone()),
        );
        Ok(plan)
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
        self.planned_at.clear();
        // Addresses and options, read before repair mode (which overrides SO_REUSEADDR).
        let reread = self.cfg.reread_options_at_freeze;
        let mut plan = Vec::with_capacity(self.entries.len());
        for e in &mut self.entries {
            if e.kind == SocketKind::TcpEstablished && (reread || e.stat.is_none()) {
                e.stat = Some(Box::new(tcp::read_static(e.fd.as_fd(), e.id, &self.ctx)?));
            }
            if self.lock.is_some() {
                plan.push(match &e.stat {
                    // For the lock: addresses only.
                    Some(st) => SocketPrep {
                        id: e.id,
                        kind: e.kind,
                        local: st.local,
                        peer: Some(st.peer),
                        sock: None,
                        tcp: None,
                        ts_clock: None,
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

    /// Abort, as [`SocketSource::abort`].
    pub fn abort_sockets(&mut self) -> Result<()> {
        let left = self.leave_repair();
        // The queue arena the capture held past the freeze.
        drop(self.ctx.arena.take_held());
        if self.phase == Phase::Frozen {
            self.phase = Phase::Running;
            // The freeze forgot the plan: every id held is now in `ids`, so
            // that an `add` before the next freeze cannot give one twice.
            self.ids.extend(self.entries.iter().map(|e| e.id));
            if let Some(lock) = self.lock.as_mut() {
                lock.unlock()?;
            }
        }
        left
    }

    /// Bytes of queue memory the last capture read into and this source
    /// still holds: the capture's records are dropped inside the freeze,
    /// and the memory is given back only at [`NetSource::release_sockets`]
    /// (on the closing thread) or [`NetSource::abort_sockets`], so that
    /// unmapping it costs the freeze nothing.
    pub fn held_queue_bytes(&self) -> usize {
        self.ctx.arena.held_bytes()
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
        // The queue arena, held past the freeze, is given back with the
        // sockets, after `Commit`.
        let entries = (entries, self.ctx.arena.take_held());
        if self.cfg.close_in_background {
            // If the thread cannot start, the closure and the sockets in it
            // are dropped here.
            if let Err(e) = std::thread::Builder::new()
                .name("lmig-net-close".into())
                .spawn(move || {
                    // `SCHED_IDLE`, not only nice 19: at nice 19 this thread
                    // held one of 2 vCPUs for ~17 ms right after `Commit`,
                    // while a destination on the same host activated its
                    // 10,000 connections on the other (perf sched). It holds
                    // nothing another thread waits for: the sockets are
                    // this thread's alone and in repair mode (silent).
                    if let Err(e) = sys::idle_thread_policy() {
                        debug!(error = %e, "the closing thread could not take SCHED_IDLE");
                        if let Err(e) = sys::lowest_thread_priority() {
                            debug!(error = %e, "the closing thread could not lower its priority");
                        }
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
