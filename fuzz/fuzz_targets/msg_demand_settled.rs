#![no_main]
//! Fuzz target `msg_demand_settled`: parse → emit → re-parse → compare (see lmig_transport::fuzzing).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lmig_transport::fuzzing::run("msg_demand_settled", data);
});
