//! The crate's log: lmig-core's macros (see `lmig_core`'s `log` module)
//! under the names the code uses, in scope in the whole crate: the crate
//! root declares this module first with `#[macro_use]` (`warn` cannot be
//! imported by `use`: it is also a built-in attribute). With the feature
//! `tracing` (which turns on lmig-core's) they forward to `tracing`;
//! without it they compile to nothing.

#![allow(unused_macros)]

macro_rules! debug { ($($t:tt)*) => { ::lmig_core::__lmig_debug!($($t)*) }; }
macro_rules! info { ($($t:tt)*) => { ::lmig_core::__lmig_info!($($t)*) }; }
macro_rules! warn { ($($t:tt)*) => { ::lmig_core::__lmig_warn!($($t)*) }; }
macro_rules! error { ($($t:tt)*) => { ::lmig_core::__lmig_error!($($t)*) }; }
macro_rules! phase_span { ($($t:tt)*) => { ::lmig_core::__lmig_phase_span!($($t)*) }; }
