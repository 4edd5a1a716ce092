//! Gemma3, text only (`Gemma3ForCausalLM`, `model_type: "gemma3_text"`), with the defaults of
//! transformers' `Gemma3TextConfig`: sliding-window layers with their own rotary base, and in
//! transformers 5 one `rope_parameters` entry per layer type.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::family::{Decoder, Family, GgufLayout, GgufShape, Windows};
use crate::rope::{resolve_rope, RopeSource};
use crate::{
    windows_from_layer_types, Activation, Architecture, ConfigError, ConfigSource, ModelConfig,
    Resolver,
};

/// Gemma3 text in transformers and llama.cpp: sandwich and `1 + w` norms, q/k head norms,
/// per-layer windows with their own rotary base, linear rope scaling.
pub const FAMILY: Family = Family {
    architecture: Architecture::Gemma3,
    hf_model_type: "gemma3_text",
    hf_class: "Gemma3ForCausalLM",
    hf_aliases: &["gemma3"],
    resolve,
    decoder: Decoder::Gemma3,
    gguf: GgufLayout {
        name: "gemma3",
        activation: Activation::GeluTanh,
        qkv_bias: false,
        qk_norm: true,
        permute_qk: false,
        unit_offset_norms: true,
        sandwich_norms: true,
        rope_dimension_count: false,
        rope_scalings: &["linear"],
        windows: Windows::Pattern,
        query_pre_attn_scalar: llama_cpp_query_pre_attn_scalar,
        hf_keys: gemma3_keys,
    },
};

/// The `query_pre_attn_scalar` llama.cpp's gemma3 assumes: `head_dim`, except for the 62-layer
/// 27B model, where it is `hidden_size / num_attention_heads`.
fn llama_cpp_query_pre_attn_scalar(shape: &GgufShape) -> usize {
    if shape.num_layers == 62 {
        shape.hidden_size / shape.num_heads.max(1)
    } else {
        shape.head_dim
    }
}

fn gemma3_keys(shape: &GgufShape) -> Vec<(&'static str, Value)> {
    let types: Vec<&str> = shape
        .sliding_layers
        .iter()
        .map(|&s| {
            if s {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    let mut keys = vec![
        ("hidden_activation", json!("gelu_pytorch_tanh")),
        (
            "query_pre_attn_scalar",
            json!(llama_cpp_query_pre_attn_scalar(shape)),
        ),
        ("sliding_window", json!(shape.sliding_window)),
        ("layer_types", json!(types)),
        ("rope_local_base_freq", json!(shape.rope_local_base_freq)),
        ("final_logit_softcapping", Value::Null),
        ("attn_logit_softcapping", Value::Null),
        ("attention_bias", json!(false)),
    ];
    if let Some(factor) = shape.rope_linear_factor {
        keys.push((
            "rope_scaling",
            json!({"rope_type": "linear", "factor": factor}),
        ));
    }
    keys
}

/// The Gemma3-only keys.
#[derive(Debug, Deserialize)]
struct Gemma3Keys {
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
}

/// Resolves a Gemma3 text config.json.
pub fn resolve(src: &ConfigSource) -> Result<ModelConfig, ConfigError> {
    if src.has("text_config") {
        return Err(src.unsupported(
            "multimodal Gemma3 (text_config); use a text-only Gemma3ForCausalLM checkpoint"
                .to_string(),
        ));
    }
    let mut r = Resolver::new(src)?;
    let k: Gemma3Keys = src.section()?;
    if k.use_bidirectional_attention == Some(true) {
        return Err(src.unsupported(
            "use_bidirectional_attention = true (not a causal language model)".to_string(),
        ));
    }
    let req = r.required_common()?;
    let sliding_window = r.required("sliding_window", k.sliding_window)?;

    // 5.x: {"full_attention": {...}, "sliding_attention": {...}}; a flat object is the global one.
    let params = r.common.rope_parameters.as_ref().filter(|v| !v.is_null());
    let per_layer_type = params
        .is_some_and(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let (global, local) = if per_layer_type {
        let p = params.expect("checked above");
        (p.get("full_attention"), p.get("sliding_attention"))
    } else {
        (params, None::<&Value>)
    };
    let rope = resolve_rope(
        src,
        RopeSource {
            theta_key: "rope_theta",
            theta: r.common.rope_theta,
            scaling: r.common.rope_scaling.as_ref(),
            params_key: if per_layer_type {
                "rope_parameters.full_attention"
            } else {
                "rope_parameters"
            },
            params: global,
        },
    )?;
    let local_rope = resolve_rope(
        src,
        RopeSource {
            theta_key: "rope_local_base_freq",
            theta: k.rope_local_base_freq,
            scaling: None,
            params_key: "rope_parameters.sliding_attention",
            params: local,
        },
    )?;

    let num_key_value_heads = r.or_default("num_key_value_heads", r.common.num_key_value_heads, 4);
    let head_dim = r.or_default("head_dim", r.common.head_dim, 256);
    let act = k.hidden_activation.or(k.hidden_act);
    let hidden_act = r.activation("hidden_activation", act, "gelu_pytorch_tanh")?;
    let tie_word_embeddings =
        r.or_default("tie_word_embeddings", r.common.tie_word_embeddings, true);
    let attention_bias = r.or_default("attention_bias", k.attention_bias, false);
    let query_pre_attn_scalar =
        r.or_default("query_pre_attn_scalar", k.query_pre_attn_scalar, 256.0);
    let layer_windows = match &r.common.layer_types {
        Some(types) => windows_from_layer_types(src, types, Some(sliding_window))?,
        None => {
            let pattern = r
                .or_default("sliding_window_pattern", k.sliding_window_pattern, 6)
                .max(1);
            (0..req.num_hidden_layers)
                .map(|i| ((i + 1) % pattern != 0).then_some(sliding_window))
                .collect()
        }
    };
    Ok(ModelConfig {
        architecture: Architecture::Gemma3,
        vocab_size: req.vocab_size,
        hidden_size: req.hidden_size,
        intermediate_size: req.intermediate_size,
        num_hidden_layers: req.num_hidden_layers,
        num_attention_heads: req.num_attention_heads,
        num_key_value_heads,
        head_dim,
        hidden_act,
        rms_norm_eps: req.rms_norm_eps,
        tie_word_embeddings,
        qkv_bias: attention_bias,
        o_bias: attention_bias,
        mlp_bias: false,
        qk_norm: true,
        rope,
        local_rope,
        layer_windows,
        query_pre_attn_scalar,
        attn_logit_softcapping: k.attn_logit_softcapping,
        final_logit_softcapping: k.final_logit_softcapping,
        max_position_embeddings: req.max_position_embeddings,
        dtype: r.dtype(),
        pad_token_id: r.pad_token_id(),
        defaults_applied: r.into_applied(),
        raw: src.raw.clone(),
    })
}
