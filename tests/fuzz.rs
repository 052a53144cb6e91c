//! The fuzz harness in CI: every input of the saved corpus (`tests/fuzz-corpus/`, found by
//! `cargo fuzz`, see the README), then a short random run.

#[path = "fuzzing/harness.rs"]
mod harness;

use proptest::prelude::*;

#[test]
fn the_saved_corpus_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
    // The published crate leaves the corpus out; the repository (and CI) always has it.
    if !dir.exists() && std::env::var_os("CI").is_none() {
        eprintln!("SKIPPED: no fuzz corpus here (it is in the repository, not the package)");
        return;
    }
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| harness::check(&input));
        assert!(outcome.is_ok(), "{} fails", path.display());
        inputs += 1;
    }
    assert!(inputs > 0, "the corpus is empty");
}

/// Bytes shaped like event streams: field names, colons, line endings, BOMs, NULs, UTF-8.
fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop_oneof![
        Just(b"data".to_vec()),
        Just(b"id".to_vec()),
        Just(b"event".to_vec()),
        Just(b"retry".to_vec()),
        Just(b"meta-k".to_vec()),
        Just(b":".to_vec()),
        Just(b": ".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(b"\0".to_vec()),
        Just("\u{2026}".as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 0..8),
    ];
    (any::<u8>(), prop::collection::vec(pieces, 0..64)).prop_map(|(pick, pieces)| {
        let mut input = vec![pick];
        input.extend(pieces.concat());
        input
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_streams_read_the_same_through_every_layer(input in stream_bytes()) {
        harness::check(&input);
    }
}
