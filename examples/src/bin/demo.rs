//! The lmig demo: kvd, a Redis-protocol server holding its data in a 1 GiB
//! lmig region, serves 1000 busy client connections on host A and migrates
//! itself live to host B; the report shows the freeze, what the clients saw,
//! and a timeline picture. Needs root (it builds network namespaces).

use std::path::PathBuf;

use clap::Parser;
use lmig_examples::scenario::{self, Options};

#[derive(Parser, Debug)]
#[command(
    name = "demo",
    about = "Live-migrate a key-value server with 1000 busy clients between two hosts"
)]
struct Args {
    /// Region size in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Client connections.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Requests per second over all client connections.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// precopy, postcopy or hybrid.
    #[arg(long, default_value = "precopy")]
    mode: String,
    /// MB/s of memory kvd dirties in the background while it migrates.
    #[arg(long, default_value_t = 100.0)]
    dirty_mbps: f64,
    /// Keys loaded before the migration (default: a million, or half of
    /// what the region holds when it is smaller).
    #[arg(long)]
    keys: Option<u64>,
    /// Where to write the timeline picture.
    #[arg(long, default_value = "lmig-demo-timeline.svg")]
    svg: PathBuf,
}

fn main() {
    // The demo starts kvd by running itself with `kvd` as the first argument.
    if std::env::args().nth(1).as_deref() == Some("kvd") {
        let args = lmig_examples::kvd::cli::Args::parse_from(std::env::args().skip(1));
        lmig_examples::kvd::cli::main_with(args);
        return;
    }
    let args = Args::parse();
    let keys = args.keys.unwrap_or_else(|| {
        let region = usize::try_from(args.mib << 20).unwrap_or(usize::MAX);
        (lmig_examples::kvd::store::Store::capacity_of(region) / 2).min(1_000_000)
    });
    let opts = Options {
        rate: args.rate,
        dirty_mbps: args.dirty_mbps,
        keys,
        progress: true,
        svg: Some(args.svg.clone()),
        ..Options::new(&args.mode, args.mib, args.conns).expect("own executable")
    };
    println!(
        "lmig demo: kvd ({} MiB region, {} keys) on host A, {} client connections, {} migration to host B",
        args.mib, keys, args.conns, args.mode
    );
    match scenario::run(&opts) {
        Ok(r) => {
            let s = r.source.clone().unwrap_or_default();
            let d = r.destination.clone().unwrap_or_default();
            println!();
            if r.migrated {
                println!("migrated A -> B ({} mode)", s.mode);
            } else {
                println!(
                    "migration FAILED: {}; kvd kept serving on A",
                    r.error.as_deref().unwrap_or("?")
                );
            }
            println!("  freeze                {:>10.2} ms", r.freeze_ms);
            println!("  client stall (max)    {:>10.2} ms", r.client_stall_ms);
            println!("  client latency p99    {:>10.2} ms", r.client_p99_ms);
            println!("  connections kept      {:>10}", r.load.conns_kept);
            println!("  connections broken    {:>10}", r.load.conns_broken);
            println!("  requests answered     {:>10}", r.load.requests_ok);
            println!("  requests failed       {:>10}", r.load.requests_failed);
            println!("  bytes sent            {:>10}", s.bytes_sent);
            println!("  pre-copy rounds       {:>10}", s.rounds);
            println!("  memory verified       {:>10}", s.verified && d.verified);
            if let Some(e) = &r.load.first_error {
                println!("  first client error: {e}");
            }
            if std::env::var_os("LMIG_DEMO_DEBUG").is_some() {
                let p = s.paused_ns as f64;
                let ms = |t: Option<u64>| t.map(|x| (x as f64 - p) / 1e6);
                println!(
                    "  phases after pause (ms): handover {:?}, last page {:?}, ready(dst) {:?}, ready(src) {:?}, commit {:?}, resumed {:?}",
                    ms(d.handover_ns),
                    ms(d.last_page_ns),
                    ms(d.ready_ns),
                    ms(Some(s.ready_ns)),
                    ms(Some(s.commit_ns)),
                    ms(d.resumed_ns)
                );
                println!(
                    "  slowest requests (conn, sent ms, latency ms): {:?}",
                    r.load.slowest
                );
                if let Some(t0) = r.load.started {
                    let zero = lmig_examples::common::clock::mono_ns(t0) as f64;
                    let at = |t: Option<u64>| t.map(|x| (x as f64 - zero) / 1e6);
                    println!(
                        "  on the load's clock (ms): migration start {:?}, pause {:?}, resumed {:?}",
                        at(Some(s.started_ns)),
                        at(Some(s.paused_ns)),
                        at(d.resumed_ns)
                    );
                }
                println!("  source: {s:?}");
                println!("  destination: {d:?}");
            }
            if let Some(svg) = &r.svg {
                println!("  timeline: {}", svg.display());
            }
            if !r.migrated || r.load.conns_broken > 0 || r.load.requests_failed > 0 {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("demo: {e}");
            std::process::exit(1);
        }
    }
}
