//! em-train: differentiable causal language models (Qwen2, Llama, Gemma3) on candle, whose every
//! weight receives a gradient, for one-shot entropy minimization.

#![warn(missing_docs)]

pub mod layers;
pub mod models;
