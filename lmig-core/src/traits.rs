//! The traits every backend implements. A session is generic over them;
//! `lmig-mem`, `lmig-net` and `lmig-transport` provide the real backends and
//! a program may provide its own.
//!
//! Blanket impls for `&mut T` / `&T` let a caller lend a backend to a session
//! and keep it afterwards: after an aborted migration the program still owns
//! its memory, tracker and sockets, intact.
//!
//! ## When the destination calls what
//!
//! One attempt, in this order (the destination's session thread unless
//! said otherwise):
//!
//! 1. [`MemorySink::prepare`] when `Regions` arrives, then
//!    [`SocketSink::prepare`] with the source's plan, before the freeze;
//! 2. [`MemorySink::write_pages`] / [`MemorySink::zero_pages`] for every
//!    pre-copy and freeze page (from several threads at once);
//! 3. in the freeze, [`SocketSink::restore`] batch by batch (on the
//!    session's `lmig-restore` thread, beside the pages),
//!    [`StateSink::restore`] with the program's state, and
//!    [`MemorySink::begin_postcopy`] if pages are left for after `Commit`;
//!    all before `Ready`;
//! 4. a failure before `Commit`: [`SocketSink::discard`],
//!    [`StateSink::discard`], [`MemorySink::discard`], in that order, and
//!    nothing else;
//! 5. at `Commit`: [`SocketSink::activate`], then [`StateSink::resume`];
//!    then the session hands the program its
//!    [`Resumption`](crate::session::Resumption) (state sink, socket sink,
//!    memory) and goes on on its `lmig-after-commit` thread;
//! 6. after `Commit`, on that thread and its helpers: post-copy
//!    ([`MemorySink::wait_fault`], placements, [`MemorySink::end_postcopy`]),
//!    then [`MemorySink::read_pages`] for the digest check.
//!
//! [`Observer::event`] sees the [`Phase`]s in the order `Setup`,
//! `Precopy(n)`…, `Frozen`, `AwaitReady`, `Committed`, [`Postcopy`](Phase::Postcopy),
//! `Done` — or `Aborted` in place of what follows a failure before `Commit`.
//!
//! The source calls [`StateSource::pause`], [`SocketSource::freeze`] and
//! [`SocketSource::capture`] in the freeze; on a failure before `Commit`
//! (a bound or a cancel included) [`SocketSource::abort`] then
//! [`StateSource::resume`]; after `Commit`, [`StateSource::committed`] then
//! [`SocketSource::release`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{MigrationError, Result};
use crate::model::{PageRun, ProgramState, RegionLayout, RegionPages, SocketPrep, SocketRecord};
use crate::policy::{Decision, RoundStats};
use crate::protocol::{Message, PageBatch};

/// Reads pages of the program's registered regions on the source.
///
/// Implementations copy through raw pointers: the program (or a vCPU) keeps
/// writing the memory while pre-copy reads it.
pub trait MemorySource: Send + Sync {
    /// The regions, as they will be announced to the destination.
    fn layout(&self) -> RegionLayout;

    /// Copy the pages of `run` into `dst`, whose length is exactly the run's byte length.
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()>;

    /// Test in place which pages of `run` read as zero (`zero` holds one
    /// flag per page), without copying them: the sender then copies only
    /// the others. Returns false when the backend cannot (the default);
    /// the sender then copies the whole run and tests the copy.
    fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> Result<bool> {
        let _ = (run, zero);
        Ok(false)
    }

    /// Add to `pages` every page that may hold data now; a page left out
    /// reads as zero (never touched since it was mapped, or released to the
    /// kernel), so the first round sends it as zero without reading it.
    /// Called after the dirty tracker started: a page written later is the
    /// tracker's. Returns false when the backend cannot tell (the default):
    /// then every page is read.
    fn populated(&self, pages: &mut RegionPages) -> Result<bool> {
        let _ = pages;
        Ok(false)
    }

    /// Add to `free` the pages the program declared free (their content is
    /// meaningless and reads as zero here) and has not declared in use
    /// again. The session never reads them: the first round sends them as
    /// zero runs, and a post-copy freeze sends as zero runs the free pages
    /// it would otherwise leave missing, so neither push nor demand carries
    /// them. A free page the tracker reports written is sent anyway: a
    /// declaration only spares pages clean since it was made. Returns false
    /// when the backend takes no declarations (the default).
    fn free_pages(&self, free: &mut RegionPages) -> Result<bool> {
        let _ = free;
        Ok(false)
    }

    /// Add to `freed` the pages declared free since the previous call, and
    /// forget them: their content was discarded while the destination may
    /// hold an older copy, so the session sends them once more (they read
    /// as zero, and go as zero runs). Called after each collect. None (the
    /// default) when the backend takes no declarations.
    fn take_freed(&self, freed: &mut RegionPages) -> Result<()> {
        let _ = freed;
        Ok(())
    }

    /// After `Commit` and once every page has been sent: the source copy is no
    /// longer needed and may be released.
    fn release(&self) {}

    /// Called once by the thread answering post-copy page requests, before
    /// it starts: a backend may raise that thread's scheduling priority, so
    /// that a request does not wait for a CPU behind the push. The default
    /// does nothing.
    fn urgent_thread(&self) {}

    /// Called once by each thread sending a pre-copy round (one per data
    /// lane, for that round) before it sends, when
    /// [`SourceConfig::yield_to_program`](crate::session::SourceConfig::yield_to_program)
    /// is set: a backend may lower that thread's scheduling priority, so
    /// that the program's own threads get a CPU first while the rounds run
    /// (the freeze's senders are left alone). The default does nothing.
    fn background_thread(&self) {}
    /// `Commit` went out for the program of this memory: it belongs to a
    /// destination now. Called with `confirmed = false` as soon as the
    /// `Commit` frame is written, and again with `true` when `Done` came
    /// back. A backend that outlives the session keeps the last value for
    /// [`MemorySource::handed_over`] (the default keeps nothing).
    fn mark_handed_over(&self, confirmed: bool) {
        let _ = confirmed;
    }

    /// What an earlier session's `Commit` left on this memory: `None` (no
    /// `Commit` went out), `Some(false)` (`Commit` went out, never
    /// confirmed: [`MigrationError::CommitUnconfirmed`]), `Some(true)`
    /// (handed over and confirmed). [`Source::run`](crate::session::Source::run)
    /// refuses such memory with [`MigrationError::HandedOverBefore`]: the
    /// program may run on the destination, and a second copy must not.
    fn handed_over(&self) -> Option<bool> {
        None
    }
}

/// Places pages into the program's regions on the destination.
///
/// When each method is called: see [the module docs](self).
///
/// Methods take `&self`: pages of distinct chunks may be placed from several
/// threads at once.
pub trait MemorySink: Send + Sync {
    /// Check the source's layout against what this side has mapped (or map it).
    /// A mismatch is an error before any page is placed.
    fn prepare(&self, layout: &RegionLayout) -> Result<()>;

    /// Write `data` (exactly the run's byte length) into the pages of `run`.
    fn write_pages(&self, run: &PageRun, data: &[u8]) -> Result<()>;

    /// Make every page of `run` zero.
    fn zero_pages(&self, run: &PageRun) -> Result<()>;

    /// Read pages back (used to verify digests).
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()>;

    /// Post-copy: from now on the pages in `missing` are absent (their current
    /// content is stale and must be dropped); a touch of one blocks the
    /// toucher until `write_pages` / `zero_pages` places it. Called before
    /// `Ready`, while the program is not running yet, so a failure still
    /// aborts the migration cleanly.
    fn begin_postcopy(&self, missing: &RegionPages) -> Result<()> {
        let _ = missing;
        Err(MigrationError::Unsupported {
            feature: "post-copy",
            needs: "a memory sink that handles page faults (lmig-mem's userfaultfd sink)",
        })
    }

    /// Post-copy: wait up to `timeout` for the program to touch a missing
    /// page; returns the run it needs (the session asks the source for it).
    /// `Ok(None)` when nothing faulted in time.
    fn wait_fault(&self, timeout: Duration) -> Result<Option<PageRun>> {
        std::thread::sleep(timeout);
        Ok(None)
    }

    /// Post-copy stops being served with pages still missing (its source
    /// is lost: [`MigrationError::PostcopyPaused`]): make every page that
    /// is *not* missing readable with nobody answering faults (place the
    /// zeros the kernel would give a page never touched), so that only the
    /// threads touching a missing page stay blocked. Never fills a missing page.
    fn hold_missing(&self) -> Result<()> {
        Ok(())
    }

    /// Post-copy: every page has been placed; stop handling faults.
    fn end_postcopy(&self) -> Result<()> {
        Ok(())
    }

    /// The migration failed before `Commit`: drop what was received.
    fn discard(&self) {}

    /// Called once by each thread of the post-copy fault path (the one
    /// forwarding faults, the one placing the replies), before it starts: a
    /// backend may raise its scheduling priority, so that a fault does not
    /// wait for a CPU behind the placement of pushed pages. The default
    /// does nothing.
    fn urgent_thread(&self) {}

    /// Post-copy: the residency handle of this memory, for a program that
    /// must not block its event loop on a missing page (see
    /// [`PageResidency`]); handed to the program in the
    /// [`Resumption`](crate::session::Resumption). `None` (the default)
    /// when the sink has none, or outside post-copy (every page is here).
    fn residency(&self) -> Option<Arc<dyn PageResidency>> {
        None
    }
}

/// Post-copy residency, for an event-loop program: whether pages are here,
/// and a request for those that are not that does not block — the program
/// parks the work that needs them, serves other work, and is told through
/// a pollable file descriptor once they are placed (as KVM's asynchronous
/// page faults let a guest run another task). A page counts as here once
/// its placement returned; a query racing a placement answers "not yet",
/// and the request made after it is told when it is in.
pub trait PageResidency: Send + Sync {
    /// Every page of `run` is placed.
    fn is_resident(&self, run: &PageRun) -> Result<bool>;
    /// Ask for the missing pages of `run` ahead of the rest, without
    /// touching them. `Ok(true)`: all there already (nothing queued);
    /// `Ok(false)`: `token` is returned by [`Self::take_ready`] once every
    /// page of `run` is placed.
    fn request(&self, run: &PageRun, token: u64) -> Result<bool>;
    /// Tokens of requests now complete, in the order they completed; clears
    /// the readiness of [`Self::ready_fd`].
    fn take_ready(&self) -> Vec<u64>;
    /// Readable (an eventfd) while [`Self::take_ready`] has tokens: add it
    /// to the program's poll set.
    fn ready_fd(&self) -> std::os::fd::BorrowedFd<'_>;
}

/// Finds the pages the program wrote since the last collect.
pub trait DirtyTracker: Send {
    /// Short name for reports: `"uffd-wp+pagemap-scan"`, `"manual"`, …
    fn name(&self) -> &'static str;

    /// Begin tracking every page of every region; all pages count as clean from here.
    fn start(&mut self) -> Result<()>;

    /// Add the pages written since the last `start`/`collect` to `dirty` and
    /// mark them clean again, in one step (a write racing the collect is
    /// reported now or at the next collect, never lost).
    fn collect(&mut self, dirty: &mut RegionPages) -> Result<()>;

    /// Stop tracking (remove write protection and the like).
    fn stop(&mut self) -> Result<()>;

    /// Optional: a handle the page senders use to mark a run clean right
    /// before they read it, so that a page written before its read in a
    /// round is not sent again in the next one (QEMU clears KVM's dirty log
    /// chunk by chunk before sending, for the same reason). Valid while the
    /// tracker runs. `None` (the default) when the tracker cannot.
    fn clearer(&self) -> Option<Box<dyn DirtyClearer>> {
        None
    }
}

/// Marks runs clean just before they are read; see [`DirtyTracker::clearer`].
pub trait DirtyClearer: Send + Sync {
    /// Forget the writes to the pages of `run` made so far, in one step with
    /// re-arming their tracking (a write racing the clear is either
    /// forgotten, and then read right after, or reported at the next collect).
    fn clear(&self, run: &PageRun) -> Result<()>;
}

/// The program's sockets on the source.
pub trait SocketSource: Send {
    /// Sockets the destination may prepare before the freeze.
    fn plan(&mut self) -> Result<Vec<SocketPrep>> {
        Ok(Vec::new())
    }

    /// The IP addresses that move to the destination with the sockets (the
    /// service addresses a network lock holds at the freeze). The session
    /// refuses to migrate over a channel using one of them
    /// ([`MigrationError::ChannelOnMovedAddress`]): the lock would hold the
    /// channel's own traffic. Empty (the default) when no address moves.
    fn moved_addresses(&self) -> Vec<std::net::IpAddr> {
        Vec::new()
    }

    /// At the freeze: stop the kernel from answering for the sockets (network
    /// lock) and put them in repair mode. Must not lose incoming packets.
    fn freeze(&mut self) -> Result<()> {
        Ok(())
    }

    /// Capture every socket, handing records to `emit` batch by batch so the
    /// destination can restore batch k while batch k+1 is captured.
    fn capture(&mut self, emit: &mut dyn FnMut(Vec<SocketRecord>) -> Result<()>) -> Result<()>;

    /// Before the freeze, after each pre-copy round: the bytes now queued in
    /// the sockets (received and unread, sent and unacknowledged, unsent),
    /// which the freeze will carry besides the dirty pages. The convergence
    /// policy counts them in the estimated freeze
    /// ([`crate::policy::RoundStats::queued_bytes`]); an implementation may
    /// also get ready to capture that much. An estimate: 0 (the default)
    /// when unknown.
    fn queued_bytes(&mut self) -> Result<u64> {
        Ok(0)
    }

    /// The migration failed before `Commit`: leave repair mode, unlock, keep serving.
    fn abort(&mut self) -> Result<()>;

    /// After `Commit`: close the sockets without FIN or RST, hand the service
    /// address and any held packets over to the destination.
    fn release(&mut self) -> Result<()>;
}

/// The program's sockets on the destination.
///
/// Order: `prepare` (before the freeze), `restore` (each batch, in the
/// freeze), then `activate` at `Commit` — after which the program takes its
/// sockets from the sink in the [`Resumption`](crate::session::Resumption) —
/// or `discard` if the attempt failed. See [the module docs](self).
pub trait SocketSink: Send {
    /// Before the freeze: create sockets, enter repair mode, set options, bind.
    fn prepare(&mut self, plan: &[SocketPrep]) -> Result<()> {
        let _ = plan;
        Ok(())
    }

    /// Restore one batch (in repair mode; not yet talking to peers).
    ///
    /// Records come from the peer: validate each one
    /// ([`SocketRecord::validate`]), restore the valid ones, and report the
    /// invalid ones by name. Returning `Err` aborts the migration (before
    /// `Commit`); a sink may instead tolerate bad records and keep them for
    /// its own report.
    fn restore(&mut self, batch: Vec<SocketRecord>) -> Result<()>;

    /// After `Commit`: leave repair mode, take over the address, release held packets.
    fn activate(&mut self) -> Result<()>;

    /// The migration failed before `Commit`: close everything restored, silently.
    fn discard(&mut self);
}

/// A program without sockets to move.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSockets;

impl SocketSource for NoSockets {
    fn capture(&mut self, _emit: &mut dyn FnMut(Vec<SocketRecord>) -> Result<()>) -> Result<()> {
        Ok(())
    }
    fn abort(&mut self) -> Result<()> {
        Ok(())
    }
    fn release(&mut self) -> Result<()> {
        Ok(())
    }
}

impl SocketSink for NoSockets {
    fn restore(&mut self, batch: Vec<SocketRecord>) -> Result<()> {
        match batch.first() {
            None => Ok(()),
            Some(_) => Err(MigrationError::Unsupported {
                feature: "socket migration",
                needs: "a SocketSink on the destination (lmig-net); the source sent sockets",
            }),
        }
    }
    fn activate(&mut self) -> Result<()> {
        Ok(())
    }
    fn discard(&mut self) {}
}

/// The running program on the source: how to pause it and take its own state.
pub trait StateSource: Send {
    /// Stop the program from touching its memory and sockets (the freeze begins).
    fn pause(&mut self) -> Result<()>;

    /// The program's own state, taken while paused.
    fn capture(&mut self) -> Result<ProgramState> {
        Ok(ProgramState::default())
    }

    /// The migration failed before `Commit`: let the program continue here.
    fn resume(&mut self) -> Result<()>;

    /// Pre-copy does not converge: slow the program's writes down to
    /// `percent` of their rate, if it can. Return false if it cannot.
    fn throttle(&mut self, percent: u8) -> bool {
        let _ = percent;
        false
    }

    /// `Commit` was sent: the program must never run here again.
    fn committed(&mut self) {}
}

/// The program on the destination: how to hand its state back and start it.
///
/// Order: `restore` (in the freeze, before `Ready`; refusing fails the
/// attempt), then `resume` at `Commit` right after the sockets were
/// activated — the sink then goes back to the program in the
/// [`Resumption`](crate::session::Resumption) — or `discard` if the attempt
/// failed. See [the module docs](self).
pub trait StateSink: Send {
    /// Take the program's state (called before `Ready`; may refuse an unknown version).
    fn restore(&mut self, state: ProgramState) -> Result<()> {
        let _ = state;
        Ok(())
    }

    /// After `Commit`: start the program.
    fn resume(&mut self) -> Result<()>;

    /// The migration failed before `Commit`: forget the state.
    fn discard(&mut self) {}
}

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

    /// Number of data lanes.
    fn data_lanes(&self) -> usize {
        1
    }

    /// The IP addresses the channel's connections use, at both ends (the
    /// source checks none is an address that moves, see
    /// [`SocketSource::moved_addresses`]). Empty (the default) when the
    /// channel does not run over IP.
    fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
        Vec::new()
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
}

/// The phase a session is in, reported to observers.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Exchanging the layout.
    Setup,
    /// Pre-copy round `n`.
    Precopy(u32),
    /// The program is paused; final pages, sockets and state are moving.
    Frozen,
    /// Waiting for the destination's `Ready`.
    AwaitReady,
    /// `Commit` sent / received.
    Committed,
    /// Post-copy: the program runs at the destination while pages arrive.
    Postcopy,
    /// Finished.
    Done,
    /// Failed before `Commit`; the source runs on (on the source: sent
    /// once the program was resumed).
    Aborted,
}

/// Something an observer may want to show or record.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Event {
    /// The session entered a phase.
    Phase {
        /// The new phase.
        phase: Phase,
        /// When (not serialised: an `Instant` means nothing outside the process).
        #[cfg_attr(feature = "serde", serde(skip))]
        at: Instant,
    },
    /// A pre-copy round finished.
    Round(RoundStats),
    /// The policy decided.
    Decision(Decision),
    /// Pages were sent or placed.
    Progress {
        /// Pages sent (source) or placed (destination) so far.
        pages: u64,
        /// Bytes sent or received so far.
        bytes: u64,
        /// Pages in all regions.
        total_pages: u64,
    },
    /// Destination, post-copy: the source could not be reached within the
    /// idle timeout. Threads touching a missing page stay blocked; the
    /// session keeps trying to reconnect (see
    /// [`DestinationConfig::pause_limit`](crate::session::DestinationConfig::pause_limit)).
    PostcopyPaused {
        /// Pages still missing.
        missing_pages: u64,
        /// Why, in words.
        reason: String,
        /// When (not serialised).
        #[cfg_attr(feature = "serde", serde(skip))]
        at: Instant,
    },
    /// Destination, post-copy: a source came back after a pause; the
    /// missing pages are asked for again.
    PostcopyResumed {
        /// Pages still missing when it came back.
        missing_pages: u64,
        /// How long post-copy was paused.
        #[cfg_attr(
            feature = "serde",
            serde(rename = "paused_for_ms", with = "crate::serde_ms")
        )]
        paused_for: std::time::Duration,
    },
}

/// Receives session events: progress bars, logs, benchmarks.
///
/// Phases come in protocol order (see [the module docs](self)); other
/// events between them, from any of the session's threads. After `Commit`
/// on the destination the observer lives on the after-`Commit` thread.
pub trait Observer: Send + Sync {
    /// Called from the session's threads; keep it quick.
    fn event(&self, event: &Event);
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn event(&self, _event: &Event) {}
}

impl<F: Fn(&Event) + Send + Sync> Observer for F {
    fn event(&self, event: &Event) {
        self(event)
    }
}

macro_rules! forward_mut {
    ($trait:ident { $( fn $name:ident(&mut self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )* }) => {
        impl<T: $trait + ?Sized> $trait for &mut T {
            $( fn $name(&mut self $(, $arg: $ty)*) -> $ret { (**self).$name($($arg),*) } )*
        }
    };
}

impl<T: SocketSource + ?Sized> SocketSource for &mut T {
    fn moved_addresses(&self) -> Vec<std::net::IpAddr> {
        (**self).moved_addresses()
    }
    fn plan(&mut self) -> Result<Vec<SocketPrep>> {
        (**self).plan()
    }
    fn freeze(&mut self) -> Result<()> {
        (**self).freeze()
    }
    fn capture(&mut self, emit: &mut dyn FnMut(Vec<SocketRecord>) -> Result<()>) -> Result<()> {
        (**self).capture(emit)
    }
    fn queued_bytes(&mut self) -> Result<u64> {
        (**self).queued_bytes()
    }
    fn abort(&mut self) -> Result<()> {
        (**self).abort()
    }
    fn release(&mut self) -> Result<()> {
        (**self).release()
    }
}

forward_mut!(SocketSink {
    fn prepare(&mut self, plan: &[SocketPrep]) -> Result<()>;
    fn restore(&mut self, batch: Vec<SocketRecord>) -> Result<()>;
    fn activate(&mut self) -> Result<()>;
    fn discard(&mut self) -> ();
});

forward_mut!(StateSource {
    fn pause(&mut self) -> Result<()>;
    fn capture(&mut self) -> Result<ProgramState>;
    fn resume(&mut self) -> Result<()>;
    fn throttle(&mut self, percent: u8) -> bool;
    fn committed(&mut self) -> ();
});

forward_mut!(StateSink {
    fn restore(&mut self, state: ProgramState) -> Result<()>;
    fn resume(&mut self) -> Result<()>;
    fn discard(&mut self) -> ();
});

impl<T: DirtyTracker + ?Sized> DirtyTracker for &mut T {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn start(&mut self) -> Result<()> {
        (**self).start()
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> Result<()> {
        (**self).collect(dirty)
    }
    fn stop(&mut self) -> Result<()> {
        (**self).stop()
    }
    fn clearer(&self) -> Option<Box<dyn DirtyClearer>> {
        (**self).clearer()
    }
}

impl<T: MemorySource + ?Sized> MemorySource for &T {
    fn layout(&self) -> RegionLayout {
        (**self).layout()
    }
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
        (**self).read_pages(run, dst)
    }
    fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> Result<bool> {
        (**self).find_zero_pages(run, zero)
    }
    fn populated(&self, pages: &mut RegionPages) -> Result<bool> {
        (**self).populated(pages)
    }
    fn free_pages(&self, free: &mut RegionPages) -> Result<bool> {
        (**self).free_pages(free)
    }
    fn take_freed(&self, freed: &mut RegionPages) -> Result<()> {
        (**self).take_freed(freed)
    }
    fn release(&self) {
        (**self).release()
    }
    fn urgent_thread(&self) {
        (**self).urgent_thread()
    }
    fn background_thread(&self) {
        (**self).background_thread()
    }

    fn mark_handed_over(&self, confirmed: bool) {
        (**self).mark_handed_over(confirmed)
    }
    fn handed_over(&self) -> Option<bool> {
        (**self).handed_over()
    }
}

impl<T: MemorySource + ?Sized> MemorySource for Arc<T> {
    fn layout(&self) -> RegionLayout {
        (**self).layout()
    }
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
        (**self).read_pages(run, dst)
    }
    fn find_zero_pages(&self, run: &PageRun, zero: &mut [bool]) -> Result<bool> {
        (**self).find_zero_pages(run, zero)
    }
    fn populated(&self, pages: &mut RegionPages) -> Result<bool> {
        (**self).populated(pages)
    }
    fn free_pages(&self, free: &mut RegionPages) -> Result<bool> {
        (**self).free_pages(free)
    }
    fn take_freed(&self, freed: &mut RegionPages) -> Result<()> {
        (**self).take_freed(freed)
    }
    fn release(&self) {
        (**self).release()
    }
    fn urgent_thread(&self) {
        (**self).urgent_thread()
    }
    fn background_thread(&self) {
        (**self).background_thread()
    }

    fn mark_handed_over(&self, confirmed: bool) {
        (**self).mark_handed_over(confirmed)
    }
    fn handed_over(&self) -> Option<bool> {
        (**self).handed_over()
    }
}

macro_rules! forward_sink {
    ($ty:ty) => {
        impl<T: MemorySink + ?Sized> MemorySink for $ty {
            fn prepare(&self, layout: &RegionLayout) -> Result<()> {
                (**self).prepare(layout)
            }
            fn write_pages(&self, run: &PageRun, data: &[u8]) -> Result<()> {
                (**self).write_pages(run, data)
            }
            fn zero_pages(&self, run: &PageRun) -> Result<()> {
                (**self).zero_pages(run)
            }
            fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
                (**self).read_pages(run, dst)
            }
            fn begin_postcopy(&self, missing: &RegionPages) -> Result<()> {
                (**self).begin_postcopy(missing)
            }
            fn wait_fault(&self, timeout: Duration) -> Result<Option<PageRun>> {
                (**self).wait_fault(timeout)
            }
            fn hold_missing(&self) -> Result<()> {
                (**self).hold_missing()
            }
            fn end_postcopy(&self) -> Result<()> {
                (**self).end_postcopy()
            }
            fn discard(&self) {
                (**self).discard()
            }
            fn residency(&self) -> Option<Arc<dyn PageResidency>> {
                (**self).residency()
            }
            fn urgent_thread(&self) {
                (**self).urgent_thread()
            }
        }
    };
}
forward_sink!(&T);
forward_sink!(Arc<T>);

macro_rules! forward_channel {
    ($ty:ty) => {
        impl<T: Channel + ?Sized> Channel for $ty {
            fn send(&self, msg: &Message) -> Result<()> {
                (**self).send(msg)
            }
            fn send_pages(&self, lane: usize, batch: &PageBatch) -> Result<()> {
                (**self).send_pages(lane, batch)
            }
            fn send_urgent(&self, msg: &Message) -> Result<()> {
                (**self).send_urgent(msg)
            }
            fn data_lanes(&self) -> usize {
                (**self).data_lanes()
            }
            fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
                (**self).ip_addresses()
            }
            fn flush(&self) -> Result<()> {
                (**self).flush()
            }
            fn recv(&self, timeout: Option<Duration>) -> Result<Option<Message>> {
                (**self).recv(timeout)
            }
            fn recv_urgent(&self, timeout: Duration) -> Result<Option<Message>> {
                (**self).recv_urgent(timeout)
            }
            fn reconnect(&self) -> Result<()> {
                (**self).reconnect()
            }
            fn shutdown(&self) {
                (**self).shutdown()
            }
        }
    };
}
forward_channel!(&T);
forward_channel!(Arc<T>);
forward_channel!(Box<T>);
