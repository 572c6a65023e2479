//! What the running host reports: statistics, lost hosts, and the
//! outcomes of a partial migration and a gather.

use lmig_core::model::PageRun;
use lmig_core::split::HostId;

/// What the running host did.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SplitStats {
    /// Faults on pages held elsewhere (each one a fetch request).
    pub remote_faults: u64,
    /// Pages placed from answers (fetches, gathers).
    pub placed: u64,
    /// Answers discarded because the map changed after their epoch (late
    /// answers from a former owner).
    pub stale_discarded: u64,
    /// Answers discarded because the sender does not own the page.
    pub not_owner_discarded: u64,
    /// Answers for pages already here, discarded.
    pub duplicates: u64,
    /// Pages a host said it did not hold although the map names it.
    pub not_held: u64,
    /// Fetches sent again to a page's new owner.
    pub refetched: u64,
    /// Pages evicted (dropped here after their host acknowledged them).
    pub evicted: u64,
    /// Pages written during their eviction and therefore kept here.
    pub kept_dirty: u64,
    /// Pages held here now (those being copied in from an answer included).
    pub local: u64,
}

/// A page host that vanished, with the pages it held.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostLost {
    /// The host.
    pub host: HostId,
    /// How many pages it held.
    pub pages: u64,
    /// Which ones.
    pub runs: Vec<PageRun>,
    /// What the channel said.
    pub detail: String,
}

/// The outcome of [`SplitRegion::move_host`](crate::split::SplitRegion::move_host).
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveReport {
    /// Pages the draining host owned when the move began.
    pub pages: u64,
    /// Pages that switched to the new host.
    pub moved: u64,
    /// Pages that changed hands during the move (fetched here); the new
    /// host's copies of them were invalidated.
    pub invalidated: u64,
    /// The owner-map epoch of the switch.
    pub epoch: u64,
}

/// The outcome of a gather.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GatherReport {
    /// Pages that came from page hosts.
    pub pages: u64,
    /// Hosts that sent.
    pub hosts: usize,
}
