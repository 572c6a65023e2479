//! Real process kills: one side of a migration runs in a child process
//! (`lmig-bench faults-peer`), over `lmig-transport`'s encrypted TCP channel
//! on loopback, and is killed with `SIGKILL` when the other side's session
//! enters a phase — before `Commit` (setup, a pre-copy round, the freeze,
//! waiting for `Ready`) and after it (committed, post-copy). The surviving
//! side is checked: a source that outlives its destination before `Commit`
//! serves on with its memory, state and program intact, and after `Commit`
//! never runs the program again; a destination that outlives its source
//! discards everything before `Commit` and after it holds every page right
//! (in post-copy: every page placed is right, the pages still missing stay
//! missing, and the destination reports `PostcopyPaused`).

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use lmig_core::session::{Destination, Mode};
use lmig_core::testing::NullProgram;
use lmig_core::{Event, Observer, Phase};
use lmig_transport::{Endpoint, Listener, connect};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::check::Verdict;
use super::run::{Case, UffdUse, read_all, read_placed, state};
use super::wire::config;
use super::{Args, Summary, TIMEOUT};

/// Options of the hidden `faults-peer` command (one side of a kill point).
#[derive(Debug, Clone, ClapArgs)]
pub struct PeerArgs {
    /// `source` or `destination`.
    #[arg(long)]
    pub role: String,
    /// The destination's address (role `source`).
    #[arg(long)]
    pub connect: Option<String>,
    /// `precopy`, `postcopy` or `hybrid`.
    #[arg(long)]
    pub mode: String,
    /// Pages of the region.
    #[arg(long)]
    pub pages: u64,
}

fn parse_mode(m: &str) -> Result<Mode, Box<dyn Error>> {
    Ok(match m {
        "precopy" => Mode::Precopy,
        "postcopy" => Mode::Postcopy,
        "hybrid" => Mode::Hybrid,
        _ => return Err(format!("unknown mode {m}").into()),
    })
}

fn mode_arg(m: Mode) -> &'static str {
    match m {
        Mode::Precopy => "precopy",
        Mode::Postcopy => "postcopy",
        _ => "hybrid",
    }
}

/// `lmig-bench faults-peer`: run one side and print its outcome.
pub fn peer(args: PeerArgs) -> Result<(), Box<dyn Error>> {
    let case = Case::new(args.pages, parse_mode(&args.mode)?);
    let out = std::io::stdout();
    match args.role.as_str() {
        "destination" => {
            let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse()?), config())?;
            let Endpoint::Tcp(addr) = l.local_endpoint().clone() else {
                return Err("not a TCP endpoint".into());
            };
            writeln!(out.lock(), "listening {addr}")?;
            let ch = l.accept_timeout(TIMEOUT * 5)?;
            let regions = case.destination_regions();
            let r = Destination::new(&ch, &*regions, NullProgram::default())
                .with_config(case.destination_config())
                .run();
            writeln!(out.lock(), "done {:?}", r.map(|_| ()))?;
        }
        "source" => {
            let addr = args.connect.ok_or("--connect is needed")?;
            let ch = connect(&Endpoint::Tcp(addr.parse()?), config())?;
            let set = case.source_regions();
            let mut prog = NullProgram::with_state(state());
            let r = case.run_source(&ch, &set, &mut prog, lmig_core::NoObserver);
            writeln!(out.lock(), "done {:?}", r.map(|_| ()))?;
        }
        r => return Err(format!("unknown role {r}").into()),
    }
    Ok(())
}

/// Kills `pid` at the first event of a phase `when` accepts.
struct KillAt {
    pid: Pid,
    when: fn(&Phase) -> bool,
    done: AtomicBool,
}

impl Observer for KillAt {
    fn event(&self, event: &Event) {
        if let Event::Phase { phase, .. } = event {
            if (self.when)(phase) && !self.done.swap(true, Ordering::SeqCst) {
                let _ = kill(self.pid, Signal::SIGKILL);
            }
        }
    }
}

/// Which phases of the surviving side a kill point fires at.
pub type PhaseTest = fn(&Phase) -> bool;

/// Where a kill falls, by the surviving side's phase.
pub const POINTS: [(&str, PhaseTest); 6] = [
    ("setup", |p| *p == Phase::Setup),
    ("precopy", |p| matches!(p, Phase::Precopy(_))),
    ("frozen", |p| *p == Phase::Frozen),
    ("await-ready", |p| *p == Phase::AwaitReady),
    ("committed", |p| *p == Phase::Committed),
    ("postcopy", |p| *p == Phase::Postcopy),
];

/// The child, killed and reaped whatever happens.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_peer(exe: &Path, case: &Case, role: &str, connect: Option<&str>) -> Peer {
    let mut c = Command::new(exe);
    c.args(["faults-peer", "--role", role, "--mode", mode_arg(case.mode)])
        .args(["--pages", &case.pages.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(a) = connect {
        c.args(["--connect", a]);
    }
    Peer(c.spawn().expect("start the faults peer"))
}

/// Every kill point of `mode`, with `exe` as the peer program.
pub fn kill_faults(
    args: &Args,
    exe: &Path,
    mode: Mode,
    sum: &mut Summary,
    progress: &mut dyn FnMut(&str, &Verdict),
) {
    let case = Case::new(args.pages, mode);
    for (name, when) in POINTS {
        for victim in ["destination", "source"] {
            let what = format!("{mode:?} kill {victim} at {name}");
            if !args.wants(&what) {
                continue;
            }
            let exe = exe.to_path_buf();
            let v = super::point::bounded(&what, args.point_timeout(), move || {
                if victim == "destination" {
                    kill_destination(&case, &exe, when)
                } else {
                    kill_source(&case, &exe, when)
                }
            })
            .unwrap_or_else(Some);
            // A phase this mode never enters is not a point.
            if let Some(v) = v {
                progress(&what, &v);
                sum.add("kill", &what, v);
            }
        }
    }
}

/// The source survives; the destination process dies at `when`.
fn kill_destination(case: &Case, exe: &Path, when: fn(&Phase) -> bool) -> Option<Verdict> {
    let before = UffdUse::now();
    let mut peer = spawn_peer(exe, case, "destination", None);
    let mut line = String::new();
    let stdout = peer.0.stdout.take().expect("piped stdout");
    BufReader::new(stdout).read_line(&mut line).ok()?;
    let addr = line.trim().strip_prefix("listening ")?.to_string();
    let set = case.source_regions();
    let image = read_all(&set, case.pages);
    let mut prog = NullProgram::with_state(state());
    let killer = KillAt {
        pid: Pid::from_raw(peer.0.id() as i32),
        when,
        done: AtomicBool::new(false),
    };
    let r = match connect(&Endpoint::Tcp(addr.parse().ok()?), config()) {
        Ok(ch) => {
            let r = case.run_source(&ch, &set, &mut prog, |e: &Event| killer.event(e));
            lmig_core::Channel::shutdown(&ch);
            Some(r)
        }
        Err(_) => None,
    };
    if !killer.done.load(Ordering::SeqCst) {
        return None;
    }
    drop(peer);
    let mut v = Verdict {
        committed: prog.committed,
        ..Verdict::default()
    };
    if !prog.committed {
        if matches!(r, Some(Ok(_))) {
            v.problems.push("success without Commit".into());
        }
        if prog.is_paused() {
            v.problems.push("source program left paused".into());
        }
        if prog.state != Some(state()) {
            v.lost_bytes += state().data.len() as u64;
            v.problems.push("source state changed".into());
        }
        let w = image
            .iter()
            .zip(read_all(&set, case.pages))
            .filter(|(a, b)| *a != b)
            .count() as u64;
        if w > 0 {
            v.wrong_pages += w;
            v.problems.push(format!("{w} source page(s) changed"));
        }
    } else {
        // Killed after `Commit`: `Done` cannot come. The source reports
        // the unconfirmed Commit, never resumes, keeps every byte, and
        // refuses the next attempt (docs/failures.md).
        if prog.resumed > 0 {
            v.problems
                .push("the source resumed the program after Commit".into());
        }
        if !matches!(
            r,
            Some(Err(lmig_core::MigrationError::CommitUnconfirmed { .. }))
        ) {
            v.problems.push(format!(
                "destination killed after Commit, the source did not report CommitUnconfirmed: {:?}",
                r.as_ref().map(|r| r.as_ref().map(|_| ()))
            ));
        }
        let w = image
            .iter()
            .zip(read_all(&set, case.pages))
            .filter(|(a, b)| *a != b)
            .count() as u64;
        if w > 0 {
            v.wrong_pages += w;
            v.problems.push(format!(
                "{w} source page(s) changed after an unconfirmed Commit"
            ));
        }
        if let Some(Err(why)) = case.again_if_unconfirmed(r.as_ref(), &set) {
            v.problems.push(why);
        }
    }
    drop(set);
    leaks(&mut v, before, 0);
    Some(v)
}

/// The destination survives; the source process dies at `when`.
fn kill_source(case: &Case, exe: &Path, when: fn(&Phase) -> bool) -> Option<Verdict> {
    let before = UffdUse::now();
    let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().ok()?), config()).ok()?;
    let Endpoint::Tcp(addr) = l.local_endpoint().clone() else {
        return None;
    };
    let peer = spawn_peer(exe, case, "source", Some(&addr.to_string()));
    let ch = l.accept_timeout(TIMEOUT * 5).ok()?;
    let regions = case.destination_regions();
    let mut prog = NullProgram::default();
    let killer = KillAt {
        pid: Pid::from_raw(peer.0.id() as i32),
        when,
        done: AtomicBool::new(false),
    };
    let r = Destination::new(&ch, &*regions, &mut prog)
        .with_observer(|e: &Event| killer.event(e))
        .with_config(case.destination_config())
        .run();
    lmig_core::Channel::shutdown(&ch);
    drop(ch);
    drop(peer);
    if !killer.done.load(Ordering::SeqCst) {
        return None;
    }
    let mut v = Verdict {
        committed: prog.committed,
        ..Verdict::default()
    };
    let regs = regions.regions();
    let paused = regs.is_some_and(|r| r.in_postcopy());
    if !prog.committed {
        if r.is_ok() {
            v.problems.push("success without Commit".into());
        }
        if paused {
            v.leaks += 1;
            v.problems
                .push("regions left registered after an abort".into());
        }
    } else {
        if prog.state != Some(state()) {
            v.lost_bytes += state().data.len() as u64;
            v.problems.push("resumed with a different state".into());
        }
        // Pages still missing (the source was killed) are not read: they
        // stay missing, their readers blocked (never zeros).
        let w = regs.map_or(case.pages, |set| {
            read_placed(set, case.pages)
                .0
                .iter()
                .enumerate()
                .filter(|(p, d)| !d.is_empty() && **d != super::run::page(*p as u64))
                .count() as u64
        });
        if paused && case.mode != Mode::Precopy {
            super::check::expect_paused(&mut v, r.as_ref().err());
        }
        if w > 0 {
            v.wrong_pages += w;
            v.problems.push(format!("{w} destination page(s) wrong"));
        }
    }
    drop(regions);
    // A region set dropped with pages missing keeps its userfaultfd on
    // purpose (its readers stay blocked): one, not a leak.
    leaks(&mut v, before, usize::from(paused && prog.committed));
    Some(v)
}

fn leaks(v: &mut Verdict, before: UffdUse, kept: usize) {
    // The peer's reader threads and the regions are gone; give the kernel
    // a moment (bounded) to close what they held.
    let deadline = Instant::now() + Duration::from_secs(1);
    while UffdUse::now().beyond(before, kept) != (0, 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    super::check::leaks(v, UffdUse::now().beyond(before, kept));
}
