//! Every body layer and the full stack: the messages a client sees equal the input's.
#![no_main]

#[path = "../../tests/fuzzing/harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|input: &[u8]| harness::check(input));
