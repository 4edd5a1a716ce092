//! The entropy-minimization objective of METHOD.md and its gradient through a [`CausalLm`].
//!
//! For a sequence `prompt ++ response`, the logits that *predict* response tokens sit at positions
//! `prompt_len-1 .. prompt_len+resp_len-2`; at each, `H_t = -Σ_v p_t(v) log p_t(v)` with
//! `p_t = softmax(z_t / τ)` over the whole vocabulary, and the loss is the mean of `H_t` over
//! those positions. All ops here have a backward pass (no fused softmax).

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};

use crate::layers::compute_dtype;
use crate::models::CausalLm;

/// Errors of the objective and the optimizer; each names the sequence or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A sequence has no prompt token (the first response token would have no predicting logit).
    #[error("sequence {index}: empty prompt")]
    EmptyPrompt {
        /// 0-based index of the sequence.
        index: usize,
    },
    /// A sequence has no response token.
    #[error("sequence {index}: empty response")]
    EmptyResponse {
        /// 0-based index of the sequence.
        index: usize,
    },
    /// A token id is not in the model's vocabulary.
    #[error("sequence {index}: token id {token} is not below the vocabulary size {vocab}")]
    TokenOutOfRange {
        /// 0-based index of the sequence.
        index: usize,
        /// The offending id.
        token: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// No sequences were given.
    #[error("no sequences")]
    NoSequences,
    /// Optimizer state that does not fit the model.
    #[error("{path}: {message}")]
    BadState {
        /// The state file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor operation failed.
    #[error("{context}: {source}")]
    Candle {
        /// What was being done.
        context: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// Adds `context` to a candle error.
pub(crate) fn ctx<T>(r: candle_core::Result<T>, context: &str) -> Result<T, TrainError> {
    r.map_err(|source| TrainError::Candle {
        context: context.to_string(),
        source,
    })
}

/// One prompt and one sampled response, as token ids.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sequence {
    /// The rendered prompt's tokens.
    pub prompt_ids: Vec<u32>,
    /// The response's tokens (a stop token the sampler produced included).
    pub response_ids: Vec<u32>,
}

impl Sequence {
    /// Prompt plus response length.
    pub fn len(&self) -> usize {
        self.prompt_ids.len() + self.response_ids.len()
    }

    /// Whether both parts are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Positions whose logits predict the response tokens: `prompt_len-1 .. prompt_len+resp_len-1`
/// (end exclusive), i.e. the last prompt position through the second-to-last response position.
pub fn predicting_positions(prompt_len: usize, resp_len: usize) -> Range<usize> {
    let start = prompt_len.saturating_sub(1);
    start..start + resp_len
}

/// Entropy of `softmax(logits / τ)` for every row of `logits` `[n, V]` -> `[n]`, in f32 (f64
/// for f64 logits): `log Σ exp(s) − Σ softmax(s)·s` with `s = z/τ − max(z/τ)`.
pub fn entropy(logits: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    let z = (logits.to_dtype(compute_dtype(logits.dtype()))? / temperature)?;
    // The shift cancels in value and gradient, so it needs no gradient of its own.
    let shifted = z.broadcast_sub(&z.max_keepdim(D::Minus1)?.detach())?;
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let p = exp.broadcast_div(&sum)?;
    sum.log()?.squeeze(D::Minus1)? - (p * shifted)?.sum(D::Minus1)?
}

/// The EM loss of METHOD.md over already selected response-predicting logits `[n, V]`: the mean
/// over rows of the entropy at temperature τ (a scalar).
pub fn em_loss(logits: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    entropy(logits, temperature)?.mean_all()
}

/// The rows of `per_position` (`[batch, T, X]`, one row per padded sequence) that predict response
/// tokens, in sequence order -> `[n_response_tokens, X]`.
pub fn select_predicting(per_position: &Tensor, batch: &[Sequence]) -> candle_core::Result<Tensor> {
    let (b, t, x) = per_position.dims3()?;
    let rows: Vec<u32> = batch
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            predicting_positions(s.prompt_ids.len(), s.response_ids.len())
                .map(move |p| (i * t + p) as u32)
        })
        .collect();
    let n = rows.len();
    let index = Tensor::from_vec(rows, n, per_position.device())?;
    per_position.reshape((b * t, x))?.index_select(&index, 0)
}

/// Checks every sequence against a vocabulary of `vocab` ids.
pub fn validate(sequences: &[Sequence], vocab: usize) -> Result<(), TrainError> {
    if sequences.is_empty() {
        return Err(TrainError::NoSequences);
    }
    for (index, s) in sequences.iter().enumerate() {
        if s.prompt_ids.is_empty() {
            return Err(TrainError::EmptyPrompt { index });
        }
        if s.response_ids.is_empty() {
            return Err(TrainError::EmptyResponse { index });
        }
        if let Some(&token) = s
            .prompt_ids
            .iter()
            .chain(&s.response_ids)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(TrainError::TokenOutOfRange {
                index,
                token,
                vocab,
            });
        }
    }
    Ok(())
}

/// Gradients of every parameter, summed over micro-batches, in f32 (f64 for an f64 model).
#[derive(Debug, Clone)]
pub struct Gradients {
    params: Vec<(String, Var)>,
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    /// Empty (all zero) gradients for `params`.
    pub fn new(params: Vec<(String, Var)>) -> Self {
        let grads = vec![None; params.len()];
        Self { params, grads }
    }

    /// Adds every parameter's gradient found in `store`.
    pub(crate) fn add(&mut self, store: &GradStore) -> candle_core::Result<()> {
        for ((_, var), acc) in self.params.iter().zip(self.grads.iter_mut()) {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.to_dtype(accumulate_dtype(var.dtype()))?;
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The parameters with their gradients (`None`: no gradient reached it, i.e. zero).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var, Option<&Tensor>)> {
        self.params
            .iter()
            .zip(&self.grads)
            .map(|((n, v), g)| (n.as_str(), v, g.as_ref()))
    }

    /// The gradient of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        let i = self.params.iter().position(|(n, _)| n == name)?;
        self.grads[i].as_ref()
    }

    /// The global L2 norm over all gradients (as `torch.nn.utils.clip_grad_norm_` computes it),
    /// summed on the gradients' device; one number comes back to the host.
    pub fn global_norm(&self) -> candle_core::Result<f64> {
        let mut sq: Option<Tensor> = None;
        for g in self.grads.iter().flatten() {
            let s = g.sqr()?.sum_all()?.to_dtype(DType::F64)?;
            sq = Some(match sq {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
        Ok(sq.map_or(Ok(0.0), |s| s.to_scalar::<f64>())?.sqrt())
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> candle_core::Result<()> {
        for g in self.grads.iter_mut().flatten() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// Clips like `clip_grad_norm_(max_norm)`: scales by `min(1, max_norm / (norm + 1e-6))`;
    /// returns the norm before clipping.
    pub fn clip_norm(&mut self, max_norm: f64) -> candle_core::Result<f64> {
        let norm = self.global_norm()?;
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        self.scale(coef)?;
        Ok(norm)
    }

    /// Every gradient under its parameter's HF name (zeros where none arrived), for saving.
    pub fn named_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        self.params
            .iter()
            .zip(&self.grads)
            .map(|((n, v), g)| {
                let t = match g {
                    Some(g) => g.clone(),
                    None => v
                        .as_tensor()
                        .zeros_like()?
                        .to_dtype(accumulate_dtype(v.dtype()))?,
                };
                Ok((n.clone(), t))
            })
            .collect()
    }
}

/// The dtype gradients and optimizer moments are kept in for parameters of `dtype`.
pub fn accumulate_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Figures of one pass of [`accumulate_em_gradients`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EmStats {
    /// Σ H_t over the response-predicting positions (not yet divided).
    pub entropy_sum: f64,
    /// Σ over the same positions of the largest raw logit.
    pub max_logit_sum: f64,
    /// Number of response-predicting positions.
    pub n_tokens: usize,
}

impl EmStats {
    /// Adds another pass's figures.
    pub fn merge(&mut self, other: EmStats) {
        self.entropy_sum += other.entropy_sum;
        self.max_logit_sum += other.max_logit_sum;
        self.n_tokens += other.n_tokens;
    }
}

/// How [`accumulate_em_gradients`] runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmOptions {
    /// τ of `softmax(z/τ)`.
    pub temperature: f64,
    /// Sequences per forward/backward pass (right-padded to the longest).
    pub micro_batch: usize,
    /// Rows of `[rows, V]` logits alive at once: the LM head and the entropy run in chunks.
    pub logit_chunk_rows: usize,
}

impl EmOptions {
    /// τ with a micro-batch of `micro_batch` and about 64 MB of f32 logits per chunk for `vocab`.
    pub fn new(temperature: f64, micro_batch: usize, vocab: usize) -> Self {
        Self {
            temperature,
            micro_batch: micro_batch.max(1),
            logit_chunk_rows: ((16usize << 20) / vocab.max(1)).max(1),
        }
    }
}

/// Adds to `grads` the gradient of `scale · Σ_t H_t` over all response-predicting positions of
/// `sequences` (validated against the model's vocabulary), in micro-batches.
///
/// With `scale = 1 / (response tokens of the whole update)`, the accumulated gradient is that of
/// the token mean over *all* responses of the update, whatever the micro-batch size. (The
/// reference averages within each micro-batch and then over micro-batches, which weighs tokens of
/// short micro-batches more; this is the deviation, chosen so results do not depend on batching.)
///
/// Memory: the trunk runs on a micro-batch; only response-predicting hidden states reach the LM
/// head, which runs with the entropy on `logit_chunk_rows` rows at a time, each chunk's graph
/// freed by its own backward; the trunk is then back-propagated once from the collected
/// hidden-state gradients. The result equals one backward through the whole graph.
pub fn accumulate_em_gradients(
    model: &CausalLm,
    sequences: &[Sequence],
    options: &EmOptions,
    scale: f64,
    grads: &mut Gradients,
) -> Result<EmStats, TrainError> {
    validate(sequences, model.config().vocab_size)?;
    let mut stats = EmStats::default();
    for batch in sequences.chunks(options.micro_batch.max(1)) {
        stats.merge(micro_batch(model, batch, options, scale, grads)?);
    }
    Ok(stats)
}

/// Right-padded `[batch, T]` ids; padding only follows real tokens, so the causal mask keeps it
/// from every position that is used.
fn padded_ids(batch: &[Sequence], device: &Device) -> candle_core::Result<Tensor> {
    let t = batch.iter().map(Sequence::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * t);
    for s in batch {
        ids.extend(&s.prompt_ids);
        ids.extend(&s.response_ids);
        ids.extend(std::iter::repeat_n(0u32, t - s.len()));
    }
    Tensor::from_vec(ids, (batch.len(), t), device)
}

fn micro_batch(
    model: &CausalLm,
    batch: &[Sequence],
    options: &EmOptions,
    scale: f64,
    grads: &mut Gradients,
) -> Result<EmStats, TrainError> {
    let device = model
        .parameters()
        .first()
        .map_or(Device::Cpu, |(_, v)| v.device().clone());
    let ids = ctx(padded_ids(batch, &device), "building the batch")?;
    let hidden = ctx(model.hidden_states(&ids), "forward pass")?;
    let selected = ctx(select_predicting(&hidden, batch), "selecting positions")?;
    let n = selected.dim(0).unwrap_or(0);
    let mut stats = EmStats {
        n_tokens: n,
        ..EmStats::default()
    };
    let mut hidden_grads = Vec::new();
    let rows = options.logit_chunk_rows.max(1);
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let leaf = ctx(
            selected
                .narrow(0, start, len)
                .and_then(|t| Var::from_tensor(&t.detach())),
            "chunking hidden states",
        )?;
        let logits = ctx(model.logits_from_hidden(leaf.as_tensor()), "LM head")?;
        let ent = ctx(entropy(&logits, options.temperature), "entropy")?;
        let sum = ctx(ent.sum_all(), "entropy")?;
        stats.entropy_sum += ctx(scalar_f64(&sum), "entropy")?;
        let max_logits = ctx(logits.max(D::Minus1).and_then(|m| m.sum_all()), "max logit")?;
        stats.max_logit_sum += ctx(scalar_f64(&max_logits), "max logit")?;
        let store = ctx(
            (sum * scale).and_then(|l| l.backward()),
            "backward (LM head)",
        )?;
        ctx(grads.add(&store), "accumulating gradients")?;
        let g = store.get(leaf.as_tensor()).cloned();
        let g = match g {
            Some(g) => g,
            None => ctx(leaf.as_tensor().zeros_like(), "zero gradient")?,
        };
        hidden_grads.push(g);
        start += len;
    }
    if n > 0 {
        let g = ctx(Tensor::cat(&hidden_grads, 0), "collecting gradients")?;
        // d/dh Σ h·g = g: one backward through the trunk from the LM head's hidden gradients.
        let surrogate = ctx(
            g.to_dtype(hidden.dtype())
                .and_then(|g| selected * g.detach())
                .and_then(|p| p.sum_all()),
            "trunk surrogate",
        )?;
        let store = ctx(surrogate.backward(), "backward (trunk)")?;
        ctx(grads.add(&store), "accumulating gradients")?;
    }
    Ok(stats)
}

fn scalar_f64(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}
