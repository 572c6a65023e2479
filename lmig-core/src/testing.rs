//! Test doubles for writing tests of sessions and backends without an OS:
//! memory in vectors, an in-process channel pair, a tracker the test marks
//! itself, a program that records what was done to it, and a channel that
//! breaks on cue ([`CutChannel`]) or misbehaves at any message
//! ([`FaultChannel`]).
//!
//! `lmig-transport` has the real channels (and an in-memory pair that goes
//! through the wire codec); these exist so lmig-core can test its state
//! machines alone.

pub mod faults;

pub use faults::{Fault, FaultChannel, FaultKind};

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{MigrationError, Result};
use crate::model::{PageRun, ProgramState, RegionId, RegionInfo, RegionLayout, RegionPages};
use crate::protocol::Message;
use crate::traits::{Channel, DirtyTracker, MemorySink, MemorySource, StateSink, StateSource};

/// Memory held in plain vectors, one per region; source and sink.
#[derive(Debug, Default)]
pub struct VecMemory {
    regions: Mutex<Vec<(RegionInfo, Vec<u8>)>>,
    discarded: AtomicBool,
    /// [`MemorySource::handed_over`]: 0 none, 1 unconfirmed, 2 confirmed.
    handed_over: AtomicU32,
    /// Pages declared free, and those declared free since the last
    /// [`MemorySource::take_freed`] (`None` until the first declaration).
    free: Mutex<Option<(RegionPages, RegionPages)>>,
}

/// A layout of one region `id` of `pages` pages of 4 KiB.
pub fn one_region(id: RegionId, pages: u64) -> RegionLayout {
    RegionLayout::new(vec![
        RegionInfo::new(id, pages * 4096, 4096).expect("a valid region"),
    ])
    .expect("a valid layout")
}

impl VecMemory {
    /// Zeroed memory for `layout`.
    pub fn new(layout: &RegionLayout) -> Self {
        Self {
            regions: Mutex::new(
                layout
                    .regions()
                    .iter()
                    .map(|r| (r.clone(), vec![0; r.len as usize]))
                    .collect(),
            ),
            discarded: AtomicBool::new(false),
            handed_over: AtomicU32::new(0),
            free: Mutex::new(None),
        }
    }

    /// Memory for `layout` in which each of `pages` of `region` begins with
    /// the text `page <n>` (the rest zero): content a test can tell apart.
    pub fn labelled(
        layout: &RegionLayout,
        region: RegionId,
        pages: impl IntoIterator<Item = u64>,
    ) -> Self {
        let mem = Self::new(layout);
        for p in pages {
            mem.fill(region, p, format!("page {p}").as_bytes());
        }
        mem
    }

    /// Memory with no regions; `prepare` creates them from the source's layout.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Write `data` at page `page` of `region`.
    pub fn fill(&self, region: RegionId, page: u64, data: &[u8]) {
        let mut regions = self.regions.lock().expect("poisoned");
        let (info, bytes) = regions
            .iter_mut()
            .find(|(r, _)| r.id == region)
            .expect("region");
        let off = (page * u64::from(info.page_size)) as usize;
        bytes[off..off + data.len()].copy_from_slice(data);
    }

    /// A copy of a region's bytes (empty if absent).
    pub fn snapshot(&self, region: RegionId) -> Vec<u8> {
        let regions = self.regions.lock().expect("poisoned");
        regions
            .iter()
            .find(|(r, _)| r.id == region)
            .map(|(_, b)| b.clone())
            .unwrap_or_default()
    }

    /// Declare the pages of `run` free: their content is zeroed (discarded)
    /// and the session sends them as zero runs without reading them; see
    /// [`MemorySource::free_pages`].
    pub fn declare_free(&self, run: &PageRun) -> Result<()> {
        self.with_run(run, None, |bytes| bytes.fill(0))?;
        let layout = MemorySource::layout(self);
        let mut free = self.free.lock().expect("poisoned");
        let (all, since) =
            free.get_or_insert_with(|| (RegionPages::empty(&layout), RegionPages::empty(&layout)));
        all.insert_run(run)?;
        since.insert_run(run)
    }

    /// Declare the pages of `run` in use again (before writing them).
    pub fn declare_used(&self, run: &PageRun) -> Result<()> {
        let layout = MemorySource::layout(self);
        layout.check_run(run)?;
        if let Some((all, since)) = self.free.lock().expect("poisoned").as_mut() {
            for set in [all, since] {
                set.get_mut(run.region)?
                    .remove_range(run.first, u64::from(run.count));
            }
        }
        Ok(())
    }

    /// Was `discard` called?
    pub fn was_discarded(&self) -> bool {
        self.discarded.load(Ordering::Relaxed)
    }

    /// Run `f` over the bytes of `run`, which a buffer of `len` bytes
    /// (`None`: no buffer) must match exactly.
    fn with_run<R>(
        &self,
        run: &PageRun,
        len: Option<usize>,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R> {
        let mut regions = self.regions.lock().expect("poisoned");
        let (info, bytes) = regions
            .iter_mut()
            .find(|(r, _)| r.id == run.region)
            .ok_or(MigrationError::UnknownRegion { region: run.region })?;
        info.check_run(run)?;
        let want = info.bytes(u64::from(run.count));
        if let Some(len) = len.filter(|l| *l as u64 != want) {
            return Err(MigrationError::invalid(
                format!("buffer for page run {run}"),
                format!("{len} bytes, the run holds {want}"),
            ));
        }
        let ps = info.page_size as usize;
        let off = run.first as usize * ps;
        Ok(f(&mut bytes[off..off + run.count as usize * ps]))
    }
}

impl MemorySource for VecMemory {
    fn layout(&self) -> RegionLayout {
        let regions = self.regions.lock().expect("poisoned");
        RegionLayout::new(regions.iter().map(|(r, _)| r.clone()).collect()).expect("valid layout")
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
        self.with_run(run, Some(dst.len()), |src| dst.copy_from_slice(src))
    }

    fn mark_handed_over(&self, confirmed: bool) {
        self.handed_over
            .store(1 + u32::from(confirmed), Ordering::SeqCst);
    }

    fn handed_over(&self) -> Option<bool> {
        match self.handed_over.load(Ordering::SeqCst) {
            0 => None,
            n => Some(n == 2),
        }
    }

    fn free_pages(&self, free: &mut RegionPages) -> Result<bool> {
        match self.free.lock().expect("poisoned").as_ref() {
            Some((all, _)) => {
                free.union_with(all);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn take_freed(&self, freed: &mut RegionPages) -> Result<()> {
        if let Some((_, since)) = self.free.lock().expect("poisoned").as_mut() {
            freed.union_with(since);
            since.clear();
        }
        Ok(())
    }
}

impl MemorySink for VecMemory {
    fn prepare(&self, layout: &RegionLayout) -> Result<()> {
        {
            let mut regions = self.regions.lock().expect("poisoned");
            if regions.is_empty() {
                *regions = Self::new(layout).regions.into_inner().expect("fresh mutex");
                return Ok(());
            }
        }
        MemorySource::layout(self).check_matches(layout)
    }

    fn write_pages(&self, run: &PageRun, data: &[u8]) -> Result<()> {
        self.with_run(run, Some(data.len()), |dst| dst.copy_from_slice(data))
    }

    fn zero_pages(&self, run: &PageRun) -> Result<()> {
        self.with_run(run, None, |dst| dst.fill(0))
    }

    fn read_pages(&self, run: &PageRun, dst: &mut [u8]) -> Result<()> {
        MemorySource::read_pages(self, run, dst)
    }

    fn discard(&self) {
        self.discarded.store(true, Ordering::Relaxed);
    }
}

/// A dirty tracker the test marks itself.
#[derive(Clone, Debug)]
pub struct MarkTracker {
    dirty: Arc<Mutex<RegionPages>>,
    started: Arc<AtomicBool>,
}

impl MarkTracker {
    /// A tracker for `layout`.
    pub fn new(layout: &RegionLayout) -> Self {
        Self {
            dirty: Arc::new(Mutex::new(RegionPages::empty(layout))),
            started: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Mark pages written.
    pub fn mark(&self, run: &PageRun) {
        let _ = self.dirty.lock().expect("poisoned").insert_run(run);
    }

    /// Is it tracking?
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }
}

impl DirtyTracker for MarkTracker {
    fn name(&self) -> &'static str {
        "mark (test)"
    }
    fn start(&mut self) -> Result<()> {
        self.dirty.lock().expect("poisoned").clear();
        self.started.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn collect(&mut self, dirty: &mut RegionPages) -> Result<()> {
        let mut d = self.dirty.lock().expect("poisoned");
        dirty.union_with(&d);
        d.clear();
        Ok(())
    }
    fn stop(&mut self) -> Result<()> {
        self.started.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// A program that records what the session did to it.
#[derive(Debug, Default)]
pub struct NullProgram {
    /// The state it hands over / received.
    pub state: Option<ProgramState>,
    /// Times paused.
    pub paused: u32,
    /// Times resumed.
    pub resumed: u32,
    /// Set after `committed` (source) or `resume` (destination).
    pub committed: bool,
    /// Set after `discard`.
    pub discarded: bool,
}

impl NullProgram {
    /// A program holding `state`.
    pub fn with_state(state: ProgramState) -> Self {
        Self {
            state: Some(state),
            ..Self::default()
        }
    }

    /// Paused and not resumed?
    pub fn is_paused(&self) -> bool {
        self.paused > self.resumed
    }
}

impl StateSource for NullProgram {
    fn pause(&mut self) -> Result<()> {
        self.paused += 1;
        Ok(())
    }
    fn capture(&mut self) -> Result<ProgramState> {
        Ok(self.state.clone().unwrap_or_default())
    }
    fn resume(&mut self) -> Result<()> {
        self.resumed += 1;
        Ok(())
    }
    fn committed(&mut self) {
        self.committed = true;
    }
}

impl StateSink for NullProgram {
    fn restore(&mut self, state: ProgramState) -> Result<()> {
        self.state = Some(state);
        Ok(())
    }
    fn resume(&mut self) -> Result<()> {
        self.committed = true;
        Ok(())
    }
    fn discard(&mut self) {
        self.state = None;
        self.discarded = true;
    }
}

/// One end of an in-process channel pair.
pub struct PairEnd {
    tx: Mutex<Option<Sender<Message>>>,
    rx: Mutex<Receiver<Message>>,
    lanes: usize,
    closed: AtomicBool,
}

/// Two connected in-process channel ends with `lanes` data lanes each.
pub fn channel_pair(lanes: usize) -> (PairEnd, PairEnd) {
    let (a_tx, b_rx) = channel();
    let (b_tx, a_rx) = channel();
    let end = |tx, rx| PairEnd {
        tx: Mutex::new(Some(tx)),
        rx: Mutex::new(rx),
        lanes: lanes.max(1),
        closed: AtomicBool::new(false),
    };
    (end(a_tx, a_rx), end(b_tx, b_rx))
}

impl Channel for PairEnd {
    fn send(&self, msg: &Message) -> Result<()> {
        let tx = self.tx.lock().expect("poisoned");
        match tx.as_ref() {
            Some(tx) => tx
                .send(msg.clone())
                .map_err(|_| MigrationError::channel_closed("peer closed the channel")),
            None => Err(MigrationError::channel_closed("channel shut down")),
        }
    }

    fn data_lanes(&self) -> usize {
        self.lanes
    }

    fn recv(&self, timeout: Option<Duration>) -> Result<Option<Message>> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(MigrationError::channel_closed("channel shut down"));
        }
        let rx = self.rx.lock().expect("poisoned");
        let got = match timeout {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(m) => Ok(Some(m)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(MigrationError::channel_closed("peer closed the channel"))
            }
        }
    }

    fn shutdown(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.tx.lock().expect("poisoned").take();
    }
}

/// Where a [`CutChannel`] breaks.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Fail the `n`th send (from 1) of a message named `name`, then close.
    Send(&'static str, u32),
    /// Fail when the `n`th message named `name` is received, then close.
    Recv(&'static str, u32),
}

/// A channel that breaks at a chosen step, as if the connection dropped or
/// this side was killed there. Every send is counted, on whichever lane;
/// it has no urgent receiver of its own (urgent messages come through
/// `recv`, where the cut sees them), so a post-copy destination over it
/// runs two fault-path threads ([`FaultChannel`] forwards the urgent lane).
pub struct CutChannel<C> {
    inner: C,
    cut: Cut,
    seen: AtomicU32,
    cut_done: AtomicBool,
}

impl<C: Channel> CutChannel<C> {
    /// Wrap `inner`, breaking at `cut`.
    pub fn new(inner: C, cut: Cut) -> Self {
        Self {
            inner,
            cut,
            seen: AtomicU32::new(0),
            cut_done: AtomicBool::new(false),
        }
    }

    /// Did the cut happen?
    pub fn was_cut(&self) -> bool {
        self.cut_done.load(Ordering::Relaxed)
    }

    fn hit(&self, name: &str, want: &str, n: u32) -> bool {
        name == want && self.seen.fetch_add(1, Ordering::Relaxed) + 1 == n
    }

    fn break_now(&self) -> MigrationError {
        self.cut_done.store(true, Ordering::Relaxed);
        self.inner.shutdown();
        MigrationError::channel_closed("connection cut (test)")
    }

    /// A message named `name` is about to be sent: an error once cut, or
    /// if it is the one to cut at.
    fn sending(&self, name: &str) -> Result<()> {
        if self.was_cut() {
            return Err(MigrationError::channel_closed("connection cut (test)"));
        }
        if let Cut::Send(want, n) = self.cut {
            if self.hit(name, want, n) {
                return Err(self.break_now());
            }
        }
        Ok(())
    }
}

impl<C: Channel> Channel for CutChannel<C> {
    fn warm_receive(&self, bytes: u64) {
        self.inner.warm_receive(bytes)
    }

    fn send(&self, msg: &Message) -> Result<()> {
        self.sending(msg.name())?;
        self.inner.send(msg)
    }

    fn send_pages(&self, lane: usize, batch: &crate::protocol::PageBatch) -> Result<()> {
        self.sending("Pages")?;
        self.inner.send_pages(lane, batch)
    }

    fn send_urgent(&self, msg: &Message) -> Result<()> {
        self.sending(msg.name())?;
        self.inner.send_urgent(msg)
    }

    fn send_lane(&self, lane: usize, msg: &Message) -> Result<()> {
        self.sending(msg.name())?;
        self.inner.send_lane(lane, msg)
    }

    fn data_lanes(&self) -> usize {
        self.inner.data_lanes()
    }

    fn ip_addresses(&self) -> Vec<std::net::IpAddr> {
        self.inner.ip_addresses()
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn recv(&self, timeout: Option<Duration>) -> Result<Option<Message>> {
        if self.was_cut() {
            return Err(MigrationError::channel_closed("connection cut (test)"));
        }
        let msg = self.inner.recv(timeout)?;
        if let (Some(m), Cut::Recv(name, n)) = (&msg, self.cut) {
            if self.hit(m.name(), name, n) {
                return Err(self.break_now());
            }
        }
        Ok(msg)
    }

    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

/// Whether a test that needs root (namespaces, TCP repair, nftables,
/// kernel-mode userfaultfd) may run: the one rule every lmig test follows.
///
/// As root it runs, whatever `LMIG_SKIP_PRIVILEGED` says. Without root it
/// fails with a message saying what it needs, unless `LMIG_SKIP_PRIVILEGED=1`
/// asks for a skip: then a `SKIPPED` line goes straight to the terminal
/// (past the test harness's capture, so the skip shows in `cargo test`'s
/// output) and this returns false.
pub fn privileged(test: &str, needs: &str) -> bool {
    if effective_uid() == Some(0) {
        return true;
    }
    if std::env::var("LMIG_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED {test}: needs root ({needs}); LMIG_SKIP_PRIVILEGED=1"
        );
        return false;
    }
    panic!("{test} needs root ({needs}); run it as root, or set LMIG_SKIP_PRIVILEGED=1 to skip it");
}

/// The user and group id of `nobody`, which [`rerun_as_nobody`] runs as.
pub const NOBODY: u32 = 65534;

/// Run one test of the current test binary again in a child process as user
/// and group `nobody` (no capabilities), and return what it printed; for
/// tests of what lmig says to an unprivileged program. The test is named
/// exactly and run with `--ignored`: mark the child half `#[ignore]` so the
/// parent's run does not count it as a pass. Needs root (to switch users);
/// panics when the child cannot be started or fails.
pub fn rerun_as_nobody(test: &str) -> String {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .gid(NOBODY)
        .uid(NOBODY)
        .output()
        .expect("start the test binary as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{test} as nobody failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "{test} as nobody did not run:\n{stdout}\n{stderr}"
    );
    stdout
}

/// The effective user id, from `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// xorshift64*: a deterministic generator for the fuzz corpus replays.
#[derive(Debug, Clone)]
pub struct FuzzRng(pub u64);

impl FuzzRng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// `seed` changed one to four times: a bit flipped, a byte replaced, cut
/// short, a byte inserted, or an interesting length or count (0, 1, 255,
/// 65535, 2^31-1, 2^32-1) written somewhere.
pub fn mutate(rng: &mut FuzzRng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next_u64() as u8;
            }
            2 => {
                let cut = rng.below(v.len() + 1);
                v.truncate(cut);
            }
            3 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next_u64() as u8);
            }
            _ if v.len() >= 4 => {
                let i = rng.below(v.len() - 3);
                let x: u32 = [0, 1, 0xff, 0xffff, 0x7fff_ffff, u32::MAX][rng.below(6)];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

/// Replay fuzz targets on stable, as `cargo test` does for every crate's
/// targets: for each of `targets`, its seeds, every file of
/// `corpus/<target>/` (written from the seeds first when
/// `LMIG_WRITE_CORPUS=1`), `mutations` mutated inputs and 200 of pure
/// noise, each through `run` (which panics when a target's rule breaks, and
/// returns false for a name it does not know). Every seed must be one of
/// the corpus files: a seed missing there (an encoder or a sample changed,
/// a message kind was added) fails, naming the targets, so the corpus that
/// `cargo fuzz` starts from never lags behind the encoders.
pub fn replay_fuzz_corpus(
    corpus: &std::path::Path,
    targets: &[&str],
    seeds: impl Fn(&str) -> Vec<Vec<u8>>,
    run: impl Fn(&str, &[u8]) -> bool,
    mutations: usize,
) {
    let write = std::env::var_os("LMIG_WRITE_CORPUS").is_some();
    let mut stale = Vec::new();
    for target in targets {
        let dir = corpus.join(target);
        let mut inputs = seeds(target);
        assert!(!inputs.is_empty(), "no seeds for {target}");
        if write {
            std::fs::create_dir_all(&dir).expect("corpus directory");
            for (i, s) in inputs.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:02}")), s).expect("seed file");
            }
        }
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run with LMIG_WRITE_CORPUS=1)", dir.display()));
        let seeds = inputs.len();
        for e in entries {
            inputs.push(std::fs::read(e.expect("corpus entry").path()).expect("corpus file"));
        }
        let (fresh, files) = inputs.split_at(seeds);
        let missing = fresh.iter().filter(|s| !files.contains(s)).count();
        if missing > 0 {
            stale.push(format!("{target}: {missing} of {seeds} seeds"));
        }
        for input in &inputs {
            assert!(run(target, input), "{target} is not a target");
        }
        let mut rng = FuzzRng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        for _ in 0..mutations {
            let seed = &inputs[rng.below(inputs.len())];
            run(target, &mutate(&mut rng, seed));
        }
        for _ in 0..200 {
            let n = rng.below(256);
            let noise: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            run(target, &noise);
        }
    }
    assert!(
        stale.is_empty(),
        "seeds missing from the checked-in corpus, rewrite it with LMIG_WRITE_CORPUS=1: {stale:?}"
    );
}
