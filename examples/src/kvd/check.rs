//! `kvd check`: what this machine offers kvd, as `criu check` tells it. One
//! line per capability (OK / degraded / missing, and the detail or how to
//! fix it); exits 0 when everything kvd uses is there, 1 otherwise.
//!
//! kvd uses dirty tracking and TCP repair in every migration, post-copy in
//! its `postcopy` and `hybrid` modes, and the network lock, raw and packet
//! sockets when its service address moves (`--service-if`). `pidfd_getfd`
//! is listed for embedders; kvd does not need it.

use lmig_core::probe::{Capability, Report};

use crate::common::probe::machine;

/// What kvd uses, with when.
pub const KVD_NEEDS: [(Capability, &str); 6] = [
    (
        Capability::DirtyTracking,
        "every migration (pre-copy rounds)",
    ),
    (
        Capability::TcpRepair,
        "every migration (client connections)",
    ),
    (Capability::PostCopy, "migrate ... postcopy | hybrid"),
    (
        Capability::NetworkLock,
        "--service-if (packets held at the freeze)",
    ),
    (
        Capability::RawSockets,
        "--service-if (held packets re-injected)",
    ),
    (Capability::PacketSockets, "--service-if (gratuitous ARP)"),
];

/// The verdict text `kvd check` prints for `report`: the table, then one
/// line per capability kvd needs that is missing (or the all-clear).
pub fn render(report: &Report) -> (String, bool) {
    let mut text = report.to_string();
    let needed: Vec<Capability> = KVD_NEEDS.iter().map(|(c, _)| *c).collect();
    let lacking = report.lacking(&needed);
    text.push('\n');
    if lacking.is_empty() {
        text.push_str("kvd: everything it needs is here\n");
    } else {
        for c in &lacking {
            let when = KVD_NEEDS
                .iter()
                .find(|(k, _)| k == c)
                .map_or("", |(_, w)| *w);
            text.push_str(&format!("kvd: missing {c}, needed for {when}\n"));
        }
    }
    (text, lacking.is_empty())
}

/// Run the probe, print the table, return the exit code (0 all there, 1 not).
pub fn run() -> i32 {
    let (text, ok) = render(&machine());
    print!("{text}");
    if ok { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmig_core::probe::Verdict;

    #[test]
    fn names_what_is_missing_and_what_for() {
        let mut r = Report::new();
        for (c, _) in KVD_NEEDS {
            r.push(c, Verdict::ok("fine"));
        }
        let (text, ok) = render(&r);
        assert!(ok, "{text}");
        assert!(
            text.ends_with("kvd: everything it needs is here\n"),
            "{text}"
        );
        // Degraded still counts as there; missing does not.
        r.push(
            Capability::DirtyTracking,
            Verdict::degraded("soft-dirty", "Linux >= 6.7"),
        );
        r.push(
            Capability::TcpRepair,
            Verdict::missing("EPERM", "grant CAP_NET_ADMIN"),
        );
        let (text, ok) = render(&r);
        assert!(!ok);
        assert!(
            text.contains("tcp-repair      missing   EPERM; fix: grant CAP_NET_ADMIN"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "kvd: missing tcp-repair, needed for every migration (client connections)\n"
            ),
            "{text}"
        );
    }
}
