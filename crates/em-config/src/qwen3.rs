//! Qwen3 dense (`Qwen3ForCausalLM`), with the defaults of transformers' `Qwen3Config`: RMS norms
//! over `head_dim` on each query and key head, `attention_bias` on all four attention projections
//! (false by default), an explicit `head_dim` (128 when absent, not `hidden_size / heads`) and
//! Qwen2's optional sliding window on the layers from `max_window_layers` up.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::family::{head_dim_scalar, Decoder, Family, GgufLayout, GgufShape, Windows};
use crate::rope::{resolve_rope, RopeSource};
use crate::{
    windows_from_layer_types, Activation, Architecture, ConfigError, ConfigSource, ModelConfig,
    Resolver,
};

/// Qwen3 in transformers and llama.cpp (`qwen3`): q/k head norms, no biases (llama.cpp loads no
/// output-projection bias, so `attention_bias` is refused there), no window.
pub const FAMILY: Family = Family {
    architecture: Architecture::Qwen3,
    hf_model_type: "qwen3",
    hf_class: "Qwen3ForCausalLM",
    hf_aliases: &[],
    resolve,
    decoder: Decoder::Llama,
    gguf: GgufLayout {
        name: "qwen3",
        activation: Activation::Silu,
        qkv_bias: false,
        qk_norm: true,
        permute_qk: false,
        unit_offset_norms: false,
        sandwich_norms: false,
        rope_dimension_count: false,
        rope_scalings: &[],
        windows: Windows::Refused,
        query_pre_attn_scalar: head_dim_scalar,
        hf_keys: qwen3_keys,
    },
};

fn qwen3_keys(shape: &GgufShape) -> Vec<(&'static str, Value)> {
    let mut keys = crate::qwen2::qwen_keys(shape);
    keys.push(("attention_bias", json!(false)));
    keys
}

/// `Qwen3Config`'s `num_key_value_heads` when the key is absent (null means `num_attention_heads`).
const DEFAULT_KV_HEADS: usize = 32;
/// `Qwen3Config`'s `head_dim` when the key is absent.
const DEFAULT_HEAD_DIM: usize = 128;

/// The Qwen3-only keys.
#[derive(Debug, Deserialize)]
struct Qwen3Keys {
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    max_window_layers: Option<usize>,
}

/// Resolves a Qwen3 config.json.
pub fn resolve(src: &ConfigSource) -> Result<ModelConfig, ConfigError> {
    let mut r = Resolver::new(src)?;
    let k: Qwen3Keys = src.section()?;
    let req = r.required_common()?;
    let rope = resolve_rope(
        src,
        RopeSource {
            theta_key: "rope_theta",
            theta: r.common.rope_theta,
            scaling: r.common.rope_scaling.as_ref(),
            params_key: "rope_parameters",
            params: r.common.rope_parameters.as_ref(),
        },
    )?;
    let heads = req.num_attention_heads;
    let kv_default = if src.has("num_key_value_heads") {
        heads
    } else {
        DEFAULT_KV_HEADS
    };
    let num_key_value_heads = r.or_default(
        "num_key_value_heads",
        r.common.num_key_value_heads,
        kv_default,
    );
    let head_dim = r.or_default("head_dim", r.common.head_dim, DEFAULT_HEAD_DIM);
    let hidden_act = r.activation("hidden_act", k.hidden_act, "silu")?;
    let tie_word_embeddings =
        r.or_default("tie_word_embeddings", r.common.tie_word_embeddings, false);
    let attention_bias = r.or_default("attention_bias", k.attention_bias, false);
    let window = if r.or_default("use_sliding_window", k.use_sliding_window, false) {
        match (k.sliding_window, src.has("sliding_window")) {
            (Some(w), _) => Some(w),
            (None, true) => None,
            (None, false) => Some(r.or_default("sliding_window", None, 4096)),
        }
    } else {
        None
    };
    let layer_windows = match (&r.common.layer_types, window) {
        (Some(types), _) => windows_from_layer_types(src, types, window)?,
        (None, None) => vec![None; req.num_hidden_layers],
        (None, Some(w)) => {
            let full = r.or_default("max_window_layers", k.max_window_layers, 28);
            (0..req.num_hidden_layers)
                .map(|i| (i >= full).then_some(w))
                .collect()
        }
    };
    Ok(ModelConfig {
        architecture: Architecture::Qwen3,
        vocab_size: req.vocab_size,
        hidden_size: req.hidden_size,
        intermediate_size: req.intermediate_size,
        num_hidden_layers: req.num_hidden_layers,
        num_attention_heads: heads,
        num_key_value_heads,
        head_dim,
        hidden_act,
        rms_norm_eps: req.rms_norm_eps,
        tie_word_embeddings,
        qkv_bias: attention_bias,
        o_bias: attention_bias,
        mlp_bias: false,
        qk_norm: true,
        local_rope: rope.clone(),
        rope,
        layer_windows,
        query_pre_attn_scalar: head_dim as f64,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        max_position_embeddings: req.max_position_embeddings,
        dtype: r.dtype(),
        pad_token_id: r.pad_token_id(),
        defaults_applied: r.into_applied(),
        raw: src.raw.clone(),
    })
}
