//! The scenarios of `lmig-bench`. Each module has an `Args` (clap) and a
//! `run(args, out)` that reports figures through [`Output`].
//!
//! The scenario names, options and JSON field names are a contract (see the
//! issues): keep them, add fields freely.

use std::io::Write;

pub mod cut_proxy;
pub mod faults;
pub mod handoff;
pub mod hostile;
pub mod migrate;
pub mod postcopy;
pub mod postcopy_loss;
mod postcopy_rtt;
mod postcopy_trace;
pub mod precopy;
pub mod probe;
pub mod redis;
pub mod split;
pub mod tcp;
pub mod transfer;
pub mod vm;
pub mod wire;

/// Where a scenario's figures go: one JSON object per line (`--json`) or a
/// table for people.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    /// Print JSON lines instead of a table.
    pub json: bool,
}

impl Output {
    /// Report one result object.
    pub fn emit(&self, obj: &serde_json::Value) {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        if self.json {
            let _ = writeln!(out, "{obj}");
        } else if let Some(map) = obj.as_object() {
            let width = map.keys().map(String::len).max().unwrap_or(0);
            for (k, v) in map {
                let _ = writeln!(out, "{k:>width$}  {v}");
            }
            let _ = writeln!(out);
        }
        let _ = out.flush();
    }
}

/// Write `bytes` of fresh memory and free it again, so that what a
/// benchmark times next takes pages the guest used a moment ago, whichever
/// phase ran before it. On this kind of machine memory the guest handed
/// back to the hypervisor (free page reporting) costs ~12 µs a page at its
/// next first touch, against ~1.7 µs once used: of two phases compared, the
/// first to run would otherwise pay that alone.
pub fn warm_free_memory(bytes: usize) {
    let mut v: Vec<u8> = Vec::with_capacity(bytes);
    v.resize(bytes, 1);
    std::hint::black_box(&v);
}

pub use crate::common::stats::round;
