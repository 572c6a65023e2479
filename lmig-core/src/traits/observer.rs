//! What a session reports as it runs: phases and events.

use std::time::Instant;

use crate::policy::{Decision, RoundStats};

/// The phase a session is in, reported to observers.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Exchanging the layout.
    Setup,
    /// Pre-copy round `n`.
    Precopy(u32),
    /// The program is paused; final pages, sockets and state are moving.
    Frozen,
    /// Waiting for the destination's `Ready`.
    AwaitReady,
    /// `Commit` sent / received.
    Committed,
    /// Post-copy: the program runs at the destination while pages arrive.
    Postcopy,
    /// Finished.
    Done,
    /// Failed before `Commit`; the source runs on (on the source: sent
    /// once the program was resumed).
    Aborted,
}

/// Something an observer may want to show or record.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// The session entered a phase.
    Phase {
        /// The new phase.
        phase: Phase,
        /// When (not serialised: an `Instant` means nothing outside the process).
        #[cfg_attr(feature = "serde", serde(skip))]
        at: Instant,
    },
    /// A pre-copy round finished.
    Round(RoundStats),
    /// The policy decided.
    Decision(Decision),
    /// Pages were sent or placed.
    Progress {
        /// Pages sent (source) or placed (destination) so far.
        pages: u64,
        /// Bytes sent or received so far.
        bytes: u64,
        /// Pages in all regions.
        total_pages: u64,
    },
    /// Destination, post-copy: the source could not be reached within the
    /// idle timeout. Threads touching a missing page stay blocked; the
    /// session keeps trying to reconnect (see
    /// [`DestinationConfig::pause_limit`](crate::session::DestinationConfig::pause_limit)).
    PostcopyPaused {
        /// Pages still missing.
        missing_pages: u64,
        /// Why, in words.
        reason: String,
        /// When (not serialised).
        #[cfg_attr(feature = "serde", serde(skip))]
        at: Instant,
    },
    /// Destination, post-copy: a source came back after a pause; the
    /// missing pages are asked for again.
    PostcopyResumed {
        /// Pages still missing when it came back.
        missing_pages: u64,
        /// How long post-copy was paused.
        #[cfg_attr(
            feature = "serde",
            serde(rename = "paused_for_ms", with = "crate::serde_ms")
        )]
        paused_for: std::time::Duration,
    },
}

/// Receives session events: progress bars, logs, benchmarks.
///
/// Phases come in protocol order (see [the module docs](crate::traits)); other
/// events between them, from any of the session's threads. After `Commit`
/// on the destination the observer lives on the after-`Commit` thread.
pub trait Observer: Send + Sync {
    /// Called from the session's threads; keep it quick.
    fn event(&self, event: &Event);
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn event(&self, _event: &Event) {}
}

impl<F: Fn(&Event) + Send + Sync> Observer for F {
    fn event(&self, event: &Event) {
        self(event)
    }
}
