//! The socket kit: [`check`] drives a [`SocketSource`] and [`SocketSink`]
//! through the calls of a migration, in the session's order, over sockets
//! a [`SocketFixture`] provides (real ones, with a peer on the other end).
//!
//! The call order, as the session makes it:
//!
//! ```text
//! source.plan ─► sink.prepare ─► source.freeze ─► source.capture ─► sink.restore (per batch)
//!     ├─ before Commit, on any failure: source.abort, sink.discard   (the source serves on)
//!     └─ after Commit:                  [hand-over], source.release, sink.activate
//! ```
//!
//! Rules:
//! * every call of the order above succeeds on sockets that are fine;
//! * an abort after `plan`, after `freeze`, and after `capture` and
//!   `restore` leaves every socket serving on the source (the fixture
//!   exchanges data through each), and a later attempt over the same
//!   sockets works — with the same source object, or with a new one the
//!   fixture makes around them ([`SocketFixture::source`]: whether a source
//!   runs a second attempt is the implementation's choice);
//! * captured records validate, their ids are unique, and a plan entry
//!   agrees with the record captured for its id;
//! * a retry captures the same sockets (same ids, kinds and addresses);
//! * the records round-trip: after `release` and `activate`, the restored
//!   sockets serve, with the data queued before the freeze intact (the
//!   fixture checks the bytes);
//! * a sink refuses, with an error naming the socket, a record that does
//!   not validate, and a socket id restored twice (unless the fixture says
//!   its sink tolerates bad records and keeps them for its own report);
//! * no call panics.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::model::{SockOpts, SocketRecord, TcpConnState, TcpOpts, TcpStateKind};
use crate::{SocketSink, SocketSource};

use super::{Conformance, Judge, Violation};

const ORDER: &str = "every call of a migration succeeds in the session's order";
const ABORT: &str = "an abort leaves every socket serving on the source";
const RECORDS: &str = "captured records validate and their ids are unique";
const PLAN: &str = "a plan entry agrees with the record captured for its id";
const RETRY: &str = "a retry captures the same sockets";
const ROUND_TRIP: &str = "restored sockets serve with the data queued before the freeze";
const REFUSE_INVALID: &str = "a sink refuses a record that does not validate, naming it";
const REFUSE_TWICE: &str = "a sink refuses a socket id restored twice, naming it";

/// Real sockets for the kit, and the checks only the caller can make.
pub trait SocketFixture {
    /// The source under test.
    type Source: SocketSource;
    /// The sink under test.
    type Sink: SocketSink;

    /// The source for the next attempt, holding the fixture's sockets (each
    /// with a live peer and data queued both ways). First called with
    /// `None`; after each abort with the aborted source, which it returns
    /// as it is when it can run another attempt, or whose sockets it hands
    /// to a new source.
    fn source(&mut self, aborted: Option<Self::Source>) -> Result<Self::Source, String>;

    /// A new, empty sink on the destination. Called once per attempt.
    fn sink(&mut self) -> Result<Self::Sink, String>;

    /// After an abort: every socket of `source` still serves (data goes both
    /// ways through each, nothing queued before was lost), and new data is
    /// queued again both ways for the next attempt.
    fn source_serves(&mut self, source: &mut Self::Source) -> Result<(), String>;

    /// After `Commit`, before the source's `release`: what the hosts do that
    /// the backends under test do not (e.g. move the service address, when
    /// no handoff around the source does it in `release`; moved before the
    /// sockets close, no packet finds the address without its socket and
    /// draws a reset). None by default.
    fn hand_over(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// After `activate`: every socket serves from the sink, and the data
    /// queued (both ways) before the last freeze arrived exactly once.
    fn sink_serves(&mut self, sink: &mut Self::Sink) -> Result<(), String>;

    /// The sink keeps bad records for its own report instead of failing
    /// `restore` (`lmig-net`'s `SinkConfig::tolerate_bad_records`).
    fn sink_tolerates_bad_records(&self) -> bool {
        false
    }
}

/// Run every rule over `fixture`'s sockets.
pub fn check<F: SocketFixture>(name: &str, fixture: &mut F) -> Conformance {
    let j = Judge::new(name);
    let mut source = fixture
        .source(None)
        .map_err(|e| j.broke(ORDER, format!("the fixture made no source: {e}")))?;
    // Abort after plan, after freeze, after capture and restore.
    let mut first: Option<Vec<SocketRecord>> = None;
    for step in [Step::Planned, Step::Frozen, Step::Restored] {
        let mut sink = new_sink(&j, fixture)?;
        let records = attempt(&j, &mut source, &mut sink, step)?;
        j.ok(
            ABORT,
            &format!("abort after {}", step.name()),
            j.no_panic(ABORT, "abort", || source.abort())?,
        )?;
        j.no_panic(ABORT, "SocketSink::discard", || sink.discard())?;
        drop(sink);
        fixture
            .source_serves(&mut source)
            .map_err(|e| j.broke(ABORT, format!("after an abort {}: {e}", step.name())))?;
        if step == Step::Restored {
            first = records;
        }
        source = fixture.source(Some(source)).map_err(|e| {
            j.broke(
                ABORT,
                format!(
                    "no source for the attempt after an abort {}: {e}",
                    step.name()
                ),
            )
        })?;
    }
    refusals(&j, fixture, first.as_deref().unwrap_or_default())?;
    // The attempt that commits.
    let mut sink = new_sink(&j, fixture)?;
    let records = attempt(&j, &mut source, &mut sink, Step::Restored)?.unwrap_or_default();
    same_sockets(&j, first.as_deref().unwrap_or_default(), &records)?;
    fixture
        .hand_over()
        .map_err(|e| j.broke(ORDER, format!("the fixture's hand-over failed: {e}")))?;
    j.ok(
        ORDER,
        "SocketSource::release",
        j.no_panic(ORDER, "release", || source.release())?,
    )?;
    j.ok(
        ORDER,
        "SocketSink::activate",
        j.no_panic(ORDER, "activate", || sink.activate())?,
    )?;
    fixture
        .sink_serves(&mut sink)
        .map_err(|e| j.broke(ROUND_TRIP, e))
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Step {
    Planned,
    Frozen,
    Restored,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Planned => "plan and prepare",
            Step::Frozen => "freeze",
            Step::Restored => "capture and restore",
        }
    }
}

fn new_sink<F: SocketFixture>(j: &Judge, fixture: &mut F) -> Result<F::Sink, Violation> {
    fixture
        .sink()
        .map_err(|e| j.broke(ORDER, format!("the fixture made no sink: {e}")))
}

/// The calls of one attempt up to `upto`; the records when captured.
fn attempt<S: SocketSource, K: SocketSink>(
    j: &Judge,
    source: &mut S,
    sink: &mut K,
    upto: Step,
) -> Result<Option<Vec<SocketRecord>>, Violation> {
    let plan = j.ok(
        ORDER,
        "SocketSource::plan",
        j.no_panic(ORDER, "plan", || source.plan())?,
    )?;
    j.ok(
        ORDER,
        "SocketSink::prepare (after plan)",
        j.no_panic(ORDER, "prepare", || sink.prepare(&plan))?,
    )?;
    if upto == Step::Planned {
        return Ok(None);
    }
    j.ok(
        ORDER,
        "SocketSource::freeze (after plan)",
        j.no_panic(ORDER, "freeze", || source.freeze())?,
    )?;
    if upto == Step::Frozen {
        return Ok(None);
    }
    let mut batches = Vec::new();
    let captured = j.no_panic(ORDER, "capture", || {
        source.capture(&mut |b| {
            batches.push(b);
            Ok(())
        })
    })?;
    j.ok(ORDER, "SocketSource::capture (after freeze)", captured)?;
    let records: Vec<SocketRecord> = batches.iter().flatten().cloned().collect();
    check_records(j, &plan, &records)?;
    for (k, batch) in batches.into_iter().enumerate() {
        let call = format!("SocketSink::restore (batch {k}, after capture)");
        j.ok(
            ORDER,
            &call,
            j.no_panic(ORDER, &call, || sink.restore(batch))?,
        )?;
    }
    Ok(Some(records))
}

fn check_records(
    j: &Judge,
    plan: &[crate::model::SocketPrep],
    records: &[SocketRecord],
) -> Conformance {
    let mut ids = std::collections::BTreeSet::new();
    for r in records {
        j.ok(
            RECORDS,
            &format!("validate({})", r.describe()),
            r.validate(),
        )?;
        j.rule(RECORDS, ids.insert(r.id()), || {
            format!("id {} captured twice", r.id())
        })?;
    }
    for p in plan {
        if let Some(r) = records.iter().find(|r| r.id() == p.id) {
            // The same socket: options may change after the plan (the
            // record carries them as captured), and the plan's timestamp
            // clock is its own.
            let rp = r.prep();
            let same = (rp.id, rp.kind, rp.local, rp.peer) == (p.id, p.kind, p.local, p.peer);
            j.rule(PLAN, same, || {
                format!("planned {p:?}, captured {}", r.describe())
            })?;
        }
    }
    Ok(())
}

/// Id, kind and addresses of each record, sorted by id.
fn identities(records: &[SocketRecord]) -> Vec<String> {
    let mut v: Vec<(u64, String)> = records.iter().map(|r| (r.id(), r.describe())).collect();
    v.sort();
    v.into_iter().map(|(_, d)| d).collect()
}

fn same_sockets(j: &Judge, first: &[SocketRecord], again: &[SocketRecord]) -> Conformance {
    let (a, b) = (identities(first), identities(again));
    j.rule(RETRY, a == b, || {
        format!("first attempt captured {a:?}, the retry {b:?}")
    })
}

/// A record no sink may restore: an MSS of 0.
fn invalid_record() -> SocketRecord {
    let local: SocketAddr = "198.51.100.1:80".parse().expect("address");
    let peer: SocketAddr = "198.51.100.9:40000".parse().expect("address");
    SocketRecord::Tcp(TcpConnState {
        id: 0x00C0_FFEE,
        local,
        peer,
        state: TcpStateKind::Established,
        snd_seq: 1000,
        rcv_seq: 5000,
        send_queue: Bytes::new(),
        unsent_len: 0,
        recv_queue: Bytes::new(),
        mss: 0,
        snd_wscale: 7,
        rcv_wscale: 7,
        wscale_ok: true,
        sack_ok: true,
        timestamps_ok: true,
        timestamp: 0,
        window: None,
        sock: SockOpts::default(),
        tcp: TcpOpts::default(),
    })
}

fn names(e: &crate::MigrationError, r: &SocketRecord) -> bool {
    let text = e.to_string();
    text.contains(&r.id().to_string()) || text.contains(&r.describe())
}

/// What a fresh sink must refuse; `records` are real records of the fixture
/// (an empty list skips the duplicate rule, and a sink that restores no
/// socket at all need not name the one it refused).
fn refusals<F: SocketFixture>(j: &Judge, fixture: &mut F, records: &[SocketRecord]) -> Conformance {
    let mut sink = new_sink(j, fixture)?;
    let tolerant = fixture.sink_tolerates_bad_records();
    let result = (|| -> Conformance {
        j.ok(
            ORDER,
            "SocketSink::prepare(no plan)",
            j.no_panic(ORDER, "prepare", || sink.prepare(&[]))?,
        )?;
        let bad = invalid_record();
        let call = format!("restore({}, MSS 0)", bad.describe());
        let got = j.no_panic(REFUSE_INVALID, &call, || sink.restore(vec![bad.clone()]))?;
        match got {
            Ok(()) => j.rule(REFUSE_INVALID, tolerant, || format!("{call} succeeded"))?,
            Err(e) => j.rule(
                REFUSE_INVALID,
                records.is_empty() || names(&e, &bad),
                || format!("{call} failed without naming the socket: {e}"),
            )?,
        }
        let Some(real) = records.first() else {
            return Ok(());
        };
        let call = format!("restore({})", real.describe());
        j.ok(
            ORDER,
            &call,
            j.no_panic(ORDER, &call, || sink.restore(vec![real.clone()]))?,
        )?;
        let call = format!("restore({}) a second time", real.describe());
        match j.no_panic(REFUSE_TWICE, &call, || sink.restore(vec![real.clone()]))? {
            Ok(()) => j.rule(REFUSE_TWICE, tolerant, || format!("{call} succeeded")),
            Err(e) => j.rule(REFUSE_TWICE, names(&e, real), || {
                format!("{call} failed without naming the socket: {e}")
            }),
        }
    })();
    j.no_panic(ORDER, "SocketSink::discard", || sink.discard())?;
    result
}
