//! The round trips `lmig-bench postcopy` sets its faults against, measured
//! between the same two processes before the migration:
//!
//! * `raw_rtt_us` ([`RoundTrips::tcp_us`]): the network's round trip for a
//!   page, without lmig: an 8-byte request answered by 4 KiB over plain TCP
//!   with blocking reads (the figure issue 22's goal sets faults against);
//! * `channel_rtt_us` ([`RoundTrips::channel_us`]): a fault's own round trip
//!   without the fault: a one-page `PageRequest` on the urgent lane of a
//!   migration channel (same security, same configuration, so the same
//!   encryption and the same busy-poll), answered as the source answers a
//!   fault, with the page copied into a one-page `Pages` reply;
//! * `raw_rtt_same_cpu_us`: that TCP round trip with both threads on one CPU.
//!
//! The responders hold the first CPU, the asking thread the second (apart,
//! as on two hosts). Left to the scheduler on an idle machine, both often
//! land on one CPU, where a round trip needs no cross-CPU wake-up; no fault
//! can be that cheap while the push keeps both CPUs busy.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lmig_core::Channel;
use lmig_core::model::PageRun;
use lmig_core::protocol::{Message, PageBatch, PageData};
use lmig_transport::{ChannelConfig, Endpoint, Listener, StreamChannel, connect};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use super::postcopy::{PAGE, REGION};
use crate::common::stats::percentile;

/// Round trips timed per figure (after 200 to warm up).
const RTT_SAMPLES: usize = 2000;
const WARM_UP: usize = 200;

type BoxError = Box<dyn std::error::Error>;

/// The first two CPUs the calling thread may run on (one twice if it has
/// only one), for the round-trip figures.
fn rtt_cpus() -> Option<(usize, usize)> {
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .take(2)
        .collect();
    match cpus[..] {
        [a, b] => Some((a, b)),
        [a] => Some((a, a)),
        _ => None,
    }
}

/// Hold the calling thread on `cpu`; returns the CPUs it had.
fn pin_to(cpu: usize) -> Option<CpuSet> {
    let old = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let mut one = CpuSet::new();
    one.set(cpu).ok()?;
    sched_setaffinity(Pid::from_raw(0), &one).ok()?;
    Some(old)
}

/// The source process's responders, each a thread held on the first of
/// [`rtt_cpus`] that ends with its measurement.
pub(super) struct Responders {
    /// Where the plain TCP responder listens.
    pub(super) tcp: SocketAddr,
    /// Where the channel responder listens.
    pub(super) channel: SocketAddr,
    threads: [JoinHandle<()>; 2],
}

impl Responders {
    /// Listen on loopback and answer in the background; `config` is the
    /// migration channel's.
    pub(super) fn start(config: ChannelConfig) -> Result<Self, BoxError> {
        let tcp_listener = TcpListener::bind("127.0.0.1:0")?;
        let tcp = tcp_listener.local_addr()?;
        let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse()?), config)?;
        let Endpoint::Tcp(channel) = *listener.local_endpoint() else {
            return Err("a TCP listener expected".into());
        };
        let threads = [
            std::thread::Builder::new()
                .name("bench-rtt-tcp".into())
                .spawn(move || answer_tcp(tcp_listener))?,
            std::thread::Builder::new()
                .name("bench-rtt-channel".into())
                .spawn(move || answer_channel(listener))?,
        ];
        Ok(Self {
            tcp,
            channel,
            threads,
        })
    }

    /// Wait for both to end (the peer measured, or gave up).
    pub(super) fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Answer 8-byte requests with 4 KiB replies until the peer closes.
fn answer_tcp(listener: TcpListener) {
    if let Some((a, _)) = rtt_cpus() {
        pin_to(a);
    }
    let Ok((mut s, _)) = listener.accept() else {
        return;
    };
    let _ = s.set_nodelay(true);
    let reply = vec![0xA5u8; PAGE];
    let mut req = [0u8; 8];
    while s.read_exact(&mut req).is_ok() {
        if s.write_all(&reply).is_err() {
            break;
        }
    }
}

/// Answer `PageRequest`s on the urgent lane as the source answers a fault:
/// the page copied into a one-page `Pages` reply. Ends when the peer closes
/// or stays quiet for 5 s.
fn answer_channel(listener: Listener) {
    if let Some((a, _)) = rtt_cpus() {
        pin_to(a);
    }
    let Ok(ch) = listener.accept_timeout(Duration::from_secs(30)) else {
        return;
    };
    let page = vec![0xA5u8; PAGE];
    while let Ok(Some(Message::PageRequest(run))) = ch.recv_urgent(Duration::from_secs(5)) {
        let reply = Message::Pages(PageBatch {
            round: 0,
            run,
            data: PageData::Raw(bytes::Bytes::copy_from_slice(&page)),
        });
        if ch.send_urgent(&reply).is_err() {
            break;
        }
    }
    ch.shutdown();
}

/// The destination's measurements (medians, µs).
pub(super) struct RoundTrips {
    /// A one-page request and its reply on a migration channel's urgent lane.
    pub(super) channel_us: f64,
    /// 8 bytes answered by 4 KiB over plain TCP, threads on two CPUs.
    pub(super) tcp_us: f64,
    /// The same, both threads on one CPU.
    pub(super) tcp_same_cpu_us: f64,
}

impl RoundTrips {
    /// Measure against the source's [`Responders`] (at `tcp` and
    /// `channel`), from the second of [`rtt_cpus`] (and for
    /// `tcp_same_cpu_us` from the first); the thread's CPUs are restored.
    pub(super) fn measure(
        tcp: &str,
        channel: &str,
        config: ChannelConfig,
    ) -> Result<Self, BoxError> {
        let mut s = TcpStream::connect(tcp)?;
        s.set_nodelay(true)?;
        let ch = connect(&Endpoint::Tcp(channel.parse()?), config)?;
        let cpus = rtt_cpus();
        let all = cpus.and_then(|(_, b)| pin_to(b));
        let measured = (|| -> Result<Self, BoxError> {
            let tcp_us = tcp_median(&mut s)?;
            let channel_us = channel_median(&ch)?;
            let tcp_same_cpu_us = match cpus {
                Some((a, _)) => {
                    pin_to(a);
                    tcp_median(&mut s)?
                }
                None => tcp_us,
            };
            Ok(Self {
                channel_us,
                tcp_us,
                tcp_same_cpu_us,
            })
        })();
        if let Some(all) = all {
            sched_setaffinity(Pid::from_raw(0), &all)?;
        }
        ch.shutdown();
        measured
    }
}

/// The median of `RTT_SAMPLES` timed calls of `once` (after `WARM_UP`).
fn median(mut once: impl FnMut(usize) -> Result<(), BoxError>) -> Result<f64, BoxError> {
    let mut samples = Vec::with_capacity(RTT_SAMPLES);
    for i in 0..RTT_SAMPLES + WARM_UP {
        let t = Instant::now();
        once(i)?;
        if i >= WARM_UP {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(percentile(&samples, 0.5))
}

fn tcp_median(s: &mut TcpStream) -> Result<f64, BoxError> {
    let mut reply = vec![0u8; PAGE];
    median(|i| {
        s.write_all(&(i as u64).to_le_bytes())?;
        s.read_exact(&mut reply)?;
        Ok(())
    })
}

fn channel_median(ch: &StreamChannel) -> Result<f64, BoxError> {
    median(|i| {
        let run = PageRun::new(REGION, i as u64, 1);
        ch.send_urgent(&Message::PageRequest(run))?;
        match ch.recv_urgent(Duration::from_secs(5))? {
            Some(Message::Pages(b)) if b.run == run => Ok(()),
            other => Err(format!("round trip {i}: expected its page, got {other:?}").into()),
        }
    })
}
