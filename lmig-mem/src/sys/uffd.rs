//! userfaultfd: open, `UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_UNREGISTER`,
//! `UFFDIO_WRITEPROTECT`. The structs and numbers are those of
//! `<linux/userfaultfd.h>` of Linux 6.7+, defined here because the
//! `userfaultfd` crate and older system headers lack the async write-protect
//! features.
//!
//! Post-copy (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_CONTINUE`, MISSING /
//! MINOR registration) will add its calls here; one uffd per purpose, since a
//! range can only be registered with one userfaultfd at a time.

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
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
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
                Err(e) if std::env::var("LMIG_SKIP_PRIVILEGED").is_ok_and(|v| v == "1") => {
                    println!("SKIPPED kernel_mode_writes_are_tracked: {e}");
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
