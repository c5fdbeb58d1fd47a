//! cargo-fuzz target: frames → split → authenticate → decode → task metadata.
//! The input format and the invariants checked are documented in `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    parallax_wire_fuzz::run(data);
});
