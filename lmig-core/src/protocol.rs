//! The messages of one migration session and the rules that order them.
//!
//! `lmig-transport` puts these on the wire (framing, checksums,
//! authentication, several streams); this module says what they mean.
//!
//! # Sequence
//!
//! ```text
//! source                                         destination
//!   [channel: Hello/Welcome + mutual authentication, in lmig-transport]
//!   Regions{layout} ───────────────────────────────▶ check / map regions (pre-fault)
//!   SocketPlan{..} ────────────────────────────────▶ create, repair, bind (pre-freeze)
//!   Pages{round 0}  (data lanes, many streams) ────▶ place pages
//!   ◀──────────────────────────────────────────────── Prepared{placed}
//!   RoundEnd{0, ..} ───────────────────────────────▶
//!   Pages{round 1..n} … RoundEnd{n}  ──────────────▶
//!   ◀──────────────────── Prepared{placed} (caught up with the rounds)
//!   ── freeze (never before Prepared): program paused, network locked ──
//!   Pages{final} Sockets{..}* State{..}   (Sockets on the data lanes, then
//!                                          one Sockets{last} on each lane)
//!   Handover{pages_total, postcopy, verify} ───────▶ wait for every page, restore sockets/state
//!   ◀──────────────────────────────────────────────── Ready
//!   Commit ────────────────────────────────────────▶ activate sockets, release packets
//!   ◀──────────────────────────────────────── SocketsActive (if sockets came)
//!   re-inject held packets, close sockets             resume program
//!   (pre-copy: after SocketsActive or a bound; post-copy: at Commit)
//!   (post-copy: ◀ PageRequest / Pages ▶ on the urgent lane, push continues;
//!    ◀ DemandSettled once the program's parked work ran: the push's hold-off ends)
//!   Digests{..} (if verify) ───────────────────────▶ compare with the pages as placed
//!   ◀──────────────────────────────────────────────── Done{verification}
//! ```
//!
//! Either side may send `Abort{reason}` at any point before `Commit`.
//!
//! # Verification without a longer freeze
//!
//! The destination hashes every page as it places it (xxh3, cheap next to
//! the copy). After `Commit` the source's memory is frozen for good, so the
//! source hashes it then — outside the freeze — and sends `Digests`; the
//! destination compares them with the hashes of what it placed (in post-copy,
//! once the last page is in) and answers `Done(Verified | Mismatch)`. This
//! checks the whole chain: dirty tracking (a missed write shows as a
//! mismatch), transport, ordering and placement.
//!
//! # The commit rule
//!
//! `Commit` is the switchover: the only point after which the destination may
//! run the program.
//!
//! * **Destination**: never resumes the program before it has received a
//!   complete, checksummed `Commit` frame. If anything fails before that — a
//!   bad message, a restore error, a channel that breaks (including between
//!   `Ready` and `Commit`) — it discards everything it received (sockets
//!   closed, memory dropped) and reports the error.
//! * **Source**: until it has handed the whole `Commit` frame to the channel,
//!   any failure resumes the program on the source (network unlocked, sockets
//!   out of repair mode, memory and tracker intact). A destination cannot have
//!   received a `Commit` the source never finished writing.
//! * Once the `Commit` frame is written, the source never resumes the program,
//!   whatever happens next. If `Done` does not arrive, the session ends with
//!   [`MigrationError::CommitUnconfirmed`](crate::MigrationError::CommitUnconfirmed):
//!   the program is stopped on the source and the operator must look at the
//!   destination. Split brain is excluded; availability is what is at risk,
//!   and only in the window between the last byte of `Commit` leaving the
//!   source and it reaching the destination.
//! * The freeze may carry a bound
//!   ([`SourceConfig::max_freeze`](crate::session::SourceConfig::max_freeze)),
//!   and the source a cancel handle: both act only before `Commit` and
//!   count as failures there (the source resumes, sends `Abort`, the
//!   destination discards). A cancel and the commit race on one atomic
//!   step: once `Commit` is being written, a cancel says it is too late.
//! * On the destination, `Commit` hands the program over at once (a
//!   [`Resumption`](crate::session::Resumption)): post-copy, the digest
//!   check and `Done` go on behind it, and their failures are
//!   [`MigrationError::AfterCommit`](crate::MigrationError::AfterCommit),
//!   never undone.
//!
//! # Source state machine
//!
//! ```text
//!  Start ─▶ Precopy(round) ─▶ Frozen ─▶ AwaitReady ─▶ Committed ─▶ [Postcopy] ─▶ Done
//!    │           │               │           │
//!    └───────────┴───────────────┴───────────┴──▶ Aborted (program resumed on the source)
//! ```
//!
//! # Destination state machine
//!
//! ```text
//!  Start ─▶ Receiving ─▶ Restoring ─▶ Ready ─▶ Committed ─▶ [Postcopy] ─▶ Done
//!    │          │            │          │
//!    └──────────┴────────────┴──────────┴──▶ Discarded (nothing of the program runs here)
//! ```
//!
//! # Ordering of pages
//!
//! A page may be sent several times (once per round it was dirty). Pages go
//! on data lanes chosen from the page's aligned chunk ([`CHUNK_PAGES`]), and
//! each lane is ordered, so every version of a page travels on the same lane
//! and the last one placed is the last one sent. `Handover.pages_total` counts
//! every page the source sent before it; the destination answers `Ready` only
//! after it has placed that many.

use crate::model::{PageRun, ProgramState, RegionId, RegionLayout, SocketPrep, SocketRecord};
use crate::split::SplitMessage;

// Defined in `model` (below both this module and `split`, which carry
// them); re-exported here, where the messages are.
pub use crate::model::{PageBatch, PageData};

/// Protocol version spoken by this crate. Peers accept this and the previous one.
pub const PROTOCOL_VERSION: u16 = 1;

/// Pages are assigned to data lanes by aligned chunks of this many pages, and
/// one `Pages` message never crosses a chunk boundary.
pub const CHUNK_PAGES: u32 = 64;

/// Capabilities a side announces in the handshake.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Caps(pub u64);

impl Caps {
    /// Zero pages may be sent as a flag.
    pub const ZERO_PAGES: Caps = Caps(1 << 0);
    /// Post-copy (the destination can take page faults for missing pages).
    pub const POSTCOPY: Caps = Caps(1 << 1);
    /// Socket records can be restored.
    pub const SOCKETS: Caps = Caps(1 << 2);
    /// Region digests can be verified.
    pub const DIGEST: Caps = Caps(1 << 3);
    /// Post-copy recovery: the channel may be re-established mid-transfer.
    pub const RECOVERY: Caps = Caps(1 << 4);

    /// Everything this version of lmig-core understands.
    pub const ALL: Caps = Caps(0b1_1111);

    /// Does `self` include every bit of `other`?
    pub fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits both sides have.
    pub fn intersect(self, other: Caps) -> Caps {
        Caps(self.0 & other.0)
    }
}

impl std::ops::BitOr for Caps {
    type Output = Caps;
    fn bitor(self, rhs: Caps) -> Caps {
        Caps(self.0 | rhs.0)
    }
}

/// Digest of one region: BLAKE3 over the region's per-page hashes (see
/// [`crate::verify`]). The source takes it from its frozen memory after
/// `Commit`; the destination from the pages as it placed them.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct RegionDigest {
    /// The region.
    pub region: RegionId,
    /// The digest.
    pub hash: [u8; 32],
}

/// What the destination found when it checked the digests.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Verification {
    /// No digest was asked for.
    NotChecked,
    /// Every region matches the source's digest.
    Verified,
    /// This region differs.
    Mismatch(RegionId),
}

/// Statistics of one pre-copy round, as sent in `RoundEnd`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundSummary {
    /// Round number, from 0.
    pub round: u32,
    /// Pages sent in the round (zero pages included).
    pub pages: u64,
    /// Of which zero pages, sent as a flag.
    pub zero_pages: u64,
    /// Pages found dirty at the end of the round.
    pub dirty_pages: u64,
}

/// Everything sent at the end of the freeze.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    /// Every page the source sent in this session before this message (all
    /// rounds). The destination answers `Ready` once it has placed that many.
    pub pages_total: u64,
    /// Pages that will arrive only after `Commit` (post-copy); their current
    /// content at the destination is stale. Empty for pure pre-copy.
    pub postcopy: Vec<PageRun>,
    /// The source will send `Digests` after `Commit`; the destination checks
    /// them before `Done`.
    pub verify: bool,
}

/// Most runs a `Handover.postcopy` list may hold.
pub const MAX_POSTCOPY_RUNS: usize = 1 << 22;
/// Most sockets one `Sockets` or `SocketPlan` message may carry.
pub const MAX_SOCKETS_PER_MESSAGE: usize = 65_536;

/// Largest queue estimate a `QueueEstimate` may carry (1 GiB): the most
/// receive memory a source may have the destination get ready.
pub const MAX_QUEUE_ESTIMATE: u64 = 1 << 30;

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// The source's region layout.
    Regions(RegionLayout),
    /// Page content.
    Pages(PageBatch),
    /// A pre-copy round is complete.
    RoundEnd(RoundSummary),
    /// Sockets the destination may prepare before the freeze.
    SocketPlan(Vec<SocketPrep>),
    /// Captured sockets; several batches, spread over the data lanes
    /// (`Channel::send_lane`), then one with `last = true` and no records
    /// on every data lane: the records are all in once every lane's end
    /// arrived (a lane's batches may trail `Handover` and other lanes').
    Sockets {
        /// The records of this batch.
        records: Vec<SocketRecord>,
        /// No more batches follow on this lane.
        last: bool,
    },
    /// The program's own state.
    State(ProgramState),
    /// Everything of the freeze has been sent.
    Handover(Handover),
    /// The destination mapped the regions and prepared the planned sockets:
    /// the source may freeze (it never freezes before the first one). Sent
    /// again each time the destination has placed every page of the rounds
    /// whose `RoundEnd` it saw: while the rounds shrink, the source waits
    /// (bounded) for that after each round, so the policy sees the
    /// end-to-end bandwidth and the freeze does not include placing a backlog.
    Prepared {
        /// Pages placed so far (every round, zero pages included).
        placed: u64,
    },
    /// The destination has everything and can resume.
    Ready,
    /// The switchover: the destination resumes, the source never will.
    Commit,
    /// Post-copy: the destination needs these pages now.
    PageRequest(PageRun),
    /// After `Commit`: digests of the source's frozen memory, one per region.
    Digests(Vec<RegionDigest>),
    /// Post-copy recovery: after the channel was re-established, the
    /// destination lists every page it still lacks; the source sends those
    /// again (they never arrived, so nothing is placed twice).
    Resync(Vec<PageRun>),
    /// The destination finished (every page placed) and checked the digests.
    Done(Verification),
    /// The sender gives up; the migration is off (only before `Commit`).
    Abort {
        /// Why, for the other side's error message.
        reason: String,
    },
    /// Split memory: owner-map, remote-paging and transfer messages between
    /// the running host and page hosts (see [`crate::split`]).
    Split(SplitMessage),
    /// Pre-copy: the source's estimate of the bytes queued in its sockets
    /// (what the freeze's `Sockets` batches would carry if it began now,
    /// at most [`MAX_QUEUE_ESTIMATE`]), sent after a round whose estimate
    /// is not 0. The destination gets receive memory for that much ready
    /// ([`Channel::warm_receive`](crate::Channel::warm_receive)), so that
    /// the freeze does not fault it in.
    QueueEstimate {
        /// Bytes queued, received and not read or sent and not acknowledged.
        bytes: u64,
    },
    /// After `Commit`: the destination's sockets left repair mode
    /// ([`SocketSink::activate`](crate::traits::SocketSink::activate)
    /// returned), so packets sent to them now are taken at once. The
    /// source re-injects the packets its lock held and closes its own
    /// sockets only then (or after a bound, for a peer that never says
    /// it), so that work does not share the CPU with the activation.
    SocketsActive,
    /// Post-copy, destination to source (on the urgent lane, behind its
    /// page requests): the program's work that waited for pages after the
    /// resume has all run
    /// ([`PageResidency::settled`](crate::traits::PageResidency::settled)).
    /// The source's push hold-off
    /// ([`SourceConfig::push_holdoff`](crate::session::SourceConfig::push_holdoff))
    /// ends at once. A source that does not know it ignores it; a
    /// destination that never sends it leaves the hold-off to its bound.
    DemandSettled,
}

impl Message {
    /// The message kind's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Regions(_) => "Regions",
            Self::Pages(_) => "Pages",
            Self::RoundEnd(_) => "RoundEnd",
            Self::SocketPlan(_) => "SocketPlan",
            Self::Sockets { .. } => "Sockets",
            Self::State(_) => "State",
            Self::Handover(_) => "Handover",
            Self::Prepared { .. } => "Prepared",
            Self::Ready => "Ready",
            Self::Commit => "Commit",
            Self::PageRequest(_) => "PageRequest",
            Self::Digests(_) => "Digests",
            Self::Resync(_) => "Resync",
            Self::Done(_) => "Done",
            Self::Abort { .. } => "Abort",
            Self::Split(_) => "Split",
            Self::QueueEstimate { .. } => "QueueEstimate",
            Self::SocketsActive => "SocketsActive",
            Self::DemandSettled => "DemandSettled",
        }
    }
}

/// Longest abort reason a peer may send.
pub const MAX_REASON_BYTES: usize = 4096;
