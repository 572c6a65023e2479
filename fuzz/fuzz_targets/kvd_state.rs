#![no_main]
//! Fuzz target `kvd_state` (see lmig_examples::fuzzing).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lmig_examples::fuzzing::run("kvd_state", data);
});
