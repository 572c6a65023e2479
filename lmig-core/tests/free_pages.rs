//! Free memory is never sent: pages the program declared free go as zero
//! runs, never as data, whatever the round; pages used again (declared or
//! just written under the tracker) and pages freed mid-migration always go.
//! What the channel carried is recorded and checked page by page.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lmig_core::model::{PageRun, RegionId, RegionInfo, RegionLayout};
use lmig_core::policy::{ConvergencePolicy, PolicyConfig};
use lmig_core::protocol::{Message, PageBatch, PageData, Verification};
use lmig_core::session::{Destination, Source};
use lmig_core::testing::{MarkTracker, NullProgram, VecMemory, channel_pair};
use lmig_core::{Channel, Event, MemorySource, Observer, Phase};

const R: RegionId = RegionId(1);
const PAGES: u64 = 512;

/// A channel that records every page batch it carried: (run, data or zero).
struct Recording<'c, C> {
    inner: &'c C,
    batches: Mutex<Vec<(PageRun, bool)>>,
}

impl<'c, C: Channel> Recording<'c, C> {
    fn new(inner: &'c C) -> Self {
        Self {
            inner,
            batches: Mutex::new(Vec::new()),
        }
    }

    fn note(&self, msg: &Message) {
        if let Message::Pages(b) = msg {
            self.note_batch(b);
        }
    }

    fn note_batch(&self, b: &PageBatch) {
        let raw = matches!(b.data, PageData::Raw(_));
        self.batches.lock().unwrap().push((b.run, raw));
    }

    /// Per page: (times carried as data, times carried as zero).
    fn carried(&self) -> Vec<(u32, u32)> {
        let mut per = vec![(0, 0); PAGES as usize];
        for (run, raw) in self.batches.lock().unwrap().iter() {
            if run.region != R {
                continue;
            }
            for p in run.first..run.end() {
                let c = &mut per[p as usize];
                if *raw { c.0 += 1 } else { c.1 += 1 }
            }
        }
        per
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

/// The source memory, counting the reads of each page until the pages are
/// all out (the session must never read a free page to send it: skipping
/// the send is not enough if it still copies the page to find it zero; the
/// digests after `Commit` read every page, free ones as zero).
struct Counting<'m> {
    inner: &'m VecMemory,
    reads: Mutex<Vec<u32>>,
    sending: AtomicBool,
}

impl MemorySource for Counting<'_> {
    fn layout(&self) -> RegionLayout {
        self.inner.layout()
    }
    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> lmig_core::Result<()> {
        let mut reads = self.reads.lock().unwrap();
        if !self.sending.load(Ordering::SeqCst) {
            return self.inner.read_pages(run, dst);
        }
        for p in run.first..run.end() {
            reads[p as usize] += 1;
        }
        self.inner.read_pages(run, dst)
    }
    fn free_pages(&self, free: &mut lmig_core::model::RegionPages) -> lmig_core::Result<bool> {
        self.inner.free_pages(free)
    }
    fn take_freed(&self, freed: &mut lmig_core::model::RegionPages) -> lmig_core::Result<()> {
        self.inner.take_freed(freed)
    }
}

/// After the first round: frees pages 10..20 (sent as data in round 0)
/// and writes free page 250 without declaring it used (the tracker sees it).
struct MidMigration<'m> {
    memory: &'m VecMemory,
    counting: &'m Counting<'m>,
    tracker: MarkTracker,
    done: Mutex<bool>,
}

impl Observer for MidMigration<'_> {
    fn event(&self, event: &Event) {
        if let Event::Phase {
            phase: Phase::AwaitReady,
            ..
        } = event
        {
            self.counting.sending.store(false, Ordering::SeqCst);
        }
        let Event::Round(stats) = event else { return };
        let mut done = self.done.lock().unwrap();
        if stats.round != 0 || *done {
            return;
        }
        *done = true;
        self.memory
            .declare_free(&PageRun::new(R, 10, 10))
            .expect("declare free");
        self.memory.fill(R, 250, b"written while free");
        self.tracker.mark(&PageRun::new(R, 250, 1));
    }
}

#[test]
fn free_pages_are_never_carried_and_reused_pages_always_are() {
    let layout = RegionLayout::new(vec![RegionInfo::new(R, PAGES * 4096, 4096).unwrap()]).unwrap();
    let src = VecMemory::new(&layout);
    for p in 0..PAGES {
        src.fill(R, p, format!("page {p}").as_bytes());
    }
    // 100..300 free; 150..160 used again (and rewritten) before the migration.
    src.declare_free(&PageRun::new(R, 100, 200)).unwrap();
    src.declare_used(&PageRun::new(R, 150, 10)).unwrap();
    for p in 150..160 {
        src.fill(R, p, format!("reused {p}").as_bytes());
    }
    // Bad input: a run outside the region is refused and changes nothing.
    assert!(src.declare_free(&PageRun::new(R, PAGES - 1, 2)).is_err());
    assert!(src.declare_used(&PageRun::new(RegionId(9), 0, 1)).is_err());

    let dst = VecMemory::empty();
    let (a, b) = channel_pair(2);
    let recording = Recording::new(&a);
    let counting = Counting {
        inner: &src,
        reads: Mutex::new(vec![0; PAGES as usize]),
        sending: AtomicBool::new(true),
    };
    let mut tracker = MarkTracker::new(&layout);
    let observer = MidMigration {
        memory: &src,
        counting: &counting,
        tracker: tracker.clone(),
        done: Mutex::new(false),
    };
    // The pages freed after round 0 go in a later round or the freeze.
    let policy = ConvergencePolicy::new(
        PolicyConfig::default()
            .with_downtime_target(Duration::from_nanos(1))
            .with_max_rounds(3),
    );
    let (src_report, dst_report) = std::thread::scope(|s| {
        let d = s.spawn(|| Destination::new(&b, &dst, NullProgram::default()).run());
        let r = Source::new(&recording, &counting, &mut tracker, NullProgram::default())
            .with_policy(policy)
            .with_observer(observer)
            .run();
        (r, d.join().unwrap())
    });
    let src_report = src_report.expect("source");
    assert_eq!(src_report.verification, Verification::Verified);
    assert_eq!(
        dst_report.expect("destination").verification,
        Verification::Verified
    );

    let carried = recording.carried();
    let reads = counting.reads.lock().unwrap().clone();
    for p in 0..PAGES {
        let (data, zero) = carried[p as usize];
        let free = (100..300).contains(&p) && !(150..160).contains(&p) && p != 250;
        if free {
            assert_eq!((data, zero), (0, 1), "free page {p}: once, as a zero run");
            assert_eq!(reads[p as usize], 0, "free page {p} was read");
        } else if (10..20).contains(&p) {
            assert!(
                data >= 1 && zero >= 1,
                "page {p} freed mid-migration: {data} data, {zero} zero"
            );
        } else {
            assert!(data >= 1, "page {p} in use was never carried as data");
        }
    }
    // Both sides agree page for page: free pages are empty on both.
    let (s, d) = (src.snapshot(R), dst.snapshot(R));
    assert_eq!(s, d);
    assert!(s[10 * 4096..20 * 4096].iter().all(|&b| b == 0));
    assert!(s[100 * 4096..150 * 4096].iter().all(|&b| b == 0));
    assert_eq!(&d[250 * 4096..250 * 4096 + 18], b"written while free");
    assert_eq!(&d[155 * 4096..155 * 4096 + 10], b"reused 155");
    // The free declarations survive the migration: the source still holds them.
    let mut free = lmig_core::model::RegionPages::empty(&layout);
    assert!(src.free_pages(&mut free).unwrap());
    assert!(free.get(R).unwrap().contains(100) && !free.get(R).unwrap().contains(155));
}
