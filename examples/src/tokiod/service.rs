//! tokiod's service on the tokio runtime: an acceptor task and one task per
//! connection, which can be parked (every socket handed back out of the
//! runtime with its buffered bytes) and started again from what a park, an
//! abort or a migration handed over.
//!
//! A connection task never awaits between reading and answering: when it
//! wakes it reads what waits, answers every whole request, writes what the
//! socket takes, and only then waits again (on its socket or the park
//! switch). What it holds at a park is therefore only an unfinished
//! request and replies the socket did not take yet, and both go with it.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use lmig_core::model::RegionId;
use lmig_mem::{DestinationRegions, Region, RegionSet};
use tokio::io::{Interest, Ready};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::commands::execute;
use super::state::ConnBuffers;
use crate::kvd::resp;
use crate::kvd::store::Store;

/// The region holding the store.
pub const STORE_REGION: RegionId = RegionId(1);
/// The listening socket's id in the socket records.
pub const LISTENER_ID: u64 = 0;
/// Connection ids start here.
const FIRST_CONN: u64 = 1;
/// How long a park may take before the caller gives up on it.
const PARK_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads of [`READ_CHUNK`] bytes one wake-up takes at most (then the task
/// answers, writes and yields to the others).
const READS_PER_WAKE: usize = 64;
const READ_CHUNK: usize = 16 * 1024;

/// Where the store's region lives.
#[derive(Clone)]
pub enum Memory {
    /// Mapped by this process at its start.
    Local(Arc<RegionSet>),
    /// Arrived with a migration.
    Arrived(Arc<DestinationRegions>),
}

impl Memory {
    /// The store's region.
    pub fn region(&self) -> Result<&Region, String> {
        let set = match self {
            Self::Local(set) => set,
            Self::Arrived(d) => d.regions().ok_or("no regions arrived")?,
        };
        set.get(STORE_REGION).map_err(|e| e.to_string())
    }

    /// The store the region holds.
    pub fn store(&self) -> Result<Store<'_>, String> {
        Store::open(self.region()?).map_err(|e| e.to_string())
    }
}

/// One connection out of the runtime: its socket and its buffered bytes.
#[derive(Debug)]
pub struct ParkedConn {
    /// The socket (non-blocking, out of the runtime's poller).
    pub fd: OwnedFd,
    /// Its id and buffered bytes.
    pub buffers: ConnBuffers,
}

/// What a park hands over: the listener and every open connection.
#[derive(Debug)]
pub struct Parked {
    /// The listening socket (id [`LISTENER_ID`]).
    pub listener: OwnedFd,
    /// Every connection open at the park.
    pub conns: Vec<ParkedConn>,
}

/// Counters the service keeps (for `stats`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Connections open.
    pub clients: AtomicU64,
}

/// Starts, parks and resumes the service from any thread.
#[derive(Clone)]
pub struct Control {
    shared: Arc<Shared>,
}

struct Shared {
    runtime: Handle,
    memory: Memory,
    counters: Counters,
    /// The serving generation's park switch and where it hands over.
    running: Mutex<Option<Running>>,
}

struct Running {
    park: watch::Sender<bool>,
    handed: mpsc::Receiver<Result<Parked, String>>,
}

impl Control {
    /// A service on `runtime` over the store in `memory`, not serving yet.
    pub fn new(runtime: Handle, memory: Memory) -> Self {
        Self {
            shared: Arc::new(Shared {
                runtime,
                memory,
                counters: Counters::default(),
                running: Mutex::new(None),
            }),
        }
    }

    /// The service's counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// The store's memory.
    pub fn memory(&self) -> &Memory {
        &self.shared.memory
    }

    /// Serve `listener` and `conns` (each with its buffered bytes, served
    /// first) on the runtime.
    pub fn start(
        &self,
        listener: std::net::TcpListener,
        conns: Vec<(std::net::TcpStream, ConnBuffers)>,
    ) -> Result<(), String> {
        let mut running = self.shared.running.lock().expect("poisoned");
        if running.is_some() {
            return Err("tokiod serves already".into());
        }
        let (park, park_rx) = watch::channel(false);
        let (handed_tx, handed) = mpsc::channel();
        self.shared.runtime.spawn(accept_loop(
            listener,
            conns,
            self.shared.clone(),
            park_rx,
            handed_tx,
        ));
        *running = Some(Running { park, handed });
        Ok(())
    }

    /// Park the service: every task stops and hands its socket back; the
    /// listener and the connections come back here. Bounded wait.
    pub fn park(&self) -> Result<Parked, String> {
        let running = self.shared.running.lock().expect("poisoned").take();
        let running = running.ok_or("tokiod is not serving")?;
        // No receiver left: the acceptor ended already, its answer waits.
        let _ = running.park.send(true);
        running
            .handed
            .recv_timeout(PARK_TIMEOUT)
            .map_err(|_| format!("the service did not park within {PARK_TIMEOUT:?}"))?
    }

    /// Serve again what a park handed over (after an aborted migration):
    /// the same sockets, adopted by the runtime anew.
    pub fn resume(&self, parked: Parked) -> Result<(), String> {
        let conns = parked
            .conns
            .into_iter()
            .map(|c| (std::net::TcpStream::from(c.fd), c.buffers))
            .collect();
        self.start(std::net::TcpListener::from(parked.listener), conns)
    }
}

/// Adopt a std socket into the runtime (non-blocking, registered).
fn adopt(stream: std::net::TcpStream) -> std::io::Result<TcpStream> {
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

/// The acceptor of one serving generation: it accepts, owns the connection
/// tasks, and at the park collects them all and hands everything over.
async fn accept_loop(
    listener: std::net::TcpListener,
    conns: Vec<(std::net::TcpStream, ConnBuffers)>,
    shared: Arc<Shared>,
    mut park: watch::Receiver<bool>,
    handed: mpsc::Sender<Result<Parked, String>>,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            let _ = handed.send(Err(format!("adopting the listener: {e}")));
            return;
        }
    };
    let mut tasks = JoinSet::new();
    let mut next_id = FIRST_CONN;
    // Each task's switch sees the park even if it came before the task ran.
    let switch = park.clone();
    let spawn = |tasks: &mut JoinSet<_>, stream, buffers: ConnBuffers| {
        shared.counters.clients.fetch_add(1, Ordering::Relaxed);
        let conn = Conn { stream, buffers };
        tasks.spawn(connection(conn, shared.clone(), switch.clone()));
    };
    for (stream, buffers) in conns {
        next_id = next_id.max(buffers.id + 1);
        match adopt(stream) {
            Ok(stream) => spawn(&mut tasks, stream, buffers),
            Err(e) => eprintln!("tokiod: connection {} lost: {e}", buffers.id),
        }
    }
    let mut parked = Vec::new();
    loop {
        tokio::select! {
            biased;
            // An error: the control is gone; park all the same.
            _ = park.changed() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                Ok(Some(p)) => parked.push(p),
                Ok(None) => {}
                Err(e) => eprintln!("tokiod: a connection task failed: {e}"),
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Restored connections keep the option (lmig carries it).
                    let _ = stream.set_nodelay(true);
                    let buffers = ConnBuffers { id: next_id, ..ConnBuffers::default() };
                    next_id += 1;
                    spawn(&mut tasks, stream, buffers);
                }
                // Out of fds, or a connection reset before it was taken:
                // the listener waits on.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Some(p)) => parked.push(p),
            Ok(None) => {}
            Err(e) => eprintln!("tokiod: a connection task failed: {e}"),
        }
    }
    let listener = match listener.into_std() {
        Ok(l) => OwnedFd::from(l),
        Err(e) => {
            let _ = handed.send(Err(format!("taking the listener back: {e}")));
            return;
        }
    };
    let parked = Parked {
        listener,
        conns: parked,
    };
    if let Err(mpsc::SendError(Ok(parked))) = handed.send(Ok(parked)) {
        // Nobody waits for the sockets (the park timed out): serve on.
        if let Err(e) = (Control { shared }).resume(parked) {
            eprintln!("tokiod: serving on after a late park: {e}");
        }
    }
}

/// One connection task: serve until the peer leaves (`None`) or the park
/// (the socket handed back out of the runtime, with its buffered bytes).
async fn connection(
    mut conn: Conn,
    shared: Arc<Shared>,
    mut park: watch::Receiver<bool>,
) -> Option<ParkedConn> {
    let parked = conn.run(&shared, &mut park).await;
    shared.counters.clients.fetch_sub(1, Ordering::Relaxed);
    if !parked {
        return None;
    }
    let Conn { stream, buffers } = conn;
    // Leaves the runtime's poller (one `epoll_ctl`); the fd stays open.
    match stream.into_std() {
        Ok(s) => Some(ParkedConn {
            fd: s.into(),
            buffers,
        }),
        Err(e) => {
            eprintln!("tokiod: connection {} lost at the park: {e}", buffers.id);
            None
        }
    }
}

struct Conn {
    stream: TcpStream,
    buffers: ConnBuffers,
}

impl Conn {
    /// Serve until the park (true) or the connection's end (false).
    async fn run(&mut self, shared: &Shared, park: &mut watch::Receiver<bool>) -> bool {
        let store = match shared.memory.store() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tokiod: no store for connection {}: {e}", self.buffers.id);
                return false;
            }
        };
        // Bytes that came with the connection (an abort, a migration).
        let buffered = !self.buffers.input.is_empty() || !self.buffers.output.is_empty();
        if buffered && !self.serve(Ready::EMPTY, &store, &shared.counters) {
            return false;
        }
        loop {
            let interest = if self.buffers.output.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            let woke = tokio::select! {
                biased;
                _ = park.changed() => None,
                ready = self.stream.ready(interest) => Some(ready),
            };
            match woke {
                None => return true,
                Some(Ok(ready)) => {
                    if !self.serve(ready, &store, &shared.counters) {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    }

    /// Read what waits, answer every whole request, write what the socket
    /// takes; no `.await` in between. False: the connection ends.
    fn serve(&mut self, ready: Ready, store: &Store<'_>, counters: &Counters) -> bool {
        let mut open = true;
        if ready.is_readable() || ready.is_read_closed() {
            open = self.read();
        }
        if !self.answer(store, counters) {
            open = false;
        }
        self.write() && open
    }

    /// False: the peer closed or the socket failed.
    fn read(&mut self) -> bool {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_WAKE {
            match self.stream.try_read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.buffers.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        true
    }

    /// Answer every whole request read. False: a protocol error (its reply
    /// is written, then the connection closes).
    fn answer(&mut self, store: &Store<'_>, counters: &Counters) -> bool {
        let ConnBuffers { input, output, .. } = &mut self.buffers;
        let mut consumed = 0;
        let mut ok = true;
        loop {
            match resp::parse(&input[consumed..]) {
                Ok(Some((args, n))) => {
                    consumed += n;
                    if !args.is_empty() {
                        execute(store, &args, output);
                        counters.requests.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    resp::error(output, &format!("Protocol error: {}", e.0));
                    consumed = input.len();
                    ok = false;
                    break;
                }
            }
        }
        input.drain(..consumed);
        ok
    }

    /// Write what the socket takes. False: it failed.
    fn write(&mut self) -> bool {
        let output = &mut self.buffers.output;
        while !output.is_empty() {
            match self.stream.try_write(output) {
                Ok(0) => return false,
                Ok(n) => {
                    output.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmig_mem::RegionOptions;
    use std::io::{BufRead, BufReader, Write};

    fn request(s: &mut std::net::TcpStream, r: &mut BufReader<std::net::TcpStream>) -> String {
        s.write_all(b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        line
    }

    /// A park hands back every connection with the bytes of a request cut
    /// in two; the resumed service finishes that request on the same
    /// socket, and the client never notices.
    #[test]
    fn park_hands_back_every_socket_and_resume_serves_them() {
        let region = RegionOptions::new(STORE_REGION, 1 << 20).map().unwrap();
        let regions = Arc::new(RegionSet::new([region]).unwrap());
        Store::format(regions.get(STORE_REGION).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let control = Control::new(rt.handle().clone(), Memory::Local(regions));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        control.start(listener, Vec::new()).unwrap();
        // The runtime runs on its own thread until the test ends.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = std::thread::spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            })
        });
        let mut clients: Vec<_> = (0..5)
            .map(|_| {
                let s = std::net::TcpStream::connect(addr).unwrap();
                let r = BufReader::new(s.try_clone().unwrap());
                (s, r)
            })
            .collect();
        let mut expected = 0;
        for (s, r) in &mut clients {
            expected += 1;
            assert_eq!(request(s, r), format!(":{expected}\r\n"));
        }
        // Half a request on the first connection, then the park.
        clients[0].0.write_all(b"*2\r\n$4\r\nIN").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let parked = control.park().unwrap();
        assert_eq!(parked.conns.len(), 5);
        let cut = parked.conns.iter().find(|c| !c.buffers.input.is_empty());
        assert_eq!(
            cut.map(|c| c.buffers.input.as_slice()),
            Some(&b"*2\r\n$4\r\nIN"[..])
        );
        assert_eq!(control.counters().clients.load(Ordering::Relaxed), 0);
        control.resume(parked).unwrap();
        clients[0].0.write_all(b"CR\r\n$1\r\nk\r\n").unwrap();
        let mut line = String::new();
        clients[0].1.read_line(&mut line).unwrap();
        assert_eq!(line, ":6\r\n");
        for (s, r) in &mut clients {
            assert_eq!(request(s, r), format!(":{}\r\n", expected + 2));
            expected += 1;
        }
        assert!(!driver.is_finished());
        let _ = stop.send(());
        driver.join().unwrap();
    }
}
