//! A deterministic built-in generator for tests, demos and evaluation dry runs.

use regex::Regex;
use serde_json::{json, Map, Value};

use crate::error::BoxError;
use crate::generate::{GenParams, TextGenerator, REASK_HEADER};

/// A deterministic stand-in for a language model: it follows only the instructions it can
/// read in the prompt (bullet counts, JSON and JSON Schemas, fenced code, word limits, terms to
/// mention or avoid — in the wording kiln-prompt's specs and re-ask messages use), builds its
/// answer from sentences of the prompt's context and input, and on a seeded fraction of first
/// attempts (`slip_rate`) makes one mistake a real model makes: an extra bullet, chatter around
/// JSON, an untagged fence, a long answer. Re-asked, it slips a quarter as often.
///
/// With no format instruction it answers in chatty prose, so a vague prompt scores worse than
/// an explicit one, which is the point of evaluating prompts.
///
/// The same prompt, seed and `slip_rate` always give the same output.
#[derive(Debug, Clone)]
pub struct RuleGenerator {
    /// Probability of a slip on a first attempt, in [0, 1].
    pub slip_rate: f64,
}

impl Default for RuleGenerator {
    fn default() -> Self {
        RuleGenerator { slip_rate: 0.3 }
    }
}

impl RuleGenerator {
    /// A generator with the given slip rate.
    pub fn new(slip_rate: f64) -> Self {
        RuleGenerator {
            slip_rate: slip_rate.clamp(0.0, 1.0),
        }
    }
}

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Debug, Default)]
struct Wants {
    bullets: Option<(usize, usize)>,
    json: bool,
    schema: Option<Value>,
    code: Option<String>,
    max_words: Option<usize>,
    mention: Vec<String>,
    avoid: Vec<String>,
}

fn last_cap<'a>(re: &Regex, text: &'a str) -> Option<regex::Captures<'a>> {
    re.captures_iter(text).last()
}

fn re(p: &str) -> Option<Regex> {
    Regex::new(p).ok()
}

fn terms(list: &str) -> Vec<String> {
    list.trim_end_matches(['.', ')'])
        .split(',')
        .map(|t| t.trim().trim_matches('"').to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn read_wants(prompt: &str) -> Wants {
    let mut w = Wants::default();
    let num =
        |c: &regex::Captures<'_>, i: usize| c.get(i).and_then(|m| m.as_str().parse::<usize>().ok());
    if let Some(r) = re(r"exactly (\d+) bullet points?") {
        if let Some(c) = last_cap(&r, prompt) {
            let n = num(&c, 1).unwrap_or(3);
            w.bullets = Some((n, n));
        }
    }
    if w.bullets.is_none() {
        if let Some(c) =
            re(r"between (\d+) and (\d+) bullet points").and_then(|r| last_cap(&r, prompt))
        {
            w.bullets = Some((num(&c, 1).unwrap_or(2), num(&c, 2).unwrap_or(4)));
        } else if let Some(c) =
            re(r"at least (\d+) bullet points?").and_then(|r| last_cap(&r, prompt))
        {
            let n = num(&c, 1).unwrap_or(3);
            w.bullets = Some((n, n + 1));
        } else if let Some(c) =
            re(r"at most (\d+) bullet points?").and_then(|r| last_cap(&r, prompt))
        {
            let n = num(&c, 1).unwrap_or(3);
            w.bullets = Some((1.max(n.saturating_sub(1)), n));
        } else if prompt.contains("a list of bullet points") {
            w.bullets = Some((3, 3));
        }
    }
    if let Some(c) =
        re(r"(?s)JSON Schema[^\n]*\n```json\n(.*?)\n```").and_then(|r| last_cap(&r, prompt))
    {
        w.schema = c.get(1).and_then(|m| serde_json::from_str(m.as_str()).ok());
        w.json = true;
    }
    if prompt.contains("single JSON value")
        || prompt.contains("must be valid JSON")
        || prompt.contains("must be JSON")
    {
        w.json = true;
    }
    if let Some(c) = re(r"(?:code in one fenced code block|fenced code block in \w+) \(```(\w+)")
        .and_then(|r| last_cap(&r, prompt))
    {
        w.code = c.get(1).map(|m| m.as_str().to_string());
    }
    if let Some(c) = re(r"at most (\d+) words").and_then(|r| last_cap(&r, prompt)) {
        w.max_words = num(&c, 1);
    }
    if let Some(r) = re(r"must mention (?:all of|at least one of): ([^\n(]+)") {
        for c in r.captures_iter(prompt) {
            w.mention
                .extend(c.get(1).map(|m| terms(m.as_str())).unwrap_or_default());
        }
    }
    if let Some(r) = re(r"must not mention: ([^\n(]+)") {
        for c in r.captures_iter(prompt) {
            w.avoid
                .extend(c.get(1).map(|m| terms(m.as_str())).unwrap_or_default());
        }
    }
    w
}

/// Sentences of the `## Context` and `## Input` sections (or of the task).
fn material(prompt: &str) -> Vec<String> {
    let mut picked = String::new();
    let mut take = false;
    let mut task = String::new();
    let mut in_task = false;
    for line in prompt.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            take = matches!(h.trim(), "Context" | "Input");
            in_task = h.trim() == "Task";
            continue;
        }
        if line.starts_with("### ") || line.starts_with("<|") || line.starts_with("```") {
            continue;
        }
        if take {
            picked.push_str(line);
            picked.push(' ');
        } else if in_task {
            task.push_str(line);
            task.push(' ');
        }
    }
    let src = if picked.trim().is_empty() {
        if task.trim().is_empty() {
            prompt.to_string()
        } else {
            task
        }
    } else {
        picked
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in src.split_whitespace() {
        let word = word.trim_start_matches(['-', '*', '•']);
        if word.is_empty() || word.contains("<|") {
            continue;
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
        if word.ends_with(['.', '!', '?']) {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.trim().is_empty() {
        out.push(format!("{}.", cur.trim_end_matches([',', ';', ':'])));
    }
    if out.is_empty() {
        out.push("There is nothing to add.".into());
    }
    out
}

fn without(sentences: &[String], avoid: &[String]) -> Vec<String> {
    let kept: Vec<String> = sentences
        .iter()
        .filter(|s| {
            !avoid
                .iter()
                .any(|a| s.to_lowercase().contains(&a.to_lowercase()))
        })
        .cloned()
        .collect();
    if kept.is_empty() {
        vec!["There is nothing to add.".into()]
    } else {
        kept
    }
}

fn phrase(s: &str, words: usize) -> String {
    let ws: Vec<&str> = s.split_whitespace().take(words).collect();
    ws.join(" ")
        .trim_end_matches(['.', ',', ';', ':'])
        .to_string()
}

fn instance(schema: &Value, rng: &mut Rng, mat: &[String], depth: usize) -> Value {
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(e) = schema
        .get("enum")
        .and_then(|e| e.as_array())
        .filter(|e| !e.is_empty())
    {
        return e[rng.below(e.len())].clone();
    }
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(|t| t.as_str())
            .find(|t| *t != "null")
            .unwrap_or("null")
            .to_string(),
        _ if schema.get("properties").is_some() => "object".into(),
        _ if schema.get("items").is_some() => "array".into(),
        _ => "string".into(),
    };
    match ty.as_str() {
        "object" if depth < 6 => {
            let mut m = Map::new();
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (k, s) in props {
                    m.insert(k.clone(), instance(s, rng, mat, depth + 1));
                }
            }
            Value::Object(m)
        }
        "array" if depth < 6 => {
            let min = schema.get("minItems").and_then(Value::as_u64).unwrap_or(2) as usize;
            let max = schema
                .get("maxItems")
                .and_then(Value::as_u64)
                .map_or(usize::MAX, |m| m as usize);
            let n = min.max(1).min(max);
            let item = schema
                .get("items")
                .cloned()
                .unwrap_or(json!({"type": "string"}));
            Value::Array(
                (0..n)
                    .map(|_| instance(&item, rng, mat, depth + 1))
                    .collect(),
            )
        }
        "integer" => json!(
            schema
                .get("minimum")
                .and_then(Value::as_i64)
                .unwrap_or(1)
                .max(0)
                + rng.below(3) as i64
        ),
        "number" => json!(schema.get("minimum").and_then(Value::as_f64).unwrap_or(0.5) + 0.25),
        "boolean" => json!(rng.below(2) == 0),
        "null" => Value::Null,
        _ => {
            if schema.get("format").and_then(Value::as_str) == Some("date") {
                return json!("2024-07-26");
            }
            let s = phrase(&mat[rng.below(mat.len())], 8);
            let max = schema
                .get("maxLength")
                .and_then(Value::as_u64)
                .map_or(usize::MAX, |m| m as usize);
            json!(s.chars().take(max).collect::<String>())
        }
    }
}

impl TextGenerator for RuleGenerator {
    fn name(&self) -> String {
        format!("rule-based (slip rate {})", self.slip_rate)
    }

    fn generate(
        &mut self,
        prompt: &str,
        params: &GenParams,
    ) -> std::result::Result<String, BoxError> {
        let mut rng = Rng(fnv(prompt) ^ params.seed.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let reask = prompt.contains(REASK_HEADER);
        let slip_p = if reask {
            self.slip_rate / 4.0
        } else {
            self.slip_rate
        };
        let slip = rng.unit() < slip_p;
        let w = read_wants(prompt);
        let mut mat = without(&material(prompt), &w.avoid);
        // Rotate the material so different material/seeds lead with different sentences; the
        // same material keeps its order across re-asks, so a re-ask fixes rather than rewrites.
        let k = Rng(fnv(&mat.join(" ")) ^ params.seed).below(mat.len());
        mat.rotate_left(k);
        let mention = if w.mention.is_empty() {
            String::new()
        } else {
            format!("This concerns {}.", w.mention.join(" and "))
        };
        let out = if let Some(lang) = &w.code {
            let body: Vec<String> = mat.iter().take(2).map(|s| format!("// {s}")).collect();
            let fence = if slip { String::new() } else { lang.clone() };
            let extra = if mention.is_empty() {
                String::new()
            } else {
                format!("// {mention}\n")
            };
            format!(
                "```{fence}\n{extra}{}\nfn main() {{}}\n```",
                body.join("\n")
            )
        } else if w.json {
            let v = match &w.schema {
                Some(s) => instance(s, &mut rng, &mat, 0),
                None => json!({ "answer": phrase(&mat[0], 12) }),
            };
            let text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into());
            if slip {
                format!("Sure! Here is the JSON you asked for:\n{text}")
            } else {
                text
            }
        } else if let Some((lo, hi)) = w.bullets {
            let mut n = lo + rng.below(hi - lo + 1);
            if slip {
                n += 1;
            }
            let mut items: Vec<String> = (0..n)
                .map(|i| format!("- {}", phrase(&mat[i % mat.len()], 24)))
                .collect();
            if !mention.is_empty() && !items.is_empty() {
                items[0] = format!("- {}", mention.trim_end_matches('.'));
            }
            items.join("\n")
        } else {
            let limit = w.max_words.unwrap_or(60);
            let limit = if slip { limit * 2 + 5 } else { limit };
            let mut words: Vec<String> = Vec::new();
            if w.max_words.is_none() {
                words.push("Sure!".into());
            }
            words.extend(mention.split_whitespace().map(String::from));
            let mut i = 0;
            while words.len() < limit && i < mat.len() * 4 {
                let s = &mat[i % mat.len()];
                let ws: Vec<&str> = s.split_whitespace().collect();
                if words.len() + ws.len() > limit {
                    break;
                }
                words.extend(ws.iter().map(|x| x.to_string()));
                i += 1;
                if i >= mat.len() && !slip {
                    break;
                }
            }
            if words.is_empty() {
                words.push("Done.".into());
            }
            words.join(" ")
        };
        let mut out = out;
        if let Some(max_tokens) = Some(params.max_new_tokens).filter(|m| *m > 0) {
            // One "token" per whitespace-separated word is close enough for a stand-in.
            let ws: Vec<&str> = out.split_inclusive(char::is_whitespace).collect();
            if ws.len() > max_tokens {
                out = ws[..max_tokens].concat().trim_end().to_string();
            }
        }
        for s in &params.stop {
            if let Some(i) = out.find(s.as_str()) {
                out.truncate(i);
            }
        }
        Ok(out)
    }
}
