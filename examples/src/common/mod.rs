//! What several programs of this crate share: child processes, keys, one
//! clock across processes, statistics. kvd, the demo, the page host and the
//! benchmark all build on it; none of them imports another's module for it.

pub mod clock;
pub mod keys;
pub mod netstat;
pub mod probe;
pub mod process;
pub mod stats;
