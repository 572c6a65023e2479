//! The properties checked after every fault point.

use lmig_core::session::Mode;

use super::run::Observed;

/// Known failure: the destination failed after `Ready` while `Commit` was
/// in flight (or lost it): neither side may run the program.
pub const COMMIT_WINDOW: &str = "commit-window";

/// What one fault point showed.
#[derive(Debug, Default, Clone)]
#[non_exhaustive]
pub struct Verdict {
    /// Properties that did not hold (empty: passed).
    pub problems: Vec<String>,
    /// Why this point cannot pass yet (a known failure, not a pass): a
    /// short key ([`COMMIT_WINDOW`]) and the details.
    pub known: Option<(&'static str, String)>,
    /// Pages that differ from the source's image.
    pub wrong_pages: u64,
    /// Program-state bytes missing on the side that runs.
    pub lost_bytes: u64,
    /// Userfaultfds or registrations left behind.
    pub leaks: u64,
    /// `Commit` had been sent.
    pub committed: bool,
    /// The transport reported an integrity error (wire faults).
    pub integrity: bool,
    /// The message the fault hit (message faults).
    pub hit: Option<String>,
}

/// Pages of `b` that differ from `a`; an empty page of `b` is one still
/// missing in a paused post-copy (not read, never wrong).
fn wrong(a: &[Vec<u8>], b: &[Vec<u8>]) -> u64 {
    if a.len() != b.len() {
        return a.len().max(b.len()) as u64;
    }
    a.iter()
        .zip(b)
        .filter(|(x, y)| !y.is_empty() && x != y)
        .count() as u64
}

/// A post-copy that lost its source after Commit must end paused, with the
/// typed error saying how many pages are still missing.
pub(super) fn expect_paused(v: &mut Verdict, err: Option<&lmig_core::MigrationError>) {
    match err.map(lmig_core::MigrationError::cause) {
        Some(lmig_core::MigrationError::PostcopyPaused { .. }) => {}
        other => v.problems.push(format!(
            "post-copy lost its source with pages missing, yet the destination did not report \
             PostcopyPaused: {other:?}"
        )),
    }
}

fn err_text<T>(r: &Option<lmig_core::Result<T>>) -> Option<String> {
    match r {
        Some(Err(e)) => Some(e.to_string()),
        _ => None,
    }
}

/// Check `o` against the suite's rules (see the module docs of `faults`).
pub fn check(o: &Observed) -> Verdict {
    let mut v = Verdict {
        committed: o.src_prog.committed,
        ..Verdict::default()
    };
    let errors: Vec<String> = [err_text(&o.src), err_text(&o.dst)]
        .into_iter()
        .flatten()
        .collect();
    v.integrity = errors.iter().any(|e| {
        let e = e.to_lowercase();
        e.contains("integrity") || e.contains("authentic") || e.contains("decrypt")
    });
    let state_len = o.state.data.len() as u64;
    // A region set dropped with pages missing (post-copy paused after
    // Commit) keeps its userfaultfd on purpose: its readers stay blocked.
    let kept = usize::from(o.dst_paused && o.dst_prog.committed);
    if o.uffds.1 > o.uffds.0 + kept {
        let n = o.uffds.1 - o.uffds.0 - kept;
        v.leaks += n as u64;
        v.problems.push(format!("{n} userfaultfd(s) left open"));
    }
    if !v.committed {
        before_commit(o, &mut v, state_len);
    } else {
        after_commit(o, &mut v, state_len);
    }
    v
}

fn before_commit(o: &Observed, v: &mut Verdict, state_len: u64) {
    if matches!(o.src, Some(Ok(_))) {
        v.problems
            .push("the source reported success without Commit".into());
    }
    if o.src_prog.is_paused() {
        v.problems.push(format!(
            "source program left paused (paused {}, resumed {})",
            o.src_prog.paused, o.src_prog.resumed
        ));
    }
    if o.src_prog.state.as_ref() != Some(&o.state) {
        v.lost_bytes += state_len;
        v.problems.push("the source program's state changed".into());
    }
    if let Some(after) = &o.src_after {
        let w = wrong(&o.image, after);
        if w > 0 {
            v.wrong_pages += w;
            v.problems
                .push(format!("{w} source page(s) changed before Commit"));
        }
    }
    if o.dst_prog.committed {
        v.problems
            .push("the destination resumed the program without Commit".into());
    }
    if o.dst_paused {
        v.leaks += 1;
        v.problems.push(
            "the destination left its regions registered for post-copy after an abort".into(),
        );
    }
}

fn after_commit(o: &Observed, v: &mut Verdict, state_len: u64) {
    if !o.dst_prog.committed {
        // The Commit frame left the source but never reached the
        // destination's session: neither side may run the program.
        v.lost_bytes += state_len;
        v.known = Some((
            COMMIT_WINDOW,
            format!(
                "the source sent Commit but the destination's session failed first (after Ready) or lost it: \
                 neither side runs the program (the one-way commit's window; issue 20 item 2 has the source \
                 report the unconfirmed Commit); destination: {}",
                err_text(&o.dst).unwrap_or_else(|| "no error".into())
            ),
        ));
        return;
    }
    if o.dst_prog.state.as_ref() != Some(&o.state) {
        v.lost_bytes += state_len;
        v.problems
            .push("the destination resumed with a different state".into());
    }
    let Some(pages) = &o.dst_pages else {
        v.problems
            .push("the destination resumed without its regions".into());
        return;
    };
    let w = wrong(&o.image, pages);
    if o.dst_paused && o.mode != Mode::Precopy {
        // Post-copy lost its source after Commit: the program runs paused,
        // the pages still missing stay missing (not read here), and the
        // destination says so with a typed error.
        expect_paused(v, o.dst.as_ref().and_then(|r| r.as_ref().err()));
    }
    if w > 0 {
        v.wrong_pages += w;
        v.problems
            .push(format!("{w} destination page(s) differ from the source's"));
    }
}
