//! A program of its own run against the service from the client namespace
//! while kvd migrates (`lmig-bench redis`: redis-benchmark). The scenario
//! starts it once kvd serves, migrates [`super::Options::warmup`] later,
//! waits for it to end, and then reads back what it did to kvd's keys
//! ([`External::check`]) before the hosts go away.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lmig_net::topology::Netns;

use super::Error;
use crate::common::clock::now_mono_ns;

/// What to read back through the service once the program ended (run in
/// the client namespace): its findings, as the scenario's report keeps them.
pub type Check = Arc<dyn Fn(SocketAddr) -> Result<serde_json::Value, String> + Send + Sync>;

/// A program to run against the service.
#[derive(Clone)]
#[non_exhaustive]
pub struct External {
    /// The program and its arguments; in an argument, `{host}` becomes the
    /// service's address and `{port}` its port.
    pub command: (PathBuf, Vec<String>),
    /// How long it may run: past it, it is killed and the run fails.
    pub timeout: Duration,
    /// Read back after it ended.
    pub check: Option<Check>,
}

impl External {
    /// `program args...`, at most `timeout`, nothing read back.
    pub fn new(program: impl Into<PathBuf>, args: Vec<String>, timeout: Duration) -> Self {
        Self {
            command: (program.into(), args),
            timeout,
            check: None,
        }
    }

    /// Read back with `check` once it ended.
    #[must_use]
    pub fn with_check(mut self, check: Check) -> Self {
        self.check = Some(check);
        self
    }
}

impl std::fmt::Debug for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("External")
            .field("command", &self.command)
            .field("timeout", &self.timeout)
            .field("check", &self.check.is_some())
            .finish()
    }
}

/// What the program did.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ExternalRun {
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// Its exit code (`None`: killed by a signal).
    pub exit_code: Option<i32>,
    /// When it started and ended, `CLOCK_MONOTONIC` ns (the clock of kvd's reports).
    pub started_ns: u64,
    /// See `started_ns`.
    pub ended_ns: u64,
    /// [`External::check`]'s findings.
    pub check: Option<Result<serde_json::Value, String>>,
}

/// The program, running; killed (by pid, our child only) if dropped first.
pub(super) struct Running {
    child: Option<Child>,
    readers: Vec<std::thread::JoinHandle<String>>,
    started_ns: u64,
    started: Instant,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Start `ext` in `ns` against `service`.
pub(super) fn start(ext: &External, ns: &Netns, service: SocketAddr) -> Result<Running, Error> {
    let (program, args) = &ext.command;
    let args = args.iter().map(|a| {
        a.replace("{host}", &service.ip().to_string())
            .replace("{port}", &service.port().to_string())
    });
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started_ns = now_mono_ns();
    let mut child = ns
        .spawn(&mut cmd)
        .map_err(|e| format!("{}: {e}", program.display()))?;
    // Both pipes drained on threads of their own, so that neither fills.
    let mut readers = Vec::new();
    let out: [Option<Box<dyn Read + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as _),
        child.stderr.take().map(|s| Box::new(s) as _),
    ];
    for mut pipe in out.into_iter().flatten() {
        readers.push(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        }));
    }
    Ok(Running {
        child: Some(child),
        readers,
        started_ns,
        started: Instant::now(),
    })
}

impl Running {
    /// Wait for the program to end (killed past its timeout: an error),
    /// then run the check in `ns` against `service`.
    pub(super) fn finish(
        mut self,
        ext: &External,
        ns: &Netns,
        service: SocketAddr,
    ) -> Result<ExternalRun, Error> {
        let mut child = self.child.take().ok_or("the program is gone")?;
        // Bounded by the timeout.
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if self.started.elapsed() > ext.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not end within {:?}",
                    ext.command.0.display(),
                    ext.timeout
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let ended_ns = now_mono_ns();
        let mut texts = std::mem::take(&mut self.readers)
            .into_iter()
            .map(|r| r.join().unwrap_or_default());
        let stdout = texts.next().unwrap_or_default();
        let stderr = texts.next().unwrap_or_default();
        let check = match &ext.check {
            Some(check) => {
                let check = check.clone();
                Some(ns.run(move || check(service))?)
            }
            None => None,
        };
        Ok(ExternalRun {
            stdout,
            stderr,
            exit_code: status.code(),
            started_ns: self.started_ns,
            ended_ns,
            check,
        })
    }
}
