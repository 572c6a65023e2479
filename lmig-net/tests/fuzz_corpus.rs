//! Replays lmig-net's fuzz targets (`lmig_net::fuzzing`: netlink datagrams,
//! NFQUEUE packets, rtnetlink dumps) over their checked-in corpus
//! (`fuzz/corpus/<target>/`) plus a bounded run of mutated seeds, on stable.
//!
//! `LMIG_WRITE_CORPUS=1` (re)writes the seed files.

use std::path::PathBuf;

use lmig_net::fuzzing::{TARGETS, run, seeds};

#[test]
fn every_netlink_target_survives_its_corpus_and_mutations() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    lmig_core::testing::replay_fuzz_corpus(&corpus, TARGETS, seeds, run, 1500);
}
