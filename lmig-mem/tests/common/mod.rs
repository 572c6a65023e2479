//! Memory a test "program" maps itself, to be adopted with `Region::adopt`
//! (shared by the test files that adopt memory).
// Each test file uses part of these helpers.
#![allow(dead_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use lmig_core::model::RegionId;
use lmig_mem::{ForeignBacking, ForeignMemory, MemError, Region};

/// An `mmap` made by the test program, unmapped by it in `Drop` (declare
/// it before the regions adopting it, so they are dropped first).
pub struct Area {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the area is a plain address range; the tests copy through raw
// pointers only.
unsafe impl Send for Area {}
// SAFETY: see `Send`.
unsafe impl Sync for Area {}

impl Area {
    fn map(
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
        fd: libc::c_int,
        offset: u64,
    ) -> Self {
        // SAFETY: a fresh mapping chosen by the kernel; nothing is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self { ptr: p.cast(), len }
    }

    /// Anonymous memory, private or shared.
    pub fn anonymous(len: usize, shared: bool) -> Self {
        let share = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            share | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }

    /// `MAP_SHARED` of `fd` from `offset`.
    pub fn file(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Self {
        use std::os::fd::AsRawFd;
        Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset,
        )
    }

    /// Anonymous private memory mapped read-only.
    pub fn read_only(len: usize) -> Self {
        Self::map(
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    }

    /// Anonymous hugetlb memory (`MAP_HUGETLB`), or the errno.
    pub fn hugetlb(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel; nothing is replaced.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr: p.cast(), len })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The promise of `ForeignMemory::new` for `len` bytes at `offset`.
    pub fn memory_at(&self, offset: usize, len: usize) -> ForeignMemory {
        assert!(offset + len <= self.len);
        // SAFETY: the range lies in this live, writable mapping, which is
        // unmapped only in `Drop`, after the regions over it (declared
        // later) are gone; the tests copy through raw pointers only.
        unsafe { ForeignMemory::new(self.ptr.add(offset), len) }
    }

    /// The whole area.
    pub fn memory(&self) -> ForeignMemory {
        self.memory_at(0, self.len)
    }

    /// Copy out `dst.len()` bytes at `offset`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len);
        // SAFETY: inside the live mapping; `dst` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr(), dst.len()) };
    }

    /// Copy `src` in at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.len);
        // SAFETY: inside the live, writable mapping; `src` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len()) };
    }

    /// The whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.read(0, &mut v);
        v
    }

    /// Whether `/proc/self/maps` shows the whole area mapped.
    pub fn is_mapped(&self) -> bool {
        let (start, end) = (self.ptr as u64, self.ptr as u64 + self.len as u64);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut at = start;
        for line in maps.lines() {
            let range = line.split(' ').next().unwrap();
            let (s, e) = range.split_once('-').unwrap();
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            if s <= at && e > at {
                at = e;
            }
        }
        at >= end
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: this test mapped the range; the regions over it are gone.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A memfd of `len` bytes, every byte `fill`.
pub fn memfd(name: &str, len: usize, fill: u8) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, len as libc::off_t).unwrap();
    if fill != 0 {
        let chunk = vec![fill; 1 << 16];
        let mut at = 0;
        while at < len {
            let n = chunk.len().min(len - at);
            let w = nix::sys::uio::pwrite(&fd, &chunk[..n], at as libc::off_t).unwrap();
            at += w;
        }
    }
    fd
}

/// `len` bytes of the file at `offset`, read with `pread`.
pub fn file_bytes(fd: BorrowedFd<'_>, offset: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    let mut at = 0;
    while at < len {
        let n = nix::sys::uio::pread(fd, &mut v[at..], (offset + at) as libc::off_t).unwrap();
        assert!(n > 0, "short file");
        at += n;
    }
    v
}

/// Adopt the whole `area` as region `id`.
pub fn adopt(id: RegionId, area: &Area, backing: ForeignBacking<'_>) -> Result<Region, MemError> {
    Region::adopt(id, area.memory(), backing)
}

/// `ForeignBacking::SharedFile` of `fd` at `offset`.
pub fn shared_file(fd: &OwnedFd, offset: u64) -> ForeignBacking<'_> {
    ForeignBacking::SharedFile {
        fd: fd.as_fd(),
        offset,
    }
}
