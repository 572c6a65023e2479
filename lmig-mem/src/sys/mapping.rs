//! An owned memory mapping (`mmap`/`munmap`) and the raw-copy helpers that
//! move bytes in and out of it without ever forming a Rust reference to
//! memory other threads may be writing (the vm-memory approach).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// How a mapping is shared.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Share {
    /// `MAP_PRIVATE`.
    Private,
    /// `MAP_SHARED`.
    Shared,
}

/// An `mmap` of `len` bytes: owned (mapped by lmig, unmapped on drop) or
/// adopted (mapped by the program, never unmapped by lmig; see
/// [`ForeignMemory`](super::foreign::ForeignMemory)).
///
/// Holds a raw pointer: the memory is the program's and is written
/// concurrently by its threads (and read by pre-copy), so this type never
/// hands out `&[u8]`/`&mut [u8]` over it; bytes move only through the copy
/// helpers below.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// False for adopted memory: the program unmaps it, not lmig.
    owned: bool,
}

// SAFETY: a Mapping is a plain address range owned by this value. It holds no
// thread-affine state; every access goes through raw-pointer copies whose
// concurrency is the program's business (as for memory shared with a vCPU),
// and unmapping happens only in Drop, which needs exclusive ownership.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`: `&Mapping` only allows raw copies into/out of the range
// and madvise, which the kernel serialises; no Rust reference to the bytes is
// ever created, so concurrent use from several threads cannot alias `&mut`.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(addr, len, PROT_READ|PROT_WRITE, share | (anonymous or fd), fd, 0)`;
    /// with `addr`, `MAP_FIXED_NOREPLACE` (never replaces an existing mapping).
    pub(crate) fn map(
        len: usize,
        share: Share,
        fd: Option<BorrowedFd<'_>>,
        addr: Option<usize>,
        populate: bool,
    ) -> io::Result<Self> {
        Self::map_at_offset(len, share, fd.map(|fd| (fd, 0)), addr, populate)
    }

    /// [`Mapping::map`] of the file `fd` from byte `offset` on (a multiple
    /// of the page size).
    pub(crate) fn map_at_offset(
        len: usize,
        share: Share,
        fd: Option<(BorrowedFd<'_>, u64)>,
        addr: Option<usize>,
        populate: bool,
    ) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut flags = match share {
            Share::Private => libc::MAP_PRIVATE,
            Share::Shared => libc::MAP_SHARED,
        };
        let (raw_fd, offset) = match fd {
            Some((fd, offset)) => (
                fd.as_raw_fd(),
                libc::off_t::try_from(offset)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            ),
            None => {
                flags |= libc::MAP_ANONYMOUS;
                (-1, 0)
            }
        };
        if addr.is_some() {
            flags |= libc::MAP_FIXED_NOREPLACE;
        }
        if populate {
            flags |= libc::MAP_POPULATE;
        }
        let hint = addr.unwrap_or(0) as *mut libc::c_void;
        // SAFETY: we ask for a fresh mapping; with MAP_FIXED_NOREPLACE the
        // kernel refuses (EEXIST) rather than replace anything already mapped,
        // so no existing Rust object can be invalidated.
        let p = unsafe {
            libc::mmap(
                hint,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let m = Self {
            ptr,
            len,
            owned: true,
        };
        if let Some(want) = addr {
            // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat the
            // address as a hint: refuse a mapping somewhere else.
            if m.ptr.as_ptr() as usize != want {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
        }
        Ok(m)
    }

    /// Memory the program mapped: `len` bytes at `ptr`, never unmapped here.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be mapped readable and writable, and stay mapped
    /// while the returned value (and anything holding it) lives: the
    /// contract of [`ForeignMemory::new`](super::foreign::ForeignMemory::new).
    pub(crate) unsafe fn foreign(ptr: NonNull<u8>, len: usize) -> Self {
        Self {
            ptr,
            len,
            owned: false,
        }
    }

    /// Whether lmig mapped this memory (and unmaps it on drop).
    pub(crate) fn is_owned(&self) -> bool {
        self.owned
    }

    /// Start address.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn in_bounds(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Copy `dst.len()` bytes from `offset` into `dst`; false (nothing copied)
    /// when the range is not inside the mapping.
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) -> bool {
        if !self.in_bounds(offset, dst.len()) {
            return false;
        }
        // SAFETY: `offset..offset + dst.len()` lies inside our live mapping
        // (checked above) and `dst` is a distinct Rust buffer, so the ranges
        // cannot overlap. Other threads may write the source concurrently:
        // that yields torn bytes, never UB on our side, as no reference to
        // the mapped bytes exists.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        true
    }

    /// Copy `src` into the mapping at `offset`; false (nothing copied) when
    /// the range is not inside the mapping.
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) -> bool {
        if !self.in_bounds(offset, src.len()) {
            return false;
        }
        // SAFETY: bounds checked above; the mapping is writable
        // (PROT_WRITE) and `src` is a Rust buffer outside it, so no overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        };
        true
    }

    /// Test in place which of the `zero.len()` pages of `page_size` bytes
    /// at `offset` read as zero; false (nothing tested) when the range is
    /// not inside the mapping or the page size is not a multiple of 8.
    pub(crate) fn find_zero_pages(
        &self,
        offset: usize,
        page_size: usize,
        zero: &mut [bool],
    ) -> bool {
        let Some(len) = page_size.checked_mul(zero.len()) else {
            return false;
        };
        if !self.in_bounds(offset, len) || !page_size.is_multiple_of(8) || !offset.is_multiple_of(8)
        {
            return false;
        }
        for (i, flag) in zero.iter_mut().enumerate() {
            // SAFETY: the page lies inside our mapping (whole range checked
            // above); the mapping starts page aligned and `offset` and
            // `page_size` are multiples of 8, so the pointer is 8-byte aligned.
            *flag = unsafe {
                words_are_zero(
                    self.ptr.as_ptr().add(offset + i * page_size).cast::<u64>(),
                    page_size / 8,
                )
            };
        }
        true
    }

    /// Set `len` bytes at `offset` to zero; false when out of range.
    pub(crate) fn zero(&self, offset: usize, len: usize) -> bool {
        if !self.in_bounds(offset, len) {
            return false;
        }
        // SAFETY: bounds checked above; the mapping is writable.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), 0, len) };
        true
    }

    /// `madvise(addr + offset, len, advice)`.
    pub(crate) fn madvise(&self, offset: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        if !self.in_bounds(offset, len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the range lies inside our mapping; the advice values this
        // crate uses (MADV_HUGEPAGE, MADV_POPULATE_WRITE) never unmap memory
        // nor change its contents.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().add(offset).cast(), len, advice) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `madvise(addr + offset, len, advice)` with an advice that drops the
    /// pages' content (`MADV_DONTNEED`, `MADV_REMOVE`): post-copy drops the
    /// stale copies of the pages that will arrive after the resume.
    pub(crate) fn discard(&self, offset: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
        if !self.in_bounds(offset, len)
            || !matches!(advice, libc::MADV_DONTNEED | libc::MADV_REMOVE)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the range lies inside our mapping, which stays mapped; no
        // Rust reference to region memory ever exists (bytes move only by
        // raw copies), so changing the content to "absent / zero" under the
        // program is what the caller asked for and cannot break aliasing.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().add(offset).cast(), len, advice) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// [`Self::discard`] of many `(offset, len)` ranges, up to
    /// [`DISCARD_BATCH`] per system call: `process_madvise(2)` on this
    /// process (Linux 6.13 and later take every advice for the caller
    /// itself, and flush the TLB once per call, not once per range). With
    /// tens of thousands of scattered stale pages (hybrid's switch) one
    /// `madvise` per range took 14 ms of the freeze. Where
    /// `process_madvise` is refused (older kernels, no pidfd) or advises
    /// less than asked, the batch is done range by range (dropping a page
    /// twice changes nothing).
    pub(crate) fn discard_many(
        &self,
        ranges: &[(usize, usize)],
        advice: libc::c_int,
    ) -> io::Result<()> {
        if !matches!(advice, libc::MADV_DONTNEED | libc::MADV_REMOVE)
            || ranges.iter().any(|&(o, l)| !self.in_bounds(o, l))
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let pidfd = own_pidfd();
        for batch in ranges.chunks(DISCARD_BATCH) {
            let iov: Vec<libc::iovec> = batch
                .iter()
                .map(|&(o, l)| libc::iovec {
                    // In bounds (checked above): a pointer into our mapping.
                    iov_base: self.ptr.as_ptr().wrapping_add(o).cast(),
                    iov_len: l,
                })
                .collect();
            let want: usize = batch.iter().map(|&(_, l)| l).sum();
            let done = pidfd.as_ref().map_or(-1, |fd| {
                // SAFETY: `iov` holds `iov.len()` (at most UIO_MAXIOV) live
                // iovecs naming ranges inside our mapping, which stays
                // mapped; the kernel only reads them. Dropping their content
                // is what the caller asked for (see `discard`: no Rust
                // reference to region memory exists).
                unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        fd.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len(),
                        advice,
                        0,
                    )
                }
            });
            if done < 0 || done as usize != want {
                for &(o, l) in batch {
                    self.discard(o, l, advice)?;
                }
            }
        }
        Ok(())
    }
}

/// Most ranges of one `process_madvise` call (`UIO_MAXIOV`).
pub(crate) const DISCARD_BATCH: usize = 1024;

/// A pidfd of this process (`pidfd_open(getpid())`), `None` if the kernel
/// has none (before 5.3).
fn own_pidfd() -> Option<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a descriptor just opened for us and owned by nobody else.
    Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

/// Are the `words` 8-byte words at `p` all zero? Reads each word once with
/// a volatile load (the program may be writing them: no reference to the
/// memory is formed, and the compiler may not assume it stays unchanged).
/// Stops at the first 64-byte block holding a set bit.
///
/// # Safety
/// `p` must be 8-byte aligned and valid for reads of `words * 8` bytes.
unsafe fn words_are_zero(p: *const u64, words: usize) -> bool {
    let mut i = 0;
    while i < words {
        let end = (i + 8).min(words);
        let mut acc = 0u64;
        while i < end {
            // SAFETY: `i < words`, so `p.add(i)` is inside the valid, aligned
            // range the caller promised.
            acc |= unsafe { std::ptr::read_volatile(p.add(i)) };
            i += 1;
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.owned {
            // Adopted memory: the program maps it and unmaps it.
            return;
        }
        // SAFETY: we own this mapping and nothing refers to it any more
        // (Drop has exclusive access); munmap of a range we mapped is sound.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `MADV_HUGEPAGE`: ask for transparent huge pages.
pub(crate) const MADV_HUGEPAGE: libc::c_int = libc::MADV_HUGEPAGE;
/// `MADV_POPULATE_WRITE` (Linux 5.14): fault every page in writable.
pub(crate) const MADV_POPULATE_WRITE: libc::c_int = 23;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_bounds_checked() {
        let m = Mapping::map(8192, Share::Private, None, None, false).unwrap();
        assert!(m.copy_in(4090, b"abcdef"));
        let mut b = [0u8; 6];
        assert!(m.copy_out(4090, &mut b));
        assert_eq!(&b, b"abcdef");
        assert!(!m.copy_in(8190, b"abc"));
        assert!(!m.copy_out(usize::MAX, &mut b));
        assert!(m.zero(4090, 6));
        assert!(m.copy_out(4090, &mut b));
        assert_eq!(b, [0; 6]);
    }

    #[test]
    fn discard_many_drops_exactly_the_ranges_over_several_batches() {
        // Every other page of 3000 (more ranges than one batch), private
        // and shared (MADV_REMOVE) memory alike.
        let pages = 3000usize;
        for (share, advice) in [
            (Share::Private, libc::MADV_DONTNEED),
            (Share::Shared, libc::MADV_REMOVE),
        ] {
            let m = Mapping::map(pages * 4096, share, None, None, false).unwrap();
            for p in 0..pages {
                assert!(m.copy_in(p * 4096, &[0xA5; 8]));
            }
            let ranges: Vec<(usize, usize)> =
                (0..pages).step_by(2).map(|p| (p * 4096, 4096)).collect();
            assert!(ranges.len() > DISCARD_BATCH);
            m.discard_many(&ranges, advice).unwrap();
            let mut b = [0u8; 8];
            for p in 0..pages {
                assert!(m.copy_out(p * 4096, &mut b));
                let want = if p % 2 == 0 { [0; 8] } else { [0xA5; 8] };
                assert_eq!(b, want, "page {p} ({advice})");
            }
            // Out of bounds or another advice: refused, nothing dropped.
            let bad = [(4096, 4096), (pages * 4096, 4096)];
            assert!(m.discard_many(&bad, advice).is_err());
            assert!(
                m.discard_many(&[(4096, 4096)], libc::MADV_WILLNEED)
                    .is_err()
            );
            assert!(m.copy_out(4096, &mut b));
            assert_eq!(b, [0xA5; 8]);
        }
    }
}
