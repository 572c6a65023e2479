//! userfaultfd: open, `UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_UNREGISTER`,
//! `UFFDIO_WRITEPROTECT`. The structs and numbers are those of
//! `<linux/userfaultfd.h>` of Linux 6.7+, defined here because the
//! `userfaultfd` crate and older system headers lack the async write-protect
//! features.
//!
//! Post-copy adds `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`,
//! `UFFDIO_WAKE`, MISSING / MINOR registration and reading fault messages;
//! one uffd per purpose, since a range can only be registered with one
//! userfaultfd at a time.

use std::fs::OpenOptions;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{IOC_READ, IOC_WRITE, ioc, ioctl_ptr};

/// `UFFD_API`.
pub(crate) const UFFD_API: u64 = 0xAA;
/// `UFFD_USER_MODE_ONLY`: only faults taken in user mode are handled.
pub(crate) const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect on shmem / hugetlbfs.
pub(crate) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect also marks unpopulated ptes.
pub(crate) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: write faults on protected pages are resolved by
/// the kernel, which records the page as written (read by `PAGEMAP_SCAN`).
pub(crate) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFDIO_REGISTER_MODE_WP`.
pub(crate) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default, Debug)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
const _: () = assert!(size_of::<UffdioApi>() == 24);

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
const _: () = assert!(size_of::<UffdioRange>() == 16);

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default, Debug)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
const _: () = assert!(size_of::<UffdioRegister>() == 32);

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default, Debug)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);

const UFFDIO: u8 = 0xAA;
pub(crate) const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
pub(crate) const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    size_of::<UffdioRegister>(),
);
pub(crate) const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>());
pub(crate) const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    size_of::<UffdioWriteprotect>(),
);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1).
const USERFAULTFD_IOC_NEW: u64 = ioc(0, UFFDIO, 0x00, 0);

/// How a userfaultfd was obtained.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UffdOrigin {
    /// `userfaultfd(2)` with kernel-mode faults (privileged, or
    /// `vm.unprivileged_userfaultfd = 1`).
    Syscall,
    /// `ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)` (access to the device node).
    DevNode,
    /// `userfaultfd(UFFD_USER_MODE_ONLY)`: unprivileged, user-mode faults only.
    UserModeOnly,
}

/// `userfaultfd(O_CLOEXEC | O_NONBLOCK | extra)`.
pub(crate) fn userfaultfd(extra: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: the userfaultfd syscall takes one int of flags and returns a
    // new fd or -1; no memory is passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | extra,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK)`.
pub(crate) fn userfaultfd_dev() -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags as the integer argument
    // (no pointer) and returns a new fd.
    let fd = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW as libc::c_ulong,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open a userfaultfd the best way this process may: the syscall, then
/// `/dev/userfaultfd`, then `UFFD_USER_MODE_ONLY`. Returns the last error
/// when every way fails.
pub(crate) fn open_best() -> io::Result<(OwnedFd, UffdOrigin)> {
    match userfaultfd(0) {
        Ok(fd) => return Ok((fd, UffdOrigin::Syscall)),
        Err(e) if e.raw_os_error() != Some(libc::EPERM) => return Err(e),
        Err(_) => {}
    }
    if let Ok(fd) = userfaultfd_dev() {
        return Ok((fd, UffdOrigin::DevNode));
    }
    userfaultfd(UFFD_USER_MODE_ONLY).map(|fd| (fd, UffdOrigin::UserModeOnly))
}

/// `UFFDIO_API`: enable `features`; returns (features the kernel offers, ioctls).
/// A failed call leaves the fd uninitialised, so it may be retried.
#[doc(alias = "UFFDIO_API")]
pub(crate) fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<(u64, u64)> {
    let mut a = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api *`, which `a` is.
    unsafe { ioctl_ptr(fd, UFFDIO_API, &mut a)? };
    Ok((a.features, a.ioctls))
}

/// `UFFDIO_REGISTER` of `[start, start + len)` in `mode`; returns the ioctls
/// allowed on the range.
#[doc(alias = "UFFDIO_REGISTER")]
pub(crate) fn register(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut r = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register *`. Registering
    // a range changes how faults in it are handled, never its contents; with
    // WP_ASYNC no fault ever waits for us.
    unsafe { ioctl_ptr(fd, UFFDIO_REGISTER, &mut r)? };
    Ok(r.ioctls)
}

/// `UFFDIO_UNREGISTER` of `[start, start + len)` (also drops write protection).
#[doc(alias = "UFFDIO_UNREGISTER")]
pub(crate) fn unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range *`.
    unsafe { ioctl_ptr(fd, UFFDIO_UNREGISTER, &mut r)? };
    Ok(())
}

/// `UFFDIO_WRITEPROTECT` of `[start, start + len)`: set (`wp`) or clear protection.
#[doc(alias = "UFFDIO_WRITEPROTECT")]
pub(crate) fn writeprotect(fd: BorrowedFd<'_>, start: u64, len: u64, wp: bool) -> io::Result<()> {
    let mut w = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
    };
    // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect *`;
    // protection only changes how writes fault (resolved by the kernel in
    // async mode), not memory contents.
    unsafe { ioctl_ptr(fd, UFFDIO_WRITEPROTECT, &mut w)? };
    Ok(())
}

/// The features a fresh userfaultfd offers (a throwaway fd, `UFFDIO_API` with 0).
pub(crate) fn probe_features() -> io::Result<(u64, UffdOrigin)> {
    let (fd, origin) = open_best()?;
    let (features, _) = api(fd.as_fd(), 0)?;
    Ok((features, origin))
}

/// `UFFD_FEATURE_MISSING_SHMEM`: missing-page faults on shmem / memfd.
pub(crate) const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_SHMEM`: minor faults (page in the page cache, not
/// mapped) on shmem / memfd, resolved by `UFFDIO_CONTINUE`.
pub(crate) const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_MINOR`.
pub(crate) const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// `UFFD_EVENT_PAGEFAULT`.
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Default, Debug)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
const _: () = assert!(size_of::<UffdioCopy>() == 40);

/// `struct uffdio_zeropage` (same layout as `struct uffdio_continue`).
#[repr(C)]
#[derive(Default, Debug)]
struct UffdioFill {
    range: UffdioRange,
    mode: u64,
    /// `zeropage` / `mapped`: bytes done, or a negative errno.
    done: i64,
}
const _: () = assert!(size_of::<UffdioFill>() == 32);

/// `struct uffd_msg` (the page-fault member of its union is all we read).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct UffdMsg {
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `pagefault.flags`, `pagefault.address`, `pagefault.feat`.
    pub arg: [u64; 3],
}
const _: () = assert!(size_of::<UffdMsg>() == 32);

pub(crate) const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, size_of::<UffdioRange>());
pub(crate) const UFFDIO_COPY: u64 =
    ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, size_of::<UffdioCopy>());
pub(crate) const UFFDIO_ZEROPAGE: u64 =
    ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x04, size_of::<UffdioFill>());
pub(crate) const UFFDIO_CONTINUE: u64 =
    ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x07, size_of::<UffdioFill>());

/// What a filling ioctl (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`) did.
#[derive(Debug)]
pub(crate) struct Filled {
    /// Bytes filled from the start of the range (the kernel woke their waiters).
    pub bytes: u64,
    /// Why it stopped early, if it did: `EEXIST` (the next page is already
    /// there; nobody was woken for it), `EAGAIN` (the mm changed, retry),
    /// anything else is a real error.
    pub error: Option<io::Error>,
}

/// Turn an ioctl result and its "done" field into a [`Filled`]. The done
/// field is the bytes filled, or a negative errno when nothing was
/// (a partial count can be a negative errno).
fn filled(result: io::Result<libc::c_int>, done: i64, len: u64) -> Filled {
    match result {
        Ok(_) => Filled {
            bytes: len,
            error: None,
        },
        Err(e) if done > 0 => Filled {
            bytes: (done as u64).min(len),
            error: Some(e),
        },
        Err(_) if done < 0 => Filled {
            bytes: 0,
            error: Some(io::Error::from_raw_os_error((-done) as i32)),
        },
        Err(e) => Filled {
            bytes: 0,
            error: Some(e),
        },
    }
}

/// `UFFDIO_COPY`: atomically fill the missing pages at `dst` with `src` and
/// wake the threads waiting on them.
///
/// The kernel checks that `dst .. dst + src.len()` lies in a range
/// registered with `fd` (else `ENOENT`/`EINVAL`) and fills only pages that
/// are absent (`EEXIST` otherwise), so this never overwrites memory.
#[doc(alias = "UFFDIO_COPY")]
pub(crate) fn copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> Filled {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy *`; `src` is a live
    // buffer of `len` bytes the kernel only reads; the destination is
    // validated by the kernel against the ranges registered on `fd` and only
    // absent pages are filled, so no memory a Rust reference covers changes.
    let r = unsafe { ioctl_ptr(fd, UFFDIO_COPY, &mut c) };
    filled(r, c.copy, src.len() as u64)
}

/// `UFFDIO_ZEROPAGE`: fill the missing pages of `[start, start + len)` with
/// zeros and wake their waiters.
#[doc(alias = "UFFDIO_ZEROPAGE")]
pub(crate) fn zeropage(fd: BorrowedFd<'_>, start: u64, len: u64) -> Filled {
    let mut z = UffdioFill {
        range: UffdioRange { start, len },
        mode: 0,
        done: 0,
    };
    // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage *`, which has
    // this layout; the kernel validates the range and fills absent pages only.
    let r = unsafe { ioctl_ptr(fd, UFFDIO_ZEROPAGE, &mut z) };
    filled(r, z.done, len)
}

/// `UFFDIO_CONTINUE`: map the page-cache pages of `[start, start + len)`
/// (minor faults) and wake their waiters.
#[doc(alias = "UFFDIO_CONTINUE")]
pub(crate) fn cont(fd: BorrowedFd<'_>, start: u64, len: u64) -> Filled {
    let mut c = UffdioFill {
        range: UffdioRange { start, len },
        mode: 0,
        done: 0,
    };
    // SAFETY: UFFDIO_CONTINUE takes a `struct uffdio_continue *`, which has
    // this layout; it installs page-table entries for pages already in the
    // page cache, it never changes their contents.
    let r = unsafe { ioctl_ptr(fd, UFFDIO_CONTINUE, &mut c) };
    filled(r, c.done, len)
}

/// `UFFDIO_WAKE`: wake the threads waiting on faults in `[start, start + len)`.
#[doc(alias = "UFFDIO_WAKE")]
pub(crate) fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range *`; it only wakes threads.
    unsafe { ioctl_ptr(fd, UFFDIO_WAKE, &mut r)? };
    Ok(())
}

/// `read(2)` of fault messages from a non-blocking userfaultfd into `buf`;
/// `Ok(0)` when none is pending.
pub(crate) fn read_msgs(fd: BorrowedFd<'_>, buf: &mut [UffdMsg]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let bytes = std::mem::size_of_val(buf);
    // SAFETY: `buf` is a live, exclusive buffer of `bytes` bytes of plain
    // integers (any bit pattern is valid); the kernel writes whole messages.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
            _ => Err(e),
        };
    }
    Ok(n as usize / size_of::<UffdMsg>())
}

/// `poll(2)` for `POLLIN` on `fd` for up to `timeout_ms`; true when readable.
pub(crate) fn poll_in(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid `pollfd` for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0 && p.revents & libc::POLLIN != 0)
}

/// `poll(2)` for `POLLIN` on `fds` and on `also`, a descriptor number the
/// caller does not own (another component's socket, which may close
/// meanwhile: polling a closed number is harmless, it reports `POLLNVAL`),
/// for up to `timeout_ms`. True when `also` is readable, hung up, failed or
/// no longer open: the caller looks at it (an interrupted wait is false).
pub(crate) fn poll_also(
    fds: &[BorrowedFd<'_>],
    also: std::os::fd::RawFd,
    timeout_ms: i32,
) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut set = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 4];
    let n = fds.len().min(set.len() - 1);
    for (p, fd) in set.iter_mut().zip(&fds[..n]) {
        p.fd = fd.as_raw_fd();
        p.events = libc::POLLIN;
    }
    set[n] = libc::pollfd {
        fd: also,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `n + 1` valid `pollfd`s for the duration of the call; the
    // kernel only reads the numbers (a closed one is reported, not used).
    let r = unsafe { libc::poll(set.as_mut_ptr(), (n + 1) as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(e);
    }
    let ready = libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    Ok(r > 0 && set[n].revents & ready != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    /// A write the kernel does on the program's behalf (`read()` from a pipe
    /// into a tracked page) is tracked, with kernel-mode faults and with
    /// `UFFD_USER_MODE_ONLY`: async write-protect faults never reach a handler.
    #[test]
    fn kernel_mode_writes_are_tracked() {
        use lmig_core::DirtyTracker;
        use lmig_core::model::{RegionId, RegionPages};
        use std::io::Write;
        use std::os::fd::AsRawFd;

        for user_mode_only in [false, true] {
            let ps = crate::page_size();
            let set =
                crate::RegionSet::new([crate::RegionOptions::new(RegionId(1), 16 * ps as u64)
                    .map()
                    .unwrap()])
                .unwrap();
            let mut t = match crate::UffdWpTracker::open(&set, user_mode_only) {
                Ok(t) => t,
                Err(e)
                    if !lmig_core::testing::privileged(
                        "kernel_mode_writes_are_tracked",
                        &e.to_string(),
                    ) =>
                {
                    return;
                }
                Err(e) => panic!("userfaultfd async write-protect unavailable: {e}"),
            };
            t.start().unwrap();
            let (r, w) = std::io::pipe().unwrap();
            (&w).write_all(b"written by the kernel").unwrap();
            let region = set.get(RegionId(1)).unwrap();
            // SAFETY: reads 21 bytes into page 3 of a live, writable region
            // that no Rust reference covers.
            let n = unsafe { libc::read(r.as_raw_fd(), region.as_ptr().add(3 * ps).cast(), 21) };
            assert_eq!(
                n, 21,
                "read into a write-protected page (user_mode_only={user_mode_only})"
            );
            let mut d = RegionPages::empty(set.layout());
            t.collect(&mut d).unwrap();
            let got: Vec<u64> = d.get(RegionId(1)).unwrap().iter().collect();
            assert_eq!(got, vec![3], "user_mode_only={user_mode_only}");
            let mut back = [0u8; 21];
            region.read_at(3 * ps, &mut back).unwrap();
            assert_eq!(&back, b"written by the kernel");
        }
    }
}
