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
//!
//! Its memory is given back after the freeze, not in it: the records are
//! dropped once sent, while the freeze goes on, and the last one would
//! unmap the whole buffer there (~1 ms of CPU for 40 MiB, on one of the
//! vCPUs the freeze is bound by). The arena holds a zero-length piece of
//! its buffer ([`QueueArena::clear`] keeps it), and the source drops that
//! with the released sockets after `Commit` (at `SCHED_IDLE`) or at an
//! abort ([`QueueArena::take_held`]).

use std::sync::Mutex;

use bytes::BytesMut;

/// The most an arena holds, whatever the estimate (1 GiB).
pub(crate) const MAX_ARENA: usize = 1 << 30;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct QueueArena {
    free: Mutex<BytesMut>,
    /// A zero-length piece of the current buffer and the buffer's size:
    /// the memory stays mapped while it is held, whatever the records do.
    held: Mutex<Option<Held>>,
}

/// The hold on an arena's memory: dropping it gives the memory back (once
/// no record cut from it is left).
#[derive(Debug)]
pub(crate) struct Held {
    _pin: BytesMut,
    size: usize,
}

impl Held {
    /// Bytes of the buffer held.
    pub(crate) fn size(&self) -> usize {
        self.size
    }
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
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        *held = None;
        let mut b = BytesMut::with_capacity(bytes);
        // Writes every byte: the pages are faulted in here, not in the freeze.
        b.resize(bytes, 0);
        *held = Some(Held {
            _pin: b.split_to(0),
            size: bytes,
        });
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

    /// Stop cutting from the arena (after the capture). Its memory stays
    /// held until [`QueueArena::take_held`]: the records cut from it are
    /// dropped inside the freeze, and the last would unmap it there.
    pub(crate) fn clear(&self) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) = BytesMut::new();
    }

    /// The hold on the arena's memory, taken: dropping it gives the memory
    /// back once no record cut from it is left (after `Commit`, on the
    /// closing thread, or at an abort). Also clears the arena.
    pub(crate) fn take_held(&self) -> Option<Held> {
        self.clear();
        self.held.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Bytes of arena memory held (see [`QueueArena::take_held`]).
    pub(crate) fn held_bytes(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, Held::size)
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

    #[test]
    fn the_memory_is_held_past_the_capture_until_taken() {
        let a = QueueArena::default();
        assert_eq!(a.held_bytes(), 0);
        assert!(a.take_held().is_none(), "no arena: nothing held");
        a.reserve(1 << 20);
        assert_eq!(a.held_bytes(), 1 << 20);
        let first = a.take(100).freeze();
        let base = first.as_ptr();
        // The capture ends: nothing more is cut, the memory stays held
        // whatever the records do.
        a.clear();
        assert_eq!((a.left(), a.held_bytes()), (0, 1 << 20));
        drop(first);
        assert_eq!(
            a.held_bytes(),
            1 << 20,
            "dropping the records frees nothing"
        );
        let held = a.take_held().expect("held");
        assert_eq!((held.size(), a.held_bytes()), (1 << 20, 0));
        // The hold is on the same buffer the records were cut from.
        assert_eq!(held._pin.as_ptr(), base);
        drop(held);
        // A new arena (the next attempt) is held anew; replacing one
        // drops the old hold.
        a.reserve(1000);
        assert_eq!(a.held_bytes(), 1000);
        a.reserve(2000);
        assert_eq!((a.left(), a.held_bytes()), (2000, 2000));
        let held = a.take_held().expect("held");
        assert_eq!((a.left(), a.held_bytes(), held.size()), (0, 0, 2000));
    }
}
