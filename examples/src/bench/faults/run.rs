//! One migration of the suite: real regions on both sides, a program with
//! state on both sides, over whatever channel ends the caller gives; what
//! each side ended with is returned as an [`Observed`] for [`super::check`].

use std::sync::Arc;

use lmig_core::model::{ProgramState, RegionId};
use lmig_core::policy::{Decision, Estimate, Policy, RoundStats};
use lmig_core::session::{
    Destination, DestinationConfig, DestinationReport, Mode, Source, SourceConfig, SourceReport,
};
use lmig_core::testing::{Fault, FaultChannel, NullProgram, channel_pair};
use lmig_core::traits::{NoSockets, SocketSource};
use lmig_core::{Channel, Event, MemorySource, MigrationError, Observer, Phase};
use lmig_mem::{
    Backing, DestinationRegions, DirtyMarker, ManualTracker, PostcopyOptions, RegionOptions,
    RegionSet, UffdWpTracker,
};

use super::TIMEOUT;
use super::check::{Verdict, check};

/// The region every case migrates.
pub const REGION: RegionId = RegionId(7);

/// Which end of the channel a message fault is injected at.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The source's end.
    Source = 0,
    /// The destination's end.
    Destination = 1,
}

/// What one migration attempt left behind.
pub struct Observed {
    /// The memory mode.
    pub mode: Mode,
    /// The source's result (`None`: it never started, e.g. its connect failed).
    pub src: Option<lmig_core::Result<SourceReport>>,
    /// The destination's result (`None`: it never started).
    pub dst: Option<lmig_core::Result<DestinationReport>>,
    /// The source program after the attempt.
    pub src_prog: NullProgram,
    /// The destination program after the attempt.
    pub dst_prog: NullProgram,
    /// The state the source program held.
    pub state: ProgramState,
    /// The source's pages before the attempt.
    pub image: Vec<Vec<u8>>,
    /// The source's pages after the attempt (`None` after a confirmed
    /// `Commit`: the source may have released them).
    pub src_after: Option<Vec<Vec<u8>>>,
    /// After a `CommitUnconfirmed`: the source asked to migrate the same
    /// memory again refused as it must (`Ok`), or how it did not (`Err`).
    pub again: Option<Result<(), String>>,
    /// The destination's pages (`None` when it never mapped them).
    pub dst_pages: Option<Vec<Vec<u8>>>,
    /// The destination was still in post-copy (pages missing) when its
    /// session ended; the suite then abandoned post-copy to read the rest.
    pub dst_paused: bool,
    /// Userfaultfds and registrations before the attempt and after
    /// everything was dropped.
    pub uffds: (UffdUse, UffdUse),
}

/// The page pattern: distinct per page, every seventh page zero.
pub fn page(p: u64) -> Vec<u8> {
    let ps = lmig_mem::page_size();
    let mut v = vec![0u8; ps];
    if p % 7 == 3 {
        return v;
    }
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u64 ^ p.wrapping_mul(2_654_435_761)) as u8;
    }
    v[..8].copy_from_slice(&(p + 1).to_le_bytes());
    v
}

/// Userfaultfds open in this process (`anon_inode:[userfaultfd]` in `/proc/self/fd`).
pub fn open_uffds() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("userfaultfd"))
        .count()
}

/// Memory areas of this process registered with a userfaultfd (`um`,
/// `uw` or `ui` in their `VmFlags` in `/proc/self/smaps`): what a session
/// left registered, whichever fd holds it.
pub fn uffd_registrations() -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    smaps
        .lines()
        .filter_map(|l| l.strip_prefix("VmFlags:"))
        .filter(|flags| {
            flags
                .split_whitespace()
                .any(|f| matches!(f, "um" | "uw" | "ui"))
        })
        .count()
}

/// Userfaultfds and registrations of this process, for a leak check
/// around one point.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct UffdUse {
    /// Open userfaultfds.
    pub fds: usize,
    /// Registered memory areas.
    pub registered: usize,
}

impl UffdUse {
    /// Now.
    pub fn now() -> Self {
        Self {
            fds: open_uffds(),
            registered: uffd_registrations(),
        }
    }

    /// What `self` holds beyond `before` and `kept` (each counted once).
    pub fn beyond(self, before: UffdUse, kept: usize) -> (usize, usize) {
        (
            self.fds.saturating_sub(before.fds + kept),
            self.registered.saturating_sub(before.registered + kept),
        )
    }
}

/// Post-copy after the first round (hybrid).
struct SwitchAfterFirst;

impl Policy for SwitchAfterFirst {
    fn decide(&mut self, _: &RoundStats, _: bool) -> Decision {
        Decision::Postcopy
    }
    fn estimate(&self) -> Estimate {
        Estimate::default()
    }
}

/// Hybrid: marks a third of the pages dirty at each pre-copy round (their
/// content unchanged), so post-copy has pages to serve.
struct Dirtier {
    marker: DirtyMarker,
    pages: u64,
}

impl Observer for Dirtier {
    fn event(&self, event: &Event) {
        if let Event::Phase {
            phase: Phase::Precopy(_),
            ..
        } = event
        {
            let _ = self.marker.mark_range(REGION, 0, self.pages / 3);
        }
    }
}

/// Two observers in one.
struct Both<A, B>(A, B);

impl<A: Observer, B: Observer> Observer for Both<A, B> {
    fn event(&self, event: &Event) {
        self.0.event(event);
        self.1.event(event);
    }
}

/// The state every source program holds.
pub fn state() -> ProgramState {
    ProgramState::new(3, (0..200u8).collect::<Vec<u8>>())
}

/// A migration configuration: region size and mode.
#[derive(Copy, Clone, Debug)]
pub struct Case {
    /// Pages of the region.
    pub pages: u64,
    /// The memory mode.
    pub mode: Mode,
}

/// Every page of the suite's region in `set`.
/// Every page that is here: in post-copy, the pages still missing (their
/// source lost) are not read (a read would block until they come) and show
/// as empty, which [`super::check`] counts apart, never as wrong.
pub fn read_placed(set: &RegionSet, pages: u64) -> (Vec<Vec<u8>>, bool) {
    let Some(missing) = set.postcopy_missing_pages() else {
        return (read_all(set, pages), false);
    };
    let ps = lmig_mem::page_size();
    let r = set.get(REGION).expect("the region");
    let missing = missing.get(REGION).ok().cloned();
    let v = (0..pages)
        .map(|p| {
            if missing.as_ref().is_some_and(|m| m.contains(p)) {
                return Vec::new();
            }
            let mut v = vec![0u8; ps];
            r.read_at(p as usize * ps, &mut v).expect("read a page");
            v
        })
        .collect();
    (v, true)
}

/// Every page of the region (none may be missing).
pub fn read_all(set: &RegionSet, pages: u64) -> Vec<Vec<u8>> {
    let ps = lmig_mem::page_size();
    let r = set.get(REGION).expect("the region");
    (0..pages)
        .map(|p| {
            let mut v = vec![0u8; ps];
            r.read_at(p as usize * ps, &mut v).expect("read a page");
            v
        })
        .collect()
}

impl Case {
    /// A case of `pages` pages in `mode`.
    pub fn new(pages: u64, mode: Mode) -> Self {
        Self { pages, mode }
    }

    /// The source's settings: short timeouts, small batches (more messages).
    #[allow(clippy::field_reassign_with_default)]
    pub fn source_config(&self) -> SourceConfig {
        // Field by field, so that fields added to the config keep their
        // defaults (a struct literal would break when one is added).
        let mut c = SourceConfig::default();
        c.mode = self.mode;
        c.verify = true;
        c.ready_timeout = TIMEOUT;
        c.done_timeout = TIMEOUT;
        c.batch_pages = 8;
        c.push_pages = 8;
        c.catch_up_timeout = TIMEOUT / 4;
        c
    }

    /// Run over an in-process pair, `fault` injected at `end`; returns the
    /// verdict and the messages each end handled.
    pub fn run_messages(&self, end: End, fault: Fault) -> (Verdict, [u32; 2]) {
        let (a, b) = channel_pair(2);
        let (fs, fd) = match end {
            End::Source => (fault, Fault::never()),
            End::Destination => (Fault::never(), fault),
        };
        let src = FaultChannel::new(a, fs);
        let dst = FaultChannel::new(b, fd);
        let obs = self.migrate(|| Some(&src), || Some(&dst));
        let hit = match end {
            End::Source => src.fired(),
            End::Destination => dst.fired(),
        };
        let mut v = check(&obs);
        v.hit = hit.map(|(_, name)| name.to_string());
        (v, [src.messages(), dst.messages()])
    }

    /// One migration: the source over what `src` yields (`None`: it could
    /// not connect), the destination over what `dst` yields on its own
    /// thread (`None`: it never got a channel).
    pub fn migrate<S: Channel, D: Channel>(
        &self,
        src: impl FnOnce() -> Option<S>,
        dst: impl FnOnce() -> Option<D> + Send,
    ) -> Observed {
        let before = UffdUse::now();
        let set = self.source_regions();
        let image = read_all(&set, self.pages);
        let state = state();
        let mut src_prog = NullProgram::with_state(state.clone());
        let mut dst_prog = NullProgram::default();
        let dregions = self.destination_regions();
        let (src_r, dst_r) = std::thread::scope(|s| {
            let d = s.spawn(|| {
                let ch = dst()?;
                let r = Destination::new(&ch, &*dregions, &mut dst_prog)
                    .with_config(self.destination_config())
                    .run();
                ch.shutdown();
                Some(r)
            });
            let r = src().map(|ch| {
                let r = self.run_source(&ch, &set, &mut src_prog, lmig_core::NoObserver);
                ch.shutdown();
                r
            });
            (r, d.join().expect("destination thread"))
        });
        let confirmed = src_prog.committed && matches!(src_r, Some(Ok(_)));
        let src_after = (!confirmed).then(|| read_all(&set, self.pages));
        let again = self.again_if_unconfirmed(src_r.as_ref(), &set);
        let mut dst_paused = false;
        let dst_pages = dregions.regions().map(|r| {
            let (pages, paused) = read_placed(r, self.pages);
            dst_paused = paused;
            pages
        });
        drop(set);
        drop(dregions);
        Observed {
            mode: self.mode,
            src: src_r,
            dst: dst_r,
            src_prog,
            dst_prog,
            state,
            image,
            src_after,
            again,
            dst_pages,
            dst_paused,
            uffds: (before, UffdUse::now()),
        }
    }

    /// After a source's `CommitUnconfirmed`: ask it to migrate the same
    /// memory again (over an in-process pair) and check the refusal:
    /// `HandedOverBefore { confirmed: false }`, the program untouched.
    pub fn again_if_unconfirmed(
        &self,
        src: Option<&lmig_core::Result<SourceReport>>,
        set: &RegionSet,
    ) -> Option<Result<(), String>> {
        if !matches!(src, Some(Err(MigrationError::CommitUnconfirmed { .. }))) {
            return None;
        }
        let (a, b) = channel_pair(1);
        let mut prog = NullProgram::with_state(state());
        let r = self.run_source(&a, set, &mut prog, lmig_core::NoObserver);
        let told = matches!(
            b.recv(Some(TIMEOUT)),
            Ok(Some(lmig_core::Message::Abort { .. }))
        );
        Some(match r {
            Err(MigrationError::HandedOverBefore { confirmed: false })
                if prog.paused == 0 && prog.resumed == 0 && told =>
            {
                Ok(())
            }
            other => Err(format!(
                "asked to migrate again after CommitUnconfirmed, the source answered {:?} \
                 (program paused {} resumed {}, the destination told: {told})",
                other.map(|_| ()),
                prog.paused,
                prog.resumed
            )),
        })
    }

    /// The source's region, filled with [`page`].
    pub fn source_regions(&self) -> RegionSet {
        let ps = lmig_mem::page_size();
        let set = RegionSet::new([RegionOptions::new(REGION, self.pages * ps as u64)
            .backing(Backing::Private)
            .map()
            .expect("map the source region")])
        .expect("region set");
        for p in 0..self.pages {
            let r = set.get(REGION).expect("the region");
            r.write_at(p as usize * ps, &page(p)).expect("fill");
        }
        set
    }

    /// Fresh destination regions for this mode.
    pub fn destination_regions(&self) -> Arc<DestinationRegions> {
        Arc::new(
            DestinationRegions::new(Backing::Private)
                .prefault(self.mode != Mode::Postcopy)
                .postcopy_options(PostcopyOptions::default()),
        )
    }

    /// The destination's settings: a short idle timeout.
    pub fn destination_config(&self) -> DestinationConfig {
        // A lost source pauses post-copy; the suite does not wait the
        // default ten minutes for it to come back.
        DestinationConfig::default()
            .with_idle_timeout(TIMEOUT)
            .with_pause_limit(TIMEOUT / 2)
    }

    /// Run the source side over `ch`.
    pub fn run_source<S: Channel + ?Sized>(
        &self,
        ch: &S,
        set: &RegionSet,
        prog: &mut NullProgram,
        observer: impl Observer,
    ) -> lmig_core::Result<SourceReport> {
        self.run_source_with(ch, set, prog, observer, NoSockets)
    }

    /// Run the source side over `ch`, moving `sockets` too.
    pub fn run_source_with<S: Channel + ?Sized, K: SocketSource>(
        &self,
        ch: &S,
        set: &RegionSet,
        prog: &mut NullProgram,
        observer: impl Observer,
        sockets: K,
    ) -> lmig_core::Result<SourceReport> {
        let cfg = self.source_config();
        match self.mode {
            Mode::Hybrid => {
                let tracker = ManualTracker::new(&MemorySource::layout(set));
                let marker = tracker.marker();
                Source::new(ch, set, tracker, prog)
                    .with_sockets(sockets)
                    .with_policy(SwitchAfterFirst)
                    .with_observer(Both(
                        Dirtier {
                            marker,
                            pages: self.pages,
                        },
                        observer,
                    ))
                    .with_config(cfg)
                    .run()
            }
            _ => {
                let tracker = UffdWpTracker::new(set).map_err(|e| {
                    lmig_core::MigrationError::backend("uffd-wp tracker", e.to_string())
                })?;
                Source::new(ch, set, tracker, prog)
                    .with_sockets(sockets)
                    .with_observer(observer)
                    .with_config(cfg)
                    .run()
            }
        }
    }
}
