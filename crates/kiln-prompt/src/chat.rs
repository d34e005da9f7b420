//! Chat messages rendered with a model's own chat template, the way Hugging Face
//! `transformers`' `apply_chat_template(..., tokenize=False)` renders them.
//!
//! The template environment matches transformers': Jinja with `trim_blocks` and
//! `lstrip_blocks`, loop controls, a `raise_exception(message)` global, a `strftime_now(format)`
//! global, a `tojson` filter that writes JSON the way Python's `json.dumps(ensure_ascii=False)`
//! does (no HTML escaping; `indent`, `separators`, `sort_keys`, `ensure_ascii` arguments), the
//! Python string/dict methods templates call (`.strip()`, `.items()`, ...), the special tokens
//! of `tokenizer_config.json` (`bos_token`, `eos_token`, ...) as variables, and `tools` /
//! `documents` passed as `none` unless given. `{% generation %}` blocks render their body.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{json_error, Error, Result};

/// One chat message. Extra keys (`tool_calls`, `name`, `tool_call_id`, ...) are kept in
/// `extra` and passed to the template as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, `tool`, ...
    pub role: String,
    /// The message text.
    pub content: String,
    /// Any other keys of the message, passed to the template unchanged.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            extra: serde_json::Map::new(),
        }
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Options for [`ChatTemplate::render_with`], named after `apply_chat_template`'s arguments.
#[derive(Debug, Clone, Default)]
pub struct ChatOptions {
    /// Append the header that starts the assistant's reply.
    pub add_generation_prompt: bool,
    /// End the text right after the last message's content so the model continues it
    /// (cannot be combined with `add_generation_prompt`).
    pub continue_final_message: bool,
    /// Tool (function) JSON schemas, passed to the template as `tools`.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Documents for retrieval-augmented templates, passed as `documents`.
    pub documents: Option<Vec<serde_json::Value>>,
    /// Further template variables (e.g. `date_string`, `enable_thinking`).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The date `strftime_now` formats: the system clock (UTC), or a fixed date for reproducible
/// prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Clock {
    /// The current time, UTC.
    #[default]
    System,
    /// A fixed date and time: year, month (1-12), day, hour, minute, second.
    Fixed(i64, u32, u32, u32, u32, u32),
}

/// ChatML, as in transformers' former default chat template (and e.g.
/// `teknium/OpenHermes-2.5-Mistral-7B`): `<|im_start|>{role}\n{content}<|im_end|>\n`.
pub const CHATML_TEMPLATE: &str = include_str!("../templates/chatml.jinja");

/// The chat template of `meta-llama/Llama-3.1-8B-Instruct`'s `tokenizer_config.json` as Meta
/// published it (the revision with the fixed "26 Jul 2024" date; tool calling included).
pub const LLAMA31_TEMPLATE: &str = include_str!("../templates/llama-3.1.jinja");

/// A compiled chat template plus the special tokens it may refer to.
///
/// ```
/// use kiln_prompt::{ChatTemplate, Message};
/// let chat = ChatTemplate::chatml();
/// let text = chat.render(&[Message::user("Hi!")], true)?;
/// assert_eq!(text, "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n");
/// # Ok::<(), kiln_prompt::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    name: String,
    source: String,
    special_tokens: BTreeMap<String, serde_json::Value>,
    clock: Clock,
}

impl ChatTemplate {
    /// Compiles a template; `name` is used in error messages.
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Result<Self> {
        let t = ChatTemplate {
            name: name.into(),
            source: source.into(),
            special_tokens: BTreeMap::new(),
            clock: Clock::System,
        };
        let env = chat_env(Clock::System);
        env.template_from_named_str(&t.name, &preprocess(&t.source))
            .map_err(|e| Error::from_jinja(&t.name, &e))?;
        Ok(t)
    }

    /// The ChatML template ([`CHATML_TEMPLATE`]).
    pub fn chatml() -> Self {
        ChatTemplate {
            name: "chatml".into(),
            source: CHATML_TEMPLATE.into(),
            special_tokens: BTreeMap::new(),
            clock: Clock::System,
        }
    }

    /// Llama 3.1 Instruct's template ([`LLAMA31_TEMPLATE`]) with its special tokens
    /// (`bos_token` = `<|begin_of_text|>`, `eos_token` = `<|eot_id|>`).
    pub fn llama31() -> Self {
        ChatTemplate {
            name: "llama-3.1".into(),
            source: LLAMA31_TEMPLATE.into(),
            special_tokens: [
                ("bos_token".to_string(), "<|begin_of_text|>".into()),
                ("eos_token".to_string(), "<|eot_id|>".into()),
            ]
            .into_iter()
            .collect(),
            clock: Clock::System,
        }
    }

    /// A built-in template by name: `chatml` or `llama-3.1` (also `llama3.1`, `llama31`).
    pub fn builtin(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "chatml" => Ok(Self::chatml()),
            "llama-3.1" | "llama3.1" | "llama31" => Ok(Self::llama31()),
            // A path that is not there reached here: say that, not that
            // it is an unknown built-in name.
            n if n.contains('/')
                || n.contains('\\')
                || n.ends_with(".jinja")
                || n.ends_with(".json") =>
            {
                Err(Error::invalid(
                    format!("chat template {name:?}"),
                    "no such file or folder (a chat template is `chatml`, `llama-3.1`, a model \
                     folder, a tokenizer_config.json or a .jinja file)",
                ))
            }
            _ => Err(Error::invalid(
                format!("chat template {name:?}"),
                "unknown built-in template; expected `chatml` or `llama-3.1`, or a path to a model folder / tokenizer_config.json / .jinja file",
            )),
        }
    }

    /// Reads `chat_template` and the special tokens from a Hugging Face
    /// `tokenizer_config.json`. When the file holds several named templates, `default` is used.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_tokenizer_config_named(path, None)
    }

    /// Like [`ChatTemplate::from_tokenizer_config`], choosing a named template (e.g. `tool_use`).
    pub fn from_tokenizer_config_named(
        path: impl AsRef<Path>,
        which: Option<&str>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::error::read_text(path)?;
        Self::from_tokenizer_config_str(&text, &path.display().to_string(), which)
    }

    /// Parses the text of a `tokenizer_config.json`; `place` names it in errors.
    pub fn from_tokenizer_config_str(text: &str, place: &str, which: Option<&str>) -> Result<Self> {
        let cfg: serde_json::Value =
            serde_json::from_str(text).map_err(|e| json_error(place, &e))?;
        let Some(obj) = cfg.as_object() else {
            return Err(Error::invalid(
                place,
                "expected a JSON object at the top level",
            ));
        };
        let source = match obj.get("chat_template") {
            None | Some(serde_json::Value::Null) => {
                return Err(Error::invalid(
                    format!("{place}: chat_template"),
                    "the tokenizer config has no chat template (a base model?); use a built-in one (ChatTemplate::chatml) or pass a .jinja file",
                ))
            }
            Some(serde_json::Value::String(s)) => {
                if let Some(w) = which {
                    if w != "default" {
                        return Err(Error::invalid(
                            format!("{place}: chat_template"),
                            format!("no template named {w:?}; the file has a single unnamed template"),
                        ));
                    }
                }
                s.clone()
            }
            Some(serde_json::Value::Array(items)) => {
                let want = which.unwrap_or("default");
                let mut names = Vec::new();
                let mut found = None;
                for (i, item) in items.iter().enumerate() {
                    let name = item.get("name").and_then(|n| n.as_str());
                    let tmpl = item.get("template").and_then(|n| n.as_str());
                    let (Some(name), Some(tmpl)) = (name, tmpl) else {
                        return Err(Error::invalid(
                            format!("{place}: chat_template[{i}]"),
                            "expected an object with string fields `name` and `template`",
                        ));
                    };
                    names.push(name.to_string());
                    if name == want {
                        found = Some(tmpl.to_string());
                    }
                }
                found.ok_or_else(|| {
                    Error::invalid(
                        format!("{place}: chat_template"),
                        format!("no template named {want:?}; the file has {}", names.join(", ")),
                    )
                })?
            }
            Some(_) => {
                return Err(Error::invalid(
                    format!("{place}: chat_template"),
                    "expected a string or a list of {name, template} objects",
                ))
            }
        };
        let mut t = Self::new(format!("{place}: chat_template"), source)?;
        t.special_tokens = special_tokens(&cfg);
        Ok(t)
    }

    /// Loads the chat template of a model folder the way transformers does: a
    /// `chat_template.jinja` file if present, else `tokenizer_config.json`'s `chat_template`,
    /// else `chat_template.json`. Special tokens come from `tokenizer_config.json` when present.
    /// A path to a `.jinja` file or to a `tokenizer_config.json` also works.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let read = crate::error::read_text;
        if path.is_file() {
            if path.extension().is_some_and(|e| e == "jinja") {
                return Self::new(path.display().to_string(), read(path)?);
            }
            return Self::from_tokenizer_config(path);
        }
        let cfg_path = path.join("tokenizer_config.json");
        let cfg: Option<(String, serde_json::Value)> = if cfg_path.is_file() {
            let text = read(&cfg_path)?;
            let place = cfg_path.display().to_string();
            let v = serde_json::from_str(&text).map_err(|e| json_error(&place, &e))?;
            Some((text, v))
        } else {
            None
        };
        let with_tokens = |mut t: ChatTemplate| {
            if let Some((_, v)) = &cfg {
                t.special_tokens = special_tokens(v);
            }
            t
        };
        let jinja = path.join("chat_template.jinja");
        if jinja.is_file() {
            return Ok(with_tokens(Self::new(
                jinja.display().to_string(),
                read(&jinja)?,
            )?));
        }
        if let Some((text, v)) = &cfg {
            if v.get("chat_template").is_some_and(|t| !t.is_null()) {
                return Self::from_tokenizer_config_str(
                    text,
                    &cfg_path.display().to_string(),
                    None,
                );
            }
        }
        let json = path.join("chat_template.json");
        if json.is_file() {
            let place = json.display().to_string();
            let v: serde_json::Value =
                serde_json::from_str(&read(&json)?).map_err(|e| json_error(&place, &e))?;
            let s = v
                .get("chat_template")
                .and_then(|s| s.as_str())
                .ok_or_else(|| {
                    Error::invalid(format!("{place}: chat_template"), "expected a string")
                })?;
            return Ok(with_tokens(Self::new(place, s)?));
        }
        Err(Error::invalid(
            path.display().to_string(),
            "no chat template found: expected chat_template.jinja, tokenizer_config.json with `chat_template`, or chat_template.json",
        ))
    }

    /// Sets (or overrides) a special-token variable such as `bos_token`.
    pub fn with_special_token(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.special_tokens
            .insert(name.into(), serde_json::Value::String(value.into()));
        self
    }

    /// Sets what `strftime_now` reports (a fixed date makes renders reproducible).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The template's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens passed to the template.
    pub fn special_tokens(&self) -> &BTreeMap<String, serde_json::Value> {
        &self.special_tokens
    }

    /// Renders `messages`, optionally followed by the assistant header.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(
            messages,
            &ChatOptions {
                add_generation_prompt,
                ..ChatOptions::default()
            },
        )
    }

    /// Renders `messages` with all of `apply_chat_template`'s options.
    pub fn render_with(&self, messages: &[Message], opts: &ChatOptions) -> Result<String> {
        if opts.add_generation_prompt && opts.continue_final_message {
            return Err(Error::invalid(
                "chat options",
                "add_generation_prompt and continue_final_message cannot both be set: the first starts a new assistant message, the second continues the last one",
            ));
        }
        let env = chat_env(self.clock);
        let src = preprocess(&self.source);
        let tmpl = env
            .template_from_named_str(&self.name, &src)
            .map_err(|e| Error::from_jinja(&self.name, &e))?;
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages)
                .map_err(|e| Error::invalid("messages", e.to_string()))?,
        );
        ctx.insert(
            "tools".into(),
            opts.tools
                .clone()
                .map_or(serde_json::Value::Null, Into::into),
        );
        ctx.insert(
            "documents".into(),
            opts.documents
                .clone()
                .map_or(serde_json::Value::Null, Into::into),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            opts.add_generation_prompt.into(),
        );
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        let mut out = tmpl
            .render(Value::from_serialize(&ctx))
            .map_err(|e| Error::from_jinja(&self.name, &e))?;
        if opts.continue_final_message {
            let Some(last) = messages.last() else {
                return Err(Error::invalid(
                    "chat options",
                    "continue_final_message needs at least one message",
                ));
            };
            let fin = last.content.trim();
            match out.rfind(fin) {
                Some(i) if !fin.is_empty() => out.truncate(i + fin.len()),
                _ => {
                    return Err(Error::Render {
                        name: self.name.clone(),
                        line: None,
                        message: "continue_final_message: the final message's content does not appear in the rendered text".into(),
                    })
                }
            }
        }
        Ok(out)
    }
}

/// The special tokens of a tokenizer_config.json, as transformers' `special_tokens_map`
/// passes them to templates (unset tokens are absent).
fn special_tokens(cfg: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for key in [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ] {
        if let Some(tok) = cfg.get(key).and_then(token_text) {
            out.insert(key.to_string(), tok.into());
        }
    }
    if let Some(extra) = cfg
        .get("additional_special_tokens")
        .and_then(|v| v.as_array())
    {
        let list: Vec<serde_json::Value> = extra
            .iter()
            .filter_map(token_text)
            .map(Into::into)
            .collect();
        out.insert("additional_special_tokens".into(), list.into());
    }
    out
}

#[cfg(feature = "tokenizers")]
impl ChatTemplate {
    /// Renders and tokenizes, like `apply_chat_template(..., tokenize=True)`: the rendered text
    /// is encoded without adding special tokens again (the template already wrote them).
    pub fn encode(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        messages: &[Message],
        opts: &ChatOptions,
    ) -> Result<Vec<u32>> {
        let text = self.render_with(messages, opts)?;
        let enc = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// A special token in tokenizer_config.json: a string or an AddedToken object.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// transformers' `{% generation %}` tag (assistant-token masks) renders its body unchanged;
/// minijinja has no custom tags, so it becomes an always-true `if` with the same whitespace
/// control.
fn preprocess(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_string();
    }
    static RE: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| regex::Regex::new(r"\{%(-?)(\s*)(end)?generation(\s*)(-?)%\}").ok());
    match re {
        Some(re) => re
            .replace_all(src, |c: &regex::Captures<'_>| {
                let body = if c.get(3).is_some() {
                    "endif"
                } else {
                    "if true"
                };
                format!("{{%{}{}{}{}{}%}}", &c[1], &c[2], body, &c[4], &c[5])
            })
            .into_owned(),
        None => src.to_string(),
    }
}

fn chat_env<'a>(clock: Clock) -> Environment<'a> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson_filter);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("raise_exception: {msg}"),
            ))
        },
    );
    env.add_function(
        "strftime_now",
        move |fmt: String| -> Result<Value, minijinja::Error> {
            let t = match clock {
                Clock::System => crate::time::DateTime::now(),
                Clock::Fixed(y, mo, d, h, mi, s) => crate::time::DateTime::new(y, mo, d, h, mi, s),
            };
            t.strftime(&fmt)
                .map(Value::from)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
        },
    );
    env
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson_filter(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(v.as_usize().unwrap_or(0))),
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item separator, key separator)",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let opts = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    opts.write(value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Python `json.dumps` formatting.
pub(crate) struct PyJson {
    pub(crate) indent: Option<String>,
    pub(crate) item_sep: String,
    pub(crate) key_sep: String,
    pub(crate) sort_keys: bool,
    pub(crate) ensure_ascii: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &Value, level: usize, out: &mut String) -> Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&py_float(f));
                }
            }
            ValueKind::String => py_str(v.as_str().unwrap_or_default(), self.ensure_ascii, out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort_by_key(|a| a.to_string());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    let ks = match k.as_str() {
                        Some(s) => s.to_string(),
                        None => k.to_string(),
                    };
                    py_str(&ks, self.ensure_ascii, out);
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, level + 1, out)?;
                }
                self.newline(level, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(it, level + 1, out)?;
                }
                self.newline(level, out);
                out.push(']');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a value of kind {}", v.kind()),
                ))
            }
        }
        Ok(())
    }
}

/// A Python JSON string literal.
fn py_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` (as `json.dumps` writes floats).
pub(crate) fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Shortest round-trip digits, then Python's layout: fixed for 1e-4 <= |x| < 1e16.
    let e = format!("{f:e}");
    let (mant, exp) = e.split_once('e').unwrap_or((e.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let s = if exp >= 0 {
            if n > exp + 1 {
                format!(
                    "{}.{}",
                    &digits[..(exp + 1) as usize],
                    &digits[(exp + 1) as usize..]
                )
            } else {
                format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
            }
        } else {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        format!(
            "{sign}{m}e{}{:02}",
            if exp < 0 { "-" } else { "+" },
            exp.abs()
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn python_float_repr() {
        // Values checked against Python 3.11 `repr(x)`.
        for (x, want) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5e-7, "-2.5e-07"),
            (0.1, "0.1"),
            (2.71, "2.71"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(py_float(x), want, "{x}");
        }
    }

    #[test]
    fn generation_tag_becomes_if() {
        assert_eq!(
            preprocess("a{%- generation %}b{% endgeneration -%}c"),
            "a{%- if true %}b{% endif -%}c"
        );
    }
}
