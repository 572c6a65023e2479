//! `faults`: a whole migration (memory, program state; pre-copy, post-copy
//! and hybrid) broken at every protocol step, with the properties that must
//! hold after each fault checked. The same suite runs in CI
//! (`examples/tests/faults.rs`).
//!
//! Four families of fault points:
//!
//! * **message faults** ([`lmig_core::testing::FaultChannel`] over an
//!   in-process channel pair): the source's or the destination's end breaks,
//!   stalls (longer than the peer's timeouts, then breaks) or duplicates at
//!   message index k, for every k of a fault-free run of that mode (counted
//!   per end, sends and receives together; see the channel's docs);
//! * **wire faults** ([`wire`]): `lmig-transport`'s TCP channel with its
//!   default encryption (Noise with the pre-shared key) runs through a
//!   byte proxy that flips one byte, or cuts the connection, at an offset
//!   of one stream's bytes in one direction: an integrity error must
//!   follow, never a wrong delivery.
//!
//! * **process kills** ([`kill`]): one side runs in a child process
//!   (`lmig-bench faults-peer`) and is killed with `SIGKILL` when the other
//!   side's session enters a phase, each side of `Commit`.
//!
//! * **link cuts** (`linkcut`): source and destination in two network
//!   namespaces; host A's link goes down when the source enters a phase.
//!
//! * **socket faults** (`net`): memory, state and real sockets (TCP
//!   connections and a UDP socket, a client in a third namespace, the
//!   network lock and the address handoff) move from host A to host B over
//!   a channel pair that breaks, stalls or duplicates at message index k;
//!   the sockets must then serve every byte on the side that owns them, out
//!   of repair mode, with no lock table left and the service addresses
//!   where the commit rule puts them.
//!
//! Memory is real: `lmig-mem` regions, the source's tracked with
//! userfaultfd write-protection (pre-copy) or marked by hand (hybrid: the
//! pages marked dirty in the rounds are what post-copy then serves), the
//! destination's served by userfaultfd in post-copy.
//!
//! After each point (`check`): before `Commit` the source program was
//! resumed, its memory reads exactly its image and its state is untouched,
//! and the destination did not start; after `Commit` the destination runs
//! with the source's state, and every page compares equal to the source's
//! image; in the one-way commit window (`Commit` sent, the destination
//! ended without it) both sides report it and the source keeps every byte
//! and refuses the next attempt (docs/failures.md); no userfaultfd is left
//! open and no memory area left registered. Every point is bounded in
//! time ([`point`]): one that hangs fails, the suite goes on.
//!
//! Fields: `points`, `passed`, `lost_bytes` (program-state bytes the
//! side that should hold them lacks, and socket bytes that did not
//! arrive), `wrong_pages`, `leaks`, `failed`,
//! per-kind `kinds`, `leaked` (one line per leak: userfaultfds, registered
//! areas, repair-mode sockets, lock tables, misplaced service addresses),
//! `integrity_errors` (points where either side reported
//! an integrity or authentication error), `commit_points` (points after
//! `Commit`), `commit_unconfirmed` (of those, points in the commit window).

pub mod check;
pub mod conns;
pub mod kill;
mod linkcut;
mod net;
pub mod point;
mod run;
pub mod wire;

use std::collections::BTreeMap;
use std::error::Error;
use std::time::Duration;

use clap::Args as ClapArgs;
use lmig_core::session::Mode;
use lmig_core::testing::{Fault, FaultKind};
use serde_json::json;

use super::Output;
pub use check::Verdict;
use run::{Case, End};

/// Options of the `faults` scenario.
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// Pages of the migrated region.
    #[arg(long, default_value_t = 48)]
    pub pages: u64,
    /// Stall points: one every this many message indices (stalls cost a
    /// timeout each).
    #[arg(long, default_value_t = 6)]
    pub stall_every: u32,
    /// Wire faults: offsets per stream and direction.
    #[arg(long, default_value_t = 2)]
    pub wire_offsets: u32,
    /// Socket faults: break and duplicate at one message index in this
    /// many (1: every index; the first and last always).
    #[arg(long, default_value_t = 1)]
    pub net_every: u32,
    /// Socket faults: stalls too (at the indices of `--stall-every`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub net_stalls: bool,
    /// Socket faults in hybrid mode too.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub net_hybrid: bool,
    /// Print every point with its verdict and time.
    #[arg(long)]
    pub verbose: bool,
    /// Run only the points whose name contains this (e.g. `"Hybrid
    /// duplicate Source #27"`); the fault-free runs that count the
    /// messages always run.
    #[arg(long)]
    pub only: Option<String>,
    /// Most time one point may take (ms): past it the point fails (it
    /// hung) and the suite goes on.
    #[arg(long, default_value_t = 30_000)]
    pub point_timeout_ms: u64,
    /// The program to run as the killed peer (`lmig-bench`, which has the
    /// `faults-peer` command); default: this program.
    #[arg(skip)]
    pub peer_exe: Option<std::path::PathBuf>,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            pages: 48,
            stall_every: 6,
            wire_offsets: 2,
            net_every: 1,
            net_stalls: true,
            net_hybrid: true,
            verbose: false,
            only: None,
            point_timeout_ms: 30_000,
            peer_exe: None,
        }
    }
}

impl Args {
    /// The subset CI runs (`examples/tests/faults.rs`): every message
    /// index with break and duplicate, stalls (a timeout each) at every
    /// twelfth, one wire offset per stream and direction, every kill and
    /// link cut; socket faults in pre-copy and post-copy at every other
    /// index, without stalls; `peer_exe` is `lmig-bench` (the killed side).
    pub fn ci(peer_exe: std::path::PathBuf) -> Self {
        Self {
            stall_every: 12,
            wire_offsets: 1,
            net_every: 2,
            net_stalls: false,
            net_hybrid: false,
            peer_exe: Some(peer_exe),
            ..Self::default()
        }
    }

    /// Is the point named `what` to run?
    pub fn wants(&self, what: &str) -> bool {
        self.only.as_deref().is_none_or(|o| what.contains(o))
    }

    /// The bound of one point.
    pub fn point_timeout(&self) -> Duration {
        Duration::from_millis(self.point_timeout_ms)
    }
}

/// The suite's timeouts: short, so that a stall costs little, and the stall
/// itself, longer than any of them.
pub const TIMEOUT: Duration = Duration::from_millis(800);
/// How long a stalled operation hangs before its connection breaks.
pub const STALL: Duration = Duration::from_millis(1100);

/// The tally of a suite run.
#[derive(Debug, Default, Clone)]
#[non_exhaustive]
pub struct Summary {
    /// Fault points run.
    pub points: u32,
    /// Points where every property held.
    pub passed: u32,
    /// Program-state bytes missing on the side that should hold them, and
    /// socket bytes (queued before the attempt, or markers after it) that
    /// did not arrive.
    pub lost_bytes: u64,
    /// Pages that differ from the source's image.
    pub wrong_pages: u64,
    /// Userfaultfds left open, regions left registered, sockets left in
    /// repair mode, lock tables left, service addresses misplaced.
    pub leaks: u64,
    /// Wire faults reported as integrity errors by the transport.
    pub integrity_errors: u32,
    /// Points where `Commit` had been sent.
    pub commit_points: u32,
    /// Of those, points in the one-way commit window (neither side runs;
    /// passed only with the documented, reported outcome).
    pub commit_unconfirmed: u32,
    /// Per fault kind: (points, passed).
    pub kinds: BTreeMap<String, (u32, u32)>,
    /// What leaked, one line per leak found (the point's name first).
    pub leaked: Vec<String>,
    /// What went wrong, one line per failed point.
    pub failures: Vec<String>,
}

impl Summary {
    fn add(&mut self, kind: &str, what: &str, v: Verdict) {
        self.points += 1;
        let k = self.kinds.entry(kind.to_string()).or_default();
        k.0 += 1;
        self.lost_bytes += v.lost_bytes;
        self.leaks += v.leaks;
        self.integrity_errors += u32::from(v.integrity);
        self.commit_points += u32::from(v.committed);
        self.commit_unconfirmed += u32::from(v.unconfirmed);
        self.wrong_pages += v.wrong_pages;
        self.leaked
            .extend(v.leaked.iter().map(|l| format!("{what}: {l}")));
        if v.problems.is_empty() {
            self.passed += 1;
            k.1 += 1;
        } else {
            self.failures
                .push(format!("{what}: {}", v.problems.join("; ")));
        }
    }

    /// One line: `points N passed M failed K ...`.
    pub fn line(&self) -> String {
        format!(
            "points {} passed {} failed {} commit_unconfirmed {} lost_bytes {} wrong_pages {} leaks {} kinds {:?}",
            self.points,
            self.passed,
            self.failures.len(),
            self.commit_unconfirmed,
            self.lost_bytes,
            self.wrong_pages,
            self.leaks,
            self.kinds
        )
    }
}

const MODES: [Mode; 3] = [Mode::Precopy, Mode::Postcopy, Mode::Hybrid];

/// Run every fault point; `progress` hears each point's name and verdict.
pub fn run_suite(args: &Args, progress: &mut dyn FnMut(&str, &Verdict)) -> Summary {
    let mut sum = Summary::default();
    let exe = args
        .peer_exe
        .clone()
        .or_else(|| std::env::current_exe().ok())
        .expect("the peer program");
    for mode in MODES {
        message_faults(args, mode, &mut sum, progress);
        wire::wire_faults(args, mode, &mut sum, progress);
        kill::kill_faults(args, &exe, mode, &mut sum, progress);
        linkcut::link_faults(args, mode, &mut sum, progress);
        if mode != Mode::Hybrid || args.net_hybrid {
            net::net_faults(args, mode, &mut sum, progress);
        }
    }
    sum
}

fn message_faults(
    args: &Args,
    mode: Mode,
    sum: &mut Summary,
    progress: &mut dyn FnMut(&str, &Verdict),
) {
    let base = Case::new(args.pages, mode);
    let what = format!("{mode:?} fault-free");
    let counts = match point::bounded(&what, args.point_timeout(), move || {
        base.run_messages(End::Source, Fault::never())
    }) {
        Ok((clean, counts)) => {
            progress(&what, &clean);
            sum.add("none", &what, clean);
            counts
        }
        Err(v) => {
            progress(&what, &v);
            sum.add("none", &what, v);
            return;
        }
    };
    for end in [End::Source, End::Destination] {
        let n = counts[end as usize];
        for at in 1..=n {
            let mut kinds = vec![FaultKind::Break, FaultKind::Duplicate];
            if at % args.stall_every.max(1) == 1 || at == n {
                kinds.push(FaultKind::Stall(STALL));
            }
            for kind in kinds {
                let what = format!("{mode:?} {} {end:?} #{at}/{n}", kind.name());
                if !args.wants(&what) {
                    continue;
                }
                let v = point::bounded(&what, args.point_timeout(), move || {
                    base.run_messages(end, Fault::new(kind, at)).0
                })
                .unwrap_or_else(|v| v);
                let hit = v.hit.clone().unwrap_or_else(|| "-".into());
                let what = format!("{what} ({hit})");
                progress(&what, &v);
                sum.add(kind.name(), &what, v);
            }
        }
    }
}

/// `lmig-bench faults`.
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn Error>> {
    let verbose = args.verbose;
    let mut last = std::time::Instant::now();
    let sum = run_suite(&args, &mut |what, v| {
        if verbose {
            let ms = last.elapsed().as_millis();
            last = std::time::Instant::now();
            eprintln!("[{ms} ms] {what}: {:?}", v.problems);
        }
    });
    for f in &sum.failures {
        eprintln!("FAILED {f}");
    }
    let kinds: serde_json::Map<String, serde_json::Value> = sum
        .kinds
        .iter()
        .map(|(k, (p, ok))| (k.clone(), json!({"points": p, "passed": ok})))
        .collect();
    out.emit(&json!({
        "scenario": "faults",
        "points": sum.points,
        "passed": sum.passed,
        "failed": sum.failures.len(),
        "lost_bytes": sum.lost_bytes,
        "wrong_pages": sum.wrong_pages,
        "leaks": sum.leaks,
        "leaked": sum.leaked,
        "integrity_errors": sum.integrity_errors,
        "commit_points": sum.commit_points,
        "commit_unconfirmed": sum.commit_unconfirmed,
        "kinds": kinds,
        "pages": args.pages,
    }));
    Ok(())
}
