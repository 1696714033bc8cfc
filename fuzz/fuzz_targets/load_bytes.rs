//! The module loader on arbitrary bytes (seeded with real guests and WAT):
//! never a panic; what loads runs within its deadline and limits.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "harness.rs"]
mod harness;

fuzz_target!(|bytes: &[u8]| {
    harness::load_and_run(bytes);
});
