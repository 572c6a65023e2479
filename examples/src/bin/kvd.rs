//! `kvd`: a key-value server speaking a Redis protocol subset whose data
//! lives in an lmig region and which migrates itself live to another host.
//! See [`lmig_examples::kvd::cli`].

use clap::Parser;

fn main() {
    lmig_examples::kvd::cli::main_with(lmig_examples::kvd::cli::Args::parse());
}
