//! Releasing held packets in order without overflowing receive buffers.
//!
//! A batch verdict makes the kernel deliver every held packet inside the
//! call: after a long freeze a UDP socket gets minutes of datagrams at once
//! and drops what does not fit its receive buffer. [`InOrder`] lets them
//! through in arrival order (so the order of every flow is kept), each pass
//! only as far as the UDP sockets they go to have room
//! (`rcvbuf - rmem_alloc`, read with one `sock_diag` dump per pass), then
//! waits for the program to read. TCP segments always pass (the peers sent
//! them within the window the sockets advertised); so do packets for no
//! known socket. The lock stays engaged until nothing held is left: packets
//! arriving meanwhile queue behind the held ones instead of overtaking them.
//! Past a time limit the rest goes at once (what does not fit is dropped by
//! the kernel and counted).
//!
//! The decision ([`fitting_prefix`]) is a pure function of the held
//! packets' headers and the sockets' figures; the loop around it does the IO.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::{HeldPacket, NetLock, SETTLE};
use crate::error::{NetError, Result};
use crate::sys::diag::UdpDiag;
use crate::sys::nft::NF_ACCEPT;

/// How long a paced release waits for the program to read before it looks
/// at the sockets again.
const PACE_STEP: Duration = Duration::from_millis(1);

/// What a paced release did.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PacedStats {
    /// Packets let through.
    pub released: u64,
    /// Passes that found a socket full and waited for the program to read.
    pub waits: u64,
    /// Packets let through at the time limit without room for them.
    pub forced: u64,
    /// From the start until every held packet was let through and the
    /// set flushed (new packets no longer held).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "caught_up_ms", with = "lmig_core::serde_ms")
    )]
    pub caught_up: Duration,
    /// The set flush itself (one netlink batch).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "flush_ms", with = "lmig_core::serde_ms")
    )]
    pub flush: Duration,
}

/// Where a paced release is (see the module docs).
#[derive(Debug)]
enum Stage {
    /// The lock holds new packets behind the held ones.
    Engaged,
    /// The set is flushed; stragglers queued during the flush until `end`.
    Flushed { end: Instant },
    /// The tables are gone.
    Done,
}

/// An ordered, paced unlock of a [`NetLock`]: held packets released as the
/// sockets they go to have room, then the set flushed, stragglers released
/// for [`SETTLE`], the tables deleted.
#[derive(Debug)]
pub struct InOrder {
    start: Instant,
    deadline: Instant,
    stage: Stage,
    socks: Vec<UdpDiag>,
    stats: PacedStats,
}

impl InOrder {
    /// Start; past `limit` from now the rest goes through at once.
    pub fn new(limit: Duration) -> Self {
        let start = Instant::now();
        Self {
            start,
            deadline: start + limit,
            stage: Stage::Engaged,
            socks: Vec::new(),
            stats: PacedStats::default(),
        }
    }

    /// The figures so far.
    pub fn stats(&self) -> PacedStats {
        self.stats
    }

    /// Go on releasing. With `wait`, until the lock is removed (bounded by
    /// the limit plus [`SETTLE`]); without, return `Ok(false)` as soon as a
    /// socket is full (the program must read first: call again with `wait`
    /// once it runs), `Ok(true)` once the lock is removed.
    pub fn run(&mut self, lock: &mut NetLock, wait: bool) -> Result<bool> {
        // Bounded: each turn either sleeps PACE_STEP before the deadline,
        // or moves on to the next stage, whose own end is bounded.
        loop {
            let blocked = self.pass(lock)?;
            match self.stage {
                Stage::Engaged if blocked == 0 => {
                    let t = Instant::now();
                    lock.disengage()?;
                    self.stats.flush = t.elapsed();
                    self.stats.caught_up = self.start.elapsed();
                    self.stage = Stage::Flushed {
                        end: Instant::now() + SETTLE,
                    };
                    continue;
                }
                Stage::Flushed { end } if blocked == 0 => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        lock.remove_tables()?;
                        self.stage = Stage::Done;
                        return Ok(true);
                    }
                    lock.collect_for(left)?;
                    continue;
                }
                Stage::Done => return Ok(true),
                _ => {}
            }
            if !wait {
                return Ok(false);
            }
            self.stats.waits += 1;
            std::thread::sleep(PACE_STEP);
        }
    }

    /// Let through what fits now and, once nothing stays held, flush the
    /// set: `Ok(true)` when every held packet went on (the stragglers'
    /// settle and the tables' removal are left to [`run`](Self::run)),
    /// `Ok(false)` while a socket is full.
    pub fn deliver(&mut self, lock: &mut NetLock) -> Result<bool> {
        if matches!(self.stage, Stage::Engaged) && self.pass(lock)? == 0 {
            let t = Instant::now();
            lock.disengage()?;
            self.stats.flush = t.elapsed();
            self.stats.caught_up = self.start.elapsed();
            self.stage = Stage::Flushed {
                end: Instant::now() + SETTLE,
            };
        }
        Ok(!matches!(self.stage, Stage::Engaged))
    }

    /// One pass: read what is held, let through the longest prefix that
    /// fits; returns how many stay held.
    fn pass(&mut self, lock: &mut NetLock) -> Result<usize> {
        lock.collect()?;
        if lock.pending.is_empty() {
            return Ok(0);
        }
        let force = Instant::now() >= self.deadline;
        let n = if force {
            lock.pending.len()
        } else {
            if lock.pending.iter().any(|p| is_udp(&p.data)) {
                self.read_sockets(lock)?;
            } else {
                self.socks.clear();
            }
            fitting_prefix(&lock.pending, &self.socks)
        };
        if let Some(max) = lock.pending[..n].iter().map(|p| p.id).max() {
            lock.verdict_batch(max, NF_ACCEPT)?;
            lock.pending.drain(..n);
        }
        let n = n as u64;
        self.stats.released += n;
        if force {
            self.stats.forced += n;
        }
        Ok(lock.pending.len())
    }

    /// The UDP sockets of the lock's namespace and their figures (through
    /// the diag socket the lock opened there).
    fn read_sockets(&mut self, lock: &mut NetLock) -> Result<()> {
        let Some(diag) = lock.diag.as_mut() else {
            // No sock_diag here (CONFIG_INET_UDP_DIAG): no socket is known,
            // everything goes as it comes, as without pacing.
            self.socks.clear();
            return Ok(());
        };
        diag.udp_sockets(&mut self.socks)
            .map_err(|e| NetError::sys("sock_diag UDP dump", lock.table.clone(), e))
    }
}

impl NetLock {
    /// Unlock completely, in order and paced ([`InOrder`], waiting for the
    /// program to read): at most `limit` for the held packets, then
    /// [`SETTLE`] for stragglers. The program must be reading its sockets
    /// meanwhile (another thread), or the release waits for the limit.
    pub fn retire_in_order(&mut self, limit: Duration) -> Result<PacedStats> {
        let mut r = InOrder::new(limit);
        r.run(self, true)?;
        Ok(r.stats())
    }
}

/// A UDP packet's addresses and IP length, from its first bytes; `None`
/// for anything else (other protocols, later fragments, short copies).
fn udp_flow(p: &[u8]) -> Option<(SocketAddr, SocketAddr, usize)> {
    let ports = |at: usize| -> Option<(u16, u16)> {
        let b = p.get(at..at + 4)?;
        Some((
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
        ))
    };
    match p.first()? >> 4 {
        4 if p.len() >= 20 && p[9] == libc::IPPROTO_UDP as u8 => {
            let frag_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            if frag_offset != 0 {
                return None;
            }
            let ihl = usize::from(p[0] & 0xf) * 4;
            let (sport, dport) = ports(ihl)?;
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
            Some((
                SocketAddr::new(src.into(), sport),
                SocketAddr::new(dst.into(), dport),
                len,
            ))
        }
        6 if p.len() >= 40 && p[6] == libc::IPPROTO_UDP as u8 => {
            let (sport, dport) = ports(40)?;
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?);
            let len = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
            Some((
                SocketAddr::new(src.into(), sport),
                SocketAddr::new(dst.into(), dport),
                len,
            ))
        }
        _ => None,
    }
}

fn is_udp(p: &[u8]) -> bool {
    udp_flow(p).is_some()
}

/// `a` with an IPv4-mapped IPv6 address as IPv4.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// The socket a datagram from `src` to `dst` goes to, as the kernel picks
/// it: a socket connected to `src` first, else one bound to `dst` (or to
/// any address) on its port. An index into `socks`.
fn socket_for(socks: &[UdpDiag], src: SocketAddr, dst: SocketAddr) -> Option<usize> {
    let (src_ip, dst_ip) = (canonical(src.ip()), canonical(dst.ip()));
    let bound = |s: &UdpDiag| {
        let ip = canonical(s.local.ip());
        s.local.port() == dst.port() && (ip == dst_ip || ip.is_unspecified())
    };
    let connected = |s: &UdpDiag| {
        s.peer
            .is_some_and(|p| p.port() == src.port() && canonical(p.ip()) == src_ip)
    };
    (socks.iter())
        .position(|s| bound(s) && connected(s))
        .or_else(|| socks.iter().position(|s| bound(s) && s.peer.is_none()))
}

/// What a datagram of `len` IP bytes may cost in a receive buffer (the
/// kernel charges the buffer's true size: the data rounded up to a power
/// of two, plus the `sk_buff`), taken high.
fn charge(len: usize) -> u64 {
    ((len + 640).next_power_of_two().max(1024) + 512) as u64
}

/// How many of `held` (in arrival order) may be let through now: the
/// longest prefix whose UDP datagrams fit the receive buffers of their
/// sockets. A socket with nothing queued takes one datagram whatever its
/// size (the kernel accepts while the buffer is not over its size).
pub(crate) fn fitting_prefix(held: &[HeldPacket], socks: &[UdpDiag]) -> usize {
    let mut budget: Vec<u64> = socks
        .iter()
        .map(|s| u64::from(s.rcvbuf).saturating_sub(u64::from(s.rmem)))
        .collect();
    let mut empty: Vec<bool> = socks.iter().map(|s| s.rmem == 0).collect();
    for (i, p) in held.iter().enumerate() {
        let Some((src, dst, len)) = udp_flow(&p.data) else {
            continue;
        };
        let Some(s) = socket_for(socks, src, dst) else {
            continue;
        };
        let cost = charge(len);
        if cost <= budget[s] || empty[s] {
            budget[s] = budget[s].saturating_sub(cost);
            empty[s] = false;
        } else {
            return i;
        }
    }
    held.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: usize) -> HeldPacket {
        let len = 28 + payload;
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        HeldPacket { id: 0, data: p }
    }

    fn tcp4() -> HeldPacket {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        HeldPacket { id: 0, data: p }
    }

    fn sock(local: &str, peer: Option<&str>, rmem: u32, rcvbuf: u32) -> UdpDiag {
        UdpDiag {
            local: local.parse().unwrap(),
            peer: peer.map(|p| p.parse().unwrap()),
            rmem,
            rcvbuf,
        }
    }

    const SVC: [u8; 4] = [198, 51, 100, 10];
    const CLIENT: [u8; 4] = [198, 51, 100, 3];

    #[test]
    fn udp_headers_are_read_and_others_ignored() {
        let p = udp4(CLIENT, 6000, SVC, 5300, 100);
        let (src, dst, len) = udp_flow(&p.data).unwrap();
        assert_eq!(src, "198.51.100.3:6000".parse().unwrap());
        assert_eq!(dst, "198.51.100.10:5300".parse().unwrap());
        assert_eq!(len, 128);
        assert_eq!(udp_flow(&tcp4().data), None);
        assert_eq!(udp_flow(&p.data[..21]), None, "a short copy");
        let mut frag = p.clone();
        frag.data[7] = 1;
        assert_eq!(udp_flow(&frag.data), None, "a later fragment has no ports");
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&108u16.to_be_bytes());
        v6[6] = 17;
        v6[23] = 3;
        v6[39] = 10;
        v6[40..42].copy_from_slice(&6000u16.to_be_bytes());
        v6[42..44].copy_from_slice(&5300u16.to_be_bytes());
        let (src, dst, len) = udp_flow(&v6).unwrap();
        assert_eq!((src.port(), dst.port(), len), (6000, 5300, 148));
        assert_eq!(dst.ip(), "::a".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_prefix_stops_at_the_first_datagram_without_room() {
        let room = 4 * charge(128) as u32;
        let socks = [
            sock("198.51.100.10:5300", None, 0, room),
            sock("0.0.0.0:5301", None, 0, 1 << 20),
        ];
        let to = |port| udp4(CLIENT, 6000, SVC, port, 100);
        // TCP and unknown ports always pass; 4 datagrams fit 5300.
        let held = vec![
            tcp4(),
            to(5300),
            to(9999),
            to(5300),
            to(5301),
            to(5300),
            to(5300),
            to(5300), // the fifth for 5300: no room
            to(5301),
            tcp4(),
        ];
        assert_eq!(fitting_prefix(&held, &socks), 7);
        assert_eq!(fitting_prefix(&held[7..], &socks), 3, "room again");
        // A socket already holding data has less room.
        let busy = [sock("198.51.100.10:5300", None, room / 2, room)];
        assert_eq!(fitting_prefix(&held[..8], &busy), 5);
        // An empty socket takes one datagram even if it is larger than the
        // buffer; a full one none.
        let tiny = [sock("198.51.100.10:5300", None, 0, 100)];
        assert_eq!(fitting_prefix(&held[1..], &tiny), 2);
        let full = [sock("198.51.100.10:5300", None, 4096, 4096)];
        assert_eq!(fitting_prefix(&held[1..], &full), 0);
        assert_eq!(fitting_prefix(&[], &full), 0);
    }

    #[test]
    fn a_connected_socket_takes_its_peer_s_datagrams() {
        let socks = [
            sock("198.51.100.10:5300", None, 0, 1 << 20),
            sock("198.51.100.10:5300", Some("198.51.100.3:6000"), 4096, 4096),
            sock("[::]:5302", None, 4096, 4096),
        ];
        let from = |sport| udp4(CLIENT, sport, SVC, 5300, 100);
        assert_eq!(
            socket_for(
                &socks,
                "198.51.100.3:6000".parse().unwrap(),
                "198.51.100.10:5300".parse().unwrap()
            ),
            Some(1)
        );
        assert_eq!(fitting_prefix(&[from(6001), from(6001)], &socks), 2);
        assert_eq!(fitting_prefix(&[from(6001), from(6000)], &socks), 1);
        // A dual-stack socket bound to :: takes IPv4 datagrams.
        assert_eq!(fitting_prefix(&[udp4(CLIENT, 1, SVC, 5302, 10)], &socks), 0);
    }
}
