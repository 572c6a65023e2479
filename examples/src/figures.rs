//! What kvd reports, typed once for both sides of its JSON: kvd writes
//! these (its admin socket's answers, its event lines on stdout), the
//! scenario, the demo and `lmig-bench migrate` read them back.
//!
//! The migration's figures come from the library's own reports
//! ([`SourceFigures::from_report`], [`DestinationFigures::from_report`]):
//! the fields the scenario and the bench read, plus the whole report as
//! the library serialises it (feature `serde`: durations as `*_ms`, the
//! source's `freeze_ms`, every round and decision) in `report`.

use lmig_core::protocol::Verification;
use lmig_core::session::{DestinationReport, SourceReport};
use serde::{Deserialize, Serialize};

use crate::common::clock::mono_ns;

/// kvd's answer to `migrate` when the migration committed: the source's
/// view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceFigures {
    /// Always `true` (tells this answer from a [`MigrateFailure`]).
    pub ok: bool,
    /// `precopy`, `postcopy` or `hybrid`.
    pub mode: String,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Bytes on the wire.
    pub bytes_sent: u64,
    /// Pages sent.
    pub pages_sent: u64,
    /// Zero pages sent as such.
    pub zero_pages: u64,
    /// Sockets moved.
    pub sockets: u64,
    /// A hybrid migration switched to post-copy.
    pub switched_to_postcopy: bool,
    /// The `migrate` command arrived (`CLOCK_MONOTONIC` ns).
    pub started_ns: u64,
    /// The program paused (ns).
    pub paused_ns: u64,
    /// The source sent `Commit` (ns).
    pub commit_ns: u64,
    /// The destination's `Ready` arrived (ns).
    pub ready_ns: u64,
    /// Pages sent in the freeze.
    pub freeze_pages: u64,
    /// Bytes in the queues of the sockets the freeze captured.
    #[serde(default)]
    pub queued_bytes: u64,
    /// The freeze's steps and their durations: `[name, ms]`.
    pub freeze_steps_ms: Vec<(String, f64)>,
    /// The whole migration as the source saw it, ms.
    pub total_ms: f64,
    /// Both sides' digests matched.
    pub verified: bool,
    /// Why the policy ended pre-copy.
    pub policy: String,
    /// What went wrong without failing the migration.
    pub warnings: Vec<String>,
    /// What protected the migration's streams: the Noise protocol, `TLS
    /// 1.3` and its suite, or `none`.
    #[serde(default)]
    pub cipher: String,
    /// kvd's own service time before the migration: the 99th percentile,
    /// over the requests its loop answered since it started, of the time
    /// the loop's pass that answered each took, ms (a power of two in µs);
    /// `null` from a daemon that does not measure it.
    #[serde(default)]
    pub kvd_baseline_p99_ms: Option<f64>,
    /// The same over the requests answered in pre-copy (from the `migrate`
    /// command to the freeze).
    #[serde(default)]
    pub kvd_precopy_p99_ms: Option<f64>,
    /// The library's report as it serialises it
    /// ([`lmig_core::session::SourceReport`]: `freeze_ms`, `round_stats`,
    /// `decisions`, `freeze_steps_ms`, …); `null` from an older kvd.
    #[serde(default)]
    pub report: serde_json::Value,
}

impl SourceFigures {
    /// The figures of a committed migration: `rep` as the library reported
    /// it, `started_ns` when the `migrate` command arrived, `total_ms` the
    /// whole command, `cipher` what protected the streams.
    pub fn from_report(rep: &SourceReport, started_ns: u64, total_ms: f64, cipher: String) -> Self {
        Self {
            ok: true,
            mode: format!("{:?}", rep.mode).to_lowercase(),
            rounds: rep.rounds,
            bytes_sent: rep.bytes_sent,
            pages_sent: rep.pages_sent,
            zero_pages: rep.zero_pages,
            sockets: rep.sockets,
            queued_bytes: rep.queued_bytes,
            switched_to_postcopy: rep.switched_to_postcopy,
            started_ns,
            paused_ns: mono_ns(rep.paused_at),
            commit_ns: mono_ns(rep.commit_at),
            ready_ns: mono_ns(rep.ready_at),
            freeze_pages: rep.freeze_pages,
            freeze_steps_ms: rep
                .freeze_steps
                .iter()
                .map(|(n, d)| (n.to_string(), d.as_secs_f64() * 1e3))
                .collect(),
            total_ms,
            verified: rep.verification == Verification::Verified,
            policy: rep.policy_reason.clone(),
            warnings: rep.warnings.clone(),
            cipher,
            kvd_baseline_p99_ms: None,
            kvd_precopy_p99_ms: None,
            report: serde_json::to_value(rep).unwrap_or_default(),
        }
    }
}

/// kvd's answer to `migrate` when the migration failed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateFailure {
    /// The error.
    pub error: String,
    /// The source kept (or took back) its program: it serves on.
    pub source_serving: bool,
    /// The freeze outlasted the `migrate` command's bound (`max_freeze`):
    /// the source aborted and resumed.
    #[serde(default)]
    pub aborted_by_deadline: bool,
    /// When the attempt froze kvd: from the pause to the program resumed
    /// on the source (the session's `Aborted` phase), ms.
    #[serde(default)]
    pub freeze_ms: Option<f64>,
    /// An operator's `cancel` ended the attempt (before `Commit`).
    #[serde(default)]
    pub cancelled: bool,
}

/// A progress line kvd writes while `migrate` runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Pages sent so far.
    pub pages: u64,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Pages of the program's memory.
    pub total_pages: u64,
}

/// One line of kvd's admin socket after `migrate`.
// One value per admin line, read once: boxing the figures would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MigrateLine {
    /// Still running.
    Progress {
        /// How far it got.
        progress: Progress,
    },
    /// The attempt failed before `Commit` and kvd runs again at the
    /// source (written the moment the session resumed it; the `Failed`
    /// line follows once the session has cleaned up).
    Resumed {
        /// When (`CLOCK_MONOTONIC` ns).
        resumed_ns: u64,
    },
    /// Committed: the last line.
    Migrated(SourceFigures),
    /// Failed: the last line.
    Failed(MigrateFailure),
}

/// kvd's answer to the admin command `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AdminStatus {
    /// `serving`, `migrating` (a migration away runs), `waiting` (a
    /// destination before a migration arrived) or `departed` (migrated
    /// away; the process ends).
    pub state: String,
    /// Clients connected now.
    pub clients: u64,
    /// The running migration (`None` when none runs).
    #[serde(default)]
    pub migration: Option<MigrationStatus>,
}

/// A running migration as `status` shows it (lmig-core's `Progress`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// The session's phase: `connecting`, `setup`, `precopy`, `frozen`,
    /// `await_ready`, `committed`, `postcopy`, `done`, `aborted`.
    pub phase: String,
    /// The pre-copy round running or last run.
    pub round: u32,
    /// Pages the current round sends, and of those sent so far.
    pub round_pages: u64,
    /// Of `round_pages`, sent so far.
    pub round_pages_sent: u64,
    /// Pages of kvd's memory.
    pub total_pages: u64,
    /// Pages sent so far, every phase.
    pub pages_sent: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Pages dirtied during the last finished round.
    pub dirty_pages: u64,
    /// How fast kvd dirtied memory in the last finished round, MB/s.
    pub dirty_rate_mbps: f64,
    /// The bandwidth measured, MB/s.
    pub bandwidth_mbps: f64,
    /// The bandwidth limit, MB/s (0: none).
    pub bandwidth_limit_mbps: f64,
    /// The freeze if it began now, ms.
    pub estimated_freeze_ms: Option<f64>,
    /// Since the migration started, ms.
    pub elapsed_ms: f64,
    /// A cancel was asked for.
    pub cancelling: bool,
}

/// The destination's view of a migration that arrived.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationFigures {
    /// Pages placed.
    pub pages_placed: u64,
    /// Pages fetched or pushed after the commit.
    pub postcopy_pages: u64,
    /// Page faults served from the network.
    pub network_faults: u64,
    /// Pages that arrived more than once.
    pub duplicate_pages: u64,
    /// Sockets restored.
    pub sockets: u64,
    /// Both sides' digests matched.
    pub verified: bool,
    /// The program resumed (`CLOCK_MONOTONIC` ns).
    pub resumed_ns: Option<u64>,
    /// The sockets were handed over (ns).
    pub handover_ns: Option<u64>,
    /// The last page of the freeze arrived (ns).
    pub last_page_ns: Option<u64>,
    /// `Ready` was sent (ns).
    pub ready_ns: Option<u64>,
    /// Every page is here (ns).
    pub complete_ns: Option<u64>,
    /// What went wrong without failing the migration.
    pub warnings: Vec<String>,
    /// The library's report as it serialises it
    /// ([`lmig_core::session::DestinationReport`]: `resumed_ms`,
    /// `complete_ms`, … from the session's start); `null` from an older kvd.
    #[serde(default)]
    pub report: serde_json::Value,
}

impl DestinationFigures {
    /// The figures of a migration that arrived, from the library's report.
    pub fn from_report(rep: &DestinationReport) -> Self {
        Self {
            pages_placed: rep.pages_placed,
            postcopy_pages: rep.postcopy_pages,
            network_faults: rep.network_faults,
            duplicate_pages: rep.duplicate_pages,
            sockets: rep.sockets_restored,
            verified: rep.verification == Verification::Verified,
            resumed_ns: rep.resumed_at.map(mono_ns),
            handover_ns: rep.handover_at.map(mono_ns),
            last_page_ns: rep.last_page_at.map(mono_ns),
            ready_ns: rep.ready_at.map(mono_ns),
            complete_ns: rep.complete_at.map(mono_ns),
            warnings: rep.warnings.clone(),
            report: serde_json::to_value(rep).unwrap_or_default(),
        }
    }
}

/// One of kvd's event lines on stdout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum KvdEvent {
    /// Serving clients on `addr`.
    Listening {
        /// The service address.
        addr: String,
        /// kvd's pid.
        pid: u32,
    },
    /// Waiting for a migration on `addr`.
    Waiting {
        /// The migration address.
        addr: String,
        /// kvd's pid.
        pid: u32,
    },
    /// A connection to the migration address was refused.
    Refused {
        /// Who connected.
        peer: String,
        /// Why it was refused.
        reason: String,
    },
    /// The freeze reached the destination.
    Frozen {
        /// When (ns).
        mono_ns: u64,
    },
    /// A migration arrived and committed.
    Migrated(DestinationFigures),
    /// An incoming migration failed.
    Failed {
        /// The error.
        error: String,
    },
    /// The destination serves (ns).
    Serving {
        /// When (ns).
        mono_ns: u64,
        /// Sockets that had joined the loop's poller before `Commit`
        /// (registered as the sink prepared them, before the freeze).
        #[serde(default)]
        registered_before_commit: u64,
    },
    /// After `Commit`, post-copy paused: the source was lost with pages
    /// still missing. Requests touching the store are refused meanwhile.
    PostcopyPaused {
        /// Pages still missing.
        missing_pages: u64,
        /// Why the source counts as lost.
        reason: String,
    },
    /// A source came back after a pause; post-copy goes on.
    PostcopyResumed {
        /// Pages missing when it came back.
        missing_pages: u64,
        /// How long post-copy was paused (ms).
        paused_ms: u64,
    },
    /// This kvd migrated away (the source's report; the process ends).
    MigratedOut(SourceFigures),
    /// A migration away from this kvd failed; it serves on here unless
    /// `source_serving` says otherwise.
    MigrateFailed(MigrateFailure),
    /// After `Commit`, the source never came back: the program runs here
    /// with `missing_pages` pages missing (requests touching the store are
    /// refused). Not `failed`: the migration committed.
    SourceLost {
        /// Pages that never arrived.
        missing_pages: u64,
        /// The session's error.
        error: String,
    },
}

impl KvdEvent {
    /// The event's name, as on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Listening { .. } => "listening",
            Self::Waiting { .. } => "waiting",
            Self::Refused { .. } => "refused",
            Self::Frozen { .. } => "frozen",
            Self::Migrated(_) => "migrated",
            Self::Failed { .. } => "failed",
            Self::Serving { .. } => "serving",
            Self::PostcopyPaused { .. } => "postcopy_paused",
            Self::PostcopyResumed { .. } => "postcopy_resumed",
            Self::SourceLost { .. } => "source_lost",
            Self::MigratedOut(_) => "migrated_out",
            Self::MigrateFailed(_) => "migrate_failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_reads_back_as_written() {
        let lines = [
            MigrateLine::Progress {
                progress: Progress {
                    pages: 1,
                    bytes: 4096,
                    total_pages: 9,
                },
            },
            MigrateLine::Migrated(SourceFigures {
                ok: true,
                mode: "precopy".into(),
                freeze_steps_ms: vec![("sockets".into(), 1.5)],
                ..SourceFigures::default()
            }),
            MigrateLine::Resumed { resumed_ns: 5 },
            MigrateLine::Failed(MigrateFailure {
                error: "refused".into(),
                source_serving: true,
                aborted_by_deadline: true,
                freeze_ms: Some(1.5),
                cancelled: false,
            }),
        ];
        for l in lines {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(
                serde_json::from_str::<MigrateLine>(&json).unwrap(),
                l,
                "{json}"
            );
        }
        let events = [
            KvdEvent::Frozen { mono_ns: 7 },
            KvdEvent::Migrated(DestinationFigures {
                resumed_ns: Some(3),
                ..DestinationFigures::default()
            }),
            KvdEvent::Failed { error: "x".into() },
            KvdEvent::PostcopyPaused {
                missing_pages: 3,
                reason: "x".into(),
            },
            KvdEvent::PostcopyResumed {
                missing_pages: 3,
                paused_ms: 2000,
            },
            KvdEvent::SourceLost {
                missing_pages: 3,
                error: "x".into(),
            },
            KvdEvent::MigratedOut(SourceFigures {
                rounds: 2,
                ..SourceFigures::default()
            }),
            KvdEvent::MigrateFailed(MigrateFailure {
                cancelled: true,
                source_serving: true,
                ..MigrateFailure::default()
            }),
        ];
        for e in events {
            let json = serde_json::to_string(&e).unwrap();
            assert!(
                json.contains(&format!("\"event\":\"{}\"", e.name())),
                "{json}"
            );
            assert_eq!(
                serde_json::from_str::<KvdEvent>(&json).unwrap(),
                e,
                "{json}"
            );
        }
    }

    /// A real (in-memory) migration's reports.
    fn reports() -> (SourceReport, DestinationReport) {
        use lmig_core::model::{RegionId, RegionInfo, RegionLayout};
        use lmig_core::session::{Destination, Source};
        use lmig_core::testing::{MarkTracker, NullProgram, VecMemory, channel_pair};
        let layout =
            RegionLayout::new(vec![RegionInfo::new(RegionId(1), 32 * 4096, 4096).unwrap()])
                .unwrap();
        let (src_mem, dst_mem) = (VecMemory::new(&layout), VecMemory::new(&layout));
        src_mem.fill(RegionId(1), 5, b"kvd");
        let (a, b) = channel_pair(1);
        let mut tracker = MarkTracker::new(&layout);
        std::thread::scope(|s| {
            let dst = s.spawn(|| Destination::new(&b, &dst_mem, NullProgram::default()).run());
            let src = Source::new(&a, &src_mem, &mut tracker, NullProgram::default())
                .run()
                .unwrap();
            (src, dst.join().unwrap().unwrap())
        })
    }

    #[test]
    fn figures_carry_the_library_reports_and_read_back() {
        let (src, dst) = reports();
        let f = SourceFigures::from_report(&src, 7, 1.5, "none".into());
        assert_eq!(
            (f.pages_sent, f.rounds, f.verified),
            (src.pages_sent, src.rounds, true)
        );
        assert_eq!(
            f.report["freeze_ms"].as_f64(),
            Some(src.freeze().as_secs_f64() * 1e3)
        );
        assert_eq!(f.report["pages_sent"], src.pages_sent);
        assert_eq!(
            f.report["round_stats"].as_array().map(Vec::len),
            Some(src.round_stats.len())
        );
        let line = MigrateLine::Migrated(f);
        let json = serde_json::to_string(&line).unwrap();
        assert_eq!(
            serde_json::from_str::<MigrateLine>(&json).unwrap(),
            line,
            "{json}"
        );

        let d = DestinationFigures::from_report(&dst);
        assert_eq!(d.pages_placed, dst.pages_placed);
        assert!(d.report["resumed_ms"].as_f64().is_some(), "{}", d.report);
        let e = KvdEvent::Migrated(d);
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            serde_json::from_str::<KvdEvent>(&json).unwrap(),
            e,
            "{json}"
        );
        // A line from a kvd without the embedded report still reads.
        let old = r#"{"event":"migrated","pages_placed":1,"postcopy_pages":0,"network_faults":0,"duplicate_pages":0,"sockets":0,"verified":true,"resumed_ns":null,"handover_ns":null,"last_page_ns":null,"ready_ns":null,"complete_ns":null,"warnings":[]}"#;
        assert!(matches!(
            serde_json::from_str::<KvdEvent>(old).unwrap(),
            KvdEvent::Migrated(DestinationFigures {
                report: serde_json::Value::Null,
                ..
            })
        ));
    }

    #[test]
    fn a_line_of_another_shape_is_an_error() {
        assert!(serde_json::from_str::<MigrateLine>(r#"{"ok": true}"#).is_err());
        assert!(serde_json::from_str::<KvdEvent>(r#"{"event": "unknown"}"#).is_err());
        assert!(serde_json::from_str::<KvdEvent>(r#"{"event": "frozen"}"#).is_err());
    }
}
