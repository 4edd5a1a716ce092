//! Qwen3 dense (`Qwen3ForCausalLM`): the Llama decoder of [`super::llama`] with an RMS norm over
//! `head_dim` on each query and key head before the rotary embedding (`self_attn.q_norm`,
//! `self_attn.k_norm`), an explicit `head_dim`, and `attention_bias` on q/k/v/o. Its
//! configuration is resolved by [`em_config::qwen3`], which sets `qk_norm`.

/// The Qwen3 decoder: Llama's, built from a config with `qk_norm` set.
pub type Model = super::llama::Model;
