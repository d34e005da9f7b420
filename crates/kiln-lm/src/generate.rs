//! Generation with a KV cache: greedy, temperature, top-k, top-p, repetition
//! penalty, stop strings and EOS, seeded sampling, batches of prompts of
//! different lengths (left padding), streaming, per-token log-probabilities.
//!
//! Logits are processed in transformers' order: repetition penalty, then
//! temperature, top-k and top-p, then argmax (temperature 0) or sampling.

use candle_core::{DType, Tensor};
use kiln_core::rng::SeededRng;
use serde::{Deserialize, Serialize};

use crate::error::{LmError, Result};
use crate::model::{Gpt2, KvCache};
use crate::tokenizer::Gpt2Tokenizer;

/// Generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// Most tokens to generate per prompt.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches this (1 = off).
    pub top_p: f64,
    /// Divide positive (multiply negative) logits of tokens already in the
    /// prompt or output by this (1 = off; CTRL's penalty, as in transformers).
    pub repetition_penalty: f64,
    /// Stop when the output contains one of these strings (cut from the text).
    pub stop: Vec<String>,
    /// The end-of-text token (`None`: never stop on a token).
    pub eos_token_id: Option<u32>,
    /// Never produce EOS, so exactly `max_new_tokens` come out (transformers'
    /// `min_new_tokens = max_new_tokens`: the EOS logit is set to -inf).
    pub ignore_eos: bool,
    /// Sampling seed.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            stop: Vec::new(),
            eos_token_id: None,
            ignore_eos: false,
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: String| Err(LmError::config("generation", f, m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be positive, got {}", self.repetition_penalty),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced the end-of-text token (included in `ids`, not in `text`).
    Eos,
    /// A stop string appeared (cut from `text`; `ids` keep the tokens).
    Stop,
    /// `max_new_tokens` or the model's context length was reached.
    Length,
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// New token ids (the prompt is not included).
    pub ids: Vec<u32>,
    /// Their text (empty without a tokenizer).
    pub text: String,
    /// Log-probability of each new token under the model (raw logits, before
    /// penalties, temperature or truncation).
    pub logprobs: Vec<f32>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Applies the repetition penalty, temperature, top-k and top-p to `scores` in
/// place (removed tokens become -inf). `seen` are the ids to penalise.
pub fn process_logits(scores: &mut [f32], seen: &[u32], cfg: &GenerationConfig) {
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        let mut done = vec![false; scores.len()];
        for &t in seen {
            let t = t as usize;
            if t < scores.len() && !done[t] {
                done[t] = true;
                let s = scores[t];
                scores[t] = if s < 0.0 { s * p } else { s / p };
            }
        }
    }
    if cfg.temperature == 0.0 {
        return;
    }
    if cfg.temperature != 1.0 {
        let inv = 1.0 / cfg.temperature as f32;
        scores.iter_mut().for_each(|s| *s *= inv);
    }
    if cfg.top_k > 0 && cfg.top_k < scores.len() {
        let mut v: Vec<f32> = scores.to_vec();
        let (_, kth, _) = v.select_nth_unstable_by(cfg.top_k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        // Ties with the k-th value are kept, as torch.topk's threshold does.
        scores
            .iter_mut()
            .filter(|s| **s < kth)
            .for_each(|s| *s = f32::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        let probs = softmax(scores);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut cum = 0.0f64;
        let mut keep = 0;
        for &i in &order {
            keep += 1;
            cum += probs[i] as f64;
            if cum >= cfg.top_p {
                break;
            }
        }
        for &i in &order[keep..] {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

fn softmax(scores: &[f32]) -> Vec<f32> {
    kiln_core::ops::softmax_row(scores)
}

/// Picks the next token from processed scores: the first maximum when greedy,
/// otherwise a draw from their softmax.
pub fn pick(scores: &[f32], greedy: bool, rng: &mut SeededRng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &s) in scores.iter().enumerate() {
            if s > scores[best] {
                best = i;
            }
        }
        best as u32
    };
    if greedy {
        return argmax();
    }
    let p = softmax(scores);
    let u = rng.uniform_f32(0.0, 1.0);
    let mut cum = 0.0f32;
    for (i, &pi) in p.iter().enumerate() {
        cum += pi;
        if u < cum {
            return i as u32;
        }
    }
    argmax()
}

/// Receives `(row, text piece)` as generation produces text.
pub type TextSink<'a> = &'a mut dyn FnMut(usize, &str);

/// Where the stream of one row stands.
struct Row {
    prompt: Vec<u32>,
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    text: String,
    finish: Option<FinishReason>,
    rng: SeededRng,
    emitted: usize,
}

/// Generates continuations of `prompts` (token ids, any lengths) as one batch
/// with a KV cache. Shorter prompts are left-padded and masked, so each row
/// gets the same tokens as it would alone. With a tokenizer, stop strings are
/// honoured and `text` is filled; `on_text(row, piece)` receives text as it is
/// produced (held back while it could still turn into a stop string, or while a
/// character is incomplete).
pub fn generate_batch(
    model: &Gpt2,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Gpt2Tokenizer>,
    mut on_text: Option<TextSink<'_>>,
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let mcfg = model.config();
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(LmError::Input(format!(
                "prompt {i} is empty; start it with at least one token (e.g. <|endoftext|>)"
            )));
        }
        if let Some(&t) = p.iter().find(|&&t| t as usize >= mcfg.vocab_size) {
            return Err(LmError::Input(format!(
                "prompt {i} has token id {t}, outside the model's vocabulary 0..{}",
                mcfg.vocab_size
            )));
        }
    }
    if !cfg.stop.is_empty() && tokenizer.is_none() {
        return Err(LmError::Input("stop strings need a tokenizer".into()));
    }
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest >= mcfg.n_positions {
        return Err(LmError::Input(format!(
            "prompt of {longest} tokens leaves no room in the model's context of {}",
            mcfg.n_positions
        )));
    }
    let pad_id = cfg.eos_token_id.or(mcfg.eos_token_id).unwrap_or(0);
    let pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut flat = Vec::with_capacity(b * longest);
    for p in prompts {
        flat.extend(std::iter::repeat_n(pad_id, longest - p.len()));
        flat.extend_from_slice(p);
    }
    let dev = model.device();
    let input = Tensor::from_vec(flat, (b, longest), dev)?;
    let mut cache = KvCache::with_left_padding(mcfg.n_layer, pads);
    let mut logits = model.forward_cached(&input, &mut cache, false)?;
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Row {
            prompt: p.clone(),
            ids: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            finish: None,
            rng: SeededRng::derive(cfg.seed, &[i as u64]),
            emitted: 0,
        })
        .collect();
    let greedy = cfg.temperature == 0.0;
    let (eos, banned) = if cfg.ignore_eos {
        (None, cfg.eos_token_id.or(mcfg.eos_token_id))
    } else {
        (cfg.eos_token_id, None)
    };
    let max_stop = cfg.stop.iter().map(String::len).max().unwrap_or(0);
    for step in 0..cfg.max_new_tokens {
        let all: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (r, row) in rows.iter_mut().enumerate() {
            if row.finish.is_some() {
                next.push(pad_id);
                continue;
            }
            let raw = &all[r];
            let mut scores = raw.clone();
            if cfg.repetition_penalty != 1.0 {
                let seen: Vec<u32> = row.prompt.iter().chain(&row.ids).copied().collect();
                process_logits(&mut scores, &seen, cfg);
            } else {
                process_logits(&mut scores, &[], cfg);
            }
            if let Some(e) = banned.filter(|&e| (e as usize) < scores.len()) {
                scores[e as usize] = f32::NEG_INFINITY;
            }
            let t = pick(&scores, greedy, &mut row.rng);
            row.ids.push(t);
            row.logprobs
                .push(kiln_core::ops::log_softmax_at(raw, t as usize));
            next.push(t);
            if Some(t) == eos {
                row.finish = Some(FinishReason::Eos);
            }
            if let Some(tok) = tokenizer {
                let body = match row.finish {
                    Some(FinishReason::Eos) => &row.ids[..row.ids.len() - 1],
                    _ => &row.ids[..],
                };
                row.text = tok.decode(body)?;
                if row.finish.is_none() {
                    if let Some(cut) = cfg
                        .stop
                        .iter()
                        .filter_map(|s| row.text.find(s.as_str()))
                        .min()
                    {
                        row.text.truncate(cut);
                        row.finish = Some(FinishReason::Stop);
                    }
                }
                if let Some(f) = on_text.as_deref_mut() {
                    emit(row, max_stop, f, r);
                }
            }
        }
        let context_full = cache.len() + 1 >= mcfg.n_positions;
        if step + 1 == cfg.max_new_tokens || context_full {
            for row in rows.iter_mut().filter(|r| r.finish.is_none()) {
                row.finish = Some(FinishReason::Length);
            }
        }
        if let Some(f) = on_text.as_deref_mut() {
            for (r, row) in rows.iter_mut().enumerate() {
                if row.finish.is_some() {
                    emit(row, 0, f, r);
                }
            }
        }
        if rows.iter().all(|r| r.finish.is_some()) {
            break;
        }
        let step_ids = Tensor::from_vec(next, (b, 1), dev)?;
        logits = model.forward_cached(&step_ids, &mut cache, false)?;
    }
    Ok(rows
        .into_iter()
        .map(|r| Generation {
            ids: r.ids,
            text: r.text,
            logprobs: r.logprobs,
            finish: r.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}

/// Sends the row's new text, holding back a tail that could be the start of a
/// stop string (`hold` bytes at most) or an incomplete character.
fn emit(row: &mut Row, hold: usize, f: &mut dyn FnMut(usize, &str), r: usize) {
    let text = &row.text;
    let mut end = if row.finish.is_some() {
        text.len()
    } else {
        let mut e = text.len().saturating_sub(hold.saturating_sub(1));
        if text.ends_with('\u{FFFD}') {
            e = e.min(text.len() - '\u{FFFD}'.len_utf8());
        }
        e
    };
    while end > row.emitted && !text.is_char_boundary(end) {
        end -= 1;
    }
    if end > row.emitted {
        f(r, &text[row.emitted..end]);
        row.emitted = end;
    }
}

/// Generates from one text prompt; `on_text` receives the continuation as it
/// is produced. EOS defaults to the tokenizer's `<|endoftext|>` when the
/// config names none.
pub fn generate_text(
    model: &Gpt2,
    tokenizer: &Gpt2Tokenizer,
    prompt: &str,
    cfg: &GenerationConfig,
    on_text: Option<&mut dyn FnMut(&str)>,
) -> Result<Generation> {
    let mut cfg = cfg.clone();
    if cfg.eos_token_id.is_none() {
        cfg.eos_token_id = tokenizer.eos_id().or(model.config().eos_token_id);
    }
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        // An empty prompt starts from <|endoftext|>, as GPT-2 was trained.
        ids.push(cfg.eos_token_id.unwrap_or(0));
    }
    let mut wrapped = on_text.map(|f| move |_: usize, s: &str| f(s));
    let cb = wrapped.as_mut().map(|f| f as &mut dyn FnMut(usize, &str));
    let mut out = generate_batch(model, &[ids], &cfg, Some(tokenizer), cb)?;
    out.pop()
        .ok_or_else(|| LmError::Input("generation returned nothing".into()))
}

/// A GPT-2 with its tokenizer, usable wherever kiln-prompt wants a
/// [`kiln_prompt::TextGenerator`].
///
/// A prompt that leaves fewer than `max_new_tokens` positions of the model's
/// context gets a shorter answer: [`LmGenerator::context_cuts`] counts those
/// answers so that callers can say so ([`ContextCuts::warning`]); a prompt
/// that fills the whole context is an error.
#[derive(Debug, Clone)]
pub struct LmGenerator {
    /// The model.
    pub model: Gpt2,
    /// Its tokenizer.
    pub tokenizer: Gpt2Tokenizer,
    /// Name for reports.
    pub name: String,
    /// Settings kiln-prompt's parameters do not cover (top-k, repetition penalty).
    pub base: GenerationConfig,
    /// Answers cut short by the model's context so far.
    pub cuts: ContextCuts,
}

/// Answers an [`LmGenerator`] cut short because prompt plus answer reached
/// the model's context length.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContextCuts {
    /// Generations run.
    pub generations: usize,
    /// Of those, answers that stopped at the end of the context before
    /// `max_new_tokens`.
    pub answers: usize,
    /// New tokens those answers fell short of `max_new_tokens` by, in all.
    pub tokens: usize,
    /// The longest prompt among them, in tokens.
    pub longest_prompt: usize,
    /// The model's context length (`n_positions`).
    pub context: usize,
}

impl ContextCuts {
    /// A warning naming the cut answers, the tokens lost and the context
    /// length; `None` when nothing was cut.
    pub fn warning(&self) -> Option<String> {
        (self.answers > 0).then(|| {
            format!(
                "{} of {} answers were cut at the model's context of {} tokens, {} tokens \
                 short of --max-new-tokens in all (prompts of up to {} tokens leave less room \
                 than asked for; shorten the prompts or lower --max-new-tokens)",
                self.answers, self.generations, self.context, self.tokens, self.longest_prompt
            )
        })
    }
}

impl LmGenerator {
    /// A generator with transformers' default sampling settings.
    pub fn new(model: Gpt2, tokenizer: Gpt2Tokenizer, name: impl Into<String>) -> Self {
        Self {
            model,
            tokenizer,
            name: name.into(),
            base: GenerationConfig::default(),
            cuts: ContextCuts::default(),
        }
    }

    /// Answers cut short by the context so far.
    pub fn context_cuts(&self) -> &ContextCuts {
        &self.cuts
    }
}

impl kiln_prompt::TextGenerator for LmGenerator {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn generate(
        &mut self,
        prompt: &str,
        params: &kiln_prompt::GenParams,
    ) -> std::result::Result<String, kiln_prompt::BoxError> {
        let cfg = GenerationConfig {
            max_new_tokens: params.max_new_tokens,
            temperature: params.temperature as f64,
            top_p: params.top_p as f64,
            seed: params.seed,
            stop: params.stop.clone(),
            ..self.base.clone()
        };
        let context = self.model.config().n_positions;
        let prompt_len = self.tokenizer.encode(prompt)?.len().max(1);
        if prompt_len >= context {
            return Err(LmError::Input(format!(
                "a prompt of {prompt_len} tokens fills the model's context of {context} tokens \
                 and leaves no room for an answer; shorten the prompt"
            ))
            .into());
        }
        let out = generate_text(&self.model, &self.tokenizer, prompt, &cfg, None)?;
        self.cuts.generations += 1;
        self.cuts.context = context;
        // Length before max_new_tokens: the context ran out.
        if out.finish == FinishReason::Length && out.ids.len() < cfg.max_new_tokens {
            self.cuts.answers += 1;
            self.cuts.tokens += cfg.max_new_tokens - out.ids.len();
            self.cuts.longest_prompt = self.cuts.longest_prompt.max(prompt_len);
        }
        Ok(out.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_matches_transformers_rule() {
        let mut s = vec![2.0, -2.0, 1.0];
        let cfg = GenerationConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        process_logits(&mut s, &[0, 1, 1], &cfg);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let mut s = vec![1.0, 3.0, 2.0, 0.0];
        process_logits(&mut s, &[], &cfg);
        assert_eq!(s[1], 3.0);
        assert_eq!(s[2], 2.0);
        assert!(s[0].is_infinite() && s[3].is_infinite());
        // probs of [ln .5, ln .3, ln .2]: top_p 0.7 keeps the first two (0.8 >= 0.7).
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_p: 0.7,
            ..Default::default()
        };
        let mut s = vec![0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        process_logits(&mut s, &[], &cfg);
        assert!(s[0].is_finite() && s[1].is_finite() && s[2].is_infinite());
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let scores = vec![0.0f32, 1.0f32.ln() + 1.0, 2.0];
        let p = softmax(&scores);
        let mut rng = SeededRng::new(7);
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[pick(&scores, false, &mut rng) as usize] += 1;
        }
        for i in 0..3 {
            let f = counts[i] as f32 / n as f32;
            assert!((f - p[i]).abs() < 0.015, "token {i}: {f} vs {}", p[i]);
        }
        let a: Vec<u32> = {
            let mut r = SeededRng::new(3);
            (0..10).map(|_| pick(&scores, false, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = SeededRng::new(3);
            (0..10).map(|_| pick(&scores, false, &mut r)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn bad_settings_are_rejected_by_name() {
        let cfg = GenerationConfig {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("top_p"));
    }
}
