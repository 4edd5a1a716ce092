//! Qwen2 / Qwen2.5 / Qwen2.5-Math (`Qwen2ForCausalLM`): the Llama decoder of [`super::llama`] with
//! biased q/k/v projections (none on o_proj), GQA and an optional sliding window on the upper layers.
//! Its configuration is resolved by [`em_config::qwen2`].

/// The Qwen2 decoder: Llama's, built from a config with `qkv_bias` set.
pub type Model = super::llama::Model;
