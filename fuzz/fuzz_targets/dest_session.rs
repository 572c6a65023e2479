#![no_main]
//! Fuzz target `dest_session` (see lmig_examples::fuzzing).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lmig_examples::fuzzing::run("dest_session", data);
});
