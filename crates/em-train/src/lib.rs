//! em-train: differentiable causal language models (Qwen2, Llama, Gemma3) on candle, whose every
//! weight receives a gradient, the one-shot entropy-minimization objective, AdamW and the update
//! step. Never depends on llama.cpp: it trains on token ids, whoever sampled them.

#![warn(missing_docs)]

pub mod layers;
pub mod models;
pub mod objective;
pub mod optim;
pub mod pretrain;
pub mod trainer;

pub use objective::{
    accumulate_em_gradients, em_loss, entropy, predicting_positions, EmOptions, EmStats, Gradients,
    Sequence, TrainError,
};
pub use optim::{AdamW, AdamWConfig, Precision};
pub use trainer::{ResumeError, TrainConfig, Trainer, UpdateStats};
