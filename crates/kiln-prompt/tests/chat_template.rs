//! Chat templates render exactly what Hugging Face transformers' `apply_chat_template`
//! renders. The expected texts in `golden/hf_parity.json` were produced by
//! `golden/hf_parity.py` (jinja2 3.1.6 set up as transformers sets it up; the script is the
//! snippet, the JSON its output).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kiln_prompt::{ChatOptions, ChatTemplate, Clock, Error, Message};
use serde_json::Value;

fn golden() -> Vec<Value> {
    let text = include_str!("golden/hf_parity.json");
    serde_json::from_str(text).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn builtin_templates_match_transformers() {
    let cases = golden();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let t = ChatTemplate::builtin(c["template"].as_str().unwrap()).unwrap();
        let opts = ChatOptions {
            add_generation_prompt: c["add_generation_prompt"].as_bool().unwrap(),
            continue_final_message: c["continue_final_message"].as_bool().unwrap(),
            tools: c["tools"].as_array().cloned(),
            ..ChatOptions::default()
        };
        let got = t.render_with(&messages(&c["messages"]), &opts).unwrap();
        assert_eq!(got, c["expected"].as_str().unwrap(), "case {name}");
    }
}

/// A missing template file is named as missing, an unknown name as an
/// unknown built-in.
#[test]
fn a_missing_template_file_is_not_called_an_unknown_name() {
    let e = ChatTemplate::builtin("/nonexistent/t.jinja")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no such file or folder"), "{e}");
    let e = ChatTemplate::builtin("vicuna").err().unwrap().to_string();
    assert!(e.contains("unknown built-in template"), "{e}");
}

/// The same Llama 3.1 render when the template comes from a tokenizer_config.json (special
/// tokens written as AddedToken objects, as Meta's file has them for some tokens).
#[test]
fn tokenizer_config_json_is_read_like_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "added_tokens_decoder": {},
        "bos_token": "<|begin_of_text|>",
        "chat_template": kiln_prompt::LLAMA31_TEMPLATE,
        "clean_up_tokenization_spaces": true,
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": false},
        "pad_token": null,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    let path = dir.path().join("tokenizer_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&path).unwrap();
    assert_eq!(t.special_tokens()["eos_token"], "<|eot_id|>");
    assert!(!t.special_tokens().contains_key("pad_token"));
    let c = golden()
        .into_iter()
        .find(|c| c["name"] == "llama31_convo_gen")
        .unwrap();
    let got = t.render(&messages(&c["messages"]), true).unwrap();
    assert_eq!(got, c["expected"].as_str().unwrap());
    // A model folder works too, and a chat_template.jinja file takes precedence.
    let from_dir = ChatTemplate::from_path(dir.path()).unwrap();
    assert_eq!(
        from_dir.render(&messages(&c["messages"]), true).unwrap(),
        got
    );
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        kiln_prompt::CHATML_TEMPLATE,
    )
    .unwrap();
    let jinja = ChatTemplate::from_path(dir.path()).unwrap();
    let out = jinja.render(&[Message::user("hi")], false).unwrap();
    assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n");
    assert_eq!(jinja.special_tokens()["bos_token"], "<|begin_of_text|>");
}

#[test]
fn named_templates_and_missing_template() {
    let cfg = r#"{"chat_template": [
        {"name": "default", "template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"},
        {"name": "tool_use", "template": "tools={{ tools | tojson }}"}
    ]}"#;
    let t = ChatTemplate::from_tokenizer_config_str(cfg, "cfg.json", None).unwrap();
    assert_eq!(
        t.render(&[Message::user("x")], false).unwrap(),
        "[user] x\n"
    );
    let t = ChatTemplate::from_tokenizer_config_str(cfg, "cfg.json", Some("tool_use")).unwrap();
    let opts = ChatOptions {
        tools: Some(vec![serde_json::json!({"name": "f", "x": [1, 2.0, "<&>"]})]),
        ..ChatOptions::default()
    };
    // json.dumps([{"name": "f", "x": [1, 2.0, "<&>"]}], ensure_ascii=False) == '[{"name": "f", "x": [1, 2.0, "<&>"]}]'
    assert_eq!(
        t.render_with(&[], &opts).unwrap(),
        r#"tools=[{"name": "f", "x": [1, 2.0, "<&>"]}]"#
    );
    let err = ChatTemplate::from_tokenizer_config_str(cfg, "cfg.json", Some("rag")).unwrap_err();
    assert!(
        err.to_string()
            .contains("no template named \"rag\"; the file has default, tool_use"),
        "{err}"
    );

    let err = ChatTemplate::from_tokenizer_config_str(
        r#"{"bos_token": "<s>"}"#,
        "gpt2/tokenizer_config.json",
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with(
            "gpt2/tokenizer_config.json: chat_template: the tokenizer config has no chat template"
        ),
        "{err}"
    );
    let err =
        ChatTemplate::from_tokenizer_config_str("{\n  \"chat_template\": 3,\n}", "bad.json", None)
            .unwrap_err();
    assert!(err.to_string().starts_with("bad.json:3: "), "{err}");
}

#[test]
fn template_errors_name_the_line() {
    let err = ChatTemplate::new(
        "my.jinja",
        "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
    )
    .unwrap_err();
    match &err {
        Error::TemplateSyntax { name, line, .. } => {
            assert_eq!(name, "my.jinja");
            assert_eq!(*line, Some(2));
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    // raise_exception surfaces the template's own message.
    let t = ChatTemplate::new("strict", "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}").unwrap();
    let err = t.render(&[Message::assistant("hi")], false).unwrap_err();
    assert!(
        err.to_string()
            .contains("Conversations must start with a user message"),
        "{err}"
    );
    // The Llama 3.1 template refuses several tool calls at once, as in Python.
    let mut m = Message::assistant("");
    m.extra.insert("tool_calls".into(), serde_json::json!([{"function": {"name": "a", "arguments": {}}}, {"function": {"name": "b", "arguments": {}}}]));
    let err = ChatTemplate::llama31()
        .render(&[Message::user("x"), m], false)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("This model only supports single tool-calls at once!"),
        "{err}"
    );
}

#[test]
fn strftime_now_and_generation_tags() {
    // The Llama 3.2 template's date header; a fixed clock makes it reproducible.
    let src = "{%- if strftime_now is defined %}{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- endif %}Today Date: {{ date_string }}";
    let t = ChatTemplate::new("date", src)
        .unwrap()
        .with_clock(Clock::Fixed(2025, 3, 7, 0, 0, 0));
    assert_eq!(t.render(&[], false).unwrap(), "Today Date: 07 Mar 2025");
    // {% generation %} (transformers' assistant-mask tag) renders its body.
    let src = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}|{% endif %}{% endfor %}";
    let t = ChatTemplate::new("gen", src).unwrap();
    assert_eq!(
        t.render(&[Message::user("q"), Message::assistant("a")], false)
            .unwrap(),
        "q|a"
    );
}

#[test]
fn python_string_methods_and_options() {
    let t = ChatTemplate::new("py", "{% for m in messages %}{{ m.role.upper() }}:{{ m.content.strip() }};{% endfor %}{{ bos_token }}").unwrap();
    let t = t.with_special_token("bos_token", "<s>");
    assert_eq!(
        t.render(&[Message::user("  hi  ")], false).unwrap(),
        "USER:hi;<s>"
    );
    let err = ChatTemplate::chatml()
        .render_with(
            &[Message::user("x")],
            &ChatOptions {
                add_generation_prompt: true,
                continue_final_message: true,
                ..ChatOptions::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("cannot both be set"), "{err}");
    // tojson options: indent, sort_keys, separators, ensure_ascii, as json.dumps does:
    // json.dumps({"b": 1, "a": ["é", None, True]}, ensure_ascii=True, sort_keys=True, separators=(",", ":"))
    //   == '{"a":["\\u00e9",null,true],"b":1}'
    let mut extra = serde_json::Map::new();
    extra.insert(
        "x".into(),
        serde_json::json!({"b": 1, "a": ["é", null, true]}),
    );
    let t = ChatTemplate::new("j", "{{ x | tojson(ensure_ascii=true, sort_keys=true, separators=[',', ':']) }}|{{ x | tojson(indent=2) }}").unwrap();
    let out = t
        .render_with(
            &[],
            &ChatOptions {
                extra,
                ..ChatOptions::default()
            },
        )
        .unwrap();
    assert_eq!(out, "{\"a\":[\"\\u00e9\",null,true],\"b\":1}|{\n  \"b\": 1,\n  \"a\": [\n    \"é\",\n    null,\n    true\n  ]\n}");
}

/// Template kwargs pass through (transformers passes extra keyword arguments to the template),
/// and `encode` tokenizes the render without a second BOS.
#[test]
fn extra_variables_and_encoding() {
    let mut extra = serde_json::Map::new();
    extra.insert("date_string".into(), "01 Jan 2025".into());
    let opts = ChatOptions {
        extra,
        add_generation_prompt: true,
        ..ChatOptions::default()
    };
    let text = ChatTemplate::llama31()
        .render_with(&[Message::user("Hi")], &opts)
        .unwrap();
    assert!(text.contains("Today Date: 01 Jan 2025\n"), "{text}");

    #[cfg(feature = "tokenizers")]
    {
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null,
          "added_tokens": [
            {"id": 4, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 5, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
          ],
          "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "user": 1, "hi": 2, "assistant": 3, "<|im_start|>": 4, "<|im_end|>": 5}, "unk_token": "[UNK]"}
        }"#;
        let tok: kiln_prompt::tokenizers::Tokenizer = json.parse().unwrap();
        let ids = ChatTemplate::chatml()
            .encode(
                &tok,
                &[Message::user("hi")],
                &ChatOptions {
                    add_generation_prompt: true,
                    ..ChatOptions::default()
                },
            )
            .unwrap();
        // <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n
        assert_eq!(ids, [4, 1, 2, 5, 4, 3]);
    }
}
