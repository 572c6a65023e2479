//! Control of a running source session from outside it: the
//! [`SourceControl`] (cancel, progress, bandwidth limit), the
//! [`CancelHandle`], and the bound on the freeze ([`FreezeBound`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::progress::{Progress, ProgressState};
use crate::error::{MigrationError, Result};
use crate::session::pace::Meter;

/// Watches and steers a [`Source`](super::Source) session from another
/// thread ([`Source::control`](super::Source::control)); cloneable, and
/// usable before, during and after [`Source::run`](super::Source::run).
///
/// What QMP's `query-migrate`, `migrate_cancel` and `max-bandwidth` give a
/// VMM: a [`Progress`] snapshot, a cancel (see [`CancelHandle`]) and a
/// bandwidth limit that can change while the session runs.
#[derive(Clone, Debug)]
pub struct SourceControl {
    pub(super) cancel: CancelHandle,
    pub(super) meter: Arc<Meter>,
    pub(super) progress: Arc<ProgressState>,
}

impl SourceControl {
    /// Cancel the migration if it has not committed; says which happened
    /// ([`CancelHandle::cancel`]).
    pub fn cancel(&self) -> CancelOutcome {
        self.cancel.cancel()
    }

    /// The cancel alone, to hand to code that needs no more.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Where the session is now.
    pub fn progress(&self) -> Progress {
        self.progress.snapshot(&self.meter)
    }

    /// Limit the pages' bandwidth to `bytes_per_sec` over every data
    /// stream together (0: no limit), from now on; the senders see a change
    /// within 10 ms. Applies to the pre-copy rounds and the post-copy push;
    /// the freeze (the program is paused: it should end as soon as it can)
    /// and the pages a post-copy destination asks for (a thread there waits
    /// for each) are never held back. Overrides
    /// [`SourceConfig::bandwidth_limit`](super::SourceConfig::bandwidth_limit).
    pub fn set_bandwidth_limit(&self, bytes_per_sec: u64) {
        self.meter.set_limit(bytes_per_sec);
    }

    /// The bandwidth limit in bytes per second (0: none).
    pub fn bandwidth_limit(&self) -> u64 {
        self.meter.limit()
    }
}

/// The session has not committed; a cancel is still possible.
const RUNNING: u8 = 0;
/// A cancel arrived before `Commit`: the session aborts at its next step.
const CANCELLED: u8 = 1;
/// `Commit` is being sent or was sent: a cancel has no effect.
const COMMITTED: u8 = 2;
/// The session failed before `Commit` (the source runs on).
const ENDED: u8 = 3;

/// Cancels a [`Source`](super::Source) session from another thread
/// ([`Source::cancel_handle`](super::Source::cancel_handle)); cloneable.
///
/// Before `Commit` a cancel aborts the attempt like any failure: the
/// program resumes on the source with its memory and sockets, the
/// destination discards, and the session returns
/// [`MigrationError::Cancelled`]. The session checks at every step
/// (every pre-copy round, every freeze step, and while it waits for the
/// destination) and, last, right before it sends `Commit`: a cancel that
/// returned [`CancelOutcome::Cancelled`] never lets `Commit` go out.
#[derive(Clone, Debug, Default)]
pub struct CancelHandle {
    state: Arc<AtomicU8>,
}

/// What a [`CancelHandle::cancel`] did.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// Before `Commit`: the session aborts (or already did) and the
    /// program runs on at the source.
    Cancelled,
    /// Too late: `Commit` went out, the program belongs to the destination;
    /// the cancel had no effect.
    AfterCommit,
    /// The session had already failed before `Commit` (the program runs on
    /// at the source); nothing to cancel.
    AlreadyEnded,
}

impl CancelHandle {
    /// Cancel the migration if it has not committed; says which happened.
    pub fn cancel(&self) -> CancelOutcome {
        match self
            .state
            .compare_exchange(RUNNING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(CANCELLED) => CancelOutcome::Cancelled,
            Err(COMMITTED) => CancelOutcome::AfterCommit,
            Err(_) => CancelOutcome::AlreadyEnded,
        }
    }

    /// Was a cancel requested before `Commit`?
    pub fn is_cancelled(&self) -> bool {
        self.state.load(Ordering::Acquire) == CANCELLED
    }

    /// `Err(Cancelled)` if a cancel arrived.
    pub(super) fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// Right before `Commit`: from here on a cancel has no effect, unless
    /// one arrived first (then `Err(Cancelled)` and no `Commit`).
    pub(super) fn commit(&self) -> Result<()> {
        match self
            .state
            .compare_exchange(RUNNING, COMMITTED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(COMMITTED) => Ok(()),
            Err(_) => Err(MigrationError::Cancelled),
        }
    }

    /// The session failed before `Commit`.
    pub(super) fn ended(&self) {
        let _ = self
            .state
            .compare_exchange(RUNNING, ENDED, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The freeze's bound ([`SourceConfig::max_freeze`](super::SourceConfig::max_freeze))
/// and the cancel, checked at each freeze step.
#[derive(Clone, Debug)]
pub(super) struct FreezeBound {
    /// When the program was paused.
    pub paused_at: Instant,
    /// The bound, if any.
    pub max: Option<Duration>,
    /// The session's cancel handle.
    pub cancel: CancelHandle,
}

impl FreezeBound {
    /// After the step `step`: `Err` if the freeze outlasted its bound or a
    /// cancel arrived.
    pub fn check(&self, step: &'static str) -> Result<()> {
        self.cancel.check()?;
        let after = self.paused_at.elapsed();
        match self.max {
            Some(max) if after > max => Err(MigrationError::FreezeDeadline { max, step, after }),
            _ => Ok(()),
        }
    }

    /// How long a wait may last: `limit`, or less when the bound is nearer.
    pub fn wait(&self, limit: Duration) -> Duration {
        match self.max {
            Some(max) => limit.min(max.saturating_sub(self.paused_at.elapsed())),
            None => limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_before_commit_wins_and_after_it_says_so() {
        let h = CancelHandle::default();
        assert!(h.check().is_ok());
        assert_eq!(h.clone().cancel(), CancelOutcome::Cancelled);
        assert!(matches!(h.check(), Err(MigrationError::Cancelled)));
        assert!(matches!(h.commit(), Err(MigrationError::Cancelled)));

        let h = CancelHandle::default();
        h.commit().unwrap();
        assert_eq!(h.cancel(), CancelOutcome::AfterCommit);
        assert!(h.check().is_ok());

        let h = CancelHandle::default();
        h.ended();
        assert_eq!(h.cancel(), CancelOutcome::AlreadyEnded);
    }

    #[test]
    fn the_bound_trips_after_its_time_only() {
        let bound = FreezeBound {
            paused_at: Instant::now() - Duration::from_millis(50),
            max: Some(Duration::from_millis(10)),
            cancel: CancelHandle::default(),
        };
        assert!(matches!(
            bound.check("pause program"),
            Err(MigrationError::FreezeDeadline {
                step: "pause program",
                ..
            })
        ));
        assert_eq!(bound.wait(Duration::from_secs(30)), Duration::ZERO);
        let unbounded = FreezeBound { max: None, ..bound };
        assert!(unbounded.check("pause program").is_ok());
        assert_eq!(
            unbounded.wait(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }
}
