//! The queue between a channel's reader threads and `recv`: bounded for
//! ordinary messages (backpressure on the streams), with messages of the
//! urgent stream always taken first, so a post-copy page request or reply
//! never waits behind queued bulk pages.
//!
//! Once a consumer asked for urgent items on their own ([`EventQueue::pop_urgent`],
//! post-copy's dedicated urgent thread), `pop` no longer returns them: the
//! two consumers wait on separate condition variables, so an urgent item
//! wakes the urgent consumer directly, never a thread busy with bulk pages.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

struct Queues<T> {
    urgent: VecDeque<T>,
    rest: VecDeque<T>,
    closed: bool,
    /// Urgent items go to `pop_urgent` only.
    split: bool,
}

/// A two-level FIFO: urgent items first, each level in arrival order.
pub(super) struct EventQueue<T> {
    q: Mutex<Queues<T>>,
    ready: Condvar,
    urgent_ready: Condvar,
    space: Condvar,
    cap: usize,
}

impl<T> EventQueue<T> {
    /// A queue holding at most `cap` ordinary items (urgent ones are few and unbounded).
    pub(super) fn new(cap: usize) -> Self {
        Self {
            q: Mutex::new(Queues {
                urgent: VecDeque::new(),
                rest: VecDeque::new(),
                closed: false,
                split: false,
            }),
            ready: Condvar::new(),
            urgent_ready: Condvar::new(),
            space: Condvar::new(),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues<T>> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add an item, waiting for space if it is ordinary and the queue is
    /// full. `Err` once the queue is closed (the channel is gone).
    pub(super) fn push(&self, item: T, urgent: bool) -> Result<(), T> {
        let mut q = self.lock();
        while !urgent && !q.closed && q.rest.len() >= self.cap {
            q = self.space.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.closed {
            return Err(item);
        }
        let to_urgent_consumer = urgent && q.split;
        if urgent {
            q.urgent.push_back(item);
        } else {
            q.rest.push_back(item);
        }
        drop(q);
        if to_urgent_consumer {
            self.urgent_ready.notify_one();
        } else {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The next item, urgent ones first; `None` when `deadline` passed.
    pub(super) fn pop(&self, deadline: Option<Instant>) -> Option<T> {
        let mut q = self.lock();
        loop {
            if !q.split {
                if let Some(item) = q.urgent.pop_front() {
                    return Some(item);
                }
            }
            if let Some(item) = q.rest.pop_front() {
                drop(q);
                self.space.notify_one();
                return Some(item);
            }
            q = match deadline {
                None => self.ready.wait(q).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.ready
                        .wait_timeout(q, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// The next urgent item; `None` when `deadline` passed or the queue is
    /// closed. From the first call on, [`Self::pop`] leaves urgent items to
    /// this method.
    pub(super) fn pop_urgent(&self, deadline: Instant) -> Option<T> {
        let mut q = self.lock();
        if !q.split {
            q.split = true;
            // A `pop` waiter may have been woken for an urgent item it now
            // leaves alone: nothing to do, it waits again.
        }
        loop {
            if let Some(item) = q.urgent.pop_front() {
                return Some(item);
            }
            let now = Instant::now();
            if q.closed || now >= deadline {
                return None;
            }
            q = self
                .urgent_ready
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The next urgent item if one is queued, without waiting (and, like
    /// [`Self::pop_urgent`], leaving urgent items to this consumer from now on).
    pub(super) fn try_pop_urgent(&self) -> Option<T> {
        let mut q = self.lock();
        q.split = true;
        q.urgent.pop_front()
    }

    /// Refuse further items and release blocked producers.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.space.notify_all();
        self.ready.notify_all();
        self.urgent_ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn urgent_items_overtake_queued_ones() {
        let q = EventQueue::new(4);
        for i in 0..4 {
            q.push(i, false).unwrap();
        }
        q.push(100, true).unwrap();
        assert_eq!(q.pop(None), Some(100));
        assert_eq!(q.pop(None), Some(0));
    }

    #[test]
    fn split_urgent_items_go_to_their_own_consumer() {
        let q = EventQueue::new(4);
        q.push(1, false).unwrap();
        assert_eq!(q.pop_urgent(Instant::now()), None);
        q.push(100, true).unwrap();
        assert_eq!(q.pop(None), Some(1));
        assert_eq!(q.pop(Some(Instant::now() + Duration::from_millis(1))), None);
        assert_eq!(q.pop_urgent(Instant::now()), Some(100));
        let q = Arc::new(q);
        let q2 = q.clone();
        let waiter =
            std::thread::spawn(move || q2.pop_urgent(Instant::now() + Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(5));
        q.push(7, true).unwrap();
        assert_eq!(waiter.join().unwrap(), Some(7));
    }

    #[test]
    fn full_queue_blocks_until_read_and_close_releases() {
        let q = Arc::new(EventQueue::new(1));
        q.push(1, false).unwrap();
        let q2 = q.clone();
        let producer = std::thread::spawn(move || q2.push(2, false));
        assert_eq!(q.pop(None), Some(1));
        assert_eq!(producer.join().unwrap(), Ok(()));
        assert_eq!(
            q.pop(Some(Instant::now() + Duration::from_millis(1))),
            Some(2)
        );
        assert_eq!(q.pop(Some(Instant::now() + Duration::from_millis(1))), None);
        q.push(3, false).unwrap();
        let q3 = q.clone();
        let blocked = std::thread::spawn(move || q3.push(4, false));
        std::thread::sleep(Duration::from_millis(20));
        q.close();
        assert_eq!(blocked.join().unwrap(), Err(4));
    }
}
