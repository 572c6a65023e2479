//! The properties checked after every fault point.

use lmig_core::session::Mode;

use super::run::Observed;

/// What one fault point showed.
#[derive(Debug, Default, Clone)]
#[non_exhaustive]
pub struct Verdict {
    /// Properties that did not hold (empty: passed).
    pub problems: Vec<String>,
    /// The one-way commit window (see `lmig_core::protocol`, "The commit
    /// rule"): `Commit` left the source but the destination's session
    /// ended without it. Passed only with the documented outcome: the
    /// destination discarded, the source reported `CommitUnconfirmed`,
    /// never resumed, kept every byte, and refused to migrate again.
    pub unconfirmed: bool,
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
    /// What leaked, one line per kind of leak (also in `problems`).
    pub leaked: Vec<String>,
}

impl Verdict {
    /// Count `n` leaked resources described by `what`.
    pub fn leak(&mut self, n: u64, what: String) {
        self.leaks += n;
        self.leaked.push(what.clone());
        self.problems.push(what);
    }
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

/// Count and describe userfaultfds (`.0`) and registered areas (`.1`)
/// left behind.
pub(super) fn leaks(v: &mut Verdict, (fds, registered): (usize, usize)) {
    if fds > 0 {
        v.leak(fds as u64, format!("{fds} userfaultfd(s) left open"));
    }
    if registered > 0 {
        v.leak(
            registered as u64,
            format!("{registered} memory area(s) left registered with userfaultfd"),
        );
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
    leaks(&mut v, o.uffds.1.beyond(o.uffds.0, kept));
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
        v.leak(
            1,
            "the destination left its regions registered for post-copy after an abort".into(),
        );
    }
}

fn after_commit(o: &Observed, v: &mut Verdict, state_len: u64) {
    if o.src_prog.resumed > 0 {
        v.problems
            .push("the source resumed the program after Commit".into());
    }
    if !o.dst_prog.committed {
        commit_window(o, v, state_len);
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

/// `Commit` left the source, the destination's session ended without it
/// (a link cut after `Ready`, a lost `Commit`, a destination that failed
/// first): neither side runs the program. The documented outcome
/// (`lmig_core::protocol`, "The commit rule") is checked: reported on
/// both sides, nothing lost, nothing left behind.
fn commit_window(o: &Observed, v: &mut Verdict, state_len: u64) {
    v.unconfirmed = true;
    if !matches!(
        o.src,
        Some(Err(lmig_core::MigrationError::CommitUnconfirmed { .. }))
    ) {
        v.problems.push(format!(
            "Commit sent, the destination did not run, yet the source did not report \
             CommitUnconfirmed: {:?}",
            o.src.as_ref().map(|r| r.as_ref().map(|_| ()))
        ));
    }
    match &o.dst {
        Some(Err(e)) if !e.after_commit() => {}
        other => v.problems.push(format!(
            "the destination did not run, yet did not report a failure before Commit: {:?}",
            other.as_ref().map(|r| r.as_ref().map(|_| ()))
        )),
    }
    if o.dst_paused {
        v.leak(
            1,
            "the destination left its regions registered after discarding".into(),
        );
    }
    // The source keeps every byte: its memory and its program's state.
    if o.src_prog.state.as_ref() != Some(&o.state) {
        v.lost_bytes += state_len;
        v.problems.push("the source program's state changed".into());
    }
    match &o.src_after {
        Some(after) => {
            let w = wrong(&o.image, after);
            if w > 0 {
                v.wrong_pages += w;
                v.problems.push(format!(
                    "{w} source page(s) changed after an unconfirmed Commit"
                ));
            }
        }
        None => v
            .problems
            .push("the source's memory was not read after an unconfirmed Commit".into()),
    }
    match &o.again {
        Some(Ok(())) => {}
        Some(Err(why)) => v.problems.push(why.clone()),
        None => v
            .problems
            .push("the source was not asked to migrate again".into()),
    }
}
