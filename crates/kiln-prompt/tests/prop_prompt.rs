//! Property tests for kiln-prompt's readers (issue 21, fuzzing): prompt
//! specs (TOML and JSON), templates and chat templates. Arbitrary text and
//! mutations of the golden spec never panic; valid specs round-trip.
//! cargo-fuzz targets for the same readers live in `fuzz/`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;

use kiln_prompt::{vars, ChatTemplate, Message, PromptSpec, Template};
use proptest::prelude::*;

fn golden() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/release_notes.toml"),
    )
    .unwrap()
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        // Seeded like the rest of the suite: a run on CI explores the same
        // cases as here (open-ended exploration is `cargo xtask fuzz`'s job).
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6b69_6c6e),
        ..ProptestConfig::default()
    }
}

/// Exercises a spec the way `cargo xtask prompt` does.
fn exercise(spec: &PromptSpec) {
    if spec.validate("spec").is_err() {
        return;
    }
    if let Ok(names) = spec.variables() {
        let v = vars(names.iter().map(|n| (n.as_str(), "x")));
        if let Ok(bound) = spec.bind(&v) {
            let _ = bound.text();
        }
    }
    let _ = spec.checks();
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn spec_line_mutations_never_panic(
        cut in any::<prop::sample::Index>(),
        line in "\\PC{0,30}",
        drop in any::<bool>(),
    ) {
        let mut lines: Vec<String> = golden().lines().map(String::from).collect();
        let i = cut.index(lines.len());
        if drop { lines.remove(i); } else { lines.insert(i, line); }
        let text = lines.join("\n");
        if let Ok(spec) = PromptSpec::from_toml_str(&text, "spec.toml") {
            exercise(&spec);
        }
    }

    #[test]
    fn spec_arbitrary_text_never_panics(text in "\\PC{0,80}") {
        if let Ok(spec) = PromptSpec::from_toml_str(&text, "s.toml") {
            exercise(&spec);
        }
        if let Ok(spec) = PromptSpec::from_json_str(&text, "s.json") {
            exercise(&spec);
        }
    }

    #[test]
    fn templates_never_panic(src in "(\\PC|\\{\\{ ?[a-z|() ]{0,8} ?\\}\\}|\\{% ?(if|for x in|endif|endfor|set) [a-z ]{0,6}%\\}){0,12}") {
        if let Ok(t) = Template::new("t", src.as_str()) {
            let v = vars(t.variables().iter().map(|n| (n.clone(), "x")));
            let _ = t.render(&v);
        }
        if let Ok(t) = ChatTemplate::new("c", src.as_str()) {
            let _ = t.render(&[Message::user("hi")], true);
        }
        let cfg = serde_json::json!({ "chat_template": src }).to_string();
        let _ = ChatTemplate::from_tokenizer_config_str(&cfg, "tokenizer_config.json", None);
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn valid_specs_round_trip(task in "[a-zA-Z ,.]{1,40}", constraints in proptest::collection::vec("[a-z ]{1,20}", 0..3)) {
        let mut spec = PromptSpec::new(task);
        spec.constraints = constraints;
        let toml = spec.to_toml().unwrap();
        prop_assert_eq!(&PromptSpec::from_toml_str(&toml, "s.toml").unwrap(), &spec);
        let json = spec.to_json().unwrap();
        prop_assert_eq!(&PromptSpec::from_json_str(&json, "s.json").unwrap(), &spec);
    }
}
