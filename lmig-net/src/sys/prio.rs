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

/// `sched_setscheduler(tid, SCHED_OTHER)`: thread `tid` (0: the calling
/// thread) back in the normal class, e.g. from [`idle_thread_policy`].
/// Another process's thread, or an unprivileged caller beyond
/// `RLIMIT_NICE`, gets `EPERM`.
pub fn normal_thread_policy(tid: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in `idle_thread_policy`; `tid` is a plain integer.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's id (`gettid`), for [`normal_thread_policy`].
pub fn thread_id() -> i32 {
    // SAFETY: gettid takes no argument and cannot fail.
    unsafe { libc::gettid() }
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
        // Another thread puts an idle one back in the normal class (the
        // tests run as root; unprivileged, `RLIMIT_NICE` decides).
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let idle = std::thread::spawn(move || {
            idle_thread_policy().unwrap();
            tid_tx.send(thread_id()).unwrap();
            go_rx.recv().unwrap();
            // SAFETY: as above.
            unsafe { libc::sched_getscheduler(0) }
        });
        let tid = tid_rx.recv().unwrap();
        // SAFETY: `tid` is a live thread of this process (it waits for `go`).
        assert_eq!(unsafe { libc::sched_getscheduler(tid) }, libc::SCHED_IDLE);
        normal_thread_policy(tid).expect("root may move a thread out of SCHED_IDLE");
        go_tx.send(()).unwrap();
        assert_eq!(idle.join().unwrap(), libc::SCHED_OTHER);
        // The calling thread kept its own policy.
        // SAFETY: as above.
        assert_ne!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
    }
}
