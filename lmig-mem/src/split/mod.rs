//! Split memory (IPmigrate): a program runs with its region's pages spread
//! over several hosts, and the pieces move while it keeps running.
//!
//! * [`PageHost`]: the page-host service. It holds part of a region's pages
//!   (as sent to it), answers fetches, stores evicted pages, sends its share
//!   straight to another host on request, and can relay pages. Pages for the
//!   host at the other end of a channel go back on that channel; pages for
//!   any other host on a channel it dials. To the running host, pages leave as
//!   slices of the message they came in (no copy).
//! * [`SplitRegion`]: the running host's side. The region is registered
//!   with userfaultfd (`MISSING` + `WP`); a touch of a page held elsewhere
//!   fetches it from its owner (with pre-paging of the neighbours the same
//!   host owns) and places it with `UFFDIO_COPY`. It evicts pages to page
//!   hosts (split migration, [`SplitRegion::split_to`]), moves one host's
//!   share to another while the program runs ([`SplitRegion::move_host`]),
//!   and gathers every part back, every page host sending directly and in
//!   parallel ([`SplitRegion::gather`]) or through one relay
//!   ([`SplitRegion::relay_gather`], for comparison).
//!
//! Both are generic over lmig-core's [`Channel`]: the
//! caller supplies channels (lmig-transport's TCP channels in the examples)
//! and a [`Dial`] function page hosts use to reach each other.
//!
//! # Never a stale page
//!
//! * The [`OwnerMap`](lmig_core::split::OwnerMap) is the only authority on
//!   where a page lives. Every answer carries its sender and the map epoch
//!   it is for; the running host places it only if the sender still owns
//!   the page and the page has not changed hands since that epoch. Late
//!   answers from a former owner, answers for pages the sender does not
//!   own, and copies of pages that are already here are discarded (counted
//!   in [`SplitStats`]); a discarded answer for a page a thread waits on is
//!   asked again from the current owner.
//! * Eviction write-protects the pages (`UFFDIO_WRITEPROTECT`) before it
//!   copies them, waits until the page host acknowledged them, and only then
//!   drops them (`MADV_DONTNEED`). A write during the eviction blocks on the
//!   protection; the page is then kept here (the host's copy is never used:
//!   the map still names this host), or, if the drop came first, the write
//!   resumes after the page was fetched back. No write is lost.
//! * A partial migration snapshots the pages the draining host owns, has
//!   it send them straight to the new host, then switches the owner map in
//!   one step for the pages that did not change hands meanwhile (pages the
//!   program fetched during the move stay here; the new host's copies of
//!   them are invalidated with `Forget`). Fetches pending at the switch are
//!   re-sent to the new owner.
//! * Answers are placed outside the state lock, several channels at once:
//!   the pages are first claimed (the owner map gives them to this host, a
//!   fault on one waits for the copy, another answer for one is a
//!   duplicate), then copied in with `UFFDIO_COPY`. The kernel reporting
//!   such a page present already (`EEXIST`) means this host's bookkeeping
//!   and the region disagree: an error, never a silent overwrite.
//! * A page host whose channel breaks is reported with the pages it held
//!   ([`SplitError::HostLost`], [`SplitRegion::lost_hosts`]).
//!
//! # Requirements
//!
//! Private anonymous regions of base pages; userfaultfd with kernel-mode
//! faults and write-protect on anonymous memory (Linux 5.7+, privilege as
//! for [`crate::postcopy`]).

mod host;
mod running;

use std::sync::Arc;
use std::time::Duration;

use lmig_core::model::PageRun;
use lmig_core::split::HostId;
use lmig_core::{Channel, MigrationError};

use crate::error::MemError;

pub use host::{PageHost, PageHostStats};
pub use running::{GatherReport, HostLost, MoveReport, SplitOptions, SplitRegion, SplitStats};

/// Opens a channel to another host, given the endpoint string it announced
/// (how endpoints look is the transport's business).
pub type Dial = Arc<dyn Fn(&str) -> lmig_core::Result<Box<dyn Channel>> + Send + Sync>;

/// Most pages one `Data` message carries.
pub const BATCH_PAGES: u32 = 64;

/// How long a host waits for an acknowledgement before it gives up.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// What can go wrong with split memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// A memory or kernel operation failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A channel or protocol error.
    #[error(transparent)]
    Protocol(#[from] MigrationError),
    /// A page host vanished; the pages it held are lost.
    #[error("{host} is gone; it held {pages} pages")]
    HostLost {
        /// The host.
        host: HostId,
        /// How many pages it held.
        pages: u64,
        /// Which ones.
        runs: Vec<PageRun>,
    },
    /// A host refused a request.
    #[error("{host} refused: {reason}")]
    Refused {
        /// The host.
        host: HostId,
        /// Its reason.
        reason: String,
    },
    /// A host that is not attached (or not in the owner map).
    #[error("{host} is not attached")]
    UnknownHost {
        /// The host.
        host: HostId,
    },
    /// The operation is not possible now.
    #[error("{0}")]
    State(String),
    /// Nothing happened in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
}

/// Result of split-memory operations.
pub type Result<T, E = SplitError> = std::result::Result<T, E>;

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
