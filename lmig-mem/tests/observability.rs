//! Observability (features `tracing` and `serde`, on for the crate's own
//! tests): the tracker choice is logged with its reason, tracker kinds
//! serialise as the names reports use, the probe's verdicts as JSON.

use std::sync::{Arc, Mutex};

use lmig_core::model::RegionId;
use lmig_mem::{RegionOptions, RegionSet, TrackerKind};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Dispatch, Metadata, Subscriber};

/// Every event's fields, `name=value`, one string per event.
#[derive(Default, Clone)]
struct Events(Arc<Mutex<Vec<String>>>);

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(&format!("{}={value} ", field.name()));
    }
}

impl Subscriber for Events {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = Line(String::new());
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn the_tracker_choice_is_logged() {
    let set = RegionSet::new([
        RegionOptions::new(RegionId(1), 16 * lmig_mem::page_size() as u64)
            .map()
            .unwrap(),
    ])
    .unwrap();
    let events = Events::default();
    let chosen = tracing::dispatcher::with_default(&Dispatch::new(events.clone()), || {
        lmig_mem::best_tracker(&set)
    });
    let (_tracker, choice) = match chosen {
        Ok(c) => c,
        Err(e) => {
            if !lmig_core::testing::privileged("the_tracker_choice_is_logged", &e.to_string()) {
                return;
            }
            panic!("no automatic tracker: {e}");
        }
    };
    let lines = events.0.lock().unwrap().clone();
    let want = format!("tracker={}", choice.picked.name());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("dirty tracker chosen") && l.contains(&want)),
        "{lines:#?}"
    );
    // Every better kind rejected is logged with its reason.
    for (kind, _) in &choice.rejected {
        let want = format!("tracker={}", kind.name());
        assert!(
            lines
                .iter()
                .any(|l| l.contains("rejected") && l.contains(&want) && l.contains("reason=")),
            "{lines:#?}"
        );
    }
}

#[test]
fn tracker_kinds_serialise_as_their_names_and_the_probe_as_json() {
    for kind in [
        TrackerKind::UffdWp,
        TrackerKind::SoftDirty,
        TrackerKind::Manual,
        TrackerKind::DirtyLog,
    ] {
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.name()));
        assert_eq!(serde_json::from_str::<TrackerKind>(&json).unwrap(), kind);
    }
    let report = lmig_mem::probe();
    let json = serde_json::to_value(&report).unwrap();
    let findings = json["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), report.findings().len());
    let dirty = findings
        .iter()
        .find(|f| f["capability"] == "dirty-tracking")
        .unwrap_or_else(|| panic!("{json}"));
    // One of `ok`, `degraded`, `missing`, with its words.
    let verdict = dirty["verdict"].as_object().unwrap();
    assert_eq!(verdict.len(), 1, "{json}");
    let (status, words) = verdict.iter().next().unwrap();
    assert!(
        ["ok", "degraded", "missing"].contains(&status.as_str()),
        "{json}"
    );
    assert!(words.as_object().is_some_and(|w| !w.is_empty()), "{json}");
}
