//! Completion log-probabilities of a causal LM, without a `[B, T, V]`
//! log-softmax: only the positions that predict a completion token get
//! logits at all (`[N, V]` for the `N` completion tokens of the batch, prompt
//! and padding positions are skipped), and
//! [`kiln_core::ops::token_logprobs`] reads each target's log-probability
//! from them in one pass forward and one backward.
//!
//! Rows are `prompt ++ completion`, right-padded (causal attention: padding
//! after a row's end changes nothing before it). Position `t` predicts token
//! `t + 1`, so a completion token is counted when something precedes it: all
//! of them when the prompt is not empty (TRL's shifted completion mask).

use candle_core::{DType, Device, Tensor, D};
use kiln_lm::Gpt2;

use crate::error::{Result, RlhfError};
use crate::loss::SequenceLogps;
use crate::prefs::EncodedPair;

/// A right-padded batch of `prompt ++ completion` rows and the positions of
/// their completion tokens.
#[derive(Debug, Clone)]
pub struct CompletionBatch {
    /// `[R, L]` input ids (each row without its last token, right-padded).
    pub inputs: Tensor,
    /// `[N]` flat indices `r * L + t` of the positions that predict a
    /// completion token.
    pub positions: Tensor,
    /// `[N]` the completion tokens they predict.
    pub targets: Tensor,
    /// `[R, N]` 1 where token `n` belongs to row `r`: sums per row.
    pub segments: Tensor,
    /// Completion tokens predicted in each row.
    pub tokens: Vec<usize>,
}

impl CompletionBatch {
    /// Builds the batch from `(prompt, completion)` rows; `pad` fills the
    /// right. Every row needs at least two tokens in all and one completion
    /// token that something precedes.
    pub fn new(rows: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
        if rows.is_empty() {
            return Err(RlhfError::Input("an empty batch".into()));
        }
        let r = rows.len();
        let len = rows
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0);
        if len < 2 {
            return Err(RlhfError::Input(
                "every row needs at least two tokens (a prompt token and a completion token)"
                    .into(),
            ));
        }
        let l = len - 1;
        let mut inputs = Vec::with_capacity(r * l);
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        let mut owner = Vec::new();
        let mut tokens = vec![0usize; r];
        for (i, (p, c)) in rows.iter().enumerate() {
            let seq: Vec<u32> = p.iter().chain(c.iter()).copied().collect();
            let n_in = seq.len().saturating_sub(1);
            inputs.extend_from_slice(&seq[..n_in]);
            inputs.extend(std::iter::repeat_n(pad, l - n_in));
            for (j, &tok) in seq.iter().enumerate().skip(p.len().max(1)) {
                positions.push((i * l + j - 1) as u32);
                targets.push(tok);
                owner.push(i);
                tokens[i] += 1;
            }
            if tokens[i] == 0 {
                return Err(RlhfError::Input(format!(
                    "row {i} has no completion token to score (prompt {} tokens, completion {})",
                    p.len(),
                    c.len()
                )));
            }
        }
        let n = positions.len();
        let mut seg = vec![0f32; r * n];
        for (k, &o) in owner.iter().enumerate() {
            seg[o * n + k] = 1.0;
        }
        Ok(Self {
            inputs: Tensor::from_vec(inputs, (r, l), device)?,
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            segments: Tensor::from_vec(seg, (r, n), device)?,
            tokens,
        })
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

/// Per-row completion log-probabilities.
#[derive(Debug, Clone)]
pub struct RowLogps {
    /// `[R]` summed log-probabilities of each row's completion tokens
    /// (differentiable).
    pub logps: Tensor,
    /// Completion tokens per row.
    pub tokens: Vec<usize>,
    /// Per row, the sum over its completion positions of the mean logit
    /// (over the vocabulary): TRL's `logits/*` numerators. Detached.
    pub logit_sums: Vec<f64>,
}

/// Completion log-probabilities of `batch` under `model` (`train` turns on
/// dropout).
pub fn completion_logps(model: &Gpt2, batch: &CompletionBatch, train: bool) -> Result<RowLogps> {
    let h = model.hidden_states(&batch.inputs, train)?;
    let (r, l, c) = h.dims3()?;
    let h = h.reshape((r * l, c))?.index_select(&batch.positions, 0)?;
    let logits = model.logits(&h)?;
    let lp = kiln_core::ops::token_logprobs(&logits, &batch.targets)?;
    let logps = batch
        .segments
        .matmul(&lp.unsqueeze(1)?.to_dtype(DType::F32)?)?
        .squeeze(1)?;
    let mean = logits.detach().mean_keepdim(D::Minus1)?;
    let logit_sums = batch
        .segments
        .matmul(&mean.to_dtype(DType::F32)?)?
        .squeeze(1)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    Ok(RowLogps {
        logps,
        tokens: batch.tokens.clone(),
        logit_sums,
    })
}

/// Log-probabilities of a batch of pairs: one forward over `[chosen rows;
/// rejected rows]` (TRL's concatenated forward).
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// The per-pair sums and token counts (for the loss).
    pub logps: SequenceLogps,
    /// Σ of the mean logit over the chosen completion positions of the batch.
    pub chosen_logit_sum: f64,
    /// The same over the rejected completions.
    pub rejected_logit_sum: f64,
    /// Chosen completion tokens in the batch.
    pub chosen_tokens: usize,
    /// Rejected completion tokens in the batch.
    pub rejected_tokens: usize,
}

/// [`completion_logps`] of `pairs`, split into chosen and rejected.
pub fn pair_logps(
    model: &Gpt2,
    pairs: &[&EncodedPair],
    pad: u32,
    train: bool,
) -> Result<PairLogps> {
    let b = pairs.len();
    let rows: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (&p.prompt[..], &p.chosen[..]))
        .chain(pairs.iter().map(|p| (&p.prompt[..], &p.rejected[..])))
        .collect();
    let batch = CompletionBatch::new(&rows, pad, model.device())?;
    let out = completion_logps(model, &batch, train)?;
    let dev = model.device();
    let counts = |range: std::ops::Range<usize>| -> Result<Tensor> {
        let v: Vec<f32> = out.tokens[range].iter().map(|&n| n as f32).collect();
        Ok(Tensor::from_vec(v, b, dev)?)
    };
    Ok(PairLogps {
        logps: SequenceLogps {
            chosen: out.logps.narrow(0, 0, b)?,
            rejected: out.logps.narrow(0, b, b)?,
            chosen_tokens: counts(0..b)?,
            rejected_tokens: counts(b..2 * b)?,
        },
        chosen_logit_sum: out.logit_sums[..b].iter().sum(),
        rejected_logit_sum: out.logit_sums[b..].iter().sum(),
        chosen_tokens: out.tokens[..b].iter().sum(),
        rejected_tokens: out.tokens[b..].iter().sum(),
    })
}
