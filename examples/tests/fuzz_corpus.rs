//! Replays the fuzz targets of `lmig_examples::fuzzing` (kvd's RESP parser
//! and state decoder, the destination session) over their checked-in corpus
//! (`fuzz/corpus/<target>/`) plus a bounded run of mutated seeds, on stable.
//!
//! `LMIG_WRITE_CORPUS=1` (re)writes the seed files.

use std::path::PathBuf;

use lmig_examples::fuzzing::{TARGETS, dest_session, run, seeds};

#[test]
fn every_example_target_survives_its_corpus_and_mutations() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    lmig_core::testing::replay_fuzz_corpus(&corpus, TARGETS, seeds, run, 300);
}

/// The session target reaches deep states: its longest seed (a whole
/// pre-copy session) commits, the shorter ones do not.
#[test]
fn the_session_seeds_reach_commit() {
    let seeds = seeds("dest_session");
    let (last, rest) = seeds.split_last().expect("seeds");
    assert!(dest_session(last), "the whole session commits");
    for s in rest {
        assert!(!dest_session(s), "a cut session does not");
    }
}

/// `fuzz/targets.txt` (what CI fuzzes) lists every target of both crates
/// and nothing else, each with its source file.
#[test]
fn targets_file_lists_every_target() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let listed = std::fs::read_to_string(root.join("targets.txt")).expect("fuzz/targets.txt");
    let listed: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
    let all: Vec<&str> = lmig_transport::fuzzing::TARGETS
        .iter()
        .chain(lmig_net::fuzzing::TARGETS)
        .chain(TARGETS)
        .copied()
        .collect();
    assert_eq!(listed, all);
    for t in &all {
        let src = root.join(format!("fuzz_targets/{t}.rs"));
        assert!(src.exists(), "missing {}", src.display());
    }
}
