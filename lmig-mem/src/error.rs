//! [`MemError`], the one error type of lmig-mem.

use lmig_core::model::{PageRun, RegionId};
use lmig_core::{BoxError, MigrationError};

/// Everything lmig-mem can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemError {
    /// The kernel (or this process's privileges) lacks a feature; found by a probe.
    #[error("{feature} is not supported here: needs {needs}")]
    Unsupported {
        /// The missing feature, e.g. `"PAGEMAP_SCAN"`.
        feature: &'static str,
        /// What would provide it, e.g. `"Linux >= 6.7"`.
        needs: &'static str,
    },

    /// A system call failed.
    #[error("{call} on {what} failed: {source}")]
    Os {
        /// The call, e.g. `"mmap"` or `"UFFDIO_REGISTER"`.
        call: &'static str,
        /// What it was applied to, e.g. `"region #3 (0x7f.., 1048576 bytes)"`.
        what: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },

    /// `MAP_FIXED_NOREPLACE` found the address range already in use.
    #[error("cannot map region {region} at {addr:#x} ({len} bytes): the range is already mapped")]
    AddressInUse {
        /// The region.
        region: RegionId,
        /// The requested address.
        addr: u64,
        /// The requested length.
        len: u64,
    },

    /// A region description is impossible (length, page size, address).
    #[error("region {region}: {detail}")]
    InvalidRegion {
        /// The region.
        region: RegionId,
        /// What is wrong.
        detail: String,
    },

    /// Memory offered to [`Region::adopt`](crate::Region::adopt) was refused
    /// before anything was registered.
    #[error("region {region}: cannot adopt {len} bytes at {addr:#x}: {reason}")]
    AdoptRefused {
        /// The region it was to become.
        region: RegionId,
        /// The address offered.
        addr: u64,
        /// The length offered.
        len: u64,
        /// Why.
        reason: AdoptRefusal,
    },

    /// Two regions of one set share addresses.
    #[error("regions {first} and {second} overlap at {addr:#x}")]
    RegionsOverlap {
        /// The region starting lower.
        first: RegionId,
        /// The region starting inside it.
        second: RegionId,
        /// Where `second` starts.
        addr: u64,
    },

    /// Two regions with one id.
    #[error("region {region} registered twice")]
    DuplicateRegion {
        /// The id.
        region: RegionId,
    },

    /// A region id that is not in the set.
    #[error("region {region} is not registered")]
    UnknownRegion {
        /// The id.
        region: RegionId,
    },

    /// A page run that does not lie inside its region.
    #[error("page run {run} lies outside region {} ({region_pages} pages)", run.region)]
    PageOutsideRegion {
        /// The run.
        run: PageRun,
        /// Pages in the region.
        region_pages: u64,
    },

    /// A byte offset range that does not lie inside the region.
    #[error("bytes {offset}..{offset}+{len} lie outside region {region} ({region_len} bytes)")]
    OutOfBounds {
        /// The region.
        region: RegionId,
        /// Start offset.
        offset: usize,
        /// Length.
        len: usize,
        /// The region's length.
        region_len: usize,
    },

    /// A byte range refused by [`Region::declare_free`](crate::Region::declare_free)
    /// or [`Region::declare_used`](crate::Region::declare_used) (a range
    /// outside the region is [`MemError::OutOfBounds`]).
    #[error("region {region}: bytes {offset}..{offset}+{len} refused: {reason}")]
    BadRange {
        /// The region.
        region: RegionId,
        /// Start offset.
        offset: usize,
        /// Length.
        len: usize,
        /// Why.
        reason: &'static str,
    },

    /// A buffer whose length is not the run's byte length.
    #[error("page run {run} is {expected} bytes, the buffer holds {got}")]
    LengthMismatch {
        /// The run.
        run: PageRun,
        /// Bytes the run covers.
        expected: usize,
        /// Bytes supplied.
        got: usize,
    },

    /// The source's layout does not match this side's regions.
    #[error("region layout mismatch: {detail}")]
    LayoutMismatch {
        /// The first difference, in words.
        detail: String,
    },

    /// A sink used before `prepare` mapped or checked its regions.
    #[error("memory sink used before prepare()")]
    NotPrepared,

    /// `end_postcopy` while pages are still missing: unregistering would let
    /// the program read zeros where its data belongs.
    #[error("post-copy cannot end: {missing} pages are still missing")]
    PostcopyIncomplete {
        /// Pages not placed yet.
        missing: u64,
    },

    /// A post-copy residency request while this many ranges are waited for
    /// already ([`crate::postcopy::MAX_RESIDENCY_WAITERS`]).
    #[error("post-copy residency: {waiting} ranges are waited for already")]
    ResidencyWaiters {
        /// Ranges waited for.
        waiting: usize,
    },

    /// A tracker method called in the wrong state.
    #[error("{tracker}: {detail}")]
    TrackerState {
        /// The tracker's name.
        tracker: &'static str,
        /// What was wrong.
        detail: &'static str,
    },

    /// No automatic dirty tracker works on this kernel.
    #[error(
        "no automatic dirty tracker works here ({reasons}); mark writes with ManualTracker or hand over a dirty log with DirtyLogTracker"
    )]
    NoTracker {
        /// Why each candidate was rejected.
        reasons: String,
    },

    /// A VMM's dirty-log callback failed.
    #[error("dirty log of region {region} failed: {source}")]
    DirtyLog {
        /// The region.
        region: RegionId,
        /// The callback's error.
        #[source]
        source: BoxError,
    },
}

/// Why [`Region::adopt`](crate::Region::adopt) refused memory (in
/// [`MemError::AdoptRefused`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdoptRefusal {
    /// The address is null.
    NullAddress,
    /// The length is zero.
    ZeroLength,
    /// The address, the length or the file offset is not a multiple of the
    /// page size.
    Unaligned {
        /// The page size they must be multiples of.
        page_size: u64,
    },
    /// `addr + len` does not fit in the address space.
    WrapsAround,
    /// Part of the range is not mapped (`/proc/self/maps` shows nothing there).
    NotMapped {
        /// The first address not mapped.
        at: u64,
    },
    /// Part of the range is mapped without read and write access.
    NotWritable {
        /// Where that mapping starts (or the range, if later).
        at: u64,
        /// Its permissions as `/proc/self/maps` shows them, e.g. `r--p`.
        perms: String,
    },
    /// The range is not mapped with the backing named.
    BackingMismatch {
        /// Where that mapping starts (or the range, if later).
        at: u64,
        /// What was expected and what `/proc/self/maps` shows.
        detail: String,
    },
    /// The file ends before `offset + len`: touching the end would raise `SIGBUS`.
    FileTooShort {
        /// The file's size.
        file_len: u64,
        /// `offset + len`.
        needed: u64,
    },
}

impl std::fmt::Display for AdoptRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NullAddress => write!(f, "the address is null"),
            Self::ZeroLength => write!(f, "the length is zero"),
            Self::Unaligned { page_size } => write!(
                f,
                "address, length and file offset must be multiples of the page size {page_size}"
            ),
            Self::WrapsAround => write!(f, "the range wraps around the address space"),
            Self::NotMapped { at } => write!(f, "nothing is mapped at {at:#x}"),
            Self::NotWritable { at, perms } => {
                write!(
                    f,
                    "the mapping at {at:#x} is {perms}, not readable and writable"
                )
            }
            Self::BackingMismatch { at, detail } => write!(f, "at {at:#x}: {detail}"),
            Self::FileTooShort { file_len, needed } => write!(
                f,
                "the file is {file_len} bytes, the mapping needs {needed}"
            ),
        }
    }
}

impl MemError {
    /// An `Os` error with the current errno context.
    pub(crate) fn os(call: &'static str, what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Os {
            call,
            what: what.into(),
            source,
        }
    }

    /// Opening a userfaultfd for `feature` failed: without the privilege
    /// (`EPERM`) or the system call (`ENOSYS`) it is
    /// [`MemError::Unsupported`], else an OS error of `what`.
    pub(crate) fn userfaultfd_open(
        feature: &'static str,
        what: &'static str,
        source: std::io::Error,
    ) -> Self {
        match source.raw_os_error() {
            Some(libc::EPERM) | Some(libc::ENOSYS) => Self::Unsupported {
                feature,
                needs: "userfaultfd: CAP_SYS_PTRACE, vm.unprivileged_userfaultfd = 1 or access to /dev/userfaultfd",
            },
            _ => Self::os("userfaultfd", what, source),
        }
    }
}

impl From<MemError> for MigrationError {
    fn from(e: MemError) -> Self {
        match e {
            MemError::Unsupported { feature, needs } => {
                MigrationError::Unsupported { feature, needs }
            }
            MemError::UnknownRegion { region } => MigrationError::UnknownRegion { region },
            MemError::PageOutsideRegion { run, region_pages } => {
                MigrationError::PageOutsideRegion { run, region_pages }
            }
            MemError::LayoutMismatch { detail } => MigrationError::LayoutMismatch { detail },
            other => MigrationError::backend("lmig-mem", other),
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = MemError> = std::result::Result<T, E>;
