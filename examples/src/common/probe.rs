//! The whole machine's kernel probe: lmig-mem's and lmig-net's parts in one
//! [`Report`], and its JSON form. `kvd check` and `lmig-bench probe` print it.

use lmig_core::probe::{Capability, Report, Verdict};
use serde_json::{Value, json};

/// Probe dirty tracking, post-copy, TCP repair, the network lock, raw and
/// packet sockets and `pidfd_getfd` (in the calling thread's network namespace).
pub fn machine() -> Report {
    let mut report = lmig_mem::probe();
    report.extend(lmig_net::probe());
    report
}

/// One object per capability: `capability`, `status` (`OK`, `degraded`,
/// `missing`), `detail` and, unless OK, `fix`.
pub fn to_json(report: &Report) -> Value {
    let caps: Vec<Value> = report
        .findings()
        .iter()
        .map(|f| {
            let (detail, fix) = match &f.verdict {
                Verdict::Ok { detail } => (detail.as_str(), None),
                Verdict::Degraded { detail, fix } => (detail.as_str(), Some(fix.as_str())),
                Verdict::Missing { what, fix } => (what.as_str(), Some(fix.as_str())),
                _ => (f.verdict.status().label(), f.verdict.fix()),
            };
            json!({
                "capability": f.capability.name(),
                "status": f.verdict.status().label(),
                "detail": detail,
                "fix": fix,
            })
        })
        .collect();
    json!({ "capabilities": caps, "all_ok": report.usable(Capability::ALL) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_status_detail_and_fix() {
        let mut r = Report::new();
        r.push(Capability::TcpRepair, Verdict::ok("works"));
        r.push(
            Capability::RawSockets,
            Verdict::missing("socket(SOCK_RAW) refused", "grant CAP_NET_RAW"),
        );
        let v = to_json(&r);
        assert_eq!(v["all_ok"], false);
        assert_eq!(v["capabilities"][0]["capability"], "tcp-repair");
        assert_eq!(v["capabilities"][0]["status"], "OK");
        assert_eq!(v["capabilities"][0]["fix"], Value::Null);
        assert_eq!(v["capabilities"][1]["status"], "missing");
        assert_eq!(v["capabilities"][1]["detail"], "socket(SOCK_RAW) refused");
        assert_eq!(v["capabilities"][1]["fix"], "grant CAP_NET_RAW");
    }
}
