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

/// `sched_setscheduler(0, SCHED_IDLE)`: the calling thread runs only on a
/// CPU that nothing else wants (Linux scheduling policies are per thread).
/// Unlike nice 19, which still takes its turn at a CPU (for a whole slice on
/// a non-preemptible kernel), a `SCHED_IDLE` thread gives the CPU up as soon
/// as any other thread wakes there. Only for work that holds nothing other
/// threads wait for (else they wait on it while it is starved).
#[doc(alias = "sched_setscheduler")]
pub fn idle_thread_policy() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised `sched_param` that outlives the
    // call; pid 0 is the calling thread; the kernel only reads it.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_policy_thread_reports_sched_idle() {
        let policy = std::thread::spawn(|| {
            idle_thread_policy().expect("SCHED_IDLE needs no privilege");
            // SAFETY: no arguments but the calling thread's id (0).
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_IDLE);
        // The calling thread kept its own policy.
        // SAFETY: as above.
        assert_ne!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
    }
}
