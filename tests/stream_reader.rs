//! The gateway's direct reader of upstream event streams, unit by unit: its decoder and framing
//! rules (`tests/gateway.rs` runs it end to end).
//!
//! Compiled here from the example's source rather than as the example's own tests: an example
//! built as a test harness is not built as the binary `tests/gateway.rs` starts.

// The reader's entry points are the gateway's; here only its tests use them.
#[allow(dead_code)]
#[path = "../examples/gateway/stream_reader.rs"]
mod stream_reader;
