//! What a model family is, in one value: its transformers names and configuration reader, which
//! decoder trains it, and how llama.cpp holds it (GGUF names, metadata and value maps, as data the
//! converter reads). Each family's file defines its [`Family`]; [`FAMILIES`] lists them, and is
//! the one line to add for a new one (see ARCHITECTURE.md, "Adding an architecture").

use serde_json::{json, Value};

use crate::{Activation, Architecture, ConfigError, ConfigSource, ModelConfig};

/// Every supported family; the order is the order of lookups by name.
pub static FAMILIES: &[&Family] = &[
    &crate::qwen2::FAMILY,
    &crate::qwen3::FAMILY,
    &crate::llama::FAMILY,
    &crate::mistral::FAMILY,
    &crate::gemma3::FAMILY,
];

/// A model family.
#[derive(Debug)]
pub struct Family {
    /// Its name in the workspace.
    pub architecture: Architecture,
    /// The `model_type` transformers writes.
    pub hf_model_type: &'static str,
    /// The causal-LM class transformers writes in `architectures`.
    pub hf_class: &'static str,
    /// Other `model_type` values read as this family.
    pub hf_aliases: &'static [&'static str],
    /// Resolves its config.json.
    pub resolve: fn(&ConfigSource) -> Result<ModelConfig, ConfigError>,
    /// Which decoder em-train builds for it.
    pub decoder: Decoder,
    /// How llama.cpp holds it.
    pub gguf: GgufLayout,
}

/// The decoders em-train has: the Llama layout with the switches of [`ModelConfig`], or Gemma3's
/// own (sandwich norms, `1 + w` norms, the embedding scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    /// Pre-norm decoder, SwiGLU MLP: Llama, Qwen2, Qwen3, Mistral.
    Llama,
    /// Gemma3's decoder.
    Gemma3,
}

/// How llama.cpp converts and computes a family.
#[derive(Debug)]
pub struct GgufLayout {
    /// `general.architecture`.
    pub name: &'static str,
    /// The activation llama.cpp hard-codes.
    pub activation: Activation,
    /// q/k/v biases llama.cpp loads (it loads no output or MLP bias for these families).
    pub qkv_bias: bool,
    /// q/k head norms (`attn_q_norm`, `attn_k_norm`), required when true and refused otherwise.
    pub qk_norm: bool,
    /// q_proj/k_proj rows interleaved per rotary pair (llama's converter permutes them).
    pub permute_qk: bool,
    /// Norm weights stored as `1 + w` (HF stores `w`).
    pub unit_offset_norms: bool,
    /// Gemma's four norms per layer: `post_attention_norm`, `ffn_norm` (pre-feedforward),
    /// `post_ffw_norm` besides `attn_norm`.
    pub sandwich_norms: bool,
    /// Writes `{arch}.rope.dimension_count`.
    pub rope_dimension_count: bool,
    /// The rope scaling types llama.cpp applies for it (`linear` through metadata, `llama3`
    /// through `rope_freqs.weight`).
    pub rope_scalings: &'static [&'static str],
    /// What llama.cpp does with sliding windows.
    pub windows: Windows,
    /// The `query_pre_attn_scalar` llama.cpp assumes for a shape.
    pub query_pre_attn_scalar: fn(&GgufShape) -> usize,
    /// The family's own config.json keys, written back from a GGUF.
    pub hf_keys: fn(&GgufShape) -> Vec<(&'static str, Value)>,
}

/// Sliding windows in llama.cpp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Windows {
    /// None: a config with one is refused.
    Refused,
    /// Per layer, one size: `attention.sliding_window` and `attention.sliding_window_pattern`.
    Pattern,
    /// llama.cpp computes full attention; the window is kept in `attention.sliding_window` (which
    /// it does not read) for the way back, and the conversion says so.
    RecordedOnly,
}

/// The shape facts a GGUF holds, for the per-family rules above.
#[derive(Debug, Clone)]
pub struct GgufShape {
    /// Decoder layers.
    pub num_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Size of a head.
    pub head_dim: usize,
    /// The sliding window, if any.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it slides.
    pub sliding_layers: Vec<bool>,
    /// The rotary base of sliding layers, where separate.
    pub rope_local_base_freq: Option<f64>,
    /// Linear rope scaling.
    pub rope_linear_factor: Option<f64>,
}

/// `head_dim`: what llama.cpp assumes unless a family says otherwise.
pub fn head_dim_scalar(shape: &GgufShape) -> usize {
    shape.head_dim
}

/// The keys every Llama-layout family writes back: its activation.
pub fn silu_keys(_: &GgufShape) -> Vec<(&'static str, Value)> {
    vec![("hidden_act", json!("silu"))]
}

impl Architecture {
    /// This architecture's entry in [`FAMILIES`].
    pub fn family(self) -> &'static Family {
        FAMILIES
            .iter()
            .find(|f| f.architecture == self)
            .expect("every Architecture has a Family in FAMILIES (tests check)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new variant fails to compile here until it is listed in `Architecture::ALL`.
    fn listed(a: Architecture) -> bool {
        match a {
            Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Llama
            | Architecture::Mistral
            | Architecture::Gemma3 => Architecture::ALL.contains(&a),
        }
    }

    #[test]
    fn every_architecture_has_one_family_and_names_resolve_to_it() {
        assert!(Architecture::ALL.iter().all(|a| listed(*a)));
        for arch in Architecture::ALL {
            let n = FAMILIES.iter().filter(|f| f.architecture == *arch).count();
            assert_eq!(n, 1, "{arch:?} in FAMILIES");
            let f = arch.family();
            assert_eq!(Architecture::from_hf_name(f.hf_model_type), Some(*arch));
            assert_eq!(Architecture::from_hf_name(f.hf_class), Some(*arch));
            for alias in f.hf_aliases {
                assert_eq!(Architecture::from_hf_name(alias), Some(*arch));
            }
        }
        assert_eq!(FAMILIES.len(), Architecture::ALL.len());
    }
}
