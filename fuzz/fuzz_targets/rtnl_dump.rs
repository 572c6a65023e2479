#![no_main]
//! Fuzz target `rtnl_dump` (see lmig_net::fuzzing).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lmig_net::fuzzing::run("rtnl_dump", data);
});
