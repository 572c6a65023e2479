//! The capture of a [`NetSource`]'s sockets at the freeze: each connection
//! enters repair mode just before it is read, on several threads, and the
//! records go out in batches cut by count and by queued bytes.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};

use lmig_core::MigrationError;
use lmig_core::model::{SocketKind, SocketRecord};

use super::{Entry, NetSource, Phase};
use crate::error::{NetError, Result};
use crate::fd::cookie_of;
use crate::repair;
use crate::sys;
use crate::tcp::{self, CaptureCtx};
use crate::udp;

/// Put an established connection in repair mode (once). Its `SO_REUSEADDR`,
/// which repair mode overrides, was read before (in its `ConnStatic`).
pub(super) fn enter_repair(e: &Entry) -> Result<()> {
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
    /// Bytes now in the kernel queues of the connections (received and not
    /// read, sent and not acknowledged, never sent): what the freeze would
    /// capture if it began now. Connections handed over are asked
    /// (`SIOCINQ`, `SIOCOUTQ`); connections only planned
    /// ([`NetSource::plan_fd`], no fd held) are found by their cookies in
    /// one `sock_diag` dump per address family of the calling thread's
    /// network namespace (nothing is asked of the program). Also gets memory
    /// ready for that much (a quarter more, at most 1 GiB), written now so
    /// that the capture does not fault it in during the freeze (see
    /// [`SocketSource::queued_bytes`](lmig_core::SocketSource::queued_bytes)).
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
            .iter()
            .filter(|p| p.kind == SocketKind::TcpEstablished && !p.taken)
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

    /// Capture, as [`SocketSource::capture`](lmig_core::SocketSource::capture), with lmig-net's error type for
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
}
