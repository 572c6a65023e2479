//! Thread CPU priority.

use std::io;

/// `setpriority(PRIO_PROCESS, 0, 19)`: the calling thread gets the lowest CPU
/// priority (Linux nice values are per thread).
#[doc(alias = "setpriority")]
pub fn lowest_thread_priority() -> io::Result<()> {
    // SAFETY: setpriority takes plain integers; `who` 0 is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
