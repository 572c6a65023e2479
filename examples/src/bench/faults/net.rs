//! Socket fault points: the program in host A of an
//! [`lmig_net::topology::Topology`] serves TCP connections and a UDP
//! socket on the service address to a client in the client namespace
//! ([`super::conns`]); a migration moves its memory, state and sockets to
//! host B (`NetSource` / `NetSink` inside the network lock and address
//! handoff, `HandoffSource` / `HandoffSink`), the source's session in A and
//! the destination's in B, over an in-process channel pair whose source or
//! destination end breaks, stalls or duplicates at message index k.
//!
//! After each point, besides the memory and state checks of
//! [`super::check`]:
//!
//! * before `Commit`: the source's connections are out of repair mode
//!   (`getsockopt(TCP_REPAIR) == 0`), deliver every byte queued before
//!   the migration and carry a marker each way, the UDP socket delivers
//!   its queued datagram and one each way; the service addresses are on A
//!   only;
//! * after `Commit` with the destination running: the same of the
//!   restored sockets in B, the service addresses on B only;
//! * in the one-way commit window (docs/failures.md): the source released
//!   its sockets and the destination discarded its own; no restored
//!   socket is left, the addresses are on neither host twice;
//! * always: no lock table of this process left in A or B, no
//!   userfaultfd or registration left.
//!
//! Leaks (repair-mode sockets, lock tables, misplaced addresses) count in
//! `leaks`, bytes that did not arrive in `lost_bytes`. Between points the
//! service addresses go back to A.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use lmig_core::Channel;
use lmig_core::session::Mode;
use lmig_core::testing::{Fault, FaultChannel, FaultKind, NullProgram, PairEnd, channel_pair};
use lmig_net::topology::Topology;
use lmig_net::{HandoffSink, HandoffSource, NetSink, NetSource, NetSourceConfig, SinkConfig};

use super::check::{Verdict, check};
use super::conns::{self, CONNS, Client, ProgramSockets, UDP_ID};
use super::run::{Case, End, Observed, UffdUse, read_all, read_placed, state};
use super::{Args, STALL, Summary};

/// Every socket fault point of `mode`, in one topology.
pub fn net_faults(
    args: &Args,
    mode: Mode,
    sum: &mut Summary,
    progress: &mut dyn FnMut(&str, &Verdict),
) {
    let before = super::linkcut::own_namespaces();
    let topo = match Topology::new().and_then(|t| {
        t.add_service_address(&t.a)?;
        Ok(t)
    }) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            sum.points += 1;
            sum.failures
                .push(format!("{mode:?} sockets: no topology: {e}"));
            return;
        }
    };
    let case = Case::new(args.pages, mode);
    let what = format!("{mode:?} sockets fault-free");
    let t = topo.clone();
    let counts = match super::point::bounded(&what, args.point_timeout(), move || {
        net_point(&t, case, End::Source, Fault::never())
    }) {
        Ok((v, counts)) => {
            progress(&what, &v);
            sum.add("sockets none", &what, v);
            if let Err(e) = home(&topo) {
                sum.failures.push(format!(
                    "{what}: the service addresses did not go back to A: {e}"
                ));
                return;
            }
            counts
        }
        Err(v) => {
            progress(&what, &v);
            sum.add("sockets none", &what, v);
            return;
        }
    };
    for end in [End::Source, End::Destination] {
        let n = counts[end as usize];
        for at in 1..=n {
            let every = args.net_every.max(1);
            if at % every != 1 % every && at != n {
                continue;
            }
            let mut kinds = vec![FaultKind::Break, FaultKind::Duplicate];
            if args.net_stalls && (at % args.stall_every.max(1) == 1 || at == n) {
                kinds.push(FaultKind::Stall(STALL));
            }
            for kind in kinds {
                let what = format!("{mode:?} sockets {} {end:?} #{at}/{n}", kind.name());
                if !args.wants(&what) {
                    continue;
                }
                let t = topo.clone();
                let v = super::point::bounded(&what, args.point_timeout(), move || {
                    net_point(&t, case, end, Fault::new(kind, at)).0
                })
                .unwrap_or_else(|v| v);
                let hit = v.hit.clone().unwrap_or_else(|| "-".into());
                let what = format!("{what} ({hit})");
                progress(&what, &v);
                sum.add(&format!("sockets {}", kind.name()), &what, v);
                // The next point starts with the addresses on A.
                if let Err(e) = home(&topo) {
                    sum.failures.push(format!(
                        "{what}: the service addresses did not go back to A: {e}"
                    ));
                }
            }
        }
    }
    drop(topo);
    let left = super::linkcut::own_namespaces().saturating_sub(before);
    if left > 0 {
        sum.leaks += left as u64;
        sum.failures.push(format!(
            "{mode:?} sockets: {left} network namespace(s) of this process left behind"
        ));
    }
}

/// Put the service addresses back on A (after a point that moved them),
/// the neighbour caches flushed as the handoff's announcement would.
fn home(topo: &Topology) -> Result<(), String> {
    let on_a = conns::holds_service(&topo.a)?;
    let on_b = conns::holds_service(&topo.b)?;
    if on_a.len() == 2 && on_b.is_empty() {
        return Ok(());
    }
    // All on B first (none on A), then one move B -> A.
    for (ns, on, want) in [(&topo.a, on_a, false), (&topo.b, on_b, true)] {
        ns.run(move || -> Result<(), String> {
            let eth0 = nix::net::if_::if_nametoindex("eth0").map_err(|e| e.to_string())?;
            for a in conns::service_addrs() {
                let r = match (on.contains(&a.addr), want) {
                    (true, false) => lmig_net::handoff::remove_address(eth0, &a),
                    (false, true) => lmig_net::handoff::add_address(eth0, &a),
                    _ => Ok(()),
                };
                r.map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .map_err(|e| e.to_string())??;
    }
    topo.move_service_address(&topo.b, &topo.a)
        .map_err(|e| e.to_string())
}

/// What the source's side (host A) gives back.
struct SourceSide {
    r: Option<lmig_core::Result<lmig_core::session::SourceReport>>,
    prog: NullProgram,
    image: Vec<Vec<u8>>,
    after: Option<Vec<Vec<u8>>>,
    again: Option<Result<(), String>>,
    /// The source's sockets, when it still holds them (before `Commit`),
    /// with the connections in repair mode.
    held: Option<(Vec<OwnedFd>, Option<OwnedFd>, usize)>,
    /// The handoff could not start.
    setup: Option<String>,
    messages: u32,
    fired: Option<(u32, &'static str)>,
}

/// What the destination's side (host B) gives back.
struct DestSide {
    r: Option<lmig_core::Result<lmig_core::session::DestinationReport>>,
    prog: NullProgram,
    pages: Option<Vec<Vec<u8>>>,
    paused: bool,
    /// The restored sockets taken after the session (`activate` ran).
    fds: std::collections::HashMap<u64, OwnedFd>,
    setup: Option<String>,
    messages: u32,
    fired: Option<(u32, &'static str)>,
}

fn source_side(case: Case, ch: FaultChannel<PairEnd>, sockets: ProgramSockets) -> SourceSide {
    let set = case.source_regions();
    let image = read_all(&set, case.pages);
    let mut prog = NullProgram::with_state(state());
    let mut side = SourceSide {
        r: None,
        prog: NullProgram::default(),
        image,
        after: None,
        again: None,
        held: None,
        setup: None,
        messages: 0,
        fired: None,
    };
    let net = NetSource::new(NetSourceConfig::default()).and_then(|mut n| {
        for (i, fd) in sockets.tcp.into_iter().enumerate() {
            n.add(i as u64, fd)?;
        }
        n.add(UDP_ID, sockets.udp)?;
        Ok(n)
    });
    let mut net = match net {
        Ok(n) => n,
        Err(e) => {
            side.setup = Some(format!("the source's sockets: {e}"));
            return side;
        }
    };
    match HandoffSource::new(&mut net, conns::handoff_config()) {
        Ok(mut h) => {
            side.r =
                Some(case.run_source_with(&ch, &set, &mut prog, lmig_core::NoObserver, &mut h));
            ch.shutdown();
            // The lock goes with the handoff (its forwarder joined).
            drop(h);
        }
        Err(e) => side.setup = Some(format!("the source's handoff: {e}")),
    }
    side.messages = ch.messages();
    side.fired = ch.fired();
    let confirmed = prog.committed && matches!(side.r, Some(Ok(_)));
    side.after = (!confirmed).then(|| read_all(&set, case.pages));
    side.again = case.again_if_unconfirmed(side.r.as_ref(), &set);
    if !prog.committed {
        // Repair mode is read before `into_fds`, which would leave it.
        let repair = (0..CONNS as u64)
            .filter(|&id| net.fd(id).is_some_and(conns::in_repair))
            .count();
        let mut fds = net.into_fds();
        fds.sort_by_key(|(id, _)| *id);
        let udp = fds
            .iter()
            .position(|(id, _)| *id == UDP_ID)
            .map(|p| fds.remove(p).1);
        side.held = Some((fds.into_iter().map(|(_, fd)| fd).collect(), udp, repair));
    }
    side.prog = prog;
    side
}

fn dest_side(case: Case, ch: FaultChannel<PairEnd>) -> DestSide {
    let mut side = DestSide {
        r: None,
        prog: NullProgram::default(),
        pages: None,
        paused: false,
        fds: Default::default(),
        setup: None,
        messages: 0,
        fired: None,
    };
    let sink = NetSink::new(SinkConfig::default())
        .and_then(|n| HandoffSink::new(n, conns::handoff_config()));
    let mut sink = match sink {
        Ok(s) => s,
        Err(e) => {
            side.setup = Some(format!("the destination's sink: {e}"));
            return side;
        }
    };
    let regions = case.destination_regions();
    let mut prog = NullProgram::default();
    let r = lmig_core::session::Destination::new(&ch, &*regions, &mut prog)
        .with_config(case.destination_config())
        .with_sockets(&mut sink)
        .run();
    ch.shutdown();
    side.messages = ch.messages();
    side.fired = ch.fired();
    side.r = Some(r);
    side.fds = sink.inner_mut().take_fds();
    // The held packets released and the lock removed.
    drop(sink);
    side.pages = regions.regions().map(|set| {
        let (pages, p) = read_placed(set, case.pages);
        side.paused = p;
        pages
    });
    drop(regions);
    side.prog = prog;
    side
}

/// One migration of memory, state and sockets from A to B with `fault` at
/// `end`; the verdict and the messages each end handled.
fn net_point(topo: &Topology, case: Case, end: End, fault: Fault) -> (Verdict, [u32; 2]) {
    let failed = |why: String| Verdict {
        problems: vec![why],
        ..Verdict::default()
    };
    let before = UffdUse::now();
    let (mut client, sockets) = match conns::open(topo) {
        Ok(x) => x,
        Err(e) => return (failed(format!("the connections: {e}")), [0, 0]),
    };
    let (a, b) = channel_pair(2);
    let (fs, fd) = match end {
        End::Source => (fault, Fault::never()),
        End::Destination => (Fault::never(), fault),
    };
    let (src_ch, dst_ch) = (FaultChannel::new(a, fs), FaultChannel::new(b, fd));
    let d = topo.b.spawn_thread(move || dest_side(case, dst_ch));
    let s = topo
        .a
        .spawn_thread(move || source_side(case, src_ch, sockets));
    let (s, d) = match (s, d) {
        (Ok(s), Ok(d)) => (s.join(), d.join()),
        _ => return (failed("could not start the hosts' threads".into()), [0, 0]),
    };
    let (Ok(Ok(s)), Ok(Ok(d))) = (s, d) else {
        return (
            failed("a host's thread failed (setns or a panic)".into()),
            [0, 0],
        );
    };
    let counts = [s.messages, d.messages];
    let hit = match end {
        End::Source => s.fired,
        End::Destination => d.fired,
    };
    let obs = Observed {
        mode: case.mode,
        src: s.r,
        dst: d.r,
        src_prog: s.prog,
        dst_prog: d.prog,
        state: state(),
        image: s.image,
        src_after: s.after,
        again: s.again,
        dst_pages: d.pages,
        dst_paused: d.paused,
        uffds: (before, UffdUse::now()),
    };
    let mut v = check(&obs);
    v.hit = hit.map(|(_, name)| name.to_string());
    for e in [s.setup, d.setup].into_iter().flatten() {
        v.problems.push(e);
    }
    sockets_check(topo, &mut v, &mut client, s.held, d.fds, &obs);
    (v, counts)
}

/// The socket rules of the module docs.
fn sockets_check(
    topo: &Topology,
    v: &mut Verdict,
    client: &mut Client,
    held: Option<(Vec<OwnedFd>, Option<OwnedFd>, usize)>,
    mut restored: std::collections::HashMap<u64, OwnedFd>,
    o: &Observed,
) {
    let committed = o.src_prog.committed;
    let runs = o.dst_prog.committed;
    for (host, ns) in [("A", &topo.a), ("B", &topo.b)] {
        match conns::lock_tables(ns) {
            Ok(t) if t.is_empty() => {}
            Ok(t) => v.leak(
                t.len() as u64,
                format!("lock table(s) left in host {host}: {t:?}"),
            ),
            Err(e) => v
                .problems
                .push(format!("listing host {host}'s tables: {e}")),
        }
    }
    let (on_a, on_b) = match (conns::holds_service(&topo.a), conns::holds_service(&topo.b)) {
        (Ok(a), Ok(b)) => (a.len(), b.len()),
        (Err(e), _) | (_, Err(e)) => {
            v.problems.push(format!("listing the addresses: {e}"));
            (0, 0)
        }
    };
    let (want_a, want_b) = match (committed, runs) {
        (false, _) => (2, 0),
        (true, true) => (0, 2),
        (true, false) => (0, 0),
    };
    if (on_a, on_b) != (want_a, want_b) {
        v.leak(
            1,
            format!(
                "service addresses: {on_a} on A and {on_b} on B, expected {want_a} and {want_b}"
            ),
        );
    }
    let x = if !committed {
        let Some((tcp, udp, repair)) = held else {
            v.problems
                .push("the source does not hold its sockets after an abort".into());
            return;
        };
        if repair > 0 {
            v.leak(
                repair as u64,
                format!("{repair} source connection(s) left in repair mode after an abort"),
            );
        }
        if !restored.is_empty() {
            v.leak(
                restored.len() as u64,
                format!(
                    "{} restored socket(s) left in B after an abort",
                    restored.len()
                ),
            );
        }
        conns::exchange(client, tcp, udp)
    } else if runs {
        let tcp: Vec<OwnedFd> = (0..CONNS as u64)
            .filter_map(|id| restored.remove(&id))
            .collect();
        let repair = tcp.iter().filter(|fd| conns::in_repair(fd.as_fd())).count();
        if repair > 0 {
            v.leak(
                repair as u64,
                format!("{repair} restored connection(s) left in repair mode after Commit"),
            );
        }
        let udp = restored.remove(&UDP_ID);
        conns::exchange(client, tcp, udp)
    } else {
        if !restored.is_empty() {
            v.leak(
                restored.len() as u64,
                format!(
                    "{} restored socket(s) left in B after an unconfirmed Commit",
                    restored.len()
                ),
            );
        }
        return;
    };
    v.lost_bytes += x.lost_bytes;
    v.problems.extend(x.problems);
}
