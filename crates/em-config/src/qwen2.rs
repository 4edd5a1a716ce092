//! Qwen2 / Qwen2.5 / Qwen2.5-Math (`Qwen2ForCausalLM`), with the defaults of transformers'
//! `Qwen2Config`: biased q/k/v projections (none on o_proj or the MLP) and an optional sliding
//! window on the layers from `max_window_layers` up.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::family::{head_dim_scalar, Decoder, Family, GgufLayout, GgufShape, Windows};
use crate::{
    windows_from_layer_types, Activation, Architecture, ConfigError, ConfigSource, LlamaLayout,
    ModelConfig, Required, Resolver,
};

/// Qwen2 in transformers and llama.cpp: biased q/k/v, no window in llama.cpp.
pub const FAMILY: Family = Family {
    architecture: Architecture::Qwen2,
    hf_model_type: "qwen2",
    hf_class: "Qwen2ForCausalLM",
    hf_aliases: &[],
    resolve,
    decoder: Decoder::Llama,
    gguf: GgufLayout {
        name: "qwen2",
        activation: Activation::Silu,
        qkv_bias: true,
        qk_norm: false,
        permute_qk: false,
        unit_offset_norms: false,
        sandwich_norms: false,
        rope_dimension_count: false,
        rope_scalings: &[],
        windows: Windows::Refused,
        query_pre_attn_scalar: head_dim_scalar,
        hf_keys: qwen_keys,
    },
};

/// Qwen2's and Qwen3's keys written back from a GGUF: no window.
pub(crate) fn qwen_keys(shape: &GgufShape) -> Vec<(&'static str, Value)> {
    vec![
        ("hidden_act", json!("silu")),
        ("use_sliding_window", json!(false)),
        ("sliding_window", Value::Null),
        ("max_window_layers", json!(shape.num_layers)),
    ]
}

/// `Qwen2Config`'s `num_key_value_heads` when the key is absent (null means `num_attention_heads`).
const DEFAULT_KV_HEADS: usize = 32;

/// The Qwen2-only keys.
#[derive(Debug, Deserialize)]
struct Qwen2Keys {
    hidden_act: Option<String>,
    #[serde(flatten)]
    window: QwenWindowKeys,
}

/// Resolves a Qwen2 config.json.
pub fn resolve(src: &ConfigSource) -> Result<ModelConfig, ConfigError> {
    let mut r = Resolver::new(src)?;
    let k: Qwen2Keys = src.section()?;
    let req = r.required_common()?;
    let rope = r.global_rope()?;
    let num_key_value_heads = r.kv_heads(req.num_attention_heads, DEFAULT_KV_HEADS);
    let head_dim = r.head_dim_or_split(&req);
    let hidden_act = r.activation("hidden_act", k.hidden_act, "silu")?;
    let tie_word_embeddings =
        r.or_default("tie_word_embeddings", r.common.tie_word_embeddings, false);
    let layer_windows = qwen_windows(&mut r, &req, k.window)?;
    Ok(r.llama_layout(
        &req,
        LlamaLayout {
            architecture: Architecture::Qwen2,
            num_key_value_heads,
            head_dim,
            hidden_act,
            tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            rope,
            layer_windows,
        },
    ))
}

/// The window keys Qwen2 and Qwen3 share.
#[derive(Debug, Deserialize)]
pub(crate) struct QwenWindowKeys {
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    max_window_layers: Option<usize>,
}

/// Qwen's per-layer windows: `layer_types` when given; else, with `use_sliding_window`, the window
/// (4096 when absent; an explicit null means none) on the layers from `max_window_layers` (28) up.
pub(crate) fn qwen_windows(
    r: &mut Resolver,
    req: &Required,
    k: QwenWindowKeys,
) -> Result<Vec<Option<usize>>, ConfigError> {
    let window = if r.or_default("use_sliding_window", k.use_sliding_window, false) {
        match (k.sliding_window, r.src.has("sliding_window")) {
            (Some(w), _) => Some(w),
            (None, true) => None,
            (None, false) => Some(r.or_default("sliding_window", None, 4096)),
        }
    } else {
        None
    };
    Ok(match (&r.common.layer_types, window) {
        (Some(types), _) => windows_from_layer_types(r.src, types, window)?,
        (None, None) => vec![None; req.num_hidden_layers],
        (None, Some(w)) => {
            let full = r.or_default("max_window_layers", k.max_window_layers, 28);
            (0..req.num_hidden_layers)
                .map(|i| (i >= full).then_some(w))
                .collect()
        }
    })
}
