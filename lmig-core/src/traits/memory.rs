//! Memory: reading pages at the source, placing them at the destination,
//! residency, dirty tracking.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{MigrationError, Result};
use crate::model::{PageRun, RegionLayout, RegionPages};

/// Reads pages of the program's registered regions on the source.
///
/// Implementations copy through raw pointers: the program (or a vCPU) keeps
/// writing the memory while pre-copy reads it.
pub trait MemorySource: Send + Sync {
    /// The regions, as they will be announced to the destination.
    fn layout(&self) -> RegionLayout;

    /// Copy the pages of `run` into `dst`, whose length is exactly the run's byte length.
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()>;

    /// Test in place which pages of `run` read as zero (`zero` holds one
    /// flag per page), without copying them: the sender then copies only
    /// the others. Returns false when the backend cannot (the default);
    /// the sender then copies the whole run and tests the copy.
    fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> Result<bool> {
        let _ = (run, zero);
        Ok(false)
    }

    /// Add to `pages` every page that may hold data now; a page left out
    /// reads as zero (never touched since it was mapped, or released to the
    /// kernel), so the first round sends it as zero without reading it.
    /// Called after the dirty tracker started: a page written later is the
    /// tracker's. Returns false when the backend cannot tell (the default):
    /// then every page is read.
    fn populated(&self, pages: &mut RegionPages) -> Result<bool> {
        let _ = pages;
        Ok(false)
    }

    /// Add to `free` the pages the program declared free (their content is
    /// meaningless and reads as zero here) and has not declared in use
    /// again. The session never reads them: the first round sends them as
    /// zero runs, and a post-copy freeze sends as zero runs the free pages
    /// it would otherwise leave missing, so neither push nor demand carries
    /// them. A free page the tracker reports written is sent anyway: a
    /// declaration only spares pages clean since it was made. Returns false
    /// when the backend takes no declarations (the default).
    fn free_pages(&self, free: &mut RegionPages) -> Result<bool> {
        let _ = free;
        Ok(false)
    }

    /// Add to `freed` the pages declared free since the previous call, and
    /// forget them: their content was discarded while the destination may
    /// hold an older copy, so the session sends them once more (they read
    /// as zero, and go as zero runs). Called after each collect. None (the
    /// default) when the backend takes no declarations.
    fn take_freed(&self, freed: &mut RegionPages) -> Result<()> {
        let _ = freed;
        Ok(())
    }

    /// After `Commit` and once every page has been sent: the source copy is no
    /// longer needed and may be released.
    fn release(&self) {}

    /// Called once by the thread answering post-copy page requests, before
    /// it starts: a backend may raise that thread's scheduling priority, so
    /// that a request does not wait for a CPU behind the push. The default
    /// does nothing.
    fn urgent_thread(&self) {}

    /// Called once by each bulk thread before it starts: each thread
    /// sending a pre-copy round (one per data lane, for that round) when
    /// [`SourceConfig::yield_to_program`](crate::session::SourceConfig::yield_to_program)
    /// is set, and always by the post-copy service's push and digest
    /// threads. A backend may lower that thread's scheduling priority, so
    /// that the program's own threads and the fault path get a CPU first
    /// (the freeze's senders are left alone). The default does nothing.
    fn background_thread(&self) {}

    /// `Commit` went out for the program of this memory: it belongs to a
    /// destination now. Called with `confirmed = false` as soon as the
    /// `Commit` frame is written, and again with `true` when `Done` came
    /// back. A backend that outlives the session keeps the last value for
    /// [`MemorySource::handed_over`] (the default keeps nothing).
    fn mark_handed_over(&self, confirmed: bool) {
        let _ = confirmed;
    }

    /// What an earlier session's `Commit` left on this memory: `None` (no
    /// `Commit` went out), `Some(false)` (`Commit` went out, never
    /// confirmed: [`MigrationError::CommitUnconfirmed`]), `Some(true)`
    /// (handed over and confirmed). [`Source::run`](crate::session::Source::run)
    /// refuses such memory with [`MigrationError::HandedOverBefore`]: the
    /// program may run on the destination, and a second copy must not.
    fn handed_over(&self) -> Option<bool> {
        None
    }
}

/// Places pages into the program's regions on the destination.
///
/// When each method is called: see [the module docs](crate::traits).
///
/// Methods take `&self`: pages of distinct chunks may be placed from several
/// threads at once.
pub trait MemorySink: Send + Sync {
    /// Check the source's layout against what this side has mapped (or map it).
    /// A mismatch is an error before any page is placed.
    fn prepare(&self, layout: &RegionLayout) -> Result<()>;

    /// Write `data` (exactly the run's byte length) into the pages of `run`.
    fn write_pages(&self, run: &PageRun, data: &[u8]) -> Result<()>;

    /// Make every page of `run` zero.
    fn zero_pages(&self, run: &PageRun) -> Result<()>;

    /// Read pages back (used to verify digests).
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()>;

    /// Post-copy: from now on the pages in `missing` are absent (their current
    /// content is stale and must be dropped); a touch of one blocks the
    /// toucher until `write_pages` / `zero_pages` places it. Called before
    /// `Ready`, while the program is not running yet, so a failure still
    /// aborts the migration cleanly.
    fn begin_postcopy(&self, missing: &RegionPages) -> Result<()> {
        let _ = missing;
        Err(MigrationError::Unsupported {
            feature: "post-copy",
            needs: "a memory sink that handles page faults (lmig-mem's userfaultfd sink)",
        })
    }

    /// Post-copy: wait up to `timeout` for the program to touch a missing
    /// page; returns the run it needs (the session asks the source for it).
    /// `Ok(None)` when nothing faulted in time.
    fn wait_fault(&self, timeout: Duration) -> Result<Option<PageRun>> {
        std::thread::sleep(timeout);
        Ok(None)
    }

    /// Post-copy stops being served with pages still missing (its source
    /// is lost: [`MigrationError::PostcopyPaused`]): make every page that
    /// is *not* missing readable with nobody answering faults (place the
    /// zeros the kernel would give a page never touched), so that only the
    /// threads touching a missing page stay blocked. Never fills a missing page.
    fn hold_missing(&self) -> Result<()> {
        Ok(())
    }

    /// Post-copy: every page has been placed; stop handling faults.
    fn end_postcopy(&self) -> Result<()> {
        Ok(())
    }

    /// The migration failed before `Commit`: drop what was received.
    fn discard(&self) {}

    /// Called once by each thread of the post-copy fault path (the one
    /// forwarding faults, the one placing the replies), before it starts: a
    /// backend may raise its scheduling priority, so that a fault does not
    /// wait for a CPU behind the placement of pushed pages. The default
    /// does nothing.
    fn urgent_thread(&self) {}

    /// Called once by the thread placing pushed pages after `Commit` (the
    /// session's own after-`Commit` thread), before post-copy starts: a
    /// backend may lower its scheduling priority, so that the program that
    /// now runs here, and the fault path, come before the push. The
    /// default does nothing.
    fn background_thread(&self) {}

    /// Post-copy: the residency handle of this memory, for a program that
    /// must not block its event loop on a missing page (see
    /// [`PageResidency`]); handed to the program in the
    /// [`Resumption`](crate::session::Resumption). `None` (the default)
    /// when the sink has none, or outside post-copy (every page is here).
    fn residency(&self) -> Option<Arc<dyn PageResidency>> {
        None
    }

    /// Post-copy: [`Self::wait_fault_or`] watches the descriptor it is
    /// given in the same wait as the faults. The destination then runs one
    /// thread for the fault path (it forwards the faults and places the
    /// replies) instead of two. The default says no.
    fn waits_fault_or(&self) -> bool {
        false
    }

    /// Post-copy: [`Self::wait_fault`], returning `Ok(None)` early also
    /// when `also` turns readable (or its number is no longer open); it
    /// does not read from `also`. Called only when [`Self::waits_fault_or`]
    /// says so; the default ignores `also`.
    fn wait_fault_or(&self, also: Option<RawFd>, timeout: Duration) -> Result<Option<PageRun>> {
        let _ = also;
        self.wait_fault(timeout)
    }

    /// Post-copy: whether [`Self::wait_fault`] spins a while before it
    /// blocks (a sink that spends CPU for shorter faults). The session's
    /// default fault path is one thread for faults and replies exactly
    /// then ([`crate::session::DestinationConfig::one_fault_thread`]). Default false.
    fn fault_wait_spins(&self) -> bool {
        false
    }

    /// Post-copy: append to `runs`, without waiting, up to `max` runs
    /// needed now — the faults already there first (a faulting thread is
    /// blocked), then the runs the program asked for ahead — and return
    /// how many. The session calls it right after [`Self::wait_fault`] (or
    /// [`Self::wait_fault_or`]) gave a run, to send every request at hand
    /// in one write. The default calls `wait_fault` with no timeout until
    /// it gives nothing; a sink may look for faults once for the whole
    /// batch instead of once per run.
    fn take_faults(&self, runs: &mut Vec<PageRun>, max: usize) -> Result<usize> {
        let mut n = 0;
        while n < max {
            match self.wait_fault(Duration::ZERO)? {
                Some(run) => runs.push(run),
                None => break,
            }
            n += 1;
        }
        Ok(n)
    }
}

/// Post-copy residency, for an event-loop program: whether pages are here,
/// and a request for those that are not that does not block — the program
/// parks the work that needs them, serves other work, and is told through
/// a pollable file descriptor once they are placed (as KVM's asynchronous
/// page faults let a guest run another task). A page counts as here once
/// its placement returned; a query racing a placement answers "not yet",
/// and the request made after it is told when it is in.
pub trait PageResidency: Send + Sync {
    /// Every page of `run` is placed.
    fn is_resident(&self, run: &PageRun) -> Result<bool>;
    /// Ask for the missing pages of `run` ahead of the rest, without
    /// touching them. `Ok(true)`: all there already (nothing queued);
    /// `Ok(false)`: `token` is returned by [`Self::take_ready`] once every
    /// page of `run` is placed.
    fn request(&self, run: &PageRun, token: u64) -> Result<bool>;
    /// Tokens of requests now complete, in the order they completed; clears
    /// the readiness of [`Self::ready_fd`].
    fn take_ready(&self) -> Vec<u64>;
    /// Readable (an eventfd) while [`Self::take_ready`] has tokens: add it
    /// to the program's poll set.
    fn ready_fd(&self) -> std::os::fd::BorrowedFd<'_>;
    /// The program says that the work it parked for missing pages right
    /// after the resume (what piled up in the freeze) has all run. The
    /// destination session passes it on to the source once
    /// (`Message::DemandSettled`), whose push hold-off then ends at once
    /// instead of at its bound. Calling it again, or from a residency
    /// outside a session, does nothing. The default does nothing.
    fn settled(&self) {}
    /// [`Self::request`] without waking the thread that sends requests to
    /// the source: the request is queued, and leaves with the next
    /// [`Self::flush_requests`] or [`Self::request`], together with every
    /// other request queued meanwhile — one wake-up and one write for all
    /// the requests of one turn of the program's loop, instead of a
    /// wake-up per request (each of which takes the CPU from the loop on a
    /// busy machine). Never held without a bound: a request no flush
    /// follows leaves when the fault thread next looks (the destination
    /// session's `fault_poll`, 20 ms by default). The answer is the one
    /// [`Self::request`] gives. The default calls [`Self::request`].
    fn request_deferred(&self, run: &PageRun, token: u64) -> Result<bool> {
        self.request(run, token)
    }
    /// Send the requests [`Self::request_deferred`] queued (wake the
    /// thread that sends them); nothing to do when none is queued. The
    /// default does nothing.
    fn flush_requests(&self) {}
}

/// Finds the pages the program wrote since the last collect.
pub trait DirtyTracker: Send {
    /// Short name for reports: `"uffd-wp+pagemap-scan"`, `"manual"`, …
    fn name(&self) -> &'static str;

    /// Begin tracking every page of every region; all pages count as clean from here.
    fn start(&mut self) -> Result<()>;

    /// Add the pages written since the last `start`/`collect` to `dirty` and
    /// mark them clean again, in one step (a write racing the collect is
    /// reported now or at the next collect, never lost).
    fn collect(&mut self, dirty: &mut RegionPages) -> Result<()>;

    /// The collect made while the program is paused (the session's final
    /// collect at the freeze): the same contract as [`Self::collect`], but
    /// no writer can wait on it, so a tracker that splits its work to bound
    /// a writer's wait (the uffd-wp tracker's write-protect chunks, KVM's
    /// chunked clears) may do it in one pass per region. The default calls
    /// [`Self::collect`].
    fn collect_paused(&mut self, dirty: &mut RegionPages) -> Result<()> {
        self.collect(dirty)
    }

    /// Stop tracking (remove write protection and the like).
    fn stop(&mut self) -> Result<()>;

    /// Optional: a handle the page senders use to mark a run clean right
    /// before they read it, so that a page written before its read in a
    /// round is not sent again in the next one (QEMU clears KVM's dirty log
    /// chunk by chunk before sending, for the same reason). Valid while the
    /// tracker runs. `None` (the default) when the tracker cannot.
    fn clearer(&self) -> Option<Box<dyn DirtyClearer>> {
        None
    }
}

/// Marks runs clean just before they are read; see [`DirtyTracker::clearer`].
pub trait DirtyClearer: Send + Sync {
    /// Forget the writes to the pages of `run` made so far, in one step with
    /// re-arming their tracking (a write racing the clear is either
    /// forgotten, and then read right after, or reported at the next collect).
    fn clear(&self, run: &PageRun) -> Result<()>;
}
