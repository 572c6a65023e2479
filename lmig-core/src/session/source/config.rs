//! The source's configuration: how it moves memory and what it may do to
//! the program while it does.

use std::time::Duration;

use crate::protocol::CHUNK_PAGES;

/// How the source moves memory.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Pre-copy rounds until the policy freezes; a `Postcopy` decision is
    /// treated as `Freeze`.
    #[default]
    Precopy,
    /// Pre-copy rounds; when the policy says `Postcopy` (rounds stop
    /// converging), switch to post-copy for the pages still dirty. The
    /// default policy then falls back to post-copy
    /// ([`Fallback::Postcopy`](crate::policy::Fallback::Postcopy)), which
    /// it does as soon as its estimate says the rounds cannot reach the
    /// target ([`PolicyConfig::switch_ratio`](crate::policy::PolicyConfig::switch_ratio)).
    Hybrid,
    /// No rounds: freeze at once, resume at the destination, send every page after.
    Postcopy,
}

/// Settings of a [`Source`](super::Source): `SourceConfig::default()` and the `with_*`
/// setters (the struct is `#[non_exhaustive]`).
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub struct SourceConfig {
    /// Pre-copy, hybrid or post-copy.
    pub mode: Mode,
    /// Send digests of the frozen memory after `Commit` and have the
    /// destination check them before `Done` (costs the source one hashing
    /// pass after the commit, nothing during the freeze).
    pub verify: bool,
    /// Most time to wait for `Ready` after the freeze.
    pub ready_timeout: Duration,
    /// Most time without any message from the destination after `Commit`
    /// while the source waits for it: in post-copy counted from the end of
    /// the push (a destination has nothing to say while pages still come,
    /// however long a [`Self::push_holdoff`] or a [`Self::bandwidth_limit`]
    /// makes that; a lost one fails the push's sends meanwhile). Also the
    /// bound of a reconnection after `Commit`.
    pub done_timeout: Duration,
    /// Pages per `Pages` message of the pre-copy rounds and the freeze (at
    /// most [`CHUNK_PAGES`]).
    pub batch_pages: u32,
    /// Pages per pushed `Pages` message after `Commit` while the program
    /// catches up with the push (at most [`CHUNK_PAGES`]); otherwise the
    /// push uses `batch_pages`. A program reading its memory in order soon
    /// faults on pages already sent and waits for the message holding its
    /// page to arrive whole: smaller messages shorten that wait (it grows
    /// with the message size) for more per-message work (the whole transfer
    /// takes longer the smaller the messages), which a program faulting on
    /// pages not sent yet (answered on their own) does not need. The push
    /// switches to this size when a request names only pages already sent
    /// and back when one names a page not sent. Default 8, tuned for 4 KiB
    /// pages on a 2-vCPU virtual machine with source and destination on
    /// one host (figures in the benchmark docs).
    pub push_pages: u32,
    /// Answer a post-copy request for pages already pushed by sending them
    /// again on the urgent lane (at most 64 pages per request). The
    /// destination asks only for pages it has not placed, so such a page is
    /// still in flight behind pushed data, and its fault waits for all of
    /// that to be received and placed: milliseconds with deep queues, the
    /// post-copy fault tail. Sent again, it arrives in a round trip; the
    /// copy that comes second is dropped there (counted as a duplicate
    /// page). Default false: every page is sent exactly once.
    pub resend_in_flight: bool,
    /// Most time a shrinking pre-copy round waits for the destination to
    /// place its pages (`Prepared{placed}`) before the policy decides: the
    /// policy then sees the end-to-end bandwidth, and a freeze does not
    /// include placing a backlog. The program runs meanwhile.
    pub catch_up_timeout: Duration,
    /// The longest the freeze may last, from the pause to `Ready`
    /// (`None`, the default: no bound but `ready_timeout`). Checked after
    /// every freeze step and bounding the wait for `Ready`: past it the
    /// source aborts and resumes the program (sockets out of repair mode
    /// with every queued byte, network unlocked), the destination
    /// discards, and [`Source::run`](super::Source::run) returns
    /// [`MigrationError::FreezeDeadline`](crate::error::MigrationError::FreezeDeadline) naming the step. A step itself
    /// is not interrupted: the freeze lasts the bound plus the step that
    /// crossed it plus the unwinding.
    pub max_freeze: Option<Duration>,
    /// Most bytes per second the pages may take over every data stream
    /// together (0, the default: no limit); changeable while the session
    /// runs through [`SourceControl::set_bandwidth_limit`](super::SourceControl::set_bandwidth_limit), which says what
    /// it applies to. A token bucket: cheap (one atomic load per message)
    /// when there is no limit.
    pub bandwidth_limit: u64,
    /// The threads sending the pre-copy rounds ask the memory to lower
    /// their priority ([`MemorySource::background_thread`](crate::traits::MemorySource::background_thread)): on a busy
    /// host the program's own threads (its event loop answering clients)
    /// then get a CPU first, and the rounds take the CPU it leaves. The
    /// freeze and post-copy are not affected. Default false.
    pub yield_to_program: bool,
    /// Run the pre-copy rounds' senders in the host's lowest CPU class
    /// while the rounds shrink (`None`, the default: not at all). The hook
    /// moves the calling thread there (`true`) or back (`false`) and says
    /// whether it did; `lmig_mem::cpu::idle_thread` is one (Linux
    /// `SCHED_IDLE`: the senders then take only CPU time the program
    /// leaves, and a program thread that wakes up, an event loop with a
    /// request, preempts them at once). Each sender thread of a round
    /// calls it first (`true`); refused, the thread goes on as
    /// [`Self::yield_to_program`] says. The session stops asking once a
    /// round does not shrink (what got dirty during a round is more than
    /// half of what it sent): the rounds then need every CPU they can get
    /// to converge (auto-converge throttles the program from there). A
    /// sender still in the lowest class after [`Self::idle_round_limit`]
    /// of one round moves back (`false`): a program that leaves no CPU
    /// never stalls the migration. The freeze and post-copy never use it.
    /// The signal is the rounds' own (pages sent, pages dirtied), which
    /// every program has; no latency figure of the program is needed.
    pub idle_lanes: Option<fn(bool) -> bool>,
    /// The longest a pre-copy round's senders stay in the lowest class
    /// ([`Self::idle_lanes`]); default 2 s.
    pub idle_round_limit: Duration,
    /// The share of the time (percent, 1..=100) a sender in the lowest
    /// class ([`Self::idle_lanes`]) works: after each chunk that brings its
    /// work since the last rest to [`IDLE_WORK_SLICE`] or more, it sleeps
    /// for the rest of the share (at most [`IDLE_MAX_REST`] at once).
    /// Default 100: no rest. The lowest class alone gives the program a
    /// CPU only once the scheduler places the program's thread there;
    /// with every CPU busy with senders, a thread woken by another thread
    /// of the program tends to queue behind it instead. A rest leaves CPUs
    /// idle at times, where the scheduler then places it. Only while the
    /// senders are in the lowest class: never in a round that does not
    /// shrink, the freeze or post-copy.
    pub idle_duty: u8,
    /// The most sender threads of a round while they are in the lowest
    /// class ([`Self::idle_lanes`]); 0 (the default): one per data lane.
    /// Fewer threads than lanes send the same chunks on the same lanes,
    /// each thread taking turns over its lanes. With a sender on every CPU
    /// the scheduler sees no CPU with spare time and places a woken
    /// program thread on the CPU of the thread that woke it, where it
    /// queues behind that thread; one CPU left to the program and its
    /// clients avoids that. Only while the senders are in the lowest
    /// class: a round that does not shrink, the freeze and post-copy use a
    /// thread per lane.
    pub idle_threads: usize,
    /// Where a sender in the lowest class ([`Self::idle_lanes`]) runs
    /// (`None`, the default: wherever the scheduler puts it). Each such
    /// sender calls the hook with `true` before each chunk, and with
    /// `false` when it leaves the lowest class; the embedder moves the
    /// calling thread (lmig's own sender, never one of the program's),
    /// e.g. off the CPU its event loop last ran on, and back. Only while
    /// the senders are in the lowest class.
    pub idle_place: Option<fn(bool)>,
    /// After `Commit`, the post-copy push (and the digests' hashing) waits
    /// up to this long while the page requests are answered at once
    /// (default zero: the push starts at once). Right after the resume a
    /// program asks for the pages of the work that piled up in the freeze;
    /// a push starting at the same moment takes most of the CPU and the
    /// link from those requests and from the program itself (on a host
    /// shared with the destination). The wait ends early once requests
    /// came and none came for a few ms (the first burst is answered), and
    /// never lasts longer than this: requests that keep coming never hold
    /// the push back for good. It also ends at once when the destination
    /// says its program's waiting work has run (`Message::DemandSettled`).
    /// Any bound works: while it lasts the push still sends one page every
    /// 500 ms, so that a destination does not take the wait for a lost
    /// source (its `DestinationConfig::idle_timeout`, 30 s by default, must
    /// stay above that), and the source's [`Self::done_timeout`] does not
    /// count it.
    pub push_holdoff: Duration,
    /// Post-copy: the hold-off ([`Self::push_holdoff`]) waits for the
    /// destination's `DemandSettled` (or its bound), not for a few ms
    /// without requests (default false). For a destination whose program
    /// says when it has run the work parked after the resume
    /// ([`PageResidency::settled`](crate::traits::PageResidency::settled)):
    /// a quiet spell comes whenever the program is short of CPU between
    /// two waves of its requests, and the push then takes the CPU from
    /// the rest of that first pass. Without a destination that says it,
    /// the hold-off lasts its whole bound.
    pub push_holdoff_until_settled: bool,
    /// Post-copy: the pusher runs in the lowest class through
    /// [`Self::idle_lanes`]'s hook (nothing without one). The request
    /// server never waits for it: with [`Self::resend_in_flight`] it does
    /// not wait for the push queue's lock while the pusher holds it.
    /// Default false.
    pub idle_push: bool,
    /// After `Commit` in pre-copy, with sockets moved: the most time to
    /// wait for the destination's `SocketsActive` before re-injecting the
    /// packets the network lock held and closing the source's sockets
    /// ([`SocketSource::release`](crate::traits::SocketSource::release)),
    /// so that this work and the digest pass do not take the CPU the
    /// destination activates its sockets with (packets re-injected earlier
    /// wait in the destination's own lock anyway). A destination that never
    /// sends it (an older one) costs the clients whose packets were held at
    /// most this much. Zero: release at `Commit`, as before. Default 100 ms,
    /// above the activation of 10,000 connections on a loaded 2-vCPU host
    /// (10–40 ms). Post-copy releases at `Commit` whatever this says (its
    /// requests must be served at once).
    pub activation_wait: Duration,
}

/// The rest owed after `worked` at a duty of `duty` percent
/// ([`SourceConfig::idle_duty`]): none before a whole work slice or
/// at 100 %; else `worked × (100 − duty) / duty`, at most
/// [`IDLE_MAX_REST`].
pub(super) fn rest_after(worked: Duration, duty: u8) -> Duration {
    if duty >= 100 || worked < IDLE_WORK_SLICE {
        return Duration::ZERO;
    }
    let duty = u32::from(duty.max(1));
    (worked * (100 - duty) / duty).min(IDLE_MAX_REST)
}

/// A sender in the lowest class rests once it worked this long since its
/// last rest ([`SourceConfig::idle_duty`]).
pub const IDLE_WORK_SLICE: Duration = Duration::from_millis(1);
/// The longest single rest of a sender ([`SourceConfig::idle_duty`]): a
/// cancel or the end of the lowest class is seen within it.
pub const IDLE_MAX_REST: Duration = Duration::from_millis(5);

impl SourceConfig {
    /// Set [`SourceConfig::bandwidth_limit`] (bytes per second, 0: none).
    #[must_use]
    pub fn with_bandwidth_limit(mut self, bytes_per_sec: u64) -> Self {
        self.bandwidth_limit = bytes_per_sec;
        self
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            verify: true,
            ready_timeout: Duration::from_secs(30),
            done_timeout: Duration::from_secs(60),
            batch_pages: CHUNK_PAGES,
            push_pages: 8,
            resend_in_flight: false,
            catch_up_timeout: Duration::from_millis(500),
            max_freeze: None,
            bandwidth_limit: 0,
            yield_to_program: false,
            idle_lanes: None,
            idle_round_limit: Duration::from_secs(2),
            idle_duty: 100,
            idle_threads: 0,
            idle_place: None,
            push_holdoff: Duration::ZERO,
            push_holdoff_until_settled: false,
            idle_push: false,
            activation_wait: Duration::from_millis(100),
        }
    }
}

impl SourceConfig {
    /// Sets [`mode`](Self::mode).
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets [`verify`](Self::verify).
    #[must_use]
    pub fn with_verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Sets [`ready_timeout`](Self::ready_timeout).
    #[must_use]
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Sets [`done_timeout`](Self::done_timeout).
    #[must_use]
    pub fn with_done_timeout(mut self, timeout: Duration) -> Self {
        self.done_timeout = timeout;
        self
    }

    /// Sets [`batch_pages`](Self::batch_pages).
    #[must_use]
    pub fn with_batch_pages(mut self, pages: u32) -> Self {
        self.batch_pages = pages;
        self
    }

    /// Sets [`push_pages`](Self::push_pages).
    #[must_use]
    pub fn with_push_pages(mut self, pages: u32) -> Self {
        self.push_pages = pages;
        self
    }

    /// Sets [`catch_up_timeout`](Self::catch_up_timeout).
    #[must_use]
    pub fn with_catch_up_timeout(mut self, timeout: Duration) -> Self {
        self.catch_up_timeout = timeout;
        self
    }

    /// Sets [`max_freeze`](Self::max_freeze) (a `Duration` or `None`).
    #[must_use]
    pub fn with_max_freeze(mut self, bound: impl Into<Option<Duration>>) -> Self {
        self.max_freeze = bound.into();
        self
    }

    /// Set [`Self::resend_in_flight`].
    #[must_use]
    pub fn with_resend_in_flight(mut self, on: bool) -> Self {
        self.resend_in_flight = on;
        self
    }

    /// Set [`Self::yield_to_program`].
    #[must_use]
    pub fn with_yield_to_program(mut self, on: bool) -> Self {
        self.yield_to_program = on;
        self
    }

    /// Set [`Self::idle_lanes`].
    #[must_use]
    pub fn with_idle_lanes(mut self, hook: Option<fn(bool) -> bool>) -> Self {
        self.idle_lanes = hook;
        self
    }

    /// Set [`Self::idle_duty`] (clamped to 1..=100).
    #[must_use]
    pub fn with_idle_duty(mut self, percent: u8) -> Self {
        self.idle_duty = percent.clamp(1, 100);
        self
    }

    /// Set [`Self::idle_threads`] (0: one per lane).
    #[must_use]
    pub fn with_idle_threads(mut self, threads: usize) -> Self {
        self.idle_threads = threads;
        self
    }

    /// Set [`Self::idle_place`].
    #[must_use]
    pub fn with_idle_place(mut self, hook: Option<fn(bool)>) -> Self {
        self.idle_place = hook;
        self
    }

    /// Set [`Self::idle_round_limit`].
    #[must_use]
    pub fn with_idle_round_limit(mut self, limit: Duration) -> Self {
        self.idle_round_limit = limit;
        self
    }

    /// Set [`Self::push_holdoff`].
    #[must_use]
    pub fn with_push_holdoff(mut self, holdoff: Duration) -> Self {
        self.push_holdoff = holdoff;
        self
    }

    /// Set [`Self::push_holdoff_until_settled`].
    #[must_use]
    pub fn with_push_holdoff_until_settled(mut self, until_settled: bool) -> Self {
        self.push_holdoff_until_settled = until_settled;
        self
    }

    /// Set [`Self::idle_push`].
    #[must_use]
    pub fn with_idle_push(mut self, idle: bool) -> Self {
        self.idle_push = idle;
        self
    }

    /// Set [`Self::activation_wait`] (zero: release at `Commit`).
    #[must_use]
    pub fn with_activation_wait(mut self, wait: Duration) -> Self {
        self.activation_wait = wait;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_rests_for_the_rest_of_its_share() {
        let ms = Duration::from_millis;
        // No rest at 100 %, nor before a whole work slice.
        assert_eq!(rest_after(ms(3), 100), Duration::ZERO);
        assert_eq!(rest_after(IDLE_WORK_SLICE / 2, 50), Duration::ZERO);
        // Half the time: as long as it worked; a quarter: three times as long.
        assert_eq!(rest_after(ms(2), 50), ms(2));
        assert_eq!(rest_after(ms(1), 25), ms(3));
        // Bounded, however low the share.
        assert_eq!(rest_after(ms(4), 1), IDLE_MAX_REST);
        assert_eq!(rest_after(ms(4), 0), IDLE_MAX_REST);
        // The setter keeps the share in 1..=100.
        assert_eq!(SourceConfig::default().idle_duty, 100);
        assert_eq!(SourceConfig::default().with_idle_duty(0).idle_duty, 1);
        assert_eq!(SourceConfig::default().with_idle_duty(200).idle_duty, 100);
    }
}
