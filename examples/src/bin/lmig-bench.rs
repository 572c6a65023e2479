//! `lmig-bench <scenario> [options] [--json]`: lmig's benchmark.
//!
//! Prints one JSON object per line with `--json`, else a table. Scenarios
//! that need two processes re-execute this binary with a hidden peer command.

use clap::{Parser, Subcommand};
use lmig_examples::bench::Output;

#[derive(Parser)]
#[command(name = "lmig-bench", about = "lmig benchmark scenarios")]
struct Cli {
    /// Print one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    // Scenarios are added here, one variant each, by the issues that define them.
    /// TCP connection migration at scale (capture, pipelined restore, verification).
    Tcp(lmig_examples::bench::tcp::Args),
    /// Network lock, held packets and address handoff while clients keep sending.
    Handoff(lmig_examples::bench::handoff::Args),
    /// kvd with N busy clients migrating between two hosts (the demo as a benchmark).
    Migrate(lmig_examples::bench::migrate::Args),
    /// redis-benchmark (unmodified) against kvd while it migrates.
    Redis(lmig_examples::bench::redis::Args),
    /// Pre-copy (or hybrid/post-copy) migration of a region with a writer dirtying it.
    Precopy(lmig_examples::bench::precopy::Args),
    /// Post-copy: the destination program touches its memory as soon as it resumes.
    Postcopy(lmig_examples::bench::postcopy::Args),
    /// Encode and decode of 4 KiB page frames against memcpy.
    Wire(lmig_examples::bench::wire::Args),
    /// Pages between two processes over loopback TCP through the authenticated channel.
    Transfer(lmig_examples::bench::transfer::Args),
    /// Split memory: remote paging, partial migration and reintegration across page hosts.
    Split(lmig_examples::bench::split::Args),
    /// A genuine dialer's handshake while the listener holds a flood of idle and hostile connections.
    Hostile(lmig_examples::bench::hostile::Args),
    /// The kernel probe: which capabilities this machine offers (as `kvd check`).
    Probe(lmig_examples::bench::probe::Args),
    /// A KVM micro-VMM's running guest migrating between two VMM processes on namespace hosts.
    Vm(lmig_examples::bench::vm::Args),
    /// One VMM process of `vm` (started by it).
    #[command(hide = true)]
    VmPeer(lmig_examples::bench::vm::PeerArgs),
    /// A migration broken at every protocol step (break, stall, duplicate, corrupt, truncate).
    Faults(lmig_examples::bench::faults::Args),
    /// One side of a `faults` kill point (started by it).
    #[command(hide = true)]
    FaultsPeer(lmig_examples::bench::faults::kill::PeerArgs),
    /// The destination process of `transfer` (started by it).
    #[command(hide = true)]
    TransferPeer(lmig_examples::bench::transfer::PeerArgs),
}

fn main() {
    // Scenarios start kvd by running this binary with `kvd` as the first argument.
    if std::env::args().nth(1).as_deref() == Some("kvd") {
        use clap::Parser as _;
        // The library's log, as the kvd binary gives it, when asked for
        // (`RUST_LOG`), stamped with CLOCK_MONOTONIC ns (the clock of the
        // migration reports and of `LMIG_KVD_STALL_MS`).
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_timer(MonoNs)
                .init();
        }
        let args = lmig_examples::kvd::cli::Args::parse_from(std::env::args().skip(1));
        lmig_examples::kvd::cli::main_with(args);
        return;
    }
    // ... and tokiod (`migrate --server tokio`) with `tokiod`.
    if std::env::args().nth(1).as_deref() == Some("tokiod") {
        use clap::Parser as _;
        let args = lmig_examples::tokiod::cli::Args::parse_from(std::env::args().skip(1));
        lmig_examples::tokiod::cli::main_with(args);
        return;
    }
    let cli = Cli::parse();
    let out = Output { json: cli.json };
    let result: Result<(), Box<dyn std::error::Error>> = match cli.scenario {
        Scenario::Tcp(a) => lmig_examples::bench::tcp::run(a, out),
        Scenario::Handoff(a) => lmig_examples::bench::handoff::run(a, out),
        Scenario::Precopy(a) => lmig_examples::bench::precopy::run(a, out),
        Scenario::Postcopy(a) => lmig_examples::bench::postcopy::run(a, out),
        Scenario::Migrate(a) => lmig_examples::bench::migrate::run(a, out),
        Scenario::Redis(a) => lmig_examples::bench::redis::run(a, out),
        Scenario::Wire(a) => lmig_examples::bench::wire::run(a, out),
        Scenario::Transfer(a) => lmig_examples::bench::transfer::run(a, out),
        Scenario::Split(a) => lmig_examples::bench::split::run(a, out),
        Scenario::Hostile(a) => lmig_examples::bench::hostile::run(a, out),
        Scenario::Probe(a) => lmig_examples::bench::probe::run(a, out),
        Scenario::Vm(a) => lmig_examples::bench::vm::run(a, out),
        Scenario::VmPeer(a) => lmig_examples::bench::vm::peer(a),
        Scenario::Faults(a) => lmig_examples::bench::faults::run(a, out),
        Scenario::FaultsPeer(a) => lmig_examples::bench::faults::kill::peer(a),
        Scenario::TransferPeer(a) => lmig_examples::bench::transfer::peer(a),
    };
    if let Err(e) = result {
        eprintln!("lmig-bench: {e}");
        std::process::exit(1);
    }
}

/// Log timestamps as CLOCK_MONOTONIC nanoseconds.
struct MonoNs;

impl tracing_subscriber::fmt::time::FormatTime for MonoNs {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{}", lmig_examples::common::clock::now_mono_ns())
    }
}
