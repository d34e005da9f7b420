//! Prompt specs: `PromptSpec::from_toml_str`, `from_json_str` and `load`,
//! then validation, variables, rendering and derived checks.
#![no_main]
use kiln_prompt::{vars, PromptSpec};
use libfuzzer_sys::fuzz_target;

fn exercise(spec: &PromptSpec) {
    if spec.validate("fuzz").is_err() {
        return;
    }
    if let Ok(names) = spec.variables() {
        let v = vars(names.iter().map(|n| (n.as_str(), "x")));
        if let Ok(bound) = spec.bind(&v) {
            let _ = bound.text();
            let _ = bound.messages();
        }
    }
    let _ = spec.checks();
    let _ = spec.to_toml();
    let _ = spec.to_json();
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = PromptSpec::from_toml_str(text, "fuzz.toml") {
        exercise(&spec);
    }
    if let Ok(spec) = PromptSpec::from_json_str(text, "fuzz.json") {
        exercise(&spec);
    }
    let dir = kiln_fuzz::scratch();
    let p = kiln_fuzz::put(dir.path(), "spec.toml", data);
    let _ = PromptSpec::load(&p);
});
