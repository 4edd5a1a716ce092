//! Llama 2/3 and SmolLM2 (`LlamaForCausalLM`), with the defaults of transformers' `LlamaConfig`.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::family::{head_dim_scalar, Decoder, Family, GgufLayout, GgufShape, Windows};
use crate::{
    Activation, Architecture, ConfigError, ConfigSource, LlamaLayout, ModelConfig, Resolver,
};

/// Llama in transformers and llama.cpp: q/k rows permuted, Llama 3 scaling as `rope_freqs`.
pub const FAMILY: Family = Family {
    architecture: Architecture::Llama,
    hf_model_type: "llama",
    hf_class: "LlamaForCausalLM",
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
        windows: Windows::Refused,
        query_pre_attn_scalar: head_dim_scalar,
        hf_keys: llama_keys,
    },
};

fn llama_keys(_: &GgufShape) -> Vec<(&'static str, Value)> {
    vec![
        ("hidden_act", json!("silu")),
        ("attention_bias", json!(false)),
        ("mlp_bias", json!(false)),
        ("pretraining_tp", json!(1)),
    ]
}

/// The Llama-only keys.
#[derive(Debug, Deserialize)]
struct LlamaKeys {
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

/// Resolves a Llama config.json.
pub fn resolve(src: &ConfigSource) -> Result<ModelConfig, ConfigError> {
    let mut r = Resolver::new(src)?;
    let k: LlamaKeys = src.section()?;
    let req = r.required_common()?;
    let rope = r.global_rope()?;
    let num_key_value_heads = r.kv_heads(req.num_attention_heads, req.num_attention_heads);
    let head_dim = r.head_dim_or_split(&req);
    let hidden_act = r.activation("hidden_act", k.hidden_act, "silu")?;
    let tie_word_embeddings =
        r.or_default("tie_word_embeddings", r.common.tie_word_embeddings, false);
    let attention_bias = r.or_default("attention_bias", k.attention_bias, false);
    let mlp_bias = r.or_default("mlp_bias", k.mlp_bias, false);
    Ok(r.llama_layout(
        &req,
        LlamaLayout {
            architecture: Architecture::Llama,
            num_key_value_heads,
            head_dim,
            hidden_act,
            tie_word_embeddings,
            qkv_bias: attention_bias,
            o_bias: attention_bias,
            mlp_bias,
            qk_norm: false,
            rope,
            layer_windows: vec![None; req.num_hidden_layers],
        },
    ))
}
