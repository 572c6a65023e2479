//! Network namespaces for the test topology: entering one, making one,
//! pinning it with a bind mount, and starting a command inside one.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// `setns(fd, CLONE_NEWNET)` for the calling thread.
#[doc(alias = "setns")]
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// `unshare(CLONE_NEWNET)`: the calling thread (only it) moves to a new,
/// empty network namespace.
#[doc(alias = "unshare")]
pub(crate) fn unshare_net() -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// `mount(src, dst, NULL, MS_BIND | extra, NULL)`: bind-mount `src` on `dst`.
#[doc(alias = "mount")]
pub(crate) fn bind_mount(
    src: &std::path::Path,
    dst: &std::path::Path,
    recursive: bool,
) -> io::Result<()> {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    nix::mount::mount(Some(src), dst, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
}

/// `mount(NULL, path, NULL, MS_SHARED | MS_REC, NULL)`: mounts under
/// `path` propagate to (and from) peer mount namespaces. `EINVAL` when
/// `path` is not a mount point.
#[doc(alias = "mount")]
pub(crate) fn make_shared(path: &std::path::Path) -> io::Result<()> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// `umount2(path, MNT_DETACH)`: detach the mount at `path` now, free it
/// once nothing uses it.
#[doc(alias = "umount2")]
pub(crate) fn detach_mount(path: &std::path::Path) -> io::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
}

/// Make `cmd` enter the network namespace `ns` in the child before `exec`.
pub fn command_in_netns(cmd: &mut std::process::Command, ns: OwnedFd) {
    use std::os::unix::process::CommandExt;
    let raw = ns.as_raw_fd();
    // The fd must stay open until the child has forked: keep it alive in the closure.
    let keep = std::sync::Arc::new(ns);
    // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an
    // fd kept open by `keep` for as long as the Command lives.
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep;
            if libc::setns(raw, libc::CLONE_NEWNET) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
