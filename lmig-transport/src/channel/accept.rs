//! The listening side: one acceptor thread per listener (`acceptor.rs`),
//! one short-lived thread per handshake (`handshake.rs`), a cap on
//! unauthenticated connections (`eviction.rs`), and here what they share:
//! the authenticated streams grouped into channels until someone takes them.
//!
//! ```text
//!  listening socket ──▶ AcceptorThread ("lmig-accept")
//!                         │  admits each connection into the in-flight table
//!                         │  (evicting the one with the least progress when full),
//!                         │  cuts connections past their handshake deadline
//!                         ▼
//!                       HandshakeWorker ("lmig-handshake", one per connection)
//!                         │  auth::accept; on failure a Reject frame, the
//!                         │  rejection hook, the connection closed
//!                         ▼
//!                       pending sets ──▶ accept_set (Listener::accept, reconnect)
//! ```
//!
//! A stranger costs its own connection and nothing else: its failure is
//! reported to the embedder ([`Rejection`](super::Rejection)) and counted ([`ListenerStats`]);
//! whoever waits for a channel keeps waiting. Only the listening socket
//! failing ends the waits with an error.
//!
//! The acceptor thread holds the listener's state weakly: it stops within
//! [`TICK`](super::acceptor::TICK) once the [`super::Listener`] and every channel it accepted (and
//! every handshake in flight) are gone (`listening.rs`, [`ListenerCore`](super::listening::ListenerCore)).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::eviction::{Cut, Table};
use super::reject::ListenerStats;
use super::{AcceptConn, ChannelConfig, Key, Stream, Streams, lock};
use crate::auth::ReplayCache;
use crate::error::{Result, TransportError};
use crate::wire::{Hello, SESSION_ID_LEN, StreamRole};

/// Streams of one (session, generation) accepted so far.
struct Pending {
    data_streams: u16,
    control: Option<Stream>,
    urgent: Option<Stream>,
    data: Vec<Option<Stream>>,
}

impl Pending {
    fn new(data_streams: u16) -> Self {
        Self {
            data_streams,
            control: None,
            urgent: None,
            data: (0..data_streams).map(|_| None).collect(),
        }
    }

    fn has(&self, role: StreamRole, index: u16) -> bool {
        match role {
            StreamRole::Control => self.control.is_some(),
            StreamRole::Urgent => self.urgent.is_some(),
            StreamRole::Data => self
                .data
                .get(usize::from(index))
                .is_some_and(Option::is_some),
        }
    }

    fn complete(&self) -> bool {
        self.control.is_some() && self.urgent.is_some() && self.data.iter().all(Option::is_some)
    }

    fn into_streams(self) -> Option<Streams> {
        Some(Streams {
            control: self.control?,
            urgent: self.urgent?,
            data: self.data.into_iter().collect::<Option<Vec<_>>>()?,
        })
    }
}

/// Authenticated streams, grouped by channel.
#[derive(Default)]
struct Sets {
    pending: HashMap<Key, Pending>,
    /// Sessions accepted, with their current generation.
    established: HashMap<[u8; SESSION_ID_LEN], u32>,
    /// The listening socket failed: (kind, what happened).
    stopped: Option<(io::ErrorKind, String)>,
}

/// What the acceptor thread, the handshake threads and the owners share.
pub(super) struct Shared {
    pub(super) acceptor: Box<dyn AcceptConn>,
    pub(super) config: ChannelConfig,
    pub(super) replay: Mutex<ReplayCache>,
    sets: Mutex<Sets>,
    /// Signalled when a stream is filed or the listener stops.
    ready: Condvar,
    pub(super) table: Mutex<Table>,
    /// The owners are gone: stop accepting.
    pub(super) closed: AtomicBool,
}

impl Shared {
    /// The state of a listener accepting on `acceptor`, nothing filed yet.
    pub(super) fn new(acceptor: Box<dyn AcceptConn>, config: ChannelConfig) -> Self {
        Self {
            acceptor,
            config,
            replay: Mutex::default(),
            sets: Mutex::default(),
            ready: Condvar::new(),
            table: Mutex::default(),
            closed: AtomicBool::new(false),
        }
    }

    /// The owners are gone: stop the acceptor, cut every handshake.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut t = lock(&self.table);
        while !t.in_flight.is_empty() {
            t.cut(0, Cut::Closed);
        }
        drop(t);
        self.ready.notify_all();
    }

    /// The counters now.
    pub(super) fn stats(&self) -> ListenerStats {
        let t = lock(&self.table);
        ListenerStats {
            in_flight: t.in_flight.len(),
            ..t.stats
        }
    }

    /// Wait until a complete set matching `want` is there, take it and
    /// record its session as established with its generation. Fails only
    /// when `wait` runs out or the listening socket failed.
    pub(super) fn accept_set(
        &self,
        want: &dyn Fn(&Key) -> bool,
        wait: Option<Duration>,
    ) -> Result<(Key, Streams)> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut sets = lock(&self.sets);
        loop {
            let found = sets
                .pending
                .iter()
                .find(|(k, p)| want(k) && p.complete())
                .map(|(k, _)| *k);
            if let Some(key) = found {
                if let Some(streams) = sets.pending.remove(&key).and_then(Pending::into_streams) {
                    sets.established.insert(key.0, key.1);
                    return Ok((key, streams));
                }
                continue;
            }
            if let Some((kind, what)) = &sets.stopped {
                return Err(TransportError::io(
                    "the listener stopped accepting",
                    io::Error::new(*kind, what.clone()),
                ));
            }
            sets = match deadline {
                None => self.ready.wait(sets).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(TransportError::Timeout {
                            waiting_for: "the dialer's streams",
                            after: wait.unwrap_or_default(),
                        });
                    }
                    self.ready
                        .wait_timeout(sets, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Does the announced stream fit (session, generation, lane)?
    pub(super) fn check(&self, h: &Hello) -> Result<()> {
        let bad = |detail: String| Err(TransportError::Handshake { detail });
        let sets = lock(&self.sets);
        match (h.generation, sets.established.get(&h.session).copied()) {
            (0, Some(_)) => return bad("a new stream for a session already established".into()),
            (g, Some(cur)) if g <= cur => return bad(format!("stale generation {g}")),
            (g, None) if g > 0 => return bad("reconnect for an unknown session".into()),
            _ => {}
        }
        if let Some(p) = sets.pending.get(&(h.session, h.generation)) {
            if p.data_streams != h.data_streams {
                return bad("streams disagree on the number of data lanes".into());
            }
            if p.has(h.role, h.index) {
                return bad(format!(
                    "{} stream {} announced twice",
                    h.role.name(),
                    h.index
                ));
            }
        }
        Ok(())
    }

    /// File an authenticated stream under its session and wake the waiters.
    pub(super) fn file(&self, hello: &Hello, stream: Stream) -> Result<()> {
        let mut sets = lock(&self.sets);
        if self.closed.load(Ordering::Acquire) {
            stream.writer.shutdown_conn();
            return Err(self.cut_error(Cut::Closed));
        }
        let p = sets
            .pending
            .entry((hello.session, hello.generation))
            .or_insert_with(|| Pending::new(hello.data_streams));
        // Checked before the proof; two streams of a keyholder racing for
        // one lane are caught here.
        if p.data_streams != hello.data_streams || p.has(hello.role, hello.index) {
            stream.writer.shutdown_conn();
            return Err(TransportError::Handshake {
                detail: format!(
                    "{} stream {} does not fit its channel any more",
                    hello.role.name(),
                    hello.index
                ),
            });
        }
        match hello.role {
            StreamRole::Control => p.control = Some(stream),
            StreamRole::Urgent => p.urgent = Some(stream),
            StreamRole::Data => {
                if let Some(slot) = p.data.get_mut(usize::from(hello.index)) {
                    *slot = Some(stream);
                }
            }
        }
        drop(sets);
        self.ready.notify_all();
        Ok(())
    }

    /// The listening socket failed for good: wake every waiter with it.
    pub(super) fn stop(&self, e: &io::Error) {
        lock(&self.sets).stopped = Some((e.kind(), e.to_string()));
        self.ready.notify_all();
    }
}
