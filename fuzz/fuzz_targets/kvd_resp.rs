#![no_main]
//! Fuzz target `kvd_resp` (see lmig_examples::fuzzing).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lmig_examples::fuzzing::run("kvd_resp", data);
});
