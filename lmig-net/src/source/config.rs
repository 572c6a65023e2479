//! [`NetSourceConfig`]: the settings of a [`super::NetSource`].

/// Settings of a [`NetSource`](super::NetSource): `NetSourceConfig::default()` and the
/// `with_*` setters (the struct is `#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NetSourceConfig {
    /// Records per batch handed to the session (default 256).
    pub batch_size: usize,
    /// Capture threads (default 2).
    pub threads: usize,
    /// Record `SO_RCVBUF`/`SO_SNDBUF` (default false: setting a size on the
    /// destination would lock it and turn TCP auto-tuning off, and the kernel
    /// cannot tell whether the program set it).
    pub capture_buffer_sizes: bool,
    /// Read connection addresses and options again at the freeze (default
    /// false: they are read by `plan`, before the freeze, and an option the
    /// program changes after `plan` is not carried; true moves about a dozen
    /// `getsockopt` per connection into the freeze).
    pub reread_options_at_freeze: bool,
    /// Close the released sockets on a background thread in the lowest CPU
    /// class, `SCHED_IDLE` (default false). Closing sockets in repair mode costs time
    /// per socket: with the destination on another host that is
    /// only cleanup, and on a host the source shares with the destination
    /// (containers, tests) it takes the CPU the destination needs right
    /// after `Commit`. The peers see nothing either way (repair mode), and
    /// [`NetSource::release_sockets`](super::NetSource::release_sockets) returns once every socket is in repair
    /// mode. Leave it off when the destination restores the connections in
    /// this network namespace: its `connect` needs the originals closed.
    pub close_in_background: bool,
    /// Queued bytes per batch (default 1 MiB): a batch is handed over once
    /// its records hold this much queue data, so that the destination
    /// restores the first connections' queues while the next are captured
    /// and sent, instead of waiting for one message with all of them.
    pub batch_bytes: usize,
}

impl Default for NetSourceConfig {
    fn default() -> Self {
        Self {
            batch_bytes: 1 << 20,
            batch_size: 256,
            threads: 2,
            capture_buffer_sizes: false,
            reread_options_at_freeze: false,
            close_in_background: false,
        }
    }
}

impl NetSourceConfig {
    /// Sets [`batch_bytes`](Self::batch_bytes).
    #[must_use]
    pub fn with_batch_bytes(mut self, batch_bytes: usize) -> Self {
        self.batch_bytes = batch_bytes;
        self
    }

    /// Sets [`batch_size`](Self::batch_size).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Sets [`threads`](Self::threads).
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Sets [`capture_buffer_sizes`](Self::capture_buffer_sizes).
    #[must_use]
    pub fn with_capture_buffer_sizes(mut self, capture_buffer_sizes: bool) -> Self {
        self.capture_buffer_sizes = capture_buffer_sizes;
        self
    }

    /// Sets [`reread_options_at_freeze`](Self::reread_options_at_freeze).
    #[must_use]
    pub fn with_reread_options_at_freeze(mut self, reread_options_at_freeze: bool) -> Self {
        self.reread_options_at_freeze = reread_options_at_freeze;
        self
    }

    /// Sets [`close_in_background`](Self::close_in_background).
    #[must_use]
    pub fn with_close_in_background(mut self, close_in_background: bool) -> Self {
        self.close_in_background = close_in_background;
        self
    }
}

/// [`NetSourceConfig`] under its old name.
#[deprecated(note = "renamed `NetSourceConfig`: lmig-core has a `SourceConfig` too")]
pub type SourceConfig = NetSourceConfig;
