//! `lmig-bench split --mib M --hosts N [--json]`: split memory (IPmigrate).
//!
//! This process is the running host: it maps an M MiB region and runs a
//! program thread that keeps writing versioned pages and reading others back.
//! N + 1 page hosts run as separate processes (this binary re-executed with
//! a hidden option; the same service as `lmig-pagehost`), all on loopback
//! TCP through lmig-transport's authenticated channels. In one run:
//!
//! * `split_ms`: split migration — the memory goes straight to hosts 1..=N;
//! * `remote_fault_p50_us` / `remote_fault_p99_us`: the program's touches of
//!   pages held elsewhere (userfaultfd fault → fetch from the owner → placed);
//! * `partial_ms`: host 1's share moves to host N+1 while the program writes
//!   into exactly that share;
//! * `reintegrate_ms`: every page host sends its part straight to this
//!   host, all in parallel;
//! * `relay_ms`: the same parts split over the same hosts, gathered through
//!   one relay: host 1, which holds no part after the partial migration, so
//!   every page takes two hops (its host → host 1, which receives and
//!   re-sends it → this host);
//! * `full_ms`: the whole memory of the same program migrated to one host;
//! * `stale_reads`: reads by the program that did not show the last version
//!   it wrote; `verified`: every page checked after reintegration, after
//!   the relay and after the final gather, no host lost.
//!
//! The two gathers compared start alike, once every page host handled what
//! it was sent before ([`SplitRegion::sync_hosts`]; the relay's `split_to`
//! syncs every host anyway): the `Forget` that ends the partial migration
//! (the drained host dropping its share, hundreds of MiB) would otherwise
//! run on inside the reintegration's timing.
//!
//! Every timed phase also starts on warm free memory ([`super::warm_free_memory`]):
//! on this kind of machine memory the guest handed back to the hypervisor
//! costs ~12 µs a page at its next first touch, and the phases that ran first
//! (the reintegration before the relay) paid that while the later ones did not.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lmig_core::model::{PageRun, RegionId};
use lmig_core::split::HostId;
use lmig_mem::RegionOptions;
use lmig_mem::split::{SplitOptions, SplitRegion};
use lmig_transport::{Endpoint, Listener};

use super::warm_free_memory;
use serde_json::json;

use super::{Output, round};
use crate::common::keys::{key_from_hex, random_key_hex};
use crate::common::process::Peer;
use crate::common::stats::percentile;
use crate::pagehost::{KEY_ENV, channel_config, page_host_main, tcp_dial};

/// Options of the `split` scenario.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Region size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Page hosts the memory is split over (one more is started as the
    /// target of the partial migration).
    #[arg(long, default_value_t = 3)]
    pub hosts: u32,
    /// Pages pre-paged around a faulting page.
    #[arg(long, default_value_t = 8)]
    pub prepage: u32,
    /// Remote touches measured.
    #[arg(long, default_value_t = 2000)]
    pub touches: usize,
    /// Internal: run as page host with this id.
    #[arg(long, hide = true)]
    pub page_host_id: Option<u32>,
}

const PAGE: usize = 4096;
const REGION: RegionId = RegionId(1);
const ME: HostId = HostId(0);

type BoxError = Box<dyn std::error::Error>;

fn write_version(split: &SplitRegion, p: u64, v: u64) {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&p.to_le_bytes());
    head[8..].copy_from_slice(&v.to_le_bytes());
    let off = p as usize * PAGE;
    let _ = split.region().write_at(off, &head);
    let _ = split.region().write_at(off + PAGE - 8, &v.to_le_bytes());
}

fn read_version(split: &SplitRegion, p: u64) -> Option<u64> {
    let mut head = [0u8; 16];
    let mut tail = [0u8; 8];
    let off = p as usize * PAGE;
    split.region().read_at(off, &mut head).ok()?;
    split.region().read_at(off + PAGE - 8, &mut tail).ok()?;
    let v = u64::from_le_bytes(head[8..].try_into().ok()?);
    (u64::from_le_bytes(head[..8].try_into().ok()?) == p && tail == v.to_le_bytes()).then_some(v)
}

/// The program: writes new versions of pages (from `targets` when set) and
/// reads other pages back, counting reads that miss the last version.
struct Program {
    versions: Arc<Vec<AtomicU64>>,
    stale: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    targets: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Program {
    fn start(split: &Arc<SplitRegion>, pages: u64) -> Self {
        let versions: Arc<Vec<AtomicU64>> =
            Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect());
        let mut p = Self {
            versions,
            stale: Arc::default(),
            writes: Arc::default(),
            targets: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        let (s, v, st, w, t, stop) = (
            split.clone(),
            p.versions.clone(),
            p.stale.clone(),
            p.writes.clone(),
            p.targets.clone(),
            p.stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            let end = Instant::now() + Duration::from_secs(3600);
            while !stop.load(Ordering::Acquire) && Instant::now() < end {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let page = {
                    let list = t.lock().unwrap_or_else(|e| e.into_inner());
                    if list.is_empty() {
                        x % pages
                    } else {
                        list[(x % list.len() as u64) as usize]
                    }
                };
                let ver = v[page as usize].load(Ordering::Relaxed) + 1;
                write_version(&s, page, ver);
                v[page as usize].store(ver, Ordering::Relaxed);
                w.fetch_add(1, Ordering::Relaxed);
                let q = (x >> 17) % pages;
                if read_version(&s, q) != Some(v[q as usize].load(Ordering::Relaxed)) {
                    st.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        p.thread = Some(thread);
        p
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Pages whose content is not the last version written (reads fault
    /// remote pages in).
    fn check(&self, split: &SplitRegion) -> u64 {
        (0..self.versions.len() as u64)
            .filter(|&p| {
                read_version(split, p) != Some(self.versions[p as usize].load(Ordering::Relaxed))
            })
            .count() as u64
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one touch of a page the owner map gives to another host found.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Touch {
    /// The page was absent here (`/proc/self/pagemap`): the read faulted and
    /// waited for the page from its host, `us` microseconds; the version read.
    Remote { us: f64, version: Option<u64> },
    /// The kernel had the page although the owner map gives it elsewhere:
    /// this host's bookkeeping is wrong (never expected).
    Present,
}

/// Touch page `p` (held elsewhere) as the program does: read its version.
/// The bytes read are used (returned), so the loads cannot be optimised
/// away — a touch whose result was dropped once measured nothing.
fn touch(split: &SplitRegion, pagemap: &std::fs::File, p: u64) -> Result<Touch, BoxError> {
    use std::os::unix::fs::FileExt;
    let addr = split.region().as_ptr() as u64 + p * PAGE as u64;
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, addr / PAGE as u64 * 8)?;
    if u64::from_le_bytes(entry) & PM_PRESENT != 0 {
        return Ok(Touch::Present);
    }
    let t = Instant::now();
    let version = std::hint::black_box(read_version(split, p));
    let us = t.elapsed().as_secs_f64() * 1e6;
    Ok(Touch::Remote { us, version })
}

/// `/proc/<pid>/pagemap`: the page is present.
const PM_PRESENT: u64 = 1 << 63;

fn shares(pages: u64, hosts: &[u32]) -> Vec<(HostId, Vec<PageRun>)> {
    let hosts: Vec<HostId> = hosts.iter().map(|&h| HostId(h)).collect();
    lmig_core::split::even_shares(REGION, pages, &hosts)
}

fn ms(t: Instant) -> f64 {
    round(t.elapsed().as_secs_f64() * 1e3, 1)
}

/// Run the scenario (or, with `--page-host-id`, a page host).
pub fn run(args: Args, out: Output) -> Result<(), BoxError> {
    if let Some(id) = args.page_host_id {
        let key = key_from_hex(&std::env::var(KEY_ENV)?)?;
        return page_host_main(id, "127.0.0.1:0", &key, Duration::from_secs(3600));
    }
    if args.hosts < 2 {
        return Err("--hosts must be at least 2 (one of them relays)".into());
    }
    let key_hex = random_key_hex()?;
    let key = key_from_hex(&key_hex)?;
    let len = args.mib << 20;
    let region = RegionOptions::new(REGION, len).populate(true).map()?;
    let pages = region.pages();
    let split = Arc::new(SplitRegion::new(
        region,
        ME,
        SplitOptions::default().with_prepage(args.prepage),
    )?);
    for p in 0..pages {
        write_version(&split, p, 0);
    }

    // This host's listener: page hosts dial it to gather.
    let listener = Listener::bind(
        &Endpoint::Tcp("127.0.0.1:0".parse()?),
        channel_config(&key)?,
    )?;
    let Endpoint::Tcp(my_addr) = listener.local_endpoint().clone() else {
        return Err("TCP listener expected".into());
    };
    let me = my_addr.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let (s, stop) = (split.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if let Ok(ch) = listener.accept_timeout(Duration::from_millis(100)) {
                    s.serve_incoming(Box::new(ch));
                }
            }
        })
    };

    // Page hosts 1..=N+1, separate processes.
    let dial = tcp_dial(key.clone());
    let mut peers = Vec::new();
    for id in 1..=args.hosts + 1 {
        let mut peer = Peer::spawn(
            &["split".into(), format!("--page-host-id={id}")],
            &[(KEY_ENV, &key_hex)],
        )?;
        let addr = peer.expect_line("LISTENING")?;
        split.add_host(HostId(id), &addr, dial(&addr)?)?;
        peers.push(peer);
    }
    let all: Vec<u32> = (1..=args.hosts).collect();
    let spare = args.hosts + 1;

    let mut program = Program::start(&split, pages);

    // Split migration.
    let t = Instant::now();
    split.split_to(&shares(pages, &all))?;
    let split_ms = ms(t);

    // Remote faults, as the program sees them.
    let mut lat = Vec::with_capacity(args.touches);
    let mut present_touches = 0u64;
    let mut touch_stale = 0u64;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..args.touches * 20 {
        if lat.len() >= args.touches {
            break;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = x % pages;
        if split.is_local(p) {
            continue;
        }
        let expected = program.versions[p as usize].load(Ordering::Relaxed);
        match touch(&split, &pagemap, p)? {
            Touch::Remote { us, version } => {
                lat.push(us);
                // A torn read (the program writing the page) reads as None.
                if version.is_some_and(|v| v < expected) {
                    touch_stale += 1;
                }
            }
            Touch::Present => present_touches += 1,
        }
    }
    lat.sort_by(f64::total_cmp);

    // Partial migration of host 1's share while the program writes into it.
    *program.targets.lock().unwrap_or_else(|e| e.into_inner()) =
        split.owner_map().pages_of(HostId(1)).iter().collect();
    warm_free_memory(len as usize);
    let t = Instant::now();
    let moved = split.move_host(HostId(1), HostId(spare))?;
    let partial_ms = ms(t);
    program
        .targets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();

    // Reintegration: every host sends straight here, in parallel.
    let before = split.owner_map();
    split.sync_hosts()?;
    warm_free_memory(len as usize);
    let t = Instant::now();
    let gathered = split.gather(&me)?;
    let reintegrate_ms = ms(t);
    let mut bad = program.check(&split);

    // The same pages on the same hosts (each host gets back exactly the
    // part it held before the reintegration), gathered through host 1
    // (drained by the partial migration, it holds none of them): every page
    // takes two hops.
    let same: Vec<(HostId, Vec<PageRun>)> = before
        .counts()
        .into_iter()
        .filter(|&(h, n)| h != ME && n > 0)
        .map(|(h, _)| (h, before.runs_of(h, u32::MAX)))
        .collect();
    split.split_to(&same)?;
    split.sync_hosts()?;
    warm_free_memory(len as usize);
    let t = Instant::now();
    let relayed = split.relay_gather(HostId(1), &me)?;
    let relay_ms = ms(t);
    bad += program.check(&split);

    // The same program's whole memory migrated to one host.
    warm_free_memory(len as usize);
    let t = Instant::now();
    split.split_to(&[(HostId(spare), vec![PageRun::new(REGION, 0, pages as u32)])])?;
    let full_ms = ms(t);
    split.gather(&me)?;
    program.stop();
    bad += program.check(&split);

    let stats = split.stats();
    let stale_reads = program.stale.load(Ordering::Relaxed);
    let verified = bad == 0 && split.lost_hosts().is_empty();
    stop.store(true, Ordering::Release);
    let _ = acceptor.join();
    out.emit(&json!({
        "scenario": "split",
        "mib": args.mib,
        "hosts": args.hosts,
        "partial_ms": partial_ms,
        "full_ms": full_ms,
        "reintegrate_ms": reintegrate_ms,
        "relay_ms": relay_ms,
        "remote_fault_p50_us": round(percentile(&lat, 0.5), 1),
        "remote_fault_p99_us": round(percentile(&lat, 0.99), 1),
        "stale_reads": stale_reads,
        "verified": verified,
        "split_ms": split_ms,
        "partial_over_full": round(partial_ms / full_ms.max(1e-3), 3),
        "reintegrate_over_relay": round(reintegrate_ms / relay_ms.max(1e-3), 3),
        "moved_pages": moved.moved,
        "invalidated_pages": moved.invalidated,
        "gathered_pages": gathered.pages,
        "relayed_pages": relayed.pages,
        "remote_touches": lat.len(),
        "present_touches": present_touches,
        "touch_stale": touch_stale,
        "remote_faults": stats.remote_faults,
        "stale_discarded": stats.stale_discarded + stats.not_owner_discarded,
        "kept_dirty": stats.kept_dirty,
        "program_writes": program.writes.load(Ordering::Relaxed),
        "bad_pages": bad,
        "prepage": args.prepage,
    }));
    drop(peers);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The bench's own measuring code against real userfaultfd and real
    //! page hosts (in this process, on loopback TCP).

    use super::*;
    use crate::pagehost::PageHostService;

    /// A visible skip without root (and `LMIG_SKIP_PRIVILEGED=1`); as root
    /// a failure.
    fn privileged(e: &dyn std::fmt::Display) -> bool {
        if !lmig_core::testing::privileged("split bench touch test", &e.to_string()) {
            return false;
        }
        panic!("userfaultfd with write-protect unavailable: {e}");
    }

    /// A page host in this process, serving until `stop`.
    fn page_host(id: u32, key: &[u8], stop: Arc<AtomicBool>) -> String {
        let service = PageHostService::bind(id, "127.0.0.1:0", key).unwrap();
        let addr = service.addr();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            service.serve_while(Duration::from_millis(100), || {
                !stop.load(Ordering::Acquire) && Instant::now() < end
            });
        });
        addr.to_string()
    }

    /// The regression of issue 8's "remote_touches: 0": every touch of an
    /// evicted page must really reach the page (a fault, a fetch, the
    /// content), never be optimised away or counted as present.
    #[test]
    fn every_touch_of_an_evicted_page_is_a_measured_remote_fault() {
        let pages = 64 * 256; // 64 MiB
        let region = RegionOptions::new(REGION, pages * PAGE as u64)
            .populate(true)
            .map()
            .unwrap();
        let options = SplitOptions::default().with_prepage(0);
        let split = match SplitRegion::new(region, ME, options) {
            Ok(s) => s,
            Err(e) if privileged(&e) => unreachable!(),
            Err(_) => return,
        };
        for p in 0..pages {
            write_version(&split, p, 7);
        }
        let key = b"split bench touch test key, 32 b".to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let dial = tcp_dial(key.clone());
        for id in [1, 2] {
            let addr = page_host(id, &key, stop.clone());
            split
                .add_host(HostId(id), &addr, dial(&addr).unwrap())
                .unwrap();
        }
        split.split_to(&shares(pages, &[1, 2])).unwrap();
        assert_eq!(split.stats().local, 0, "every page evicted");

        let n = 300u64;
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let faults = split.stats().remote_faults;
        for i in 0..n {
            let p = (i * 7919) % pages;
            match touch(&split, &pagemap, p).unwrap() {
                Touch::Remote { version, .. } => assert_eq!(version, Some(7), "page {p} content"),
                Touch::Present => panic!("touch {i}: evicted page {p} is present here"),
            }
            assert!(split.is_local(p), "page {p} was fetched");
        }
        assert_eq!(
            split.stats().remote_faults - faults,
            n,
            "one fault per touch"
        );
        stop.store(true, Ordering::Release);
    }
}
