//! [`WarmArea`]: receive memory for large frames, written before the
//! freeze.
//!
//! A frame larger than a pooled buffer (the freeze's `Sockets` batches,
//! about a MiB each with megabytes queued) is read into a buffer of its
//! own. Fresh, that buffer's pages are faulted in as the payload lands in
//! them, and on a virtual machine a first touch costs several microseconds
//! per 4 KiB page (tens of milliseconds for 32 MiB, all inside the freeze;
//! `MADV_HUGEPAGE` does not help there, the cost is the host's). The source
//! sends its queue estimate during pre-copy (`Message::QueueEstimate`), the
//! destination calls [`Channel::warm_receive`](lmig_core::Channel::warm_receive),
//! and the channel writes one area of that size (a quarter more for the
//! records' own fields and frame headers) on a thread of its own
//! ([`WarmWriter`]). Large frames are cut off
//! its front (no copy: each frame's `Bytes` shares the area), and when it
//! runs out they get fresh buffers as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::BytesMut;

/// The most an area holds, whatever the estimate (1 GiB, the protocol's
/// cap on the estimate).
pub(crate) const MAX_WARM: usize = 1 << 30;

/// The area for an estimate of `bytes`: a quarter more, at most [`MAX_WARM`].
fn size_for(bytes: u64) -> usize {
    usize::try_from(bytes.saturating_add(bytes / 4))
        .unwrap_or(usize::MAX)
        .min(MAX_WARM)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the area and its writer share.
#[derive(Debug, Default)]
struct Shared {
    free: Mutex<BytesMut>,
    /// Bumped when the area is given back: a writer of an older
    /// generation drops what it wrote.
    generation: AtomicU64,
}

impl Shared {
    /// Install `b` (written for `generation`) unless the area was given
    /// back since, or already has as much.
    fn install(&self, b: BytesMut, generation: u64) {
        let mut free = lock(&self.free);
        if self.generation.load(Ordering::Acquire) == generation && free.len() < b.len() {
            *free = b;
        }
    }
}

/// The thread writing a new area (`lmig-warm`), off the caller's: the
/// destination's receive loop goes on placing pages meanwhile, and frames
/// that arrive before it is done get buffers of their own as before.
#[derive(Debug)]
struct WarmWriter {
    thread: JoinHandle<()>,
    /// The size it writes.
    size: usize,
}

impl WarmWriter {
    /// Write `size` bytes for `generation` on a thread (here if none starts).
    fn spawn(shared: &Arc<Shared>, size: usize, generation: u64) -> Option<Self> {
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("lmig-warm".into())
            .spawn(move || sh.install(written(size), generation));
        match spawned {
            Ok(thread) => Some(Self { thread, size }),
            Err(e) => {
                warn!(error = %e, "the receive-area writer could not start: writing here");
                shared.install(written(size), generation);
                None
            }
        }
    }

    fn join(self) {
        if self.thread.join().is_err() {
            warn!("the receive-area writer panicked");
        }
    }
}

/// `size` bytes, every one written: the pages are faulted in here, not in
/// the freeze.
fn written(size: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(size);
    b.resize(size, 0);
    b
}

/// See the module docs. Shared by a channel's readers.
#[derive(Debug, Default)]
pub(crate) struct WarmArea {
    shared: Arc<Shared>,
    writer: Mutex<Option<WarmWriter>>,
}

impl WarmArea {
    /// Room for about `bytes` of queue data: `bytes` and a quarter more
    /// (at most [`MAX_WARM`]), written on a thread of its own from now. An
    /// area with room for `bytes` and an eighth more (or being written so)
    /// is kept: the estimate moves a little from round to round, and
    /// writing a new area each time would cost what it saves; a smaller
    /// one is replaced once the new one is written. 0 gives the area back.
    pub(crate) fn reserve(&self, bytes: u64) {
        let mut writer = lock(&self.writer);
        if bytes == 0 {
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
            *lock(&self.shared.free) = BytesMut::new();
            return;
        }
        let enough = usize::try_from(bytes.saturating_add(bytes / 8))
            .unwrap_or(usize::MAX)
            .min(MAX_WARM);
        let writing = writer
            .as_ref()
            .map_or(0, |w| if w.thread.is_finished() { 0 } else { w.size });
        if lock(&self.shared.free).len() >= enough || writing >= enough {
            return;
        }
        if let Some(w) = writer.take() {
            w.join();
        }
        let generation = self.shared.generation.load(Ordering::Acquire);
        *writer = WarmWriter::spawn(&self.shared, size_for(bytes), generation);
    }

    /// Wait for an area being written.
    pub(crate) fn settle(&self) {
        if let Some(w) = lock(&self.writer).take() {
            w.join();
        }
    }

    /// A buffer of exactly `len` bytes (contents unspecified) cut from the
    /// area, if it has room.
    pub(crate) fn take(&self, len: usize) -> Option<BytesMut> {
        let mut free = lock(&self.shared.free);
        (free.len() >= len).then(|| free.split_to(len))
    }

    /// Bytes left in the area (once an area being written is ready).
    pub(crate) fn left(&self) -> usize {
        self.settle();
        lock(&self.shared.free).len()
    }
}

impl Drop for WarmArea {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_off_the_front_until_it_runs_out() {
        let a = WarmArea::default();
        assert!(a.take(1).is_none(), "no estimate: no area");
        a.reserve(0);
        assert_eq!(a.left(), 0, "an estimate of zero warms nothing");
        a.reserve(80);
        assert_eq!(a.left(), 100, "a quarter more than the estimate");
        a.reserve(40);
        assert_eq!(a.left(), 100, "an area with room is kept");
        a.reserve(88);
        assert_eq!(a.left(), 100, "and for an estimate a little larger");
        a.reserve(90);
        assert_eq!(a.left(), 112, "not for one larger still (101 > 100)");
        a.reserve(0);
        a.reserve(80);
        a.settle();
        let mut x = a.take(60).unwrap();
        x.copy_from_slice(&[7; 60]);
        assert_eq!(a.left(), 40);
        assert!(a.take(41).is_none(), "larger than what is left: fresh");
        assert_eq!(a.take(40).map(|b| b.len()), Some(40));
        a.reserve(80);
        assert_eq!(a.left(), 100, "an area used up is replaced");
        let x = x.freeze();
        a.reserve(0);
        assert_eq!(a.left(), 0);
        assert!(x.iter().all(|&b| b == 7), "frames outlive the area");
        assert_eq!(size_for(u64::MAX), MAX_WARM, "capped");
        assert_eq!(size_for(4 << 20), 5 << 20);
    }
}
