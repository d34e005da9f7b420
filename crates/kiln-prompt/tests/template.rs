//! Strict templates: missing and unused variables are errors listing the names; syntax errors
//! name the template and line; command-line assignments parse strictly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_prompt::{parse_var_assignments, vars, Error, Template};
use serde_json::json;

#[test]
fn variables_exclude_loop_and_set_names() {
    let t = Template::new(
        "t",
        "{% set greeting = 'Hi' %}{{ greeting }} {{ user.name }}:{% for item in items %} {{ loop.index }}={{ item }}{% endfor %}{{ range(2) | join(',') }}",
    )
    .unwrap();
    assert_eq!(t.variables().iter().collect::<Vec<_>>(), ["items", "user"]);
    let out = t
        .render(&vars([
            ("user", json!({"name": "Ada"})),
            ("items", json!(["a", "b"])),
        ]))
        .unwrap();
    assert_eq!(out, "Hi Ada: 1=a 2=b0,1");
}

#[test]
fn missing_and_unused_list_every_name() {
    let t = Template::new(
        "email.task",
        "Write to {{ name }} about {{ topic }} before {{ date }}.",
    )
    .unwrap();
    let err = t.render(&vars([("topic", "GANs")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "email.task: missing variables `date`, `name`; the template uses `date`, `name`, `topic`; pass each with a value (e.g. --var date=...)"
    );
    let err = t
        .render(&vars([
            ("name", "Ada"),
            ("topic", "GANs"),
            ("date", "Friday"),
            ("tone", "warm"),
            ("cc", "Bob"),
        ]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "email.task: unused variables `cc`, `tone`; the template uses `date`, `name`, `topic`"
    );
    // Attribute access on a missing key is an error too, never a blank.
    let t = Template::new("t", "Dear {{ user.title }} {{ user.name }}").unwrap();
    let err = t
        .render(&vars([("user", json!({"name": "Ada"}))]))
        .unwrap_err();
    assert!(matches!(err, Error::Render { .. }), "{err:?}");
    // The trailing newline is kept (prompts are text files).
    assert_eq!(
        Template::new("t", "x\n")
            .unwrap()
            .render(&vars::<&str, &str>([]))
            .unwrap(),
        "x\n"
    );
}

#[test]
fn syntax_errors_name_template_and_line() {
    let err = Template::new("spec.toml: task", "line one\nline two {% if %}\n").unwrap_err();
    match &err {
        Error::TemplateSyntax {
            name,
            line,
            message,
        } => {
            assert_eq!(name, "spec.toml: task");
            assert_eq!(*line, Some(2));
            assert!(
                !message.is_empty() && !message.starts_with("syntax error"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "template \"spec.toml: task\" line 2: syntax error: unexpected end of block"
    );
}

#[test]
fn var_assignments() {
    let v = parse_var_assignments(&["a=1", "b=x=y", "c="]).unwrap();
    assert_eq!(v, vars([("a", "1"), ("b", "x=y"), ("c", "")]));
    assert_eq!(
        parse_var_assignments(&["novalue"]).unwrap_err().to_string(),
        "--var \"novalue\": expected NAME=VALUE"
    );
    assert_eq!(
        parse_var_assignments(&["=x"]).unwrap_err().to_string(),
        "--var \"=x\": the variable name before '=' is empty"
    );
    assert_eq!(
        parse_var_assignments(&["a=1", "a=2"])
            .unwrap_err()
            .to_string(),
        "--var a: given more than once"
    );
}
