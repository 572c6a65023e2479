//! `lmig-bench migrate --mib M --conns N --mode precopy|postcopy|hybrid --dirty-mbps R [--max-freeze-ms F] [--queued-mib Q]`:
//! the demo's scenario (kvd with N busy clients moving between two hosts) as
//! a benchmark. `--tls` runs the migration over TLS 1.3 with certificates
//! made for the run, `--psk` (the default) over Noise keyed by a pre-shared
//! key; `cipher` names what protected it. `--server tokio` migrates tokiod
//! (a tokio runtime, a task per connection) instead of kvd; `server` names it.
//! key; `cipher` names what protected it. `--cancel-at-pct P` cancels the
//! migration through kvd's admin socket at P % of round 0 (`cancelled`,
//! `source_serving`, `conns_broken`, `requests_failed`, `cancel_ms`: cancel
//! sent to kvd's line saying it runs again; `cancel_answered_ms`: to the
//! final answer, after the session's cleanup). The clients' p99 per phase:
//! `baseline_p99_ms` (the last 2 s before the migration; the warm-up is
//! 3 s), `precopy_p99_ms` (requests sent during the rounds and answered
//! before the pause), `postcopy_p99_ms` (sent from `Commit` to the last
//! missing page; null without post-copy).
//!
//! `--split-cpus` is an experiment that changes placement, never a
//! default: kvd's loop, its background writer and the clients on one CPU,
//! the migration's threads (A's admin threads, which run the session, and
//! the whole destination) on the other (`split_cpus`: the two CPUs). It
//! shows what the clients' pre-copy p99 is when the migration's CPU work
//! cannot touch the loop's CPU (on a real deployment the destination and
//! the clients are other hosts). `--dry-precopy MBPS`, another experiment:
//! kvd does not connect but runs its own side of a pre-copy (the dirty
//! tracker and rounds reading its pages at MBPS, 0: the tracker alone;
//! `kvd::dry`) and fails by design; `dry_baseline_p99_ms` and `dry_p99_ms`
//! are the clients' p99 before and during it.
//!
//! `--client-cpu N` (the client load thread on CPU N), `--loop-off-client-cpu`
//! (kvd's loop on the other CPUs) and `--migration-cpu N` (the migration's
//! threads and the destination on CPU N) are placement experiments too,
//! never a default (`client_cpu`, `loop_off_client_cpu`, `migration_cpu`;
//! `scenario::split`): the bench's clients share the host's CPUs with kvd
//! and the migration, a deployment's do not. Placed before the baseline, so
//! `baseline_p99_ms` and `precopy_p99_ms` have one placement.

use std::time::Duration;

use serde_json::json;

use super::{Output, round};
use crate::common::clock::mono_ns;
use crate::scenario::split::{Pins, Placement};
use crate::scenario::{self, Fault, Options, Server};

/// Keys loaded by default into 1 GiB (100-byte values).
const DEFAULT_KEYS: u64 = 1_000_000;

/// Options of the `migrate` scenario.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// kvd's region size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Client connections.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Requests per second over all client connections.
    #[arg(long, default_value_t = 20_000.0)]
    pub rate: f64,
    /// precopy, postcopy or hybrid.
    #[arg(long, default_value = "precopy")]
    pub mode: String,
    /// MB/s of memory kvd dirties in the background.
    #[arg(long, default_value_t = 100.0)]
    pub dirty_mbps: f64,
    /// Keys loaded before the clients start (default: 1,000,000 in 1 GiB
    /// or more, as many in proportion in less, so that they fit).
    #[arg(long)]
    pub keys: Option<u64>,
    /// Parallel data streams.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Stage a failure: `wrong-key` or `no-destination` (kvd must keep
    /// serving on A); `kill-dest-in-freeze:US` (the destination dies US µs
    /// after the freeze reaches it, before `Ready` at the latest, and kvd
    /// migrates again to a fresh one); `strangers` (hostile connections at
    /// the destination before and during the migration).
    #[arg(long)]
    pub fault: Option<String>,
    /// Migrate over TLS 1.3 with mutual certificates (a CA and two
    /// certificates made for the run).
    #[arg(long, conflicts_with = "psk")]
    pub tls: bool,
    /// Noise keyed by a pre-shared key (the default).
    #[arg(long)]
    pub psk: bool,
    /// Frames in clear after the key's admission (a trusted link only):
    /// the baseline for what `--psk` and `--tls` cost.
    #[arg(long, conflicts_with_all = ["psk", "tls"])]
    pub plaintext_trusted_link: bool,
    /// Bound the freeze (ms): past it kvd aborts and serves on at the
    /// source (`aborted_by_deadline`, `source_serving`).
    #[arg(long)]
    pub max_freeze_ms: Option<f64>,
    /// The migrated daemon: `kvd` (one mio loop) or `tokio` (tokiod, a
    /// tokio runtime with a task per connection).
    #[arg(long, default_value = "kvd")]
    pub server: String,
    /// Leave this many MiB of replies queued in kvd's sockets at the freeze
    /// (on up to 100 connections of their own; field `queued_bytes`: what
    /// the freeze captured).
    #[arg(long, default_value_t = 0.0)]
    pub queued_mib: f64,
    /// The receive buffer (`SO_RCVBUF`, bytes; 0: the kernel's default) of
    /// the connections holding `--queued-mib`. The default, 4096, keeps the
    /// sender's segments (and so its queue's buffers) ~2 KiB; a client
    /// that stops reading with a default buffer leaves 32-64 KiB ones, and
    /// its own buffer takes part of the replies (`queued_bytes` says what
    /// stayed at kvd).
    #[arg(long, default_value_t = crate::scenario::queued::RCVBUF)]
    pub queued_rcvbuf: usize,
    /// Cancel the migration (kvd's admin `cancel`) once round 0 sent P %
    /// of its pages: `cancelled`, `source_serving`, `cancel_ms` (cancel
    /// sent to kvd answering that it serves on), and the clients' view.
    #[arg(long, value_name = "P")]
    pub cancel_at_pct: Option<f64>,
    /// Limit the migration's bandwidth (MB/s; `migrate bandwidth_mbps=`).
    #[arg(long)]
    pub bandwidth_mbps: Option<f64>,
    /// An experiment (never a default): kvd's loop and the clients on one
    /// CPU, the migration's threads and the destination on the other.
    #[arg(long, conflicts_with = "client_cpu")]
    pub split_cpus: bool,
    /// An experiment (never a default): the bench's client load thread on
    /// this CPU only (`client_cpu`); kvd and the migration unplaced unless
    /// `--loop-off-client-cpu`. Placed before the baseline's window.
    #[arg(long, value_name = "N")]
    pub client_cpu: Option<usize>,
    /// With `--client-cpu N`: kvd's loop (the source's) on every other CPU,
    /// so the client load cannot share its CPU (`loop_off_client_cpu`).
    #[arg(long, requires = "client_cpu")]
    pub loop_off_client_cpu: bool,
    /// An experiment (never a default): the migration's threads (the
    /// source's session, senders and receivers; the whole destination) on
    /// this CPU only (`migration_cpu`), as an operator pins a VMM's
    /// migration threads. Placed before the baseline's window.
    #[arg(long, value_name = "N", conflicts_with = "split_cpus")]
    pub migration_cpu: Option<usize>,
    /// An experiment: no migration, but kvd's own side of a pre-copy
    /// (its dirty tracker, rounds reading its pages at this many MB/s; 0:
    /// the tracker alone), nothing sent (`dry_precopy_mbps`,
    /// `dry_baseline_p99_ms`, `dry_p99_ms`).
    #[arg(long, value_name = "MBPS")]
    pub dry_precopy: Option<f64>,
}

/// Run the scenario.
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn std::error::Error>> {
    if !["precopy", "postcopy", "hybrid"].contains(&args.mode.as_str()) {
        return Err(format!("--mode {}: precopy, postcopy or hybrid", args.mode).into());
    }
    let fault = match args.fault.as_deref() {
        None => None,
        Some("wrong-key") => Some(Fault::WrongKey),
        Some("no-destination") => Some(Fault::NoDestination),
        Some("strangers") => Some(Fault::Strangers),
        Some(f) if f.starts_with("kill-dest-in-freeze:") => Some(Fault::KillDestinationInFreeze {
            after_us: f["kill-dest-in-freeze:".len()..]
                .parse()
                .map_err(|e| format!("--fault {f}: {e}"))?,
        }),
        Some(other) => {
            return Err(format!(
                "--fault {other}: wrong-key, no-destination, kill-dest-in-freeze:US or strangers"
            )
            .into());
        }
    };
    let server = Server::parse(&args.server)?;
    let opts = Options {
        kvd: server.command(std::env::current_exe()?),
        rate: args.rate,
        dirty_mbps: args.dirty_mbps,
        keys: args
            .keys
            .unwrap_or(DEFAULT_KEYS * args.mib.min(1024) / 1024),
        streams: args.streams,
        fault,
        tls: args.tls,
        plaintext: args.plaintext_trusted_link,
        max_freeze_ms: args.max_freeze_ms,
        queued_mib: args.queued_mib,
        queued_rcvbuf: args.queued_rcvbuf,
        cancel_at_pct: args.cancel_at_pct,
        bandwidth_mbps: args.bandwidth_mbps,
        placement: if args.split_cpus {
            Placement::Split
        } else if args.client_cpu.is_some() || args.migration_cpu.is_some() {
            Placement::Pinned(Pins {
                clients: args.client_cpu,
                loop_off_clients: args.loop_off_client_cpu,
                migration: args.migration_cpu,
            })
        } else {
            Placement::Unplaced
        },
        dry_precopy_mbps: args.dry_precopy,
        // The baseline (`baseline_p99_ms`) is the last seconds of the
        // warm-up: the first second after connecting is left out.
        warmup: scenario::phases::BASELINE_WINDOW + Duration::from_secs(1),
        ..Options::new(&args.mode, args.mib, args.conns)?
    };
    let r = scenario::run(&opts)?;
    let s = r.source.as_ref();
    // When each side reached each point of the freeze, in ms after the pause
    // (both processes run on this host: one monotonic clock).
    let d = r.destination.as_ref();
    let paused = s.map(|s| s.paused_ns as f64);
    let at = |t: Option<f64>| t.zip(paused).map(|(t, p)| round((t - p) / 1e6, 2));
    let at_ns = |t: Option<u64>| at(t.map(|t| t as f64));
    // The migration's start, in ms after the pause (negative).
    let migration_start = at_ns(s.map(|s| s.started_ns)).unwrap_or(-20.0);
    let timeline = json!({
        "destination_frozen": at(r.destination_frozen_ns),
        "destination_handover": at_ns(d.and_then(|d| d.handover_ns)),
        "destination_last_page": at_ns(d.and_then(|d| d.last_page_ns)),
        "destination_ready": at_ns(d.and_then(|d| d.ready_ns)),
        "source_ready": at_ns(s.map(|s| s.ready_ns)),
        "source_commit": at_ns(s.map(|s| s.commit_ns)),
        "destination_resumed": at_ns(d.and_then(|d| d.resumed_ns)),
    });
    let mut figures = json!({
        "scenario": "migrate",
        "server": server.name(),
        "mib": args.mib,
        "conns": args.conns,
        "mode": args.mode,
        "dirty_mbps": args.dirty_mbps,
        "security": if args.tls {
            "tls"
        } else if args.plaintext_trusted_link {
            "none"
        } else {
            "psk"
        },
        "cipher": s.map(|s| &s.cipher),
        "freeze_ms": round(r.freeze_ms, 2),
        "client_stall_ms": round(r.client_stall_ms, 2),
        "client_p99_ms": round(r.client_p99_ms, 2),
        "conns_kept": r.load.conns_kept,
        "conns_broken": r.load.conns_broken,
        "requests_failed": r.load.requests_failed,
        "requests_ok": r.load.requests_ok,
        "bytes_sent": s.map(|s| s.bytes_sent),
        "rounds": s.map(|s| s.rounds),
        "verified": s.is_some_and(|s| s.verified) && d.is_some_and(|d| d.verified),
        "migrated": r.migrated,
        "error": r.error,
        // A failed attempt: the source aborted on its freeze bound, and
        // serves on (a migrated kvd serves at the destination only).
        "aborted_by_deadline": r.aborted_by_deadline,
        "source_serving": r.source_serving.unwrap_or(false),
        "max_freeze_ms": args.max_freeze_ms,
        "switched_to_postcopy": s.map(|s| s.switched_to_postcopy),
        "freeze_pages": s.map(|s| s.freeze_pages),
        "policy": s.map(|s| &s.policy),
        "freeze_steps_ms": s.map(|s| &s.freeze_steps_ms),
        "freeze_timeline_ms": timeline,
        // The slowest requests: [connection, sent (ms after the pause), latency ms].
        "slowest_requests": r.load.slowest.iter().map(|&(c, sent, lat)| {
            let sent = r.load.started.map(mono_ns).map(|z| z as f64 + sent * 1e6)
                .zip(paused).map(|(t, p)| round((t - p) / 1e6, 2));
            json!([c, sent, round(lat, 2)])
        }).collect::<Vec<_>>(),
        // Requests by when they were sent, in 10 ms buckets from the start
        // of the migration to 200 ms after the pause: [bucket start (ms
        // after the pause), slowest latency ms, requests].
        "latency_by_send_time": r.load.timeline.iter().filter_map(|&(at, max, n)| {
            let at = r.load.started.map(mono_ns).map(|z| z as f64 + at * 1e6)
                .zip(paused).map(|(t, p)| (t - p) / 1e6)?;
            (at >= migration_start - 10.0 && at < 200.0)
                .then(|| json!([round(at, 1), round(max, 2), n]))
        }).collect::<Vec<_>>(),
        "network_faults": d.map(|d| d.network_faults),
        "fault": args.fault,
        "attempts": r.attempts,
        "first_attempt_error": r.first_attempt_error,
        "first_attempt_source_serving": r.first_attempt_source_serving,
        "keys_checked": r.keys.map(|k| k.checked),
        "keys_wrong": r.keys.map(|k| k.wrong),
        "refused": r.refused,
        "first_client_error": r.load.first_error,
    });
    // `--queued-mib` (the json! macro's recursion limit stops short of one object).
    let queued = json!({
        // Bytes in the queues of the sockets the freeze captured.
        "queued_bytes": s.map(|s| s.queued_bytes),
        "queued_mib": args.queued_mib,
        "queued_rcvbuf": args.queued_rcvbuf,
        "queued_conns": r.queued.as_ref().map(|q| q.0),
        "queued_asked_bytes": r.queued.as_ref().map(|q| q.1),
        "queued_verified": r.queued.as_ref().map(|q| q.2.is_ok()),
        "queued_error": r.queued.as_ref().and_then(|q| q.2.as_ref().err()),
    });
    if let (Some(f), serde_json::Value::Object(q)) = (figures.as_object_mut(), queued) {
        f.extend(q);
    }
    // --cancel-at-pct: the operator's cancel mid-round (a second object:
    // `json!` recurses once per field).
    let cancel = json!({
        "cancel_at_pct": args.cancel_at_pct,
        "cancelled": r.cancelled,
        "cancel_ms": r.cancel_ms.map(|ms| round(ms, 2)),
        "cancel_answered_ms": r.cancel_answered_ms.map(|ms| round(ms, 2)),
        "cancelled_at_round": r.cancelled_at.map(|(round, _)| round),
        "cancelled_at_fraction": r.cancelled_at.map(|(_, f)| round(f, 3)),
        "bandwidth_mbps": args.bandwidth_mbps,
        "destination_keys": r.destination_keys,
    });
    if let (Some(all), serde_json::Value::Object(more)) = (figures.as_object_mut(), cancel) {
        all.extend(more);
    }
    // The clients' p99 per phase (issue 22 item 8): before the migration,
    // in the pre-copy rounds, from `Commit` to the last missing page.
    let p = r.phases;
    let phases = json!({
        "baseline_p99_ms": p.baseline_p99_ms.map(|ms| round(ms, 2)),
        "precopy_p99_ms": p.precopy_p99_ms.map(|ms| round(ms, 2)),
        "postcopy_p99_ms": p.postcopy_p99_ms.map(|ms| round(ms, 2)),
        // Pre-copy's p99 in round 0 and in the rounds after it.
        "precopy_first_p99_ms": p.precopy_first_p99_ms.map(|ms| round(ms, 2)),
        "precopy_later_p99_ms": p.precopy_later_p99_ms.map(|ms| round(ms, 2)),
        // kvd's own view: the time its loop's pass took, per request
        // answered, before the migration and in pre-copy.
        "kvd_baseline_p99_ms": s.and_then(|s| s.kvd_baseline_p99_ms),
        "kvd_precopy_p99_ms": s.and_then(|s| s.kvd_precopy_p99_ms),
    });
    if let (Some(all), serde_json::Value::Object(more)) = (figures.as_object_mut(), phases) {
        all.extend(more);
    }
    // The placement and dry-run experiments (`--split-cpus`, `--client-cpu`,
    // `--dry-precopy`).
    let experiments = json!({
        "split_cpus": args.split_cpus,
        "client_cpu": args.client_cpu,
        "loop_off_client_cpu": args.loop_off_client_cpu,
        "migration_cpu": args.migration_cpu,
        "dry_precopy_mbps": args.dry_precopy,
        "dry_baseline_p99_ms": r.attempt_p99_ms.and_then(|p| p.0).map(|ms| round(ms, 2)),
        "dry_p99_ms": r.attempt_p99_ms.and_then(|p| p.1).map(|ms| round(ms, 2)),
    });
    if let (Some(all), serde_json::Value::Object(more)) = (figures.as_object_mut(), experiments) {
        all.extend(more);
    }
    out.emit(&figures);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::Args,
    }

    #[test]
    fn queued_rcvbuf_defaults_to_the_4_kib_the_goal_is_judged_on() {
        let cli = Cli::try_parse_from(["migrate", "--queued-mib", "32"]).expect("parses");
        assert_eq!(cli.args.queued_rcvbuf, 4096);
        assert_eq!(cli.args.queued_mib, 32.0);
        let cli = Cli::try_parse_from(["migrate", "--queued-rcvbuf", "0"]).expect("parses");
        assert_eq!(cli.args.queued_rcvbuf, 0, "0: the kernel's default buffer");
    }

    #[test]
    fn placement_flags_parse_and_refuse_what_makes_no_sense() {
        let cli = Cli::try_parse_from(["migrate", "--client-cpu", "1", "--loop-off-client-cpu"])
            .expect("parses");
        assert_eq!(cli.args.client_cpu, Some(1));
        assert!(cli.args.loop_off_client_cpu);
        let cli = Cli::try_parse_from(["migrate", "--migration-cpu", "0"]).expect("parses");
        assert_eq!(
            (cli.args.client_cpu, cli.args.migration_cpu),
            (None, Some(0))
        );
        let cli = Cli::try_parse_from(["migrate"]).expect("parses");
        assert_eq!((cli.args.client_cpu, cli.args.migration_cpu), (None, None));
        assert!(!cli.args.split_cpus, "the default places nothing");
        for bad in [
            &["migrate", "--loop-off-client-cpu"][..],
            &["migrate", "--split-cpus", "--client-cpu", "1"],
            &["migrate", "--split-cpus", "--migration-cpu", "1"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
