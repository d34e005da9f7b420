//! Token budgets: examples are cut first, then context, lowest priority first; every cut is
//! reported; a prompt that cannot fit is an error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_prompt::{
    fit, vars, Budget, ChatTemplate, ContextItem, Cut, Error, Example, FitOptions, Layout,
    PromptSpec, TokenCounter, WordCounter,
};

fn words(n: usize, w: &str) -> String {
    vec![w; n].join(" ")
}

fn spec() -> PromptSpec {
    let mut s = PromptSpec::new("Answer the question using the context.");
    s.examples = vec![
        Example {
            input: words(10, "q0"),
            output: words(10, "a0"),
            priority: 0,
        },
        Example {
            input: words(10, "q1"),
            output: words(10, "a1"),
            priority: 5,
        },
    ];
    s.context = vec![
        ContextItem {
            title: Some("Low".into()),
            text: words(100, "low"),
            priority: 0,
        },
        ContextItem {
            title: Some("High".into()),
            text: words(50, "high"),
            priority: 3,
        },
    ];
    s.input = Some("What matters?".into());
    s
}

fn tokens(t: &str) -> usize {
    WordCounter.count(t).unwrap()
}

#[test]
fn cuts_in_priority_order_and_reports_them() {
    let bound = spec().bind(&vars::<&str, &str>([])).unwrap();
    let full = tokens(&bound.text());
    let opts = FitOptions::default();
    // Everything fits: nothing cut.
    let f = fit(
        &bound,
        &WordCounter,
        Budget::new(full + 10, 10),
        Layout::Text,
        &opts,
    )
    .unwrap();
    assert!(f.cuts.is_empty());
    assert_eq!(f.tokens, full);
    assert_eq!(f.text, bound.text());

    // One token short: the low-priority example goes first (example 0, priority 0).
    let f = fit(
        &bound,
        &WordCounter,
        Budget::new(full - 1, 0),
        Layout::Text,
        &opts,
    )
    .unwrap();
    assert_eq!(
        f.cuts,
        [Cut::DroppedExample {
            index: 0,
            tokens: 20
        }]
    );
    assert_eq!(f.prompt.spec.examples.len(), 1);
    assert!(f.tokens < full);

    // Tighter: both examples go, then the low-priority context is truncated (not the high one).
    let no_examples = full - 2 * (20 + 6); // each example adds its 20 words plus "### Example N Input: Output:"
    let f = fit(
        &bound,
        &WordCounter,
        Budget::new(no_examples - 30, 0),
        Layout::Text,
        &opts,
    )
    .unwrap();
    assert_eq!(f.cuts.len(), 3, "{:?}", f.cuts);
    assert_eq!(
        f.cuts[0],
        Cut::DroppedExample {
            index: 0,
            tokens: 20
        }
    );
    assert_eq!(
        f.cuts[1],
        Cut::DroppedExample {
            index: 1,
            tokens: 20
        }
    );
    match &f.cuts[2] {
        Cut::TruncatedContext {
            index: 0,
            from_tokens: 100,
            to_tokens,
        } => assert!(*to_tokens < 100 && *to_tokens >= 60, "{to_tokens}"),
        other => panic!("{other:?}"),
    }
    assert!(f.tokens <= no_examples - 30);
    assert!(f.text.contains("low [...]"), "truncation is marked");
    assert_eq!(
        f.prompt.spec.context[1].text,
        words(50, "high"),
        "high priority untouched"
    );

    // Tighter still: the low context is dropped entirely, the high one truncated.
    let f = fit(
        &bound,
        &WordCounter,
        Budget::new(no_examples - 130, 0),
        Layout::Text,
        &opts,
    )
    .unwrap();
    assert_eq!(
        f.cuts[2],
        Cut::DroppedContext {
            index: 0,
            tokens: 100
        }
    );
    assert!(
        matches!(
            f.cuts[3],
            Cut::TruncatedContext {
                index: 1,
                from_tokens: 50,
                ..
            }
        ),
        "{:?}",
        f.cuts
    );
    assert_eq!(f.prompt.spec.context.len(), 1);
    assert!(f.tokens <= no_examples - 130);

    // Too small for the task itself.
    let err = fit(
        &bound,
        &WordCounter,
        Budget::new(10, 5),
        Layout::Text,
        &opts,
    )
    .unwrap_err();
    match err {
        Error::BudgetExceeded {
            needed: 12,
            available: 5,
            context_size: 10,
            reserved: 5,
            cuts: 4,
        } => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn chat_layout_is_measured_with_the_template() {
    let bound = spec().bind(&vars::<&str, &str>([])).unwrap();
    let chat = ChatTemplate::llama31();
    let full = tokens(&bound.chat_text(&chat).unwrap());
    let f = fit(
        &bound,
        &WordCounter,
        Budget::new(full, 0),
        Layout::Chat(&chat),
        &FitOptions::default(),
    )
    .unwrap();
    assert!(f.cuts.is_empty());
    assert!(f.text.starts_with("<|begin_of_text|>"));
    let f = fit(
        &bound,
        &WordCounter,
        Budget::new(full - 1, 0),
        Layout::Chat(&chat),
        &FitOptions::default(),
    )
    .unwrap();
    assert_eq!(
        f.cuts,
        [Cut::DroppedExample {
            index: 0,
            tokens: 20
        }]
    );
}

#[cfg(feature = "tokenizers")]
#[test]
fn hugging_face_tokenizer_counts_and_truncates() {
    // A tokenizer.json in the real on-disk format (WordLevel model, Whitespace pre-tokenizer:
    // words and runs of punctuation are separate tokens).
    let json = r#"{
      "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, ",": 2, "world": 3, "!": 4}, "unk_token": "[UNK]"}
    }"#;
    let tok: kiln_prompt::tokenizers::Tokenizer = json.parse().unwrap();
    assert_eq!(tok.count("hello, world!").unwrap(), 4);
    assert_eq!(tok.truncate("hello, world!", 2).unwrap(), "hello,");
    assert_eq!(tok.truncate("hello, world!", 9).unwrap(), "hello, world!");
    assert_eq!(tok.truncate("héllo wörld again", 2).unwrap(), "héllo wörld");
    // And it drives a fit.
    let mut s = PromptSpec::new("hello");
    s.context.push(ContextItem {
        title: None,
        text: "world ".repeat(40),
        priority: 0,
    });
    let bound = s.bind(&vars::<&str, &str>([])).unwrap();
    let opts = FitOptions {
        truncation_marker: String::new(),
        min_context_tokens: 1,
    };
    let f = fit(&bound, &tok, Budget::new(30, 0), Layout::Text, &opts).unwrap();
    assert!(f.tokens <= 30);
    assert!(
        matches!(
            f.cuts[..],
            [Cut::TruncatedContext {
                index: 0,
                from_tokens: 40,
                ..
            }]
        ),
        "{:?}",
        f.cuts
    );
}
