//! A load generator for kvd: N connections, each issuing `INCR c:<n>` on its
//! own counter, one request in flight per connection, checking that every
//! reply is exactly one more than the last (a lost or repeated request shows
//! at once), and recording every request's latency.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::resp::{self, Reply};

/// What one run of the load generator saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Connections opened.
    pub conns: usize,
    /// Connections still healthy at the end.
    pub conns_kept: usize,
    /// Connections that were reset, closed or timed out.
    pub conns_broken: usize,
    /// Replies that were errors or not the expected counter value.
    pub requests_failed: u64,
    /// Requests answered correctly.
    pub requests_ok: u64,
    /// Longest request→reply time over all requests, ms.
    pub max_latency_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_latency_ms: f64,
    /// `(ms since start, max latency ms of requests sent in that 10 ms bucket, requests in it)`.
    pub timeline: Vec<(f64, f64, u64)>,
    /// First broken connection's error, if any.
    pub first_error: Option<String>,
    /// When the load started (the timeline's zero).
    pub started: Option<Instant>,
    /// The slowest requests: `(connection, sent ms after start, latency ms)`.
    pub slowest: Vec<(usize, f64, f64)>,
    /// Every request: `(sent ms after start, latency ms)`, in the order
    /// the replies came (a request still outstanding at the end last, with
    /// the time it waited): for percentiles over a window
    /// ([`LoadReport::p99_sent_between`]).
    pub samples: Vec<(f32, f32)>,
}

impl LoadReport {
    /// The 99th percentile latency (ms) of the requests sent from `from_ms`
    /// to before `to_ms` (ms after [`LoadReport::started`]) and answered by
    /// `answered_by_ms` at the latest; `None` when no request qualifies.
    pub fn p99_sent_between(&self, from_ms: f64, to_ms: f64, answered_by_ms: f64) -> Option<f64> {
        let mut window: Vec<f32> = self
            .samples
            .iter()
            .filter(|&&(sent, lat)| {
                let (sent, lat) = (f64::from(sent), f64::from(lat));
                sent >= from_ms && sent < to_ms && sent + lat <= answered_by_ms
            })
            .map(|&(_, lat)| lat)
            .collect();
        if window.is_empty() {
            return None;
        }
        window.sort_by(f32::total_cmp);
        let at = ((window.len() as f64 * 0.99) as usize).min(window.len() - 1);
        Some(f64::from(window[at]))
    }
}

struct Client {
    stream: TcpStream,
    key: Vec<u8>,
    expect: Option<i64>,
    sent_at: Option<Instant>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    broken: bool,
}

/// Open `conns` connections to `addr` and run until `stop` is set (or
/// `max_time` passes), `rate` requests per second over all connections
/// (each connection sends its next request `conns / rate` seconds after the
/// previous one was sent, or at once if the reply came later). Counters
/// start from their current value. `running` is set once every connection
/// is open and requests flow (opening 10,000 takes a while).
pub fn run(
    addr: SocketAddr,
    conns: usize,
    rate: f64,
    stop: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
    max_time: Duration,
) -> std::io::Result<LoadReport> {
    let interval = Duration::from_secs_f64(conns as f64 / rate.max(1.0));
    let mut poll = Poll::new()?;
    let mut clients: HashMap<usize, Client> = HashMap::with_capacity(conns);
    for i in 0..conns {
        let std = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        std.set_nodelay(true)?;
        std.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std);
        poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        clients.insert(
            i,
            Client {
                stream,
                key: format!("c:{i}:{}", std::process::id()).into_bytes(),
                expect: None,
                sent_at: None,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                broken: false,
            },
        );
    }
    let start = Instant::now();
    running.store(true, Ordering::SeqCst);
    let mut latencies: Vec<f32> = Vec::with_capacity(1 << 20);
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let mut report = LoadReport {
        conns,
        started: Some(start),
        ..LoadReport::default()
    };
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 65536];
    // Each connection's next send time; the first ones spread over one interval.
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> = (0..conns)
        .map(|i| Reverse((start + interval.mul_f64(i as f64 / conns.max(1) as f64), i)))
        .collect();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < max_time {
        let now = Instant::now();
        while let Some(Reverse((at, i))) = due.peek().copied() {
            if at > now {
                break;
            }
            due.pop();
            if let Some(c) = clients.get_mut(&i) {
                if !c.broken && c.sent_at.is_none() {
                    send_next(c);
                    if !flush(c) {
                        mark_broken(c, &mut report, "write failed".into());
                    }
                }
            }
        }
        let wait = due
            .peek()
            .map_or(Duration::from_millis(10), |Reverse((at, _))| {
                at.saturating_duration_since(now)
            })
            .min(Duration::from_millis(10));
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in &events {
            let Some(c) = clients.get_mut(&ev.token().0) else {
                continue;
            };
            if c.broken {
                continue;
            }
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        mark_broken(c, &mut report, "connection closed by kvd".into());
                        break;
                    }
                    Ok(n) => c.rbuf.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        mark_broken(c, &mut report, e.to_string());
                        break;
                    }
                }
            }
            while let Ok(Some((reply, n))) = resp::parse_reply(&c.rbuf) {
                c.rbuf.drain(..n);
                let sent = c.sent_at.take().unwrap_or_else(Instant::now);
                let lat = sent.elapsed().as_secs_f64() * 1e3;
                latencies.push(lat as f32);
                report
                    .samples
                    .push((((sent - start).as_secs_f64() * 1e3) as f32, lat as f32));
                if report.slowest.len() < 8 || lat > report.slowest[7].2 {
                    report
                        .slowest
                        .push((ev.token().0, (sent - start).as_secs_f64() * 1e3, lat));
                    report.slowest.sort_by(|a, b| b.2.total_cmp(&a.2));
                    report.slowest.truncate(8);
                }
                let bucket = ((sent - start).as_millis() / 10) as usize;
                if buckets.len() <= bucket {
                    buckets.resize(bucket + 1, (0.0, 0));
                }
                buckets[bucket].0 = buckets[bucket].0.max(lat);
                buckets[bucket].1 += 1;
                match (reply, c.expect) {
                    (Reply::Integer(v), None) => {
                        report.requests_ok += 1;
                        c.expect = Some(v + 1);
                    }
                    (Reply::Integer(v), Some(e)) if v == e => {
                        report.requests_ok += 1;
                        c.expect = Some(v + 1);
                    }
                    (other, _) => {
                        report.requests_failed += 1;
                        if report.first_error.is_none() {
                            report.first_error = Some(format!(
                                "unexpected reply {other:?}, expected {:?}",
                                c.expect
                            ));
                        }
                        c.expect = None;
                    }
                }
                let next = (sent + interval).max(Instant::now());
                due.push(Reverse((next, ev.token().0)));
            }
            if !flush(c) {
                mark_broken(c, &mut report, "write failed".into());
            }
        }
    }
    // A request still outstanding at the end counts in the stall if it waited long.
    for c in clients.values() {
        if let Some(sent) = c.sent_at {
            let lat = (sent.elapsed().as_secs_f64() * 1e3) as f32;
            latencies.push(lat);
            let at = ((sent - start).as_secs_f64() * 1e3) as f32;
            report.samples.push((at, lat));
        }
    }
    report.conns_broken = clients.values().filter(|c| c.broken).count();
    report.conns_kept = conns - report.conns_broken;
    latencies.sort_by(f32::total_cmp);
    report.max_latency_ms = latencies.last().copied().unwrap_or(0.0) as f64;
    report.p99_latency_ms = latencies
        .get((latencies.len() as f64 * 0.99) as usize)
        .copied()
        .unwrap_or(0.0) as f64;
    report.timeline = buckets
        .iter()
        .enumerate()
        .map(|(i, (max, n))| (i as f64 * 10.0, *max, *n))
        .collect();
    Ok(report)
}

fn mark_broken(c: &mut Client, report: &mut LoadReport, why: String) {
    if !c.broken {
        c.broken = true;
        if report.first_error.is_none() {
            report.first_error = Some(why);
        }
    }
}

fn send_next(c: &mut Client) {
    resp::request(&mut c.wbuf, &[b"INCR", &c.key]);
    c.sent_at = Some(Instant::now());
}

/// Write what is buffered; false if the connection failed.
fn flush(c: &mut Client) -> bool {
    while !c.wbuf.is_empty() {
        match c.stream.write(&c.wbuf) {
            Ok(n) => {
                c.wbuf.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

/// What [`check_keys`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeyCheck {
    /// Keys read back.
    pub checked: u64,
    /// Keys missing or holding another value.
    pub wrong: u64,
    /// The first wrong key, if any.
    pub first_wrong: Option<u64>,
}

/// Read back every key `populate count` loaded (`key:<n>` holding
/// `value:<n>:` padded with `x` to `value_len` bytes), pipelined, and count
/// the keys that are missing or wrong: the service answers every key.
pub fn check_keys(addr: SocketAddr, count: u64, value_len: usize) -> std::io::Result<KeyCheck> {
    let mut check = KeyCheck::default();
    get_pipelined(
        addr,
        count,
        |n| format!("key:{n}"),
        |n, reply| {
            let mut want = format!("value:{n}:").into_bytes();
            want.resize(value_len, b'x');
            check.checked += 1;
            if reply != Reply::Bulk(Some(want)) {
                check.wrong += 1;
                check.first_wrong.get_or_insert(n);
            }
            Ok(())
        },
    )?;
    Ok(check)
}

/// `GET key(n)` for every `n` in `0..count`, pipelined over one connection
/// in batches of 1000; `on_reply(n, reply)` sees each reply in order (an
/// error from it ends the reading).
pub fn get_pipelined(
    addr: SocketAddr,
    count: u64,
    key: impl Fn(u64) -> String,
    mut on_reply: impl FnMut(u64, Reply) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = Vec::new();
    let mut rbuf = vec![0u8; 1 << 16];
    const BATCH: u64 = 1000;
    for first in (0..count).step_by(BATCH as usize) {
        let last = (first + BATCH).min(count);
        let mut req = Vec::new();
        for n in first..last {
            resp::request(&mut req, &[b"GET", key(n).as_bytes()]);
        }
        s.write_all(&req)?;
        let mut n = first;
        // Bounded: each round reads bytes (or times out) and the batch's
        // replies are finite.
        while n < last {
            match resp::parse_reply(&buf) {
                Ok(Some((reply, used))) => {
                    buf.drain(..used);
                    on_reply(n, reply)?;
                    n += 1;
                }
                Ok(None) => {
                    let got = s.read(&mut rbuf)?;
                    if got == 0 {
                        return Err(std::io::Error::new(
                            ErrorKind::UnexpectedEof,
                            format!("the server closed the connection at {}", key(n)),
                        ));
                    }
                    buf.extend_from_slice(&rbuf[..got]);
                }
                Err(e) => return Err(std::io::Error::other(e.0)),
            }
        }
    }
    Ok(())
}
