//! Measurement for benchmarks (feature `bench-internals`): when this
//! process's fault-path threads read the pages asked for — on the source,
//! the request server reading a requested run right after the request
//! arrived.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::Instant;

use lmig_core::model::PageRun;

use super::lock;

/// Most reads remembered.
const MAX_SERVED_READS: usize = 1 << 20;

thread_local! {
    /// This thread is on the fault path (it called `urgent_thread`).
    static ON_FAULT_PATH: Cell<bool> = const { Cell::new(false) };
}

static SERVED: Mutex<Vec<ServedRead>> = Mutex::new(Vec::new());

/// One run a fault-path thread of this process read (feature `bench-internals`).
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub struct ServedRead {
    /// The run read.
    pub run: PageRun,
    /// When the read began.
    pub read_at: Instant,
}

/// The calling thread is on the fault path.
pub(crate) fn mark_fault_path_thread() {
    ON_FAULT_PATH.with(|on| on.set(true));
}

/// A run is being read for a migration: remembered when the calling thread
/// is on the fault path.
pub(crate) fn note_read(run: &PageRun) {
    if ON_FAULT_PATH.with(Cell::get) {
        let mut served = lock(&SERVED);
        if served.len() < MAX_SERVED_READS {
            served.push(ServedRead {
                run: *run,
                read_at: Instant::now(),
            });
        }
    }
}

/// The runs this process's fault-path threads read so far (the source's
/// request server: one per request answered, and per page sent again),
/// taken: the next call returns the later ones.
pub fn take_served_reads() -> Vec<ServedRead> {
    std::mem::take(&mut *lock(&SERVED))
}
