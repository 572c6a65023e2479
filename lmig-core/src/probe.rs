//! What a machine offers for live migration, as `criu check` tells it: one
//! [`Verdict`] per [`Capability`], gathered in a [`Report`].
//!
//! This module only holds the types and their table; the probes that fill
//! them touch the kernel and live in the OS crates (`lmig_mem::probe` for
//! dirty tracking and post-copy, `lmig_net::probe` for TCP repair, the
//! network lock, raw and packet sockets and `pidfd_getfd`). A program
//! combines their parts with [`Report::extend`] and decides with
//! [`Report::usable`] whether what it needs is there.
//!
//! ```
//! use lmig_core::probe::{Capability, Report, Verdict};
//! let mut report = Report::new();
//! report.push(Capability::TcpRepair, Verdict::ok("TCP_REPAIR on a fresh socket"));
//! report.push(
//!     Capability::NetworkLock,
//!     Verdict::missing("NFQUEUE bind refused (EPERM)", "run as root or grant CAP_NET_ADMIN"),
//! );
//! assert!(report.usable(&[Capability::TcpRepair]));
//! assert!(!report.usable(&[Capability::TcpRepair, Capability::NetworkLock]));
//! println!("{report}"); // a table: capability, status, detail or fix
//! ```

use std::fmt;

/// A kernel feature or privilege live migration uses.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Capability {
    /// Finding the pages written since the last round (pre-copy).
    DirtyTracking,
    /// Serving missing pages on demand on the destination (userfaultfd).
    PostCopy,
    /// Capturing and restoring TCP connections (`TCP_REPAIR`).
    TcpRepair,
    /// Holding the service addresses' packets during the freeze
    /// (nftables + NFQUEUE).
    NetworkLock,
    /// Raw IP sockets (re-injecting held packets, FINs, ICMPv6 announces).
    RawSockets,
    /// Packet sockets (gratuitous ARP when the service address moves).
    PacketSockets,
    /// Taking a socket from another process (`pidfd_getfd`).
    PidfdGetfd,
}

impl Capability {
    /// Every capability, in the order a report lists them.
    pub const ALL: &'static [Capability] = &[
        Self::DirtyTracking,
        Self::PostCopy,
        Self::TcpRepair,
        Self::NetworkLock,
        Self::RawSockets,
        Self::PacketSockets,
        Self::PidfdGetfd,
    ];

    /// Its short name in a report, e.g. `"tcp-repair"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::DirtyTracking => "dirty-tracking",
            Self::PostCopy => "post-copy",
            Self::TcpRepair => "tcp-repair",
            Self::NetworkLock => "network-lock",
            Self::RawSockets => "raw-sockets",
            Self::PacketSockets => "packet-sockets",
            Self::PidfdGetfd => "pidfd-getfd",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The three answers a probe can give, without their words.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Works as lmig wants it.
    Ok,
    /// Works, but a weaker way (a fallback tracker, user-mode faults only).
    Degraded,
    /// Does not work here.
    Missing,
}

impl Status {
    /// `"OK"`, `"degraded"` or `"missing"`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Degraded => "degraded",
            Self::Missing => "missing",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What a probe found for one capability.
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// It works; `detail` says how (e.g. which tracker and why).
    Ok {
        /// How it works here.
        detail: String,
    },
    /// It works a weaker way; `fix` says what would give the full one.
    Degraded {
        /// What works and what does not.
        detail: String,
        /// What to do for the full feature, e.g. `"Linux >= 6.7 for UFFD_FEATURE_WP_ASYNC"`.
        fix: String,
    },
    /// It does not work; `what` names the feature that failed, `fix` the remedy.
    Missing {
        /// The feature and how it failed, e.g. `"TCP_REPAIR refused (EPERM)"`.
        what: String,
        /// What to do, e.g. `"run as root or grant CAP_NET_ADMIN"`.
        fix: String,
    },
}

impl Verdict {
    /// [`Verdict::Ok`].
    pub fn ok(detail: impl Into<String>) -> Self {
        Self::Ok {
            detail: detail.into(),
        }
    }

    /// [`Verdict::Degraded`].
    pub fn degraded(detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::Degraded {
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    /// [`Verdict::Missing`].
    pub fn missing(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::Missing {
            what: what.into(),
            fix: fix.into(),
        }
    }

    /// Which of the three it is.
    pub fn status(&self) -> Status {
        match self {
            Self::Ok { .. } => Status::Ok,
            Self::Degraded { .. } => Status::Degraded,
            Self::Missing { .. } => Status::Missing,
        }
    }

    /// Whether the capability can be used at all (OK or degraded).
    pub fn is_usable(&self) -> bool {
        self.status() != Status::Missing
    }

    /// The remedy, when there is one (degraded or missing).
    pub fn fix(&self) -> Option<&str> {
        match self {
            Self::Ok { .. } => None,
            Self::Degraded { fix, .. } | Self::Missing { fix, .. } => Some(fix),
        }
    }
}

impl fmt::Display for Verdict {
    /// One line: the detail, then the fix (`"…; fix: …"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok { detail } => f.write_str(detail),
            Self::Degraded { detail, fix } => write!(f, "{detail}; for the full feature: {fix}"),
            Self::Missing { what, fix } => write!(f, "{what}; fix: {fix}"),
        }
    }
}

/// One capability's verdict.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Finding {
    /// The capability probed.
    pub capability: Capability,
    /// What the probe found.
    pub verdict: Verdict,
}

/// The verdicts of one or several probes, at most one per capability.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    findings: Vec<Finding>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record `verdict` for `capability` (replacing an earlier one).
    pub fn push(&mut self, capability: Capability, verdict: Verdict) {
        if let Some(f) = self
            .findings
            .iter_mut()
            .find(|f| f.capability == capability)
        {
            f.verdict = verdict;
        } else {
            self.findings.push(Finding {
                capability,
                verdict,
            });
        }
    }

    /// Add every verdict of `other` (another crate's part).
    pub fn extend(&mut self, other: Report) {
        for f in other.findings {
            self.push(f.capability, f.verdict);
        }
    }

    /// The verdicts, in the order they were recorded.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// The verdict for `capability`, if it was probed.
    pub fn get(&self, capability: Capability) -> Option<&Verdict> {
        self.findings
            .iter()
            .find(|f| f.capability == capability)
            .map(|f| &f.verdict)
    }

    /// The capabilities of `needed` that are missing or were not probed.
    pub fn lacking(&self, needed: &[Capability]) -> Vec<Capability> {
        needed
            .iter()
            .copied()
            .filter(|&c| !self.get(c).is_some_and(Verdict::is_usable))
            .collect()
    }

    /// Whether every capability of `needed` was probed and is usable (OK or degraded).
    pub fn usable(&self, needed: &[Capability]) -> bool {
        self.lacking(needed).is_empty()
    }
}

impl fmt::Display for Report {
    /// A table, one line per capability: name, status, then the detail or
    /// how to fix it. Columns are padded to the longest entry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEAD: [&str; 3] = ["capability", "status", "detail / how to fix"];
        let name_w = self
            .findings
            .iter()
            .map(|x| x.capability.name().len())
            .chain([HEAD[0].len()])
            .max()
            .unwrap_or(0);
        let status_w = [Status::Ok, Status::Degraded, Status::Missing]
            .iter()
            .map(|s| s.label().len())
            .chain([HEAD[1].len()])
            .max()
            .unwrap_or(0);
        writeln!(f, "{:name_w$}  {:status_w$}  {}", HEAD[0], HEAD[1], HEAD[2])?;
        for x in &self.findings {
            writeln!(
                f,
                "{:name_w$}  {:status_w$}  {}",
                x.capability.name(),
                x.verdict.status().label(),
                x.verdict
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_lines_name_the_fix() {
        assert_eq!(Verdict::ok("uffd-wp").to_string(), "uffd-wp");
        assert_eq!(
            Verdict::missing(
                "TCP_REPAIR refused (EPERM)",
                "run as root or grant CAP_NET_ADMIN"
            )
            .to_string(),
            "TCP_REPAIR refused (EPERM); fix: run as root or grant CAP_NET_ADMIN"
        );
        assert_eq!(
            Verdict::degraded("soft-dirty", "Linux >= 6.7 for UFFD_FEATURE_WP_ASYNC").to_string(),
            "soft-dirty; for the full feature: Linux >= 6.7 for UFFD_FEATURE_WP_ASYNC"
        );
        assert_eq!(Verdict::ok("x").fix(), None);
        assert_eq!(Verdict::missing("x", "y").fix(), Some("y"));
        assert!(Verdict::degraded("x", "y").is_usable());
        assert!(!Verdict::missing("x", "y").is_usable());
    }

    #[test]
    fn table_pads_columns_and_lists_in_order() {
        let mut r = Report::new();
        r.push(Capability::PidfdGetfd, Verdict::ok("own process"));
        r.push(
            Capability::NetworkLock,
            Verdict::missing("NFQUEUE bind refused", "modprobe nfnetlink_queue"),
        );
        r.push(
            Capability::DirtyTracking,
            Verdict::degraded("soft-dirty", "Linux >= 6.7"),
        );
        let table = r.to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "capability      status    detail / how to fix",
                "pidfd-getfd     OK        own process",
                "network-lock    missing   NFQUEUE bind refused; fix: modprobe nfnetlink_queue",
                "dirty-tracking  degraded  soft-dirty; for the full feature: Linux >= 6.7",
            ]
        );
        assert_eq!(
            Report::new().to_string(),
            "capability  status    detail / how to fix\n"
        );
    }

    #[test]
    fn push_replaces_and_usable_needs_every_capability() {
        let mut r = Report::new();
        r.push(Capability::TcpRepair, Verdict::missing("EPERM", "root"));
        r.push(Capability::TcpRepair, Verdict::ok("works"));
        assert_eq!(r.findings().len(), 1);
        assert!(r.usable(&[Capability::TcpRepair]));
        // Not probed counts as lacking.
        assert_eq!(
            r.lacking(&[Capability::TcpRepair, Capability::PostCopy]),
            [Capability::PostCopy]
        );
        let mut other = Report::new();
        other.push(
            Capability::PostCopy,
            Verdict::degraded("user mode only", "CAP_SYS_PTRACE"),
        );
        other.push(Capability::TcpRepair, Verdict::missing("EPERM", "root"));
        r.extend(other);
        assert_eq!(r.findings().len(), 2);
        assert!(r.usable(&[Capability::PostCopy]));
        assert!(!r.usable(&[Capability::TcpRepair]));
        assert_eq!(Capability::ALL.len(), 7);
    }
}
