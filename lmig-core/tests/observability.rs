//! Observability (features `tracing` and `serde`, turned on for the crate's
//! own tests): a migration between two `VecMemory`s logs its phases as
//! spans, the policy's decision and every freeze step as events, and its
//! reports serialise with durations, `freeze_ms` included.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use lmig_core::model::{RegionId, RegionInfo, RegionLayout};
use lmig_core::session::{Destination, DestinationReport, Source, SourceReport};
use lmig_core::testing::{MarkTracker, NullProgram, VecMemory, channel_pair};
use lmig_core::{Decision, Event, Phase, RoundStats};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Dispatch, Metadata, Subscriber};

/// One event as the collector saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// The innermost span entered on the event's thread, if any.
    span: Option<&'static str>,
    /// Every span entered on the event's thread, outermost first.
    spans: Vec<&'static str>,
    fields: HashMap<String, String>,
}

impl Seen {
    fn message(&self) -> &str {
        self.fields.get("message").map_or("", String::as_str)
    }
}

/// A subscriber that keeps every span name and event (all levels), with
/// the span stack of the thread that emitted it.
#[derive(Default)]
struct Collector {
    next: AtomicU64,
    names: Mutex<HashMap<u64, &'static str>>,
    stacks: Mutex<HashMap<ThreadId, Vec<u64>>>,
    spans: Mutex<Vec<&'static str>>,
    events: Mutex<Vec<Seen>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

struct Shared(Arc<Collector>);

impl Subscriber for Shared {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed) + 1;
        let name = attrs.metadata().name();
        self.0.names.lock().unwrap().insert(id, name);
        self.0.spans.lock().unwrap().push(name);
        Id::from_u64(id)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        let names = self.0.names.lock().unwrap();
        let spans: Vec<&'static str> = self
            .0
            .stacks
            .lock()
            .unwrap()
            .get(&std::thread::current().id())
            .map(|s| s.iter().map(|id| names[id]).collect())
            .unwrap_or_default();
        self.0.events.lock().unwrap().push(Seen {
            span: spans.last().copied(),
            spans,
            fields,
        });
    }
    fn enter(&self, span: &Id) {
        let mut stacks = self.0.stacks.lock().unwrap();
        stacks
            .entry(std::thread::current().id())
            .or_default()
            .push(span.into_u64());
    }
    fn exit(&self, span: &Id) {
        let mut stacks = self.0.stacks.lock().unwrap();
        let stack = stacks.entry(std::thread::current().id()).or_default();
        if let Some(i) = stack.iter().rposition(|s| *s == span.into_u64()) {
            stack.remove(i);
        }
    }
}

/// A small pre-copy migration, both sides logging into `collector`.
fn migrate(collector: &Arc<Collector>) -> (SourceReport, DestinationReport, VecMemory, VecMemory) {
    let dispatch = Dispatch::new(Shared(collector.clone()));
    let layout =
        RegionLayout::new(vec![RegionInfo::new(RegionId(1), 64 * 4096, 4096).unwrap()]).unwrap();
    let src_mem = VecMemory::new(&layout);
    src_mem.fill(RegionId(1), 3, b"hello");
    src_mem.fill(RegionId(1), 40, b"world");
    let dst_mem = VecMemory::new(&layout);
    let (a, b) = channel_pair(2);
    let mut tracker = MarkTracker::new(&layout);
    let (src, dst) = std::thread::scope(|s| {
        let dst = s.spawn(|| {
            tracing::dispatcher::with_default(&dispatch, || {
                Destination::new(&b, &dst_mem, NullProgram::default()).run()
            })
        });
        let src = tracing::dispatcher::with_default(&dispatch, || {
            Source::new(&a, &src_mem, &mut tracker, NullProgram::default()).run()
        });
        (src, dst.join().expect("the destination panicked"))
    });
    (
        src.expect("source"),
        dst.expect("destination"),
        src_mem,
        dst_mem,
    )
}

#[test]
fn a_migration_logs_its_phases_decisions_and_freeze_steps() {
    let collector = Arc::new(Collector::default());
    let (report, _, src_mem, dst_mem) = migrate(&collector);
    assert_eq!(dst_mem.snapshot(RegionId(1)), src_mem.snapshot(RegionId(1)));

    let spans = collector.spans.lock().unwrap().clone();
    for want in [
        "source",
        "setup",
        "precopy",
        "freeze",
        "commit",
        "after_commit",
        "destination",
        "receive",
        "verify",
    ] {
        assert!(spans.contains(&want), "no span {want:?} in {spans:?}");
    }

    let events = collector.events.lock().unwrap().clone();
    // The policy's last decision (a round more is made when the
    // destination was not prepared yet at the first), its reason as the
    // message, in the source's session span.
    let decision = events
        .iter()
        .rev()
        .find(|e| e.fields.contains_key("decision"))
        .unwrap_or_else(|| panic!("no decision event in {events:#?}"));
    assert!(
        decision.message().contains("estimated freeze"),
        "{decision:?}"
    );
    assert_eq!(decision.message(), report.policy_reason);
    assert_eq!(decision.fields["decision"], "Freeze");
    assert_eq!(decision.spans.first(), Some(&"source"), "{decision:?}");

    // Every freeze step, with its duration, inside the freeze span, in the
    // report's order.
    let steps: Vec<&Seen> = events
        .iter()
        .filter(|e| e.message() == "freeze step")
        .collect();
    let names: Vec<&str> = steps.iter().map(|e| e.fields["step"].as_str()).collect();
    let reported: Vec<&str> = report.freeze_steps.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, reported);
    assert!(names.contains(&"pause program") && names.contains(&"wait for Ready"));
    for step in &steps {
        assert_eq!(step.span, Some("freeze"), "{step:?}");
        let ms: f64 = step.fields["ms"].parse().expect("ms is a number");
        assert!(ms >= 0.0, "{step:?}");
    }

    // Each phase change of both sides is an event too.
    let phases: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e.message() == "phase")
        .map(|e| (e.fields["side"].as_str(), e.fields["phase"].as_str()))
        .collect();
    for want in [
        ("source", "Setup"),
        ("source", "Frozen"),
        ("source", "Committed"),
        ("source", "Done"),
        ("destination", "Committed"),
        ("destination", "Done"),
    ] {
        assert!(phases.contains(&want), "no {want:?} in {phases:?}");
    }
}

#[test]
fn reports_serialise_with_durations_and_freeze_ms() {
    let collector = Arc::new(Collector::default());
    let (report, dst, _, _) = migrate(&collector);
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    assert_eq!(json["freeze_ms"].as_f64(), Some(ms(report.freeze())));
    assert_eq!(
        json["freeze_ms"].as_f64(),
        Some(ms(report.commit_after - report.paused_after))
    );
    let (paused, ready, commit) = (
        json["paused_ms"].as_f64().unwrap(),
        json["ready_ms"].as_f64().unwrap(),
        json["commit_ms"].as_f64().unwrap(),
    );
    assert!(paused <= ready && ready <= commit, "{json}");
    assert!(json.get("paused_at").is_none(), "an Instant leaked: {json}");
    assert_eq!(json["mode"], "precopy");
    assert_eq!(json["verification"], "verified");
    // One decision per round, serialised by name: nothing is dirtied, so
    // every round decides to freeze; a round more is made when the
    // destination was not prepared yet at the first (it never freezes
    // before), which depends on the threads' timing.
    let decisions = json["decisions"].as_array().unwrap();
    assert!(!decisions.is_empty(), "{json}");
    assert!(decisions.iter().all(|d| d == "freeze"), "{json}");
    assert_eq!(decisions.len(), report.decisions.len());
    assert_eq!(json["tracker"], report.tracker);
    assert_eq!(json["pages_sent"], report.pages_sent);
    let steps = json["freeze_steps_ms"].as_array().unwrap();
    assert_eq!(steps.len(), report.freeze_steps.len());
    for (got, (name, d)) in steps.iter().zip(&report.freeze_steps) {
        assert_eq!(got[0], *name);
        assert_eq!(got[1].as_f64(), Some(ms(*d)));
    }
    // The statistics read back as written (to the nanosecond a millisecond
    // float holds).
    let rounds: Vec<RoundStats> = serde_json::from_value(json["round_stats"].clone()).unwrap();
    assert_eq!(rounds.len(), report.round_stats.len());
    for (back, orig) in rounds.iter().zip(&report.round_stats) {
        // `RoundStats` is `#[non_exhaustive]`: compare a copy with the
        // original's elapsed time put in.
        let mut same = *back;
        same.elapsed = orig.elapsed;
        assert_eq!(same, *orig);
        assert!(back.elapsed.abs_diff(orig.elapsed) <= std::time::Duration::from_nanos(1));
    }

    let json = serde_json::to_value(&dst).unwrap();
    assert_eq!(json["pages_placed"], dst.pages_placed);
    let resumed = json["resumed_ms"].as_f64().expect("resumed_ms");
    assert_eq!(Some(resumed), dst.resumed_after.map(ms));
    assert!(json["handover_ms"].as_f64().unwrap() <= resumed, "{json}");
    assert!(
        json.get("resumed_at").is_none(),
        "an Instant leaked: {json}"
    );

    // Events: plain values read back; `Instant`s are left out.
    let e = serde_json::to_value(Event::Decision(Decision::Throttle { percent: 50 })).unwrap();
    assert_eq!(
        e,
        serde_json::json!({"decision": {"throttle": {"percent": 50}}})
    );
    let e = serde_json::to_value(Event::Phase {
        phase: Phase::Precopy(2),
        at: std::time::Instant::now(),
    })
    .unwrap();
    assert_eq!(e, serde_json::json!({"phase": {"phase": {"precopy": 2}}}));
    let back: Phase = serde_json::from_value(serde_json::json!({"precopy": 2})).unwrap();
    assert_eq!(back, Phase::Precopy(2));
}
