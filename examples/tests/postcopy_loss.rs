//! `lmig-bench postcopy --lose-source-at-pct`, end to end with real
//! processes and real userfaultfd: the source process is killed (`SIGKILL`,
//! by its pid) once 40% of the pages are in, and the destination must report
//! `paused` with the pages still missing and not one wrong page read; with
//! `--source-returns-after-ms`, the cut link heals and the migration ends
//! recovered and verified.

use std::process::Command;

fn bench(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_lmig-bench"))
        .args([
            "postcopy",
            "--mib=32",
            "--workload=random",
            "--lose-source-at-pct=40",
            "--json",
        ])
        .args(extra)
        .output()
        .expect("run lmig-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lmig-bench {extra:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn a_killed_source_pauses_postcopy_and_never_yields_a_wrong_page() {
    if !lmig_core::testing::privileged(
        "post-copy source loss",
        "userfaultfd with kernel-mode faults",
    ) {
        return;
    }
    let lost = bench(&[]);
    println!("killed: {lost}");
    assert_eq!(lost["source_killed"], true, "{lost}");
    assert_eq!(lost["wrong_pages"], 0, "{lost}");
    // Killed at 40%: unless every page arrived first, some are missing,
    // and the program's reader waits for one of them.
    match lost["outcome"].as_str() {
        Some("paused") => {
            assert!(lost["missing_pages"].as_u64().unwrap() > 0, "{lost}");
            assert_eq!(lost["reader_blocked"], true, "{lost}");
        }
        Some("completed") => assert_eq!(lost["missing_pages"], 0, "{lost}"),
        _ => panic!("unexpected outcome: {lost}"),
    }

    let back = bench(&["--source-returns-after-ms=2000"]);
    println!("returns: {back}");
    assert_eq!(back["outcome"], "recovered", "{back}");
    assert_eq!(back["recovered"], true, "{back}");
    assert_eq!(back["verified"], true, "{back}");
    assert_eq!(back["wrong_pages"], 0, "{back}");
    assert_eq!(back["missing_pages"], 0, "{back}");
}
