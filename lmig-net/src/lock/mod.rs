//! The network lock: one nftables table per address family that queues
//! (NFQUEUE), never drops, every packet sent to the service addresses.
//!
//! # Shape and cost
//!
//! The lock matches the **service addresses**, not connections: a hash set
//! `svc` of addresses and one rule `ip daddr @svc → NFQUEUE` in a
//! `prerouting` base chain at priority -300 (before conntrack and routing,
//! so packets are held even after the address has left this host). Its
//! cost does not depend on the number of connections: the table, chain,
//! empty set and rule are installed before the freeze ([`NetLock::install`]),
//! the freeze only adds the few service addresses to the set
//! ([`NetLock::engage`], one netlink batch), and unlocking flushes the set and
//! deletes the table (one batch each). Nothing is ever done per connection.
//!
//! Everything goes over one `NETLINK_NETFILTER` socket as nftables batches
//! (`NFNL_MSG_BATCH_BEGIN … END`, one transaction): no process is spawned
//! on the freeze path (an `nft -f` per change would cost a process start
//! each; `lmig-bench handoff` measures both).
//!
//! # Held packets
//!
//! Queued packets stay in the kernel until a verdict; their copies come to
//! this process over a second netlink socket with a large receive buffer.
//! [`NetLock::accept_held`] lets them continue (to the restored sockets, or
//! to the original ones after an abort) with **one** batch verdict;
//! [`NetLock::take_held`] drops them in the kernel and hands the copies to
//! the caller (the source re-injects them towards the destination).
//!
//! Trap: unregistering any netfilter hook flushes (drops) every queued
//! packet of the namespace, and a packet another CPU was queueing while the
//! set was flushed reaches this process only microseconds later. So
//! unlocking is always: flush the set (no new packet is queued), give every
//! held packet its verdict, wait a little for stragglers ([`SETTLE`]), and
//! only then delete the table. Only the first two steps delay the
//! connections; the handoff deletes the table in the background.
//!
//! Released all at once, minutes of held datagrams overflow a UDP socket's
//! receive buffer; [`InOrder`] (and [`NetLock::retire_in_order`]) releases
//! them in order, as the sockets have room (see `pace`).
//!
//! # Leftovers
//!
//! Tables are named `lmig_lock_<pid>_<n>` and created with `NFT_TABLE_F_OWNER`:
//! the kernel deletes them when the process dies. Tables of that name whose
//! process is gone (older runs, owner flag refused) are deleted by
//! [`clean_stale`], which [`NetLock::install`] runs first.
//!
//! # Kernel requirements
//!
//! `CONFIG_NF_TABLES`, NFQUEUE either as the nft `queue` expression or as
//! the xtables `NFQUEUE` target through `nft_compat` (`CONFIG_NFT_COMPAT` +
//! `CONFIG_NETFILTER_XT_TARGET_NFQUEUE`; the compat path is what is used,
//! since it is present on more kernels, including this project's CI),
//! `CONFIG_NETFILTER_NETLINK_QUEUE`, and CAP_NET_ADMIN in the namespace.
//! (`nft list ruleset` prints the rule as `ip daddr @svc` followed by
//! "XT target NFQUEUE not found" when the nft binary lacks xtables support:
//! a display limit of the tool, the kernel runs the target.)

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{NetError, Result};
use crate::sys::diag::Diag;
use crate::sys::netlink::{Messages, MsgBuf, NlSocket};
use crate::sys::nft::{
    self, NF_ACCEPT, NF_DROP, NFPROTO_IPV4, NFPROTO_IPV6, NFQNL_MSG_PACKET, queue_type,
};

mod pace;
mod stale;

pub use pace::{InOrder, PacedStats};
pub use stale::clean_stale;
#[cfg(feature = "test-util")]
pub use stale::testing;

/// Prefix of every lock table name; the rest is `<pid>_<n>` of the owning process.
pub const TABLE_PREFIX: &str = "lmig_lock_";

/// How long [`NetLock::unlock`] waits for packets that were being queued
/// while the set was flushed, before it deletes the table.
pub const SETTLE: Duration = Duration::from_millis(10);

const SET_NAME: &str = "svc";
const CHAIN_NAME: &str = "hold";
/// The set's id in the install transaction (the rule names it by id).
const SET_ID: u32 = 1;

/// What the lock holds: [`LockConfig::new`] and the `with_*` setters (the
/// struct is `#[non_exhaustive]`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LockConfig {
    /// Service addresses: every packet sent to one of them is held while
    /// the lock is engaged (they should belong to the migrating program only).
    pub addrs: Vec<IpAddr>,
    /// Packets the kernel queue may hold (`NFQA_CFG_QUEUE_MAXLEN`); beyond
    /// that the kernel drops, which shows in [`LockStats::dropped`].
    pub queue_maxlen: u32,
    /// Receive buffer of the queue socket, in bytes (copies of held packets).
    pub rcvbuf: usize,
    /// Copy held packets to this process (needed to re-inject them); false
    /// copies only their headers (enough to let them through, in order and
    /// paced by [`InOrder`]).
    pub copy_payload: bool,
}

impl LockConfig {
    /// A lock for these service addresses with default capacities
    /// (65,536 packets, 64 MiB of copies).
    pub fn new(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            addrs: addrs.into_iter().collect(),
            queue_maxlen: 65_536,
            rcvbuf: 64 << 20,
            copy_payload: true,
        }
    }

    /// Sets [`queue_maxlen`](Self::queue_maxlen).
    #[must_use]
    pub fn with_queue_maxlen(mut self, queue_maxlen: u32) -> Self {
        self.queue_maxlen = queue_maxlen;
        self
    }

    /// Sets [`rcvbuf`](Self::rcvbuf).
    #[must_use]
    pub fn with_rcvbuf(mut self, rcvbuf: usize) -> Self {
        self.rcvbuf = rcvbuf;
        self
    }

    /// Sets [`copy_payload`](Self::copy_payload).
    #[must_use]
    pub fn with_copy_payload(mut self, copy_payload: bool) -> Self {
        self.copy_payload = copy_payload;
        self
    }
}

/// One packet held by the lock: its kernel queue id and a copy from the
/// network header on (its first bytes only when the lock copies headers:
/// [`LockConfig::copy_payload`] false).
#[derive(Clone, Debug)]
pub struct HeldPacket {
    /// NFQUEUE packet id.
    pub id: u32,
    /// The IP packet.
    pub data: Vec<u8>,
}

/// Counters of one lock.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockStats {
    /// Packets queued by the lock and received by this process.
    pub held: u64,
    /// Packets the kernel could not queue or deliver (queue full, receive
    /// buffer overrun): lost, a client will retransmit them.
    pub dropped: u64,
}

/// The network lock of one host (see the module docs).
#[derive(Debug)]
pub struct NetLock {
    nft: NlSocket,
    queue: NlSocket,
    queue_num: u16,
    table: String,
    families: Vec<u8>,
    cfg: LockConfig,
    installed: bool,
    engaged: bool,
    pending: Vec<HeldPacket>,
    stats: LockStats,
    rx: Vec<u8>,
    last_id: u32,
    /// UDP sockets' receive-buffer use, in the lock's namespace ([`InOrder`]).
    diag: Option<Diag>,
}

fn lock_err(op: &'static str, what: &str, e: io::Error) -> NetError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => NetError::Unsupported {
            feature: "network lock (nftables + NFQUEUE)",
            needs: "CAP_NET_ADMIN in the host's network namespace",
        },
        Some(libc::EPROTONOSUPPORT) | Some(libc::EAFNOSUPPORT) => NetError::Unsupported {
            feature: "network lock (nftables + NFQUEUE)",
            needs: "CONFIG_NF_TABLES and CONFIG_NETFILTER_NETLINK_QUEUE",
        },
        Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) if op == "nftables lock install" => {
            NetError::Unsupported {
                feature: "NFQUEUE from nftables",
                needs: "CONFIG_NFT_COMPAT with CONFIG_NETFILTER_XT_TARGET_NFQUEUE",
            }
        }
        _ => NetError::sys(op, what.to_string(), e),
    }
}

fn families_of(addrs: &[IpAddr]) -> Vec<u8> {
    let mut f = Vec::new();
    if addrs.iter().any(IpAddr::is_ipv4) {
        f.push(NFPROTO_IPV4);
    }
    if addrs.iter().any(IpAddr::is_ipv6) {
        f.push(NFPROTO_IPV6);
    }
    f
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn family_matches(fam: u8, a: &IpAddr) -> bool {
    (fam == NFPROTO_IPV4) == a.is_ipv4()
}

impl NetLock {
    /// Install the lock, disengaged: a table `lmig_lock_<pid>_<n>` per address
    /// family with its chain, rule and empty set, and a bound NFQUEUE. One
    /// netlink transaction. Run before the freeze; an error here leaves
    /// nothing behind and the program keeps serving.
    ///
    /// Also removes leftover tables of dead processes ([`clean_stale`]).
    pub fn install(cfg: LockConfig) -> Result<Self> {
        if cfg.addrs.is_empty() {
            return Err(NetError::NotMigratable {
                what: "network lock".into(),
                reason: "no service address to lock".into(),
            });
        }
        if let Err(e) = clean_stale() {
            debug!(error = %e, "removing stale lock tables of dead processes failed");
        }
        let nft = NlSocket::netfilter()
            .map_err(|e| lock_err("netlink socket", "NETLINK_NETFILTER", e))?;
        let mut queue = NlSocket::netfilter()
            .map_err(|e| lock_err("netlink socket", "NETLINK_NETFILTER", e))?;
        queue
            .set_rcvbuf(cfg.rcvbuf)
            .map_err(|e| lock_err("SO_RCVBUFFORCE", "NFQUEUE socket", e))?;
        let queue_num = bind_queue(&mut queue, cfg.queue_maxlen, cfg.copy_payload)?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let table = format!("{TABLE_PREFIX}{}_{n}", std::process::id());
        let families = families_of(&cfg.addrs);
        let mut lock = Self {
            nft,
            queue,
            queue_num,
            table,
            families,
            cfg,
            installed: false,
            engaged: false,
            pending: Vec::new(),
            stats: LockStats::default(),
            rx: vec![0u8; 256 * 1024],
            last_id: 0,
            // Opened here, in the lock's namespace (later calls may come
            // from any thread). Without it (no CONFIG_INET_UDP_DIAG) a
            // paced release knows no socket and lets everything go as it comes.
            diag: Diag::open().ok(),
        };
        lock.install_tables()?;
        Ok(lock)
    }

    fn install_tables(&mut self) -> Result<()> {
        let mut m = MsgBuf::new();
        let seq = self.nft.next_seq();
        nft::batch_begin(&mut m, seq);
        for &fam in &self.families {
            let table = &self.table;
            nft::new_table(&mut m, self.nft.next_seq(), fam, table, true);
            nft::new_prerouting_chain(&mut m, self.nft.next_seq(), fam, table, CHAIN_NAME);
            nft::new_addr_set(&mut m, self.nft.next_seq(), fam, table, SET_NAME, SET_ID);
            let seq = self.nft.next_seq();
            nft::new_queue_rule(
                &mut m,
                seq,
                fam,
                table,
                CHAIN_NAME,
                SET_NAME,
                SET_ID,
                self.queue_num,
            );
        }
        let seq = self.nft.next_seq();
        nft::batch_end(&mut m, seq);
        self.nft
            .transact(m.bytes(), m.acks)
            .map_err(|e| lock_err("nftables lock install", &self.table, e))?;
        self.installed = true;
        Ok(())
    }

    /// The table name (`lmig_lock_<pid>_<n>`, in the `ip` and/or `ip6` family).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The NFQUEUE number the lock queues to.
    pub fn queue_num(&self) -> u16 {
        self.queue_num
    }

    /// Whether packets to the service addresses are being held now.
    pub fn is_engaged(&self) -> bool {
        self.engaged
    }

    /// Counters so far.
    pub fn stats(&self) -> LockStats {
        self.stats
    }

    /// At the freeze: start holding every packet to the service addresses
    /// (adds them to the set; one batch, independent of the number of
    /// connections).
    #[doc(alias = "NFT_MSG_NEWSETELEM")]
    pub fn engage(&mut self) -> Result<()> {
        if self.engaged {
            return Ok(());
        }
        let mut m = MsgBuf::new();
        let seq = self.nft.next_seq();
        nft::batch_begin(&mut m, seq);
        for &fam in &self.families {
            let keys: Vec<Vec<u8>> = (self.cfg.addrs.iter())
                .filter(|a| family_matches(fam, a))
                .map(addr_bytes)
                .collect();
            let keys = keys.iter().map(Vec::as_slice);
            nft::add_set_elems(
                &mut m,
                self.nft.next_seq(),
                fam,
                &self.table,
                SET_NAME,
                keys,
            );
        }
        let seq = self.nft.next_seq();
        nft::batch_end(&mut m, seq);
        self.nft
            .transact(m.bytes(), m.acks)
            .map_err(|e| lock_err("nftables lock engage", &self.table, e))?;
        self.engaged = true;
        Ok(())
    }

    /// Stop holding new packets (flush the set; one batch). Packets already
    /// held stay held until [`accept_held`](Self::accept_held) or
    /// [`take_held`](Self::take_held).
    pub fn disengage(&mut self) -> Result<()> {
        if !self.engaged {
            return Ok(());
        }
        let mut m = MsgBuf::new();
        let seq = self.nft.next_seq();
        nft::batch_begin(&mut m, seq);
        for &fam in &self.families {
            nft::flush_set(&mut m, self.nft.next_seq(), fam, &self.table, SET_NAME);
        }
        let seq = self.nft.next_seq();
        nft::batch_end(&mut m, seq);
        self.nft
            .transact(m.bytes(), m.acks)
            .map_err(|e| lock_err("nftables lock flush", &self.table, e))?;
        self.engaged = false;
        Ok(())
    }

    /// Read every packet copy waiting on the queue socket without blocking;
    /// returns how many arrived.
    pub fn collect(&mut self) -> Result<usize> {
        self.collect_for(Duration::ZERO)
    }

    /// Like [`collect`](Self::collect), waiting up to `timeout` for the first packet.
    pub fn collect_for(&mut self, timeout: Duration) -> Result<usize> {
        let mut got = 0usize;
        let deadline = Instant::now() + timeout;
        // Bounded: at most queue_maxlen packets can be waiting, plus what
        // arrives meanwhile; stop after twice that.
        let cap = 2 * self.cfg.queue_maxlen as usize + 64;
        for _ in 0..cap {
            let left = deadline.saturating_duration_since(Instant::now());
            if got > 0 || left.is_zero() {
                // Drain what is there without waiting.
            } else if !self
                .queue
                .wait_readable(left)
                .map_err(|e| lock_err("poll", "NFQUEUE socket", e))?
            {
                break;
            }
            match self.queue.recv(&mut self.rx, true) {
                Ok(n) => {
                    let before = self.pending.len();
                    got += parse_packets(&self.rx[..n], &mut self.pending, &mut self.stats);
                    for p in &self.pending[before..] {
                        if nfq_id_after(p.id, self.last_id) {
                            self.last_id = p.id;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got > 0 || Instant::now() >= deadline {
                        break;
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // The receive buffer overran: the kernel dropped packets.
                    self.stats.dropped += 1;
                }
                Err(e) => return Err(lock_err("recv", "NFQUEUE socket", e)),
            }
        }
        Ok(got)
    }

    /// Let every held packet continue through the stack (to the restored
    /// sockets on the destination, or to the original ones after an
    /// abort): one batch verdict. Returns how many.
    #[doc(alias = "NFQNL_MSG_VERDICT_BATCH")]
    pub fn accept_held(&mut self) -> Result<u64> {
        self.collect()?;
        let n = self.pending.len() as u64;
        if let Some(max) = self.pending.iter().map(|p| p.id).max() {
            self.verdict_batch(max, NF_ACCEPT)?;
        }
        self.pending.clear();
        Ok(n)
    }

    /// Copies of the packets held so far whose originals still wait for a
    /// verdict, in arrival order (read by [`collect`](Self::collect)).
    pub fn held(&self) -> &[HeldPacket] {
        &self.pending
    }

    /// Let every packet queued so far continue without reading their copies
    /// first: one batch verdict for every id up to 2^30 past the last one
    /// seen (queue ids grow by one per packet; the kernel compares them
    /// modulo 2^32). O(1) whatever the number of held packets; their copies
    /// are drained and counted later by [`collect`](Self::collect) /
    /// [`retire`](Self::retire), whose own verdicts then find nothing to do.
    pub fn accept_all(&mut self) -> Result<()> {
        self.verdict_batch(self.last_id.wrapping_add(1 << 30), NF_ACCEPT)
    }

    /// Drop every held packet in the kernel and hand over their copies (the
    /// source re-injects them towards the destination): one batch verdict.
    pub fn take_held(&mut self) -> Result<Vec<HeldPacket>> {
        self.collect()?;
        if let Some(max) = self.pending.iter().map(|p| p.id).max() {
            self.verdict_batch(max, NF_DROP)?;
        }
        Ok(std::mem::take(&mut self.pending))
    }

    fn verdict_batch(&mut self, max_id: u32, verdict: u32) -> Result<()> {
        let mut m = MsgBuf::new();
        nft::verdict_batch(
            &mut m,
            self.queue.next_seq(),
            self.queue_num,
            max_id,
            verdict,
        );
        self.queue
            .send(m.bytes())
            .map_err(|e| lock_err("NFQUEUE batch verdict", "NFQUEUE socket", e))
    }

    /// Unlock completely: stop holding, let held packets continue, wait
    /// [`SETTLE`] for stragglers, delete the tables. In that order (see the
    /// module docs). Returns how many packets were let through.
    pub fn unlock(&mut self) -> Result<u64> {
        self.retire(SETTLE)
    }

    /// [`unlock`](Self::unlock) with a chosen settle time: packets that a
    /// CPU was queueing while the set was flushed reach this process shortly
    /// after the flush; deleting the table before they had their verdict
    /// would drop them.
    pub fn retire(&mut self, settle: Duration) -> Result<u64> {
        self.disengage()?;
        let mut n = self.accept_held()?;
        let end = Instant::now() + settle;
        // Bounded by `settle`.
        while let Some(left) = end
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
        {
            if self.collect_for(left)? > 0 {
                n += self.accept_held()?;
            }
        }
        self.remove_tables()?;
        Ok(n)
    }

    /// Delete the tables (one batch). Held packets must have had their
    /// verdict first: the kernel drops whatever is still queued.
    pub fn remove_tables(&mut self) -> Result<()> {
        if !self.installed {
            return Ok(());
        }
        let mut m = MsgBuf::new();
        let seq = self.nft.next_seq();
        nft::batch_begin(&mut m, seq);
        for &fam in &self.families {
            nft::del_table(&mut m, self.nft.next_seq(), fam, &self.table);
        }
        let seq = self.nft.next_seq();
        nft::batch_end(&mut m, seq);
        match self.nft.transact(m.bytes(), m.acks) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(lock_err("nftables lock remove", &self.table, e)),
        }
        self.installed = false;
        self.engaged = false;
        Ok(())
    }

    /// Add the kernel's own drop counters for this queue (full queue,
    /// failed delivery) to [`LockStats::dropped`]; read from
    /// `/proc/thread-self/net/netfilter/nfnetlink_queue`.
    pub fn kernel_dropped(&self) -> u64 {
        let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue")
        else {
            return 0;
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.first().and_then(|q| q.parse::<u16>().ok()) == Some(self.queue_num) && f.len() >= 7
            {
                let q: u64 = f[5].parse().unwrap_or(0);
                let u: u64 = f[6].parse().unwrap_or(0);
                return q + u;
            }
        }
        0
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if self.installed {
            if let Err(e) = self.unlock() {
                warn!(error = %e, "dropping the network lock: unlocking failed (its nftables table may be left)");
            }
        }
    }
}

/// Bind a free queue number near `0x4000 + pid` (queues are per network
/// namespace; two lmig processes in one namespace get different numbers).
fn bind_queue(sock: &mut NlSocket, maxlen: u32, copy_payload: bool) -> Result<u16> {
    let base = 0x4000u32 + (std::process::id() % 0x3000) * 4;
    let mut last = None;
    for i in 0..16u32 {
        let num = ((base + i) & 0xffff) as u16;
        let mut m = MsgBuf::new();
        nft::queue_bind(&mut m, sock.next_seq(), num, maxlen, copy_payload);
        match sock.transact(m.bytes(), 1) {
            Ok(()) => return Ok(num),
            // A number bound by another socket answers EPERM (EBUSY on
            // older kernels): try the next. Without CAP_NET_ADMIN every
            // number answers EPERM and that is what is reported.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EPERM)) => {
                last = Some(e)
            }
            Err(e) => return Err(lock_err("NFQUEUE bind", "NFQUEUE socket", e)),
        }
    }
    Err(lock_err(
        "NFQUEUE bind",
        "NFQUEUE socket",
        last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
    ))
}

/// The kernel's `nfq_id_after`: `id` comes after `max` modulo 2^32.
fn nfq_id_after(id: u32, max: u32) -> bool {
    (id.wrapping_sub(max) as i32) > 0
}

/// The packets in one NFQUEUE datagram (its id and the IP packet of each
/// `NFQNL_MSG_PACKET`); the count added to `out`.
pub(crate) fn parse_packets(buf: &[u8], out: &mut Vec<HeldPacket>, stats: &mut LockStats) -> usize {
    let mut n = 0;
    for msg in Messages::new(buf) {
        if msg.kind != queue_type(NFQNL_MSG_PACKET) {
            continue;
        }
        if let Some((id, data)) = nft::parse_queued(msg.payload) {
            let data = data.map(<[u8]>::to_vec).unwrap_or_default();
            out.push(HeldPacket { id, data });
            stats.held += 1;
            n += 1;
        }
    }
    n
}

/// Check once, at start-up, that a lock can be installed here: creates a
/// lock for a documentation address and removes it again. [`crate::probe()`]
/// reports it as [`lmig_core::probe::Capability::NetworkLock`].
pub fn probe() -> Result<()> {
    let mut lock = NetLock::install(LockConfig {
        addrs: vec![
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 255)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1)),
        ],
        queue_maxlen: 16,
        rcvbuf: 1 << 16,
        copy_payload: false,
    })?;
    lock.unlock().map(|_| ())
}
