//! [`Region::adopt`]: a region over memory the program mapped itself, and
//! the checks made before it is accepted.
//!
//! The checks read `/proc/self/maps` once: the whole range must be covered,
//! without a hole, by mappings that are readable and writable and have the
//! backing the program named (private or shared anonymous memory, or a
//! `MAP_SHARED` mapping of the given file at the given offset). Nothing is
//! registered with the kernel before they pass; a refused range is left as
//! it was.

use std::os::fd::{AsFd, BorrowedFd};

use lmig_core::model::{RegionId, RegionInfo};

use super::{Backing, Region};
use crate::error::{AdoptRefusal, MemError, Result};
use crate::sys::foreign::ForeignMemory;

/// What backs memory the program mapped (see [`Region::adopt`]).
#[derive(Copy, Clone, Debug)]
#[non_exhaustive]
pub enum ForeignBacking<'fd> {
    /// `MAP_PRIVATE | MAP_ANONYMOUS` (becomes [`Backing::Private`]).
    AnonymousPrivate,
    /// `MAP_SHARED | MAP_ANONYMOUS` (becomes [`Backing::SharedAnonymous`]).
    AnonymousShared,
    /// `MAP_SHARED` of a shmem file — a memfd (`memfd_create` without
    /// `MFD_HUGETLB`) or a tmpfs file — from byte `offset` of the file
    /// (becomes [`Backing::Memfd`]). lmig keeps its own duplicate of `fd`
    /// (closed when the region is dropped): post-copy places pages through
    /// a second mapping of the file and finds written pages with
    /// `SEEK_DATA`.
    SharedFile {
        /// The file the range maps.
        fd: BorrowedFd<'fd>,
        /// Where the range starts in the file (a multiple of the page size).
        offset: u64,
    },
}

/// The hugetlbfs refusal (see the crate docs' non-goals).
const HUGETLB: MemError = MemError::Unsupported {
    feature: "hugetlbfs regions (MAP_HUGETLB, MFD_HUGETLB)",
    needs: "huge-page page arithmetic, dirty tracking and UFFDIO_COPY of whole huge pages in lmig-mem, which it does not have yet; map guest memory with base pages (transparent huge pages are fine)",
};

/// What the maps walk must find.
#[derive(Copy, Clone)]
enum Expect {
    AnonymousPrivate,
    AnonymousShared,
    /// The file's device and inode, and the file offset at the range's start.
    File {
        dev: (u64, u64),
        ino: u64,
        offset: u64,
    },
}

/// One line of `/proc/self/maps`.
struct MapsEntry<'a> {
    start: u64,
    end: u64,
    perms: &'a str,
    offset: u64,
    dev: (u64, u64),
    ino: u64,
    path: &'a str,
}

fn parse_entry(line: &str) -> Option<MapsEntry<'_>> {
    let mut f = line.splitn(6, ' ');
    let (range, perms, offset, dev, ino) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let path = f.next().unwrap_or("").trim_start();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    Some(MapsEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (
            u64::from_str_radix(major, 16).ok()?,
            u64::from_str_radix(minor, 16).ok()?,
        ),
        ino: ino.parse().ok()?,
        path,
    })
}

/// Why a maps walk failed.
enum Problem {
    Refuse(AdoptRefusal),
    Hugetlb,
}

/// Walk `maps` (the text of `/proc/self/maps`) over `start..end`.
fn check_maps(maps: &str, start: u64, end: u64, expect: Expect) -> Result<(), Problem> {
    let mut at = start;
    for e in maps.lines().filter_map(parse_entry) {
        if e.end <= at {
            continue;
        }
        if e.start > at {
            break;
        }
        let here = at.max(e.start);
        if e.path.starts_with("/anon_hugepage") {
            return Err(Problem::Hugetlb);
        }
        if !e.perms.starts_with("rw") {
            return Err(Problem::Refuse(AdoptRefusal::NotWritable {
                at: here,
                perms: e.perms.to_owned(),
            }));
        }
        let shared = e.perms.as_bytes().get(3) == Some(&b's');
        let mismatch = |want: &str| {
            Problem::Refuse(AdoptRefusal::BackingMismatch {
                at: here,
                detail: format!(
                    "expected {want}, found a {} mapping of {} (inode {})",
                    if shared { "shared" } else { "private" },
                    if e.path.is_empty() {
                        "anonymous memory"
                    } else {
                        e.path
                    },
                    e.ino
                ),
            })
        };
        match expect {
            Expect::AnonymousPrivate if shared || e.ino != 0 => {
                return Err(mismatch("anonymous private memory"));
            }
            // Shared anonymous memory is a deleted shmem file named /dev/zero.
            Expect::AnonymousShared if !shared || !e.path.starts_with("/dev/zero") => {
                return Err(mismatch("anonymous shared memory"));
            }
            Expect::File { dev, ino, offset }
                if !shared
                    || e.ino != ino
                    || e.dev != dev
                    || e.offset + (here - e.start) != offset + (here - start) =>
            {
                return Err(mismatch(&format!(
                    "a shared mapping of inode {ino} at file offset {:#x}",
                    offset + (here - start)
                )));
            }
            _ => {}
        }
        at = e.end;
        if at >= end {
            return Ok(());
        }
    }
    Err(Problem::Refuse(AdoptRefusal::NotMapped { at }))
}

/// The file checks of [`ForeignBacking::SharedFile`]: a shmem file (not
/// hugetlbfs, not a disk file), long enough; its device and inode.
fn check_file(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<Expect, Result<AdoptRefusal>> {
    use nix::sys::statfs::{HUGETLBFS_MAGIC, TMPFS_MAGIC, fstatfs};
    let what = || format!("fd {fd:?}");
    let fs = fstatfs(fd).map_err(|e| Err(MemError::os("fstatfs", what(), e.into())))?;
    if fs.filesystem_type() == HUGETLBFS_MAGIC {
        return Err(Err(HUGETLB));
    }
    if fs.filesystem_type() != TMPFS_MAGIC {
        return Err(Err(MemError::Unsupported {
            feature: "adopting a mapping of a file outside shmem",
            needs: "a memfd or tmpfs file: userfaultfd serves missing pages only for anonymous, shmem and hugetlbfs memory",
        }));
    }
    let st = nix::sys::stat::fstat(fd).map_err(|e| Err(MemError::os("fstat", what(), e.into())))?;
    let needed = offset.saturating_add(len);
    let file_len = u64::try_from(st.st_size).unwrap_or(0);
    if file_len < needed {
        return Err(Ok(AdoptRefusal::FileTooShort { file_len, needed }));
    }
    Ok(Expect::File {
        dev: (
            nix::sys::stat::major(st.st_dev),
            nix::sys::stat::minor(st.st_dev),
        ),
        ino: st.st_ino,
        offset,
    })
}

impl Region {
    /// Adopt memory the program mapped as region `id`: lmig tracks, reads,
    /// fills and (post-copy, split memory) drops its pages like those of a
    /// region it mapped, and never unmaps it.
    ///
    /// The `unsafe` part, the program's promise about the range, is made
    /// when creating the [`ForeignMemory`] (its `# Safety` section is the
    /// contract). Here the range is checked before anything is registered:
    /// null address, zero length, address, length or file offset not page
    /// aligned, a range that wraps, a hole, a mapping not readable and
    /// writable, a backing other than `backing`, or a file shorter than
    /// `offset + len` are refused with [`MemError::AdoptRefused`];
    /// hugetlbfs memory and files outside shmem with
    /// [`MemError::Unsupported`]. Overlap with another region is refused
    /// by [`RegionSet::new`](crate::RegionSet::new)
    /// ([`MemError::RegionsOverlap`]).
    ///
    /// The region's page size is the base page size; its layout entry
    /// carries the address when [`ForeignMemory::keep_address`] was asked.
    ///
    /// ```
    /// # use lmig_mem::{ForeignBacking, ForeignMemory, Region, RegionId, RegionSet};
    /// // A VMM's guest memory: a memfd mapped by the VMM itself.
    /// let len = 64 * lmig_mem::page_size();
    /// let fd = nix::sys::memfd::memfd_create("guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    /// nix::unistd::ftruncate(&fd, len as i64)?;
    /// let flags = nix::sys::mman::MapFlags::MAP_SHARED;
    /// let prot = nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE;
    /// // SAFETY: a fresh mapping of a file we own, 64 pages long.
    /// let host = unsafe {
    ///     nix::sys::mman::mmap(None, len.try_into()?, prot, flags, &fd, 0)?
    /// };
    /// // SAFETY: the mapping is readable and writable, stays mapped until the
    /// // munmap below (after the region is dropped), and is a shared mapping
    /// // of `fd` from offset 0; no Rust reference covers it.
    /// let memory = unsafe { ForeignMemory::new(host.as_ptr().cast(), len) };
    /// let region = Region::adopt(RegionId(1), memory, ForeignBacking::SharedFile {
    ///     fd: std::os::fd::AsFd::as_fd(&fd),
    ///     offset: 0,
    /// })?;
    /// region.write_at(4096, b"guest page")?;
    /// let set = RegionSet::new([region])?;
    /// drop(set); // lmig does not unmap it: the program does.
    /// // SAFETY: the region that used the range is gone.
    /// unsafe { nix::sys::mman::munmap(host, len)? };
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// ```
    pub fn adopt(id: RegionId, memory: ForeignMemory, backing: ForeignBacking<'_>) -> Result<Self> {
        let (addr, len) = (memory.addr() as u64, memory.len() as u64);
        let refuse = |reason| MemError::AdoptRefused {
            region: id,
            addr,
            len,
            reason,
        };
        let page = crate::sys::page_size() as u64;
        let offset = match backing {
            ForeignBacking::SharedFile { offset, .. } => offset,
            _ => 0,
        };
        if addr == 0 {
            return Err(refuse(AdoptRefusal::NullAddress));
        }
        if len == 0 {
            return Err(refuse(AdoptRefusal::ZeroLength));
        }
        if !addr.is_multiple_of(page) || !len.is_multiple_of(page) || !offset.is_multiple_of(page) {
            return Err(refuse(AdoptRefusal::Unaligned { page_size: page }));
        }
        let Some(end) = addr.checked_add(len) else {
            return Err(refuse(AdoptRefusal::WrapsAround));
        };
        let (expect, kind) = match backing {
            ForeignBacking::AnonymousPrivate => (Expect::AnonymousPrivate, Backing::Private),
            ForeignBacking::AnonymousShared => (Expect::AnonymousShared, Backing::SharedAnonymous),
            ForeignBacking::SharedFile { fd, offset } => match check_file(fd, offset, len) {
                Ok(expect) => (expect, Backing::Memfd),
                Err(Ok(reason)) => return Err(refuse(reason)),
                Err(Err(e)) => return Err(e),
            },
        };
        let maps = std::fs::read_to_string("/proc/self/maps")
            .map_err(|e| MemError::os("read", "/proc/self/maps", e))?;
        match check_maps(&maps, addr, end, expect) {
            Ok(()) => {}
            Err(Problem::Hugetlb) => return Err(HUGETLB),
            Err(Problem::Refuse(reason)) => return Err(refuse(reason)),
        }
        let bad = |e: lmig_core::MigrationError| MemError::InvalidRegion {
            region: id,
            detail: e.to_string(),
        };
        let mut info = RegionInfo::new(id, len, page as u32).map_err(bad)?;
        if memory.keeps_address() {
            info = info.at_fixed_addr(addr).map_err(bad)?;
        }
        let memfd = match backing {
            ForeignBacking::SharedFile { fd, .. } => Some(
                fd.as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| MemError::os("fcntl(F_DUPFD_CLOEXEC)", format!("fd {fd:?}"), e))?,
            ),
            _ => None,
        };
        let map = memory
            .into_mapping()
            .ok_or(refuse(AdoptRefusal::NullAddress))?;
        Ok(Self {
            info,
            backing: kind,
            thp: false,
            map,
            memfd,
            file_offset: offset,
            free: super::free::FreePages::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
555555554000-555555556000 r--p 00000000 00:1f 1234    /usr/bin/prog
7f0000000000-7f0000004000 rw-p 00000000 00:00 0 
7f0000004000-7f0000008000 rw-p 00000000 00:00 0 
7f0000010000-7f0000014000 rw-s 00002000 00:01 77     /memfd:guest (deleted)
7f0000014000-7f0000018000 rw-s 00000000 00:01 88     /dev/zero (deleted)
7f0000018000-7f000001a000 r--p 00000000 00:00 0 
7f0000200000-7f0000400000 rw-p 00000000 00:0f 99     /anon_hugepage (deleted)
";

    fn file(offset: u64) -> Expect {
        Expect::File {
            dev: (0, 1),
            ino: 77,
            offset,
        }
    }

    fn refusal(r: Result<(), Problem>) -> AdoptRefusal {
        match r {
            Err(Problem::Refuse(reason)) => reason,
            Err(Problem::Hugetlb) => panic!("hugetlb"),
            Ok(()) => panic!("accepted"),
        }
    }

    #[test]
    fn maps_walk_accepts_what_is_there_and_names_the_rest() {
        let private = Expect::AnonymousPrivate;
        // Two adjacent entries cover one range.
        assert!(check_maps(MAPS, 0x7f0000002000, 0x7f0000008000, private).is_ok());
        assert!(check_maps(MAPS, 0x7f0000011000, 0x7f0000013000, file(0x3000)).is_ok());
        assert!(
            check_maps(
                MAPS,
                0x7f0000014000,
                0x7f0000018000,
                Expect::AnonymousShared
            )
            .is_ok()
        );
        assert_eq!(
            refusal(check_maps(MAPS, 0x7f0000004000, 0x7f000000c000, private)),
            AdoptRefusal::NotMapped { at: 0x7f0000008000 }
        );
        assert_eq!(
            refusal(check_maps(MAPS, 0x7e0000000000, 0x7e0000001000, private)),
            AdoptRefusal::NotMapped { at: 0x7e0000000000 }
        );
        assert!(matches!(
            refusal(check_maps(MAPS, 0x7f0000018000, 0x7f0000019000, private)),
            AdoptRefusal::NotWritable {
                at: 0x7f0000018000,
                ..
            }
        ));
        // Wrong offset, wrong kind.
        assert!(matches!(
            refusal(check_maps(MAPS, 0x7f0000011000, 0x7f0000012000, file(0))),
            AdoptRefusal::BackingMismatch {
                at: 0x7f0000011000,
                ..
            }
        ));
        assert!(matches!(
            refusal(check_maps(MAPS, 0x7f0000010000, 0x7f0000011000, private)),
            AdoptRefusal::BackingMismatch { .. }
        ));
        assert!(matches!(
            refusal(check_maps(
                MAPS,
                0x7f0000000000,
                0x7f0000001000,
                Expect::AnonymousShared
            )),
            AdoptRefusal::BackingMismatch { .. }
        ));
        assert!(matches!(
            check_maps(MAPS, 0x7f0000200000, 0x7f0000400000, private),
            Err(Problem::Hugetlb)
        ));
    }
}
