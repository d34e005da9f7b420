//! Inputs the fuzz targets of `fuzz/` crashed on (issue 21): each must be a
//! plain error naming the file, without any panic, even a caught one. Its own
//! test binary because it installs a panic hook.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use kiln_lm::Gpt2Tokenizer;

static PANICKED: AtomicBool = AtomicBool::new(false);

/// `fuzz/` target `tokenizer`: a non-string key inside `decoder` (one byte of
/// the tiny-gpt2 fixture changed) made tokenizers 0.23 panic ("Helper").
#[test]
fn tokenizer_json_with_a_broken_decoder_is_an_error_not_a_panic() {
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-gpt2/tokenizer.json"
    ))
    .unwrap();
    let broken_fixture = fixture.replacen("\"decoder\": {\n ", "\"decoder\": {\n~", 1);
    assert_ne!(broken_fixture, fixture, "the fixture has a decoder");
    let dir = tempfile::tempdir().unwrap();
    std::panic::set_hook(Box::new(|_| PANICKED.store(true, Ordering::SeqCst)));
    for (name, text) in [
        ("small.json", "{\"decoder\": {~\"type\": \"ByteLevel\"}}"),
        ("fixture.json", broken_fixture.as_str()),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let e = Gpt2Tokenizer::from_file(&p).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
        assert!(e.contains("expected JSON"), "{e}");
        assert!(e.contains("key must be a string"), "{e}");
        assert!(e.contains("line "), "{e}");
    }
    let _ = std::panic::take_hook();
    assert!(!PANICKED.load(Ordering::SeqCst), "the parser panicked");
}
