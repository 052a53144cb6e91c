//! The parser alone: any bytes in any chunking read like the same bytes whole.
#![no_main]

#[path = "../../tests/fuzzing/harness.rs"]
#[allow(dead_code)]
mod harness;

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let chunks = harness::split(input);
    let whole = vec![bytes::Bytes::from(chunks.concat())];
    let unbounded = tower_sse::wire::Limits::unbounded();
    assert_eq!(
        harness::messages(&chunks, unbounded),
        harness::messages(&whole, unbounded)
    );
    // Bounded, it stops with an error at a limit, never panics or grows past it.
    let _ = harness::messages(&chunks, tower_sse::wire::Limits::default());
});
