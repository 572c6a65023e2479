//! Link cuts in network namespaces: the source runs in host A and the
//! destination in host B of an [`lmig_net::topology::Topology`], over
//! `lmig-transport`'s encrypted TCP channel between their addresses; when
//! the source's session enters a phase, A's link (`eth0`) goes down (with
//! netlink), so both sides meet silence, not a reset, and must end by
//! their timeouts. The same checks as the message faults follow; the link
//! comes back up before the next point and the namespaces are removed at
//! the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use lmig_core::session::{Destination, Mode};
use lmig_core::testing::NullProgram;
use lmig_core::{Event, Observer};
use lmig_net::topology::Topology;
use lmig_transport::{Endpoint, Listener, connect};

use super::check::{Verdict, check};
use super::kill::{POINTS, PhaseTest};
use super::run::{Case, Observed, UffdUse, read_all, read_placed, state};
use super::wire::config;
use super::{Args, Summary, TIMEOUT};

/// Sets host A's link down (from the source's thread, inside A) or up.
fn link(up: bool) -> bool {
    lmig_net::topology::set_link_here("eth0", up).is_ok()
}

/// Cuts the link at the first event of a phase `when` accepts.
struct CutAt {
    when: PhaseTest,
    done: AtomicBool,
}

impl Observer for CutAt {
    fn event(&self, event: &Event) {
        if let Event::Phase { phase, .. } = event {
            if (self.when)(phase) && !self.done.swap(true, Ordering::SeqCst) {
                link(false);
            }
        }
    }
}

/// Every link-cut point of `mode`, in one topology.
pub fn link_faults(
    args: &Args,
    mode: Mode,
    sum: &mut Summary,
    progress: &mut dyn FnMut(&str, &Verdict),
) {
    let before = own_namespaces();
    let topo = match Topology::new() {
        Ok(t) => std::sync::Arc::new(t),
        Err(e) => {
            sum.points += 1;
            sum.failures
                .push(format!("{mode:?} link cuts: no topology: {e}"));
            return;
        }
    };
    let case = Case::new(args.pages, mode);
    for (name, when) in POINTS {
        // Setup is over before the first message: a cut there is a cut in a round.
        let what = format!("{mode:?} link cut at {name}");
        if name == "setup" || !args.wants(&what) {
            continue;
        }
        let t = topo.clone();
        let v = super::point::bounded(&what, args.point_timeout(), move || cut(&t, case, when))
            .unwrap_or_else(Some);
        if topo.a.set_link("eth0", true).is_err() {
            sum.failures.push(format!(
                "{mode:?} link cut at {name}: the link did not come back up"
            ));
        }
        if let Some(v) = v {
            progress(&what, &v);
            sum.add("link-cut", &what, v);
        }
    }
    // Every namespace of the topology goes with it (unless a point hung
    // holding it: then that point failed already, and this says so too).
    drop(topo);
    let left = own_namespaces().saturating_sub(before);
    if left > 0 {
        sum.leaks += left as u64;
        sum.failures.push(format!(
            "{mode:?} link cuts: {left} network namespace(s) of this process left behind"
        ));
    }
}

/// Network namespaces of this process (their names carry its pid) in
/// `/run/netns`.
pub(super) fn own_namespaces() -> usize {
    let own = format!("lmig{}-", std::process::id());
    std::fs::read_dir("/run/netns").map_or(0, |d| {
        d.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&own))
            .count()
    })
}

/// One migration from A to B with A's link cut at `when`; `None` when the
/// session never entered that phase.
fn cut(topo: &Topology, case: Case, when: PhaseTest) -> Option<Verdict> {
    let before = UffdUse::now();
    let (port_tx, port_rx) = mpsc::channel();
    let dst = topo
        .b
        .spawn_thread(move || {
            let l = Listener::bind(
                &Endpoint::Tcp(SocketAddr::new(Topology::B_V4.into(), 0)),
                config(),
            )
            .ok()?;
            let Endpoint::Tcp(addr) = l.local_endpoint().clone() else {
                return None;
            };
            let _ = port_tx.send(addr.port());
            let ch = l.accept_timeout(TIMEOUT * 5).ok()?;
            let regions = case.destination_regions();
            let mut prog = NullProgram::default();
            let r = Destination::new(&ch, &*regions, &mut prog)
                .with_config(case.destination_config())
                .run();
            lmig_core::Channel::shutdown(&ch);
            let mut paused = false;
            let pages = regions.regions().map(|set| {
                let (pages, p) = read_placed(set, case.pages);
                paused = p;
                pages
            });
            Some((r, prog, pages, paused))
        })
        .ok()?;
    let port = port_rx.recv_timeout(TIMEOUT * 5).ok()?;
    let src = topo
        .a
        .spawn_thread(move || {
            let set = case.source_regions();
            let image = read_all(&set, case.pages);
            let mut prog = NullProgram::with_state(state());
            let cut = CutAt {
                when,
                done: AtomicBool::new(false),
            };
            let to = Endpoint::Tcp(SocketAddr::new(Topology::B_V4.into(), port));
            let r = connect(&to, config()).ok().map(|ch| {
                let r = case.run_source(&ch, &set, &mut prog, |e: &Event| cut.event(e));
                lmig_core::Channel::shutdown(&ch);
                r
            });
            let confirmed = prog.committed && matches!(r, Some(Ok(_)));
            let after = (!confirmed).then(|| read_all(&set, case.pages));
            let again = case.again_if_unconfirmed(r.as_ref(), &set);
            (
                r,
                prog,
                image,
                after,
                again,
                cut.done.load(Ordering::SeqCst),
            )
        })
        .ok()?;
    let (src_r, src_prog, image, src_after, again, fired) = src.join().ok()?.ok()?;
    let d = dst.join().ok()?.ok()?;
    if !fired {
        return None;
    }
    let (dst_r, dst_prog, dst_pages, dst_paused) = match d {
        Some((r, p, pages, paused)) => (Some(r), p, pages, paused),
        None => (None, NullProgram::default(), None, false),
    };
    let obs = Observed {
        mode: case.mode,
        src: src_r,
        dst: dst_r,
        src_prog,
        dst_prog,
        state: state(),
        image,
        src_after,
        again,
        dst_pages,
        dst_paused,
        uffds: (before, UffdUse::now()),
    };
    Some(check(&obs))
}
