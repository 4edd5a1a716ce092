//! Qwen3 dense (`Qwen3ForCausalLM`), with the defaults of transformers' `Qwen3Config`: RMS norms
//! over `head_dim` on each query and key head, `attention_bias` on all four attention projections
//! (false by default), an explicit `head_dim` (128 when absent, not `hidden_size / heads`) and
//! Qwen2's optional sliding window on the layers from `max_window_layers` up.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::family::{head_dim_scalar, Decoder, Family, GgufLayout, GgufShape, Windows};
use crate::qwen2::{qwen_windows, QwenWindowKeys};
use crate::{
    Activation, Architecture, ConfigError, ConfigSource, LlamaLayout, ModelConfig, Resolver,
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
    #[serde(flatten)]
    window: QwenWindowKeys,
}

/// Resolves a Qwen3 config.json.
pub fn resolve(src: &ConfigSource) -> Result<ModelConfig, ConfigError> {
    let mut r = Resolver::new(src)?;
    let k: Qwen3Keys = src.section()?;
    let req = r.required_common()?;
    let rope = r.global_rope()?;
    let num_key_value_heads = r.kv_heads(req.num_attention_heads, DEFAULT_KV_HEADS);
    let head_dim = r.or_default("head_dim", r.common.head_dim, DEFAULT_HEAD_DIM);
    let hidden_act = r.activation("hidden_act", k.hidden_act, "silu")?;
    let tie_word_embeddings =
        r.or_default("tie_word_embeddings", r.common.tie_word_embeddings, false);
    let attention_bias = r.or_default("attention_bias", k.attention_bias, false);
    let layer_windows = qwen_windows(&mut r, &req, k.window)?;
    Ok(r.llama_layout(
        &req,
        LlamaLayout {
            architecture: Architecture::Qwen3,
            num_key_value_heads,
            head_dim,
            hidden_act,
            tie_word_embeddings,
            qkv_bias: attention_bias,
            o_bias: attention_bias,
            mlp_bias: false,
            qk_norm: true,
            rope,
            layer_windows,
        },
    ))
}
