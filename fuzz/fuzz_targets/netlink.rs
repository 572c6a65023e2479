#![no_main]
//! Fuzz target `netlink` (see lmig_net::fuzzing).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lmig_net::fuzzing::run("netlink", data);
});
