//! kvd's loop in post-copy: requests parked until their pages are here
//! (see [`crate::kvd::park`]).

use std::sync::Arc;
use std::time::Duration;

use mio::Interest;
use mio::unix::SourceFd;

use super::{PARKED, Server};
use crate::kvd::park::{self, Parking};
use crate::kvd::store::Store;

impl Server {
    /// In post-copy: park a request whose key's pages are not here yet
    /// instead of blocking the loop on them (see [`park`]).
    pub fn set_residency(
        &mut self,
        residency: Arc<dyn lmig_core::PageResidency>,
        region: lmig_core::model::RegionId,
    ) -> std::io::Result<()> {
        let parking = Parking::new(residency, region)
            .saying_settled(park::holdoff_until_settled())
            .requesting_in_batches(park::request_batch());
        let fd = std::os::fd::AsRawFd::as_raw_fd(&parking.fd());
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), PARKED, Interest::READABLE)?;
        self.parking = Some(parking);
        Ok(())
    }

    /// Requests parked so far (post-copy).
    pub fn parked(&self) -> u64 {
        self.parking.as_ref().map_or(0, Parking::parked)
    }

    /// Pages came: serve the connections whose parked requests may run.
    pub(super) fn unpark(&mut self, store: &Store<'_>) {
        let Some(parking) = self.parking.as_mut() else {
            return;
        };
        let mut ids = parking.take_ready();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.serve(id, store);
        }
    }

    /// Before the loop polls: the page requests of the turn go out (one
    /// wake-up of the fault thread), and how long the poll may wait — not
    /// at all when connections are to be served again, at most
    /// [`SETTLE_QUIET`](park::SETTLE_QUIET) while post-copy's word
    /// is unsaid (a quiet poll says it), else 100 ms.
    pub(super) fn next_wait(&self) -> Duration {
        if let Some(p) = self.parking.as_ref() {
            p.flush();
        }
        if !self.again.is_empty() {
            Duration::ZERO
        } else if self.parking.as_ref().is_some_and(Parking::awaiting_settle) {
            park::SETTLE_QUIET
        } else {
            Duration::from_millis(100)
        }
    }
}
