//! The `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux 6.7,
//! `<linux/fs.h>`): reports pages by category and can write-protect the
//! matched ones in the same call.

use std::io;
use std::mem::size_of;
use std::os::fd::BorrowedFd;

use super::{IOC_READ, IOC_WRITE, ioc, ioctl_ptr};

/// `PAGE_IS_WRITTEN`: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_PRESENT`: mapped to a page frame.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`: a swap entry, or a migration entry or uffd-wp marker
/// (the kernel reports every non-present, non-empty entry so).
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`: mapped to the shared zero page (read, never written).
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// `PM_SCAN_WP_MATCHING`: write-protect the matched pages.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail (EPERM) on a range without async WP.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: `[start, end)` with the categories it has.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte address.
    pub start: u64,
    /// One past the last byte address.
    pub end: u64,
    /// `PAGE_IS_*` bits (restricted to the return mask).
    pub categories: u64,
}
const _: () = assert!(size_of::<PageRegion>() == 24);

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default, Debug)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
const _: () = assert!(size_of::<PmScanArg>() == 96);

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
pub(crate) const PAGEMAP_SCAN: u64 = ioc(IOC_READ | IOC_WRITE, b'f', 16, size_of::<PmScanArg>());

/// What one scan asks for.
#[derive(Copy, Clone, Debug)]
pub(crate) struct ScanSpec {
    pub flags: u64,
    pub category_mask: u64,
    /// Pages with any of these categories (0: no such condition).
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// One `PAGEMAP_SCAN` of `[start, end)`: fills `out` (cleared first, up to
/// its capacity, which must be > 0) and returns `walk_end`, the address where
/// the walk stopped (`end` when it covered everything).
#[doc(alias = "PAGEMAP_SCAN")]
pub(crate) fn scan(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
    spec: ScanSpec,
    out: &mut Vec<PageRegion>,
) -> io::Result<u64> {
    out.clear();
    let cap = out.capacity();
    if cap == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut arg = PmScanArg {
        size: size_of::<PmScanArg>() as u64,
        flags: spec.flags,
        start,
        end,
        walk_end: 0,
        vec: out.as_mut_ptr() as u64,
        vec_len: cap as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: spec.category_mask,
        category_anyof_mask: spec.category_anyof_mask,
        return_mask: spec.return_mask,
    };
    // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg *`; `vec` points to
    // `cap` writable `page_region` slots owned by `out`, which outlives the call.
    let n = unsafe { ioctl_ptr(pagemap, PAGEMAP_SCAN, &mut arg)? } as usize;
    if n > cap {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    }
    // SAFETY: the kernel initialised the first `n` (<= capacity) entries.
    unsafe { out.set_len(n) };
    Ok(arg.walk_end)
}

/// Slots of one populated-pages scan (24 KiB); a fuller scan loops from
/// `walk_end`.
const POPULATED_VEC_LEN: usize = 1024;

/// Bytes one populated-pages scan walks at most (16 MiB, 4096 page table
/// entries of 4 KiB pages: tens of µs). On a kernel without preemption a
/// thread keeps its CPU for a whole call: one call over a GiB held it for
/// milliseconds, which a program's thread woken meanwhile waited out.
const POPULATED_CALL_BYTES: u64 = 16 << 20;

/// The ranges of `[start, end)` (an address range of this process) whose
/// pages are present or swapped, found with `PAGEMAP_SCAN`; a page mapped
/// to the shared zero page is left out (it reads as zero). Pages outside
/// the ranges have no page table entry at all: for anonymous private memory
/// they read as zero.
#[doc(alias = "PAGEMAP_SCAN")]
pub(crate) fn populated_ranges(
    start: u64,
    end: u64,
    mut found: impl FnMut(u64, u64),
) -> io::Result<()> {
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let spec = ScanSpec {
        flags: 0,
        category_mask: 0,
        category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
    };
    let mut buf = Vec::with_capacity(POPULATED_VEC_LEN);
    let mut at = start;
    while at < end {
        let call_end = end.min(at.saturating_add(POPULATED_CALL_BYTES));
        let walk_end = scan(
            std::os::fd::AsFd::as_fd(&pagemap),
            at,
            call_end,
            spec,
            &mut buf,
        )?;
        for pr in &buf {
            let zero_page = pr.categories & (PAGE_IS_PFNZERO | PAGE_IS_SWAPPED) == PAGE_IS_PFNZERO;
            if !zero_page && pr.end > pr.start {
                found(pr.start.max(start), pr.end.min(end));
            }
        }
        if walk_end <= at {
            return Err(io::Error::other(format!(
                "PAGEMAP_SCAN stopped at {walk_end:#x}, started at {at:#x}"
            )));
        }
        at = walk_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_linux_fs_h() {
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }
}
