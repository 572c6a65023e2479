//! Free memory is never sent, with real regions and the real uffd-wp
//! tracker: pages declared free ([`Region::declare_free`]) go as zero runs,
//! unread, in pre-copy and in a post-copy freeze (never pushed, never
//! demanded); pages used again, or written while free, always go; bad
//! ranges are refused and change nothing. What the channel carried is
//! recorded page by page.
//!
//! Uses userfaultfd (write-protect; kernel-mode faults for post-copy):
//! fails loudly without it; `LMIG_SKIP_PRIVILEGED=1` turns that into a
//! visible skip when not run as root.

use std::sync::Mutex;
use std::time::Duration;

use lmig_core::model::{PageRun, PageSet, RegionId, RegionPages};
use lmig_core::protocol::{Message, PageBatch, PageData, Verification};
use lmig_core::session::{Destination, Mode, Source, SourceConfig};
use lmig_core::testing::{NullProgram, channel_pair};
use lmig_core::{Channel, Event, MemorySource};
use lmig_mem::{
    Backing, DestinationRegions, MemError, PostcopyOptions, Region, RegionOptions, RegionSet,
    UffdWpTracker,
};

const R: RegionId = RegionId(4);
const PAGES: u64 = 256;

fn ps() -> usize {
    lmig_mem::page_size()
}

fn region(backing: Backing) -> Region {
    RegionOptions::new(R, PAGES * ps() as u64)
        .backing(backing)
        .map()
        .unwrap()
}

fn pattern(p: u64, seed: u8) -> Vec<u8> {
    (0..ps())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(p as u8 ^ seed) | 1)
        .collect()
}

fn page(r: &Region, p: u64) -> Vec<u8> {
    let mut v = vec![0; ps()];
    r.read_at(p as usize * ps(), &mut v).unwrap();
    v
}

fn tracker(set: &RegionSet) -> Option<UffdWpTracker> {
    match UffdWpTracker::new(set) {
        Ok(t) => Some(t),
        Err(e) => {
            if !lmig_core::testing::privileged("free_pages", &e.to_string()) {
                return None;
            }
            panic!("userfaultfd write-protect unavailable: {e}");
        }
    }
}

/// A channel that records what it carried: page batches (run, as data?)
/// and the runs a handover leaves for post-copy.
struct Recording<'c, C> {
    inner: &'c C,
    batches: Mutex<Vec<(PageRun, bool)>>,
    postcopy: Mutex<Vec<PageRun>>,
}

impl<'c, C: Channel> Recording<'c, C> {
    fn new(inner: &'c C) -> Self {
        Self {
            inner,
            batches: Mutex::new(Vec::new()),
            postcopy: Mutex::new(Vec::new()),
        }
    }

    fn note(&self, msg: &Message) {
        match msg {
            Message::Pages(b) => self.note_batch(b),
            Message::Handover(h) => self.postcopy.lock().unwrap().extend(&h.postcopy),
            _ => {}
        }
    }

    fn note_batch(&self, b: &PageBatch) {
        let raw = matches!(b.data, PageData::Raw(_));
        self.batches.lock().unwrap().push((b.run, raw));
    }

    /// Pages carried as data, and pages carried as zero runs.
    fn carried(&self) -> (PageSet, PageSet) {
        let (mut data, mut zero) = (PageSet::new(PAGES), PageSet::new(PAGES));
        for (run, raw) in self.batches.lock().unwrap().iter() {
            let set = if *raw { &mut data } else { &mut zero };
            set.insert_range(run.first, u64::from(run.count));
        }
        (data, zero)
    }

    fn left_for_postcopy(&self) -> PageSet {
        let mut s = PageSet::new(PAGES);
        for run in self.postcopy.lock().unwrap().iter() {
            s.insert_range(run.first, u64::from(run.count));
        }
        s
    }
}

impl<C: Channel> Channel for Recording<'_, C> {
    fn send(&self, msg: &Message) -> lmig_core::Result<()> {
        self.note(msg);
        self.inner.send(msg)
    }
    fn send_pages(&self, lane: usize, batch: &PageBatch) -> lmig_core::Result<()> {
        self.note_batch(batch);
        self.inner.send_pages(lane, batch)
    }
    fn send_urgent(&self, msg: &Message) -> lmig_core::Result<()> {
        self.note(msg);
        self.inner.send_urgent(msg)
    }
    fn data_lanes(&self) -> usize {
        self.inner.data_lanes()
    }
    fn flush(&self) -> lmig_core::Result<()> {
        self.inner.flush()
    }
    fn recv(&self, timeout: Option<Duration>) -> lmig_core::Result<Option<Message>> {
        self.inner.recv(timeout)
    }
    fn recv_urgent(&self, timeout: Duration) -> lmig_core::Result<Option<Message>> {
        self.inner.recv_urgent(timeout)
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

#[test]
fn bad_ranges_are_refused_and_change_nothing() {
    let r = region(Backing::Private);
    for p in 0..PAGES {
        r.write_at(p as usize * ps(), &pattern(p, 1)).unwrap();
    }
    let end = PAGES as usize * ps();
    let bad: [(usize, usize); 6] = [
        (1, ps()),                     // unaligned offset
        (ps(), ps() + 1),              // unaligned length
        (ps(), 0),                     // empty
        (end - ps(), 2 * ps()),        // past the end
        (end, ps()),                   // outside
        (ps(), usize::MAX - ps() + 1), // wraps
    ];
    for (offset, len) in bad {
        let e = r.declare_free(offset, len).unwrap_err();
        assert!(
            matches!(e, MemError::BadRange { .. } | MemError::OutOfBounds { .. }),
            "{offset}+{len}: {e}"
        );
        assert!(r.declare_used(offset, len).is_err(), "{offset}+{len}");
    }
    let mut free = PageSet::new(PAGES);
    assert!(!r.free_pages(&mut free).unwrap(), "nothing declared yet");
    for p in 0..PAGES {
        assert_eq!(
            page(&r, p),
            pattern(p, 1),
            "page {p} changed by a refused call"
        );
    }
    // Declared free: reads as zero; declaring again and overlapping is harmless.
    r.declare_free(10 * ps(), 10 * ps()).unwrap();
    r.declare_free(15 * ps(), 10 * ps()).unwrap();
    assert!(r.free_pages(&mut free).unwrap());
    assert_eq!(free.runs().collect::<Vec<_>>(), [(10, 15)]);
    assert!(page(&r, 12).iter().all(|&b| b == 0));
    assert_eq!(page(&r, 9), pattern(9, 1));
    assert_eq!(page(&r, 25), pattern(25, 1));
    // Used again in the middle; pages never free are left alone.
    r.declare_used(12 * ps(), 3 * ps()).unwrap();
    r.declare_used(100 * ps(), ps()).unwrap();
    let mut free = PageSet::new(PAGES);
    r.free_pages(&mut free).unwrap();
    assert_eq!(free.runs().collect::<Vec<_>>(), [(10, 2), (15, 10)]);
    // A page set of the wrong size is refused.
    assert!(r.free_pages(&mut PageSet::new(PAGES + 1)).is_err());
}

/// Source memory for the migrations: data on every page; 64..192 free,
/// 100..110 used again and rewritten before the migration.
fn source(backing: Backing) -> RegionSet {
    let r = region(backing);
    for p in 0..PAGES {
        r.write_at(p as usize * ps(), &pattern(p, 2)).unwrap();
    }
    r.declare_free(64 * ps(), 128 * ps()).unwrap();
    r.declare_used(100 * ps(), 10 * ps()).unwrap();
    for p in 100..110 {
        r.write_at(p as usize * ps(), &pattern(p, 3)).unwrap();
    }
    RegionSet::new([r]).unwrap()
}

/// Free pages the tests expect never carried as data.
fn free_and_clean(p: u64, written_free: u64) -> bool {
    (64..192).contains(&p) && !(100..110).contains(&p) && p != written_free
}

#[test]
fn precopy_never_sends_free_pages() {
    for backing in [Backing::Private, Backing::Memfd] {
        let src = source(backing);
        let Some(mut tracker) = tracker(&src) else {
            return;
        };
        let r = src.get(R).unwrap();
        // After round 0: pages 0..8 (sent with data) are freed, free page
        // 150 is written without being declared used (the tracker sees it).
        let observer = |e: &Event| {
            if let Event::Round(s) = e
                && s.round == 0
            {
                r.declare_free(0, 8 * ps()).unwrap();
                r.write_at(150 * ps(), &pattern(150, 4)).unwrap();
            }
        };
        let (a, b) = channel_pair(2);
        let rec = Recording::new(&a);
        let dst = DestinationRegions::new(backing);
        let (s, d) = std::thread::scope(|sc| {
            let d = sc.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
            let s = Source::new(&rec, &src, &mut tracker, NullProgram::default())
                .with_observer(observer)
                .with_config(SourceConfig::default().with_batch_pages(32))
                .run();
            (s, d.join().unwrap())
        });
        let (s, d) = (s.unwrap(), d.unwrap());
        assert_eq!(s.verification, Verification::Verified, "{backing:?}");
        assert_eq!(d.verification, Verification::Verified, "{backing:?}");
        let (data, zero) = rec.carried();
        let got = dst.regions().unwrap().get(R).unwrap();
        for p in 0..PAGES {
            if free_and_clean(p, 150) {
                assert!(
                    !data.contains(p),
                    "{backing:?}: free page {p} carried as data"
                );
                assert!(
                    zero.contains(p),
                    "{backing:?}: free page {p} never announced empty"
                );
            } else if p >= 8 {
                assert!(
                    data.contains(p),
                    "{backing:?}: page {p} in use never carried"
                );
            } else {
                assert!(
                    zero.contains(p),
                    "{backing:?}: page {p} freed mid-way not resent"
                );
            }
            assert_eq!(page(got, p), page(r, p), "{backing:?}: page {p}");
        }
        assert_eq!(page(got, 150), pattern(150, 4), "{backing:?}");
        assert_eq!(page(got, 105), pattern(105, 3), "{backing:?}");
        assert!(page(got, 3).iter().all(|&b| b == 0), "{backing:?}");
        // Far fewer bytes than the region: the free half never went.
        assert!(
            s.bytes_sent < (PAGES - 100) * ps() as u64 + 100 * 1024,
            "{backing:?}: {} bytes",
            s.bytes_sent
        );
    }
}

#[test]
fn postcopy_leaves_free_pages_out_of_the_missing_set() {
    let src = source(Backing::Private);
    let Some(mut tracker) = tracker(&src) else {
        return;
    };
    let r = src.get(R).unwrap();
    let (a, b) = channel_pair(2);
    let rec = Recording::new(&a);
    let dst =
        DestinationRegions::new(Backing::Private).postcopy_options(PostcopyOptions::default());
    // The program writes free page 70 after the tracker started and as the
    // freeze begins, without declaring it used: it must still arrive.
    let observer = |e: &Event| {
        if let Event::Phase {
            phase: lmig_core::Phase::Frozen,
            ..
        } = e
        {
            r.write_at(70 * ps(), &pattern(70, 5)).unwrap();
        }
    };
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
        let s = Source::new(&rec, &src, &mut tracker, NullProgram::default())
            .with_observer(observer)
            .with_config(
                SourceConfig::default()
                    .with_mode(Mode::Postcopy)
                    .with_verify(true),
            )
            .run();
        (s, d.join().unwrap())
    });
    let d = match d {
        Ok(d) => d,
        Err(e) => {
            if !lmig_core::testing::privileged("free_pages postcopy", "kernel-mode userfaultfd") {
                return;
            }
            panic!("destination failed: {e}");
        }
    };
    let s = s.unwrap();
    assert_eq!(s.verification, Verification::Verified);
    assert_eq!(d.verification, Verification::Verified);
    let (data, _) = rec.carried();
    let missing = rec.left_for_postcopy();
    let got = dst.regions().unwrap().get(R).unwrap();
    for p in 0..PAGES {
        if free_and_clean(p, 70) {
            assert!(!data.contains(p), "free page {p} carried as data");
            assert!(!missing.contains(p), "free page {p} left for post-copy");
        } else {
            assert!(
                missing.contains(p),
                "page {p} in use not left for post-copy"
            );
            assert!(data.contains(p), "page {p} in use never carried");
        }
        assert_eq!(page(got, p), page(r, p), "page {p}");
    }
    assert_eq!(page(got, 70), pattern(70, 5));
    let mut free = RegionPages::empty(src.layout());
    assert!(MemorySource::free_pages(&src, &mut free).unwrap());
}
