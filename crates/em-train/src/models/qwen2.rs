//! Qwen2 / Qwen2.5 / Qwen2.5-Math (`Qwen2ForCausalLM`): the Llama decoder of [`super::llama`] with
//! biased q/k/v projections (none on o_proj), GQA and an optional sliding window on the upper layers.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{
    parse_activation, parse_rope, parse_section, Architecture, ConfigSource, ModelConfig,
    ModelError,
};

/// The fields of a Qwen2 config.json, with the defaults of transformers' `Qwen2Config`.
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
    /// Key/value heads (defaults to the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head size (defaults to `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Context length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMS norm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Whether the LM head is the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Rotary base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Rotary scaling.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// Rotary parameters in the transformers 5 layout (overrides the two above).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// Whether the upper layers use a sliding window.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Window size of sliding layers.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Layers below this index use full attention.
    #[serde(default = "default_max_window_layers")]
    pub max_window_layers: usize,
    /// Explicit per-layer "full_attention" / "sliding_attention".
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

fn default_vocab_size() -> usize {
    151_936
}
fn default_hidden_size() -> usize {
    4096
}
fn default_intermediate_size() -> usize {
    22_016
}
fn default_layers() -> usize {
    32
}
fn default_heads() -> usize {
    32
}
fn default_act() -> String {
    "silu".to_string()
}
fn default_max_pos() -> usize {
    32_768
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_window_layers() -> usize {
    28
}

/// Per-layer windows from `layer_types`, naming `origin` on error.
pub(crate) fn windows_from_layer_types(
    types: &[String],
    window: Option<usize>,
    origin: &Path,
) -> std::result::Result<Vec<Option<usize>>, ModelError> {
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => window.map(Some).ok_or_else(|| ModelError::InvalidConfig {
                path: origin.to_path_buf(),
                message: "layer_types has \"sliding_attention\" but sliding_window is null"
                    .to_string(),
            }),
            other => Err(ModelError::Unsupported {
                path: origin.to_path_buf(),
                what: format!("layer type \"{other}\""),
            }),
        })
        .collect()
}

impl Config {
    /// Reads the Qwen2 fields of `raw` and resolves them into a [`ModelConfig`].
    pub fn resolve(src: &ConfigSource) -> std::result::Result<ModelConfig, ModelError> {
        let (raw, origin) = (src.raw, src.origin);
        let c: Config = parse_section(src)?;
        let head_dim = c
            .head_dim
            .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
        let rope = match &c.rope_parameters {
            Some(p) => parse_rope(c.rope_theta, Some(p), origin)?,
            None => parse_rope(c.rope_theta, c.rope_scaling.as_ref(), origin)?,
        };
        let window = if c.use_sliding_window {
            c.sliding_window
        } else {
            None
        };
        let layer_windows = match &c.layer_types {
            Some(types) => windows_from_layer_types(types, window, origin)?,
            None => (0..c.num_hidden_layers)
                .map(|i| window.filter(|_| i >= c.max_window_layers))
                .collect(),
        };
        Ok(ModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            hidden_act: parse_activation(&c.hidden_act, origin)?,
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            local_rope: rope.clone(),
            rope,
            layer_windows,
            query_pre_attn_scalar: head_dim as f64,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            max_position_embeddings: c.max_position_embeddings,
            raw: raw.clone(),
        })
    }
}

/// The Qwen2 decoder: Llama's, built from a config with `qkv_bias` set.
pub type Model = super::llama::Model;
