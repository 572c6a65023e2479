//! The destination's last step after `Commit`: wait for the source's
//! digests (unless they came with the post-copy pages) and compare them
//! with those of the pages as placed.

use super::postcopy::{PostcopyLink, Quiet, RECV_TICK};
use super::{Destination, Progress};
use crate::error::{MigrationError, Result};
use crate::model::RegionPages;
use crate::protocol::{Handover, Message, RegionDigest, Verification};
use crate::session::unexpected;
use crate::traits::{Channel, MemorySink, SocketSink, StateSink};
use crate::verify::first_mismatch;

/// Most warnings kept about stray messages while waiting for the digests.
const MAX_STRAY_WARNINGS: usize = 16;

impl<'a, C, M, P, K> Destination<'a, C, M, P, K>
where
    C: Channel,
    M: MemorySink,
    P: StateSink,
    K: SocketSink,
{
    /// Compare the source's digests (`theirs`, or the ones still to come)
    /// with those of the pages as placed.
    pub(super) fn verify(
        &self,
        progress: &mut Progress,
        handover: &Handover,
        link: &PostcopyLink,
        missing: &RegionPages,
        theirs: Option<Vec<RegionDigest>>,
    ) -> Result<Verification> {
        let theirs = match theirs {
            Some(d) => d,
            None => match self.await_digests(progress, handover, link, missing) {
                Ok(d) => d,
                // Every page is here: the source lost now only costs the
                // check (the program serves everything; not a failure).
                Err(MigrationError::PostcopyPaused {
                    missing_pages: 0,
                    reason,
                    ..
                }) => {
                    warn!(reason = %reason, "post-copy: the source was lost before its digests: not verified");
                    progress.report.warnings.push(format!(
                        "post-copy: every page placed, but the source was lost before its digests arrived ({reason}): not verified"
                    ));
                    return Ok(Verification::NotChecked);
                }
                Err(e) => return Err(e),
            },
        };
        Ok(match first_mismatch(&progress.hashes.digests(), &theirs) {
            None => Verification::Verified,
            Some(region) => Verification::Mismatch(region),
        })
    }

    /// Wait for `Digests` (bounded by `idle_timeout` of silence). In
    /// post-copy a broken link is recovered: the digests may have been lost
    /// with it.
    fn await_digests(
        &self,
        progress: &mut Progress,
        handover: &Handover,
        link: &PostcopyLink,
        missing: &RegionPages,
    ) -> Result<Vec<RegionDigest>> {
        let mut quiet = Quiet::new(self.config.idle_timeout, "Digests");
        loop {
            let msg = match self.channel.recv(Some(RECV_TICK)) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    if let Err(silent) = quiet.tick() {
                        if handover.postcopy.is_empty() {
                            return Err(silent);
                        }
                        let why = silent.to_string();
                        let n = missing.count();
                        self.recover(progress, link, &why, n, || Ok(missing.clone()))?;
                        quiet.reset();
                    }
                    continue;
                }
                Err(e) if !handover.postcopy.is_empty() => {
                    // The digests may have been lost with the link.
                    let n = missing.count();
                    self.recover(progress, link, &e.to_string(), n, || Ok(missing.clone()))?;
                    quiet.reset();
                    continue;
                }
                Err(e) => return Err(e),
            };
            quiet.reset();
            match msg {
                Message::Digests(d) => return Ok(d),
                // Duplicates of post-copy pages may still be in flight.
                Message::Pages(b) => progress.report.duplicate_pages += u64::from(b.run.count),
                abort @ Message::Abort { .. } => {
                    return Err(unexpected("verify", "Digests", &abort));
                }
                // A stray message (a duplicated `Commit`) after `Commit`
                // is dropped with a warning, as in post-copy: the program
                // runs here, and the digests may still come.
                other => {
                    if progress.report.warnings.len() < MAX_STRAY_WARNINGS {
                        progress.report.warnings.push(format!(
                            "after Commit: ignored an unexpected {} while waiting for the digests",
                            other.name()
                        ));
                    }
                }
            }
        }
    }
}
