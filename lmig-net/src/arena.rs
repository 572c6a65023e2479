//! [`QueueArena`]: the memory the capture reads socket queues into, touched
//! before the freeze.
//!
//! Peeking a queue into a fresh buffer faults its pages in during the freeze,
//! one by one, and on a virtual machine that hands free memory back to its
//! hypervisor each first touch costs several microseconds: with 32 MiB
//! queued that was most of the capture. The arena is one buffer sized from
//! an estimate of the queued bytes ([`crate::NetSource::queued_bytes`]) and
//! written once before the freeze; the capture cuts each queue's buffer off
//! its front (no copy: the records' `Bytes` share it) and falls back to a
//! fresh buffer when it runs out.

use std::sync::Mutex;

use bytes::BytesMut;

/// The most an arena holds, whatever the estimate (1 GiB).
pub(crate) const MAX_ARENA: usize = 1 << 30;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct QueueArena {
    free: Mutex<BytesMut>,
}

impl QueueArena {
    /// Make sure about `bytes` (at most [`MAX_ARENA`]) are ready, writing
    /// every page of a new buffer now. An arena with at least nine tenths
    /// of that is kept (the estimate moves a little from round to round,
    /// and the caller's has a quarter to spare: writing a new arena each
    /// round would fault in as much as the freeze saves); a smaller one is
    /// replaced.
    pub(crate) fn reserve(&self, bytes: usize) {
        let bytes = bytes.min(MAX_ARENA);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() >= bytes - bytes / 10 {
            return;
        }
        // Dropped first: the old and the new buffer never both count.
        *free = BytesMut::new();
        let mut b = BytesMut::with_capacity(bytes);
        // Writes every byte: the pages are faulted in here, not in the freeze.
        b.resize(bytes, 0);
        *free = b;
    }

    /// A buffer of `len` bytes (contents unspecified), cut from the arena
    /// when it has room, fresh otherwise.
    pub(crate) fn take(&self, len: usize) -> BytesMut {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() >= len {
            free.split_to(len)
        } else {
            drop(free);
            BytesMut::zeroed(len)
        }
    }

    /// Bytes left in the arena.
    #[cfg(test)]
    pub(crate) fn left(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Give the memory back (after the capture, or when no estimate holds).
    pub(crate) fn clear(&self) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) = BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_from_the_front_then_falls_back_to_fresh_buffers() {
        let a = QueueArena::default();
        assert_eq!(a.take(10).len(), 10, "an empty arena still gives buffers");
        a.reserve(100);
        assert_eq!(a.left(), 100);
        a.reserve(50);
        assert_eq!(a.left(), 100, "a larger arena is kept");
        a.reserve(111);
        assert_eq!(a.left(), 100, "and one nearly as large");
        a.reserve(112);
        assert_eq!(a.left(), 112, "a smaller one is replaced");
        a.clear();
        a.reserve(100);
        let mut x = a.take(60);
        x.copy_from_slice(&[7; 60]);
        let y = a.take(30);
        assert_eq!((x.len(), y.len(), a.left()), (60, 30, 10));
        let z = a.take(11);
        assert_eq!((z.len(), a.left()), (11, 10), "too big: fresh");
        // Buffers cut from one arena are independent.
        let x = x.freeze();
        assert!(x.iter().all(|&b| b == 7));
        a.clear();
        assert_eq!(a.left(), 0);
        assert!(x.iter().all(|&b| b == 7), "records outlive the arena");
    }
}
