//! `lmig-bench redis --mode precopy|postcopy|hybrid|none --mib M --dirty-mbps R`:
//! what an unmodified client feels. kvd migrates between two namespace
//! hosts exactly as in `lmig-bench migrate` (the same [`crate::scenario`]),
//! while `redis-benchmark -h <service> -p 6379 -c 1000 -n 2000000 -t
//! set,get,incr -P 1 -r 100000 --csv -e` runs in the client namespace; the
//! migration starts `--migrate-after-s` seconds into the benchmark, and
//! `--mode none` is the same run without it.
//!
//! Fields: `scenario`, `mode`, `tests` (per test: `rps`, `avg_ms`, `p50_ms`,
//! `p95_ms`, `p99_ms`, `max_ms`), `max_latency_ms` (over the tests),
//! `errors` (error replies redis-benchmark printed, `-e`, plus 1 if it
//! failed), `incr_exact` (the `counter:<12 digits>` keys redis-benchmark's
//! INCR test uses sum to the INCRs it sent: none lost, none applied twice),
//! `freeze_ms`, `migrated`, `verified`, and the migration's timeline in ms
//! after redis-benchmark started (`migration_at_ms`, `paused_at_ms`,
//! `resumed_at_ms`, `last_page_at_ms`, `complete_at_ms`, `benchmark_ms`);
//! with `--probe-conns`, `probe_migration_max_ms` is the probe's slowest
//! request sent from the pause to the last page (the migration's share of
//! a worst latency, apart from the host's own hiccups).
//!
//! redis-benchmark comes with redis-tools; without it the scenario says so
//! and fails (it is a benchmark, not part of the tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use lmig_net::topology::Topology;

use super::{Output, round};
use crate::common::clock::mono_ns;
use crate::kvd::resp::Reply;
use crate::scenario::{self, NO_MIGRATION, Options, external::External};

/// Keys loaded by default into 1 GiB (100-byte values), as `migrate`.
const DEFAULT_KEYS: u64 = 1_000_000;

/// The tests redis-benchmark runs (`-t`).
const TESTS: &str = "set,get,incr";

/// Options of the `redis` scenario.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// precopy, postcopy, hybrid or none (the same run without migrating).
    #[arg(long, default_value = "precopy")]
    pub mode: String,
    /// kvd's region size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// MB/s of memory kvd dirties in the background.
    #[arg(long, default_value_t = 100.0)]
    pub dirty_mbps: f64,
    /// Keys loaded before the benchmark (default: 1,000,000 in 1 GiB or
    /// more, as many in proportion in less).
    #[arg(long)]
    pub keys: Option<u64>,
    /// redis-benchmark's connections (`-c`).
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// redis-benchmark's requests per test (`-n`).
    #[arg(long, default_value_t = 2_000_000)]
    pub requests: u64,
    /// redis-benchmark's key space (`-r`).
    #[arg(long, default_value_t = 100_000)]
    pub keyspace: u64,
    /// Seconds from redis-benchmark's start to the migration's.
    #[arg(long, default_value_t = 3.0)]
    pub migrate_after_s: f64,
    /// Parallel data streams.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Connections of kvd's own load generator (`INCR`s checked one by
    /// one, each request timed) beside redis-benchmark, whose
    /// per-request latencies are not exposed: `probe_slowest`,
    /// `probe_latency_by_send_time` say when the slow requests were sent.
    /// 0 (the default): none.
    #[arg(long, default_value_t = 0)]
    pub probe_conns: usize,
    /// Requests per second over the probe's connections.
    #[arg(long, default_value_t = 500.0)]
    pub probe_rate: f64,
    /// The redis-benchmark program.
    #[arg(long, default_value = "redis-benchmark")]
    pub redis_benchmark: PathBuf,
}

/// One test's line of redis-benchmark's `--csv` output.
#[derive(Debug, Clone, PartialEq)]
pub struct TestFigures {
    /// `SET`, `GET`, `INCR`.
    pub name: String,
    /// Requests per second.
    pub rps: f64,
    /// Latencies, ms: mean, p50, p95, p99, max.
    pub avg_ms: f64,
    /// See `avg_ms`.
    pub p50_ms: f64,
    /// See `avg_ms`.
    pub p95_ms: f64,
    /// See `avg_ms`.
    pub p99_ms: f64,
    /// See `avg_ms`.
    pub max_ms: f64,
}

/// Parse redis-benchmark's `--csv` output: a header naming the columns
/// (`"test","rps","avg_latency_ms",...,"max_latency_ms"`), then one line per
/// test; other lines are skipped.
pub fn parse_csv(text: &str) -> Result<Vec<TestFigures>, String> {
    let fields = |line: &str| -> Vec<String> {
        line.split(',')
            .map(|f| f.trim().trim_matches('"').to_string())
            .collect()
    };
    let mut lines = text.lines().map(str::trim).filter(|l| l.starts_with('"'));
    let header = lines
        .next()
        .ok_or("redis-benchmark printed no CSV header")?;
    let header = fields(header);
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("redis-benchmark's CSV has no column {name:?}: {header:?}"))
    };
    let cols = [
        col("rps")?,
        col("avg_latency_ms")?,
        col("p50_latency_ms")?,
        col("p95_latency_ms")?,
        col("p99_latency_ms")?,
        col("max_latency_ms")?,
    ];
    let mut tests = Vec::new();
    for line in lines {
        let f = fields(line);
        let num = |i: usize| -> Result<f64, String> {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("redis-benchmark's CSV line {line:?}: column {i}"))
        };
        tests.push(TestFigures {
            name: f.first().cloned().unwrap_or_default(),
            rps: num(cols[0])?,
            avg_ms: num(cols[1])?,
            p50_ms: num(cols[2])?,
            p95_ms: num(cols[3])?,
            p99_ms: num(cols[4])?,
            max_ms: num(cols[5])?,
        });
    }
    Ok(tests)
}

/// Error replies redis-benchmark printed (`-e`) and the errors it ended
/// on (a connection the server closed or reset).
pub fn count_errors(stdout: &str, stderr: &str) -> u64 {
    stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.starts_with("Error") || l.contains("Error from server"))
        .count() as u64
}

/// redis-benchmark's INCR test's key number `n` (`counter:__rand_int__`,
/// the number written in 12 digits).
pub fn counter_key(n: u64) -> String {
    format!("counter:{n:012}")
}

/// Sum the values of the counters `0..keyspace` ([`counter_key`]; a missing
/// one counts 0), pipelined over one connection: `{"sum", "present"}`.
pub fn sum_counters(addr: SocketAddr, keyspace: u64) -> std::io::Result<Value> {
    let (mut sum, mut present) = (0u64, 0u64);
    crate::kvd::load::get_pipelined(addr, keyspace, counter_key, |n, reply| {
        match reply {
            Reply::Bulk(None) => {}
            Reply::Bulk(Some(v)) => {
                let v: u64 = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        std::io::Error::other(format!(
                            "{} holds {v:?}, not a count",
                            counter_key(n)
                        ))
                    })?;
                sum += v;
                present += 1;
            }
            other => {
                return Err(std::io::Error::other(format!(
                    "GET {}: {other:?}",
                    counter_key(n)
                )));
            }
        }
        Ok(())
    })?;
    Ok(json!({ "sum": sum, "present": present }))
}

/// redis-benchmark's arguments (`{host}`, `{port}`: the service's).
fn benchmark_args(args: &Args) -> Vec<String> {
    let mut a: Vec<String> = ["-h", "{host}", "-p", "{port}"].map(String::from).into();
    a.extend([
        "-c".into(),
        args.clients.to_string(),
        "-n".into(),
        args.requests.to_string(),
        "-t".into(),
        TESTS.into(),
        "-P".into(),
        "1".into(),
        "-r".into(),
        args.keyspace.to_string(),
        "--csv".into(),
        // Print error replies (counted in `errors`).
        "-e".into(),
    ]);
    a
}

/// Whether `program` runs at all (`--version`).
fn available(program: &PathBuf) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run the scenario.
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn std::error::Error>> {
    let modes = ["precopy", "postcopy", "hybrid", NO_MIGRATION];
    if !modes.contains(&args.mode.as_str()) {
        return Err(format!("--mode {}: precopy, postcopy, hybrid or none", args.mode).into());
    }
    if !available(&args.redis_benchmark) {
        return Err(format!(
            "{} is not installed (or does not run): install redis-tools \
             (apt-get install redis-tools) or name it with --redis-benchmark",
            args.redis_benchmark.display()
        )
        .into());
    }
    let keyspace = args.keyspace;
    let bench_args = benchmark_args(&args);
    let service = (
        Topology::SERVICE_V4.to_string(),
        scenario::SERVICE_PORT.to_string(),
    );
    let command = format!(
        "{} {}",
        args.redis_benchmark.display(),
        bench_args.join(" ")
    )
    .replace("{host}", &service.0)
    .replace("{port}", &service.1);
    let external = External::new(
        args.redis_benchmark.clone(),
        bench_args,
        Duration::from_secs(1800),
    )
    .with_check(Arc::new(move |addr| {
        sum_counters(addr, keyspace).map_err(|e| format!("reading the INCR counters back: {e}"))
    }));
    let opts = Options {
        rate: args.probe_rate,
        dirty_mbps: args.dirty_mbps,
        keys: args
            .keys
            .unwrap_or(DEFAULT_KEYS * args.mib.min(1024) / 1024),
        streams: args.streams,
        warmup: Duration::from_secs_f64(args.migrate_after_s.max(0.0)),
        after: Duration::ZERO,
        external: Some(external),
        ..Options::new(&args.mode, args.mib, args.probe_conns)?
    };
    let r = scenario::run(&opts)?;
    let x = r.external.as_ref().ok_or("redis-benchmark did not run")?;
    let tests = parse_csv(&x.stdout);
    let errors = count_errors(&x.stdout, &x.stderr) + u64::from(x.exit_code != Some(0));
    let (tests, parse_error) = match tests {
        Ok(t) => (t, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let incr = tests
        .iter()
        .find(|t| t.name == "INCR")
        .map(|_| args.requests);
    let counters = x.check.clone().transpose();
    let counted = counters.as_ref().ok().and_then(Option::as_ref);
    let incr_sum = counted.and_then(|c| c["sum"].as_u64());
    let max_latency_ms = tests
        .iter()
        .map(|t| t.max_ms)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let s = r.source.as_ref();
    let d = r.destination.as_ref();
    // In ms after redis-benchmark started (one monotonic clock on this host).
    let at = |ns: Option<u64>| ns.map(|ns| round((ns as f64 - x.started_ns as f64) / 1e6, 1));
    let per_test: serde_json::Map<String, Value> = tests
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                json!({
                    "rps": t.rps,
                    "avg_ms": t.avg_ms,
                    "p50_ms": t.p50_ms,
                    "p95_ms": t.p95_ms,
                    "p99_ms": t.p99_ms,
                    "max_ms": t.max_ms,
                }),
            )
        })
        .collect();
    let migrating = args.mode != NO_MIGRATION;
    let figures = json!({
        "scenario": "redis",
        "mode": args.mode,
        "mib": args.mib,
        "dirty_mbps": args.dirty_mbps,
        "command": command,
        "tests": per_test,
        "max_latency_ms": max_latency_ms,
        "errors": errors,
        "incr_exact": incr.zip(incr_sum).map(|(sent, sum)| sent == sum),
        "incrs_sent": incr,
        "incr_sum": incr_sum,
        "counters_present": counted.and_then(|c| c["present"].as_u64()),
        "freeze_ms": migrating.then(|| round(r.freeze_ms, 2)),
        "migrated": r.migrated,
        "verified": migrating.then(|| s.is_some_and(|s| s.verified) && d.is_some_and(|d| d.verified)),
        "error": if migrating { r.error.clone() } else { None },
        "rounds": s.map(|s| s.rounds),
        "bytes_sent": s.map(|s| s.bytes_sent),
        "switched_to_postcopy": s.map(|s| s.switched_to_postcopy),
        "postcopy_pages": d.map(|d| d.postcopy_pages),
        "freeze_steps_ms": s.map(|s| &s.freeze_steps_ms),
        "migration_at_ms": at(s.map(|s| s.started_ns)),
        "paused_at_ms": at(s.map(|s| s.paused_ns)),
        "resumed_at_ms": at(d.and_then(|d| d.resumed_ns)),
        "last_page_at_ms": at(d.and_then(|d| d.last_page_ns)),
        "complete_at_ms": at(d.and_then(|d| d.complete_ns)),
        "benchmark_ms": at(Some(x.ended_ns)),
        "exit_code": x.exit_code,
        "benchmark_error": parse_error.or_else(|| {
            (x.exit_code != Some(0)).then(|| x.stderr.lines().last().unwrap_or("").to_string())
        }),
        "counters_error": counters.err(),
        "keys_checked": r.keys.map(|k| k.checked),
        "keys_wrong": r.keys.map(|k| k.wrong),
    });
    // The probe's view, in ms after redis-benchmark started (a second
    // object: `json!` recurses once per field).
    let zero = r
        .load
        .started
        .map(mono_ns)
        .map(|z| z as f64 - x.started_ns as f64);
    let after_start = |ms: f64| zero.map(|z| round((z + ms * 1e6) / 1e6, 1));
    // The probe's slowest request sent from the pause until every page was
    // here (post-copy's wave included), in ms after redis-benchmark started.
    let window = (
        at(s.map(|s| s.paused_ns)),
        at(d.and_then(|d| d.complete_ns.or(d.resumed_ns))),
    );
    let in_migration = match window {
        (Some(from), Some(to)) if args.probe_conns > 0 => Some(
            r.load
                .timeline
                .iter()
                .filter(|&&(b, _, _)| {
                    // A 10 ms bucket that overlaps the window.
                    after_start(b).is_some_and(|b| b + 10.0 > from && b <= to)
                })
                .map(|&(_, max, _)| max)
                .fold(0.0, f64::max),
        ),
        _ => None,
    };
    let probe = json!({
        "started_ns": x.started_ns,
        "probe_conns": args.probe_conns,
        "probe_max_ms": (args.probe_conns > 0).then(|| round(r.load.max_latency_ms, 2)),
        "probe_p99_ms": (args.probe_conns > 0).then(|| round(r.load.p99_latency_ms, 2)),
        // The slowest probe request sent from the pause to the last page.
        "probe_migration_max_ms": in_migration.map(|m| round(m, 2)),
        "probe_failed": (args.probe_conns > 0).then_some(r.load.requests_failed),
        "probe_broken": (args.probe_conns > 0).then_some(r.load.conns_broken),
        // [sent (ms after redis-benchmark started), latency ms].
        "probe_slowest": r.load.slowest.iter()
            .map(|&(_, sent, lat)| json!([after_start(sent), round(lat, 2)]))
            .collect::<Vec<_>>(),
        // [bucket start (ms after redis-benchmark started), slowest ms,
        // requests], 10 ms buckets, the ones whose slowest took over 20 ms.
        "probe_latency_by_send_time": r.load.timeline.iter()
            .filter(|&&(_, max, _)| max > 20.0)
            .map(|&(at, max, n)| json!([after_start(at), round(max, 2), n]))
            .collect::<Vec<_>>(),
    });
    let mut figures = figures;
    if let (Some(all), Value::Object(more)) = (figures.as_object_mut(), probe) {
        all.extend(more);
    }
    out.emit(&figures);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_of_redis_benchmark_7_is_read_by_column_name() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
                    \"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"SET\",\"65061.79\",\"7.615\",\"1.040\",\"7.423\",\"9.871\",\"11.431\",\"23.807\"\n\
                    \"INCR\",\"70000.00\",\"7.000\",\"1.000\",\"6.500\",\"9.000\",\"10.000\",\"153.100\"\n";
        let t = parse_csv(text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "SET");
        assert_eq!(t[0].rps, 65061.79);
        assert_eq!(t[0].p50_ms, 7.423);
        assert_eq!(t[0].p99_ms, 11.431);
        assert_eq!(t[0].max_ms, 23.807);
        assert_eq!(t[1].name, "INCR");
        assert_eq!(t[1].max_ms, 153.1);
    }

    #[test]
    fn csv_without_a_latency_column_is_refused() {
        let e = parse_csv("\"test\",\"rps\"\n\"SET\",\"1.0\"\n").unwrap_err();
        assert!(e.contains("avg_latency_ms"), "{e}");
        assert!(parse_csv("WARNING: Could not fetch server CONFIG\n").is_err());
    }

    #[test]
    fn errors_are_error_replies_and_fatal_lines() {
        let out = "Error from server: ERR unknown command\n\"SET\",\"1\"\n";
        let err = "WARNING: Could not fetch server CONFIG\nError: Connection reset by peer\n";
        assert_eq!(count_errors(out, err), 2);
        assert_eq!(count_errors("\"SET\",\"1\"\n", "WARNING: x\n"), 0);
    }

    #[test]
    fn counters_are_named_as_redis_benchmark_names_them() {
        assert_eq!(counter_key(0), "counter:000000000000");
        assert_eq!(counter_key(99_999), "counter:000000099999");
    }
}
