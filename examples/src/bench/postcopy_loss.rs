//! `lmig-bench postcopy --lose-source-at-pct P [--source-returns-after-ms T]`:
//! the source is lost after `Commit`, once the destination placed P% of the
//! pages, while the destination program reads its working set.
//!
//! * Without `T`, the source runs as a process of its own (this program,
//!   re-executed with a hidden option) and is killed for good (`SIGKILL`, by
//!   its pid). The destination pauses post-copy, waits `--pause-limit-ms`
//!   for a source to come back, then reports the pages still missing: its
//!   program's reader stays blocked on the first missing page it touches.
//! * With `T`, the source runs in this process behind a proxy that cuts
//!   every connection and refuses new ones for `T` ms, then heals: a source
//!   that comes back. The destination pauses (its idle timeout is 1 s),
//!   then recovers: reconnect, resync, every page placed once.
//!
//! Fields: `outcome` (`paused`: lost for good with pages missing;
//! `recovered`: paused, then a source came back and post-copy finished;
//! `completed`: finished without a pause; `failed`), `wrong_pages` (pages
//! the program read that differ from the source's), `missing_pages`,
//! `recovered` (with `T` only), `verified` (with `T`: the digest check and
//! the program's own check of every page it read; `null` when the source
//! is gone for good).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lmig_core::protocol::Verification;
use lmig_core::session::{Mode, Source, SourceConfig};
use lmig_mem::{ManualTracker, RegionSet};
use lmig_transport::{Endpoint, connect};
use serde_json::{Value, json};

use super::cut_proxy::Proxy;
use super::postcopy::{Args, KEY_ENV, channel_config, source_regions};
use super::round;
use crate::common::keys::key_from_hex;
use crate::common::process::{Peer, announce_result};

/// The source program: nothing to pause.
struct Idle;

impl lmig_core::StateSource for Idle {
    fn pause(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
    fn resume(&mut self) -> lmig_core::Result<()> {
        Ok(())
    }
}

fn source_config(args: &Args) -> SourceConfig {
    SourceConfig::default()
        .with_mode(Mode::Postcopy)
        .with_push_pages(args.push_pages)
}

/// The source process (`--peer-source ADDR`): the same memory as the
/// scenario's, migrated in post-copy to `target` until it is killed.
pub fn source_process(args: &Args, target: &str) -> Result<(), Box<dyn std::error::Error>> {
    let key = key_from_hex(&std::env::var(KEY_ENV)?)?;
    let regions = source_regions(args.mib)?;
    let channel = connect(&Endpoint::Tcp(target.parse()?), channel_config(args, &key)?)?;
    let tracker = ManualTracker::new(regions.layout());
    let report = Source::new(&channel, &regions, tracker, Idle)
        .with_config(source_config(args))
        .run()?;
    announce_result(&json!({ "pages_sent": report.pages_sent }));
    Ok(())
}

/// Run the migration and lose its source (see the module docs); `dest` is
/// the destination process, listening for the migration on `mig_addr`.
pub fn lose_source(
    args: &Args,
    mut dest: Peer,
    key_hex: &str,
    mig_addr: SocketAddr,
    regions: &RegionSet,
) -> Result<Value, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut lost_at_ms = None;
    let source = match args.source_returns_after_ms {
        None => {
            let source = Peer::spawn(
                &[
                    "postcopy".into(),
                    format!("--peer-source={mig_addr}"),
                    format!("--mib={}", args.mib),
                    format!("--streams={}", args.streams),
                    format!("--push-pages={}", args.push_pages),
                    format!("--queue-depth={}", args.queue_depth),
                ],
                &[(KEY_ENV, key_hex)],
            )?;
            dest.expect_line("LOSE-NOW")?;
            lost_at_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            // SIGKILL, by the pid of our own child (and reaped).
            drop(source);
            None
        }
        Some(t) => {
            let key = key_from_hex(key_hex)?;
            let proxy = Proxy::new(mig_addr)?;
            let channel = connect(&Endpoint::Tcp(proxy.addr), channel_config(args, &key)?)?;
            let tracker = ManualTracker::new(regions.layout());
            let report = std::thread::scope(|s| {
                let (dest, proxy, lost_at_ms) = (&mut dest, &proxy, &mut lost_at_ms);
                s.spawn(move || {
                    if dest.expect_line("LOSE-NOW").is_ok() {
                        proxy.lose();
                        *lost_at_ms = Some(start.elapsed().as_secs_f64() * 1e3);
                        std::thread::sleep(Duration::from_millis(t));
                        proxy.heal();
                    }
                });
                Source::new(&channel, regions, tracker, Idle)
                    .with_config(source_config(args))
                    .run()
            });
            lmig_core::Channel::shutdown(&channel);
            Some(report)
        }
    };
    let d = dest.result()?;
    // To the destination's report: its pause included.
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    let wrong_pages = d["bad_touches"].as_u64();
    let outcome = d["outcome"].as_str().unwrap_or("failed").to_string();
    let verified = source.as_ref().map(|r| {
        matches!(r, Ok(r) if r.verification == Verification::Verified)
            && d["verified"].as_bool() == Some(true)
            && wrong_pages == Some(0)
    });
    let recovered = args
        .source_returns_after_ms
        .map(|_| outcome == "recovered" && verified == Some(true));
    let source_error = match &source {
        Some(Err(e)) => Some(e.to_string()),
        _ => None,
    };
    Ok(json!({
        "scenario": "postcopy",
        "mib": args.mib,
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "lose_source_at_pct": args.lose_source_at_pct,
        "source_returns_after_ms": args.source_returns_after_ms,
        "source_killed": args.source_returns_after_ms.is_none(),
        "outcome": outcome,
        "wrong_pages": wrong_pages,
        "missing_pages": d["missing_pages"],
        "recovered": recovered,
        "verified": verified,
        "paused": d["paused"],
        "reader_blocked": d["reader_blocked"],
        "lost_at_ms": lost_at_ms.map(|ms| round(ms, 1)),
        "total_ms": round(total_ms, 1),
        "placed": d["placed"],
        "network_faults": d["network_faults"],
        "duplicate_pages": d["duplicate_pages"],
        "working_set_pages": d["working_set_pages"],
        "reconnects": d["reconnects"],
        "source_error": source_error,
        "warnings": d["warnings"],
    }))
}
