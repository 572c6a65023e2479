//! The C convention "negative return, reason in `errno`" as `io::Result`.

use std::io;

/// `ret`, or the calling thread's `errno` when it is negative.
pub(super) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
