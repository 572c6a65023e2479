//! The senders of a pre-copy round in the lowest CPU class
//! ([`crate::session::SourceConfig::idle_lanes`]): entering it, resting
//! ([`crate::session::SourceConfig::idle_duty`]), being placed
//! ([`crate::session::SourceConfig::idle_place`]) and leaving it past the
//! round's limit.

use std::time::{Duration, Instant};

/// The lanes of one round in the lowest CPU class
/// ([`crate::session::SourceConfig::idle_lanes`]).
#[derive(Clone, Copy)]
pub(in crate::session::source) struct IdleLanes {
    /// Moves the calling thread there (`true`) or back (`false`).
    pub hook: fn(bool) -> bool,
    /// A lane still there at this time moves back.
    pub until: Instant,
    /// The share of the time (percent) a lane there works
    /// ([`crate::session::SourceConfig::idle_duty`]).
    pub duty: u8,
    /// The most sender threads ([`crate::session::SourceConfig::idle_threads`];
    /// 0: one per lane).
    pub threads: usize,
    /// Places the sender before each chunk ([`crate::session::SourceConfig::idle_place`]).
    pub place: Option<fn(bool)>,
}

impl IdleLanes {
    /// A round's lanes in the lowest class, as `config` says, when the
    /// rounds are sparing the program (`spare`); the round began at `start`.
    pub(in crate::session::source) fn for_round(
        config: &crate::session::SourceConfig,
        spare: bool,
        start: Instant,
    ) -> Option<Self> {
        let hook = config.idle_lanes.filter(|_| spare)?;
        Some(Self {
            hook,
            until: start + config.idle_round_limit,
            duty: config.idle_duty,
            threads: config.idle_threads,
            place: config.idle_place,
        })
    }
}

/// One lane thread's class: in the lowest one until its round's limit.
pub(super) struct IdleLane {
    lanes: Option<IdleLanes>,
    /// The thread is in the lowest class now.
    on: std::cell::Cell<bool>,
    /// When the thread last rested (or began).
    rested: std::cell::Cell<Instant>,
}

impl IdleLane {
    /// Move the calling thread to the lowest class, if asked and allowed.
    pub(super) fn enter(lanes: Option<IdleLanes>) -> Self {
        let on = lanes.is_some_and(|l| (l.hook)(true));
        Self {
            lanes,
            on: std::cell::Cell::new(on),
            rested: std::cell::Cell::new(Instant::now()),
        }
    }

    /// In the lowest class with a duty below 100 %, after a work slice
    /// ([`crate::session::source::IDLE_WORK_SLICE`]): sleep for the rest of the share, at
    /// most [`crate::session::source::IDLE_MAX_REST`]. Returns the time slept.
    pub(super) fn rest(&self) -> Duration {
        let Some(l) = self.lanes else {
            return Duration::ZERO;
        };
        let worked = self.rested.get().elapsed();
        let sleep = crate::session::source::config::rest_after(worked, l.duty);
        if !self.on.get() || sleep.is_zero() {
            return Duration::ZERO;
        }
        std::thread::sleep(sleep);
        self.rested.set(Instant::now());
        sleep
    }

    /// In the lowest class: before a chunk, the embedder may place the
    /// thread ([`crate::session::SourceConfig::idle_place`]).
    pub(super) fn place(&self) {
        if let Some(place) = self.lanes.and_then(|l| l.place).filter(|_| self.on.get()) {
            place(true);
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
                if let Some(place) = l.place {
                    place(false);
                }
                self.on.set(false);
                debug!("a round's sender left the lowest CPU class after the limit");
                true
            }
            _ => false,
        }
    }
}
