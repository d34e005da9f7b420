//! The crate's error type.

use std::path::PathBuf;

/// A boxed error from a [`crate::TextGenerator`] implementation.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in kiln-prompt. Each message names the place
/// (file, field, line, variable) and says what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {action} failed: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("read", "write", "list").
        action: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A TOML or JSON document did not parse, or had unknown/missing fields.
    #[error("{place}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        /// The file (or a description such as `"spec (TOML string)"`).
        place: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What the parser said (it names unknown and missing fields).
        message: String,
    },
    /// A value in a spec, case or check is out of range or inconsistent.
    #[error("{place}: {message}")]
    Invalid {
        /// Where: file and field path, e.g. `spec.toml: output.count`.
        place: String,
        /// What was wrong and what is expected.
        message: String,
    },
    /// A template (prompt text or chat template) has a syntax error.
    #[error("template {name:?}{}: syntax error: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    TemplateSyntax {
        /// The template's name (the spec field or chat template source).
        name: String,
        /// 1-based line within the template, when known.
        line: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// Variables a template uses were not given.
    #[error("{name}: missing variable{} {}{}; the template uses {}; pass each with a value (e.g. --var {}=...)",
        if missing.len() == 1 { "" } else { "s" }, quoted(missing),
        if used_in.is_empty() { String::new() } else { format!(" (used in {})", used_in.join(", ")) },
        quoted(declared), missing.first().map(String::as_str).unwrap_or("name"))]
    MissingVariables {
        /// The template or spec.
        name: String,
        /// The variables that were used but not given.
        missing: Vec<String>,
        /// The fields that use them (for a spec; empty for a single template).
        used_in: Vec<String>,
        /// All variables the template uses.
        declared: Vec<String>,
    },
    /// Variables were given that no template uses (usually a typo).
    #[error("{name}: unused variable{} {}; the template uses {}", if unused.len() == 1 { "" } else { "s" }, quoted(unused), quoted(declared))]
    UnusedVariables {
        /// The template or spec.
        name: String,
        /// The variables given but never used.
        unused: Vec<String>,
        /// All variables the template uses.
        declared: Vec<String>,
    },
    /// A template failed while rendering (e.g. `raise_exception` in a chat template).
    #[error("template {name:?}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Render {
        /// The template's name.
        name: String,
        /// 1-based line within the template, when known.
        line: Option<usize>,
        /// What went wrong.
        message: String,
    },
    /// A JSON Schema is not a valid schema.
    #[error("{place}: invalid JSON Schema: {message}")]
    InvalidSchema {
        /// Where the schema was given.
        place: String,
        /// What the schema compiler said.
        message: String,
    },
    /// A regular expression did not compile.
    #[error("{place}: invalid regex {pattern:?}: {message}")]
    InvalidRegex {
        /// Where the pattern was given.
        place: String,
        /// The pattern.
        pattern: String,
        /// What the regex compiler said.
        message: String,
    },
    /// The prompt does not fit the token budget even after every allowed cut.
    #[error("prompt needs {needed} tokens but the budget allows {available} (context {context_size} - {reserved} reserved for output) after cutting {cuts} part(s); shorten the task, constraints or input, or raise the context size")]
    BudgetExceeded {
        /// Tokens of the smallest prompt reachable.
        needed: usize,
        /// Tokens available for the prompt.
        available: usize,
        /// The context size.
        context_size: usize,
        /// Tokens reserved for the output.
        reserved: usize,
        /// How many parts were cut before giving up.
        cuts: usize,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The text generator failed.
    #[error("generator {generator:?} failed on attempt {attempt}: {source}")]
    Generator {
        /// The generator's name.
        generator: String,
        /// 1-based attempt number.
        attempt: usize,
        /// The generator's error.
        source: BoxError,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn quoted(names: &[String]) -> String {
    if names.is_empty() {
        return "no variables".to_string();
    }
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }

    pub(crate) fn invalid(place: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            place: place.into(),
            message: message.into(),
        }
    }

    /// Converts a minijinja error from compiling or rendering template `name`.
    pub(crate) fn from_jinja(name: &str, e: &minijinja::Error) -> Self {
        use minijinja::ErrorKind;
        let mut message = match e.detail() {
            Some(d) => format!("{}: {d}", kind_text(e.kind())),
            None => kind_text(e.kind()),
        };
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            message.push_str(&format!(" (caused by: {s})"));
            src = s.source();
        }
        match e.kind() {
            ErrorKind::SyntaxError | ErrorKind::BadEscape => Error::TemplateSyntax {
                name: name.to_string(),
                line: e.line(),
                message: e.detail().map_or(message, str::to_string),
            },
            _ => Error::Render {
                name: name.to_string(),
                line: e.line(),
                message,
            },
        }
    }
}

fn kind_text(k: minijinja::ErrorKind) -> String {
    use minijinja::ErrorKind as K;
    match k {
        K::InvalidOperation => "invalid operation".into(),
        K::UndefinedError => "undefined value".into(),
        K::UnknownFilter => "unknown filter".into(),
        K::UnknownFunction => "unknown function".into(),
        K::UnknownTest => "unknown test".into(),
        K::UnknownMethod => "unknown method".into(),
        K::MissingArgument => "missing argument".into(),
        K::TooManyArguments => "too many arguments".into(),
        K::SyntaxError => "syntax error".into(),
        other => format!("{other}"),
    }
}

/// Builds a [`Error::Parse`] from a TOML error in `place`.
/// Reads a spec, cases file or template as Python's text mode would: a
/// leading byte-order mark dropped and Windows line ends made `\n`, so a file
/// saved on Windows renders the same prompts (a `\r` inside a TOML
/// multi-line string otherwise ends every line of the prompt).
pub(crate) fn read_text(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(text.replace("\r\n", "\n"))
}

pub(crate) fn toml_error(place: &str, text: &str, e: &toml::de::Error) -> Error {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    Error::Parse {
        place: place.to_string(),
        line,
        message: e.message().trim().to_string(),
    }
}

/// Builds a [`Error::Parse`] from a JSON error in `place`.
pub(crate) fn json_error(place: &str, e: &serde_json::Error) -> Error {
    let line = (e.line() > 0).then_some(e.line());
    let mut message = e.to_string();
    // serde_json appends " at line L column C"; the line is reported separately.
    if let Some(i) = message.rfind(" at line ") {
        message = format!("{} (column {})", &message[..i], e.column());
    }
    Error::Parse {
        place: place.to_string(),
        line,
        message,
    }
}
