//! Prompt evaluation over the example suite shipped in `examples/eval`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kiln_prompt::{
    evaluate, Error, EvalOptions, EvalReport, EvalSuite, FnGenerator, RuleGenerator, TextGenerator,
    WordCounter,
};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/eval")
}

fn run(dir: &Path) -> EvalReport {
    let suite = EvalSuite::load(dir).unwrap();
    evaluate(
        &suite,
        &mut RuleGenerator::default(),
        &WordCounter,
        &EvalOptions::default(),
    )
    .unwrap()
}

#[test]
fn explicit_prompts_beat_the_vague_one() {
    let report = run(&example_dir());
    let names: Vec<&str> = report.variants.iter().map(|v| v.variant.as_str()).collect();
    assert_eq!(names, ["vague", "explicit", "explicit+example"]);
    assert_eq!(report.cells.len(), 9);
    let v = &report.variants;
    assert_eq!(
        v[0].passed_first, 0,
        "the vague prompt never gets the format"
    );
    assert!(v[1].passed >= 2 && v[2].passed >= 2, "{v:?}");
    assert!(v[1].check_pass_rate > v[0].check_pass_rate);
    // Deterministic: the same table every run, byte for byte.
    let md = report.to_markdown();
    assert_eq!(md, run(&example_dir()).to_markdown());
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/eval_report.md");
    if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &md).unwrap();
    }
    assert_eq!(md, std::fs::read_to_string(golden).unwrap());
    // The README shows this table; keep it current.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(
        readme.contains(&md),
        "README.md's eval table is stale: paste tests/golden/eval_report.md"
    );
    // JSON round trip.
    let json = serde_json::to_string(&report).unwrap();
    let back: EvalReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
}

fn copy_example(to: &Path) {
    for e in std::fs::read_dir(example_dir()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn bad_suites_name_the_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = EvalSuite::load(d.join("missing")).unwrap_err();
    assert!(matches!(err, Error::Io { action: "list", .. }), "{err}");
    std::fs::write(d.join("a.toml"), "task = \"x\"\n").unwrap();
    let err = EvalSuite::load(d).unwrap_err();
    assert!(
        err.to_string().contains("no cases.toml or cases.json"),
        "{err}"
    );
    std::fs::write(
        d.join("cases.toml"),
        "[[cases]]\nname = \"c\"\nvars = { topik = \"x\" }\n",
    )
    .unwrap();
    let err = EvalSuite::load(d).unwrap_err();
    assert!(
        err.to_string()
            .contains("cases[0] (\"c\").vars: unused variable `topik`"),
        "{err}"
    );
    std::fs::write(
        d.join("cases.toml"),
        "[[cases]]\nname = \"c\"\nchecks = [{ kind = \"json\", schema = { type = 5 } }]\n",
    )
    .unwrap();
    let err = EvalSuite::load(d).unwrap_err();
    assert!(
        err.to_string()
            .contains("cases: cases[0].checks[0].schema: invalid JSON Schema"),
        "{err}"
    );
    std::fs::write(
        d.join("cases.toml"),
        "[[cases]]\nname = \"c\"\n\n[[cases]]\nname = \"c\"\nextra = 1\n",
    )
    .unwrap();
    let err = EvalSuite::load(d).unwrap_err();
    assert!(
        err.to_string()
            .contains("cases.toml:6: unknown field `extra`"),
        "{err}"
    );
    std::fs::write(d.join("a.toml"), "task = \"x\"\ntone = 1\n").unwrap();
    let err = EvalSuite::load(d).unwrap_err();
    assert!(
        err.to_string().contains("a.toml:2: unknown field `tone`"),
        "{err}"
    );
}

#[test]
fn a_case_missing_a_variable_is_an_error_cell() {
    let dir = tempfile::tempdir().unwrap();
    copy_example(dir.path());
    let cases = std::fs::read_to_string(dir.path().join("cases.toml")).unwrap();
    let cases =
        cases + "\n[[cases]]\nname = \"no-notes\"\nvars = { topic = \"diffusion models\" }\n";
    std::fs::write(dir.path().join("cases.toml"), cases).unwrap();
    let report = run(dir.path());
    let bad: Vec<_> = report.cells.iter().filter(|c| c.error.is_some()).collect();
    assert_eq!(bad.len(), 3);
    assert!(bad[0]
        .error
        .as_deref()
        .unwrap()
        .contains("missing variable `notes`"));
    assert_eq!(report.variants[0].errors, 1);
    assert!(
        report.to_markdown().contains("| vague / no-notes: ")
            || report.to_markdown().contains("- vague / no-notes: ")
    );
}

/// A generator error (a prompt that fills a model's context) is the cell's:
/// the other cells still run, and the table counts it under errors. It
/// stopped the whole evaluation before.
#[test]
fn a_generator_error_is_an_error_cell() {
    let suite = EvalSuite::load(example_dir()).unwrap();
    let mut rules = RuleGenerator::default();
    let mut gen = FnGenerator::new("gan-overflows", |prompt: &str, p: &_| {
        if prompt.contains("generative adversarial") {
            Err("the prompt fills the model's context of 1024 tokens".into())
        } else {
            rules.generate(prompt, p)
        }
    });
    let report = evaluate(&suite, &mut gen, &WordCounter, &EvalOptions::default()).unwrap();
    let bad: Vec<_> = report.cells.iter().filter(|c| c.error.is_some()).collect();
    assert_eq!(bad.len(), report.variants.len(), "one gan cell per variant");
    assert!(bad
        .iter()
        .all(|c| c.case == "gan" && c.error.as_deref().unwrap().contains("context of 1024")));
    assert!(report.variants.iter().all(|v| v.errors == 1));
    assert!(report
        .cells
        .iter()
        .filter(|c| c.case != "gan")
        .all(|c| !c.attempts.is_empty()));
}

#[test]
fn eval_can_render_as_chat_and_without_reasking() {
    let suite = EvalSuite::load(example_dir()).unwrap();
    let opts = EvalOptions {
        max_attempts: 1,
        chat_template: Some(kiln_prompt::ChatTemplate::chatml()),
        ..EvalOptions::default()
    };
    let report = evaluate(&suite, &mut RuleGenerator::default(), &WordCounter, &opts).unwrap();
    assert!(report.cells.iter().all(|c| c.attempts.len() == 1));
    assert!(report
        .cells
        .iter()
        .all(|c| c.attempts[0].prompt.starts_with("<|im_start|>user\n")));
    // explicit+example puts its example in chat turns.
    let ex = report
        .cells
        .iter()
        .find(|c| c.variant == "explicit+example")
        .unwrap();
    assert!(ex.attempts[0]
        .prompt
        .contains("<|im_start|>assistant\n- A decision tree"));
    assert!(report.variants.iter().all(|v| v.passed == v.passed_first));
    assert!(report
        .to_markdown()
        .starts_with("Generator: rule-based (slip rate 0.3); up to 1 attempt per case.\n"));
}
