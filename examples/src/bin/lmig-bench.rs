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
}

fn main() {
    let cli = Cli::parse();
    let out = Output { json: cli.json };
    let result: Result<(), Box<dyn std::error::Error>> = match cli.scenario {};
    if let Err(e) = result {
        eprintln!("lmig-bench: {e}");
        std::process::exit(1);
    }
}
