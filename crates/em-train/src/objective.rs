//! The entropy-minimization objective of METHOD.md and its gradient through a [`CausalLm`].
//!
//! For a sequence `prompt ++ response`, the logits that *predict* response tokens sit at positions
//! `prompt_len-1 .. prompt_len+resp_len-2`; at each, `H_t = -Σ_v p_t(v) log p_t(v)` with
//! `p_t = softmax(z_t / τ)` over the whole vocabulary, and the loss is the mean of `H_t` over
//! those positions. All ops here have a backward pass (no fused softmax).

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};

use crate::grads::ctx;
use crate::layers::{compute_dtype, GradientSinks, Linear, ProjectionTape};
use crate::models::CausalLm;

pub use crate::grads::{accumulate_dtype, Gradients, TrainError};

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

/// `(Σ_rows H, ∂(Σ_rows H)/∂logits)` for `logits` `[n, V]`, the gradient written out rather than
/// taken by autograd through [`entropy`]: with `s = z/τ`, `∂H/∂z_v = −(p_v/τ)(s_v − E_p[s])`. The
/// same values, with a few `[n, V]` intermediates alive instead of every one of the graph's
/// (test: `entropy_gradient_is_autograds`). The gradient is in the logits' dtype, as autograd's.
///
/// On the CPU in f32/f64 one fused kernel ([`crate::fused::entropy_rows`]); composed elsewhere.
pub fn entropy_sum_and_grad(
    logits: &Tensor,
    temperature: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    match crate::fused::entropy_rows(logits, temperature, 1.0)? {
        Some((sum, _, grad)) => Ok((
            Tensor::new(sum, logits.device())?.to_dtype(logits.dtype())?,
            grad,
        )),
        None => entropy_sum_and_grad_composed(logits, temperature),
    }
}

/// [`entropy_sum_and_grad`] composed from candle ops.
pub(crate) fn entropy_sum_and_grad_composed(
    logits: &Tensor,
    temperature: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let z = (logits.to_dtype(compute_dtype(logits.dtype()))? / temperature)?;
    let shifted = z.broadcast_sub(&z.max_keepdim(D::Minus1)?)?;
    drop(z);
    let exp = shifted.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let p = exp.broadcast_div(&sum)?;
    drop(exp);
    // E_p[s] − max(s), per row.
    let mean_shifted = (&p * &shifted)?.sum_keepdim(D::Minus1)?;
    let entropy = (sum.log()? - &mean_shifted)?.sum_all()?;
    let grad = (shifted.broadcast_sub(&mean_shifted)? * p)?
        .affine(-1.0 / temperature, 0.0)?
        .to_dtype(logits.dtype())?;
    Ok((entropy, grad))
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
    /// Keep only each decoder layer's input during the forward pass and recompute the layer in
    /// the backward pass: one layer's activations alive at a time instead of every layer's, for
    /// one more forward pass of the trunk. Where the fused CPU matmul runs, each layer's
    /// projection products are kept too ([`crate::layers::ProjectionTape`]), so the
    /// recomputation runs no projection matmul. The gradients are the same.
    pub recompute: bool,
}

impl EmOptions {
    /// τ with a micro-batch of `micro_batch` and about 16 MB of f32 logits per chunk for `vocab`
    /// (at least 64 rows). A chunk's entropy gradient keeps about five `[rows, V]` tensors alive:
    /// 80 MB for SmolLM2, against 320 MB at 64 MB a chunk, for the same time.
    pub fn new(temperature: f64, micro_batch: usize, vocab: usize) -> Self {
        Self {
            temperature,
            micro_batch: micro_batch.max(1),
            logit_chunk_rows: ((4usize << 20) / vocab.max(1)).max(64),
            recompute: true,
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
/// freed by its own backward and the head's weight gradient summed in place; the trunk is then
/// back-propagated from the collected hidden-state gradients, in one pass or (`recompute`) layer
/// by layer from each layer's saved input. The result equals one backward through the whole graph.
pub fn accumulate_em_gradients(
    model: &CausalLm,
    sequences: &[Sequence],
    options: &EmOptions,
    scale: f64,
    grads: &mut Gradients,
) -> Result<EmStats, TrainError> {
    accumulate_em_gradients_observed(model, sequences, options, scale, grads, &mut |_| {})
}

/// Which pass of an update has just finished: a micro-batch's forward pass (its entropy is
/// known) or its backward pass (its gradients are summed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// 1-based index of the micro-batch.
    pub micro_batch: usize,
    /// Micro-batches in this update.
    pub micro_batches: usize,
    /// `false` after the forward pass, `true` after the backward pass.
    pub backward: bool,
}

/// [`accumulate_em_gradients`], calling `on_pass` after each forward and each backward pass, so
/// a caller can show where a long update is.
pub fn accumulate_em_gradients_observed(
    model: &CausalLm,
    sequences: &[Sequence],
    options: &EmOptions,
    scale: f64,
    grads: &mut Gradients,
    on_pass: &mut dyn FnMut(Pass),
) -> Result<EmStats, TrainError> {
    validate(sequences, model.config().vocab_size)?;
    let mut stats = EmStats::default();
    let micro_batches = sequences.len().div_ceil(options.micro_batch.max(1));
    let sinks = ctx(
        grads.sinks(model.projections().into_iter().map(Linear::weight)),
        "gradient accumulators",
    )?;
    let sinks = (!sinks.is_empty()).then_some(sinks);
    for (i, batch) in sequences.chunks(options.micro_batch.max(1)).enumerate() {
        let mut report = |backward| {
            on_pass(Pass {
                micro_batch: i + 1,
                micro_batches,
                backward,
            })
        };
        stats.merge(micro_batch(
            model,
            batch,
            options,
            scale,
            grads,
            sinks.as_ref(),
            &mut report,
        )?);
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
    sinks: Option<&GradientSinks>,
    report: &mut dyn FnMut(bool),
) -> Result<EmStats, TrainError> {
    let device = model
        .parameters()
        .first()
        .map_or(Device::Cpu, |(_, v)| v.device().clone());
    let ids = ctx(padded_ids(batch, &device), "building the batch")?;
    if !options.recompute {
        let hidden = ctx(model.hidden_states_with(&ids, sinks), "forward pass")?;
        let selected = ctx(select_predicting(&hidden, batch), "selecting positions")?;
        let (stats, g) = head(model, &selected.detach(), options, scale, grads)?;
        report(false);
        if let Some(g) = g {
            back_through(&selected, &g, grads, "backward (trunk)")?;
        }
        report(true);
        return Ok(stats);
    }

    let seq = ids.dim(1).unwrap_or(0);
    let x = ctx(model.embed(&ids), "embedding")?.detach();
    let layers = ctx(
        model.layer_context(seq, x.dtype(), &device),
        "rope tables and masks",
    )?;
    let layers = match sinks {
        Some(s) => layers.with_sinks(s.clone()),
        None => layers,
    };
    // Forward without a graph beyond the layer being run: each layer's input is kept, and its
    // projections' products on a tape, so that recomputing the layer runs no projection matmul.
    let mut inputs = Vec::with_capacity(model.num_layers());
    let mut tapes = Vec::with_capacity(model.num_layers());
    let mut x = x;
    for i in 0..model.num_layers() {
        let tape = ProjectionTape::default();
        let out = ctx(model.layer(i, &x, &layers, Some(&tape)), "forward pass")?.detach();
        inputs.push(std::mem::replace(&mut x, out));
        tapes.push(tape);
    }
    let last = ctx(Var::from_tensor(&x), "forward pass")?;
    drop(x);
    let hidden = ctx(model.final_norm(last.as_tensor()), "final norm")?;
    let selected = ctx(select_predicting(&hidden, batch), "selecting positions")?;
    let (stats, g) = head(model, &selected.detach(), options, scale, grads)?;
    report(false);
    let Some(g) = g else {
        report(true);
        return Ok(stats);
    };
    let mut g = back_through(&selected, &g, grads, "backward (final norm)")?
        .get(last.as_tensor())
        .cloned();
    drop((hidden, selected, last));
    for i in (0..model.num_layers()).rev() {
        let Some(upstream) = g.take() else { break };
        let input = ctx(Var::from_tensor(&inputs[i]), "recomputing a layer")?;
        inputs.truncate(i);
        let tape = tapes.pop();
        if let Some(tape) = &tape {
            tape.replay();
        }
        let out = ctx(
            model.layer(i, input.as_tensor(), &layers, tape.as_ref()),
            "recomputing a layer",
        )?;
        let store = back_through(&out, &upstream, grads, "backward (decoder layer)")?;
        g = store.get(input.as_tensor()).cloned();
    }
    if let Some(upstream) = g {
        let embedded = ctx(model.embed(&ids), "embedding")?;
        // A frozen table (under an adapter) has nothing to receive.
        if embedded.track_op() {
            back_through(&embedded, &upstream, grads, "backward (embedding)")?;
        }
    }
    report(true);
    Ok(stats)
}

/// Back-propagates `upstream` (the loss gradient with respect to `output`) into `grads`, through
/// the surrogate `Σ output·upstream` whose gradient with respect to `output` is `upstream`.
fn back_through(
    output: &Tensor,
    upstream: &Tensor,
    grads: &mut Gradients,
    what: &str,
) -> Result<GradStore, TrainError> {
    let store = ctx(
        upstream
            .to_dtype(output.dtype())
            .and_then(|g| output * g.detach())
            .and_then(|p| p.sum_all())
            .and_then(|s| s.backward()),
        what,
    )?;
    ctx(grads.add(&store), "accumulating gradients")?;
    Ok(store)
}

/// The LM head and the entropy on `selected` (`[n, hidden]`, no graph) in chunks of rows: adds
/// the head's gradients to `grads` and returns the figures and the loss gradient with respect to
/// `selected` (`None` when there is no row).
fn head(
    model: &CausalLm,
    selected: &Tensor,
    options: &EmOptions,
    scale: f64,
    grads: &mut Gradients,
) -> Result<(EmStats, Option<Tensor>), TrainError> {
    let n = selected.dim(0).unwrap_or(0);
    let mut stats = EmStats {
        n_tokens: n,
        ..EmStats::default()
    };
    if n == 0 {
        return Ok((stats, None));
    }
    let lm_head = model.lm_head();
    // A frozen head (under an adapter) gets no gradient, only passes one on.
    let trains_head = lm_head.weight().is_variable();
    let weight = lm_head.weight().detach();
    let weight_t = ctx(weight.t(), "LM head")?;
    let mut hidden_grads = Vec::new();
    let rows = options.logit_chunk_rows.max(1);
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let h = ctx(selected.narrow(0, start, len), "chunking hidden states")?;
        // The head's matmul and the entropy's gradient run outside any graph (autograd through
        // the entropy would keep every [rows, V] intermediate); only a final soft-cap, where the
        // model has one, is differentiated by autograd. The weight gradient is summed in place.
        let mut raw = ctx(h.matmul(&weight_t), "LM head")?;
        if let Some(b) = lm_head.bias() {
            raw = ctx(raw.broadcast_add(&b.detach()), "LM head")?;
        }
        let capped = if model.caps_logits() {
            let leaf = ctx(Var::from_tensor(&raw), "logit soft-capping")?;
            raw = ctx(model.cap_logits(leaf.as_tensor()), "logit soft-capping")?;
            Some(leaf)
        } else {
            None
        };
        let logits = raw;
        // Detached: a soft-capped `logits` carries the cap's graph, which the surrogate below
        // must see only through `logits` itself.
        let (entropy_sum, max_logit_sum, d_logits) = ctx(
            entropy_stats_and_grad(&logits.detach(), options.temperature, scale),
            "entropy",
        )?;
        stats.entropy_sum += entropy_sum;
        stats.max_logit_sum += max_logit_sum;
        let d_raw = match capped {
            None => d_logits,
            Some(leaf) => {
                let store = ctx(
                    (&logits * &d_logits)
                        .and_then(|p| p.sum_all())
                        .and_then(|s| s.backward()),
                    "backward (logit soft-capping)",
                )?;
                match store.get(leaf.as_tensor()) {
                    Some(g) => g.clone(),
                    None => ctx(leaf.as_tensor().zeros_like(), "zero gradient")?,
                }
            }
        };
        drop(logits);
        if trains_head {
            ctx(
                grads.add_transposed_product(lm_head.weight(), &d_raw, &h),
                "LM head gradient",
            )?;
        }
        if let Some(b) = lm_head.bias().filter(|b| b.is_variable()) {
            let g = ctx(d_raw.sum(0), "LM head bias gradient")?;
            ctx(grads.add_to(b, &g), "LM head bias gradient")?;
        }
        hidden_grads.push(ctx(d_raw.matmul(&weight), "LM head backward")?);
        start += len;
    }
    let g = ctx(Tensor::cat(&hidden_grads, 0), "collecting gradients")?;
    Ok((stats, Some(g)))
}

/// Σ entropy, Σ max logit and `scale ·` the entropy's gradient of a logit chunk: fused on the
/// CPU, composed elsewhere.
fn entropy_stats_and_grad(
    logits: &Tensor,
    temperature: f64,
    scale: f64,
) -> candle_core::Result<(f64, f64, Tensor)> {
    if let Some(fused) = crate::fused::entropy_rows(logits, temperature, scale)? {
        return Ok(fused);
    }
    let max_sum = scalar_f64(&logits.max(D::Minus1)?.sum_all()?)?;
    let (sum, grad) = entropy_sum_and_grad_composed(logits, temperature)?;
    Ok((scalar_f64(&sum)?, max_sum, grad.affine(scale, 0.0)?))
}

fn scalar_f64(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}
