//! Conformance kits: one test body per pluggable trait, for an embedder to
//! run against their own implementation (feature `conformance`).
//!
//! A program that brings its own backend — memory a VMM maps, a transport
//! of its own, a socket layer — checks it with the same body lmig runs
//! against its in-tree implementations (the idea of vm-memory's
//! `test_bitmap`: one body, every backend):
//!
//! * [`memory`]: [`MemorySource`](crate::MemorySource) and
//!   [`MemorySink`](crate::MemorySink) — pages read back as written, zero
//!   runs, a mismatched layout refused, a bad region, offset or length
//!   refused with an error (never a panic) and without a byte changed,
//!   pages placed from several threads at once, a retry after `discard`;
//!   and, for a sink that handles page faults, post-copy (a read of a
//!   missing page waits until it is placed, `wait_fault` reports it);
//! * [`channel`]: [`Channel`](crate::Channel) — messages in order per lane
//!   and both ways, lanes beyond `data_lanes()` folded, the urgent lane,
//!   large messages, a receive timeout, the end of a closed or shut-down
//!   channel, no call blocking past its bound on a dead peer;
//! * [`sockets`]: [`SocketSource`](crate::SocketSource) and
//!   [`SocketSink`](crate::SocketSink) — the call order of a migration
//!   (plan, prepare, freeze, capture, restore, then abort and discard, or
//!   release and activate), records that validate and survive a retry, an
//!   abort at every step leaving the sockets serving, what a sink must
//!   refuse;
//! * the dirty-log kit is in `lmig-mem` (`lmig_mem::conformance`, same
//!   feature name), beside the `DirtyLog` trait it checks.
//!
//! Every kit returns `Err(`[`Violation`]`)` naming the implementation, the
//! rule it broke and what happened; its `Debug` is its `Display`, so
//! `.unwrap()` in a test prints a readable failure.
//!
//! # Running a kit against your implementation
//!
//! Turn the feature on for your tests only:
//!
//! ```toml
//! [dev-dependencies]
//! lmig-core = { version = "0.1", features = ["conformance"] }
//! ```
//!
//! and call the kit from a `#[test]`, giving it a way to make fresh
//! instances:
//!
//! ```
//! # use lmig_core::testing::channel_pair as my_channel_pair;
//! // In your crate's tests/conformance.rs, inside a #[test] fn:
//! // `my_channel_pair()` returns two fresh, connected ends of your channel.
//! lmig_core::conformance::channel::check("my channel", || my_channel_pair(2)).unwrap();
//! ```
//!
//! ```
//! # use lmig_core::testing::VecMemory;
//! # use lmig_core::model::{RegionId, RegionInfo, RegionLayout};
//! use lmig_core::conformance::memory;
//! let layout = RegionLayout::new(vec![RegionInfo::new(RegionId(1), 64 * 4096, 4096)?])?;
//! // The source: the kit puts data in through `fill`, as the program would.
//! let src = VecMemory::new(&layout);
//! memory::check_source("VecMemory", &src, &|r, page, data| src.fill(r, page, data)).unwrap();
//! // The sink: the kit prepares it for `layout` itself.
//! memory::check_sink("VecMemory", &VecMemory::empty(), &layout).unwrap();
//! # Ok::<_, lmig_core::MigrationError>(())
//! ```
//!
//! The socket kit needs real sockets with a peer on the other end, which
//! lmig-core cannot make: the caller provides them through a
//! [`sockets::SocketFixture`] (see `lmig-net/tests/conformance.rs` for one
//! over network namespaces with a peer process).
//!
//! Kits bound every wait (a call that does not return in time is a
//! violation, not a hung test) and assert no timing beyond that bound.

pub mod channel;
pub mod memory;
pub mod sockets;

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::MigrationError;

/// A rule of a trait's contract that an implementation broke.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Violation {
    /// The implementation, as the caller named it.
    pub implementation: String,
    /// The rule, in words (each kit's docs list its rules).
    pub rule: &'static str,
    /// What happened instead.
    pub detail: String,
}

impl Violation {
    /// A violation of `rule` by `implementation`: for kits outside this
    /// crate (`lmig_mem::conformance`).
    pub fn new(implementation: &str, rule: &'static str, detail: impl Into<String>) -> Self {
        Self {
            implementation: implementation.to_string(),
            rule,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} breaks the rule \"{}\": {}",
            self.implementation, self.rule, self.detail
        )
    }
}

impl fmt::Debug for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Violation {}

/// What every kit returns.
pub type Conformance = std::result::Result<(), Violation>;

/// Names the implementation under test in every violation.
#[derive(Clone, Debug)]
pub(crate) struct Judge {
    name: String,
}

impl Judge {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }

    /// A violation of `rule`.
    pub(crate) fn broke(&self, rule: &'static str, detail: impl Into<String>) -> Violation {
        Violation::new(&self.name, rule, detail)
    }

    /// `Err` unless `holds`.
    pub(crate) fn rule(
        &self,
        rule: &'static str,
        holds: bool,
        detail: impl FnOnce() -> String,
    ) -> Conformance {
        if holds {
            Ok(())
        } else {
            Err(self.broke(rule, detail()))
        }
    }

    /// The call's value, or a violation of `rule` naming the call and its error.
    pub(crate) fn ok<T>(
        &self,
        rule: &'static str,
        call: &str,
        r: Result<T, MigrationError>,
    ) -> Result<T, Violation> {
        r.map_err(|e| self.broke(rule, format!("{call} failed: {e}")))
    }

    /// Run `f`, turning a panic into a violation of `rule`.
    pub(crate) fn no_panic<T>(
        &self,
        rule: &'static str,
        call: &str,
        f: impl FnOnce() -> T,
    ) -> Result<T, Violation> {
        catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            self.broke(rule, format!("{call} panicked: {msg}"))
        })
    }

    /// The call must fail (with an error, not a panic) and leave things as they were.
    pub(crate) fn refused<T>(
        &self,
        rule: &'static str,
        call: &str,
        f: impl FnOnce() -> Result<T, MigrationError>,
    ) -> Result<MigrationError, Violation> {
        match self.no_panic(rule, call, f)? {
            Ok(_) => Err(self.broke(rule, format!("{call} succeeded"))),
            Err(e) => Ok(e),
        }
    }
}
