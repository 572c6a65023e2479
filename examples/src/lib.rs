//! Shared helpers of the lmig demos and the `lmig-bench` benchmark.
//!
//! Everything here uses lmig's public API only, as a program linking lmig would.

pub mod bench;
pub mod common;
pub mod figures;
pub mod fuzzing;
pub mod kvd;
pub mod pagehost;
pub mod scenario;
pub mod tokiod;
pub mod vmm;
