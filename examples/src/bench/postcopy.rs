//! `lmig-bench postcopy --mib M --workload seq|random [--json]`: post-copy
//! migration of an M MiB region from this process to a destination process
//! over loopback TCP; the destination program touches its working set as
//! soon as it resumes.
//!
//! Figures, all from one run between the same two processes:
//!
//! * `raw_rtt_us`: median of an 8-byte request answered by a 4 KiB reply
//!   over plain TCP between the two processes, threads held on different
//!   CPUs as on two hosts; also `channel_rtt_us` (a one-page `PageRequest`
//!   and its reply on the urgent lane of a migration channel: same
//!   encryption, configuration and busy-poll as a fault's request) and
//!   `raw_rtt_same_cpu_us` (the TCP round trip on one CPU): see
//!   `postcopy_rtt.rs`;
//! * `bulk_ms`: the same bytes moved with the transfer path (the
//!   authenticated channel, chunk per message, one thread per lane) into
//!   fresh memory of the destination, to its acknowledgement;
//! * `total_ms`: the post-copy migration, start of the session to `Done`
//!   (every page placed and the digests checked);
//! * `fault_p50_us` / `fault_p99_us` / `fault_p999_us`: how long the program's first touch of
//!   a page took when that touch had to ask the source for it (a network
//!   fault), measured by the program itself;
//! * `fault_tail` (and `fault_middle`, for the faults between the p40 and
//!   the p60): where the faults at or above the p99 spent their time
//!   (`deliver_us`: touch to the fault read; `serve_us`: to the page placed,
//!   of which `reply_us` to the placement's start and `place_us` the claim
//!   and the fill; `wake_us`: to the program running again; `request_us` /
//!   `back_us`: `reply_us` split where the source read the page, over
//!   `matched` one-page replies; `by_reply`: pages that came
//!   in a one-page reply, not in a pushed message), from the sink's fault
//!   trace (lmig-mem feature `bench-internals`);
//! * `fault_path_cpus`: with `--fault-path together`, the CPU each process
//!   (source, destination) held its fault path on (`null`: none chosen);
//! * `network_faults`, `duplicate_pages`, `working_set_pages`, `verified`
//!   (the digest check and the program's own check of every page it read).
//!
//! `--reply-spin-us N` busy-polls the urgent lane N µs after a send on the
//! destination only (`ChannelConfig::urgent_spin` there): its reply thread
//! is running when a fault's reply arrives, while the source's request
//! server sleeps between requests (`--urgent-spin-us` spins on both ends).
//! Field `reply_spin_us`.
//!
//! `--one-fault-thread true` runs the destination's fault path in one
//! thread that waits for the faults and the replies together instead of
//! two (a fault thread, a reply thread; `DestinationConfig::one_fault_thread`,
//! by default one thread when the sink spins: `--spin-us` above 0). Field
//! `one_fault_thread`.
//!
//! `--cut-at-pct P` cuts every TCP connection of the migration once the
//! destination placed P% of the pages (a proxy in this process), so the run
//! exercises post-copy recovery.
//!
//! `--lose-source-at-pct P` loses the source once P% of the pages are in:
//! see [`super::postcopy_loss`] (fields `outcome`, `wrong_pages`,
//! `missing_pages`, `recovered`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::{CHUNK_PAGES, Message, PageBatch, PageData, Verification};
use lmig_core::session::{Destination, DestinationConfig, Mode, Source, SourceConfig};
use lmig_core::{Channel, Event, MemorySource, MigrationError, StateSink};
use lmig_mem::{
    Backing, DestinationRegions, FaultPathAffinity, ManualTracker, PostcopyOptions, RegionOptions,
    RegionSet,
};
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, StreamChannel, connect};
use serde_json::json;

use super::cut_proxy::Proxy;
use super::postcopy_rtt::{Responders, RoundTrips};
use super::postcopy_trace::{fault_tail, served_reads, source_split};
use super::{Output, round};
use crate::common::keys::{key_from_hex, random_key_hex};
use crate::common::process::{Peer, announce_result};
use crate::common::stats::percentile;

/// The destination program's access pattern.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Pages in address order.
    Seq,
    /// Pages in a random order.
    Random,
}

/// `--fault-path`: a [`lmig_mem::FaultPathAffinity`] that needs no CPU number.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FaultPath {
    /// Left to the scheduler.
    Free,
    /// Held together on one CPU: the highest-numbered one the process may run
    /// on (both ends, on one host, choose the same).
    Together,
}

/// Apply `--fault-cpu` (first) or `--fault-path` to this process.
pub(super) fn apply_fault_path(args: &Args) -> lmig_mem::Result<()> {
    if args.fault_cpu.is_some() {
        return lmig_mem::set_fault_path_cpu(args.fault_cpu);
    }
    match args.fault_path {
        None => Ok(()),
        Some(FaultPath::Free) => lmig_mem::set_fault_path_affinity(FaultPathAffinity::Free),
        Some(FaultPath::Together) => lmig_mem::set_fault_path_affinity(FaultPathAffinity::Together),
    }
}

/// Options of the `postcopy` scenario.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Region size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// How the destination program touches its working set.
    #[arg(long, value_enum, default_value_t = Workload::Seq)]
    pub workload: Workload,
    /// Share of the region the program touches, in percent.
    #[arg(long, default_value_t = 100)]
    pub working_set_pct: u64,
    /// Parallel data streams.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// Busy-poll the userfaultfd this many µs before blocking.
    #[arg(long, default_value_t = 200)]
    pub spin_us: u64,
    /// Busy-poll the urgent lane this many µs after a send
    /// (`ChannelConfig::urgent_spin`); default: the channel's.
    #[arg(long)]
    pub urgent_spin_us: Option<u64>,
    /// Busy-poll the urgent lane this many µs after a send on the
    /// destination only (its reply thread, right after a fault's request
    /// left); the source's request server does not spin. Overrides
    /// `--urgent-spin-us` there.
    #[arg(long)]
    pub reply_spin_us: Option<u64>,
    /// The destination's fault path in one thread (`true`) or two
    /// (`false`): `DestinationConfig::one_fault_thread`; default: the
    /// library's.
    #[arg(long, action = clap::ArgAction::Set)]
    pub one_fault_thread: Option<bool>,
    /// Hold the threads of the fault path (the source's request server, the
    /// destination's fault and reply threads) on this CPU
    /// (`lmig_mem::set_fault_path_cpu`); default: left to the scheduler.
    #[arg(long)]
    pub fault_cpu: Option<usize>,
    /// Where the fault path's threads run when no `--fault-cpu` is given
    /// (`lmig_mem::set_fault_path_affinity`); default: the library's.
    #[arg(long, value_enum)]
    pub fault_path: Option<FaultPath>,
    /// Cut the migration's TCP connections once this share (%) of the pages
    /// was placed (post-copy recovery); 0 = never.
    #[arg(long, default_value_t = 0)]
    pub cut_at_pct: u64,
    /// Pages per pushed message while the program catches up with the push
    /// (`SourceConfig::push_pages`), at most 64; default: the session's.
    #[arg(long, default_value_t = SourceConfig::default().push_pages)]
    pub push_pages: u32,
    /// Answer a request for a page already pushed (still in flight) by
    /// sending it again (`SourceConfig::resend_in_flight`): `true` or `false`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub resend_in_flight: bool,
    /// Messages the channel queues between its reader threads and the session.
    #[arg(long, default_value_t = 64)]
    pub queue_depth: usize,
    /// Lose the source for good once this share (%) of the pages was
    /// placed: the source runs as a process of its own, killed by pid
    /// (with `--source-returns-after-ms`, the link is cut and refused
    /// instead, then heals); 0 = never.
    #[arg(long, default_value_t = 0)]
    pub lose_source_at_pct: u64,
    /// With `--lose-source-at-pct`: the source comes back after this long
    /// (the cut link heals): post-copy pauses, then recovers.
    #[arg(long)]
    pub source_returns_after_ms: Option<u64>,
    /// With `--lose-source-at-pct`: how long the destination waits for a
    /// source to come back before it reports the pages still missing.
    #[arg(long, default_value_t = 3000)]
    pub pause_limit_ms: u64,
    /// Internal: run as the destination process, listening here.
    #[arg(long, hide = true)]
    pub peer_listen: Option<String>,
    /// Internal: run as the source process, dialling this migration address.
    #[arg(long, hide = true)]
    pub peer_source: Option<String>,
    /// Internal: the source's raw round-trip responder.
    #[arg(long, hide = true)]
    pub rtt_addr: Option<String>,
    /// Internal: the source's round-trip responder on a migration channel.
    #[arg(long, hide = true)]
    pub rtt_channel_addr: Option<String>,
}

pub(super) const KEY_ENV: &str = "LMIG_BENCH_KEY";
pub(super) const PAGE: usize = 4096;
pub(super) const REGION: RegionId = RegionId(1);

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The first 8 bytes of every page: its number and a tag.
pub(super) fn stamp(page: u64) -> u64 {
    page ^ 0x5A5A_0000_0000_0000
}

fn order(pages: u64, ws: u64, workload: Workload) -> Vec<u64> {
    match workload {
        Workload::Seq => (0..ws).collect(),
        Workload::Random => {
            let mut v: Vec<u64> = (0..pages).collect();
            let mut s = 0x9E37_79B9_7F4A_7C15u64;
            for i in (1..v.len()).rev() {
                v.swap(i, (xorshift(&mut s) % (i as u64 + 1)) as usize);
            }
            v.truncate(ws as usize);
            v
        }
    }
}

pub(super) fn channel_config(
    args: &Args,
    key: &[u8],
) -> Result<ChannelConfig, Box<dyn std::error::Error>> {
    let mut c = ChannelConfig::new(AuthKey::new(key)?).with_data_streams(args.streams);
    c.queue_depth = args.queue_depth.max(1);
    c.reconnect_timeout = Duration::from_secs(20);
    if let Some(us) = args.urgent_spin_us {
        c = c.with_urgent_spin(Duration::from_micros(us));
    }
    Ok(c)
}

/// The source's memory: every page stamped with its number.
pub(super) fn source_regions(mib: u64) -> Result<RegionSet, Box<dyn std::error::Error>> {
    let region = RegionOptions::new(REGION, mib << 20).populate(true).map()?;
    let mut page = vec![0u8; PAGE];
    for p in 0..region.pages() {
        page[..8].copy_from_slice(&stamp(p).to_le_bytes());
        page[8..16].copy_from_slice(&p.wrapping_mul(0x9E37_79B9).to_le_bytes());
        region.write_at(p as usize * PAGE, &page)?;
    }
    Ok(RegionSet::new([region])?)
}

/// Run the scenario (or, with `--peer-listen`, its destination process).
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(listen) = &args.peer_listen {
        return destination(&args, listen);
    }
    if let Some(target) = &args.peer_source {
        return super::postcopy_loss::source_process(&args, target);
    }
    apply_fault_path(&args)?;
    let regions = source_regions(args.mib)?;
    let pages = regions.get(REGION)?.pages();

    let key_hex = random_key_hex()?;
    let key = key_from_hex(&key_hex)?;
    let responders = Responders::start(channel_config(&args, &key)?)?;
    let peer_args: Vec<String> = vec![
        "postcopy".into(),
        "--peer-listen=127.0.0.1:0".into(),
        format!("--rtt-addr={}", responders.tcp),
        format!("--rtt-channel-addr={}", responders.channel),
        format!("--streams={}", args.streams),
        format!("--mib={}", args.mib),
        format!(
            "--workload={}",
            format!("{:?}", args.workload).to_lowercase()
        ),
        format!("--working-set-pct={}", args.working_set_pct),
        format!("--spin-us={}", args.spin_us),
        format!("--cut-at-pct={}", args.cut_at_pct),
        format!("--push-pages={}", args.push_pages),
        format!("--queue-depth={}", args.queue_depth),
        format!("--lose-source-at-pct={}", args.lose_source_at_pct),
        format!("--pause-limit-ms={}", args.pause_limit_ms),
    ];
    let mut peer_args = peer_args;
    if let Some(us) = args.urgent_spin_us {
        peer_args.push(format!("--urgent-spin-us={us}"));
    }
    if let Some(us) = args.reply_spin_us {
        peer_args.push(format!("--reply-spin-us={us}"));
    }
    if let Some(cpu) = args.fault_cpu {
        peer_args.push(format!("--fault-cpu={cpu}"));
    }
    if let Some(one) = args.one_fault_thread {
        peer_args.push(format!("--one-fault-thread={one}"));
    }
    if let Some(mode) = args.fault_path {
        peer_args.push(format!(
            "--fault-path={}",
            format!("{mode:?}").to_lowercase()
        ));
    }
    if let Some(t) = args.source_returns_after_ms {
        peer_args.push(format!("--source-returns-after-ms={t}"));
    }
    let mut peer = Peer::spawn(&peer_args, &[(KEY_ENV, &key_hex)])?;
    let addrs = peer.expect_line("LISTENING")?;
    let mut it = addrs.split_whitespace();
    let bulk_addr: SocketAddr = it.next().ok_or("no bulk address")?.parse()?;
    let mig_addr: SocketAddr = it.next().ok_or("no migration address")?.parse()?;
    responders.join();

    // Bulk: the same bytes with the transfer path.
    let bulk_ms = {
        let ch = connect(&Endpoint::Tcp(bulk_addr), channel_config(&args, &key)?)?;
        let lanes = ch.data_lanes().max(1);
        let t0 = Instant::now();
        std::thread::scope(|s| -> Result<(), lmig_core::MigrationError> {
            let handles: Vec<_> = (0..lanes)
                .map(|lane| {
                    let ch = &ch;
                    let regions = &regions;
                    s.spawn(move || -> Result<(), lmig_core::MigrationError> {
                        let chunks = pages.div_ceil(u64::from(CHUNK_PAGES));
                        let mut buf = vec![0u8; CHUNK_PAGES as usize * PAGE];
                        for c in (lane as u64..chunks).step_by(lanes) {
                            let first = c * u64::from(CHUNK_PAGES);
                            let n = (pages - first).min(u64::from(CHUNK_PAGES)) as u32;
                            let run = PageRun::new(REGION, first, n);
                            let b = &mut buf[..n as usize * PAGE];
                            MemorySource::read_pages(regions, &run, b)?;
                            ch.send_pages(
                                lane,
                                &PageBatch {
                                    round: 0,
                                    run,
                                    data: PageData::Raw(bytes::Bytes::copy_from_slice(b)),
                                },
                            )?;
                        }
                        ch.flush()
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("bulk sender")?;
            }
            Ok(())
        })?;
        match ch.recv(Some(Duration::from_secs(120)))? {
            Some(Message::Done(_)) => {}
            other => return Err(format!("bulk: expected Done, got {other:?}").into()),
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        ch.shutdown();
        ms
    };

    if args.lose_source_at_pct > 0 {
        let figures = super::postcopy_loss::lose_source(&args, peer, &key_hex, mig_addr, &regions)?;
        out.emit(&figures);
        return Ok(());
    }

    // The post-copy migration (through a proxy when a cut is asked for).
    let proxy = if args.cut_at_pct > 0 {
        Some(Proxy::new(mig_addr)?)
    } else {
        None
    };
    let dial = proxy.as_ref().map_or(mig_addr, |p| p.addr);
    let channel = connect(&Endpoint::Tcp(dial), channel_config(&args, &key)?)?;
    let tracker = ManualTracker::new(regions.layout());
    struct Program;
    impl lmig_core::StateSource for Program {
        fn pause(&mut self) -> lmig_core::Result<()> {
            Ok(())
        }
        fn resume(&mut self) -> lmig_core::Result<()> {
            Ok(())
        }
    }
    let config = SourceConfig::default()
        .with_mode(Mode::Postcopy)
        .with_push_pages(args.push_pages)
        .with_resend_in_flight(args.resend_in_flight);
    let start = Instant::now();
    let cut_done = AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        if let Some(p) = &proxy {
            let peer_ref = &mut peer;
            let cut_done = &cut_done;
            // The peer prints `PLACED` when the share is reached.
            s.spawn(move || {
                if peer_ref.expect_line("CUT-NOW").is_ok() {
                    p.cut();
                    cut_done.store(true, Ordering::Release);
                }
            });
        }
        Source::new(&channel, &regions, tracker, Program)
            .with_config(config)
            .run()
    })?;
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    channel.shutdown();
    let mut dest = peer.result()?;
    let served = served_reads();
    source_split(&mut dest["fault_tail"], &served);
    source_split(&mut dest["fault_middle"], &served);
    let verified = report.verification == Verification::Verified
        && dest["verified"].as_bool() == Some(true)
        && dest["bad_touches"].as_u64() == Some(0);
    out.emit(&json!({
        "scenario": "postcopy",
        "mib": args.mib,
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "fault_p50_us": dest["fault_p50_us"],
        "fault_p99_us": dest["fault_p99_us"],
        "fault_p999_us": dest["fault_p999_us"],
        "fault_tail": dest["fault_tail"],
        "fault_middle": dest["fault_middle"],
        "raw_rtt_us": dest["raw_rtt_us"],
        "channel_rtt_us": dest["channel_rtt_us"],
        "raw_rtt_same_cpu_us": dest["raw_rtt_same_cpu_us"],
        "total_ms": round(total_ms, 1),
        "bulk_ms": round(bulk_ms, 1),
        "duplicate_pages": dest["duplicate_pages"],
        "network_faults": dest["network_faults"],
        "working_set_pages": dest["working_set_pages"],
        "verified": verified,
        "streams": args.streams,
        "spin_us": args.spin_us,
        "urgent_spin_us": args.urgent_spin_us,
        "reply_spin_us": args.reply_spin_us,
        // The library's default: one thread when the sink spins.
        "one_fault_thread": args.one_fault_thread.unwrap_or(args.spin_us > 0),
        "fault_cpu": args.fault_cpu,
        "fault_path": format!("{:?}", lmig_mem::fault_path_affinity()).to_lowercase(),
        "fault_path_cpus": [lmig_mem::fault_path_together_cpu(), dest["fault_path_cpu"].as_u64()],
        "push_pages": args.push_pages,
        "resend_in_flight": args.resend_in_flight,
        "queue_depth": args.queue_depth,
        "pages_sent": report.pages_sent,
        "requested_pages": report.requested_pages,
        "cut": cut_done.load(Ordering::Acquire),
        "reconnects": dest["reconnects"],
        "touch_ms": dest["touch_ms"],
        "uffd": dest["uffd"],
        "warnings": report.warnings,
    }));
    Ok(())
}

/// The destination program: touches its working set once resumed.
struct Toucher {
    go: Arc<AtomicBool>,
}

impl StateSink for Toucher {
    fn resume(&mut self) -> lmig_core::Result<()> {
        self.go.store(true, Ordering::Release);
        Ok(())
    }
}

/// The destination process.
fn destination(args: &Args, listen: &str) -> Result<(), Box<dyn std::error::Error>> {
    let key = key_from_hex(&std::env::var(KEY_ENV)?)?;
    let pages = (args.mib << 20) / PAGE as u64;
    apply_fault_path(args)?;
    // This side's channels: the reply spin, if asked for, here only.
    let mut args = args.clone();
    if let Some(us) = args.reply_spin_us {
        args.urgent_spin_us = Some(us);
    }
    let args = &args;

    let rtt = RoundTrips::measure(
        args.rtt_addr.as_deref().ok_or("--rtt-addr missing")?,
        args.rtt_channel_addr
            .as_deref()
            .ok_or("--rtt-channel-addr missing")?,
        channel_config(args, &key)?,
    )?;

    let bulk = Listener::bind(&Endpoint::Tcp(listen.parse()?), channel_config(args, &key)?)?;
    let mut mig_config = channel_config(args, &key)?;
    if args.lose_source_at_pct > 0 {
        // Short attempts: the destination counts them against its idle timeout.
        mig_config.reconnect_timeout = Duration::from_millis(500);
    }
    let mig = Listener::bind(&Endpoint::Tcp(listen.parse()?), mig_config)?;
    let (Endpoint::Tcp(b), Endpoint::Tcp(m)) = (bulk.local_endpoint(), mig.local_endpoint()) else {
        return Err("TCP listeners expected".into());
    };
    println!("LISTENING {b} {m}");

    // Bulk: receive every page into fresh memory, acknowledge. Both
    // transfers start on warm free memory (outside their timings: the
    // source's clock starts once the channel is up).
    {
        super::warm_free_memory((args.mib << 20) as usize);
        let ch = bulk.accept_timeout(Duration::from_secs(30))?;
        let scratch = RegionOptions::new(REGION, args.mib << 20).map()?;
        let mut got = 0u64;
        while got < pages {
            match ch.recv(Some(Duration::from_secs(60)))? {
                Some(Message::Pages(b)) => {
                    if let PageData::Raw(d) = &b.data {
                        scratch.write_at(b.run.first as usize * PAGE, d)?;
                    }
                    got += u64::from(b.run.count);
                }
                Some(other) => return Err(format!("bulk: unexpected {}", other.name()).into()),
                None => return Err("bulk: timeout".into()),
            }
        }
        ch.send(&Message::Done(Verification::NotChecked))?;
        let _ = ch.recv(Some(Duration::from_secs(5)));
    }

    super::warm_free_memory((args.mib << 20) as usize);
    let channel: StreamChannel = mig.accept_timeout(Duration::from_secs(30))?;
    let sink = Arc::new(
        DestinationRegions::new(Backing::Private)
            .prefault(false)
            .postcopy_options(
                PostcopyOptions::default().with_spin(Duration::from_micros(args.spin_us)),
            ),
    );
    let go = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let bad = Arc::new(AtomicU64::new(0));
    let ws = (pages * args.working_set_pct.min(100) / 100).max(1);
    let touch_order = order(pages, ws, args.workload);
    // The program: not a scoped thread, as it may stay blocked on a page
    // that never arrives (the source lost for good); then it is not joined.
    let toucher = {
        let (sink, go, done, bad) = (sink.clone(), go.clone(), done.clone(), bad.clone());
        let touch_order = touch_order.clone();
        std::thread::Builder::new()
            .name("bench-toucher".into())
            .spawn(move || touch(&sink, &go, &done, &bad, &touch_order))?
    };
    let lose = args.lose_source_at_pct > 0;
    let trigger = match (args.lose_source_at_pct, args.cut_at_pct) {
        (0, 0) => None,
        (0, cut) => Some(("CUT-NOW", cut)),
        (lose, _) => Some(("LOSE-NOW", lose)),
    };
    let (paused, resumed) = (AtomicBool::new(false), AtomicBool::new(false));
    let report = std::thread::scope(|s| {
        if let Some((line, pct)) = trigger {
            let sink = &sink;
            let done = &done;
            s.spawn(move || {
                let target = pages * pct.min(99) / 100;
                while !done.load(Ordering::Acquire) {
                    if let Some(r) = sink.regions() {
                        if r.in_postcopy() && pages - r.postcopy_missing() >= target {
                            println!("{line}");
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        let config = if lose {
            // The source counts as lost after 1 s without it.
            DestinationConfig::default()
                .with_idle_timeout(Duration::from_secs(1))
                .with_pause_limit(Some(Duration::from_millis(
                    args.source_returns_after_ms
                        .map_or(args.pause_limit_ms, |t| t + 30_000),
                )))
        } else {
            DestinationConfig::default().with_idle_timeout(Duration::from_secs(60))
        };
        let config = match args.one_fault_thread {
            Some(one) => config.with_one_fault_thread(one),
            None => config,
        };
        let r = Destination::new(&channel, sink.clone(), Toucher { go: go.clone() })
            .with_config(config)
            .with_observer(|e: &Event| match e {
                Event::PostcopyPaused { .. } => paused.store(true, Ordering::Release),
                Event::PostcopyResumed { .. } => resumed.store(true, Ordering::Release),
                _ => {}
            })
            .run();
        done.store(true, Ordering::Release);
        r
    });
    // Bounded: a toucher blocked on a page that never arrives is left so.
    let deadline = Instant::now() + Duration::from_secs(if report.is_ok() { 600 } else { 2 });
    while !toucher.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let blocked = !toucher.is_finished();
    let (durations, starts, touch_ms) = if blocked {
        (Vec::new(), Vec::new(), 0.0)
    } else {
        toucher.join().map_err(|_| "the toucher panicked")?
    };
    let stats = sink.postcopy_stats();
    let missing_pages = sink.regions().map_or(0, RegionSet::postcopy_missing);
    let (outcome, report) = match report {
        Ok(r) if paused.load(Ordering::Acquire) => ("recovered", Some(r)),
        Ok(r) => ("completed", Some(r)),
        Err(e) if matches!(e.cause(), MigrationError::PostcopyPaused { .. }) => ("paused", None),
        Err(e) if !lose => return Err(e.into()),
        Err(_) => ("failed", None),
    };
    // Network faults the program took: the touches of pages it had to ask for.
    let mut faulted = std::collections::HashSet::new();
    for &(_, p) in &stats.faulted {
        faulted.insert(p);
    }
    let mut lat: Vec<f64> = touch_order
        .iter()
        .zip(&durations)
        .filter(|(p, _)| faulted.contains(p))
        .map(|(_, &ns)| f64::from(ns) / 1e3)
        .collect();
    lat.sort_by(f64::total_cmp);
    let steps = |lo: f64, hi: f64| {
        let band = (percentile(&lat, lo), percentile(&lat, hi));
        fault_tail(&stats, &touch_order, &starts, &durations, band)
    };
    let (tail, middle) = (steps(0.99, 1.0), steps(0.4, 0.6));
    let warnings = report.as_ref().map_or(&[][..], |r| &r.warnings[..]);
    announce_result(&json!({
        "raw_rtt_us": round(rtt.tcp_us, 1),
        "channel_rtt_us": round(rtt.channel_us, 1),
        "raw_rtt_same_cpu_us": round(rtt.tcp_same_cpu_us, 1),
        "fault_path_cpu": lmig_mem::fault_path_together_cpu(),
        "fault_p50_us": round(percentile(&lat, 0.5), 1),
        "fault_p99_us": round(percentile(&lat, 0.99), 1),
        "fault_p999_us": round(percentile(&lat, 0.999), 1),
        "fault_tail": tail,
        "fault_middle": middle,
        "network_faults": report.as_ref().map(|r| r.network_faults),
        "duplicate_pages": report.as_ref().map(|r| r.duplicate_pages),
        "working_set_pages": ws,
        "verified": report.as_ref().map(|r| r.verification == Verification::Verified),
        "bad_touches": bad.load(Ordering::Relaxed),
        "reconnects": warnings.iter().filter(|w| w.contains("reconnected")).count(),
        "touch_ms": round(touch_ms, 1),
        "uffd": format!("{:?}", stats.origin),
        "outcome": outcome,
        "missing_pages": missing_pages,
        "paused": paused.load(Ordering::Acquire),
        "resumed": resumed.load(Ordering::Acquire),
        "reader_blocked": blocked,
        "placed": stats.placed,
        "warnings": warnings,
    }));
    Ok(())
}

/// The program's reads: every page of `order` once, its stamp checked.
/// Returns each touch's start and duration (ns) and the whole run's (ms).
fn touch(
    sink: &DestinationRegions,
    go: &AtomicBool,
    done: &AtomicBool,
    bad: &AtomicU64,
    order: &[u64],
) -> (Vec<u32>, Vec<Instant>, f64) {
    let mut durations = vec![0u32; order.len()];
    let mut starts = Vec::with_capacity(order.len());
    while !go.load(Ordering::Acquire) {
        if done.load(Ordering::Acquire) {
            return (durations, starts, 0.0);
        }
        std::hint::spin_loop();
    }
    let Some(region) = sink.regions().and_then(|set| set.get(REGION).ok()) else {
        return (durations, starts, 0.0);
    };
    let t0 = Instant::now();
    let mut word = [0u8; 8];
    for (i, &p) in order.iter().enumerate() {
        let t = Instant::now();
        starts.push(t);
        let _ = region.read_at(p as usize * PAGE, &mut word);
        durations[i] = t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32;
        if u64::from_le_bytes(word) != stamp(p) {
            bad.fetch_add(1, Ordering::Relaxed);
        }
    }
    (durations, starts, t0.elapsed().as_secs_f64() * 1e3)
}
