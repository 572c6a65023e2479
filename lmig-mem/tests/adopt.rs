//! Regions over memory the program mapped itself (`Region::adopt`), the way
//! a VMM hands over its guest memory: an anonymous private area and a
//! window of a memfd at a non-zero file offset, on both sides.
//!
//! Whole sessions over an in-process channel pair with real kernel
//! mechanisms: pre-copy with the uffd-wp + `PAGEMAP_SCAN` tracker while a
//! writer runs, and pure post-copy (userfaultfd missing faults on the
//! anonymous area, minor faults + `UFFDIO_CONTINUE` through a second
//! mapping of the memfd at the window's offset). Every byte is checked, the
//! memfd's bytes outside the window must stay untouched, and the areas must
//! stay mapped after lmig let go of them. Bad input is refused with a typed
//! error before anything is registered; hugetlbfs memory with a typed
//! `Unsupported`.
//!
//! Needs userfaultfd (root here): fails loudly without it;
//! `LMIG_SKIP_PRIVILEGED=1` turns that into a visible skip when not root.
//! No timing is asserted; every loop is bounded.

mod common;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Area, adopt, file_bytes, memfd, shared_file};
use lmig_core::model::{PageRun, RegionId, RegionPages};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, Mode, Source, SourceConfig};
use lmig_core::testing::{NullProgram, channel_pair};
use lmig_core::{DirtyTracker, MemorySource, StateSink, StateSource};
use lmig_mem::{
    AdoptRefusal, ForeignBacking, ManualTracker, MemError, PostcopyOptions, Region, RegionSet,
    UffdWpTracker,
};

const A: RegionId = RegionId(1);
const B: RegionId = RegionId(2);
/// Pages of the anonymous area.
const A_PAGES: usize = 256;
/// Pages of the memfd window; the file holds three windows, the middle one mapped.
const W: usize = 96;
/// What the last third of each memfd holds (outside the window).
const SENTINEL: u8 = 0x5A;

fn ps() -> usize {
    lmig_mem::page_size()
}

fn privileged(what: &str, e: &dyn std::fmt::Display) -> bool {
    // Skips only without root (the shared rule); as root this is a failure.
    if !lmig_core::testing::privileged(what, &e.to_string()) {
        return false;
    }
    panic!("{what}: userfaultfd unavailable: {e}");
}

/// Page `p` of region `id`: a pattern, every seventh page zero.
fn page(id: RegionId, p: usize) -> Vec<u8> {
    let mut v = vec![0u8; ps()];
    if p % 7 == 3 {
        return v;
    }
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i ^ p.wrapping_mul(2_654_435_761) ^ (id.0 as usize * 977)) as u8;
    }
    v[..8].copy_from_slice(&(p as u64).to_le_bytes());
    v
}

/// One side's program memory: an anonymous area and a memfd of three
/// windows, the middle one mapped (declared before the set, dropped after).
struct Side {
    anon: Area,
    file: std::os::fd::OwnedFd,
    window: Area,
}

impl Side {
    /// The file's first window is a hole, its last holds `SENTINEL`; the
    /// areas hold `stale` (0: untouched).
    fn new(name: &str, stale: u8) -> Self {
        let anon = Area::anonymous(A_PAGES * ps(), false);
        let file = memfd(name, 3 * W * ps(), 0);
        let sentinel = vec![SENTINEL; W * ps()];
        let n = nix::sys::uio::pwrite(&file, &sentinel, (2 * W * ps()) as libc::off_t).unwrap();
        assert_eq!(n, sentinel.len());
        let window = Area::file(file.as_fd(), (W * ps()) as u64, W * ps());
        if stale != 0 {
            anon.write(0, &vec![stale; anon.len()]);
            window.write(0, &vec![stale; window.len()]);
        }
        Self { anon, file, window }
    }

    fn fill_patterns(&self) {
        for p in 0..A_PAGES {
            self.anon.write(p * ps(), &page(A, p));
        }
        for p in 0..W {
            self.window.write(p * ps(), &page(B, p));
        }
    }

    fn regions(&self) -> RegionSet {
        RegionSet::new([
            adopt(A, &self.anon, ForeignBacking::AnonymousPrivate).unwrap(),
            adopt(B, &self.window, shared_file(&self.file, (W * ps()) as u64)).unwrap(),
        ])
        .unwrap()
    }

    /// The memfd's bytes outside the mapped window are untouched.
    fn check_outside_window(&self, what: &str) {
        for (off, want) in [(0, 0), (2 * W * ps(), SENTINEL)] {
            let b = file_bytes(self.file.as_fd(), off, W * ps());
            assert!(
                b.iter().all(|&x| x == want),
                "{what}: bytes of the memfd at {off}.. outside the window were written"
            );
        }
    }
}

/// The source program: a writer rewriting pages of both regions (through
/// the program's own pointers) until paused.
struct Writer<'a> {
    stop: &'a AtomicBool,
    done: &'a AtomicBool,
}

impl StateSource for Writer<'_> {
    fn pause(&mut self) -> lmig_core::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while !self.done.load(Ordering::SeqCst) {
            if t.elapsed() > Duration::from_secs(5) {
                return Err(lmig_core::MigrationError::backend("writer", "did not stop"));
            }
            std::thread::yield_now();
        }
        Ok(())
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
}

/// Rewrites pages of the first half of each region only: the other pages
/// move in the first round alone, so what that round finds (populated pages
/// through the file offset) is checked too.
fn write_until(side: &Side, stop: &AtomicBool, done: &AtomicBool, writes: &AtomicU64) {
    let t = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(5) {
        n += 1;
        let p = (n * 7919) as usize;
        side.anon
            .write((p % (A_PAGES / 2)) * ps() + 8, &n.to_ne_bytes());
        side.window
            .write((p % (W / 2)) * ps() + 16, &n.to_ne_bytes());
        writes.store(n, Ordering::Relaxed);
        if n.is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    done.store(true, Ordering::SeqCst);
}

fn config(mode: Mode) -> SourceConfig {
    SourceConfig::default()
        .with_mode(mode)
        .with_verify(true)
        .with_ready_timeout(Duration::from_secs(20))
        .with_done_timeout(Duration::from_secs(20))
        .with_batch_pages(16)
}

/// Pre-copy with uffd-wp dirty tracking over adopted memory on both sides,
/// a writer running through the rounds; the destination's adopted memory
/// starts with stale content everywhere (so zero pages must be written too).
#[test]
fn precopy_with_uffd_wp_over_adopted_memory() {
    let src_side = Side::new("adopt-src", 0);
    src_side.fill_patterns();
    let dst_side = Side::new("adopt-dst", 0xEE);
    let src = src_side.regions();
    let dst = dst_side.regions();
    let mut tracker = match UffdWpTracker::new(&src) {
        Ok(t) => t,
        Err(e) => {
            if !privileged("precopy_with_uffd_wp_over_adopted_memory", &e) {
                return;
            }
            unreachable!()
        }
    };
    let (stop, done, writes) = (
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicU64::new(0),
    );
    let (a, b) = channel_pair(2);
    let mut dst_prog = NullProgram::default();
    let (s, d) = std::thread::scope(|sc| {
        sc.spawn(|| write_until(&src_side, &stop, &done, &writes));
        let t = Instant::now();
        while writes.load(Ordering::Relaxed) == 0 && t.elapsed() < Duration::from_secs(2) {
            std::thread::yield_now();
        }
        let d = sc.spawn(|| Destination::new(&b, &dst, &mut dst_prog).run());
        let program = Writer {
            stop: &stop,
            done: &done,
        };
        let s = Source::new(&a, &src, &mut tracker, program)
            .with_config(config(Mode::Precopy))
            .run();
        stop.store(true, Ordering::SeqCst);
        (s, d.join().unwrap())
    });
    let s = s.expect("source");
    let d = d.expect("destination");
    assert_eq!(s.verification, Verification::Verified);
    assert_eq!(d.verification, Verification::Verified);
    assert!(writes.load(Ordering::Relaxed) > 0, "the writer ran");
    assert!(s.rounds >= 1, "{s:?}");
    // Every byte, read through the programs' own pointers.
    assert!(
        dst_side.anon.snapshot() == src_side.anon.snapshot(),
        "anonymous area differs"
    );
    assert!(
        dst_side.window.snapshot() == src_side.window.snapshot(),
        "memfd window differs"
    );
    // And through the file, at the window's offset.
    assert!(
        file_bytes(dst_side.file.as_fd(), W * ps(), W * ps()) == src_side.window.snapshot(),
        "the memfd's file content at the window's offset differs"
    );
    dst_side.check_outside_window("pre-copy");
    // Tracking over adopted memory still works after the migration.
    tracker.start().unwrap();
    src_side.anon.write(5 * ps(), b"after");
    src_side.window.write(9 * ps(), b"after");
    let mut dirty = RegionPages::empty(src.layout());
    tracker.collect(&mut dirty).unwrap();
    assert!(dirty.get(A).unwrap().contains(5) && dirty.get(B).unwrap().contains(9));
    tracker.stop().unwrap();
    let keep = src_side.anon.snapshot();
    drop(tracker);
    drop(src);
    drop(dst);
    // lmig never unmaps adopted memory, nor changes it when letting go.
    for area in [
        &src_side.anon,
        &src_side.window,
        &dst_side.anon,
        &dst_side.window,
    ] {
        assert!(area.is_mapped(), "an adopted area was unmapped");
    }
    assert!(src_side.anon.snapshot() == keep);
}

/// The destination program: touches every page as soon as it resumes.
struct Toucher<'a> {
    go: &'a AtomicBool,
}

impl StateSink for Toucher<'_> {
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.go.store(true, Ordering::Release);
        Ok(())
    }
}

/// Pure post-copy into adopted memory: missing-page faults on the
/// anonymous area, minor faults + `UFFDIO_CONTINUE` on the memfd window
/// (pages written through lmig's second mapping of the file at the
/// window's offset); the program touches pages in a scattered order.
#[test]
fn postcopy_into_adopted_memory() {
    let what = "postcopy_into_adopted_memory";
    let src_side = Side::new("adopt-pc-src", 0);
    src_side.fill_patterns();
    let dst_side = Side::new("adopt-pc-dst", 0xEE);
    let src = src_side.regions();
    let mut dst = dst_side.regions();
    dst.set_prefault(false);
    dst.set_postcopy_options(PostcopyOptions::default());
    let tracker = ManualTracker::new(&MemorySource::layout(&src));
    let (a, b) = channel_pair(2);
    let go = AtomicBool::new(false);
    let finished = AtomicBool::new(false);
    let bad = AtomicU64::new(0);
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let r = Destination::new(&b, &dst, Toucher { go: &go }).run();
            finished.store(true, Ordering::Release);
            r
        });
        let toucher = sc.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !go.load(Ordering::Acquire) {
                if finished.load(Ordering::Acquire) || Instant::now() > deadline {
                    return;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            let mut buf = vec![0u8; ps()];
            for i in 0..A_PAGES.max(W) {
                let (pa, pb) = ((i * 37) % A_PAGES, (i * 29) % W);
                dst_side.anon.read(pa * ps(), &mut buf);
                if buf != page(A, pa) {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                dst_side.window.read(pb * ps(), &mut buf);
                if buf != page(B, pb) {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let s = Source::new(&a, &src, tracker, NullProgram::default())
            .with_config(config(Mode::Postcopy))
            .run();
        if s.is_err() {
            lmig_core::Channel::shutdown(&a);
        }
        // Bounded: a failed destination leaves the toucher blocked on a
        // missing page; release it so the test reports instead of hanging.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !toucher.is_finished() && Instant::now() < deadline {
            if d.is_finished() {
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if !toucher.is_finished() {
            // Every page a poison pattern (never zeros), which the toucher
            // counts as wrong.
            let poison = vec![0xEEu8; ps()];
            for id in [A, B] {
                for p in 0..dst.get(id).unwrap().pages() {
                    let _ = dst.write_run(&PageRun::new(id, p, 1), &poison);
                }
            }
        }
        toucher.join().unwrap();
        (s, d.join().unwrap())
    });
    let d = match d {
        Ok(d) => d,
        Err(e) => {
            if !privileged(what, &e) {
                return;
            }
            unreachable!()
        }
    };
    let s = s.unwrap_or_else(|e| panic!("{what}: source failed: {e}"));
    assert_eq!(s.verification, Verification::Verified);
    assert_eq!(d.verification, Verification::Verified);
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "the program saw wrong content"
    );
    let stats = dst.postcopy_stats();
    assert!(
        stats.minor_faults,
        "the memfd window is served with minor faults: {stats:?}"
    );
    assert_eq!(stats.placed, d.postcopy_pages, "{stats:?}");
    assert_eq!(d.postcopy_pages, (A_PAGES + W) as u64);
    assert!(
        dst_side.anon.snapshot() == src_side.anon.snapshot(),
        "anonymous area differs"
    );
    assert!(
        dst_side.window.snapshot() == src_side.window.snapshot(),
        "memfd window differs"
    );
    dst_side.check_outside_window("post-copy");
    drop(src);
    drop(dst);
    assert!(dst_side.anon.is_mapped() && dst_side.window.is_mapped());
}

fn refusal(r: Result<Region, MemError>) -> AdoptRefusal {
    match r {
        Err(MemError::AdoptRefused { reason, .. }) => reason,
        Err(e) => panic!("refused with something else: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

/// After a refusal nothing is registered: a tracker over a correct adoption
/// of the same memory registers, tracks, and the content is unchanged.
fn nothing_registered(area: &Area) {
    let before = area.snapshot();
    let set = RegionSet::new([adopt(A, area, ForeignBacking::AnonymousPrivate).unwrap()]).unwrap();
    match UffdWpTracker::new(&set) {
        Ok(mut t) => {
            t.start().unwrap();
            area.write(0, b"x");
            let mut d = RegionPages::empty(set.layout());
            t.collect(&mut d).unwrap();
            assert!(d.get(A).unwrap().contains(0));
            t.stop().unwrap();
            area.write(0, &before[..1]);
        }
        Err(e) => {
            if privileged("nothing_registered", &e) {
                unreachable!()
            }
        }
    }
    drop(set);
    assert!(area.snapshot() == before);
}

#[test]
fn bad_addresses_and_lengths_are_refused_before_anything_is_registered() {
    let ps = ps();
    let area = Area::anonymous(8 * ps, false);
    area.write(0, &page(A, 1));
    let private = ForeignBacking::AnonymousPrivate;
    // SAFETY: a bad range on purpose; `adopt` refuses it before use.
    let null = unsafe { lmig_mem::ForeignMemory::new(std::ptr::null_mut(), 4 * ps) };
    assert_eq!(
        refusal(Region::adopt(A, null, private)),
        AdoptRefusal::NullAddress
    );
    assert_eq!(
        refusal(Region::adopt(A, area.memory_at(0, 0), private)),
        AdoptRefusal::ZeroLength
    );
    // SAFETY: a bad range on purpose; `adopt` refuses it before use.
    let odd = unsafe { lmig_mem::ForeignMemory::new(area.ptr().add(100), 4 * ps) };
    assert!(matches!(
        refusal(Region::adopt(A, odd, private)),
        AdoptRefusal::Unaligned { .. }
    ));
    assert!(matches!(
        refusal(Region::adopt(A, area.memory_at(0, 4 * ps + 1), private)),
        AdoptRefusal::Unaligned { .. }
    ));
    // SAFETY: a bad range on purpose; `adopt` refuses it before use.
    let wraps = unsafe { lmig_mem::ForeignMemory::new(area.ptr(), usize::MAX - 4095) };
    assert_eq!(
        refusal(Region::adopt(A, wraps, private)),
        AdoptRefusal::WrapsAround
    );
    // Not mapped: a hole punched in a mapping, and a range running past one.
    let holed = Area::anonymous(8 * ps, false);
    // SAFETY: pages 4..6 of our own mapping; nothing refers to them.
    let unmapped = unsafe { libc::munmap(holed.ptr().add(4 * ps).cast(), 2 * ps) };
    assert_eq!(unmapped, 0);
    let hole = holed.ptr() as u64 + 4 * ps as u64;
    assert!(Region::adopt(A, holed.memory_at(0, 4 * ps), private).is_ok());
    assert_eq!(
        refusal(Region::adopt(A, holed.memory_at(0, 8 * ps), private)),
        AdoptRefusal::NotMapped { at: hole }
    );
    assert_eq!(
        refusal(Region::adopt(A, holed.memory_at(2 * ps, 3 * ps), private)),
        AdoptRefusal::NotMapped { at: hole }
    );
    // Read-only memory.
    let ro = Area::read_only(4 * ps);
    assert!(matches!(
        refusal(adopt(A, &ro, private)),
        AdoptRefusal::NotWritable { perms, .. } if perms.starts_with("r-")
    ));
    // The wrong backing: shared memory named private, private named shared,
    // a memfd window named at the wrong offset, or named anonymous.
    let shared = Area::anonymous(4 * ps, true);
    assert!(matches!(
        refusal(adopt(A, &shared, private)),
        AdoptRefusal::BackingMismatch { .. }
    ));
    assert!(matches!(
        refusal(adopt(A, &area, ForeignBacking::AnonymousShared)),
        AdoptRefusal::BackingMismatch { .. }
    ));
    assert!(adopt(A, &shared, ForeignBacking::AnonymousShared).is_ok());
    let file = memfd("adopt-bad", 8 * ps, 0);
    let window = Area::file(file.as_fd(), 4 * ps as u64, 4 * ps);
    assert!(matches!(
        refusal(adopt(B, &window, shared_file(&file, 0))),
        AdoptRefusal::BackingMismatch { .. }
    ));
    assert!(matches!(
        refusal(adopt(B, &window, private)),
        AdoptRefusal::BackingMismatch { .. }
    ));
    assert!(matches!(
        refusal(adopt(B, &window, shared_file(&file, 4 * ps as u64 + 512))),
        AdoptRefusal::Unaligned { .. }
    ));
    // A file too short for the range: touching the end would be SIGBUS.
    let short = memfd("adopt-short", 8 * ps, 0);
    let short_window = Area::file(short.as_fd(), 4 * ps as u64, 4 * ps);
    nix::unistd::ftruncate(&short, (6 * ps) as libc::off_t).unwrap();
    assert_eq!(
        refusal(adopt(B, &short_window, shared_file(&short, 4 * ps as u64))),
        AdoptRefusal::FileTooShort {
            file_len: 6 * ps as u64,
            needed: 8 * ps as u64
        }
    );
    assert!(adopt(B, &window, shared_file(&file, 4 * ps as u64)).is_ok());
    // Overlapping regions: refused by the set, before any registration.
    let overlap = RegionSet::new([
        Region::adopt(A, area.memory_at(0, 4 * ps), private).unwrap(),
        Region::adopt(B, area.memory_at(2 * ps, 4 * ps), private).unwrap(),
    ]);
    assert!(matches!(
        overlap,
        Err(MemError::RegionsOverlap { first: A, second: B, addr })
            if addr == area.ptr() as u64 + 2 * ps as u64
    ));
    let same = RegionSet::new([
        Region::adopt(A, area.memory(), private).unwrap(),
        Region::adopt(B, area.memory(), private).unwrap(),
    ]);
    assert!(matches!(same, Err(MemError::RegionsOverlap { .. })));
    // Adjacent is fine.
    assert!(
        RegionSet::new([
            Region::adopt(A, area.memory_at(0, 4 * ps), private).unwrap(),
            Region::adopt(B, area.memory_at(4 * ps, 4 * ps), private).unwrap(),
        ])
        .is_ok()
    );
    assert!(area.is_mapped() && holed.memory_at(0, 4 * ps).len() == 4 * ps);
    nothing_registered(&area);
}

/// `keep_address` puts the address in the layout; without it there is none.
#[test]
fn adopted_layout_carries_the_address_when_asked() {
    let area = Area::anonymous(4 * ps(), false);
    let r = Region::adopt(
        A,
        area.memory().keep_address(),
        ForeignBacking::AnonymousPrivate,
    )
    .unwrap();
    assert_eq!(r.info().fixed_addr, Some(area.ptr() as u64));
    assert!(r.is_adopted());
    assert_eq!(r.page_size(), ps());
    let r = adopt(A, &area, ForeignBacking::AnonymousPrivate).unwrap();
    assert_eq!(r.info().fixed_addr, None);
    drop(r);
    assert!(area.is_mapped());
}

/// Sets `vm.nr_hugepages` and restores the old value when dropped (declare
/// it before the huge-page mappings, so they are gone first).
struct NrHugepages {
    old: String,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl NrHugepages {
    fn raise(by: u64) -> Self {
        let old = std::fs::read_to_string(NR_HUGEPAGES).unwrap();
        let n: u64 = old.trim().parse().unwrap();
        std::fs::write(NR_HUGEPAGES, (n + by).to_string()).unwrap();
        Self { old }
    }
}

impl Drop for NrHugepages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.trim());
    }
}

fn meminfo(key: &str) -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = m.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// hugetlbfs memory (anonymous `MAP_HUGETLB` and a `MFD_HUGETLB` memfd) is
/// refused with `Unsupported` naming hugetlbfs. The machine may have no
/// huge pages reserved: as root the test reserves two more through
/// `vm.nr_hugepages` and restores the old value afterwards (without root:
/// the shared privileged rule, a loud failure or a visible skip).
#[test]
fn hugetlbfs_memory_is_refused_as_unsupported() {
    let what = "hugetlbfs_memory_is_refused_as_unsupported";
    if !lmig_core::testing::privileged(what, "writes /proc/sys/vm/nr_hugepages") {
        return;
    }
    let huge = meminfo("Hugepagesize:") as usize * 1024;
    let _reserved = NrHugepages::raise(2);
    assert!(
        meminfo("HugePages_Free:") >= 2,
        "{what}: the kernel could not create 2 huge pages of {huge} bytes"
    );
    let is_hugetlb_refusal = |r: Result<Region, MemError>| match r {
        Err(MemError::Unsupported { feature, needs }) => {
            feature.contains("hugetlbfs") && needs.contains("UFFDIO_COPY")
        }
        Err(e) => panic!("{what}: refused with something else: {e}"),
        Ok(_) => panic!("{what}: hugetlb memory accepted"),
    };
    let anon = Area::hugetlb(huge).expect("MAP_HUGETLB with free huge pages");
    anon.write(0, b"huge");
    assert!(is_hugetlb_refusal(adopt(
        A,
        &anon,
        ForeignBacking::AnonymousPrivate
    )));
    assert!(is_hugetlb_refusal(adopt(
        A,
        &anon,
        ForeignBacking::AnonymousShared
    )));
    let fd = nix::sys::memfd::memfd_create(
        "adopt-huge",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_HUGETLB,
    )
    .unwrap();
    nix::unistd::ftruncate(&fd, huge as libc::off_t).unwrap();
    let file = Area::file(fd.as_fd(), 0, huge);
    file.write(0, b"huge");
    assert!(is_hugetlb_refusal(adopt(B, &file, shared_file(&fd, 0))));
    // Nothing was registered or changed.
    let mut b = [0u8; 4];
    anon.read(0, &mut b);
    assert_eq!(&b, b"huge");
    file.read(0, &mut b);
    assert_eq!(&b, b"huge");
}
