//! Checked generation: the re-ask loop stops at the first passing attempt and reports every
//! attempt; the built-in generator is deterministic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_prompt::{
    generate_checked, generate_checked_with, vars, ChatTemplate, Check, Error, FnGenerator,
    GenParams, Message, PromptInput, PromptSpec, RuleGenerator, ScriptedGenerator, TextGenerator,
    REASK_HEADER,
};

#[test]
fn stops_at_first_pass_and_keeps_every_attempt() {
    let checks = [Check::bullets(2), Check::avoids(["Sure"]).unwrap()];
    let mut gen = ScriptedGenerator::new([
        "Sure! Here:\n- a\n- b\n- c",
        "- a\n- b\n- c",
        "- a\n- b",
        "- never asked",
    ]);
    let out = generate_checked(&mut gen, "List two things.", &checks, 5).unwrap();
    assert!(out.passed());
    assert_eq!(out.attempts.len(), 3);
    assert_eq!(gen.prompts.len(), 3, "no call after the passing attempt");
    assert_eq!(out.output(), Some("- a\n- b"));
    let first = &out.attempts[0];
    assert!(!first.passed);
    assert_eq!(first.checks.iter().filter(|c| !c.passed).count(), 2);
    assert_eq!(first.prompt, "List two things.");
    assert_eq!(
        out.attempts[1]
            .checks
            .iter()
            .map(|c| c.passed)
            .collect::<Vec<_>>(),
        [false, true]
    );
    assert!(out.attempts[2].passed);
    assert_eq!(
        out.attempts.iter().map(|a| a.number).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // The re-ask spells the failures out with what was found.
    assert_eq!(
        gen.prompts[1],
        "List two things.\n\n## Previous answer\nSure! Here:\n- a\n- b\n- c\n\n## Feedback\nYour previous answer did not pass these checks:\n\
         - The answer must have exactly 2 bullet points, one per line starting with \"- \" (found 3 bullet points).\n\
         - The answer must not mention: Sure (mentions: Sure).\n\
         Answer the original request again, fixing every problem listed. Reply with the corrected answer only.\n"
    );
    // The second re-ask builds on the original prompt, not on the first re-ask.
    assert_eq!(gen.prompts[2].matches("## Previous answer").count(), 1);
    assert!(gen.prompts[2].contains("found 3 bullet points"));
    assert!(!gen.prompts[2].contains("Sure (mentions"));
}

#[test]
fn gives_up_after_max_attempts() {
    let mut gen = ScriptedGenerator::new(["x", "y", "z"]);
    let out = generate_checked(&mut gen, "p", &[Check::bullets(1)], 2).unwrap();
    assert!(!out.passed());
    assert_eq!(out.attempts.len(), 2);
    assert_eq!(out.output(), None);
    assert_eq!(out.last_output(), Some("y"));
    let err = generate_checked(&mut gen, "p", &[Check::bullets(1)], 0).unwrap_err();
    assert_eq!(err.to_string(), "max_attempts: must be at least 1");
}

#[test]
fn first_pass_makes_one_call_and_no_checks_always_pass() {
    let mut gen = ScriptedGenerator::new(["- only"]);
    let out = generate_checked(&mut gen, "p", &[Check::bullets(1)], 3).unwrap();
    assert_eq!(out.attempts.len(), 1);
    let mut gen = ScriptedGenerator::new(["anything"]);
    assert!(generate_checked(&mut gen, "p", &[], 3).unwrap().passed());
}

#[test]
fn generator_errors_name_the_attempt() {
    let mut calls = 0;
    let mut gen = FnGenerator::new("flaky", |_p: &str, _g: &GenParams| {
        calls += 1;
        if calls == 1 {
            Ok("bad".to_string())
        } else {
            Err("connection reset".into())
        }
    });
    let err = generate_checked(&mut gen, "p", &[Check::bullets(1)], 3).unwrap_err();
    assert!(matches!(err, Error::Generator { attempt: 2, .. }));
    assert_eq!(
        err.to_string(),
        "generator \"flaky\" failed on attempt 2: connection reset"
    );
}

#[test]
fn chat_reask_appends_turns_and_seeds_differ() {
    let mut seeds = Vec::new();
    let mut prompts = Vec::new();
    let mut replies = vec!["nope", "- fixed"].into_iter();
    let mut gen = FnGenerator::new("rec", |p: &str, g: &GenParams| {
        seeds.push(g.seed);
        prompts.push(p.to_string());
        Ok(replies.next().unwrap_or_default().to_string())
    });
    let input = PromptInput::Chat {
        template: ChatTemplate::chatml(),
        messages: vec![Message::user("Give one bullet.")],
    };
    let params = GenParams {
        seed: 10,
        ..GenParams::default()
    };
    let out = generate_checked_with(&mut gen, input, &[Check::bullets(1)], 3, &params).unwrap();
    assert!(out.passed());
    drop(gen);
    assert_eq!(seeds, [10, 11]);
    assert_eq!(
        prompts[0],
        "<|im_start|>user\nGive one bullet.<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(prompts[1].starts_with("<|im_start|>user\nGive one bullet.<|im_end|>\n<|im_start|>assistant\nnope<|im_end|>\n<|im_start|>user\nYour previous answer did not pass these checks:\n"));
    assert!(prompts[1]
        .ends_with("Reply with the corrected answer only.<|im_end|>\n<|im_start|>assistant\n"));
}

#[test]
fn rule_generator_follows_spec_formats_deterministically() {
    let spec = PromptSpec::from_toml_str(
        "task = \"Describe {{ topic }}.\"\n[output]\nkind = \"json\"\nschema = { type = \"object\", required = [\"name\", \"year\"], properties = { name = { type = \"string\" }, year = { type = \"integer\", minimum = 2013 } } }\n[[context]]\ntext = \"VAEs were introduced by Kingma and Welling. They learn a latent space.\"\n",
        "t",
    )
    .unwrap();
    let prompt = spec.render(&vars([("topic", "VAEs")])).unwrap();
    let checks = spec.checks().unwrap();
    let mut g = RuleGenerator::new(0.0);
    let a = g.generate(&prompt, &GenParams::default()).unwrap();
    let b = g.generate(&prompt, &GenParams::default()).unwrap();
    assert_eq!(a, b, "deterministic");
    assert!(checks[0].run(&a).passed, "{a}");
    // Always slipping: the first attempt fails (chatter before the JSON); the re-ask slips
    // a quarter as often, so with slip rate 1.0 it still slips... and with 0.5 it recovers.
    let mut g = RuleGenerator::new(1.0);
    let out = g.generate(&prompt, &GenParams::default()).unwrap();
    assert!(out.starts_with("Sure! Here is the JSON"), "{out}");
    assert!(!checks[0].run(&out).passed);
    let mut g = RuleGenerator::new(0.5);
    let mut recovered = 0;
    for seed in 0..20 {
        let r = generate_checked_with(
            &mut g,
            prompt.as_str(),
            &checks,
            3,
            &GenParams {
                seed,
                ..GenParams::default()
            },
        )
        .unwrap();
        assert!(r.attempts.iter().all(|a| a.prompt.contains("JSON Schema")));
        if r.passed() && r.attempts.len() > 1 {
            recovered += 1;
            assert!(r.attempts[1].prompt.contains(REASK_HEADER));
        }
    }
    assert!(recovered > 0, "some seeds slip then recover");
    // Without a format instruction it chats in prose.
    let vague = RuleGenerator::default()
        .generate("## Task\nTell me about GANs.\n", &GenParams::default())
        .unwrap();
    assert!(vague.starts_with("Sure!"), "{vague}");
}

#[test]
fn rule_generator_reads_code_length_and_term_instructions() {
    let mut g = RuleGenerator::new(0.0);
    let p = GenParams::default();
    // Code in a language.
    let spec = PromptSpec::from_toml_str(
        "task = \"Write hello world.\"\n[output]\nkind = \"code\"\nlanguage = \"rust\"\n",
        "t",
    )
    .unwrap();
    let prompt = spec.render(&vars::<&str, &str>([])).unwrap();
    let out = g.generate(&prompt, &p).unwrap();
    assert!(spec.checks().unwrap()[0].run(&out).passed, "{out}");
    // A word limit.
    let spec = PromptSpec::from_toml_str(
        "task = \"Explain.\"\n[output]\nkind = \"prose\"\nmax_words = 12\n[[context]]\ntext = \"One two three four five six. Seven eight nine ten eleven twelve. Thirteen fourteen fifteen.\"\n",
        "t",
    )
    .unwrap();
    let out = g
        .generate(&spec.render(&vars::<&str, &str>([])).unwrap(), &p)
        .unwrap();
    assert!(out.split_whitespace().count() <= 12, "{out}");
    assert!(spec.checks().unwrap()[0].run(&out).passed);
    // Terms named in a re-ask: mentioned / avoided next time.
    let checks = [
        Check::contains(["latent"]).unwrap(),
        Check::avoids(["decoder"]).unwrap(),
        Check::bullets(2),
    ];
    let prompt = "## Task\nSummarise.\n\n## Context\nThe decoder maps codes to images. Codes are sampled at random. Training is slow.\n\n## Output format\nAnswer with exactly 2 bullet points, one per line, each starting with \"- \". Write nothing before or after the list.\n";
    let r = generate_checked(&mut g, prompt, &checks, 3).unwrap();
    assert!(
        !r.attempts[0].passed,
        "the first answer knows nothing of the checks"
    );
    assert!(r.passed(), "{:#?}", r.attempts);
    let last = r.output().unwrap();
    assert!(
        last.contains("latent") && !last.to_lowercase().contains("decoder"),
        "{last}"
    );
    // Parameters: stop strings and the token limit are honoured.
    let out = g
        .generate(
            prompt,
            &GenParams {
                stop: vec!["\n".into()],
                ..GenParams::default()
            },
        )
        .unwrap();
    assert!(!out.contains('\n'), "{out:?}");
    let out = g
        .generate(
            prompt,
            &GenParams {
                max_new_tokens: 3,
                ..GenParams::default()
            },
        )
        .unwrap();
    assert_eq!(out.split_whitespace().count(), 3, "{out:?}");
}
