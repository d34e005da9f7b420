//! Prompt specs: byte-exact rendering against golden files, TOML/JSON round trips, and
//! errors that name the place.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kiln_prompt::{vars, ChatTemplate, Error, OutputFormat, PromptSpec, Vars};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares with a golden file; `KILN_UPDATE_GOLDEN=1` rewrites it instead.
fn assert_golden(name: &str, got: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with KILN_UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        got == want,
        "{name} differs from the golden file\n--- got ---\n{got}\n--- want ---\n{want}"
    );
}

fn release_vars() -> Vars {
    vars([
        ("product", "kiln"),
        ("version", "0.4.0"),
        ("previous", "0.3.0"),
        ("date", "2025-03-07"),
    ])
}

#[test]
fn full_spec_renders_like_the_golden_files() {
    let spec = PromptSpec::load(golden_dir().join("release_notes.toml")).unwrap();
    let bound = spec.bind(&release_vars()).unwrap();
    assert_golden("release_notes.txt", &bound.text());
    let msgs = serde_json::to_string_pretty(&bound.messages()).unwrap() + "\n";
    assert_golden("release_notes.messages.json", &msgs);
    assert_golden(
        "release_notes.chatml.txt",
        &bound.chat_text(&ChatTemplate::chatml()).unwrap(),
    );
    assert_golden(
        "release_notes.llama31.txt",
        &bound.chat_text(&ChatTemplate::llama31()).unwrap(),
    );
    // Rendering is deterministic.
    assert_eq!(spec.render(&release_vars()).unwrap(), bound.text());
}

#[test]
fn json_schema_spec_renders_and_derives_its_check() {
    let spec = PromptSpec::load(golden_dir().join("extract_json.toml")).unwrap();
    let text = spec
        .render(&vars([("text", "GPT-2 small has 124M parameters.")]))
        .unwrap();
    assert_golden("extract_json.txt", &text);
    let checks = spec.checks().unwrap();
    assert_eq!(checks.len(), 1);
    assert!(
        checks[0]
            .run(r#"{"model": "GPT-2 small", "parameters": 124000000}"#)
            .passed
    );
    let bad = checks[0].run(r#"{"model": "GPT-2 small", "parameters": "124M"}"#);
    assert!(!bad.passed);
    assert!(
        bad.detail.as_deref().unwrap().contains("/parameters"),
        "{bad:?}"
    );
}

/// A spec saved on Windows (byte-order mark, CRLF line ends) loads and
/// renders exactly as the same file with `\n` (Python's text mode reads it
/// so); a `\r` ended every line of its multi-line strings before.
#[test]
fn a_windows_saved_spec_renders_like_the_original() {
    let src = std::fs::read_to_string(golden_dir().join("release_notes.toml")).unwrap();
    assert!(
        src.contains("\"\"\"\n"),
        "the golden spec has multi-line strings"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("windows.toml");
    std::fs::write(&p, format!("\u{feff}{}", src.replace('\n', "\r\n"))).unwrap();
    let orig = PromptSpec::load(golden_dir().join("release_notes.toml")).unwrap();
    let win = PromptSpec::load(&p).unwrap();
    assert_eq!(win, orig);
    let text = win.render(&release_vars()).unwrap();
    assert!(!text.contains('\r'));
    assert_eq!(text, orig.render(&release_vars()).unwrap());
}

#[test]
fn toml_and_json_round_trip() {
    let spec = PromptSpec::load(golden_dir().join("release_notes.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for ext in ["toml", "json"] {
        let p = dir.path().join(format!("s.{ext}"));
        spec.save(&p).unwrap();
        let back = PromptSpec::load(&p).unwrap();
        assert_eq!(back, spec, "{ext}");
        assert_eq!(
            back.render(&release_vars()).unwrap(),
            spec.render(&release_vars()).unwrap()
        );
    }
    assert!(spec
        .save(dir.path().join("s.yaml"))
        .unwrap_err()
        .to_string()
        .contains("expected a .toml or .json"));
}

#[test]
fn variables_are_listed_and_checked() {
    let spec = PromptSpec::load(golden_dir().join("release_notes.toml")).unwrap();
    let declared: Vec<String> = spec.variables().unwrap().into_iter().collect();
    assert_eq!(
        declared,
        ["company", "date", "previous", "product", "version"]
    );
    // Missing: every missing name is listed (company has a default).
    let err = spec.bind(&vars([("product", "kiln")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "release-notes: missing variables `date`, `previous`, `version` (used in task, time_frame.as_of, time_frame.from, time_frame.to, context[0].title); the template uses `company`, `date`, `previous`, `product`, `version`; pass each with a value (e.g. --var date=...)"
    );
    // Unused: a typo is caught, not ignored.
    let mut v = release_vars();
    v.insert("verison".into(), "0.4.0".into());
    let err = spec.bind(&v).unwrap_err();
    assert!(
        matches!(&err, Error::UnusedVariables { unused, .. } if unused == &["verison"]),
        "{err}"
    );
    // A given variable overrides the default.
    let mut v = release_vars();
    v.insert("company".into(), "Acme".into());
    assert!(spec
        .render(&v)
        .unwrap()
        .starts_with("You are a careful technical writer at Acme.\n"));
}

#[test]
fn bad_specs_name_the_place() {
    // Unknown field: named, with its line and the expected fields.
    let err = PromptSpec::from_toml_str("task = \"x\"\naudiance = \"managers\"\n", "spec.toml")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("spec.toml:2: unknown field `audiance`, expected one of"),
        "{msg}"
    );
    assert!(msg.contains("`audience`"), "{msg}");
    // Unknown field in a nested table.
    let err = PromptSpec::from_toml_str(
        "task = \"x\"\n\n[output]\nkind = \"bullets\"\ncuont = 3\n",
        "spec.toml",
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("spec.toml:")
            && err.to_string().contains("unknown field `cuont`"),
        "{err}"
    );
    // Unknown output kind.
    let err = PromptSpec::from_toml_str("task = \"x\"\n[output]\nkind = \"yaml\"\n", "spec.toml")
        .unwrap_err();
    assert!(err.to_string().contains("unknown variant `yaml`"), "{err}");
    // JSON: unknown field with line.
    let err = PromptSpec::from_json_str(
        "{\n  \"task\": \"x\",\n  \"tone\": \"warm\"\n}",
        "spec.json",
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("spec.json:3: unknown field `tone`"),
        "{err}"
    );
    // Missing required field.
    let err = PromptSpec::from_toml_str("audience = \"managers\"\n", "spec.toml").unwrap_err();
    assert!(err.to_string().contains("missing field `task`"), "{err}");
    // Invalid JSON Schema: the field is named.
    let err = PromptSpec::from_toml_str(
        "task = \"x\"\n[output]\nkind = \"json\"\nschema = { type = \"strnig\" }\n",
        "spec.toml",
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidSchema { place, .. } if place == "spec.toml: output.schema"),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("spec.toml: output.schema: invalid JSON Schema:"),
        "{err}"
    );
    // Template syntax error: field and line within it.
    let err = PromptSpec::from_toml_str(
        "task = \"x\"\nconstraints = [\"ok\", \"\"\"line one\n{{ oops \"\"\"]\n",
        "spec.toml",
    )
    .unwrap_err();
    match &err {
        Error::TemplateSyntax { name, line, .. } => {
            assert_eq!(name, "spec.toml: constraints[1]");
            assert_eq!(*line, Some(2));
        }
        other => panic!("{other:?}"),
    }
    // Out-of-range values.
    let err = PromptSpec::from_toml_str(
        "task = \"x\"\n[output]\nkind = \"bullets\"\nmin = 5\nmax = 2\n",
        "spec.toml",
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.toml: output.min: min 5 is greater than max 2"
    );
    let err = PromptSpec::from_toml_str(
        "task = \"{{ a }}\"\n[defaults]\na = 1\nb = 2\n",
        "spec.toml",
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.toml: defaults.b: no template uses `b`; the spec uses `a`"
    );
    let err = PromptSpec::from_toml_str("task = \"  \"\n", "spec.toml").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("spec.toml: task: must not be empty"),
        "{err}"
    );
    // A file that is neither.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("spec.txt");
    std::fs::write(&p, "task = 'x'").unwrap();
    assert!(PromptSpec::load(&p)
        .unwrap_err()
        .to_string()
        .contains("expected a .toml or .json spec file"));
    let err = PromptSpec::load(dir.path().join("nope.toml")).unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("nope.toml: read failed"),
        "{err}"
    );
}

#[test]
fn minimal_spec_and_format_wording() {
    let mut spec = PromptSpec::new("Write a haiku about {{ subject }}.");
    assert_eq!(
        spec.render(&vars([("subject", "kilns")])).unwrap(),
        "## Task\nWrite a haiku about kilns.\n"
    );
    spec.output = Some(OutputFormat::Code {
        language: "rust".into(),
    });
    let text = spec.render(&vars([("subject", "kilns")])).unwrap();
    assert_eq!(
        text,
        "## Task\nWrite a haiku about kilns.\n\n## Output format\nAnswer with rust code in one fenced code block (```rust ... ```). Put any explanation in code comments.\n"
    );
    // Substituted values are never re-templated: braces in a value stay as they are.
    let out = spec
        .render(&vars([("subject", "{{ not_a_var }}")]))
        .unwrap();
    assert!(out.contains("Write a haiku about {{ not_a_var }}."));
}
