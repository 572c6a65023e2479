//! `tokiod`: a key-value service on a tokio runtime whose data lives in an
//! lmig region and which migrates itself live to another host, restoring
//! its connections into the runtime at `Commit`. See
//! [`lmig_examples::tokiod::cli`].

use clap::Parser;

fn main() {
    lmig_examples::tokiod::cli::main_with(lmig_examples::tokiod::cli::Args::parse());
}
