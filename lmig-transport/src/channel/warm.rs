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
//! records' own fields and frame headers) then. Large frames are cut off
//! its front (no copy: each frame's `Bytes` shares the area), and when it
//! runs out they get fresh buffers as before.

use std::sync::Mutex;

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

/// See the module docs. Shared by a channel's readers.
#[derive(Debug, Default)]
pub(crate) struct WarmArea {
    free: Mutex<BytesMut>,
}

impl WarmArea {
    fn free(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for about `bytes` of queue data: `bytes` and a quarter more
    /// (at most [`MAX_WARM`]) written now. An area with room for `bytes`
    /// and an eighth more is kept (the estimate moves a little from round
    /// to round: writing a new area each time would cost what it saves); a
    /// smaller one is replaced. 0 gives the area back.
    pub(crate) fn reserve(&self, bytes: u64) {
        if bytes == 0 {
            *self.free() = BytesMut::new();
            return;
        }
        let enough = usize::try_from(bytes.saturating_add(bytes / 8))
            .unwrap_or(usize::MAX)
            .min(MAX_WARM);
        if self.free().len() >= enough {
            return;
        }
        let want = size_for(bytes);
        // Written outside the lock (a reader may take a frame meanwhile),
        // every byte: the pages are faulted in here, not in the freeze.
        let mut b = BytesMut::with_capacity(want);
        b.resize(want, 0);
        let mut free = self.free();
        if free.len() < want {
            *free = b;
        }
    }

    /// A buffer of exactly `len` bytes (contents unspecified) cut from the
    /// area, if it has room.
    pub(crate) fn take(&self, len: usize) -> Option<BytesMut> {
        let mut free = self.free();
        (free.len() >= len).then(|| free.split_to(len))
    }

    /// Bytes left in the area.
    pub(crate) fn left(&self) -> usize {
        self.free().len()
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
