//! The source and destination state machines of one migration.
//!
//! Both are generic over the traits of [`crate::traits`]; the sequence of
//! messages, the state diagrams and the commit rule they enforce are in
//! [`crate::protocol`]. In short:
//!
//! * [`Source::run`] returns `Ok` only after `Commit` was sent and `Done`
//!   received: the program now runs on the destination and must end here.
//!   It returns `Err` with the program **resumed on the source** (network
//!   unlocked, sockets out of repair mode, tracker stopped, memory untouched)
//!   for every failure before `Commit`, and
//!   [`MigrationError::CommitUnconfirmed`] when `Commit` went out but `Done`
//!   never came back ([`MigrationError::source_may_run`] is false then).
//! * [`Destination::run`] resumes the program only after a complete `Commit`;
//!   before that, every failure discards what it received. After it, in
//!   post-copy, a source lost for good *pauses* post-copy
//!   ([`crate::Event::PostcopyPaused`]): threads touching a missing page
//!   stay blocked, reconnection goes on (a source that comes back finishes
//!   the migration) until [`DestinationConfig::pause_limit`], then
//!   [`MigrationError::PostcopyPaused`] says how many pages are still
//!   missing. No missing page is ever filled with zeros or stale data.
//! * [`Destination::start`] (or [`Destination::start_scoped`] for borrowed
//!   backends) returns at `Commit` with a [`Resumption`]: the program's
//!   state sink, its socket sink with the sockets activated, its memory,
//!   and an [`AfterCommit`] handle whose `join` gives the final report once
//!   post-copy, the digest check and `Done` are over. Before `Commit`, every
//!   failure discards what it received and returns `Err`; after it, an
//!   error is [`MigrationError::AfterCommit`] (the program runs regardless).
//!   [`Destination::run`] is `start_scoped` then `join`.
//! * Bounds and control on the source: [`SourceConfig::max_freeze`] (past
//!   it the source aborts and resumes), [`Source::cancel_handle`] (a
//!   [`CancelHandle`] that aborts before `Commit` and says when it is too
//!   late), [`Source::control`] (a [`SourceControl`]: the cancel, a
//!   [`Progress`] snapshot, and [`SourceConfig::bandwidth_limit`] changed
//!   while the session runs), and the refusal of a channel over a moved
//!   service address ([`MigrationError::ChannelOnMovedAddress`]).
//!
//! Borrow the backends (`&mut tracker`, `&memory`) to keep them after the
//! session: an aborted migration can simply be tried again.

mod destination;
mod pace;
mod pages;
mod source;

use std::time::Duration;

pub use destination::{AfterCommit, Destination, DestinationConfig, DestinationReport, Resumption};
pub use pages::is_zero;
pub use source::{
    CancelHandle, CancelOutcome, IDLE_MAX_REST, IDLE_WORK_SLICE, Mode, Progress, Source,
    SourceConfig, SourceControl, SourceReport,
};

use crate::error::MigrationError;
use crate::protocol::Message;
use crate::traits::Channel;

/// Run `f`, turning a panic in it — in a trait implementation it calls, on
/// this thread or on a scoped thread it joins — into
/// [`MigrationError::Panicked`], so that the session's failure rules apply
/// to it as to any error.
fn contain<T>(
    during: &'static str,
    committed: bool,
    f: impl FnOnce() -> Result<T, MigrationError>,
) -> Result<T, MigrationError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(panicked(during, committed, &*payload)))
}

/// [`MigrationError::Panicked`] from a panic's payload.
fn panicked(
    during: &'static str,
    committed: bool,
    payload: &(dyn std::any::Any + Send),
) -> MigrationError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into());
    MigrationError::Panicked {
        during,
        message,
        committed,
    }
}

/// Spawn a named thread in `scope`; a thread that cannot be started is an
/// error, not a panic.
fn spawn_named<'scope, 'env, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    name: String,
    f: impl FnOnce() -> T + Send + 'scope,
) -> Result<std::thread::ScopedJoinHandle<'scope, T>, MigrationError> {
    // The thread logs where its caller does.
    let log = crate::log::Inherit::capture();
    std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, move || log.run(f))
        .map_err(|e| MigrationError::backend("starting a session thread", e))
}

/// Send `Abort{reason}` on a best-effort basis and close the channel.
fn send_abort(channel: &impl Channel, err: &MigrationError) {
    let mut reason = err.to_string();
    reason.truncate(crate::protocol::MAX_REASON_BYTES - 4);
    if let Err(e) = channel.send(&Message::Abort { reason }) {
        debug!(error = %e, "could not tell the peer Abort (it learns from the closed channel)");
    }
    channel.shutdown();
}

/// Receive within `timeout`, turning silence into a `Timeout` error.
fn recv_within(
    channel: &impl Channel,
    timeout: Duration,
    waiting_for: &'static str,
) -> Result<Message, MigrationError> {
    channel.recv(Some(timeout))?.ok_or(MigrationError::Timeout {
        waiting_for,
        after: timeout,
    })
}

/// Post-copy recovery: `Channel::reconnect` until it works or `within`
/// passed (a pause between attempts). Returns the number of attempts.
fn reconnect_within(
    channel: &impl Channel,
    within: Duration,
    why: &str,
) -> Result<u32, MigrationError> {
    let deadline = std::time::Instant::now() + within;
    let mut attempts = 0u32;
    // Bounded by the deadline.
    loop {
        attempts += 1;
        match channel.reconnect() {
            Ok(()) => {
                info!(attempts = attempts, why = why, "channel reconnected");
                return Ok(attempts);
            }
            Err(e @ MigrationError::Unsupported { .. }) => return Err(e),
            Err(e) if std::time::Instant::now() >= deadline => {
                warn!(attempts = attempts, error = %e, why = why, "reconnection given up");
                return Err(MigrationError::backend(
                    "post-copy recovery",
                    format!(
                        "the channel broke ({why}) and {attempts} reconnection attempts failed, the last: {e}"
                    ),
                ));
            }
            Err(e) => {
                debug!(attempt = attempts, error = %e, "reconnection attempt failed");
                std::thread::sleep(Duration::from_millis(50))
            }
        }
    }
}

fn unexpected(phase: &'static str, expected: &'static str, got: &Message) -> MigrationError {
    match got {
        Message::Abort { reason } => MigrationError::PeerAborted {
            reason: reason.clone(),
        },
        other => MigrationError::Protocol {
            phase,
            expected,
            got: other.name().to_string(),
        },
    }
}
