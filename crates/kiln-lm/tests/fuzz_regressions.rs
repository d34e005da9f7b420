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
    // Second crash of the campaign: a number beyond f64's range among the
    // merges, which a syntax-only check let through to the same `expect`.
    let huge_number = fixture.replacen(
        "\"merges\": [",
        "\"merges\": [\n6666666666666660006e+2326,",
        1,
    );
    assert_ne!(huge_number, fixture, "the fixture has merges");
    for (name, text, why) in [
        (
            "small.json",
            "{\"decoder\": {~\"type\": \"ByteLevel\"}}",
            "key must be a string",
        ),
        (
            "fixture.json",
            broken_fixture.as_str(),
            "key must be a string",
        ),
        ("huge.json", huge_number.as_str(), "number out of range"),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let e = Gpt2Tokenizer::from_file(&p).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
        assert!(e.contains("expected JSON"), "{e}");
        assert!(e.contains(why), "{e}");
        assert!(e.contains("line "), "{e}");
    }
    let _ = std::panic::take_hook();
    assert!(!PANICKED.load(Ordering::SeqCst), "the parser panicked");
}

/// `fuzz/` target `lm_config`: `vocab_size` 11111111111111111114 made the
/// parameter count overflow (a panic with overflow checks, a wrapped, small
/// count without). Now `validate` refuses the sizes and the count saturates.
#[test]
fn config_whose_parameter_count_overflows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "crash.json",
            r#"{"model_type":"gpt2","vocab_size":11111111111111111114,"n_layer":1,"n_head":1}"#,
        ),
        (
            "wide.json",
            r#"{"model_type":"gpt2","n_embd":18446744073709551615,"n_head":1}"#,
        ),
        (
            "big.json",
            r#"{"model_type":"gpt2","vocab_size":4000000000}"#,
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        let e = kiln_lm::Gpt2Config::from_file(&p).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
        assert!(e.contains("parameters"), "{name}: {e}");
        assert!(e.contains("2^40"), "{name}: {e}");
        // Sized without validation, the count saturates instead of wrapping.
        let cfg: kiln_lm::Gpt2Config = serde_json::from_str(text).unwrap();
        assert!(cfg.validate().is_err());
        assert!(cfg.num_params() > 1 << 40, "{name}: {}", cfg.num_params());
    }
    // GPT-2 XL-sized configs stay valid.
    let xl = r#"{"model_type":"gpt2","n_embd":1600,"n_layer":48,"n_head":25}"#;
    let p = dir.path().join("xl.json");
    std::fs::write(&p, xl).unwrap();
    let cfg = kiln_lm::Gpt2Config::from_file(&p).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.num_params(), 1_557_611_200);
}
