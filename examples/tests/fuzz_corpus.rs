//! Replays the fuzz targets of `lmig_examples::fuzzing` (kvd's RESP parser
//! and state decoder, the destination session) over their checked-in corpus
//! (`fuzz/corpus/<target>/`) plus a bounded run of mutated seeds, on stable.
//!
//! `LMIG_WRITE_CORPUS=1` (re)writes the seed files.

use std::path::PathBuf;

use lmig_examples::fuzzing::{TARGETS, dest_session, run, seeds};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(4) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let cut = rng.below(v.len() + 1);
                v.truncate(cut);
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            _ if v.len() >= 8 => {
                let i = rng.below(v.len() - 7);
                let x: u64 = [0, 1, 0xff, 0xffff_ffff, u64::MAX][rng.below(5)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

#[test]
fn every_example_target_survives_its_corpus_and_mutations() {
    let write = std::env::var("LMIG_WRITE_CORPUS").as_deref() == Ok("1");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for target in TARGETS {
        let dir = corpus_dir(target);
        let seeds = seeds(target);
        assert!(!seeds.is_empty(), "{target} has seeds");
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
            }
        }
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (LMIG_WRITE_CORPUS=1 writes it)", dir.display()))
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert!(!inputs.is_empty(), "{target}: empty corpus");
        inputs.extend(seeds.iter().cloned());
        let mutated: Vec<Vec<u8>> = (0..200)
            .map(|_| {
                let seed = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, seed)
            })
            .collect();
        for input in inputs.iter().chain(&mutated) {
            assert!(run(target, input), "{target} is a target");
        }
    }
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
