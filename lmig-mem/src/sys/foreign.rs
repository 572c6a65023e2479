//! [`ForeignMemory`]: memory the program mapped itself, offered to lmig
//! with the promise that makes adopting it sound.

use std::ptr::NonNull;

use super::mapping::Mapping;

/// An address range the program mapped (a VMM's guest memory, a heap it
/// manages), to be adopted as a region with
/// [`Region::adopt`](crate::Region::adopt).
///
/// Creating it is the `unsafe` step: it carries the program's promise about
/// the memory. [`Region::adopt`](crate::Region::adopt) then checks what can
/// be checked (address, length, that the range is mapped readable and
/// writable with the backing named) before anything is registered.
#[derive(Debug)]
pub struct ForeignMemory {
    addr: *mut u8,
    len: usize,
    keep_address: bool,
}

impl ForeignMemory {
    /// The `len` bytes at `addr`, mapped by the program.
    ///
    /// # Safety
    ///
    /// The caller promises, for as long as the [`Region`](crate::Region)
    /// adopting this memory (and any tracker, post-copy or split service
    /// over it) lives:
    ///
    /// * **Address and length**: `addr..addr + len` is mapped readable and
    ///   writable (`PROT_READ | PROT_WRITE`) in this process. `addr` and
    ///   `len` are multiples of the base page size ([`crate::page_size`]);
    ///   `adopt` refuses them otherwise, and refuses a range that
    ///   `/proc/self/maps` does not show mapped and writable.
    /// * **It stays mapped**: the program does not `munmap`, `mremap`,
    ///   `mprotect` away write access, or map anything over (`MAP_FIXED`)
    ///   any part of the range while the region lives. lmig copies in and
    ///   out of it from its own threads, registers it with userfaultfd, and
    ///   (post-copy, split memory) drops pages with `madvise` and fills
    ///   them again.
    /// * **Backing**: the [`ForeignBacking`](crate::ForeignBacking) given to
    ///   `adopt` is what the range really is (checked against
    ///   `/proc/self/maps`: anonymous private, anonymous shared, or a
    ///   `MAP_SHARED` mapping of that fd's file at that offset); for a file,
    ///   the program does not truncate it below `offset + len`.
    /// * **Who unmaps**: the program, after the region is dropped. lmig
    ///   never unmaps adopted memory (dropping the region only closes lmig's
    ///   own duplicate of the fd and unregisters what it registered).
    /// * **No Rust references**: the program does not hold a `&[u8]` /
    ///   `&mut [u8]` over the range while lmig may write it (pre-copy on a
    ///   destination, post-copy, split memory); it accesses the memory by
    ///   raw pointers or volatile copies, as a VMM does guest memory.
    pub unsafe fn new(addr: *mut u8, len: usize) -> Self {
        Self {
            addr,
            len,
            keep_address: false,
        }
    }

    /// Ask the destination to place this region at the same address (the
    /// layout carries it, as [`RegionOptions::keep_address`](crate::RegionOptions::keep_address)
    /// does for regions lmig maps).
    #[must_use]
    pub fn keep_address(mut self) -> Self {
        self.keep_address = true;
        self
    }

    /// The start address.
    pub fn addr(&self) -> usize {
        self.addr as usize
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero (always refused by `adopt`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn keeps_address(&self) -> bool {
        self.keep_address
    }

    /// The mapping lmig uses, never unmapped by lmig; `None` for a null
    /// address. `adopt` calls this only after checking the range.
    pub(crate) fn into_mapping(self) -> Option<Mapping> {
        let ptr = NonNull::new(self.addr)?;
        // SAFETY: the caller of `ForeignMemory::new` promised that the range
        // is mapped readable and writable and stays so while the region (the
        // only holder of this Mapping) lives; `adopt` checked it against
        // /proc/self/maps before getting here.
        Some(unsafe { Mapping::foreign(ptr, self.len) })
    }
}
