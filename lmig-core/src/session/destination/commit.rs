//! The destination at `Commit`: the [`Resumption`] handed to the program
//! and the [`AfterCommit`] thread that finishes the migration behind it
//! (post-copy pages, digests, `Done`).

use std::sync::Arc;
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};
use std::time::Instant;

use super::settle::{SettleFlag, SettleReporting};
use super::{Destination, DestinationReport, Progress};
use crate::error::{MigrationError, Result};
use crate::protocol::{Handover, Message, Verification};
use crate::session::contain;
use crate::traits::{Channel, MemorySink, NoSockets, Phase, SocketSink, StateSink};

/// What the destination hands the program at `Commit`
/// ([`Destination::start`]): the program runs here from now on.
///
/// By then the session restored the program's state into `program`
/// ([`StateSink::restore`], before `Ready`), activated the sockets
/// ([`SocketSink::activate`]: out of repair mode, the service address
/// taken over, held packets released) and called [`StateSink::resume`].
/// Take the sockets from `sockets` (lmig-net's `NetSink::take_fds`), the
/// state from `program`, the memory from `memory`, serve, and
/// [`AfterCommit::join`] `after_commit` for the final report.
///
/// Dropped unused, it drops (and so closes) what it holds: the socket
/// sink with every restored socket, the program's sink with its state,
/// this clone of the memory sink. The after-`Commit` thread goes on
/// (with post-copy, the pages still arrive) and is detached.
#[non_exhaustive]
pub struct Resumption<'scope, P, K, M> {
    /// The program's state sink, holding the state the source sent.
    pub program: P,
    /// The socket sink, its sockets restored and activated.
    pub sockets: K,
    /// The memory sink (a clone: with post-copy, `after_commit` still
    /// places pages through the session's own).
    pub memory: M,
    /// The sockets could not all be activated ([`SocketSink::activate`]
    /// failed; also a warning of the final report). The program runs
    /// anyway: `Commit` is not undone.
    pub activation_error: Option<MigrationError>,
    /// [`StateSink::resume`] failed (also a warning of the final report).
    pub resume_error: Option<MigrationError>,
    /// What goes on after `Commit`: post-copy, the digest check, `Done`.
    pub after_commit: AfterCommit<'scope>,
    /// With post-copy, the memory's residency handle
    /// ([`MemorySink::residency`]): an event-loop program asks it before
    /// touching memory that may be missing and parks that work instead of
    /// blocking. `None` without post-copy (every page is here) or when the
    /// sink has none.
    pub residency: Option<std::sync::Arc<dyn crate::traits::PageResidency>>,
}

impl<'scope, P, K, M: MemorySink> Resumption<'scope, P, K, M> {
    pub(super) fn new(
        program: P,
        sockets: K,
        memory: M,
        errors: CommitErrors,
        after_commit: AfterCommit<'scope>,
        settle: &Arc<SettleFlag>,
    ) -> Self {
        Self {
            program,
            sockets,
            residency: SettleReporting::wrap(memory.residency(), settle),
            memory,
            activation_error: errors.activation,
            resume_error: errors.resume,
            after_commit,
        }
    }
}

impl<P, K, M> std::fmt::Debug for Resumption<'_, P, K, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resumption")
            .field("activation_error", &self.activation_error)
            .field("resume_error", &self.resume_error)
            .finish_non_exhaustive()
    }
}

/// What failed at `Commit` without undoing it.
#[derive(Default)]
pub(super) struct CommitErrors {
    pub activation: Option<MigrationError>,
    pub resume: Option<MigrationError>,
}

/// The program's place in the after-`Commit` session: it went to the
/// caller with the [`Resumption`].
pub(super) struct Detached;

impl StateSink for Detached {
    fn resume(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What the after-`Commit` thread runs: the session without the program
/// and its sockets.
pub(super) struct AfterCommitWork<'a, C, M> {
    pub session: Destination<'a, C, M, Detached, NoSockets>,
    pub progress: Progress,
    pub handover: Handover,
    /// [`StateSink::resume`] succeeded.
    pub program_running: bool,
}

impl<C: Channel, M: MemorySink> AfterCommitWork<'_, C, M> {
    /// Post-copy until every page is in, the digest check, `Done`. Every
    /// error is [`MigrationError::AfterCommit`].
    fn run(self) -> Result<DestinationReport> {
        let Self {
            mut session,
            mut progress,
            handover,
            program_running,
        } = self;
        let _phase = phase_span!("after_commit", side = "destination");
        if !handover.postcopy.is_empty() {
            // This thread places the pushed pages: after the program that
            // runs here now and the fault path (its own threads).
            session.memory.background_thread();
        }
        let outcome = contain("after Commit", true, || {
            let verification = session.after_commit(&mut progress, &handover)?;
            progress.report.verification = verification;
            if let Err(e) = session.channel.send(&Message::Done(verification)) {
                // Every page is here and the program runs: a source lost
                // after the last page does not make this migration fail.
                progress
                    .report
                    .warnings
                    .push(format!("post-copy: could not tell the source Done: {e}"));
            }
            session.phase(Phase::Done);
            match verification {
                Verification::Mismatch(region) => {
                    Err(MigrationError::VerificationFailed { region })
                }
                _ => Ok(()),
            }
        });
        match outcome {
            Ok(()) => Ok(progress.finish()),
            Err(e) => Err(MigrationError::AfterCommit {
                program_running,
                source: Box::new(e),
            }),
        }
    }
}

/// The thread finishing a migration after `Commit` (post-copy service,
/// digests, `Done`) while the program runs; see [`Resumption`].
#[must_use = "join it for the final report; dropped, the thread goes on detached"]
pub struct AfterCommit<'scope> {
    thread: AfterThread<'scope>,
    started: Instant,
}

enum AfterThread<'scope> {
    Owned(JoinHandle<Result<DestinationReport>>),
    Scoped(ScopedJoinHandle<'scope, Result<DestinationReport>>),
}

const THREAD_NAME: &str = "lmig-after-commit";

fn cannot_start(e: std::io::Error) -> MigrationError {
    MigrationError::AfterCommit {
        program_running: true,
        source: Box::new(MigrationError::backend(
            "starting the after-Commit thread",
            e,
        )),
    }
}

impl<'scope> AfterCommit<'scope> {
    pub(super) fn spawn_scoped<'env, 'a: 'scope, C, M>(
        scope: &'scope Scope<'scope, 'env>,
        work: AfterCommitWork<'a, C, M>,
    ) -> Result<Self>
    where
        C: Channel + 'scope,
        M: MemorySink + 'scope,
    {
        let log = crate::log::Inherit::capture();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn_scoped(scope, move || log.run(|| work.run()))
            .map_err(cannot_start)?;
        Ok(Self {
            thread: AfterThread::Scoped(thread),
            started: Instant::now(),
        })
    }

    /// Has the migration ended (the report is ready)?
    pub fn is_finished(&self) -> bool {
        match &self.thread {
            AfterThread::Owned(t) => t.is_finished(),
            AfterThread::Scoped(t) => t.is_finished(),
        }
    }

    /// When the program was handed over.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Wait for the end of the migration: the final report, or a
    /// [`MigrationError::AfterCommit`] (the program runs here whatever it says).
    pub fn join(self) -> Result<DestinationReport> {
        let joined = match self.thread {
            AfterThread::Owned(t) => t.join(),
            AfterThread::Scoped(t) => t.join(),
        };
        joined.unwrap_or_else(|payload| {
            Err(MigrationError::AfterCommit {
                program_running: true,
                source: Box::new(crate::session::panicked("after Commit", true, &*payload)),
            })
        })
    }
}

impl AfterCommit<'static> {
    fn spawn<C, M>(work: AfterCommitWork<'static, C, M>) -> Result<Self>
    where
        C: Channel + 'static,
        M: MemorySink + 'static,
    {
        let log = crate::log::Inherit::capture();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || log.run(|| work.run()))
            .map_err(cannot_start)?;
        Ok(Self {
            thread: AfterThread::Owned(thread),
            started: Instant::now(),
        })
    }
}

impl std::fmt::Debug for AfterCommit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfterCommit")
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

impl<C, M, P, K> Destination<'static, C, M, P, K>
where
    C: Channel + 'static,
    M: MemorySink + Clone + 'static,
    P: StateSink,
    K: SocketSink,
{
    /// Run the migration up to `Commit` and hand the program over: the
    /// state, the activated sockets and the memory, in a [`Resumption`]
    /// whose [`AfterCommit`] handle finishes the migration on a thread of
    /// its own while the program runs (post-copy pages, the digest check,
    /// `Done`).
    ///
    /// `Err` before `Commit`: the attempt failed and everything it
    /// brought was discarded ([`SocketSink::discard`],
    /// [`StateSink::discard`], [`MemorySink::discard`]); the source runs
    /// on. The backends must be owned (`Arc` for the memory, which the
    /// program and the session then share); [`Destination::start_scoped`]
    /// takes borrowed ones.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use lmig_core::testing::{VecMemory, channel_pair, MarkTracker, NullProgram};
    /// # use lmig_core::session::{Source, Destination};
    /// # use lmig_core::model::{RegionId, RegionInfo, RegionLayout, ProgramState};
    /// let layout = RegionLayout::new(vec![RegionInfo::new(RegionId(1), 16 * 4096, 4096)?])?;
    /// let src_mem = VecMemory::new(&layout);
    /// let (a, b) = channel_pair(1);
    /// let destination = std::thread::spawn(move || {
    ///     let memory = Arc::new(VecMemory::empty());
    ///     let resumed = Destination::new(b, memory, NullProgram::default()).start()?;
    ///     // `Commit`: the program runs here now, from its state (and its
    ///     // sockets, from `resumed.sockets`), while the rest finishes behind it.
    ///     assert_eq!(resumed.program.state.as_ref().map(|s| s.version), Some(7));
    ///     resumed.after_commit.join()
    /// });
    /// let mut tracker = MarkTracker::new(&layout);
    /// let program = NullProgram::with_state(ProgramState::new(7, b"counter=1".to_vec()));
    /// Source::new(&a, &src_mem, &mut tracker, program).run()?;
    /// destination.join().unwrap()?;
    /// # Ok::<_, lmig_core::MigrationError>(())
    /// ```
    pub fn start(self) -> Result<Resumption<'static, P, K, M>> {
        let (work, program, sockets, memory, errors) = self.commit()?;
        let settle = work.progress.settle.clone();
        let after_commit = AfterCommit::spawn(work)?;
        Ok(Resumption::new(
            program,
            sockets,
            memory,
            errors,
            after_commit,
            &settle,
        ))
    }
}
