//! Driving kvd processes: start them in a namespace, read their event
//! lines, talk to their admin socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lmig_net::topology::{Netns, Topology};

use super::{Error, Options};
use crate::figures::{AdminStatus, KvdEvent, MigrateFailure, MigrateLine, SourceFigures};

/// kvd (as `opts` says how to start it) with `args`, its stdout piped.
pub(super) fn kvd(opts: &Options, args: &[String]) -> Command {
    let mut c = Command::new(&opts.kvd.0);
    c.args(&opts.kvd.1)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if opts.plaintext {
        c.env(crate::kvd::security::PLAINTEXT_ENV, "1");
    }
    c
}

/// Read kvd's event lines on a thread (lines of another shape are skipped).
pub(super) fn events(stdout: ChildStdout) -> mpsc::Receiver<KvdEvent> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(e) = serde_json::from_str::<KvdEvent>(&line) {
                if tx.send(e).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// Wait for the event called `name`.
pub(super) fn wait_event(
    rx: &mpsc::Receiver<KvdEvent>,
    name: &str,
    timeout: Duration,
) -> Result<KvdEvent, Error> {
    wait_event_seeing(rx, name, timeout, &mut Vec::new())
}

/// [`wait_event`], keeping the other events that came first in `seen`.
pub(super) fn wait_event_seeing(
    rx: &mpsc::Receiver<KvdEvent>,
    name: &str,
    timeout: Duration,
    seen: &mut Vec<KvdEvent>,
) -> Result<KvdEvent, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if e.name() == name => return Ok(e),
            Ok(KvdEvent::Failed { error }) => return Err(format!("kvd failed: {error}").into()),
            Ok(e) => seen.push(e),
            Err(_) => return Err(format!("kvd did not report {name:?} within {timeout:?}").into()),
        }
    }
}

/// Start a destination kvd on `host` (called `name`: B, or A when kvd
/// moves back) waiting on `incoming` (dying in the freeze after `die_at`
/// µs, if given; over TLS with its certificate in `tls`, if given), its
/// admin socket at `admin_path`; its events.
#[allow(clippy::too_many_arguments)]
pub(super) fn destination(
    opts: &Options,
    (host, name): (&Netns, &str),
    incoming: &str,
    key: &str,
    die_at: Option<u64>,
    tls: Option<&Path>,
    admin_path: &Path,
) -> Result<(Child, mpsc::Receiver<KvdEvent>), Error> {
    let mut b = kvd(
        opts,
        &[
            "--incoming".into(),
            incoming.into(),
            "--service-if".into(),
            "eth0".into(),
            "--service-addr".into(),
            Topology::SERVICE_V4.to_string(),
            "--service-prefix".into(),
            "24".into(),
            "--admin".into(),
            admin_path.display().to_string(),
        ],
    );
    b.env("LMIG_KEY", key);
    if let Some(t) = tls {
        super::tls::use_certificates(&mut b, t, name);
    }
    if let Some(us) = die_at {
        b.env(crate::kvd::migrate::DIE_IN_FREEZE_ENV, us.to_string());
    }
    let mut b = host.spawn(&mut b)?;
    let rx = events(b.stdout.take().ok_or("the destination kvd has no stdout")?);
    Ok((b, rx))
}

/// Ask kvd A to migrate; its final answer.
pub(super) fn migrate_once(
    admin_path: &Path,
    incoming: &str,
    opts: &Options,
) -> Result<Result<SourceFigures, MigrateFailure>, Error> {
    let (_s, r) = admin(admin_path, &migrate_command(incoming, opts))?;
    Ok(read_answer(r, opts)?.0)
}

/// The `migrate` command `opts` asks for.
fn migrate_command(incoming: &str, opts: &Options) -> String {
    let mut c = format!("migrate {incoming} {} streams={}", opts.mode, opts.streams);
    if let Some(ms) = opts.max_freeze_ms {
        c += &format!(" max_freeze_ms={ms}");
    }
    if let Some(mbps) = opts.bandwidth_mbps {
        c += &format!(" bandwidth_mbps={mbps}");
    }
    c
}

/// `migrate`'s answer, and when kvd said it runs again after a failed
/// attempt (its `resumed` line arrived).
type Answer = (Result<SourceFigures, MigrateFailure>, Option<Instant>);

/// Read `migrate`'s progress lines (drawing the bar if asked) up to its answer.
fn read_answer(mut r: BufReader<UnixStream>, opts: &Options) -> Result<Answer, Error> {
    let bar = opts.progress.then(|| {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template("migrating {bar:40} {percent:>3}% {msg}")
                .expect("valid template"),
        );
        bar
    });
    let mut answer = Err(MigrateFailure {
        error: "kvd closed its admin socket without an answer".into(),
        ..MigrateFailure::default()
    });
    let mut resumed = None;
    let mut line = String::new();
    for _ in 0..1_000_000 {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        match serde_json::from_str::<MigrateLine>(line.trim())
            .map_err(|e| format!("kvd's answer to migrate {:?}: {e}", line.trim()))?
        {
            MigrateLine::Progress { progress: p } => {
                if let Some(bar) = &bar {
                    let done = p.pages as f64 / p.total_pages.max(1) as f64;
                    bar.set_position((done * 100.0).min(100.0) as u64);
                    bar.set_message(format!("{:.0} MiB sent", p.bytes as f64 / 1048576.0));
                }
            }
            MigrateLine::Resumed { .. } => resumed = Some(Instant::now()),
            MigrateLine::Migrated(s) => {
                answer = Ok(s);
                break;
            }
            MigrateLine::Failed(f) => {
                answer = Err(f);
                break;
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok((answer, resumed))
}

/// Send one command line to kvd's admin socket; the connection and a reader.
pub(super) fn admin(path: &Path, line: &str) -> Result<(UnixStream, BufReader<UnixStream>), Error> {
    let mut s = UnixStream::connect(path)
        .map_err(|e| format!("kvd admin socket {}: {e}", path.display()))?;
    writeln!(s, "{line}")?;
    let r = BufReader::new(s.try_clone()?);
    Ok((s, r))
}

/// Send one command line to kvd's admin socket; its one-line answer.
pub(super) fn admin_line(path: &Path, line: &str) -> Result<String, Error> {
    let (_s, mut r) = admin(path, line)?;
    let mut answer = String::new();
    r.read_line(&mut answer)?;
    Ok(answer.trim().to_string())
}

/// What [`cancel_at`] saw.
pub(super) struct Cancelled {
    /// `migrate`'s answer.
    pub answer: Result<SourceFigures, MigrateFailure>,
    /// From sending `cancel` to kvd saying it runs again (its `resumed`
    /// line), ms.
    pub cancel_ms: f64,
    /// From sending `cancel` to `migrate`'s last line (after the session's
    /// cleanup), ms.
    pub answered_ms: f64,
    /// The round and the fraction of it sent when `cancel` went out.
    pub at: (u32, f64),
    /// What a second `cancel`, sent after the answer, got.
    pub second_answer: String,
}

/// Ask kvd A to migrate, watch `status` until round 0 sent `pct` % of its
/// pages (or the migration got past round 0), then `cancel` it; the answer
/// and how long the cancel took to give kvd back to its clients.
pub(super) fn cancel_at(
    admin_path: &Path,
    incoming: &str,
    opts: &Options,
    pct: f64,
) -> Result<Cancelled, Error> {
    let (_s, r) = admin(admin_path, &migrate_command(incoming, opts))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    // One connection asks `status` again and again.
    let (mut ask, mut answers) = admin(admin_path, "status")?;
    let mut line = String::new();
    let mut seen = false;
    // Bounded by the deadline.
    let at = loop {
        if Instant::now() > deadline {
            return Err("the migration did not reach the cancel point within 300 s".into());
        }
        line.clear();
        answers.read_line(&mut line)?;
        let status: AdminStatus = serde_json::from_str(line.trim())
            .map_err(|e| format!("status {:?}: {e}", line.trim()))?;
        if let Some(m) = status.migration {
            seen = true;
            let fraction = if m.round_pages > 0 {
                m.round_pages_sent as f64 / m.round_pages as f64
            } else {
                0.0
            };
            let in_round_0 = m.phase == "precopy" && m.round == 0;
            let before = ["connecting", "setup"].contains(&m.phase.as_str());
            if (in_round_0 && fraction * 100.0 >= pct) || !(in_round_0 || before) {
                break (m.round, fraction);
            }
        } else if seen {
            // It ended (or had not begun: then `seen` is false).
            return Err(format!("kvd is {} before the cancel point", status.state).into());
        }
        std::thread::sleep(Duration::from_millis(1));
        writeln!(ask, "status")?;
    };
    let t0 = Instant::now();
    let first = admin_line(admin_path, "cancel")?;
    if !first.contains("\"cancelled\":true") {
        return Err(format!("cancel: {first}").into());
    }
    let (answer, resumed) = read_answer(r, opts)?;
    let answered_ms = t0.elapsed().as_secs_f64() * 1e3;
    let cancel_ms = resumed.map_or(answered_ms, |at| (at - t0).as_secs_f64() * 1e3);
    let second_answer = admin_line(admin_path, "cancel")?;
    Ok(Cancelled {
        answer,
        cancel_ms,
        answered_ms,
        at,
        second_answer,
    })
}
