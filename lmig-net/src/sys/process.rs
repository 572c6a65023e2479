//! Processes and threads: another process's fds (`pidfd`), the fd limit,
//! a thread's CPU time.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// `pidfd_open(pid, 0)` (Linux >= 5.3).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall, no pointers.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// `pidfd_getfd(pidfd, targetfd, 0)` (Linux >= 5.6): a duplicate of another
/// process's fd (needs `PTRACE_MODE_ATTACH_REALCREDS` over it).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; `target` names an fd in the other process, not ours.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd in our table that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// How many more fds this process may open now: `RLIMIT_NOFILE`'s soft
/// limit less the fds open (counted in `/proc/self/fd`, a few ms for
/// 10,000). `None` when either cannot be read.
#[doc(alias = "getrlimit")]
pub fn fd_room() -> Option<u64> {
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    // The directory's own fd is counted too: one more than open after.
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(soft.saturating_sub(open))
}

/// Raise `RLIMIT_NOFILE`'s soft limit to its hard limit; returns the new limit.
#[doc(alias = "setrlimit")]
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}

/// `clock_gettime(CLOCK_THREAD_CPUTIME_ID)`: CPU time of the calling thread
/// (precise, unlike `/proc` figures updated at scheduler ticks); for benchmarks.
#[doc(alias = "clock_gettime")]
#[cfg(feature = "bench-internals")]
pub fn thread_cpu_time() -> io::Result<std::time::Duration> {
    use nix::time::{ClockId, clock_gettime};
    let ts = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)?;
    Ok(std::time::Duration::new(
        ts.tv_sec() as u64,
        ts.tv_nsec() as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_fd_through_a_pidfd() {
        let pidfd = pidfd_open(std::process::id() as i32).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dup = pidfd_getfd(std::os::fd::AsFd::as_fd(&pidfd), l.as_raw_fd()).unwrap();
        let dup = std::net::TcpListener::from(dup);
        assert_eq!(dup.local_addr().unwrap(), l.local_addr().unwrap());
    }

    #[test]
    fn nofile_limit_and_thread_time() {
        let n = raise_nofile_limit().unwrap();
        let room = fd_room().unwrap();
        assert!(room > 0 && room < n, "{room} of {n}");
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap().0, n);
        let a = thread_cpu_time().unwrap();
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(thread_cpu_time().unwrap() > a);
    }
}
