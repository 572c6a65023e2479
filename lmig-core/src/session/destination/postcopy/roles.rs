//! The destination's post-copy fault-path threads: either one thread that
//! forwards the program's faults and places the replies ([`FaultPath`]),
//! or two ([`FaultForwarder`] and [`ReplyPlacer`]).
//!
//! One thread is used when
//! [`DestinationConfig::one_fault_thread`](super::super::DestinationConfig::one_fault_thread)
//! is on (by default exactly when the sink's fault wait spins,
//! [`MemorySink::fault_wait_spins`]), the memory sink can wait for a fault
//! and a descriptor at once ([`MemorySink::waits_fault_or`]) and the
//! channel's urgent lane has a descriptor ([`Channel::urgent_fd`]). The
//! thread that sent a request is then the one the reply
//! wakes (or finds spinning, with the sink's fault spin): one thread and
//! one CPU stay busy across the whole fault, instead of two threads that
//! each have to be woken.

use std::sync::atomic::Ordering;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use super::{MAX_OUTSTANDING, PostcopyLink, REQUEST_BATCH, Service, lock};
use crate::error::Result;
use crate::model::PageRun;
use crate::protocol::Message;
use crate::session::{contain, panicked, spawn_named};
use crate::traits::{Channel, MemorySink};

/// Longest wait for a reply on the channel's queue while the urgent lane
/// has no descriptor to poll (a reader thread still reads it, until the
/// first reply after the first `recv_urgent`; or it is being
/// re-established): the faults are looked at between these waits.
const NO_FD_TICK: Duration = Duration::from_micros(200);
/// Most replies [`FaultPath`] places in one pass before it looks at the
/// faults again.
const REPLY_BATCH: usize = 64;

/// The thread forwarding the faults (alone, or also placing the replies):
/// its name, and where a panic in it happened.
const FAULTS: (&str, &str) = ("lmig-faults", "in the post-copy fault thread");
/// The thread placing the replies, when it is a thread of its own.
const REPLIES: (&str, &str) = ("lmig-replies", "in the post-copy urgent thread");

/// Scratch space of a thread forwarding faults: the runs at hand and the
/// messages of one write.
#[derive(Default)]
struct Forwarding {
    runs: Vec<PageRun>,
    messages: Vec<Message>,
}

/// A running post-copy thread (of the roles below). Its error or panic
/// marks post-copy failed, so that the session's thread stops too; a panic
/// is contained where it happens (see [`contain`]).
pub(super) struct RoleThread<'scope> {
    thread: ScopedJoinHandle<'scope, Result<()>>,
    during: &'static str,
}

impl<'scope> RoleThread<'scope> {
    fn spawn<'env, M: MemorySink, C: Channel>(
        scope: &'scope Scope<'scope, 'env>,
        (name, during): (&str, &'static str),
        service: &'scope Service<'_, M, C>,
        run: fn(&Service<'_, M, C>) -> Result<()>,
    ) -> Result<Self> {
        let thread = spawn_named(scope, name.into(), move || {
            let r = contain(during, true, || run(service));
            if r.is_err() {
                service.link.failed.store(true, Ordering::Release);
            }
            r
        })?;
        Ok(Self { thread, during })
    }

    /// The thread's outcome (once `PostcopyLink::stop` is set).
    pub(super) fn join(self) -> Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|p| Err(panicked(self.during, true, &*p)))
    }
}

/// The running fault-path threads: one, or the fault thread and the reply
/// thread.
pub(super) struct FaultThreads<'scope> {
    faults: RoleThread<'scope>,
    replies: Option<RoleThread<'scope>>,
}

impl<'scope> FaultThreads<'scope> {
    /// Start one thread when `one` and both the sink and the channel allow
    /// it, else two.
    pub(super) fn spawn<'env, M: MemorySink, C: Channel>(
        scope: &'scope Scope<'scope, 'env>,
        service: &'scope Service<'_, M, C>,
        one: bool,
    ) -> Result<Self> {
        if one && service.memory.waits_fault_or() && service.channel.urgent_fd().is_ok() {
            debug!("post-copy: one thread forwards the faults and places the replies");
            let faults = RoleThread::spawn(scope, FAULTS, service, FaultPath::run)?;
            return Ok(Self {
                faults,
                replies: None,
            });
        }
        let faults = RoleThread::spawn(scope, FAULTS, service, FaultForwarder::run)?;
        let replies = Some(RoleThread::spawn(
            scope,
            REPLIES,
            service,
            ReplyPlacer::run,
        )?);
        Ok(Self { faults, replies })
    }

    /// The threads' outcome (once `PostcopyLink::stop` is set): the reply
    /// thread's error first.
    pub(super) fn join(self) -> Result<()> {
        let faulted = self.faults.join();
        let replied = self.replies.map_or(Ok(()), RoleThread::join);
        replied.and(faulted)
    }
}

/// The thread role turning the program's faults into `PageRequest`s on the
/// urgent lane (remembered, to repeat them after a reconnect).
struct FaultForwarder;

impl FaultForwarder {
    fn run<M: MemorySink, C: Channel>(service: &Service<'_, M, C>) -> Result<()> {
        service.memory.urgent_thread();
        let mut scratch = Forwarding::default();
        while !service.link.stop.load(Ordering::Acquire) {
            // Returns early when the program says its parked work ran
            // (lmig-mem's residency wakes it): the word goes out below.
            let first = service.memory.wait_fault(service.poll)?;
            Self::forward(service, first, &mut scratch)?;
        }
        Ok(())
    }

    /// Send the request for `first` (a fault just read, if any) with every
    /// other already waiting, and the program's word that its parked work
    /// ran if it came, in one write.
    fn forward<M: MemorySink, C: Channel>(
        service: &Service<'_, M, C>,
        first: Option<PageRun>,
        scratch: &mut Forwarding,
    ) -> Result<()> {
        let link = service.link;
        let requests = &mut scratch.messages;
        requests.clear();
        // Every request already waiting goes with this one, in one
        // write (a program that parks many requests at once, or many
        // threads faulting together, costs one write, not one each),
        // taken in one call (the sink looks for faults once for them all).
        if let Some(run) = first {
            requests.push(Message::PageRequest(run));
            scratch.runs.clear();
            service
                .memory
                .take_faults(&mut scratch.runs, REQUEST_BATCH - 1)?;
            requests.extend(scratch.runs.drain(..).map(Message::PageRequest));
            Self::remember(link, requests);
        }
        // Behind the requests on the same lane: the source answers
        // them before its push starts.
        if link.settle.take() {
            debug!("post-copy: the program's parked work has run: DemandSettled sent");
            requests.push(Message::DemandSettled);
        }
        if requests.is_empty() {
            return Ok(());
        }
        if requests.len() > 1 {
            debug!(
                requests = requests.len(),
                "post-copy: requests sent together"
            );
        }
        if link.up.load(Ordering::Acquire) && service.channel.send_urgent_many(requests).is_err() {
            // The session's thread reconnects; the request is
            // repeated after the resync.
            link.up.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Count the page requests in `requests` and remember them for
    /// repetition after a reconnect.
    fn remember(link: &PostcopyLink, requests: &[Message]) {
        link.faults
            .fetch_add(requests.len() as u64, Ordering::Relaxed);
        let mut o = lock(&link.outstanding);
        for m in requests {
            if let Message::PageRequest(run) = m {
                if o.len() == MAX_OUTSTANDING {
                    o.pop_front();
                }
                o.push_back(*run);
            }
        }
    }
}

/// What one look at the urgent lane gave.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Replies {
    /// Nothing more there now.
    Drained,
    /// The pass stopped at [`REPLY_BATCH`]: more may be buffered.
    More,
    /// The lane is closed (the session is over) or not read here (the
    /// replies come through `recv`).
    Closed,
}

/// The thread role placing the replies to page requests from the urgent lane.
struct ReplyPlacer;

impl ReplyPlacer {
    fn run<M: MemorySink, C: Channel>(service: &Service<'_, M, C>) -> Result<()> {
        service.memory.urgent_thread();
        while !service.link.stop.load(Ordering::Acquire) {
            if Self::take(service, service.poll)? == Replies::Closed {
                break;
            }
        }
        Ok(())
    }

    /// Wait up to `wait` for the next urgent message and place it (a reply)
    /// or warn about it.
    fn take<M: MemorySink, C: Channel>(
        service: &Service<'_, M, C>,
        wait: Duration,
    ) -> Result<Replies> {
        match service.channel.recv_urgent(wait) {
            Ok(Some(Message::Pages(batch))) => service.place(&batch)?,
            Ok(Some(other)) => lock(service.shared).warn(format!(
                "post-copy: ignored an unexpected {} on the urgent lane",
                other.name()
            )),
            Ok(None) => return Ok(Replies::Drained),
            // Unsupported: replies come through `recv`;
            // closed: the session is over.
            Err(_) => return Ok(Replies::Closed),
        }
        Ok(Replies::More)
    }

    /// Place what the urgent lane has now (read already, buffered in the
    /// channel, or readable), at most [`REPLY_BATCH`] messages.
    fn drain<M: MemorySink, C: Channel>(service: &Service<'_, M, C>) -> Result<Replies> {
        for _ in 0..REPLY_BATCH {
            match Self::take(service, Duration::ZERO)? {
                Replies::More => {}
                done => return Ok(done),
            }
        }
        Ok(Replies::More)
    }
}

/// The thread role doing both of the above: it waits for a fault and for
/// the urgent lane in one wait ([`MemorySink::wait_fault_or`] with
/// [`Channel::urgent_fd`]), forwards the faults and places the replies.
struct FaultPath;

impl FaultPath {
    fn run<M: MemorySink, C: Channel>(service: &Service<'_, M, C>) -> Result<()> {
        service.memory.urgent_thread();
        let mut scratch = Forwarding::default();
        let mut lane_open = true;
        while !service.link.stop.load(Ordering::Acquire) {
            // What the lane has first: a reply already read into the
            // channel's buffers does not make its descriptor readable. The
            // first look also asks the channel to hand its urgent stream
            // to this thread.
            let replies = if lane_open {
                ReplyPlacer::drain(service)?
            } else {
                Replies::Closed
            };
            lane_open = replies != Replies::Closed;
            let also = match lane_open {
                true => service.channel.urgent_fd().ok().flatten(),
                false => None,
            };
            let first = if replies == Replies::Drained && also.is_none() {
                // No descriptor: a look at the faults, then a short wait
                // for a reply on the channel's queue (a reader thread's
                // message wakes it).
                let first = service.memory.wait_fault_or(None, Duration::ZERO)?;
                if first.is_none() {
                    let wait = NO_FD_TICK.min(service.poll);
                    lane_open = ReplyPlacer::take(service, wait)? != Replies::Closed;
                }
                first
            } else {
                let wait = match replies {
                    Replies::More => Duration::ZERO,
                    _ => service.poll,
                };
                // Returns early when the program says its parked work ran,
                // and when the lane turns readable (a reply: placed above).
                service.memory.wait_fault_or(also, wait)?
            };
            FaultForwarder::forward(service, first, &mut scratch)?;
        }
        Ok(())
    }
}
