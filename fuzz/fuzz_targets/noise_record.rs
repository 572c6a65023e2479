#![no_main]
//! Fuzz target `noise_record`: the Noise record layer reads arbitrary bytes without panicking or
//! forging, round-trips its own records and notices a flipped byte (see lmig_transport::fuzzing).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lmig_transport::fuzzing::run("noise_record", data);
});
