//! The messages page hosts send: the reader of each host's link, and the
//! server of channels page hosts open to this host.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lmig_core::Channel;
use lmig_core::protocol::Message;
use lmig_core::split::{HostId, SplitMessage, runs_of_set};

use super::reports::HostLost;
use super::shared::Inner;

impl Inner {
    pub(super) fn link_loop(self: Arc<Self>, host: HostId, ch: Arc<dyn Channel>) {
        loop {
            match ch.recv(Some(Duration::from_millis(200))) {
                Ok(None) => {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                }
                Ok(Some(Message::Split(m))) => self.on_message(host, &*ch, m),
                Ok(Some(_)) => {}
                Err(e) => {
                    if !self.stop.load(Ordering::Acquire) {
                        self.host_lost(host, e.to_string());
                    }
                    return;
                }
            }
        }
    }

    fn host_lost(&self, host: HostId, detail: String) {
        let mut st = self.lock();
        if !st.dead.insert(host) {
            return;
        }
        let held = st.book.host_lost(host);
        let runs = runs_of_set(st.book.map().region().id, &held, u32::MAX);
        st.lost.push(HostLost {
            host,
            pages: held.count(),
            runs,
            detail,
        });
        drop(st);
        self.cond.notify_all();
    }

    fn on_message(&self, host: HostId, ch: &dyn Channel, m: SplitMessage) {
        match m {
            SplitMessage::Data { from, epoch, batch } => {
                // A host may only speak for itself on its own link.
                let from = if from == host { from } else { HostId(u32::MAX) };
                if let Err(e) = self.place_answer(from, epoch, &batch) {
                    // Surfaced to whoever waits on this host.
                    self.lock().events.refused.push((host, e.to_string()));
                    self.cond.notify_all();
                }
            }
            SplitMessage::NotHeld { run, epoch, .. } => {
                let mut st = self.lock();
                // A former owner answering a fetch that raced a partial
                // migration (the fetch went to the new owner at the switch)
                // says nothing wrong; a host the owner map still names for
                // those pages, as of the fetch's epoch, does.
                let current = st.book.not_held(host, &run, epoch);
                self.counters
                    .not_held
                    .fetch_add(u64::from(run.count), Ordering::Relaxed);
                if current {
                    st.events.refused.push((
                        host,
                        format!("does not hold {run}, which the owner map gives it"),
                    ));
                }
                drop(st);
                self.cond.notify_all();
            }
            SplitMessage::Synced { seq, .. } => {
                self.lock().events.synced.insert((host, seq));
                self.cond.notify_all();
            }
            SplitMessage::Sent {
                from, to, epoch, ..
            } => {
                self.lock().events.sent.push((from, to, epoch));
                self.cond.notify_all();
            }
            SplitMessage::Refused { reason } => {
                self.lock().events.refused.push((host, reason));
                self.cond.notify_all();
            }
            SplitMessage::Sync { seq } => {
                if let Err(e) = ch.send(&Message::Split(SplitMessage::Synced { seq, pages: 0 })) {
                    debug!(error = %e, "answering a page host's Sync failed");
                }
            }
            _ => {}
        }
    }

    pub(super) fn incoming_loop(self: Arc<Self>, ch: Arc<dyn Channel>) {
        let mut received = 0u64;
        let mut peer = None;
        while !self.stop.load(Ordering::Acquire) {
            let m = match ch.recv(Some(Duration::from_millis(200))) {
                Ok(Some(Message::Split(m))) => m,
                Ok(Some(_)) | Ok(None) => continue,
                Err(_) => return,
            };
            let reply = match m {
                SplitMessage::Attach { from, to, region } => {
                    if to != self.me || &region != self.region.info() {
                        Some(SplitMessage::Refused {
                            reason: format!("{to} with {region:?} is not this host's region"),
                        })
                    } else {
                        peer = Some(from);
                        None
                    }
                }
                SplitMessage::Data { from, epoch, batch } => {
                    received += u64::from(batch.run.count);
                    if peer.is_none() {
                        Some(SplitMessage::Refused {
                            reason: "pages before Attach".into(),
                        })
                    } else {
                        match self.place_answer(from, epoch, &batch) {
                            Err(e) => Some(SplitMessage::Refused {
                                reason: e.to_string(),
                            }),
                            Ok(()) => None,
                        }
                    }
                }
                SplitMessage::Sync { seq } => Some(SplitMessage::Synced {
                    seq,
                    pages: received,
                }),
                _ => None,
            };
            if let Some(r) = reply {
                if let Err(e) = ch.send(&Message::Split(r)) {
                    debug!(error = %e, "a reply to a page host could not be sent");
                }
            }
        }
    }
}
