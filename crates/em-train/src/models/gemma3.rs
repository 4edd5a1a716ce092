//! Gemma3, text only (`Gemma3ForCausalLM`, e.g. gemma-3-270m): embeddings scaled by
//! `sqrt(hidden_size)`, `(1 + w)` RMS norms before and after both attention and MLP, RMS norms on
//! each query/key head, scores scaled by `query_pre_attn_scalar^-1/2`, sliding-window layers with
//! their own rotary base (`rope_local_base_freq`), GELU-tanh MLP and tied embeddings.

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::llama::load_lm_head;
use super::qwen2::windows_from_layer_types;
use super::{
    parse_activation, parse_rope, parse_section, Architecture, ConfigSource, ModelConfig,
    ModelError, Weights,
};
use crate::layers::{
    attention_mask, compute_dtype, Attention, Embedding, Linear, Mlp, RmsNorm, RopeParams,
    RotaryEmbedding,
};

/// The fields of a Gemma3 text config.json, with the defaults of transformers' `Gemma3TextConfig`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// Residual width.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    /// Decoder layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Query heads.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Key/value heads.
    #[serde(default = "default_kv_heads")]
    pub num_key_value_heads: usize,
    /// Head size.
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// MLP activation.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// MLP activation under its older name (used when `hidden_activation` is absent).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Context length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMS norm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Whether the LM head is the embedding.
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Rotary base of full-attention layers.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Rotary scaling of full-attention layers.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// Rotary base of sliding-window layers.
    #[serde(default = "default_local_theta")]
    pub rope_local_base_freq: f64,
    /// Rotary parameters in the transformers 5 layout (overrides the three above).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Bias on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Scores are scaled by this to the power −1/2.
    #[serde(default = "default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    /// Window of sliding layers (each token sees itself and `sliding_window − 1` before it).
    #[serde(default = "default_sliding_window")]
    pub sliding_window: usize,
    /// Explicit per-layer "full_attention" / "sliding_attention".
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Without `layer_types`: every `sliding_window_pattern`-th layer is global, the rest slide.
    #[serde(default = "default_pattern")]
    pub sliding_window_pattern: usize,
    /// `tanh` cap on output logits.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// `tanh` cap on attention logits.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
}

fn default_vocab_size() -> usize {
    262_208
}
fn default_hidden_size() -> usize {
    2304
}
fn default_intermediate_size() -> usize {
    9216
}
fn default_layers() -> usize {
    26
}
fn default_heads() -> usize {
    8
}
fn default_kv_heads() -> usize {
    4
}
fn default_head_dim() -> usize {
    256
}
fn default_max_pos() -> usize {
    131_072
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}
fn default_theta() -> f64 {
    1_000_000.0
}
fn default_local_theta() -> f64 {
    10_000.0
}
fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
fn default_sliding_window() -> usize {
    4096
}
fn default_pattern() -> usize {
    6
}

impl Config {
    /// Reads the Gemma3 fields of `raw` and resolves them into a [`ModelConfig`].
    pub fn resolve(src: &ConfigSource) -> std::result::Result<ModelConfig, ModelError> {
        let (raw, origin) = (src.raw, src.origin);
        if raw.get("text_config").is_some() {
            return Err(ModelError::Unsupported {
                path: origin.to_path_buf(),
                what:
                    "multimodal Gemma3 (text_config); use a text-only Gemma3ForCausalLM checkpoint"
                        .to_string(),
            });
        }
        if raw
            .get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return Err(ModelError::Unsupported {
                path: origin.to_path_buf(),
                what: "use_bidirectional_attention = true (not a causal language model)"
                    .to_string(),
            });
        }
        let c: Config = parse_section(src)?;
        let act = c
            .hidden_activation
            .as_deref()
            .or(c.hidden_act.as_deref())
            .unwrap_or("gelu_pytorch_tanh");
        let (rope, local_rope) = match &c.rope_parameters {
            Some(p)
                if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() =>
            {
                (
                    parse_rope(c.rope_theta, p.get("full_attention"), origin)?,
                    parse_rope(c.rope_local_base_freq, p.get("sliding_attention"), origin)?,
                )
            }
            Some(p) => (
                parse_rope(c.rope_theta, Some(p), origin)?,
                RopeParams {
                    theta: c.rope_local_base_freq,
                    scaling: None,
                },
            ),
            None => (
                parse_rope(c.rope_theta, c.rope_scaling.as_ref(), origin)?,
                RopeParams {
                    theta: c.rope_local_base_freq,
                    scaling: None,
                },
            ),
        };
        let layer_windows = match &c.layer_types {
            Some(types) => windows_from_layer_types(types, Some(c.sliding_window), origin)?,
            None => {
                let pattern = c.sliding_window_pattern.max(1);
                (0..c.num_hidden_layers)
                    .map(|i| ((i + 1) % pattern != 0).then_some(c.sliding_window))
                    .collect()
            }
        };
        Ok(ModelConfig {
            architecture: Architecture::Gemma3,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            hidden_act: parse_activation(act, origin)?,
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
            mlp_bias: false,
            rope,
            local_rope,
            layer_windows,
            query_pre_attn_scalar: c.query_pre_attn_scalar,
            attn_logit_softcapping: c.attn_logit_softcapping,
            final_logit_softcapping: c.final_logit_softcapping,
            max_position_embeddings: c.max_position_embeddings,
            raw: raw.clone(),
        })
    }
}

/// One decoder layer with norms before and after attention and MLP.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    window: Option<usize>,
}

impl DecoderLayer {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask)?;
        let x = (x + self.post_attention_layernorm.forward(&h)?)?;
        let h = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&x)?)?;
        x + self.post_feedforward_layernorm.forward(&h)?
    }
}

/// The Gemma3 text decoder and its LM head.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
    embed_scale: f64,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    final_logit_softcapping: Option<f64>,
    global_rotary: RotaryEmbedding,
    local_rotary: RotaryEmbedding,
}

impl Model {
    /// Takes every weight `cfg` needs from `w`.
    pub fn load(cfg: &ModelConfig, w: &mut Weights) -> std::result::Result<Self, ModelError> {
        let (hs, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let (nh, nkv, im) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let embed_tokens =
            Embedding::new(w.var("model.embed_tokens.weight", &[cfg.vocab_size, hs])?);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (i, window) in cfg.layer_windows.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let norm = |w: &mut Weights, name: &str, dim: usize| {
                w.rms_norm_unit_offset(&format!("{p}.{name}"), dim, eps)
            };
            let input_layernorm = norm(w, "input_layernorm", hs)?;
            let self_attn = Attention {
                q_proj: w.linear(&format!("{p}.self_attn.q_proj"), hs, nh * hd, cfg.qkv_bias)?,
                k_proj: w.linear(&format!("{p}.self_attn.k_proj"), hs, nkv * hd, cfg.qkv_bias)?,
                v_proj: w.linear(&format!("{p}.self_attn.v_proj"), hs, nkv * hd, cfg.qkv_bias)?,
                o_proj: w.linear(&format!("{p}.self_attn.o_proj"), nh * hd, hs, cfg.o_bias)?,
                q_norm: Some(norm(w, "self_attn.q_norm", hd)?),
                k_norm: Some(norm(w, "self_attn.k_norm", hd)?),
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
                softcap: cfg.attn_logit_softcapping,
            };
            let post_attention_layernorm = norm(w, "post_attention_layernorm", hs)?;
            let pre_feedforward_layernorm = norm(w, "pre_feedforward_layernorm", hs)?;
            let mlp = Mlp {
                gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), hs, im, false)?,
                up_proj: w.linear(&format!("{p}.mlp.up_proj"), hs, im, false)?,
                down_proj: w.linear(&format!("{p}.mlp.down_proj"), im, hs, false)?,
                act: cfg.hidden_act,
            };
            let post_feedforward_layernorm = norm(w, "post_feedforward_layernorm", hs)?;
            layers.push(DecoderLayer {
                input_layernorm,
                self_attn,
                post_attention_layernorm,
                pre_feedforward_layernorm,
                mlp,
                post_feedforward_layernorm,
                window: *window,
            });
        }
        let norm = w.rms_norm_unit_offset("model.norm", hs, eps)?;
        let lm_head = load_lm_head(cfg, w, &embed_tokens)?;
        Ok(Self {
            embed_tokens,
            embed_scale: (hs as f64).sqrt(),
            layers,
            norm,
            lm_head,
            final_logit_softcapping: cfg.final_logit_softcapping,
            global_rotary: RotaryEmbedding::new(hd, &cfg.rope),
            local_rotary: RotaryEmbedding::new(hd, &cfg.local_rope),
        })
    }

    /// Final-norm hidden states `[batch, seq, hidden]` for `ids` `[batch, seq]`.
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        let x = self.embed_tokens.forward(ids)?;
        let (dtype, device) = (x.dtype(), x.device().clone());
        // transformers multiplies by the scale cast to the weight dtype.
        let scale = match dtype {
            DType::BF16 => half::bf16::from_f64(self.embed_scale).to_f64(),
            DType::F16 => half::f16::from_f64(self.embed_scale).to_f64(),
            DType::F32 => self.embed_scale as f32 as f64,
            _ => self.embed_scale,
        };
        let mut x = (x * scale)?;
        let (gcos, gsin) = self.global_rotary.cos_sin(seq, dtype, &device)?;
        let (lcos, lsin) = self.local_rotary.cos_sin(seq, dtype, &device)?;
        let full = attention_mask(seq, None, compute_dtype(dtype), &device)?;
        let mut sliding: Vec<(usize, Tensor)> = Vec::new();
        for layer in &self.layers {
            x = match layer.window {
                None => layer.forward(&x, &gcos, &gsin, &full)?,
                Some(wnd) => {
                    let mask = match sliding.iter().find(|(w, _)| *w == wnd) {
                        Some((_, m)) => m.clone(),
                        None => {
                            let m = attention_mask(seq, Some(wnd), compute_dtype(dtype), &device)?;
                            sliding.push((wnd, m.clone()));
                            m
                        }
                    };
                    layer.forward(&x, &lcos, &lsin, &mask)?
                }
            };
        }
        self.norm.forward(&x)
    }

    /// Logits `[.., vocab]` from final hidden states, soft-capped if configured.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        match self.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }
}
