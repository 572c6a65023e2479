//! Replays every fuzz target over its checked-in corpus (`fuzz/corpus/<target>/`)
//! plus a bounded pseudo-random run of mutated seeds, on stable.
//!
//! `LMIG_WRITE_CORPUS=1` (re)writes the seed files from the sample messages.

use std::path::PathBuf;

use lmig_transport::fuzzing::{TARGETS, run, seeds};

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
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let cut = rng.below(v.len() + 1);
                v.truncate(cut);
            }
            3 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            _ if v.len() >= 4 => {
                // An interesting length or count somewhere.
                let i = rng.below(v.len() - 3);
                let x: u32 = [0, 1, 0xff, 0xffff, 0x7fff_ffff, u32::MAX][rng.below(6)];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

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
    let write = std::env::var_os("LMIG_WRITE_CORPUS").is_some();
    for target in TARGETS {
        let dir = corpus_dir(target);
        let generated = seeds(target);
        assert!(!generated.is_empty(), "no seeds for {target}");
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in generated.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
            }
        }
        let mut inputs = generated;
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (run with LMIG_WRITE_CORPUS=1)", dir.display()));
        for e in entries {
            inputs.push(std::fs::read(e.unwrap().path()).unwrap());
        }
        for input in &inputs {
            assert!(run(target, input));
        }
        // Bounded random run: 1500 mutations per target, plus pure noise.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        for _ in 0..1500 {
            let seed = &inputs[rng.below(inputs.len())];
            run(target, &mutate(&mut rng, seed));
        }
        for _ in 0..200 {
            let n = rng.below(256);
            let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            run(target, &noise);
        }
    }
}
