//! Replays every fuzz target over its checked-in corpus (`fuzz/corpus/<target>/`)
//! plus a bounded pseudo-random run of mutated seeds, on stable.
//!
//! `LMIG_WRITE_CORPUS=1` (re)writes the seed files from the sample messages.

use std::path::PathBuf;

use lmig_transport::fuzzing::{TARGETS, run, seeds};

#[test]
fn targets_file_lists_every_target() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/targets.txt");
    let listed = std::fs::read_to_string(path).expect("fuzz/targets.txt");
    let listed: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
    // This crate's targets come first; the examples' follow (checked by
    // examples/tests/fuzz_corpus.rs, which sees both lists).
    assert_eq!(&listed[..TARGETS.len().min(listed.len())], TARGETS);
    for t in TARGETS {
        let src =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../fuzz/fuzz_targets/{t}.rs"));
        assert!(src.exists(), "missing {}", src.display());
    }
}

#[test]
fn corpus_and_bounded_random_run() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    lmig_core::testing::replay_fuzz_corpus(&corpus, TARGETS, seeds, run, 1500);
}
