//! Child processes of the benchmark and the demo. Scenarios that need a
//! second process re-execute `lmig-bench` with a hidden peer option. The
//! peer prints `LISTENING <address>` once it listens and `RESULT <json>`
//! when done; [`Peer`] reads those lines and kills the child
//! (by pid, our own child only) if the scenario ends early.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use lmig_net::topology::Netns;

/// A child `lmig-bench` process.
pub struct Peer {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

/// Error from a peer process.
pub type PeerError = Box<dyn std::error::Error>;

impl Peer {
    /// Start `lmig-bench <args>` (this very program) with extra environment `env`.
    pub fn spawn(args: &[String], env: &[(&str, &str)]) -> Result<Self, PeerError> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = BufReader::new(child.stdout.take().ok_or("peer has no stdout")?);
        Ok(Self { child, stdout })
    }

    /// Read lines until one starts with `prefix`; return the rest of it.
    pub fn expect_line(&mut self, prefix: &str) -> Result<String, PeerError> {
        let mut line = String::new();
        for _ in 0..10_000 {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                let status = self.child.wait()?;
                return Err(format!("peer exited ({status}) before printing {prefix:?}").into());
            }
            if let Some(rest) = line.trim_end().strip_prefix(prefix) {
                return Ok(rest.trim().to_string());
            }
        }
        Err(format!("peer never printed {prefix:?}").into())
    }

    /// Wait for the peer's `RESULT` line and its exit.
    pub fn result(mut self) -> Result<serde_json::Value, PeerError> {
        let json = self.expect_line("RESULT")?;
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("peer failed: {status}").into());
        }
        Ok(serde_json::from_str(&json)?)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Print a peer's `LISTENING` line.
pub fn announce_listening(addr: impl std::fmt::Display) {
    println!("LISTENING {addr}");
}

/// Print a peer's `RESULT` line.
pub fn announce_result(v: &serde_json::Value) {
    println!("RESULT {v}");
}

/// A worker process in a namespace driven line by line: the scenario writes
/// a command to its stdin, it answers `OK <values…>` (or anything else, an
/// error) on its stdout. Dropping it says `quit` and, if it does not exit
/// within 2 s, kills it (our own child, by pid).
pub struct Worker {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Start `cmd` in `ns` with its stdin and stdout piped to us.
    pub fn spawn(ns: &Netns, name: &'static str, cmd: &mut Command) -> Result<Self, PeerError> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = ns.spawn(cmd)?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        Ok(Self {
            name,
            child,
            stdin,
            stdout,
        })
    }

    /// Send one command line.
    pub fn send(&mut self, line: &str) -> Result<(), PeerError> {
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Read one answer: the values after `OK`.
    pub fn answer(&mut self) -> Result<Vec<String>, PeerError> {
        let mut s = String::new();
        if self.stdout.read_line(&mut s)? == 0 {
            return Err(format!("{} exited", self.name).into());
        }
        let w: Vec<String> = s.split_whitespace().map(str::to_string).collect();
        match w.first().map(String::as_str) {
            Some("OK") => Ok(w[1..].to_vec()),
            _ => Err(format!("{}: {}", self.name, s.trim()).into()),
        }
    }

    /// Send a command and read its answer.
    pub fn cmd(&mut self, line: &str) -> Result<Vec<String>, PeerError> {
        self.send(line)?;
        self.answer()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Only the process we started, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The worker's side of [`Worker`]: answer each command line read on stdin
/// with `OK <answer>` or `ERR <error>` on stdout, until `quit` or the end of
/// the input.
pub fn serve_commands(
    mut answer: impl FnMut(&str) -> Result<String, PeerError>,
) -> Result<(), PeerError> {
    lmig_net::raise_nofile_limit()?;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let cmd = line.trim();
        if cmd == "quit" {
            break;
        }
        match answer(cmd) {
            Ok(s) => writeln!(out, "OK {s}")?,
            Err(e) => writeln!(out, "ERR {}", e.to_string().replace('\n', " "))?,
        }
        out.flush()?;
    }
    Ok(())
}
