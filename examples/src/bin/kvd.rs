//! `kvd`: a key-value server speaking a Redis protocol subset whose data
//! lives in an lmig region and which migrates itself live to another host.
//! See [`lmig_examples::kvd::cli`]; `kvd check` probes the machine
//! ([`lmig_examples::kvd::check`]).
//!
//! The library's log (features `tracing` of the lmig crates: phases,
//! policy decisions, freeze steps, reconnections, warnings) goes to stderr,
//! filtered by `RUST_LOG` (default `warn`; e.g. `RUST_LOG=lmig_core=debug`).
//! The JSON event lines on stdout are unchanged by it.

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // `kvd check`: what this machine offers, as `criu check` tells it.
    if std::env::args().nth(1).as_deref() == Some("check") {
        std::process::exit(lmig_examples::kvd::check::run());
    }
    lmig_examples::kvd::cli::main_with(lmig_examples::kvd::cli::Args::parse());
}
