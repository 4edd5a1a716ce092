//! Mistral (`MistralForCausalLM`): the Llama decoder of [`super::llama`] with a sliding window on
//! every layer (each position attends to itself and the `sliding_window - 1` before it). Its
//! configuration is resolved by [`em_config::mistral`], which sets the per-layer windows.

/// The Mistral decoder: Llama's, built from a config with a window on every layer.
pub type Model = super::llama::Model;
