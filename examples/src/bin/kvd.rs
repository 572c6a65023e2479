//! `kvd`: a key-value server speaking a Redis protocol subset whose data
//! lives in an lmig region and which migrates itself live to another host.
//! See [`lmig_examples::kvd::cli`]; `kvd check` probes the machine
//! ([`lmig_examples::kvd::check`]).

use clap::Parser;

fn main() {
    // `kvd check`: what this machine offers, as `criu check` tells it.
    if std::env::args().nth(1).as_deref() == Some("check") {
        std::process::exit(lmig_examples::kvd::check::run());
    }
    lmig_examples::kvd::cli::main_with(lmig_examples::kvd::cli::Args::parse());
}
