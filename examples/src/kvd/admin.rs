//! kvd's admin socket: a Unix socket serving its operators concurrently
//! (one thread per connection, an idle connection closed after
//! [`IDLE_TIMEOUT`]: a silent client blocks nobody), the commands it
//! understands ([`AdminCommand`]), and the removal of the socket file
//! whenever kvd ends ([`exit`], [`SignalWatch`]).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use lmig_core::session::Mode;

/// An admin connection that says nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most admin connections served at once; one more is told so and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest admin command line.
const MAX_LINE: usize = 4096;

/// The commands, as an error line lists them.
pub const COMMANDS: &str = "stats | status | populate N | \
migrate HOST:PORT [precopy|postcopy|hybrid] [downtime_ms=N] [bandwidth_mbps=N] [timeout_s=N] [streams=N] [max_freeze_ms=N] | \
set bandwidth_mbps=N | cancel | help | quit";

/// The admin socket's path, removed by [`exit`].
static SOCKET_PATH: Mutex<Option<PathBuf>> = Mutex::new(None);

/// End kvd with `code`, removing its admin socket file first.
pub fn exit(code: i32) -> ! {
    remove_socket();
    std::process::exit(code)
}

/// Remove the admin socket file (if kvd made one).
pub fn remove_socket() {
    let path = SOCKET_PATH.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
}

/// Bind the admin socket at `path` (a stale file from an earlier kvd is
/// replaced); [`exit`] removes it.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    *SOCKET_PATH.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
    Ok(listener)
}

/// The thread that ends kvd on `SIGTERM`, `SIGINT` or `SIGHUP` through
/// [`exit`] (socket file removed). Those signals are blocked in every
/// thread (call [`SignalWatch::spawn`] before starting any other thread)
/// and taken here with `sigwait`.
pub struct SignalWatch {
    thread: JoinHandle<()>,
}

impl SignalWatch {
    /// Block the signals and start the thread.
    pub fn spawn() -> std::io::Result<Self> {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block().map_err(std::io::Error::from)?;
        let thread = std::thread::Builder::new()
            .name("kvd-signals".into())
            .spawn(move || {
                if let Ok(sig) = set.wait() {
                    eprintln!("kvd: {sig}, ending");
                    exit(128 + sig as i32);
                }
            })?;
        Ok(Self { thread })
    }

    /// Wait for the thread (it ends only with the process).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// What kvd does with one admin command line; writes its answer (one JSON
/// line, or several for `migrate`) to `out`. Returns false to close the
/// connection.
pub trait AdminHandler: Send + Sync {
    /// Answer `command`.
    fn handle(&self, command: Result<AdminCommand, String>, out: &mut UnixStream) -> bool;
}

/// The handler in force, swapped when kvd changes role (a destination that
/// took a migration in serves the full command set from then on).
pub struct HandlerSlot {
    handler: RwLock<Arc<dyn AdminHandler>>,
}

impl HandlerSlot {
    /// A slot holding `handler`.
    pub fn new(handler: Arc<dyn AdminHandler>) -> Arc<Self> {
        Arc::new(Self {
            handler: RwLock::new(handler),
        })
    }

    /// Answer with `handler` from now on.
    pub fn set(&self, handler: Arc<dyn AdminHandler>) {
        *self.handler.write().unwrap_or_else(|p| p.into_inner()) = handler;
    }

    fn get(&self) -> Arc<dyn AdminHandler> {
        self.handler
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The thread accepting admin connections, each served on a thread of its own.
pub struct AdminServer {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl AdminServer {
    /// Serve `listener` with the handler in `slot`.
    pub fn spawn(listener: UnixListener, slot: Arc<HandlerSlot>) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kvd-admin".into())
            .spawn(move || Self::run(&listener, &slot, &stopped))?;
        Ok(Self { thread, stop })
    }

    fn run(listener: &UnixListener, slot: &Arc<HandlerSlot>, stop: &AtomicBool) {
        let mut conns: Vec<AdminConn> = Vec::new();
        // Bounded by `stop`; each pass sleeps when nobody connects.
        while !stop.load(Ordering::Relaxed) {
            // Reap the connections that ended.
            let (ended, open): (Vec<_>, Vec<_>) = conns.drain(..).partition(AdminConn::is_finished);
            conns = open;
            ended.into_iter().for_each(AdminConn::join);
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        let _ = writeln!(
                            stream,
                            "{}",
                            serde_json::json!({"error": format!("{MAX_CONNECTIONS} admin connections are open: try again later")})
                        );
                        continue;
                    }
                    match AdminConn::spawn(stream, slot.clone()) {
                        Ok(c) => conns.push(c),
                        Err(e) => eprintln!("kvd: admin connection: {e}"),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    eprintln!("kvd: admin socket: {e}");
                    std::thread::sleep(Duration::from_millis(100))
                }
            }
        }
    }

    /// Stop accepting and wait for the thread (open connections end on
    /// their own, at the latest after [`IDLE_TIMEOUT`]).
    pub fn join(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// The thread serving one admin connection, line by line.
struct AdminConn {
    thread: JoinHandle<()>,
}

impl AdminConn {
    fn spawn(stream: UnixStream, slot: Arc<HandlerSlot>) -> std::io::Result<Self> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
        let thread = std::thread::Builder::new()
            .name("kvd-admin-conn".into())
            .spawn(move || Self::run(stream, &slot))?;
        Ok(Self { thread })
    }

    fn run(stream: UnixStream, slot: &HandlerSlot) {
        let Ok(read) = stream.try_clone() else { return };
        let mut out = stream;
        let mut reader = BufReader::new(read).take(MAX_LINE as u64);
        let mut line = String::new();
        // Bounded by the client: each pass reads a line or ends.
        loop {
            line.clear();
            reader.set_limit(MAX_LINE as u64);
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) if !line.ends_with('\n') && line.len() >= MAX_LINE => {
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::json!({"error": format!("a command is at most {MAX_LINE} bytes"), "commands": COMMANDS})
                    );
                    return;
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::json!({"error": format!("idle for {} s: closing", IDLE_TIMEOUT.as_secs())})
                    );
                    return;
                }
                Err(_) => return,
            }
            if line.trim().is_empty() {
                continue;
            }
            let command = AdminCommand::parse(&line);
            if !slot.get().handle(command, &mut out) {
                return;
            }
            let _ = out.flush();
        }
    }

    fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    fn join(self) {
        let _ = self.thread.join();
    }
}

/// One admin command.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum AdminCommand {
    /// Keys, clients, requests.
    Stats,
    /// Role and the running migration's progress.
    Status,
    /// Store N keys.
    Populate(u64),
    /// Migrate away.
    Migrate(MigrateRequest),
    /// Change the running migration's bandwidth limit (MB/s, 0: none).
    SetBandwidth(f64),
    /// Cancel the running migration.
    Cancel,
    /// The commands.
    Help,
    /// Close this connection.
    Quit,
}

/// `migrate`'s parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrateRequest {
    /// The destination kvd's migration address.
    pub target: SocketAddr,
    /// Memory mode.
    pub mode: Mode,
    /// Data streams (default 2).
    pub streams: usize,
    /// The policy's downtime target (default 2 ms).
    pub downtime: Duration,
    /// Bandwidth limit in bytes/s (0: none).
    pub bandwidth: u64,
    /// Cancel if not committed by then.
    pub timeout: Option<Duration>,
    /// Abort a freeze longer than this.
    pub max_freeze: Option<Duration>,
}

/// A positive, finite number.
fn positive(name: &str, v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok(x),
        _ => Err(format!("{name}={v}: a positive number")),
    }
}

/// MB/s (0: no limit) as bytes/s.
fn mbps(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.is_finite() && x < 1e9 => Ok(x),
        _ => Err(format!(
            "bandwidth_mbps={v}: MB/s, 0 for no limit (a number from 0)"
        )),
    }
}

fn mode(v: &str) -> Result<Mode, String> {
    match v {
        "precopy" => Ok(Mode::Precopy),
        "postcopy" => Ok(Mode::Postcopy),
        "hybrid" => Ok(Mode::Hybrid),
        other => Err(format!(
            "unknown mode {other:?}: precopy, postcopy or hybrid"
        )),
    }
}

impl MigrateRequest {
    /// `HOST:PORT [mode] [streams] [max-freeze-ms] [name=value ...]` (the
    /// positional forms are the older syntax, still accepted).
    fn parse(target: &str, rest: &[&str]) -> Result<Self, String> {
        let target = target
            .parse()
            .map_err(|_| format!("bad address {target:?}: HOST:PORT"))?;
        let mut r = Self {
            target,
            mode: Mode::Precopy,
            streams: 2,
            // The pages' share of the freeze: the sockets take the rest,
            // and on a shared host the last pages compete with them for
            // the CPU (5 ms left 600-1000 pages, 5-10 ms).
            downtime: Duration::from_millis(2),
            bandwidth: 0,
            timeout: None,
            max_freeze: None,
        };
        let mut positional = 0;
        for word in rest {
            let ms = |name, v| positive(name, v).map(|ms| Duration::from_secs_f64(ms / 1e3));
            match word.split_once('=') {
                Some(("downtime_ms", v)) => r.downtime = ms("downtime_ms", v)?,
                Some(("bandwidth_mbps", v)) => r.bandwidth = (mbps(v)? * 1e6) as u64,
                Some(("timeout_s", v)) => {
                    r.timeout = Some(Duration::from_secs_f64(positive("timeout_s", v)?))
                }
                Some(("streams", v)) => r.streams = streams(v)?,
                Some(("max_freeze_ms", v)) => r.max_freeze = Some(ms("max_freeze_ms", v)?),
                Some(("mode", v)) => r.mode = mode(v)?,
                Some((name, _)) => {
                    return Err(format!(
                        "unknown parameter {name:?}: downtime_ms, bandwidth_mbps, timeout_s, streams, max_freeze_ms, mode"
                    ));
                }
                None => {
                    match positional {
                        0 => r.mode = mode(word)?,
                        1 => r.streams = streams(word)?,
                        2 => r.max_freeze = Some(ms("max freeze", word)?),
                        _ => return Err(format!("unexpected {word:?}")),
                    }
                    positional += 1;
                }
            }
        }
        Ok(r)
    }
}

fn streams(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if (1..=16).contains(&n) => Ok(n),
        _ => Err(format!("streams={v}: 1 to 16")),
    }
}

impl AdminCommand {
    /// Parse one line; the error says what is wrong (the caller adds the
    /// list of commands).
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        Ok(match words.as_slice() {
            ["stats"] => Self::Stats,
            ["status"] => Self::Status,
            ["populate", n] => Self::Populate(
                n.parse()
                    .map_err(|_| format!("populate {n}: a number of keys"))?,
            ),
            ["migrate", target, rest @ ..] => Self::Migrate(MigrateRequest::parse(target, rest)?),
            ["set", setting] => match setting.split_once('=') {
                Some(("bandwidth_mbps", v)) => Self::SetBandwidth(mbps(v)?),
                _ => return Err(format!("set {setting}: only bandwidth_mbps=N can be set")),
            },
            ["cancel"] => Self::Cancel,
            ["help"] => Self::Help,
            ["quit"] => Self::Quit,
            [] => return Err("empty command".into()),
            [word, ..] => return Err(format!("unknown or malformed command {word:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_say_why() {
        assert_eq!(AdminCommand::parse("stats\n"), Ok(AdminCommand::Stats));
        assert_eq!(
            AdminCommand::parse("set bandwidth_mbps=12.5"),
            Ok(AdminCommand::SetBandwidth(12.5))
        );
        let Ok(AdminCommand::Migrate(m)) = AdminCommand::parse(
            "migrate 198.51.100.2:7000 hybrid downtime_ms=5 bandwidth_mbps=100 timeout_s=30 streams=4",
        ) else {
            panic!("migrate")
        };
        assert_eq!(m.mode, Mode::Hybrid);
        assert_eq!(m.downtime, Duration::from_millis(5));
        assert_eq!(m.bandwidth, 100_000_000);
        assert_eq!(m.timeout, Some(Duration::from_secs(30)));
        assert_eq!(m.streams, 4);
        // The older positional form.
        let Ok(AdminCommand::Migrate(m)) =
            AdminCommand::parse("migrate 198.51.100.2:7000 precopy 3 1.5")
        else {
            panic!("positional")
        };
        assert_eq!(
            (m.streams, m.max_freeze),
            (3, Some(Duration::from_micros(1500)))
        );
        for bad in [
            "migrate nowhere",
            "migrate 198.51.100.2:7000 sideways",
            "migrate 198.51.100.2:7000 bandwidth_mbps=-1",
            "migrate 198.51.100.2:7000 speed=3",
            "migrate 198.51.100.2:7000 streams=0",
            "set downtime_ms=3",
            "populate many",
            "frobnicate",
            "",
        ] {
            assert!(AdminCommand::parse(bad).is_err(), "{bad:?}");
        }
    }
}
