//! `hostile`: a real dialer's handshake while a listener is flooded.
//!
//! A [`Listener`] on loopback; before each run, one of each hostile kind
//! of [`lmig_transport::hostile`] (garbage, a 4 GiB frame header, a message before
//! authentication, a truncated handshake, a replayed handshake, a wrong
//! key) and then `--idle` fresh idle connections are opened and held, and
//! at once a genuine [`connect`] is timed: the authentication of all its
//! streams (control, one data, urgent), dialer side, while the listener
//! still works through the flood queued in front of it. The channel then
//! carries a message each way.
//!
//! * `handshake_ms_min` / `_median` / `_max`: the timed connects over `--runs`.
//! * `rejected`, `evicted`, `timed_out`: the listener's counters at the end
//!   ([`lmig_transport::ListenerStats`]).
//! * `valid_ok`: every genuine connect produced a working channel.
//!
//! Goal: with 1,000 idle connections held, a valid handshake completes
//! within 2 s (it took up to 28 s when handshakes were serial).

use std::error::Error;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use lmig_core::Channel;
use lmig_core::protocol::Message;
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, connect};
use serde_json::json;

use super::{Output, round};
use lmig_transport::hostile;

/// Options of the `hostile` scenario.
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// Idle connections held open during each run.
    #[arg(long, default_value_t = 1000)]
    pub idle: usize,
    /// Timed genuine connects (each behind a fresh flood).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

/// The soft limit on open files, raised to `needed` (with `prlimit`) if it
/// is lower.
fn enough_files(needed: u64) -> Result<(), Box<dyn Error>> {
    let soft = || -> Option<u64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse().ok()
    };
    if soft().is_some_and(|s| s >= needed) {
        return Ok(());
    }
    let _ = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={needed}:"),
        ])
        .status();
    if soft().is_some_and(|s| s >= needed) {
        Ok(())
    } else {
        Err(format!("{needed} open files needed; raise `ulimit -n`").into())
    }
}

/// One of each hostile kind (the wrong key runs on its own thread).
fn strangers(
    target: SocketAddr,
    recorded: &[u8],
) -> Result<(Vec<TcpStream>, thread::JoinHandle<()>), Box<dyn Error>> {
    let held = vec![
        hostile::garbage(target)?,
        hostile::huge_header(target)?,
        hostile::message_before_auth(target)?,
        hostile::truncated(target)?,
        hostile::replay_recorded(target, recorded)?,
    ];
    let wrong = thread::Builder::new()
        .name("hostile-wrong-key".into())
        .spawn(move || {
            let _ = hostile::wrong_key(target);
        })?;
    Ok((held, wrong))
}

/// A genuine connect amid the flood: its duration and whether the channel works.
fn timed_connect(
    listener: &Listener,
    target: SocketAddr,
    config: &ChannelConfig,
) -> (Duration, bool) {
    let config = config.clone();
    let t = Instant::now();
    let dialer = thread::spawn(move || {
        let r = connect(&Endpoint::Tcp(target), config);
        (t.elapsed(), r)
    });
    let accepted = listener.accept_timeout(Duration::from_secs(60));
    let Ok((took, dialed)) = dialer.join() else {
        return (t.elapsed(), false);
    };
    let ok = match (dialed, accepted) {
        (Ok(a), Ok(b)) => {
            a.send(&Message::Ready).is_ok()
                && matches!(
                    b.recv(Some(Duration::from_secs(10))),
                    Ok(Some(Message::Ready))
                )
                && b.send(&Message::Commit).is_ok()
                && matches!(
                    a.recv(Some(Duration::from_secs(10))),
                    Ok(Some(Message::Commit))
                )
        }
        _ => false,
    };
    (took, ok)
}

/// Run the scenario.
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn Error>> {
    enough_files(2 * args.idle as u64 + 1024)?;
    let key = AuthKey::generate()?;
    let config = ChannelConfig::new(key.clone());
    let listener = Listener::bind(&Endpoint::Tcp(([127, 0, 0, 1], 0).into()), config.clone())?;
    let Endpoint::Tcp(target) = listener.local_endpoint().clone() else {
        return Err("a TCP listener has a TCP endpoint".into());
    };
    let recorded = hostile::record_handshake(&key)?;
    let mut ms = Vec::new();
    let mut valid_ok = true;
    for _ in 0..args.runs.max(1) {
        let (held, wrong) = strangers(target, &recorded)?;
        let flood = hostile::idle_many(target, args.idle)?;
        let (took, ok) = timed_connect(&listener, target, &config);
        ms.push(took.as_secs_f64() * 1e3);
        valid_ok &= ok;
        let _ = wrong.join();
        drop(held);
        drop(flood);
    }
    // The last flood was closed: let its handshakes end, so the counters add up.
    for _ in 0..300 {
        if listener.stats().in_flight == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let stats = listener.stats();
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    out.emit(&json!({
        "scenario": "hostile",
        "idle_conns": args.idle,
        "runs": sorted.len(),
        "handshake_ms": ms.iter().map(|m| round(*m, 2)).collect::<Vec<_>>(),
        "handshake_ms_min": round(sorted[0], 2),
        "handshake_ms_median": round(sorted[sorted.len() / 2], 2),
        "handshake_ms_max": round(sorted[sorted.len() - 1], 2),
        "accepted": stats.accepted,
        "authenticated": stats.authenticated,
        "rejected": stats.rejected,
        "evicted": stats.evicted,
        "timed_out": stats.timed_out,
        "in_flight": stats.in_flight,
        "valid_ok": valid_ok,
    }));
    Ok(())
}
