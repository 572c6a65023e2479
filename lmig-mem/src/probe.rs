//! lmig-mem's part of the kernel probe: dirty tracking and post-copy, as
//! [`lmig_core::probe`] verdicts.
//!
//! Every check opens what it needs and closes it again before returning
//! (a throwaway userfaultfd, one test page): the probe leaves no fd, no
//! mapping and no registration behind, and never panics.

use std::fs::OpenOptions;

use lmig_core::probe::{Capability, Report, Verdict};

use crate::error::MemError;
use crate::sys::uffd::{self, UffdOrigin};
use crate::track::{SoftDirtyTracker, UffdWpTracker};

/// What would give this process kernel-mode userfaultfd faults.
const UFFD_FIX: &str = "run as root, or grant CAP_SYS_PTRACE, or set \
     vm.unprivileged_userfaultfd = 1, or give read-write access to /dev/userfaultfd";

/// `CAP_SYS_PTRACE`'s bit in the capability sets.
const CAP_SYS_PTRACE: u32 = 19;

/// Probe dirty tracking and post-copy on this kernel, for this process's
/// privileges: [`Capability::DirtyTracking`] (which tracker [`crate::best_tracker`]
/// would pick and why) and [`Capability::PostCopy`] (userfaultfd MISSING /
/// MINOR for shmem, kernel-mode faults or not).
///
/// The soft-dirty check, which clears soft-dirty bits process-wide, runs
/// only when uffd-wp is unavailable: call this at start-up, not while a
/// [`SoftDirtyTracker`] runs.
#[must_use = "the report is the probe's only output"]
pub fn probe() -> Report {
    let mut report = Report::new();
    report.push(Capability::DirtyTracking, dirty_tracking());
    report.push(Capability::PostCopy, post_copy());
    report
}

fn origin_name(origin: UffdOrigin) -> &'static str {
    match origin {
        UffdOrigin::Syscall => "userfaultfd(2)",
        UffdOrigin::DevNode => "/dev/userfaultfd",
        UffdOrigin::UserModeOnly => "userfaultfd(UFFD_USER_MODE_ONLY)",
    }
}

/// The remedy a tracker error names, if it is a typed missing feature.
fn needs_of(e: &MemError) -> Option<&'static str> {
    match e {
        MemError::Unsupported { needs, .. } => Some(needs),
        _ => None,
    }
}

/// What would give uffd-wp tracking, from why it was rejected.
fn tracker_fix(uffd_wp: &MemError) -> String {
    match needs_of(uffd_wp) {
        Some(needs) if needs.starts_with("Linux") => {
            format!("{needs} for UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN")
        }
        Some(needs) => needs.to_string(),
        None => "Linux >= 6.7 for UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN".to_string(),
    }
}

fn dirty_tracking() -> Verdict {
    let uffd_wp = match UffdWpTracker::probe() {
        Ok(s) => {
            return Verdict::ok(format!(
                "uffd-wp + PAGEMAP_SCAN (UFFD_FEATURE_WP_ASYNC through {}; shmem/memfd regions: {}): \
                 the best tracker, exact under concurrent writes",
                origin_name(s.origin),
                if s.shmem { "yes" } else { "no" }
            ));
        }
        Err(e) => e,
    };
    let fix = tracker_fix(&uffd_wp);
    match SoftDirtyTracker::probe() {
        Ok(()) => Verdict::degraded(
            format!(
                "soft-dirty (uffd-wp rejected: {uffd_wp}); exact only while the writers \
                 are paused during each collect"
            ),
            fix,
        ),
        Err(sd) => Verdict::missing(
            format!("no automatic dirty tracker: uffd-wp: {uffd_wp}; soft-dirty: {sd}"),
            format!(
                "{fix}; or the program marks its writes (ManualTracker) or hands over \
                 its VMM's dirty log (DirtyLogTracker)"
            ),
        ),
    }
}

/// Whether the calling thread holds `CAP_SYS_PTRACE` (from
/// `/proc/thread-self/status`), `None` when unreadable.
fn has_cap_sys_ptrace() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let caps = u64::from_str_radix(hex.trim(), 16).ok()?;
    Some(caps & (1 << CAP_SYS_PTRACE) != 0)
}

/// The three ways to kernel-mode faults, as this process sees them.
fn access_detail() -> String {
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let dev = match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(_) => "accessible".to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent".to_string(),
        Err(e) => format!("not accessible ({e})"),
    };
    let cap = match has_cap_sys_ptrace() {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    format!(
        "CAP_SYS_PTRACE: {cap}, vm.unprivileged_userfaultfd = {sysctl}, /dev/userfaultfd: {dev}"
    )
}

fn post_copy() -> Verdict {
    post_copy_verdict(uffd::probe_features(), &access_detail())
}

/// The post-copy verdict from what a throwaway userfaultfd offered (or why
/// none opened) and the access detail.
fn post_copy_verdict(probed: std::io::Result<(u64, UffdOrigin)>, access: &str) -> Verdict {
    let (features, origin) = match probed {
        Ok(x) => x,
        Err(e) => {
            let fix = if e.raw_os_error() == Some(libc::ENOSYS) {
                "a kernel built with CONFIG_USERFAULTFD"
            } else {
                UFFD_FIX
            };
            return Verdict::missing(format!("userfaultfd refused ({e}); {access}"), fix);
        }
    };
    let missing_shmem = features & uffd::UFFD_FEATURE_MISSING_SHMEM != 0;
    let minor_shmem = features & uffd::UFFD_FEATURE_MINOR_SHMEM != 0;
    let modes = format!(
        "MISSING on anonymous{} memory, MINOR on shmem/memfd: {}",
        if missing_shmem { " and shmem" } else { "" },
        if minor_shmem { "yes" } else { "no" }
    );
    if origin == UffdOrigin::UserModeOnly {
        return Verdict::degraded(
            format!(
                "userfaultfd only with UFFD_USER_MODE_ONLY: a system call touching a missing \
                 page fails with EFAULT (PostcopyOptions::allow_user_mode_only); {modes}; {access}"
            ),
            UFFD_FIX,
        );
    }
    let through = origin_name(origin);
    if !missing_shmem {
        return Verdict::degraded(
            format!("{through}, kernel-mode faults allowed; {modes}"),
            "Linux >= 4.11 for UFFD_FEATURE_MISSING_SHMEM (shared regions)",
        );
    }
    if !minor_shmem {
        return Verdict::degraded(
            format!("{through}, kernel-mode faults allowed; {modes}"),
            "Linux >= 5.14 for UFFD_FEATURE_MINOR_SHMEM (memfd regions keep their page cache)",
        );
    }
    Verdict::ok(format!("{through}, kernel-mode faults allowed; {modes}"))
}

#[cfg(test)]
mod tests {
    use std::io;

    use lmig_core::probe::Status;

    use super::*;

    const ALL: u64 = uffd::UFFD_FEATURE_MISSING_SHMEM | uffd::UFFD_FEATURE_MINOR_SHMEM;

    #[test]
    fn post_copy_names_each_missing_feature_and_its_fix() {
        let v = post_copy_verdict(Ok((ALL, UffdOrigin::Syscall)), "a");
        assert_eq!(v.status(), Status::Ok, "{v}");
        let v = post_copy_verdict(Ok((ALL, UffdOrigin::UserModeOnly)), "access");
        assert_eq!(v.status(), Status::Degraded);
        assert!(v.to_string().contains("EFAULT"), "{v}");
        assert_eq!(v.fix(), Some(UFFD_FIX));
        let v = post_copy_verdict(
            Ok((uffd::UFFD_FEATURE_MISSING_SHMEM, UffdOrigin::DevNode)),
            "a",
        );
        assert_eq!(v.status(), Status::Degraded);
        assert!(v.fix().unwrap().contains("UFFD_FEATURE_MINOR_SHMEM"), "{v}");
        assert!(v.to_string().contains("MINOR on shmem/memfd: no"), "{v}");
        let v = post_copy_verdict(Ok((0, UffdOrigin::Syscall)), "a");
        assert!(
            v.fix().unwrap().contains("UFFD_FEATURE_MISSING_SHMEM"),
            "{v}"
        );
        let v = post_copy_verdict(Err(io::Error::from_raw_os_error(libc::ENOSYS)), "a");
        assert_eq!(v.status(), Status::Missing);
        assert_eq!(v.fix(), Some("a kernel built with CONFIG_USERFAULTFD"));
        let v = post_copy_verdict(Err(io::Error::from_raw_os_error(libc::EPERM)), "a");
        assert_eq!(v.fix(), Some(UFFD_FIX));
    }

    #[test]
    fn tracker_fix_names_the_kernel_feature() {
        let old_kernel = MemError::Unsupported {
            feature: "UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN",
            needs: "Linux >= 6.7",
        };
        assert_eq!(
            tracker_fix(&old_kernel),
            "Linux >= 6.7 for UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN"
        );
        let no_access = MemError::Unsupported {
            feature: "userfaultfd",
            needs: "CAP_SYS_PTRACE",
        };
        assert_eq!(tracker_fix(&no_access), "CAP_SYS_PTRACE");
        let other = MemError::NoTracker {
            reasons: "x".into(),
        };
        assert!(tracker_fix(&other).contains("Linux >= 6.7"));
    }
}
