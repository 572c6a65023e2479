//! The one error type of lmig-core, shared by every backend through its traits.

use std::time::Duration;

use crate::model::{PageRun, RegionId};

/// A boxed error from a backend crate (memory, network, transport, program state).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can make a migration fail.
///
/// Before the source sends `Commit`, any of these leaves the source program
/// running and makes the destination discard what it received (see
/// [`crate::session`]). [`MigrationError::source_may_run`] tells a caller
/// which side owns the program after a failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The kernel or the peer lacks a feature; `needs` says what would provide it.
    #[error("{feature} is not supported here: needs {needs}")]
    Unsupported {
        /// The missing feature, e.g. `"PAGEMAP_SCAN"`.
        feature: &'static str,
        /// What would provide it, e.g. `"Linux >= 6.7"`.
        needs: &'static str,
    },

    /// A region id that is not part of the registered layout.
    #[error("region {region} is not registered")]
    UnknownRegion {
        /// The unknown id.
        region: RegionId,
    },

    /// A page run that does not lie inside its region.
    #[error("page run {run} lies outside region {} ({region_pages} pages)", run.region)]
    PageOutsideRegion {
        /// The offending run.
        run: PageRun,
        /// The number of pages the region holds.
        region_pages: u64,
    },

    /// A region layout is invalid or does not match the other side's.
    #[error("region layout rejected: {detail}")]
    LayoutMismatch {
        /// What is wrong, in words.
        detail: String,
    },

    /// A record (socket, state, message field) holds an impossible value.
    #[error("invalid {what}: {detail}")]
    InvalidRecord {
        /// What kind of record, e.g. `"TCP connection 42"`.
        what: String,
        /// What is wrong with it.
        detail: String,
    },

    /// The peer sent a message that the protocol does not allow at this point.
    #[error("protocol violation in {phase}: expected {expected}, got {got}")]
    Protocol {
        /// The session phase we were in.
        phase: &'static str,
        /// What the protocol allows here.
        expected: &'static str,
        /// What arrived.
        got: String,
    },

    /// The peer aborted the migration and said why.
    #[error("peer aborted the migration: {reason}")]
    PeerAborted {
        /// The reason the peer gave.
        reason: String,
    },

    /// The channel failed or the peer vanished.
    #[error("channel failed: {detail}")]
    Channel {
        /// What happened, in words.
        detail: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// Nothing arrived within the allowed time.
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// What we were waiting for.
        waiting_for: &'static str,
        /// How long we waited.
        after: Duration,
    },

    /// A backend (memory, tracker, sockets, program state) failed.
    #[error("{backend} failed: {source}")]
    Backend {
        /// Which backend, e.g. `"uffd-wp tracker"`.
        backend: &'static str,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },

    /// The destination's memory does not match the digest the source took at the freeze.
    #[error("verification failed: region {region} differs from the source's copy")]
    VerificationFailed {
        /// The first region that differs.
        region: RegionId,
    },

    /// A trait implementation (the program's, or a backend's) panicked
    /// while the session called it. Before `Commit` the session then
    /// aborted as for any error: the source resumed the program (its
    /// sockets out of repair mode), the destination discarded what it got.
    /// After `Commit` (`committed`), the destination owns the program.
    #[error("panicked {during}: {message}")]
    Panicked {
        /// Which step, e.g. `"before Commit"`.
        during: &'static str,
        /// The panic's message.
        message: String,
        /// It happened after `Commit`.
        committed: bool,
    },

    /// The source sent `Commit` but never heard back. The program is stopped
    /// on the source and may be running on the destination: check the
    /// destination before resuming anything by hand.
    #[error("commit sent but not confirmed by the destination: {detail}")]
    CommitUnconfirmed {
        /// What happened after the commit.
        detail: String,
    },

    /// Source: this memory's program was handed over by an earlier session
    /// (its `Commit` went out; [`MemorySource::handed_over`](crate::MemorySource::handed_over)).
    /// Refused before anything was sent, the program not touched: it stays
    /// stopped here, and when `confirmed` is false it may run on that
    /// destination (the earlier session ended in
    /// [`MigrationError::CommitUnconfirmed`]): check there first.
    #[error("{}", if *confirmed {
        "this program was already handed over to a destination (Commit confirmed); it never runs or migrates from here again"
    } else {
        "this program's earlier migration sent Commit and was never confirmed: it may run on that destination (check it); refusing to migrate it again"
    })]
    HandedOverBefore {
        /// The earlier `Commit` was confirmed (`Done` came back).
        confirmed: bool,
    },

    /// Destination, after `Commit`: the source was lost in post-copy and did
    /// not come back within [`DestinationConfig::pause_limit`](crate::session::DestinationConfig::pause_limit).
    /// The program runs here; `missing_pages` of its pages never arrived and
    /// stay missing: a thread touching one stays blocked (never reads zeros
    /// or stale data). The program chooses: exit, or keep running what does
    /// not touch them.
    #[error(
        "post-copy paused: source lost ({reason}); {missing_pages} pages still missing after {paused_for:?}"
    )]
    PostcopyPaused {
        /// Pages not placed (their touchers stay blocked).
        missing_pages: u64,
        /// How long the destination waited for the source to come back.
        paused_for: Duration,
        /// Why the source was considered lost.
        reason: String,
    },

    /// The freeze outlasted [`SourceConfig::max_freeze`](crate::session::SourceConfig::max_freeze):
    /// the source aborted and resumed the program (sockets out of repair
    /// mode with every queued byte, network unlocked); the destination
    /// discards what it got.
    #[error(
        "the freeze outlasted its bound of {max:?} ({after:?} at the step {step:?}); the source resumed"
    )]
    FreezeDeadline {
        /// The bound.
        max: Duration,
        /// The freeze step that ended past it (as in `SourceReport::freeze_steps`).
        step: &'static str,
        /// How long the freeze had lasted then.
        after: Duration,
    },

    /// The migration was cancelled (a [`CancelHandle`](crate::session::CancelHandle))
    /// before `Commit`: the source resumed the program, the destination
    /// discards what it got.
    #[error("the migration was cancelled before Commit; the source resumed")]
    Cancelled,

    /// The migration channel runs over an address that moves with the
    /// sockets: the network lock would hold the channel's own traffic in
    /// the freeze. Refused before anything was sent; use another address
    /// (or interface) for the migration.
    #[error(
        "the migration channel uses {addr}, a service address that moves with the program; migrate over another address"
    )]
    ChannelOnMovedAddress {
        /// The address both use.
        addr: std::net::IpAddr,
    },

    /// The destination failed after `Commit` (post-copy, the digest check,
    /// `Done`): nothing is undone. `program_running` says whether the
    /// program runs on the destination (it was resumed there); it never
    /// runs on the source again.
    #[error("after Commit ({}): {source}", if *program_running { "the program runs on the destination" } else { "the program could not be resumed" })]
    AfterCommit {
        /// The program was resumed on the destination and runs.
        program_running: bool,
        /// What failed.
        #[source]
        source: Box<MigrationError>,
    },
}

impl MigrationError {
    /// Wrap a backend error.
    pub fn backend(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Backend {
            backend,
            source: source.into(),
        }
    }

    /// A channel error with a cause.
    pub fn channel(detail: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Channel {
            detail: detail.into(),
            source: Some(source.into()),
        }
    }

    /// A channel error without an underlying cause (e.g. the peer closed it).
    pub fn channel_closed(detail: impl Into<String>) -> Self {
        Self::Channel {
            detail: detail.into(),
            source: None,
        }
    }

    /// An invalid record.
    pub fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::InvalidRecord {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// After this error on the source side, may the program keep running there?
    ///
    /// True for every error except [`MigrationError::CommitUnconfirmed`],
    /// [`MigrationError::HandedOverBefore`] and a panic after `Commit`: the
    /// session resumed the program before returning the error.
    pub fn source_may_run(&self) -> bool {
        !self.after_commit()
    }

    /// Did this error happen after `Commit` (so the program never runs on
    /// the source again)? True for [`MigrationError::CommitUnconfirmed`],
    /// [`MigrationError::HandedOverBefore`],
    /// [`MigrationError::AfterCommit`] and a panic after `Commit`.
    pub fn after_commit(&self) -> bool {
        matches!(
            self,
            Self::CommitUnconfirmed { .. }
                | Self::HandedOverBefore { .. }
                | Self::AfterCommit { .. }
                | Self::PostcopyPaused { .. }
                | Self::Panicked {
                    committed: true,
                    ..
                }
        )
    }

    /// What went wrong, looking through [`MigrationError::AfterCommit`]
    /// (e.g. [`MigrationError::PostcopyPaused`] or a digest mismatch after
    /// `Commit`).
    pub fn cause(&self) -> &MigrationError {
        match self {
            Self::AfterCommit { source, .. } => source.cause(),
            e => e,
        }
    }

    /// After `Commit`, whether the program runs on the destination:
    /// `Some(true)` for a destination error after it had resumed the
    /// program, `Some(false)` when it could not resume it, `None` when this
    /// side cannot know (a source's [`MigrationError::CommitUnconfirmed`])
    /// or the error came before `Commit`.
    pub fn program_running_on_destination(&self) -> Option<bool> {
        match self {
            Self::AfterCommit {
                program_running, ..
            } => Some(*program_running),
            _ => None,
        }
    }
}

/// Result alias used throughout lmig-core.
pub type Result<T, E = MigrationError> = std::result::Result<T, E>;
