//! Strict text templates with named variables.
//!
//! Templates use Jinja syntax (`{{ name }}`, `{% if %}`, `{% for %}`, filters), rendered by
//! minijinja. Unlike a plain Jinja environment, a [`Template`] never renders a silent blank:
//! rendering fails with [`Error::MissingVariables`] listing every variable the template uses
//! but was not given, and with [`Error::UnusedVariables`] listing every variable given but
//! not used (usually a typo).

use std::collections::{BTreeMap, BTreeSet};

use minijinja::{Environment, UndefinedBehavior};

use crate::error::{Error, Result};

/// Variables for a template: names to JSON values (strings, numbers, lists, objects).
pub type Vars = BTreeMap<String, serde_json::Value>;

/// Builds [`Vars`] from pairs.
///
/// ```
/// let v = kiln_prompt::vars([("topic", "GANs"), ("audience", "students")]);
/// assert_eq!(v["topic"], "GANs");
/// ```
pub fn vars<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Vars
where
    K: Into<String>,
    V: Into<serde_json::Value>,
{
    pairs
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

/// Parses `k=v` assignments (as given on a command line) into [`Vars`]; every value is a string.
pub fn parse_var_assignments<S: AsRef<str>>(items: &[S]) -> Result<Vars> {
    let mut out = Vars::new();
    for item in items {
        let item = item.as_ref();
        let Some((k, v)) = item.split_once('=') else {
            return Err(Error::invalid(
                format!("--var {item:?}"),
                "expected NAME=VALUE",
            ));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(Error::invalid(
                format!("--var {item:?}"),
                "the variable name before '=' is empty",
            ));
        }
        if out.insert(k.to_string(), v.into()).is_some() {
            return Err(Error::invalid(format!("--var {k}"), "given more than once"));
        }
    }
    Ok(out)
}

/// The environment used for strict prompt templates.
pub(crate) fn strict_env<'a>() -> Environment<'a> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env
}

/// A compiled template with named variables.
///
/// ```
/// use kiln_prompt::{vars, Template};
/// let t = Template::new("greeting", "Hello {{ name }}, welcome to {{ place }}.")?;
/// assert_eq!(t.variables().iter().collect::<Vec<_>>(), ["name", "place"]);
/// assert_eq!(t.render(&vars([("name", "Ada"), ("place", "kiln")]))?, "Hello Ada, welcome to kiln.");
/// // A missing variable is an error naming it, never a blank:
/// let err = t.render(&vars([("name", "Ada")])).unwrap_err();
/// assert!(err.to_string().contains("missing variable `place`"));
/// # Ok::<(), kiln_prompt::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Template {
    name: String,
    source: String,
    variables: BTreeSet<String>,
}

impl Template {
    /// Compiles `source`; `name` is used in error messages (a file and field, say).
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let source = source.into();
        let env = strict_env();
        let tmpl = env
            .template_from_named_str(&name, &source)
            .map_err(|e| Error::from_jinja(&name, &e))?;
        let globals: BTreeSet<String> = env.globals().map(|(k, _)| k.to_string()).collect();
        let variables = tmpl
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !globals.contains(v))
            .collect();
        Ok(Template {
            name,
            source,
            variables,
        })
    }

    /// The template's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The variables the template uses (top-level names), sorted.
    pub fn variables(&self) -> &BTreeSet<String> {
        &self.variables
    }

    /// Renders with exactly these variables: a missing or an unused variable is an error.
    pub fn render(&self, vars: &Vars) -> Result<String> {
        let unused: Vec<String> = vars
            .keys()
            .filter(|k| !self.variables.contains(*k))
            .cloned()
            .collect();
        if !unused.is_empty() {
            return Err(Error::UnusedVariables {
                name: self.name.clone(),
                unused,
                declared: self.variables.iter().cloned().collect(),
            });
        }
        self.render_lenient_unused(vars)
    }

    /// Renders, failing on missing variables but ignoring extra ones (used when several
    /// templates share one set of variables and unused ones are checked across all of them).
    pub fn render_lenient_unused(&self, vars: &Vars) -> Result<String> {
        let missing: Vec<String> = self
            .variables
            .iter()
            .filter(|v| !vars.contains_key(*v))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(Error::MissingVariables {
                name: self.name.clone(),
                missing,
                used_in: vec![],
                declared: self.variables.iter().cloned().collect(),
            });
        }
        let env = strict_env();
        let tmpl = env
            .template_from_named_str(&self.name, &self.source)
            .map_err(|e| Error::from_jinja(&self.name, &e))?;
        tmpl.render(minijinja::Value::from_serialize(vars))
            .map_err(|e| Error::from_jinja(&self.name, &e))
    }
}
