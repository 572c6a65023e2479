//! The source's bulk work in the host's lowest CPU class while the
//! pre-copy rounds shrink ([`super::SourceConfig::idle_lanes`]): the round
//! senders ([`IdleLanes`], [`IdleLane`]) and the session thread's own bulk
//! steps ([`IdleStep`], [`super::SourceConfig::idle_session`]).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The lanes of one round in the lowest CPU class
/// ([`super::SourceConfig::idle_lanes`]).
#[derive(Clone, Copy)]
pub(super) struct IdleLanes {
    /// Moves the calling thread there (`true`) or back (`false`).
    hook: fn(bool) -> bool,
    /// A lane still there at this time moves back.
    until: Instant,
}

impl IdleLanes {
    /// Lanes lowered through `hook` until `until`.
    pub(super) fn new(hook: fn(bool) -> bool, until: Instant) -> Self {
        Self { hook, until }
    }
}

/// One lane thread's class: in the lowest one until its round's limit.
pub(super) struct IdleLane {
    lanes: Option<IdleLanes>,
    /// The thread is in the lowest class now.
    on: Cell<bool>,
}

impl IdleLane {
    /// Move the calling thread to the lowest class, if asked and allowed.
    pub(super) fn enter(lanes: Option<IdleLanes>) -> Self {
        let on = lanes.is_some_and(|l| (l.hook)(true));
        Self {
            lanes,
            on: Cell::new(on),
        }
    }

    /// Not in the lowest class (the calling thread's own lane).
    pub(super) fn none() -> Self {
        Self::enter(None)
    }

    pub(super) fn on(&self) -> bool {
        self.on.get()
    }

    /// Past the round's limit: move back. Returns whether it just did.
    pub(super) fn check(&self) -> bool {
        match self.lanes {
            Some(l) if self.on.get() && Instant::now() >= l.until => {
                (l.hook)(false);
                self.on.set(false);
                debug!("a round's sender left the lowest CPU class after the limit");
                true
            }
            _ => false,
        }
    }
}

/// One bulk step of the session thread (the tracker's start, the first
/// round's page query, a shrinking round's dirty collect) in the lowest
/// CPU class ([`super::SourceConfig::idle_session`]): lowered by
/// [`IdleStep::enter`], raised by [`IdleStep::leave`] or when dropped (an
/// error included), so the thread never stays lowered past its step.
///
/// On a kernel without preemption a thread inside a system call keeps its
/// CPU until the call returns; these steps are many short calls (a
/// `PAGEMAP_SCAN` or `UFFDIO_WRITEPROTECT` per 4 MiB), and a lowered thread
/// gives the CPU to a woken program thread at the next return, where one
/// of the normal class may keep it for its whole slice.
pub(super) struct IdleStep {
    /// The hook, while the thread is lowered.
    hook: Option<fn(bool) -> bool>,
    began: Instant,
}

impl IdleStep {
    /// Lower the calling thread through `hook` (`None`: not at all); a hook
    /// that refuses leaves it where it is.
    pub(super) fn enter(hook: Option<fn(bool) -> bool>) -> Self {
        Self {
            hook: hook.filter(|h| h(true)),
            began: Instant::now(),
        }
    }

    /// Raise the thread back. Returns whether the step, lowered, lasted
    /// longer than `limit`: the program then leaves too little CPU for
    /// the migration's steps to run in the lowest class.
    pub(super) fn leave(mut self, limit: Duration) -> bool {
        let over = self.hook.is_some() && self.began.elapsed() > limit;
        self.raise();
        over
    }

    fn raise(&mut self) {
        if let Some(h) = self.hook.take() {
            if !h(false) {
                debug!("the session thread could not leave the lowest CPU class");
            }
        }
    }
}

impl Drop for IdleStep {
    fn drop(&mut self) {
        self.raise();
    }
}
