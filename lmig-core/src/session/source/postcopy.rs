//! The source after `Commit`: the post-copy service (push, requests,
//! recovery), the digests, and the wait for `Done`.
//!
//! Three thread roles serve post-copy beside the session's own thread:
//! the [`Pusher`] sends the queue ([`PushQueue`]: around recent faults
//! first, then in address order) on the data lanes; the [`RequestServer`]
//! answers `PageRequest`s on the urgent lane the moment they arrive; the
//! [`DigestJob`] hashes the frozen memory beside the push. The session's
//! thread ([`Service::listen`]) reads the control lane: `Resync`, `Done`,
//! and requests of a channel without an urgent lane.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, TryLockError};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use super::push::{HOLDOFF_BEAT, HOLDOFF_QUIET, HoldOff, PushGate, PushQueue, requested_as_asked};
use super::{Source, SourceReport};
use crate::error::{MigrationError, Result};
use crate::model::{PageRun, RegionLayout, RegionPages};
use crate::protocol::{CHUNK_PAGES, Message, RegionDigest, Verification};
use crate::session::pace::Meter;
use crate::session::pages::{PageSender, Sent, lane_of};
use crate::session::{contain, reconnect_within, spawn_named, unexpected};
use crate::traits::{
    Channel, DirtyTracker, Event, MemorySource, Observer, Phase, SocketSource, StateSource,
};
use crate::verify::PageHashes;

/// How often the post-copy urgent thread checks whether the session ended.
const URGENT_TICK: Duration = Duration::from_millis(20);

/// How long the control lane is read at a time after `Commit`.
const CONTROL_TICK: Duration = Duration::from_millis(20);

/// Most pages of one request sent again because they were sent before
/// (see [`Service::serve_request`]): a fault asks for one page; a larger
/// request (a program asking ahead for a range) gets the rest by the push.
const RESEND_PAGES: u64 = CHUNK_PAGES as u64;
/// Most warnings kept about unexpected messages after `Commit`.
const MAX_WARNINGS: usize = 16;

/// Most page requests answered together: after one arrives, the request
/// server takes up to this many more already received and writes all their
/// replies at once (see [`RequestServer::run`]).
const REQUEST_BATCH: usize = 256;

/// Round number used for pages sent after `Commit`.
const POSTCOPY_ROUND: u32 = u32::MAX;

impl<'a, C, M, T, P, K> Source<'a, C, M, T, P, K>
where
    C: Channel,
    M: MemorySource,
    T: DirtyTracker,
    P: StateSource,
    K: SocketSource,
{
    /// After `Commit`: post-copy service, digests, wait for `Done`.
    ///
    /// Recovery: when the channel breaks (a `recv` error here or a send
    /// error in the pusher), the pusher pauses, this thread calls
    /// [`Channel::reconnect`] (retried until `done_timeout`) and waits for
    /// the destination's `Resync(missing)`: exactly those runs go back into
    /// the queue (pages the destination has are never sent again), the
    /// digests are sent again if they were, and the pusher resumes.
    pub(super) fn after_commit(
        &mut self,
        layout: &RegionLayout,
        unsent: RegionPages,
        report: &mut SourceReport,
    ) -> Result<Verification> {
        let postcopy = !unsent.is_empty();
        let _phase = phase_span!("after_commit", postcopy = postcopy, pages = unsent.count());
        if postcopy {
            self.phase(Phase::Postcopy);
        }
        let batch = self.config.batch_pages.clamp(1, CHUNK_PAGES);
        let service = Service {
            memory: &self.memory,
            channel: &self.channel,
            layout,
            observer: &*self.observer,
            meter: &self.meter,
            push: Mutex::new(PushQueue::new(unsent)),
            gate: PushGate::new(),
            holdoff: HoldOff::new(
                if postcopy {
                    self.config.push_holdoff
                } else {
                    Duration::ZERO
                },
                if self.config.push_holdoff_until_settled {
                    Duration::MAX
                } else {
                    HOLDOFF_QUIET
                },
            ),
            idle_push: self.config.idle_lanes.filter(|_| self.config.idle_push),
            pushed: AtomicU64::new(0),
            lanes: self.channel.data_lanes().max(1),
            batch,
            small: self.config.push_pages.clamp(1, CHUNK_PAGES),
            resend: self.config.resend_in_flight,
            catching_up: AtomicBool::new(false),
            requested: Mutex::new(Sent::default()),
            heard: AtomicU64::new(0),
            serving: AtomicBool::new(true),
            done_timeout: self.config.done_timeout,
            verify: self.config.verify,
            postcopy,
        };
        let mut warnings = Vec::new();
        let outcome = std::thread::scope(|s| -> Result<Verification> {
            let threads = match PostcopyThreads::spawn(s, &service) {
                Ok(threads) => threads,
                Err(e) => {
                    service.stop();
                    return Err(e);
                }
            };
            let PostcopyThreads {
                mut digest_job,
                pusher,
                server,
            } = threads;
            // A panic in the program's memory (read for the digests or a
            // request) must not leave the other threads serving forever:
            // it ends the service like an error, and they are stopped below.
            let served = contain("in the post-copy service", true, || {
                service.listen(&pusher, &mut digest_job, &mut warnings)
            });
            service.stop();
            server.join();
            let requested = *lock(&service.requested);
            let pushed = pusher.join()?;
            report.postcopy_pages = pushed.pages + requested.pages;
            report.requested_pages = requested.pages;
            report.holdoff_settled = service.holdoff.ended_by_settle();
            report.pages_sent += pushed.pages + requested.pages;
            report.zero_pages += pushed.zero_pages + requested.zero_pages;
            report.bytes_sent += pushed.bytes + requested.bytes;
            served
        });
        report.warnings.extend(warnings);
        outcome
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the source's post-copy threads share.
struct Service<'s, M, C> {
    memory: &'s M,
    channel: &'s C,
    layout: &'s RegionLayout,
    observer: &'s dyn Observer,
    /// Counts what goes out; holds the push to the bandwidth limit.
    meter: &'s Meter,
    /// Pages not sent yet, in push order.
    push: Mutex<PushQueue>,
    gate: PushGate,
    /// The push waits while the program's first requests are answered.
    holdoff: HoldOff,
    /// Moves the pusher to the lowest class (`SourceConfig::idle_push`).
    idle_push: Option<fn(bool) -> bool>,
    /// Pages pushed so far (for progress events).
    pushed: AtomicU64,
    lanes: usize,
    /// Pages per pushed message.
    batch: u32,
    /// Pages per pushed message while the program catches up with the push.
    small: u32,
    /// Send requested pages again that were sent before
    /// (`SourceConfig::resend_in_flight`).
    resend: bool,
    /// The last request named only pages already sent: the program
    /// reads close behind the push (see `SourceConfig::push_pages`).
    catching_up: AtomicBool,
    /// Requests served: counted by whichever thread serves them.
    requested: Mutex<Sent>,
    /// Messages the request server read (signs of life).
    heard: AtomicU64,
    /// The request server keeps going.
    serving: AtomicBool,
    done_timeout: Duration,
    verify: bool,
    postcopy: bool,
}

impl<'s, M: MemorySource, C: Channel> Service<'s, M, C> {
    /// Answer a requested run on the urgent lane: its still-unsent pages,
    /// and with `resend` again (up to [`RESEND_PAGES`]) those sent before. The destination
    /// asks only for pages it has not placed, so a page sent before is still
    /// in flight, queued behind pushed data on its way or waiting to be
    /// placed after it: waiting for it was the post-copy fault tail (up to
    /// the whole queue of pushed messages, milliseconds). The copy on the
    /// urgent lane arrives in a round trip; whichever comes second is
    /// dropped there as a duplicate (memory no longer changes here, so both
    /// carry the same bytes).
    ///
    /// `sender` holds the replies ([`PageSender::holding_urgent`]): they
    /// leave with those of the other requests at hand in
    /// [`Service::answer`].
    fn serve_request(&self, sender: &mut PageSender<'_, M, C>, run: PageRun) -> Result<Sent> {
        let mut sent = Sent::default();
        if self.layout.check_run(&run).is_err() {
            return Ok(sent);
        }
        let queue = if self.resend {
            // The pusher holds the queue only for a moment, but in a lower
            // class it may lose its CPU in that moment: a request never
            // waits for it. The run goes as asked, and the copy the push
            // sends later is dropped there as a duplicate.
            match self.push.try_lock() {
                Ok(q) => Some(q),
                Err(TryLockError::WouldBlock) => None,
                Err(TryLockError::Poisoned(_)) => panic!("push queue poisoned"),
            }
        } else {
            Some(self.push.lock().expect("push queue poisoned"))
        };
        let (unsent, again) = match queue {
            Some(mut q) => {
                let again = if self.resend {
                    q.sent_before(&run, self.batch, RESEND_PAGES)
                } else {
                    Vec::new()
                };
                let unsent = q.take_requested(&run, self.batch);
                self.catching_up.store(unsent.is_empty(), Ordering::Relaxed);
                (unsent, again)
            }
            None => (
                requested_as_asked(&run, self.batch, RESEND_PAGES),
                Vec::new(),
            ),
        };
        let mut runs = unsent;
        runs.extend(again);
        runs.sort_by_key(|r| r.first);
        for r in runs {
            sent.add(sender.send_run(r, POSTCOPY_ROUND, 0, true)?);
        }
        Ok(sent)
    }

    /// Answer `requests` (the ones at hand, in arrival order): every reply
    /// is encoded first, then all go out in one urgent write.
    fn answer(&self, sender: &mut PageSender<'_, M, C>, requests: &[PageRun]) {
        let mut sent = Sent::default();
        let mut outcome = Ok(());
        for &run in requests {
            match self.serve_request(sender, run) {
                Ok(s) => sent.add(s),
                Err(e) => {
                    debug!(error = %e, run = %run, "post-copy: a requested run could not be read");
                    outcome = Err(e);
                    break;
                }
            }
        }
        // What was read before a failure still goes out.
        let flushed = sender.flush_urgent();
        self.holdoff.request();
        match outcome.and(flushed) {
            Ok(()) => lock(&self.requested).add(sent),
            Err(e) => {
                debug!(error = %e, requests = requests.len(), "post-copy: requested pages could not be sent: the link is broken");
                self.gate.broken(self.gate.epoch())
            }
        }
    }

    /// Pages per pushed message now.
    fn push_size(&self) -> u32 {
        if self.catching_up.load(Ordering::Relaxed) {
            self.small
        } else {
            self.batch
        }
    }

    /// The destination's program ran the work that waited for pages after
    /// the resume (`Message::DemandSettled`): the push may start.
    fn settled(&self) {
        debug!("post-copy: the destination's demand settled: the push hold-off ends");
        self.holdoff.settle();
    }

    /// Wait out the push's hold-off (ends early when the session does).
    fn hold_off(&self) {
        self.holdoff.wait(|| self.holdoff_stop());
    }

    /// The session ended or the link broke: the hold-off's waits end.
    fn holdoff_stop(&self) -> bool {
        !self.serving.load(Ordering::Acquire) || self.gate.is_broken()
    }

    /// The session is over: the pusher and the request server stop.
    fn stop(&self) {
        self.gate.finish();
        self.serving.store(false, Ordering::Release);
    }

    /// Re-establish a broken channel (bounded by `done_timeout`). The pusher
    /// stays paused until the destination's `Resync` arrives.
    fn reconnect(&self, warnings: &mut Vec<String>, why: &str) -> Result<()> {
        let attempts = reconnect_within(self.channel, self.done_timeout, why)?;
        self.gate.reconnected();
        warn!(
            why = why,
            attempts = attempts,
            "post-copy: the channel broke and was reconnected"
        );
        warnings.push(format!(
            "post-copy: the channel broke ({why}); reconnected after {attempts} attempt(s)"
        ));
        Ok(())
    }

    /// Send the digests; a failed send breaks the link.
    fn send_digests(&self, digests: &[RegionDigest]) -> bool {
        let sent = self.channel.send(&Message::Digests(digests.to_vec()));
        if let Err(e) = &sent {
            debug!(error = %e, "post-copy: sending the digests failed: the link is broken");
        }
        let ok = sent.is_ok();
        if !ok {
            self.gate.broken(self.gate.epoch());
        }
        ok
    }

    /// The session's thread after `Commit`: read the control lane until
    /// `Done`, sending the digests once everything was pushed, reconnecting
    /// when the link breaks.
    fn listen(
        &self,
        pusher: &Pusher<'_>,
        digest_job: &mut Option<DigestJob<'_>>,
        warnings: &mut Vec<String>,
    ) -> Result<Verification> {
        let mut urgent = PageSender::new(self.memory, self.channel, self.layout)
            .metered(self.meter, false, None)
            .holding_urgent();
        let mut digests: Option<Vec<RegionDigest>> = None;
        let mut idle = Duration::ZERO;
        let mut last_heard = 0;
        loop {
            if self.verify && digests.is_none() && self.gate.pushed_all() {
                let hashes = match digest_job.take() {
                    Some(job) => job.join()?,
                    None => PageHashes::of_memory(self.memory, self.layout)?,
                };
                let d = hashes.digests();
                self.send_digests(&d);
                digests = Some(d);
            }
            if self.gate.is_broken() && !self.gate.is_reconnected() {
                self.reconnect(warnings, "a send failed")?;
                idle = Duration::ZERO;
            }
            let msg = match self.channel.recv(Some(CONTROL_TICK)) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    if let Some(v) = self.quiet_tick(pusher, &mut idle, &mut last_heard)? {
                        return Ok(v);
                    }
                    continue;
                }
                Err(e) => {
                    if !self.postcopy {
                        return Err(e);
                    }
                    self.gate.broken(self.gate.epoch());
                    self.reconnect(warnings, &e.to_string())?;
                    idle = Duration::ZERO;
                    continue;
                }
            };
            idle = Duration::ZERO;
            match msg {
                Message::PageRequest(run) => self.answer(&mut urgent, &[run]),
                Message::DemandSettled => self.settled(),
                Message::Resync(missing) => {
                    info!(runs = missing.len(), "post-copy: the destination resynced");
                    self.resync(missing, digests.as_deref())
                }
                Message::Done(v) => return Ok(v),
                // Late (after the source's bound) or in post-copy, where
                // the source does not wait for it: nothing to do.
                Message::SocketsActive => {}
                // Only a destination that failed before `Commit` sends
                // `Abort`: it discarded everything (the program runs
                // nowhere), which the caller must hear.
                abort @ Message::Abort { .. } => {
                    return Err(unexpected("post-commit", "PageRequest or Done", &abort));
                }
                // Anything else (a duplicated `Ready` or `Prepared`) is
                // dropped with a warning, as the destination does after
                // `Commit`: ending the service here would leave a
                // post-copy destination without its pages, and a stray
                // message is no reason to stop waiting for `Done`.
                other => {
                    if warnings.len() < MAX_WARNINGS {
                        warnings.push(format!(
                            "after Commit: ignored an unexpected {} from the destination",
                            other.name()
                        ));
                    }
                }
            }
        }
    }

    /// A control tick without a message: the destination's silence, `idle`,
    /// grows and is bounded by `done_timeout`. `Some` when the session ends
    /// here (the pusher failed; its error is reported by its join).
    fn quiet_tick(
        &self,
        pusher: &Pusher<'_>,
        idle: &mut Duration,
        last_heard: &mut u64,
    ) -> Result<Option<Verification>> {
        *idle += CONTROL_TICK;
        // Requests read by the urgent thread count as signs of life too.
        let h = self.heard.load(Ordering::Relaxed);
        if h != *last_heard {
            *last_heard = h;
            *idle = Duration::ZERO;
        }
        if pusher.is_finished() {
            return Ok(Some(Verification::NotChecked));
        }
        if self.postcopy && !self.gate.pushed_all() {
            // The destination has nothing to say while pages are still to
            // come (held off or pushed, however slowly the bandwidth limit
            // lets them go): its silence counts from the push's end. A lost
            // destination fails the push's sends meanwhile.
            *idle = Duration::ZERO;
        }
        if *idle >= self.done_timeout {
            return Err(MigrationError::Timeout {
                waiting_for: "Done",
                after: self.done_timeout,
            });
        }
        Ok(None)
    }

    /// The destination's `Resync`: requeue exactly the runs it misses, send
    /// the digests again if they were, and let the pusher go on.
    fn resync(&self, missing: Vec<PageRun>, digests: Option<&[RegionDigest]>) {
        {
            let mut q = self.push.lock().expect("push queue poisoned");
            for run in missing {
                if self.layout.check_run(&run).is_ok() {
                    q.requeue(&run);
                }
            }
        }
        if let Some(d) = digests {
            if !self.send_digests(d) {
                return;
            }
        }
        self.gate.resume();
    }
}

/// The threads of the post-copy service, spawned in this order.
struct PostcopyThreads<'scope> {
    digest_job: Option<DigestJob<'scope>>,
    pusher: Pusher<'scope>,
    server: RequestServer<'scope>,
}

impl<'scope> PostcopyThreads<'scope> {
    fn spawn<'env, M: MemorySource, C: Channel>(
        scope: &'scope Scope<'scope, 'env>,
        service: &'scope Service<'_, M, C>,
    ) -> Result<Self> {
        // The memory stopped changing at the freeze: its digests are
        // taken beside the push instead of after it, where that pass
        // over all of memory came before `Done`.
        let digest_job = if service.verify && service.postcopy {
            Some(DigestJob::spawn(scope, service)?)
        } else {
            None
        };
        Ok(Self {
            digest_job,
            pusher: Pusher::spawn(scope, service)?,
            server: RequestServer::spawn(scope, service)?,
        })
    }
}

/// The thread pushing the queue on the data lanes, run by run.
struct Pusher<'scope> {
    thread: ScopedJoinHandle<'scope, Sent>,
}

impl<'scope> Pusher<'scope> {
    fn spawn<'env, M: MemorySource, C: Channel>(
        scope: &'scope Scope<'scope, 'env>,
        service: &'scope Service<'_, M, C>,
    ) -> Result<Self> {
        let thread = spawn_named(scope, "lmig-push".into(), move || Self::run(service))?;
        Ok(Self { thread })
    }

    fn run<M: MemorySource, C: Channel>(service: &Service<'_, M, C>) -> Sent {
        // Below the request server (and, on a shared host, the program):
        // the push takes the CPU they leave.
        service.memory.background_thread();
        if let Some(idle) = service.idle_push {
            idle(true);
        }
        // Held to the bandwidth limit until the session ends.
        let ended = || !service.serving.load(Ordering::Acquire);
        let mut sender = PageSender::new(service.memory, service.channel, service.layout).metered(
            service.meter,
            true,
            Some(&ended),
        );
        let mut total = Sent::default();
        // The program's first requests go first (bounded); one page now
        // and then tells the destination the source is still there.
        while !service
            .holdoff
            .wait_at_most(|| service.holdoff_stop(), HOLDOFF_BEAT)
        {
            if !Self::push_next(service, &mut sender, &mut total, 1) {
                return total;
            }
        }
        while Self::push_next(service, &mut sender, &mut total, service.push_size()) {}
        total
    }

    /// Push the next run of at most `max` pages; false once the session is over.
    fn push_next<M: MemorySource, C: Channel>(
        service: &Service<'_, M, C>,
        sender: &mut PageSender<'_, M, C>,
        total: &mut Sent,
        max: u32,
    ) -> bool {
        let Some((run, epoch)) = service.gate.next(&service.push, max) else {
            return false;
        };
        // Flushed run by run: a faulting thread may wait for any of them.
        match sender
            .send_run(run, POSTCOPY_ROUND, lane_of(&run, service.lanes), false)
            .and_then(|sent| service.channel.flush().map(|()| sent))
        {
            Ok(sent) => total.add(sent),
            // Lost or not: the destination's `Resync` says.
            Err(_) => service.gate.broken(epoch),
        }
        let n = service
            .pushed
            .fetch_add(u64::from(run.count), Ordering::Relaxed);
        if n % 16384 < u64::from(run.count) {
            service.observer.event(&Event::Progress {
                pages: n,
                bytes: total.bytes,
                total_pages: service.layout.total_pages(),
            });
        }
        true
    }

    fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// What the pusher sent; a panic in it travels on.
    fn join(self) -> Result<Sent> {
        Ok(self
            .thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p)))
    }
}

/// The thread answering page requests on the urgent lane the moment they
/// arrive, never behind a message the session's thread is handling; with a
/// channel without `recv_urgent` the session's thread answers them.
struct RequestServer<'scope> {
    thread: ScopedJoinHandle<'scope, ()>,
}

impl<'scope> RequestServer<'scope> {
    fn spawn<'env, M: MemorySource, C: Channel>(
        scope: &'scope Scope<'scope, 'env>,
        service: &'scope Service<'_, M, C>,
    ) -> Result<Self> {
        let thread = spawn_named(scope, "lmig-requests".into(), move || Self::run(service))?;
        Ok(Self { thread })
    }

    fn run<M: MemorySource, C: Channel>(service: &Service<'_, M, C>) {
        service.memory.urgent_thread();
        let mut sender = PageSender::new(service.memory, service.channel, service.layout)
            .metered(service.meter, false, None)
            .holding_urgent();
        let mut requests = Vec::with_capacity(REQUEST_BATCH);
        while service.serving.load(Ordering::Acquire) {
            match service.channel.recv_urgent(URGENT_TICK) {
                Ok(Some(msg)) => {
                    requests.clear();
                    Self::take(service, msg, &mut requests);
                    // Every further request already received (bounded)
                    // is answered with this one: their replies go out in
                    // one write instead of one write (and, encrypted, one
                    // record) each.
                    while requests.len() < REQUEST_BATCH {
                        match service.channel.recv_urgent(Duration::ZERO) {
                            Ok(Some(msg)) => Self::take(service, msg, &mut requests),
                            // Nothing more now; an error shows again in
                            // the next wait.
                            Ok(None) | Err(_) => break,
                        }
                    }
                    if requests.len() > 1 {
                        debug!(
                            requests = requests.len(),
                            "post-copy: requests answered together"
                        );
                    }
                    service.answer(&mut sender, &requests);
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }

    /// Count `msg` as a sign of life and keep it if it is a page request
    /// (`DemandSettled`, behind the requests on the urgent lane, ends the
    /// push hold-off).
    fn take<M: MemorySource, C: Channel>(
        service: &Service<'_, M, C>,
        msg: Message,
        requests: &mut Vec<PageRun>,
    ) {
        service.heard.fetch_add(1, Ordering::Relaxed);
        match msg {
            Message::PageRequest(run) => requests.push(run),
            Message::DemandSettled => service.settled(),
            _ => {}
        }
    }

    /// Wait for the server to stop ([`Service::stop`]); a panic in it travels on.
    fn join(self) {
        self.thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

/// The thread hashing the frozen memory for the digests.
struct DigestJob<'scope> {
    thread: ScopedJoinHandle<'scope, Result<PageHashes>>,
}

impl<'scope> DigestJob<'scope> {
    fn spawn<'env, M: MemorySource, C: Channel>(
        scope: &'scope Scope<'scope, 'env>,
        service: &'scope Service<'_, M, C>,
    ) -> Result<Self> {
        let thread = spawn_named(scope, "lmig-digest".into(), move || {
            // Needed only for `Done`: never before the push or a request.
            service.memory.background_thread();
            service.hold_off();
            PageHashes::of_memory(service.memory, service.layout)
        })?;
        Ok(Self { thread })
    }

    /// The hashes; a panic in the hashing is an error.
    fn join(self) -> Result<PageHashes> {
        self.thread.join().unwrap_or_else(|_| {
            Err(MigrationError::backend(
                "post-copy digests",
                "the hashing thread panicked",
            ))
        })
    }
}
