//! The running host's thread roles, each a named thread with `spawn` (and
//! `join` where someone waits for it).
//!
//! | role | thread | ends |
//! |---|---|---|
//! | [`FaultHandler`] | `split-faults` | when the region is dropped (joined there) |
//! | [`LinkReader`] | `split-link-<host>` | when its link fails or the region stops (detached) |
//! | [`IncomingServer`] | `split-incoming` | when its channel fails or the region stops (the caller joins) |
//! | [`Evictor`] | `split-evict-<host>` | when its host acknowledged the pages (joined by `split_to`) |

use std::sync::Arc;
use std::thread::JoinHandle;

use lmig_core::Channel;
use lmig_core::model::PageRun;
use lmig_core::split::HostId;

use super::shared::Inner;
use crate::error::MemError;
use crate::split::{Result, SplitError};

/// Reads the region's userfaultfd: missing pages become fetches, writes to
/// pages under eviction keep them here.
pub(super) struct FaultHandler {
    handle: JoinHandle<()>,
}

impl FaultHandler {
    pub(super) fn spawn(inner: Arc<Inner>) -> Result<Self> {
        let handle = std::thread::Builder::new()
            .name("split-faults".into())
            .spawn(move || inner.fault_loop())
            .map_err(|e| MemError::os("spawn", "split fault handler", e))?;
        Ok(Self { handle })
    }

    /// Wait for it to end (after `stop` was set).
    pub(super) fn join(self) {
        if self.handle.join().is_err() {
            warn!("the split fault handler panicked");
        }
    }
}

/// Reads one page host's link and handles what it sends. Detached: it ends
/// on its own once the link fails or the region stops.
pub(super) struct LinkReader;

impl LinkReader {
    pub(super) fn spawn(inner: Arc<Inner>, host: HostId, ch: Arc<dyn Channel>) -> Result<()> {
        std::thread::Builder::new()
            .name(format!("split-link-{}", host.0))
            .spawn(move || inner.link_loop(host, ch))
            .map_err(|e| MemError::os("spawn", "split link", e))?;
        Ok(())
    }
}

/// Serves a channel a page host opened to this host (a gather or a relay).
pub(super) struct IncomingServer;

impl IncomingServer {
    /// The handle is the caller's to join.
    pub(super) fn spawn(inner: Arc<Inner>, ch: Arc<dyn Channel>) -> JoinHandle<()> {
        std::thread::Builder::new()
            .name("split-incoming".into())
            .spawn(move || inner.incoming_loop(ch))
            .expect("spawn split incoming thread")
    }
}

/// Evicts runs to one page host (one part of a split migration).
pub(super) struct Evictor {
    handle: JoinHandle<Result<u64>>,
}

impl Evictor {
    pub(super) fn spawn(inner: Arc<Inner>, host: HostId, runs: Vec<PageRun>) -> Result<Self> {
        let handle = std::thread::Builder::new()
            .name(format!("split-evict-{}", host.0))
            .spawn(move || inner.evict(host, &runs))
            .map_err(|e| MemError::os("spawn", "split eviction", e))?;
        Ok(Self { handle })
    }

    /// The pages evicted.
    pub(super) fn join(self) -> Result<u64> {
        self.handle
            .join()
            .map_err(|_| SplitError::State("eviction thread panicked".into()))?
    }
}
