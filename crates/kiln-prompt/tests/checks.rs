//! Every check type has passing and failing cases, and bad checks name the place.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_prompt::{compile_checks, Check, CheckSpec, Error};
use serde_json::json;

fn fails(c: &Check, out: &str) -> String {
    let r = c.run(out);
    assert!(!r.passed, "{} should fail on {out:?}", c.description());
    r.detail.unwrap_or_default()
}

fn passes(c: &Check, out: &str) {
    let r = c.run(out);
    assert!(
        r.passed,
        "{} should pass on {out:?}: {:?}",
        c.description(),
        r.detail
    );
}

#[test]
fn json_and_schema() {
    let c = Check::json();
    passes(&c, "{\"a\": 1}");
    passes(&c, "```json\n[1, 2]\n```");
    passes(&c, "  \"just a string\"  ");
    assert!(fails(&c, "Sure! {\"a\": 1}")
        .starts_with("not valid JSON: expected value at line 1 column 1"));
    let strict = Check::from_spec(
        &CheckSpec::Json {
            schema: None,
            allow_fence: false,
        },
        "c",
    )
    .unwrap();
    fails(&strict, "```json\n[1, 2]\n```");

    let c = Check::json_schema(json!({
        "type": "object",
        "required": ["name", "tags"],
        "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1}}
    }))
    .unwrap();
    passes(&c, r#"{"name": "vae", "tags": ["generative"]}"#);
    let d = fails(&c, r#"{"name": 3, "tags": []}"#);
    assert!(d.starts_with("schema violations: "), "{d}");
    assert!(d.contains("/name: 3 is not of type \"string\""), "{d}");
    assert!(d.contains("/tags: [] has less than 1 item"), "{d}");
    let d = fails(&c, r#"{"name": "x"}"#);
    assert!(d.contains("\"tags\" is a required property"), "{d}");
}

#[test]
fn regex() {
    let c = Check::regex(r"^\d{4}-\d{2}-\d{2}$").unwrap();
    passes(&c, "2024-07-26");
    assert_eq!(fails(&c, "26 July 2024"), "no match");
    let err = Check::regex("(unclosed").unwrap_err();
    assert!(
        matches!(&err, Error::InvalidRegex { pattern, .. } if pattern == "(unclosed"),
        "{err}"
    );
}

#[test]
fn bullets() {
    let c = Check::bullets(3);
    passes(&c, "- a\n- b\n- c");
    passes(&c, "Intro:\n* a\n• b\n1. c\n");
    assert_eq!(fails(&c, "- a\n- b"), "found 2 bullet points");
    assert_eq!(fails(&c, "a, b and c"), "found 0 bullet points");
    assert_eq!(fails(&c, "- a\n-\n- c"), "found 2 bullet points"); // an empty bullet does not count
    let only = Check::from_spec(
        &CheckSpec::Bullets {
            count: Some(2),
            min: None,
            max: None,
            only: true,
        },
        "c",
    )
    .unwrap();
    passes(&only, "- a\n\n- b\n");
    assert_eq!(
        fails(&only, "Here you go:\n- a\n- b"),
        "found 1 other line besides the list, first: \"Here you go:\""
    );
    let range = Check::bullets_between(2, 3).unwrap();
    passes(&range, "1) a\n2) b");
    assert_eq!(fails(&range, "- a\n- b\n- c\n- d"), "found 4 bullet points");
    assert!(Check::bullets_between(4, 2)
        .unwrap_err()
        .to_string()
        .contains("min 4 is greater than max 2"));
}

#[test]
fn max_length() {
    passes(&Check::max_words(3), "one two  three\n");
    assert_eq!(
        fails(&Check::max_words(3), "one two three four"),
        "found 4 words"
    );
    passes(&Check::max_chars(5), "héllo");
    assert_eq!(fails(&Check::max_chars(5), "héllo!"), "found 6 characters");
    let lines = Check::from_spec(
        &CheckSpec::MaxLength {
            chars: Some(100),
            words: None,
            lines: Some(2),
        },
        "c",
    )
    .unwrap();
    passes(&lines, "a\nb\n");
    assert_eq!(fails(&lines, "a\nb\nc"), "found 3 lines");
    let err = Check::from_spec(
        &CheckSpec::MaxLength {
            chars: None,
            words: None,
            lines: None,
        },
        "cases.toml: checks[2]",
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cases.toml: checks[2]: max_length: give at least one of `chars`, `words`, `lines`"
    );
}

#[test]
fn contains_and_avoids() {
    let c = Check::contains(["latent", "decoder"]).unwrap();
    passes(&c, "The Decoder maps LATENT vectors to images.");
    assert_eq!(
        fails(&c, "The decoder maps noise to images."),
        "missing: latent"
    );
    let any = Check::from_spec(
        &CheckSpec::Contains {
            terms: vec!["GAN".into(), "VAE".into()],
            case_sensitive: true,
            any: true,
        },
        "c",
    )
    .unwrap();
    passes(&any, "a VAE");
    fails(&any, "a vae");
    let a = Check::avoids(["as an AI", "I cannot"]).unwrap();
    passes(&a, "Here are the facts.");
    assert_eq!(
        fails(&a, "As an AI, I cannot know."),
        "mentions: as an AI, I cannot"
    );
    let err = Check::contains(Vec::<String>::new()).unwrap_err();
    assert!(
        err.to_string().contains("terms: expected a non-empty list"),
        "{err}"
    );
}

#[test]
fn code_block() {
    let c = Check::code_block("rust");
    passes(&c, "Here:\n```rust\nfn main() {}\n```\n");
    assert_eq!(
        fails(&c, "```python\nprint(1)\n```"),
        "found code blocks tagged [\"python\"]"
    );
    assert_eq!(
        fails(&c, "```rust\nfn main() {}\n"),
        "found no complete fenced code block"
    );
    let any = Check::from_spec(&CheckSpec::CodeBlock { language: None }, "c").unwrap();
    passes(&any, "```\nx\n```");
}

#[test]
fn custom_closure() {
    let c = Check::custom("The answer must cite a source like [1]", |out| {
        if out.contains("[1]") {
            Ok(())
        } else {
            Err("no citation found".into())
        }
    });
    passes(&c, "VAEs were introduced in 2013 [1].");
    assert_eq!(
        fails(&c, "VAEs were introduced in 2013."),
        "no citation found"
    );
    assert!(c.spec().is_none());
    assert_eq!(c.run("x").check, "The answer must cite a source like [1]");
}

#[test]
fn check_specs_parse_from_toml_and_name_their_index() {
    #[derive(serde::Deserialize)]
    struct F {
        checks: Vec<CheckSpec>,
    }
    let f: F = toml::from_str(
        r#"checks = [
            { kind = "json", schema = { type = "object" } },
            { kind = "regex", pattern = "^- " },
            { kind = "bullets", count = 3 },
            { kind = "max_length", words = 50 },
            { kind = "contains", terms = ["GAN"] },
            { kind = "avoids", terms = ["as an AI"] },
            { kind = "code_block", language = "rust" },
        ]"#,
    )
    .unwrap();
    assert_eq!(f.checks.len(), 7);
    assert_eq!(
        compile_checks(&f.checks, "cases.toml: checks")
            .unwrap()
            .len(),
        7
    );
    let err = toml::from_str::<F>("checks = [{ kind = \"bullets\", cnt = 3 }]")
        .err()
        .unwrap();
    assert!(err.to_string().contains("unknown field `cnt`"), "{err}");
    let bad = vec![
        CheckSpec::Regex {
            pattern: "ok".into(),
        },
        CheckSpec::Regex {
            pattern: "[".into(),
        },
    ];
    let err = compile_checks(&bad, "cases.toml: cases[0].checks").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cases.toml: cases[0].checks[1].pattern: invalid regex \"[\""),
        "{err}"
    );
}
