//! Replays lmig-net's fuzz targets (`lmig_net::fuzzing`: netlink datagrams,
//! NFQUEUE packets, rtnetlink dumps) over their checked-in corpus
//! (`fuzz/corpus/<target>/`) plus a bounded run of mutated seeds, on stable.
//!
//! `LMIG_WRITE_CORPUS=1` (re)writes the seed files.

use std::path::PathBuf;

use lmig_net::fuzzing::{TARGETS, run, seeds};

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

#[test]
fn every_netlink_target_survives_its_corpus_and_mutations() {
    let write = std::env::var("LMIG_WRITE_CORPUS").as_deref() == Ok("1");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for target in TARGETS {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
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
        // Mutations: flipped bits, cuts, and lengths set to edge values.
        for _ in 0..500 {
            let mut v = seeds[rng.below(seeds.len())].clone();
            match rng.below(3) {
                0 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
                1 => v.truncate(rng.below(v.len() + 1)),
                _ if v.len() >= 2 => {
                    let i = rng.below(v.len() - 1);
                    let x: u16 = [0, 3, 4, 0xffff][rng.below(4)];
                    v[i..i + 2].copy_from_slice(&x.to_ne_bytes());
                }
                _ => {}
            }
            inputs.push(v);
        }
        for input in &inputs {
            assert!(run(target, input), "{target} is a target");
        }
    }
}
