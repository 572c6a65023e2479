//! `probe`: the machine's kernel probe (no figures): one object with
//! `capabilities` (each `capability`, `status`, `detail`, `fix`) and
//! `all_ok`; as a table without `--json`. Benchmarks started from a JSON
//! pipeline can record with it what the machine offered.

use std::error::Error;

use clap::Args as ClapArgs;

use super::Output;
use crate::common::probe::{machine, to_json};

/// Options of the `probe` scenario (none).
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {}

/// Run the probe and print its verdicts.
pub fn run(_args: Args, out: Output) -> Result<(), Box<dyn Error>> {
    let report = machine();
    if out.json {
        out.emit(&to_json(&report));
    } else {
        print!("{report}");
    }
    Ok(())
}
