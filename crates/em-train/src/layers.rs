//! Differentiable building blocks shared by every architecture: linear and embedding layers, RMS
//! norm, rotary position embedding, causal (optionally sliding-window) grouped-query attention and
//! the gated MLP.
//!
//! Everything here is composed of candle primitives that have a backward pass, or of em-train's
//! own fused ops with theirs (`crate::fused`: the attention softmax). candle-nn 0.11's fused
//! `rms_norm`, `softmax_last_dim` and `rotary_emb::rope*` silently cut gradients (METHOD.md, "Known
//! traps"), so none of them is used. Norms and softmax run in f32 when the model is in bf16/f16,
//! as transformers does; in f32 and f64 everything stays in the model dtype.

use candle_core::{DType, Device, Result, Tensor, Var, D};

// A layer's weights are tensors: a trainable one is a [`Var`]'s own tensor (same id, so
// gradients find it), a frozen one (the base under a LoRA adapter) a plain constant.

pub use em_config::{Activation, RopeParams, RopeScaling};

/// The dtype in which norms and softmax run for a model stored in `dtype`.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// A low-rank adapter on a linear layer (LoRA, as PEFT's `lora.Linear` without dropout):
/// `ΔW = scale · B·A` with `A` `[rank, in]`, `B` `[out, rank]`, `scale = alpha / rank`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `lora_A.weight` `[rank, in]`.
    pub a: Var,
    /// `lora_B.weight` `[out, rank]`.
    pub b: Var,
    /// `alpha / rank`.
    pub scale: f64,
}

/// A dense layer `y = x Wᵀ + b` with a weight `[out, in]`, an optional bias `[out]` and an
/// optional LoRA adapter: `y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
}

impl Linear {
    /// Wraps a weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// The layer with `lora` added.
    pub fn with_lora(self, lora: Lora) -> Self {
        Self {
            lora: Some(lora),
            ..self
        }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The adapter, if any.
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Applies the layer to the last dimension of `x` (any number of leading dimensions).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, Projections::default())
    }

    /// [`Self::forward`] on the fused path of `site`: a trainable weight's product `x·Wᵀ` is
    /// recorded on its tape, or taken from there when the tape replays, and the weight's gradient
    /// goes to its sink when it has one.
    pub fn forward_in(&self, x: &Tensor, site: Projections<'_>) -> Result<Tensor> {
        let w = &self.weight;
        let (out_dim, in_dim) = w.dims2()?;
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let y = if w.is_variable() {
            // Only the fused matmul records and replays.
            let tape = site.tape.filter(|_| crate::fused::fusable(&x2));
            let replayed = tape
                .map(ProjectionTape::next_replayed)
                .transpose()?
                .flatten();
            let sink = site.sinks.and_then(|s| s.get(w));
            match crate::fused::linear(&x2, w, replayed.as_ref(), sink)? {
                Some(y) => {
                    if let Some(tape) = tape {
                        tape.record(&y);
                    }
                    y
                }
                None => x2.matmul(&w.t()?)?,
            }
        } else {
            frozen_matmul(&x2, w)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) => {
                // The factors may be kept in a wider dtype than a bf16 base (PEFT casts the
                // input to the adapter's dtype and the result back).
                let xa = x2.to_dtype(l.a.dtype())?;
                let low = xa.matmul(&l.a.as_tensor().t()?)?;
                let delta = (low.matmul(&l.b.as_tensor().t()?)? * l.scale)?;
                let delta = delta.to_dtype(y.dtype())?;
                (y + delta)?
            }
            None => y,
        };
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        y.reshape(dims)
    }
}

/// Products of trainable projections kept from a layer's first forward pass and handed back,
/// in the same order, when the layer is recomputed for its backward pass: the recomputation then
/// runs no projection matmul, only the attention and the element-wise ops, for the products'
/// memory (per token `q + k + v + 2 · hidden + 2 · intermediate` values a layer, against the
/// dozens of intermediates a layer's backward pass keeps).
#[derive(Debug, Default)]
pub struct ProjectionTape {
    products: std::cell::RefCell<std::collections::VecDeque<Tensor>>,
    replaying: std::cell::Cell<bool>,
}

impl ProjectionTape {
    /// From now on, hand back the recorded products instead of recording.
    pub fn replay(&self) {
        self.replaying.set(true);
    }

    /// The next recorded product when replaying (an error when none is left), `None` when
    /// recording.
    fn next_replayed(&self) -> Result<Option<Tensor>> {
        if !self.replaying.get() {
            return Ok(None);
        }
        match self.products.borrow_mut().pop_front() {
            Some(t) => Ok(Some(t)),
            None => candle_core::bail!("projection tape: replayed past its last product"),
        }
    }

    /// Keeps `y` (without its graph) when recording.
    fn record(&self, y: &Tensor) {
        if !self.replaying.get() {
            self.products.borrow_mut().push_back(y.detach());
        }
    }
}

/// Where a layer's trainable projections on the fused path keep their products and send their
/// weights' gradients; the default does neither.
#[derive(Debug, Clone, Copy, Default)]
pub struct Projections<'a> {
    /// The tape the products go on, or come from when it replays.
    pub tape: Option<&'a ProjectionTape>,
    /// The accumulators the weights' gradients are added to in place.
    pub sinks: Option<&'a GradientSinks>,
}

/// The update's gradient accumulator of each trainable projection weight, by the weight's id: the
/// fused projection adds its weight's gradient there during the backward pass (see
/// [`crate::fused::linear`]) instead of handing it to candle's gradient store.
#[derive(Debug, Clone, Default)]
pub struct GradientSinks(std::collections::HashMap<candle_core::TensorId, Tensor>);

impl GradientSinks {
    /// Sinks for the weights `(weight, accumulator)`; each accumulator has its weight's shape
    /// and dtype and is contiguous.
    pub fn new(sinks: impl IntoIterator<Item = (Tensor, Tensor)>) -> Self {
        Self(sinks.into_iter().map(|(w, acc)| (w.id(), acc)).collect())
    }

    /// The accumulator of `weight`, if it has one.
    pub fn get(&self, weight: &Tensor) -> Option<&Tensor> {
        self.0.get(&weight.id())
    }

    /// Whether no weight has a sink.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `x · Wᵀ` for a frozen `w` `[out, in]` (`x` `[rows, in]`) whose backward pass computes only the
/// gradient of `x`: candle's matmul backward also forms `xᵀ·g` for a constant right operand, a
/// third of the trunk's backward work and a weight-sized tensor per layer, wasted under an adapter.
fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.matmul(&w.t()?);
    }
    x.apply_op1(FrozenMatmul { w: w.clone() })
}

/// The custom op behind [`frozen_matmul`]: the forward is the backend's own matmul on the
/// transposed view of `w`, the backward `g·W`.
struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    fn forward<S: candle_core::backend::BackendStorage>(
        x: &S,
        layout: &candle_core::Layout,
        w: &S,
        w_layout: &candle_core::Layout,
    ) -> Result<(S, candle_core::Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (k2, n) = w_layout.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: [{m}, {k}] by [{k2}, {n}]");
        }
        Ok((x.matmul(w, (1, m, n, k), layout, w_layout)?, (m, n).into()))
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let wt = self.w.t()?;
        let (w, w_layout) = wt.storage_and_layout();
        match &*w {
            candle_core::Storage::Cpu(w) => Self::forward(storage, layout, w, w_layout),
            _ => candle_core::bail!("frozen-matmul: the weight is not on the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let wt = self.w.t()?;
        let (w, w_layout) = wt.storage_and_layout();
        match &*w {
            candle_core::Storage::Cuda(w) => Self::forward(storage, layout, w, w_layout),
            _ => candle_core::bail!("frozen-matmul: the weight is not on the GPU"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// A token embedding table `[vocab, hidden]`, with transformers' `padding_idx` rule: the row of
/// the padding token gets no gradient through this lookup (a tied LM head still trains it).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
    padding_idx: Option<u32>,
}

impl Embedding {
    /// Wraps a table `[vocab, hidden]`; `padding_idx` is the row the lookup does not train.
    pub fn new(weight: Tensor, padding_idx: Option<u32>) -> Self {
        Self {
            weight,
            padding_idx,
        }
    }

    /// The table `[vocab, hidden]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Sets or clears the row the lookup does not train.
    pub fn set_padding_idx(&mut self, padding_idx: Option<u32>) {
        self.padding_idx = padding_idx;
    }

    /// Looks up `ids` (`[batch, seq]`, u32) and returns `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let w = &self.weight;
        let hidden = w.dim(1)?;
        let mut dims = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let mut rows = w.index_select(&flat, 0)?;
        if let Some(pad) = self.padding_idx {
            let is_pad = flat.eq(pad)?;
            if is_pad.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? > 0 {
                let mask = is_pad.unsqueeze(1)?.broadcast_as(rows.shape())?;
                rows = mask.where_cond(&rows.detach(), &rows)?;
            }
        }
        dims.push(hidden);
        rows.reshape(dims)
    }
}

/// Root-mean-square normalisation over the last dimension, with a trainable scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    unit_offset: bool,
}

impl RmsNorm {
    /// Llama/Qwen2 style: `w · (x / rms(x))`, the product taken after casting back to the input dtype.
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps,
            unit_offset: false,
        }
    }

    /// Gemma style: `(1 + w) · (x / rms(x))`, the product taken in the compute dtype.
    pub fn new_unit_offset(weight: Tensor, eps: f64) -> Self {
        Self {
            weight,
            eps,
            unit_offset: true,
        }
    }

    /// Normalises `x` over its last dimension: fused on the CPU in f32/f64, composed elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match crate::fused::rms_norm(x, &self.weight, self.eps, self.unit_offset)? {
            Some(y) => Ok(y),
            None => self.forward_composed(x),
        }
    }

    /// [`Self::forward`] composed from candle ops (the path off the CPU and in bf16/f16).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let cdt = compute_dtype(dtype);
        let xf = x.to_dtype(cdt)?;
        let mean_sq = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?;
        let w = &self.weight;
        if self.unit_offset {
            let scale = (w.to_dtype(cdt)? + 1.0)?;
            normed.broadcast_mul(&scale)?.to_dtype(dtype)
        } else {
            normed.to_dtype(dtype)?.broadcast_mul(w)
        }
    }
}

/// Rotary position embedding in the "rotate half" layout of HF Llama, Qwen2 and Gemma3.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f64>,
}

impl RotaryEmbedding {
    /// Frequencies for a head of `head_dim` (even) under `params`.
    pub fn new(head_dim: usize, params: &RopeParams) -> Self {
        let base: Vec<f64> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / params.theta.powf(i as f64 / head_dim as f64))
            .collect();
        let inv_freq = match &params.scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old_ctx = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old_ctx / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        };
        Self { inv_freq }
    }

    /// The inverse frequencies, one per pair of dimensions.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// `(cos, sin)` of shape `[seq_len, head_dim]` for positions `0..seq_len`, in `dtype`.
    pub fn cos_sin(
        &self,
        seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * 2 * half);
        let mut sin = Vec::with_capacity(seq_len * 2 * half);
        for pos in 0..seq_len {
            for _ in 0..2 {
                for f in &self.inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (seq_len, 2 * half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (seq_len, 2 * half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Rotates `x` by `cos`/`sin` (from [`RotaryEmbedding::cos_sin`], `[seq, head_dim]` for `x`
/// `[batch, heads, seq, head_dim]`, or unsqueezed to `[seq, 1, head_dim]` for `[batch, seq,
/// heads, head_dim]`): `x·cos + rotate_half(x)·sin`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let head_dim = x.dim(D::Minus1)?;
    let half = head_dim / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, head_dim - half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Additive attention mask `[seq, seq]` in `dtype`: 0 where query `i` may see key `j`, −∞ elsewhere.
///
/// Causal: `j ≤ i`. With `window = Some(w)` also `i − j < w` (each query sees itself and the
/// `w − 1` tokens before it, as HF's sliding-window layers do).
pub fn attention_mask(
    seq_len: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..seq_len).map(move |j| {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)?.to_dtype(dtype)
}

/// What every decoder layer of one batch shares: the rotary tables (global, and local for
/// sliding-window layers where the architecture has a separate base) and the additive masks.
#[derive(Debug, Clone)]
pub struct LayerContext {
    global: (Tensor, Tensor),
    local: (Tensor, Tensor),
    full: Tensor,
    sliding: Vec<(usize, Tensor)>,
    sinks: Option<GradientSinks>,
}

impl LayerContext {
    /// Tables for sequences of `seq_len` in `dtype` under layers with the given `windows`; layers
    /// with a window use `local` rope when given, `global` otherwise.
    pub fn new(
        seq_len: usize,
        dtype: DType,
        device: &Device,
        global: &RotaryEmbedding,
        local: Option<&RotaryEmbedding>,
        windows: &[Option<usize>],
    ) -> Result<Self> {
        let global_tables = global.cos_sin(seq_len, dtype, device)?;
        let local_tables = match local {
            Some(r) => r.cos_sin(seq_len, dtype, device)?,
            None => global_tables.clone(),
        };
        let mask_dtype = compute_dtype(dtype);
        let mut sliding: Vec<(usize, Tensor)> = Vec::new();
        for w in windows.iter().flatten() {
            if !sliding.iter().any(|(have, _)| have == w) {
                sliding.push((*w, attention_mask(seq_len, Some(*w), mask_dtype, device)?));
            }
        }
        Ok(Self {
            global: global_tables,
            local: local_tables,
            full: attention_mask(seq_len, None, mask_dtype, device)?,
            sliding,
            sinks: None,
        })
    }

    /// The same context, with the layers' projection weights sending their gradients to `sinks`.
    pub fn with_sinks(self, sinks: GradientSinks) -> Self {
        Self {
            sinks: Some(sinks),
            ..self
        }
    }

    /// The tables and mask of a layer with sliding `window` (`None`: full attention).
    pub fn for_window(&self, window: Option<usize>) -> Positions<'_> {
        let found = window.and_then(|w| self.sliding.iter().find(|(have, _)| *have == w));
        match found {
            Some((w, mask)) => Positions {
                cos: &self.local.0,
                sin: &self.local.1,
                mask,
                window: Some(*w),
                projections: Projections {
                    tape: None,
                    sinks: self.sinks.as_ref(),
                },
            },
            None => Positions {
                cos: &self.global.0,
                sin: &self.global.1,
                mask: &self.full,
                window: None,
                projections: Projections {
                    tape: None,
                    sinks: self.sinks.as_ref(),
                },
            },
        }
    }
}

/// What a layer reads from the [`LayerContext`]: rope tables `[seq, head_dim]`, the additive
/// mask `[seq, seq]` and the window it encodes.
#[derive(Debug, Clone, Copy)]
pub struct Positions<'a> {
    /// `cos` of every position and rotary dimension.
    pub cos: &'a Tensor,
    /// `sin` of every position and rotary dimension.
    pub sin: &'a Tensor,
    /// 0 where a query may see a key, −∞ elsewhere, in the compute dtype.
    pub mask: &'a Tensor,
    /// Keys each query sees at most (itself included); `None`: every earlier one.
    pub window: Option<usize>,
    /// Where the layer's projections keep their products and send their weights' gradients.
    pub projections: Projections<'a>,
}

/// Multi-head self-attention with grouped key/value heads, optional per-head q/k RMS norms,
/// rotary embedding and optional logit soft-capping.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection `[heads·head_dim, hidden]`.
    pub q_proj: Linear,
    /// Key projection `[kv_heads·head_dim, hidden]`.
    pub k_proj: Linear,
    /// Value projection `[kv_heads·head_dim, hidden]`.
    pub v_proj: Linear,
    /// Output projection `[hidden, heads·head_dim]`.
    pub o_proj: Linear,
    /// RMS norm over each query head (Gemma3).
    pub q_norm: Option<RmsNorm>,
    /// RMS norm over each key head (Gemma3).
    pub k_norm: Option<RmsNorm>,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Size of each head.
    pub head_dim: usize,
    /// Factor applied to `q·k` before the softmax.
    pub scale: f64,
    /// `tanh` soft-capping of attention logits (Gemma).
    pub softcap: Option<f64>,
}

impl Attention {
    /// The query, key, value and output projections.
    pub fn projections(&self) -> [&Linear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj]
    }

    /// Attends over `x` (`[batch, seq, hidden]`) at `pos`: the fused causal attention on the
    /// CPU in f32/f64 without soft-capping, the composed op elsewhere.
    pub fn forward(&self, x: &Tensor, pos: Positions<'_>) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (h, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, s, heads, d], rotated.
        let heads = |proj: &Linear, n: usize, norm: Option<&RmsNorm>| {
            let t = proj.forward_in(x, pos.projections)?.reshape((b, s, n, d))?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            match crate::fused::rope(&t, pos.cos, pos.sin)? {
                Some(t) => Ok(t),
                None => apply_rope(&t, &pos.cos.unsqueeze(1)?, &pos.sin.unsqueeze(1)?),
            }
        };
        let q = heads(&self.q_proj, h, self.q_norm.as_ref())?;
        let k = heads(&self.k_proj, kv, self.k_norm.as_ref())?;
        let v = self
            .v_proj
            .forward_in(x, pos.projections)?
            .reshape((b, s, kv, d))?;
        let fused = match self.softcap {
            None => crate::fused::causal_attention(&q, &k, &v, self.scale, pos.window)?,
            Some(_) => None,
        };
        let out = match fused {
            Some(out) => out,
            None => self.composed(&q, &k, &v, pos.mask)?,
        };
        self.o_proj
            .forward_in(&out.reshape((b, s, h * d))?, pos.projections)
    }

    /// Attention over `q` `[b, s, h, d]` and `k`, `v` `[b, s, kv, d]` with an additive `mask`
    /// `[s, s]`, composed from candle ops, as `[b, s, h, d]`.
    fn composed(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, h, d) = q.dims4()?;
        let kv = self.num_kv_heads;
        let rep = h / kv;
        let (q, k, v) = (
            q.transpose(1, 2)?.contiguous()?,
            k.transpose(1, 2)?.contiguous()?,
            v.transpose(1, 2)?.contiguous()?,
        );
        // Query heads j·rep .. (j+1)·rep share key/value head j (HF `repeat_kv`): fold them into
        // the sequence axis instead of repeating K and V.
        // Scaling q rather than the scores saves one [batch, heads, seq, seq] activation.
        let q = (q * self.scale)?.reshape((b, kv, rep * s, d))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, h, s, s))?;
        let scores = match self.softcap {
            Some(cap) => ((scores / cap)?.tanh()? * cap)?,
            None => scores,
        };
        let dtype = q.dtype();
        let scores = scores.to_dtype(compute_dtype(dtype))?.broadcast_add(mask)?;
        let probs = crate::fused::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs.reshape((b, kv, rep * s, s))?.matmul(&v)?;
        out.reshape((b, h, s, d))?.transpose(1, 2)
    }
}

/// Applies `act` element-wise.
///
/// GELU is composed from `tanh`/`erf` because candle's fused GELU backward uses constants rounded
/// to six digits.
pub fn apply_activation(act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Silu => x.silu(),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let cube = (x.sqr()? * x)?;
            let inner = ((x + (cube * 0.044715)?)? * c)?;
            ((inner.tanh()? + 1.0)? * x)? * 0.5
        }
        Activation::Gelu => {
            let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
            (cdf * x)? * 0.5
        }
    }
}

/// The gated feed-forward block `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    /// Gate projection `[intermediate, hidden]`.
    pub gate_proj: Linear,
    /// Up projection `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// Down projection `[hidden, intermediate]`.
    pub down_proj: Linear,
    /// The non-linearity applied to the gate.
    pub act: Activation,
}

impl Mlp {
    /// The gate, up and down projections.
    pub fn projections(&self) -> [&Linear; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    /// Applies the block to `x` (`[.., hidden]`); SwiGLU's `silu(gate)·up` fused on the CPU.
    /// The projections run on the fused path of `site`.
    pub fn forward(&self, x: &Tensor, site: Projections<'_>) -> Result<Tensor> {
        let gate = self.gate_proj.forward_in(x, site)?;
        let up = self.up_proj.forward_in(x, site)?;
        let fused = match self.act {
            Activation::Silu => crate::fused::swiglu(&gate, &up)?,
            _ => None,
        };
        let hidden = match fused {
            Some(h) => h,
            None => (apply_activation(self.act, &gate)? * up)?,
        };
        self.down_proj.forward_in(&hidden, site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_mask_shows_exactly_the_window() -> Result<()> {
        let m = attention_mask(5, Some(2), DType::F32, &Device::Cpu)?.to_vec2::<f32>()?;
        for (i, row) in m.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let visible = j <= i && i - j < 2;
                assert_eq!(v == 0.0, visible, "mask[{i}][{j}] = {v}");
            }
        }
        Ok(())
    }

    #[test]
    fn gelu_tanh_matches_candle_forward() -> Result<()> {
        let x = Tensor::new(&[-3.0f64, -1.0, -0.1, 0.0, 0.3, 2.0, 5.0], &Device::Cpu)?;
        let ours = apply_activation(Activation::GeluTanh, &x)?.to_vec1::<f64>()?;
        let theirs = x.gelu()?.to_vec1::<f64>()?;
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let ours = apply_activation(Activation::Gelu, &x)?.to_vec1::<f64>()?;
        let theirs = x.gelu_erf()?.to_vec1::<f64>()?;
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn rope_rotates_dimension_pairs_i_and_i_plus_half() -> Result<()> {
        let rotary = RotaryEmbedding::new(
            4,
            &RopeParams {
                theta: 100.0,
                scaling: None,
            },
        );
        let (cos, sin) = rotary.cos_sin(3, DType::F64, &Device::Cpu)?;
        let x = [0.3f64, -1.2, 0.7, 2.0];
        let xt = Tensor::new(&x, &Device::Cpu)?
            .reshape((1, 1, 1, 4))?
            .repeat((1, 1, 3, 1))?;
        let y = apply_rope(&xt, &cos, &sin)?
            .reshape((3, 4))?
            .to_vec2::<f64>()?;
        for (p, row) in y.iter().enumerate() {
            for i in 0..2 {
                let a = p as f64 / 100f64.powf(2.0 * i as f64 / 4.0);
                let (c, s) = (a.cos(), a.sin());
                assert!((row[i] - (x[i] * c - x[i + 2] * s)).abs() < 1e-14);
                assert!((row[i + 2] - (x[i + 2] * c + x[i] * s)).abs() < 1e-14);
            }
        }
        Ok(())
    }

    #[test]
    fn rms_norms_match_their_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let x = [1.0f64, -2.0, 3.0, 0.5];
        let w = [0.5f64, 1.0, -1.0, 2.0];
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / 4.0 + 1e-6).sqrt();
        let xt = Tensor::new(&x, &dev)?;
        let plain = RmsNorm::new(Tensor::new(&w, &dev)?, 1e-6)
            .forward(&xt)?
            .to_vec1::<f64>()?;
        let gemma = RmsNorm::new_unit_offset(Tensor::new(&w, &dev)?, 1e-6)
            .forward(&xt)?
            .to_vec1::<f64>()?;
        for i in 0..4 {
            assert!((plain[i] - w[i] * x[i] / rms).abs() < 1e-14);
            assert!((gemma[i] - (1.0 + w[i]) * x[i] / rms).abs() < 1e-14);
        }
        Ok(())
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let params = RopeParams {
            theta: 500_000.0,
            scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
        };
        let plain = RotaryEmbedding::new(
            128,
            &RopeParams {
                theta: 500_000.0,
                scaling: None,
            },
        );
        let scaled = RotaryEmbedding::new(128, &params);
        assert_eq!(scaled.inv_freq()[0], plain.inv_freq()[0]);
        let last = plain.inv_freq().len() - 1;
        assert!((scaled.inv_freq()[last] - plain.inv_freq()[last] / 8.0).abs() < 1e-20);
    }
}
