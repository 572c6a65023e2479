//! # lmig-core
//!
//! The contract of lmig, a library family that gives a running program live
//! migration: its memory, its TCP and UDP connections and its own state move
//! to another host while it keeps serving.
//!
//! This crate holds what every part agrees on and nothing that touches the
//! OS:
//!
//! * [`model`]: plain data — region layouts, page runs and sets, socket
//!   records, the program's state blob — each validating itself, because a
//!   peer's bytes are never trusted;
//! * [`protocol`]: the session's messages, their order and the commit rule;
//! * [`traits`]: what memory, dirty-tracking, socket, state and channel
//!   backends implement (`lmig-mem`, `lmig-net`, `lmig-transport` provide them);
//! * [`policy`]: the convergence policy that ends pre-copy;
//! * [`probe`]: the verdicts of the kernel probes (`lmig_mem::probe`,
//!   `lmig_net::probe`): OK, degraded or missing with the fix, per capability;
//! * [`session`]: the source and destination state machines, generic over the traits;
//! * [`split`]: split memory — the owner map and the messages between the
//!   running host and page hosts;
//! * `conformance` (feature `conformance`): one test body per pluggable
//!   trait, for an embedder to run against their own backend.
//!
//! ## Observability (features `tracing`, `serde`)
//!
//! With `tracing`, the sessions log through the `tracing` crate: a span
//! per phase (`setup`, `precopy` per round, `freeze`, `commit`,
//! `after_commit`, `postcopy`; on the destination `receive`, `commit`,
//! `postcopy`, `verify`), an event for each policy decision (its reason),
//! each freeze step with its duration, reconnections, every warning of
//! the reports and every error a cleanup path drops. Without it nothing is
//! compiled in. With `serde`, reports, statistics and events implement
//! `serde::Serialize` (plain values `Deserialize` too): durations as
//! milliseconds in `*_ms` fields (module `serde_ms`), `Instant`s as durations from
//! the session's start (`SourceReport` has `freeze_ms`).
//!
//! ## Guarantees
//!
//! Before the source sends `Commit`, any failure leaves the program running on
//! the source with its memory and connections intact, and the destination
//! discards what it received. After `Commit` only the destination runs. See
//! [`protocol`] for the exact rule.
//!
//! ## Non-goals
//!
//! No OS code and no `unsafe` here; no wire format either (that is
//! `lmig-transport`).
//!
//! ## Stable types
//!
//! Settings (`…Config`, `…Options`) are `#[non_exhaustive]` structs with
//! public fields: build one from `Default::default()` (or from its `new`
//! when some values are required) and chain its `#[must_use]`
//! `with_<field>` setters. Reports, statistics, events and the enums that
//! may grow (errors, phases, modes, outcomes, verdicts) are
//! `#[non_exhaustive]` too: read their fields, match them with a `_` arm.
//! A field or variant added later is then no breaking change. The
//! protocol's messages and records (lmig-core's `model`, `protocol` and
//! `split`, lmig-transport's handshake messages) stay exhaustive: a
//! variant added there is a new protocol version.
//!
//! ## Example
//!
//! A toy migration between two threads, memory held in plain vectors, over a
//! channel pair (real programs use `lmig-mem`, `lmig-net` and `lmig-transport`):
//!
//! ```
//! # use lmig_core::testing::{VecMemory, channel_pair, MarkTracker, NullProgram};
//! # use lmig_core::session::{Source, Destination};
//! # use lmig_core::model::{RegionId, RegionInfo, RegionLayout};
//! let layout = RegionLayout::new(vec![RegionInfo::new(RegionId(1), 64 * 4096, 4096)?])?;
//! let src_mem = VecMemory::new(&layout);
//! src_mem.fill(RegionId(1), 3, b"hello");
//! let dst_mem = VecMemory::new(&layout);
//! let (a, b) = channel_pair(2);
//! let mut tracker = MarkTracker::new(&layout);
//! std::thread::scope(|s| {
//!     let dst = s.spawn(|| Destination::new(&b, &dst_mem, NullProgram::default()).run());
//!     let report = Source::new(&a, &src_mem, &mut tracker, NullProgram::default()).run()?;
//!     assert_eq!(report.verification, lmig_core::protocol::Verification::Verified);
//!     dst.join().unwrap()?;
//!     Ok::<_, lmig_core::MigrationError>(())
//! })?;
//! assert_eq!(dst_mem.snapshot(RegionId(1)), src_mem.snapshot(RegionId(1)));
//! # Ok::<_, lmig_core::MigrationError>(())
//! ```

#![forbid(unsafe_code)]

// First: its macros (`debug!`, `info!`, `warn!`, `error!`, `phase_span!`)
// are in scope in every module below.
#[macro_use]
#[doc(hidden)]
pub mod log;

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod model;
pub mod policy;
pub mod probe;
pub mod protocol;
#[cfg(feature = "serde")]
pub mod serde_ms;
pub mod session;
pub mod split;
#[cfg(feature = "testing")]
pub mod testing;
pub mod traits;
pub mod verify;

pub use error::{BoxError, MigrationError, Result};
pub use policy::{ConvergencePolicy, Decision, Fallback, Policy, PolicyConfig, RoundStats};
pub use protocol::{Caps, Message, PageBatch, PageData};
pub use traits::{
    Channel, DirtyClearer, DirtyTracker, Event, MemorySink, MemorySource, NoObserver, NoSockets,
    Observer, PageResidency, Phase, SocketSink, SocketSource, StateSink, StateSource,
};
