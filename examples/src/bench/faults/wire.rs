//! Wire faults: `lmig-transport`'s TCP channel, default encryption (Noise
//! keyed by the pre-shared key), through a byte proxy on loopback that
//! flips one byte or cuts the connection at a chosen offset of one
//! stream's bytes in one direction. The offsets are spread over what a
//! fault-free run of the same mode sent on each stream.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lmig_core::session::Mode;
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, StreamChannel, connect};

use super::check::{Verdict, check};
use super::run::Case;
use super::{Args, Summary, TIMEOUT};

/// What the proxy does at its offset.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WireFault {
    /// Flip the bits of one byte.
    Corrupt,
    /// Forward up to the offset, then close both connections.
    Truncate,
}

impl WireFault {
    fn name(self) -> &'static str {
        match self {
            WireFault::Corrupt => "corrupt",
            WireFault::Truncate => "truncate",
        }
    }
}

/// One wire fault: connection `conn` (in accept order), direction `dir`
/// (0: dialer to listener, 1: back), byte `offset`.
#[derive(Copy, Clone, Debug)]
pub struct WireSpec {
    /// Connection index.
    pub conn: usize,
    /// Direction.
    pub dir: usize,
    /// Byte offset in that direction.
    pub offset: u64,
    /// What happens there.
    pub kind: WireFault,
}

type Counts = Arc<Mutex<Vec<[u64; 2]>>>;

/// The proxy: an accept loop (the `ProxyAcceptor` role) and two pumps per
/// connection (the `Pump` role); every thread is joined on drop, every
/// read bounded by a timeout.
struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    counts: Counts,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    fn spawn(target: SocketAddr, fault: Option<WireSpec>) -> std::io::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Counts = Arc::default();
        let (st, c) = (stop.clone(), counts.clone());
        let acceptor = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(&l, target, fault, &st, &c))?;
        Ok(Self {
            addr,
            stop,
            counts,
            acceptor: Some(acceptor),
        })
    }

    fn counts(&self) -> Vec<[u64; 2]> {
        self.counts.lock().expect("poisoned").clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            for p in a.join().unwrap_or_default() {
                let _ = p.join();
            }
        }
    }
}

fn accept_loop(
    l: &TcpListener,
    target: SocketAddr,
    fault: Option<WireSpec>,
    stop: &AtomicBool,
    counts: &Counts,
) -> Vec<JoinHandle<()>> {
    let mut pumps = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let Ok((a, _)) = l.accept() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let Ok(b) = TcpStream::connect(target) else {
            continue;
        };
        let conn = {
            let mut c = counts.lock().expect("poisoned");
            c.push([0, 0]);
            c.len() - 1
        };
        for (dir, (from, to)) in [
            (a.try_clone(), b.try_clone()),
            (b.try_clone(), a.try_clone()),
        ]
        .into_iter()
        .enumerate()
        {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            let f = fault.filter(|f| f.conn == conn && f.dir == dir);
            let counts = counts.clone();
            pumps.push(std::thread::spawn(move || {
                pump(from, to, f, &counts, conn, dir)
            }));
        }
    }
    pumps
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Option<WireSpec>,
    counts: &Counts,
    conn: usize,
    dir: usize,
) {
    let _ = from.set_nonblocking(false);
    let _ = from.set_read_timeout(Some(TIMEOUT * 6));
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if let Some(f) = fault.filter(|f| f.offset >= pos && f.offset < pos + n as u64) {
            let i = (f.offset - pos) as usize;
            match f.kind {
                WireFault::Corrupt => chunk[i] ^= 0x5a,
                WireFault::Truncate => {
                    let _ = to.write_all(&chunk[..i]);
                    counts.lock().expect("poisoned")[conn][dir] += i as u64;
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        if to.write_all(chunk).is_err() {
            break;
        }
        pos += n as u64;
        counts.lock().expect("poisoned")[conn][dir] += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// The channel settings of the wire and kill points: default encryption,
/// one data stream, short timeouts.
pub fn config() -> ChannelConfig {
    let key = AuthKey::new(b"fault suite key, 32 bytes long..").expect("a valid key");
    let mut c = ChannelConfig::new(key).with_data_streams(1);
    c.handshake_timeout = TIMEOUT;
    c.connect_timeout = TIMEOUT * 2;
    c.reconnect_timeout = TIMEOUT;
    c.write_timeout = Some(TIMEOUT * 2);
    c
}

/// One migration over TCP through the proxy; the verdict and the bytes
/// each stream carried each way.
pub fn run_wire(case: &Case, fault: Option<WireSpec>) -> (Verdict, Vec<[u64; 2]>) {
    let listener = Listener::bind(
        &Endpoint::Tcp("127.0.0.1:0".parse().expect("addr")),
        config(),
    )
    .expect("bind a loopback listener");
    let Endpoint::Tcp(target) = listener.local_endpoint().clone() else {
        unreachable!("a TCP listener has a TCP endpoint")
    };
    let proxy = Proxy::spawn(target, fault).expect("start the proxy");
    let to = Endpoint::Tcp(proxy.addr);
    // The destination waits for a channel until the source's connect
    // failed (a fault in the handshake) or for three timeouts at most.
    let gave_up = AtomicBool::new(false);
    let obs = case.migrate(
        || {
            let c = connect(&to, config());
            gave_up.store(c.is_err(), Ordering::SeqCst);
            c.ok()
        },
        || -> Option<StreamChannel> {
            let deadline = Instant::now() + TIMEOUT * 3;
            loop {
                match listener.accept_timeout(Duration::from_millis(20)) {
                    Ok(c) => return Some(c),
                    Err(_) if gave_up.load(Ordering::SeqCst) || Instant::now() > deadline => {
                        return None;
                    }
                    Err(_) => {}
                }
            }
        },
    );
    drop(listener);
    let counts = proxy.counts();
    drop(proxy);
    (check(&obs), counts)
}

/// Every wire fault point of `mode`.
pub fn wire_faults(
    args: &Args,
    mode: Mode,
    sum: &mut Summary,
    progress: &mut dyn FnMut(&str, &Verdict),
) {
    let case = Case::new(args.pages, mode);
    let what = format!("{mode:?} wire fault-free");
    let counts =
        match super::point::bounded(&what, args.point_timeout(), move || run_wire(&case, None)) {
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
    let k = u64::from(args.wire_offsets.max(1));
    for (conn, c) in counts.iter().enumerate() {
        for (dir, &bytes) in c.iter().enumerate() {
            for i in 1..=k {
                let offset = bytes * i / (k + 1);
                for kind in [WireFault::Corrupt, WireFault::Truncate] {
                    let spec = WireSpec {
                        conn,
                        dir,
                        offset,
                        kind,
                    };
                    let what = format!(
                        "{mode:?} {} stream {conn} dir {dir} byte {offset}/{bytes}",
                        kind.name()
                    );
                    if !args.wants(&what) {
                        continue;
                    }
                    let v = super::point::bounded(&what, args.point_timeout(), move || {
                        run_wire(&case, Some(spec)).0
                    })
                    .unwrap_or_else(|v| v);
                    progress(&what, &v);
                    sum.add(kind.name(), &what, v);
                }
            }
        }
    }
}
