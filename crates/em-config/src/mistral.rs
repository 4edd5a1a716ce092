//! Mistral (`MistralForCausalLM`), with the defaults of transformers' `MistralConfig`: the Llama
//! layout without biases, 8 key/value heads and a sliding window of 4096 on every layer when the
//! keys are absent (an explicit null `sliding_window` means full attention).

use serde::Deserialize;
use serde_json::{json, Value};

use crate::family::{head_dim_scalar, Decoder, Family, GgufLayout, GgufShape, Windows};
use crate::{
    Activation, Architecture, ConfigError, ConfigSource, LlamaLayout, ModelConfig, Resolver,
};

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
    let rope = r.global_rope()?;
    let num_key_value_heads = r.kv_heads(req.num_attention_heads, DEFAULT_KV_HEADS);
    let head_dim = r.head_dim_or_split(&req);
    let hidden_act = r.activation("hidden_act", k.hidden_act, "silu")?;
    let tie_word_embeddings =
        r.or_default("tie_word_embeddings", r.common.tie_word_embeddings, false);
    let window = match (k.sliding_window, src.has("sliding_window")) {
        (Some(w), _) => Some(w),
        (None, true) => None,
        (None, false) => Some(r.or_default("sliding_window", None, DEFAULT_WINDOW)),
    };
    Ok(r.llama_layout(
        &req,
        LlamaLayout {
            architecture: Architecture::Mistral,
            num_key_value_heads,
            head_dim,
            hidden_act,
            tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            rope,
            layer_windows: vec![window; req.num_hidden_layers],
        },
    ))
}
