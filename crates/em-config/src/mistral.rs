//! Mistral (`MistralForCausalLM`), with the defaults of transformers' `MistralConfig`: the Llama
//! layout without biases, 8 key/value heads and a sliding window of 4096 on every layer when the
//! keys are absent (an explicit null `sliding_window` means full attention).

use serde::Deserialize;
use serde_json::{json, Value};

use crate::family::{head_dim_scalar, Decoder, Family, GgufLayout, GgufShape, Windows};
use crate::rope::{resolve_rope, RopeSource};
use crate::{Activation, Architecture, ConfigError, ConfigSource, ModelConfig, Resolver};

/// Mistral in transformers, and as llama.cpp's converter writes it: llama's layout, the window
/// recorded but not applied by llama.cpp.
pub const FAMILY: Family = Family {
    architecture: Architecture::Mistral,
    hf_model_type: "mistral",
    hf_class: "MistralForCausalLM",
    hf_aliases: &[],
    resolve,
    decoder: Decoder::Llama,
    gguf: GgufLayout {
        name: "llama",
        activation: Activation::Silu,
        qkv_bias: false,
        qk_norm: false,
        permute_qk: true,
        unit_offset_norms: false,
        sandwich_norms: false,
        rope_dimension_count: true,
        rope_scalings: &["llama3"],
        windows: Windows::RecordedOnly,
        query_pre_attn_scalar: head_dim_scalar,
        hf_keys: mistral_keys,
    },
};

fn mistral_keys(shape: &GgufShape) -> Vec<(&'static str, Value)> {
    vec![
        ("hidden_act", json!("silu")),
        ("sliding_window", json!(shape.sliding_window)),
    ]
}

/// `MistralConfig`'s `num_key_value_heads` when the key is absent (null means `num_attention_heads`).
const DEFAULT_KV_HEADS: usize = 8;
/// `MistralConfig`'s `sliding_window` when the key is absent.
const DEFAULT_WINDOW: usize = 4096;

/// The Mistral-only keys.
#[derive(Debug, Deserialize)]
struct MistralKeys {
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
}

/// Resolves a Mistral config.json.
pub fn resolve(src: &ConfigSource) -> Result<ModelConfig, ConfigError> {
    let mut r = Resolver::new(src)?;
    let k: MistralKeys = src.section()?;
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
    let head_dim = r.head_dim_or_split(&req);
    let hidden_act = r.activation("hidden_act", k.hidden_act, "silu")?;
    let tie_word_embeddings =
        r.or_default("tie_word_embeddings", r.common.tie_word_embeddings, false);
    let window = match (k.sliding_window, src.has("sliding_window")) {
        (Some(w), _) => Some(w),
        (None, true) => None,
        (None, false) => Some(r.or_default("sliding_window", None, DEFAULT_WINDOW)),
    };
    Ok(ModelConfig {
        architecture: Architecture::Mistral,
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
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        local_rope: rope.clone(),
        rope,
        layer_windows: vec![window; req.num_hidden_layers],
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
