//! [`SinkConfig`]: how a [`NetSink`](super::NetSink) restores and
//! activates sockets.

use crate::repair::RepairExit;

/// Settings of a [`NetSink`](super::NetSink): `SinkConfig::default()` and the `with_*`
/// setters (the struct is `#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SinkConfig {
    /// Restore threads (default 1). Threads are started per batch, so only
    /// batches of at least 32 records per thread are split (starting a
    /// thread costs more than restoring a record). With 2 vCPUs shared with
    /// the source, 2 threads shorten the restore that outlasts the capture
    /// but slow the capture itself: kvd uses 2 (see docs/benchmarks.md).
    pub threads: usize,
    /// Activation threads (default 2): activation runs after `Commit`, when
    /// the source has nothing left to capture, so it can take every core.
    pub activate_threads: usize,
    /// How restored connections leave repair mode (default [`RepairExit::Auto`]).
    pub exit: RepairExit,
    /// When some records of a batch fail, `restore` still restores the others
    /// and then returns [`NetError::Partial`](crate::NetError::Partial) (which makes a session abort)
    /// unless this is true, in which case it returns `Ok` and the failures
    /// are kept in [`NetSink::failures`](super::NetSink::failures).
    pub tolerate_bad_records: bool,
    /// Create restored sockets non-blocking (`SOCK_NONBLOCK`; default
    /// false): an event-loop program then needs no `fcntl` or `ioctl` per
    /// connection after the commit. (The source's file flags are not
    /// carried: they belong to the program's fds, not to the sockets.)
    pub nonblocking: bool,
    /// Write the bytes a connection never sent (held back by its peer's
    /// window) after activation, on a thread of their own while the
    /// program runs, instead of inside activation (default false). With
    /// megabytes queued that write is most of the activation's time. The
    /// program must then honour the contract of [`UnsentTails`](crate::UnsentTails): no write
    /// to a connection while [`UnsentTails::is_pending`](crate::UnsentTails::is_pending) says so
    /// ([`NetSink::unsent_tails`](super::NetSink::unsent_tails)).
    pub unsent_in_background: bool,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            activate_threads: 2,
            exit: RepairExit::Auto,
            tolerate_bad_records: false,
            nonblocking: false,
            unsent_in_background: false,
        }
    }
}

impl SinkConfig {
    /// Sets [`threads`](Self::threads).
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Sets [`activate_threads`](Self::activate_threads).
    #[must_use]
    pub fn with_activate_threads(mut self, activate_threads: usize) -> Self {
        self.activate_threads = activate_threads;
        self
    }

    /// Sets [`exit`](Self::exit).
    #[must_use]
    pub fn with_exit(mut self, exit: RepairExit) -> Self {
        self.exit = exit;
        self
    }

    /// Sets [`tolerate_bad_records`](Self::tolerate_bad_records).
    #[must_use]
    pub fn with_tolerate_bad_records(mut self, tolerate_bad_records: bool) -> Self {
        self.tolerate_bad_records = tolerate_bad_records;
        self
    }

    /// Sets [`unsent_in_background`](Self::unsent_in_background).
    #[must_use]
    pub fn with_unsent_in_background(mut self, unsent_in_background: bool) -> Self {
        self.unsent_in_background = unsent_in_background;
        self
    }

    /// Sets [`nonblocking`](Self::nonblocking).
    #[must_use]
    pub fn with_nonblocking(mut self, nonblocking: bool) -> Self {
        self.nonblocking = nonblocking;
        self
    }
}
