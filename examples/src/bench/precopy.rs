//! `lmig-bench precopy --mib M --dirty-mbps R [--zero-fraction F] [--free-fraction F] [--mode precopy|hybrid|postcopy]`:
//! a source process with an M MiB region and a writer thread dirtying R MB/s
//! of random pages migrates to a destination process over loopback TCP.
//!
//! With `--zero-fraction F`, that share of the pages is never written: free
//! memory the program does not use. The writer (and the tracker-cost probe)
//! dirty random pages among the others, as a program writes its own data.
//!
//! With `--free-fraction F`, every page is written first, then that share
//! of the region (in blocks of 16 pages) is declared free with
//! [`Region::declare_free`]: pages an allocator holds unused. They are never
//! sent; the writer dirties only the others. `bytes_sent` counts what went
//! on the wire.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use lmig_core::model::{RegionId, RegionPages};
use lmig_core::policy::{ConvergencePolicy, Fallback, PolicyConfig};
use lmig_core::protocol::Verification;
use lmig_core::session::{Destination, Mode, Source, SourceConfig};
use lmig_core::{DirtyTracker, StateSink, StateSource};
use lmig_mem::{Backing, DestinationRegions, Region, RegionOptions, RegionSet, best_tracker};
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, connect};
use serde_json::json;

use super::{Output, round};
use crate::common::clock::mono_ns;
use crate::common::keys::{key_from_hex, random_key_hex};
use crate::common::process::{Peer, announce_listening, announce_result};

/// Memory mode of the benchmark.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Pre-copy rounds, then freeze.
    Precopy,
    /// Pre-copy rounds; post-copy for what does not converge.
    Hybrid,
    /// Post-copy from the start.
    Postcopy,
}

/// Options of the `precopy` scenario.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Region size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// MB/s of random pages the writer thread dirties during the migration.
    #[arg(long, default_value_t = 100.0)]
    pub dirty_mbps: f64,
    /// Share of the region's pages left zero.
    #[arg(long, default_value_t = 0.0)]
    pub zero_fraction: f64,
    /// Share of the region declared free (`Region::declare_free`) after
    /// every page was written, in blocks of 16 pages.
    #[arg(long, default_value_t = 0.0)]
    pub free_fraction: f64,
    /// Memory mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Precopy)]
    pub mode: ModeArg,
    /// Parallel data streams.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// The policy's downtime target in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    pub downtime_ms: f64,
    /// The policy's round limit.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Internal: run as the destination process, listening here.
    #[arg(long, hide = true)]
    pub peer_listen: Option<String>,
}

const KEY_ENV: &str = "LMIG_BENCH_KEY";
const PAGE: usize = 4096;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The benchmark's program: a writer thread the session pauses at the freeze.
struct WriterControl {
    pause: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
}

impl StateSource for WriterControl {
    fn pause(&mut self) -> lmig_core::Result<()> {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.paused.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return Err(lmig_core::MigrationError::backend(
                    "writer",
                    "did not pause within 5 s",
                ));
            }
            std::hint::spin_loop();
        }
        Ok(())
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.pause.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Dirty `mbps` MB/s of random pages of `used` until `stop`; park while
/// `pause` is set.
fn writer(
    region: &Region,
    used: &[u64],
    mbps: f64,
    stop: &AtomicBool,
    pause: &AtomicBool,
    paused: &AtomicBool,
) -> u64 {
    let per_sec = mbps * 1e6 / PAGE as f64;
    let start = Instant::now();
    let mut written = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::Relaxed) {
        if pause.load(Ordering::SeqCst) {
            paused.store(true, Ordering::SeqCst);
            while pause.load(Ordering::SeqCst) && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(100));
            }
            paused.store(false, Ordering::SeqCst);
            continue;
        }
        let target = (start.elapsed().as_secs_f64() * per_sec) as u64;
        let mut burst = 0;
        while written < target && burst < 256 {
            let page = used[(xorshift(&mut seed) % used.len() as u64) as usize];
            let _ = region.write_at(page as usize * PAGE + 8, &written.to_le_bytes());
            written += 1;
            burst += 1;
        }
        if burst < 256 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    written
}

/// Pages per block declared free at once by `--free-fraction`.
const FREE_BLOCK: u64 = 16;

/// Declare about `fraction` of `region` free, in random blocks of
/// [`FREE_BLOCK`] pages, and drop those pages from `used`. Returns the
/// number of pages declared free.
fn declare_free_blocks(
    region: &Region,
    fraction: f64,
    used: &mut Vec<u64>,
) -> Result<u64, Box<dyn std::error::Error>> {
    if fraction <= 0.0 {
        return Ok(0);
    }
    let pages = region.pages();
    let mut seed = 0x0bad_cafe_u64;
    let mut free = lmig_core::model::PageSet::new(pages);
    for block in 0..pages.div_ceil(FREE_BLOCK) {
        if (xorshift(&mut seed) % 1_000_000) as f64 / 1e6 >= fraction {
            continue;
        }
        let first = block * FREE_BLOCK;
        let count = FREE_BLOCK.min(pages - first);
        region.declare_free(first as usize * PAGE, count as usize * PAGE)?;
        free.insert_range(first, count);
    }
    used.retain(|&p| !free.contains(p));
    Ok(free.count())
}

/// Run the scenario (or, with `--peer-listen`, its destination process).
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(listen) = &args.peer_listen {
        return destination(&args, listen);
    }
    let len = args.mib << 20;
    let region = RegionOptions::new(RegionId(1), len).populate(true).map()?;
    let pages = region.pages();
    let mut seed = 0x1234_5678u64;
    let mut used = Vec::with_capacity(pages as usize);
    for p in 0..pages {
        if (xorshift(&mut seed) % 1_000_000) as f64 / 1e6 < args.zero_fraction {
            continue;
        }
        region.write_at(p as usize * PAGE, &(p | 1 << 63).to_le_bytes())?;
        used.push(p);
    }
    let zero = pages - used.len() as u64;
    let free = declare_free_blocks(&region, args.free_fraction, &mut used)?;
    if used.is_empty() {
        return Err("--zero-fraction and --free-fraction leave no page for the writer".into());
    }
    let regions = RegionSet::new([region])?;
    let region = regions.get(RegionId(1))?;
    let (mut tracker, choice) = best_tracker(&regions)?;

    // Tracker cost on this region: collect vs the bare ioctl, 1% written.
    let (collect_ms, raw_ms) = {
        tracker.start()?;
        let mut dirty = RegionPages::empty(regions.layout());
        let mut collect = Vec::new();
        let mut raw = Vec::new();
        let touch = |seed: &mut u64| {
            for _ in 0..pages / 100 {
                let p = used[(xorshift(seed) % used.len() as u64) as usize];
                let _ = region.write_at(p as usize * PAGE + 16, &p.to_le_bytes());
            }
        };
        for _ in 0..5 {
            touch(&mut seed);
            dirty.clear();
            let t = Instant::now();
            tracker.collect(&mut dirty)?;
            collect.push(t.elapsed().as_secs_f64() * 1e3);
            touch(&mut seed);
            let t = Instant::now();
            lmig_mem::track::raw_pagemap_scan(region)?;
            raw.push(t.elapsed().as_secs_f64() * 1e3);
        }
        tracker.stop()?;
        collect.sort_by(f64::total_cmp);
        raw.sort_by(f64::total_cmp);
        (collect[2], raw[2])
    };

    // The destination process; the key travels in its environment.
    let key_hex = random_key_hex()?;
    let peer_args: Vec<String> = vec![
        "precopy".into(),
        "--peer-listen=127.0.0.1:0".into(),
        format!("--streams={}", args.streams),
        format!("--mib={}", args.mib),
    ];
    let mut peer = Peer::spawn(&peer_args, &[(KEY_ENV, &key_hex)])?;
    let addr = peer.expect_line("LISTENING")?;
    let config =
        ChannelConfig::new(AuthKey::new(key_from_hex(&key_hex)?)?).with_data_streams(args.streams);
    let channel = connect(&Endpoint::Tcp(addr.parse()?), config)?;

    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let (mode, fallback) = match args.mode {
        ModeArg::Precopy => (Mode::Precopy, Fallback::Freeze),
        ModeArg::Hybrid => (Mode::Hybrid, Fallback::Postcopy),
        ModeArg::Postcopy => (Mode::Postcopy, Fallback::Freeze),
    };
    let policy = ConvergencePolicy::new(
        PolicyConfig::default()
            .with_downtime_target(Duration::from_secs_f64(args.downtime_ms / 1e3))
            .with_max_rounds(args.max_rounds)
            .with_fallback(fallback),
    );
    let config = SourceConfig::default().with_mode(mode);
    let start = Instant::now();
    let (report, written) = std::thread::scope(|s| {
        let w = s.spawn(|| writer(region, &used, args.dirty_mbps, &stop, &pause, &paused));
        let control = WriterControl {
            pause: pause.clone(),
            paused: paused.clone(),
        };
        let r = Source::new(&channel, &regions, &mut tracker, control)
            .with_policy(policy)
            .with_config(config)
            .run();
        stop.store(true, Ordering::SeqCst);
        (r, w.join().expect("writer thread"))
    });
    let total = start.elapsed();
    let report = report?;
    let dest = peer.result()?;
    let paused_ns = mono_ns(report.paused_at) as f64;
    let ms_since_pause = |field: &str| {
        dest[field]
            .as_f64()
            .map(|ns| round((ns - paused_ns) / 1e6, 3))
    };
    let policy_note = if report.rounds == 0 {
        "no pre-copy round (post-copy mode)".to_string()
    } else {
        report.policy_reason.clone()
    };
    out.emit(&json!({
        "scenario": "precopy",
        "mib": args.mib,
        "dirty_mbps": args.dirty_mbps,
        "zero_fraction": args.zero_fraction,
        "free_fraction": args.free_fraction,
        "free_pages_declared": free,
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "streams": args.streams,
        "rounds": report.rounds,
        "total_ms": round(total.as_secs_f64() * 1e3, 1),
        "freeze_ms": ms_since_pause("last_page_ns"),
        "downtime_ms": ms_since_pause("resumed_ns"),
        "handover_ms": ms_since_pause("handover_ns"),
        "freeze_steps_ms": report.freeze_steps.iter().map(|(n, d)| json!([n, round(d.as_secs_f64() * 1e3, 3)])).collect::<Vec<_>>(),
        "bytes_sent": report.bytes_sent,
        "region_bytes": len,
        "zero_pages_skipped": report.zero_pages,
        "zero_pages_in_region": zero,
        "freeze_pages": report.freeze_pages,
        "switched_to_postcopy": report.switched_to_postcopy,
        "postcopy_pages": report.postcopy_pages,
        "verified": report.verification == Verification::Verified,
        "collect_ms_1pct": round(collect_ms, 3),
        "raw_scan_ms_1pct": round(raw_ms, 3),
        "tracker": choice.to_string(),
        "pages_dirtied": written,
        "policy": policy_note,
        "dirty_pages_per_round": report.round_stats.iter().map(|s| s.dirty_pages).collect::<Vec<_>>(),
        "round_ms": report.round_stats.iter().map(|s| round(s.elapsed.as_secs_f64() * 1e3, 1)).collect::<Vec<_>>(),
        "round_mbps": report.round_stats.iter().map(|s| round(s.bytes_sent as f64 / s.elapsed.as_secs_f64().max(1e-9) / 1e6, 0)).collect::<Vec<_>>(),
    }));
    Ok(())
}

/// The destination process: listen, receive, resume, report times.
fn destination(args: &Args, listen: &str) -> Result<(), Box<dyn std::error::Error>> {
    let key = key_from_hex(&std::env::var(KEY_ENV)?)?;
    let config = ChannelConfig::new(AuthKey::new(&key)?).with_data_streams(args.streams);
    let listener = Listener::bind(&Endpoint::Tcp(listen.parse()?), config)?;
    match listener.local_endpoint() {
        Endpoint::Tcp(addr) => announce_listening(addr),
        other => announce_listening(other),
    }
    let channel = listener.accept_timeout(Duration::from_secs(30))?;
    let sink = DestinationRegions::new(Backing::Private);
    struct Resumed;
    impl StateSink for Resumed {
        fn resume(&mut self) -> lmig_core::Result<()> {
            Ok(())
        }
    }
    let report = Destination::new(&channel, &sink, Resumed).run()?;
    announce_result(&json!({
        "last_page_ns": report.last_page_at.map(mono_ns),
        "resumed_ns": report.resumed_at.map(mono_ns),
        "handover_ns": report.handover_at.map(mono_ns),
        "pages_placed": report.pages_placed,
        "network_faults": report.network_faults,
        "duplicate_pages": report.duplicate_pages,
        "verified": report.verification == Verification::Verified,
    }));
    Ok(())
}
