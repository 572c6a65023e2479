//! The message transport between the two sides.

use std::os::fd::RawFd;
use std::time::Duration;

use crate::error::{MigrationError, Result};
use crate::protocol::{Message, PageBatch};

/// Ordered, reliable, authenticated message transport between the two sides.
///
/// It has one control lane, `data_lanes()` page lanes (each ordered; pages of
/// one chunk always use the same lane) and an urgent lane for post-copy.
/// Methods take `&self` so several threads can send on different lanes.
pub trait Channel: Send + Sync {
    /// Send a message on the control lane.
    fn send(&self, msg: &Message) -> Result<()>;

    /// Send pages on data lane `lane % data_lanes()`.
    fn send_pages(&self, lane: usize, batch: &PageBatch) -> Result<()> {
        let _ = lane;
        self.send(&Message::Pages(batch.clone()))
    }

    /// Send on the urgent lane (post-copy requests and their replies).
    fn send_urgent(&self, msg: &Message) -> Result<()> {
        self.send(msg)
    }

    /// Send `msgs` on the urgent lane in this order, as [`Channel::send_urgent`]
    /// would one by one; a channel may put them on the wire in one write
    /// (post-copy sends the requests, and the replies, that are pending at
    /// one moment together). The default sends them one by one.
    fn send_urgent_many(&self, msgs: &[Message]) -> Result<()> {
        msgs.iter().try_for_each(|m| self.send_urgent(m))
    }

    /// Send a message other than pages on data lane `lane % data_lanes()`:
    /// ordered with what else goes on that lane, not with the other lanes
    /// or the control lane, and possibly buffered until
    /// [`Channel::flush`]. The freeze spreads its `Sockets` batches so (see
    /// the source's `freeze.rs` for the rule that keeps their end last), so
    /// that both ends encrypt and decrypt them on several threads. The
    /// default sends it on the control lane.
    fn send_lane(&self, lane: usize, msg: &Message) -> Result<()> {
        let _ = lane;
        self.send(msg)
    }

    /// Number of data lanes; both ends of a channel see the same number
    /// (the freeze's `Sockets` batches end with one `last` per lane).
    fn data_lanes(&self) -> usize {
        1
    }

    /// The IP addresses the channel's connections use, at both ends (the
    /// source checks none is an address that moves, see
    /// [`SocketSource::moved_addresses`](super::SocketSource::moved_addresses)). Empty (the default) when the
    /// channel does not run over IP.
    fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
        Vec::new()
    }

    /// Get receive memory for about `bytes` of large messages ready now
    /// (written, so that receiving them later does not fault it in), or
    /// give it back (`0`). The destination calls it when the source sends
    /// its socket queue estimate (`Message::QueueEstimate`), before the
    /// freeze, and with 0 once the freeze's messages are in. The default
    /// does nothing.
    fn warm_receive(&self, bytes: u64) {
        let _ = bytes;
    }

    /// Push out pages a data lane buffered. The session calls it after each
    /// batch of `send_pages` calls; a channel may hold pages until then.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The next message from any lane; `Ok(None)` when `timeout` passed first
    /// (`None` waits without limit).
    fn recv(&self, timeout: Option<Duration>) -> Result<Option<Message>>;

    /// Post-copy: the next message of the urgent lane, for a thread that
    /// serves that lane alone; `Ok(None)` when `timeout` passed first. From
    /// the first call on, [`Channel::recv`] no longer returns urgent-lane
    /// messages, so a page request or its reply never waits for a thread
    /// busy with bulk pages. A broken link is still reported by `recv` (and
    /// by sends), not here. Channels without a separate urgent receiver
    /// return [`MigrationError::Unsupported`] and keep delivering urgent
    /// messages through `recv`.
    fn recv_urgent(&self, timeout: Duration) -> Result<Option<Message>> {
        let _ = timeout;
        Err(MigrationError::Unsupported {
            feature: "a separate urgent-lane receiver",
            needs: "a channel with an urgent lane of its own (lmig-transport's channels)",
        })
    }

    /// Post-copy recovery: re-establish (and re-authenticate) a broken channel.
    fn reconnect(&self) -> Result<()> {
        Err(MigrationError::Unsupported {
            feature: "channel recovery",
            needs: "a channel that can reconnect (lmig-transport's TCP channel)",
        })
    }

    /// Close the channel; pending `recv` calls return an error.
    fn shutdown(&self) {}

    /// Post-copy: a descriptor that turns readable when the urgent lane has
    /// bytes for [`Channel::recv_urgent`], for a thread that waits for them
    /// together with other descriptors in one `poll` (the destination's
    /// single fault-path thread waits on it and on the userfaultfd). It is a
    /// hint, valid until the next [`Channel::reconnect`]: ask again after
    /// every wait (a number polled after its stream closed only ends that
    /// wait early). Messages already read into the channel's buffers (a
    /// record holding several frames) do not make it readable: take them
    /// with `recv_urgent(Duration::ZERO)` until it returns `Ok(None)` before
    /// waiting. `Ok(None)` when there is no descriptor to wait on now (the
    /// lane is still read by another thread, or being re-established): the
    /// caller then waits briefly and asks again. Channels without a
    /// separate urgent receiver return [`MigrationError::Unsupported`] (the
    /// default).
    fn urgent_fd(&self) -> Result<Option<RawFd>> {
        Err(MigrationError::Unsupported {
            feature: "a pollable urgent lane",
            needs: "a channel whose urgent lane is read by its consumer (lmig-transport's channels)",
        })
    }
}
