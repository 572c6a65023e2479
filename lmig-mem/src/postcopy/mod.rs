//! Post-copy on the destination: the program resumes before every page
//! arrived, and a touch of a missing page blocks the toucher until the page
//! is placed.
//!
//! [`RegionSet`](crate::RegionSet) (and [`DestinationRegions`](crate::DestinationRegions),
//! which holds one) implements the post-copy half of
//! [`MemorySink`](lmig_core::MemorySink) with a userfaultfd of its own
//! (separate from the write-protect tracker's):
//!
//! * `begin_postcopy(missing)` drops the stale content of the missing pages
//!   and registers every region with the userfaultfd:
//!
//!   | backing | stale pages dropped with | registered | pages placed with |
//!   |---|---|---|---|
//!   | private anonymous | `MADV_DONTNEED` | `MISSING` | `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` |
//!   | shared anonymous | `MADV_REMOVE` | `MISSING` (`UFFD_FEATURE_MISSING_SHMEM`) | `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` |
//!   | memfd | `MADV_DONTNEED` (page cache kept) | `MISSING` + `MINOR` (`UFFD_FEATURE_MINOR_SHMEM`) | write through a second mapping of the memfd, then `UFFDIO_CONTINUE` |
//!   | memfd without `MINOR_SHMEM` | `MADV_REMOVE` | `MISSING` | `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` |
//!
//!   For memfd regions the minor-fault path writes the page once into the
//!   page cache and only maps it: `UFFDIO_CONTINUE` does not copy, so it
//!   places pages faster than `UFFDIO_COPY`.
//! * `wait_fault(timeout)` reads fault messages (optionally busy-polling for
//!   [`PostcopyOptions::spin`] before it blocks in `poll`) and returns the
//!   missing page that was touched (or, with no fault waiting, a run the
//!   program asked for through [`Residency`]). A fault on a page that is no longer
//!   missing (the same fault reported twice, or a fault racing the page's
//!   placement) is answered at once: `UFFDIO_ZEROPAGE`/`UFFDIO_CONTINUE`
//!   says `EEXIST` and the waiters are woken with `UFFDIO_WAKE`.
//! * `write_pages` / `zero_pages` fill missing pages atomically and wake the
//!   threads waiting on them. Several threads may place at once (post-copy
//!   places requested pages on one thread, pushed ones on another): a
//!   placement claims its missing pages under a short lock and fills them
//!   outside it, so a requested page never waits for a bulk chunk's copy. A
//!   fault on a page being filled is left to that fill (it wakes the waiters);
//!   a page being filled by another placement is skipped. `EEXIST` (page already there: nobody was woken)
//!   is answered with a plain copy and `UFFDIO_WAKE`; `EAGAIN` (the address
//!   space changed under the call) is retried up to [`MAX_FILL_RETRIES`]
//!   times; a partial count, positive or a negative errno, is accounted and
//!   the rest retried. No page is filled twice.
//! * [`Residency`] (from [`RegionSet::residency`](crate::RegionSet::residency)):
//!   an event-loop program asks whether a range is placed and requests it
//!   without touching it; `wait_fault` hands such requests to the session
//!   after the faults waiting (an eventfd wakes it), and the program is told through
//!   another eventfd once every page of the range is placed. A page counts
//!   as resident once its placement returned: a query racing a placement
//!   answers "not yet", and a request made after it is told when it is in
//!   (queries, requests and placements meet under one lock).
//! * `end_postcopy` unregisters (also done when the set is dropped: RAII).
//!   It refuses while pages are still missing: unregistering would make the
//!   program read zeros where its data should be.
//!
//! # Never a zero page for a missing one
//!
//! Once the program runs here, a missing page is either placed with the
//! source's content or its touchers stay blocked: no path unregisters a
//! range, closes the userfaultfd or fills a page with zeros while a page of
//! it is missing. `end_postcopy` refuses ([`MemError::PostcopyIncomplete`]);
//! zeros are placed only for pages the source said are zero
//! (`zero_pages`) or that are no longer missing (the program dropped them
//! itself); a failed fill puts its pages back into the missing set; and a
//! set dropped while pages are missing keeps its registration alive (the
//! userfaultfd is leaked on purpose), so touchers stay blocked rather than
//! read zeros. When the source is lost for good the session reports it
//! (`MigrationError::PostcopyPaused` in lmig-core) and the pages stay
//! missing until a source that comes back places them. Only before
//! `Commit`, when nothing runs on this memory, does `discard` unregister
//! with pages missing.
//!
//! # Faults taken inside the kernel
//!
//! A system call that writes into or reads from a missing page (`read(fd,
//! missing_page, n)`) takes the fault in kernel mode. With a userfaultfd
//! opened by the `userfaultfd(2)` syscall with privilege (`CAP_SYS_PTRACE`
//! or `vm.unprivileged_userfaultfd = 1`) or through `/dev/userfaultfd`, the
//! system call waits like any other toucher and completes once the page is
//! placed. With `UFFD_USER_MODE_ONLY` (the only unprivileged way since Linux
//! 5.11), kernel-mode faults are **not** delivered: the system call fails
//! with `EFAULT` (a short read/write), which most programs treat as a bug.
//! Therefore `begin_postcopy` refuses with
//! [`crate::MemError::Unsupported`] when only
//! user-mode faults are available, unless
//! [`PostcopyOptions::allow_user_mode_only`] is set by a program that knows
//! no system call of its touches region memory during post-copy.
//!
//! # Timeouts
//!
//! Nothing here waits without a bound: `wait_fault` returns after its
//! timeout, fills retry `EAGAIN` a bounded number of times. A page that never
//! arrives is the session's business: it reports a timeout (and, with
//! recovery, reconnects first).

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
#[cfg(feature = "bench-internals")]
use std::time::Instant;

use lmig_core::model::{PageRun, RegionId, RegionPages};

use crate::error::{MemError, Result};
use crate::memory::Region;
use crate::sys::uffd::{self, UffdOrigin};

mod affinity;
mod faults;
mod options;
mod residency;
#[cfg(feature = "bench-internals")]
mod served;
mod setup;

pub use affinity::{
    FaultPathAffinity, fault_path_affinity, fault_path_cpu, fault_path_together_cpu,
    set_fault_path_affinity, set_fault_path_cpu,
};
#[cfg(feature = "bench-internals")]
pub use options::FaultTrace;
pub use options::{PostcopyOptions, PostcopyStats};
use residency::{Kick, Signal, Waiters};
pub use residency::{MAX_RESIDENCY_WAITERS, Residency};
#[cfg(feature = "bench-internals")]
pub(crate) use served::note_read;
#[cfg(feature = "bench-internals")]
pub use served::{ServedRead, take_served_reads};
use setup::{Fill, Target, check_missing, open_userfaultfd};

/// Nice value the threads of the post-copy fault path ask for
/// ([`MemorySink::urgent_thread`](lmig_core::MemorySink::urgent_thread) of
/// the region sets): above the push and the program's other threads, so
/// that a fault does not wait for a CPU. Needs `CAP_SYS_NICE`; without it
/// they stay as they are.
pub const URGENT_THREAD_NICE: i32 = -10;

/// Nice value the bulk threads of post-copy take
/// ([`MemorySink::background_thread`](lmig_core::MemorySink::background_thread)
/// and [`MemorySource::background_thread`](lmig_core::MemorySource::background_thread)
/// of the region sets): the push, the placement of pushed pages and the
/// digest hashing then use the CPU the program and the fault path leave
/// (a nice-10 thread gets about a tenth of a CPU against a nice-0 one that
/// wants it, all of it when nobody else does). Raising a thread's own nice
/// value needs no privilege.
pub const BACKGROUND_THREAD_NICE: i32 = 10;

/// EEVDF slice the threads of the post-copy fault path ask for
/// (`sched_attr::sched_runtime`, Linux 6.12 and later): shorter than every
/// other thread's (0.75 ms and more), so that when a fault, a request or a
/// reply wakes one of them it preempts the thread on the CPU at once.
/// Its nice value alone gives it a larger share of the CPU, not the CPU
/// now: measured on 2 busy vCPUs, a fault waited up to 2.4 ms before the
/// fault thread read it.
pub const URGENT_THREAD_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// Raise the calling thread to [`URGENT_THREAD_NICE`] with the short
/// [`URGENT_THREAD_SLICE`] if allowed (said at debug level either way:
/// without `CAP_SYS_NICE` it keeps its priority; a kernel without custom
/// slices gets the nice value alone), and hold it on the CPU chosen with
/// [`set_fault_path_cpu`] if one was.
pub(crate) fn urgent_thread() {
    #[cfg(feature = "bench-internals")]
    served::mark_fault_path_thread();
    affinity::hold_on_fault_path_cpu();
    let slice = URGENT_THREAD_SLICE.as_nanos() as u64;
    match crate::sys::set_thread_slice(URGENT_THREAD_NICE, slice) {
        Ok(()) => {
            debug!(
                nice = URGENT_THREAD_NICE,
                slice_us = slice / 1000,
                "post-copy fault path: priority raised, short slice"
            );
            return;
        }
        Err(e) => debug!(error = %e, "post-copy fault path: no short slice"),
    }
    match crate::sys::set_thread_nice(URGENT_THREAD_NICE) {
        Ok(()) => debug!(
            nice = URGENT_THREAD_NICE,
            "post-copy fault path: priority raised"
        ),
        Err(e) => debug!(error = %e, "post-copy fault path: priority kept (no CAP_SYS_NICE)"),
    }
}

/// Lower the calling thread to [`BACKGROUND_THREAD_NICE`].
pub(crate) fn background_thread() {
    if let Err(e) = crate::sys::set_thread_nice(BACKGROUND_THREAD_NICE) {
        debug!(error = %e, "post-copy bulk thread: priority kept");
    }
}

/// Most `EAGAIN` answers one fill tolerates before it reports an error.
pub const MAX_FILL_RETRIES: u32 = 10_000;

/// Most faulted pages remembered in [`PostcopyStats::faulted`].
const MAX_RECORDED_FAULTS: usize = 1 << 20;

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    requested: AtomicU64,
    stale: AtomicU64,
    present: AtomicU64,
    retries: AtomicU64,
    placed: AtomicU64,
    also_woke: AtomicU64,
}

/// Post-copy state of a [`RegionSet`](crate::RegionSet): the userfaultfd,
/// the registered ranges and the pages still missing.
#[derive(Debug)]
pub(crate) struct Postcopy {
    /// Shared only to be leaked on purpose (see `Drop`).
    uffd: Arc<OwnedFd>,
    origin: UffdOrigin,
    options: PostcopyOptions,
    targets: Vec<Target>,
    pages: Mutex<PageState>,
    queued: Mutex<VecDeque<PageRun>>,
    /// Runs the program asked for without faulting ([`Residency::request`]),
    /// handed to the session after the faults waiting.
    asked: Mutex<VecDeque<PageRun>>,
    /// The runs put into `asked` since it was last found empty (taken or
    /// not): a run asked for again meanwhile is in the queue or on its way
    /// to the source, and is not queued twice. Locked inside `asked`.
    asked_index: Mutex<HashSet<PageRun>>,
    /// Wakes `wait_fault` when a run is asked for.
    kick: Kick,
    /// The program said its parked work ran ([`Residency::settled`]):
    /// `wait_fault` returns at once (once), so that the session passes it on.
    settled: std::sync::atomic::AtomicBool,
    /// Readable while residency waiters are ready.
    ready: Signal,
    counters: Counters,
    faulted: Mutex<Vec<(RegionId, u64)>>,
    #[cfg(feature = "bench-internals")]
    trace: Mutex<Vec<FaultTrace>>,
    registered: Mutex<bool>,
}

/// Pages not placed yet: still missing, or claimed by a placement in progress.
#[derive(Debug)]
struct PageState {
    missing: RegionPages,
    filling: RegionPages,
    /// Ranges the program waits for ([`Residency::request`]).
    waiters: Waiters,
}

impl PageState {
    /// No page of `run` is missing or being placed.
    fn resident(&self, run: &PageRun) -> bool {
        resident_in(&self.missing, &self.filling, run)
    }
}

/// No page of `run` is in `missing` or `filling`.
fn resident_in(missing: &RegionPages, filling: &RegionPages, run: &PageRun) -> bool {
    let none_in = |pages: &RegionPages| {
        pages
            .get(run.region)
            .map_or(true, |s| s.runs_in(run.first, run.end()).next().is_none())
    };
    none_in(missing) && none_in(filling)
}

/// What a placement does with one page of its run.
#[derive(Copy, Clone, PartialEq, Eq)]
enum PageAction {
    /// Already placed: a plain write.
    Plain,
    /// Missing: claimed, filled with the userfaultfd.
    Fill,
    /// Being filled by another placement: left to it.
    Skip,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Postcopy {
    /// Drop the stale content of `missing` and register `regions`.
    pub(crate) fn begin(
        regions: &[Region],
        missing: &RegionPages,
        options: PostcopyOptions,
    ) -> Result<Self> {
        check_missing(regions, missing)?;
        let (fd, origin, minor) = open_userfaultfd(regions, options)?;
        let targets = regions
            .iter()
            .map(|r| Target::prepare(r, minor, missing))
            .collect::<Result<Vec<_>>>()?;
        let pc = Self {
            uffd: Arc::new(fd),
            origin,
            options,
            targets,
            pages: Mutex::new(PageState {
                missing: missing.clone(),
                filling: {
                    let mut none = missing.clone();
                    none.clear();
                    none
                },
                waiters: Waiters::default(),
            }),
            queued: Mutex::new(VecDeque::new()),
            asked: Mutex::new(VecDeque::new()),
            asked_index: Mutex::new(HashSet::new()),
            kick: Kick::new()?,
            settled: std::sync::atomic::AtomicBool::new(false),
            ready: Signal::new()?,
            counters: Counters::default(),
            faulted: Mutex::new(Vec::new()),
            #[cfg(feature = "bench-internals")]
            trace: Mutex::new(Vec::new()),
            registered: Mutex::new(true),
        };
        pc.register()?;
        Ok(pc)
    }

    /// Register every target; on a failure unregister those done.
    fn register(&self) -> Result<()> {
        for (i, t) in self.targets.iter().enumerate() {
            let mode = match t.fill {
                Fill::Copy => uffd::UFFDIO_REGISTER_MODE_MISSING,
                Fill::Continue { .. } => {
                    uffd::UFFDIO_REGISTER_MODE_MISSING | uffd::UFFDIO_REGISTER_MODE_MINOR
                }
            };
            if let Err(e) = uffd::register(self.uffd.as_fd(), t.start, t.len, mode) {
                for done in &self.targets[..i] {
                    if let Err(e) = uffd::unregister(self.uffd.as_fd(), done.start, done.len) {
                        debug!(error = %e, "rolling back a failed post-copy start: unregistering a range failed");
                    }
                }
                *lock(&self.registered) = false;
                return Err(MemError::os(
                    "UFFDIO_REGISTER (missing)",
                    format!("region {} ({:#x}, {} bytes)", t.id, t.start, t.len),
                    e,
                ));
            }
        }
        Ok(())
    }

    fn target(&self, id: RegionId) -> Result<&Target> {
        self.targets
            .iter()
            .find(|t| t.id == id)
            .ok_or(MemError::UnknownRegion { region: id })
    }

    /// Pages still missing.
    pub(crate) fn missing_pages(&self) -> u64 {
        let st = lock(&self.pages);
        st.missing.count() + st.filling.count()
    }

    /// The pages not placed yet (missing, or being filled), as a copy.
    pub(crate) fn missing_set(&self) -> RegionPages {
        let st = lock(&self.pages);
        let mut pages = st.missing.clone();
        pages.union_with(&st.filling);
        pages
    }

    /// Nobody will call [`Self::wait_fault`] any more (the source is lost
    /// for good) while pages are missing: make every page that is neither
    /// missing nor being filled present — a page never touched (a zero
    /// page the sink placed as "no work") gets the zero page, one already
    /// there is left as it is — so that it reads without a fault handler.
    /// Missing pages are never touched here.
    pub(crate) fn hold_missing(&self) -> Result<()> {
        for t in &self.targets {
            let placed: Vec<(u64, u64)> = {
                let st = lock(&self.pages);
                let taken = |p: u64| {
                    st.missing.get(t.id).is_ok_and(|s| s.contains(p))
                        || st.filling.get(t.id).is_ok_and(|s| s.contains(p))
                };
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for p in (0..t.len / t.page_size).filter(|&p| !taken(p)) {
                    match runs.last_mut() {
                        Some((first, count)) if *first + *count == p => *count += 1,
                        _ => runs.push((p, 1)),
                    }
                }
                runs
            };
            for (first, count) in placed {
                let (addr, len) = (t.start + first * t.page_size, count * t.page_size);
                let filled = match &t.fill {
                    Fill::Copy => uffd::zeropage(self.uffd.as_fd(), addr, len),
                    Fill::Continue { .. } => uffd::cont(self.uffd.as_fd(), addr, len),
                };
                // Some page of the run was there already: page by page.
                if filled.error.is_some() {
                    for p in first..first + count {
                        self.answer_present(t, p)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Place `run` (already checked against `region`): `data` is its content,
    /// `None` means zeros. Pages no longer missing are written plainly,
    /// pages another placement is filling right now are left to it.
    pub(crate) fn place(&self, region: &Region, run: &PageRun, data: Option<&[u8]>) -> Result<()> {
        #[cfg(feature = "bench-internals")]
        let began = Instant::now();
        let t = self.target(run.region)?;
        let ps = t.page_size as usize;
        let actions: Vec<PageAction> = {
            let mut st = lock(&self.pages);
            let PageState {
                missing, filling, ..
            } = &mut *st;
            let set = missing
                .get_mut(run.region)
                .map_err(|_| MemError::UnknownRegion { region: run.region })?;
            let busy = filling
                .get_mut(run.region)
                .map_err(|_| MemError::UnknownRegion { region: run.region })?;
            let actions = (run.first..run.end())
                .map(|p| {
                    if set.contains(p) {
                        PageAction::Fill
                    } else if busy.contains(p) {
                        PageAction::Skip
                    } else {
                        PageAction::Plain
                    }
                })
                .collect();
            // Claim the missing pages: from now on they are this call's.
            let claimed: Vec<(u64, u64)> = set.runs_in(run.first, run.end()).collect();
            for (f, c) in claimed {
                set.remove_range(f, c);
                busy.insert_range(f, c);
            }
            actions
        };
        let mut result = Ok(());
        let mut i = 0usize;
        while i < actions.len() {
            let action = actions[i];
            let mut j = i + 1;
            while j < actions.len() && actions[j] == action {
                j += 1;
            }
            let (first, count) = (run.first + i as u64, (j - i) as u64);
            let sub = data.map(|d| &d[i * ps..j * ps]);
            if result.is_ok() {
                result = match action {
                    // Not missing, but perhaps never faulted in (the sink
                    // leaves pages that only ever received zeros untouched):
                    // a plain write could fault into our own userfaultfd
                    // with nobody yet serving it. Place it the same atomic
                    // way; a page that is there (EEXIST) is written plainly.
                    PageAction::Plain => self.fill(region, t, first, count, sub, false),
                    PageAction::Fill => self.fill(region, t, first, count, sub, true),
                    PageAction::Skip => Ok(()),
                };
            }
            if action == PageAction::Fill {
                // Release the claim; a failed fill leaves its pages missing
                // (a later copy of pages it did place answers EEXIST).
                let mut st = lock(&self.pages);
                if let Ok(busy) = st.filling.get_mut(run.region) {
                    busy.remove_range(first, count);
                }
                if result.is_ok() {
                    self.counters.placed.fetch_add(count, Ordering::Relaxed);
                    #[cfg(feature = "bench-internals")]
                    self.trace_placed(run, first, count, began);
                } else if let Ok(set) = st.missing.get_mut(run.region) {
                    set.insert_range(first, count);
                }
                if result.is_ok() && !st.waiters.is_empty() {
                    let PageState {
                        missing,
                        filling,
                        waiters,
                    } = &mut *st;
                    let in_place = |r: &PageRun| resident_in(missing, filling, r);
                    if waiters.placed(run.region, first, count, in_place) {
                        self.ready.signal();
                    }
                }
            }
            i = j;
        }
        result
    }

    /// Fill `count` pages from `first` and wake their waiters. `missing`:
    /// the pages were missing (a page found there is counted as
    /// `already_present`).
    fn fill(
        &self,
        region: &Region,
        t: &Target,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
        missing: bool,
    ) -> Result<()> {
        let ps = t.page_size;
        let total = count * ps;
        if let Fill::Continue { alias } = &t.fill {
            let off = (first * ps) as usize;
            let ok = match data {
                Some(d) => alias.copy_in(off, d),
                None => alias.zero(off, total as usize),
            };
            if !ok {
                return Err(MemError::OutOfBounds {
                    region: t.id,
                    offset: off,
                    len: total as usize,
                    region_len: t.len as usize,
                });
            }
        }
        let mut done = 0u64;
        let mut retries = 0u32;
        while done < total {
            let addr = t.start + first * ps + done;
            let filled = match (&t.fill, data) {
                (Fill::Copy, Some(d)) => uffd::copy(self.uffd.as_fd(), addr, &d[done as usize..]),
                (Fill::Copy, None) => uffd::zeropage(self.uffd.as_fd(), addr, total - done),
                (Fill::Continue { .. }, _) => uffd::cont(self.uffd.as_fd(), addr, total - done),
            };
            done += filled.bytes / ps * ps;
            let Some(err) = filled.error else { continue };
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    // The page is already there and nobody was woken: write
                    // it plainly (it cannot fault) and wake its waiters.
                    let page = first + done / ps;
                    if missing {
                        self.counters.present.fetch_add(1, Ordering::Relaxed);
                    }
                    if let (Fill::Copy, Some(d)) = (&t.fill, data) {
                        let off = done as usize;
                        region.write_at((page * ps) as usize, &d[off..off + ps as usize])?;
                    } else if let (Fill::Copy, None) = (&t.fill, data) {
                        region.zero_at((page * ps) as usize, ps as usize)?;
                    }
                    self.wake(t, page, 1)?;
                    done += ps;
                }
                Some(libc::EAGAIN) => {
                    if filled.bytes == 0 {
                        retries += 1;
                        self.counters.retries.fetch_add(1, Ordering::Relaxed);
                        if retries > MAX_FILL_RETRIES {
                            return Err(MemError::os(
                                "UFFDIO_COPY/ZEROPAGE/CONTINUE",
                                format!(
                                    "region {} page {}: still EAGAIN after {MAX_FILL_RETRIES} retries",
                                    t.id,
                                    first + done / ps
                                ),
                                err,
                            ));
                        }
                        std::thread::yield_now();
                    }
                }
                _ => {
                    let call = match (&t.fill, data) {
                        (Fill::Copy, Some(_)) => "UFFDIO_COPY",
                        (Fill::Copy, None) => "UFFDIO_ZEROPAGE",
                        _ => "UFFDIO_CONTINUE",
                    };
                    return Err(MemError::os(
                        call,
                        format!("region {} page {}", t.id, first + done / ps),
                        err,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Note the placement of traced faulted pages in `first..first + count`
    /// (of `run`, whose placement began at `began`); only the recent end of
    /// the trace is searched.
    #[cfg(feature = "bench-internals")]
    fn trace_placed(&self, run: &PageRun, first: u64, count: u64, began: Instant) {
        let now = Instant::now();
        let mut trace = lock(&self.trace);
        let from = trace.len().saturating_sub(64);
        for t in &mut trace[from..] {
            if t.placed_at.is_none()
                && t.region == run.region
                && (first..first + count).contains(&t.page)
            {
                t.placed_at = Some(now);
                t.place_began = Some(began);
                t.placed_with = u64::from(run.count);
            }
        }
    }

    /// Unregister every region (threads waiting on a fault retry it). Refuses
    /// while pages are missing unless `force`.
    pub(crate) fn end(&self, force: bool) -> Result<()> {
        let missing = self.missing_pages();
        if missing > 0 && !force {
            return Err(MemError::PostcopyIncomplete { missing });
        }
        let mut registered = lock(&self.registered);
        if !*registered {
            return Ok(());
        }
        let mut first_err = None;
        for t in &self.targets {
            if let Err(e) = uffd::unregister(self.uffd.as_fd(), t.start, t.len) {
                first_err.get_or_insert(MemError::os(
                    "UFFDIO_UNREGISTER",
                    format!("region {}", t.id),
                    e,
                ));
            }
        }
        *registered = false;
        first_err.map_or(Ok(()), Err)
    }

    /// Statistics so far.
    pub(crate) fn stats(&self) -> PostcopyStats {
        let c = &self.counters;
        PostcopyStats {
            origin: Some(self.origin),
            minor_faults: self
                .targets
                .iter()
                .any(|t| matches!(t.fill, Fill::Continue { .. })),
            faults: c.faults.load(Ordering::Relaxed),
            requested: c.requested.load(Ordering::Relaxed),
            stale_faults: c.stale.load(Ordering::Relaxed),
            already_present: c.present.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            placed: c.placed.load(Ordering::Relaxed),
            also_woke: c.also_woke.load(Ordering::Relaxed),
            missing: self.missing_pages(),
            faulted: lock(&self.faulted).clone(),
            #[cfg(feature = "bench-internals")]
            fault_trace: lock(&self.trace).clone(),
        }
    }
}

impl Drop for Postcopy {
    /// Unregisters when every page is in place. With pages still missing the
    /// registration must outlive this value: unregistering, or closing the
    /// last descriptor of the userfaultfd, would wake the blocked touchers
    /// and let them read zeros. The descriptor is leaked instead: they stay blocked (until the process ends), never wrong.
    fn drop(&mut self) {
        if self.missing_pages() == 0 || !*lock(&self.registered) {
            if let Err(e) = self.end(true) {
                debug!(error = %e, "dropping post-copy: ending it failed");
            }
            return;
        }
        std::mem::forget(Arc::clone(&self.uffd));
    }
}
