//! em-train: differentiable causal language models (Qwen2, Llama, Gemma3) on candle, whose every
//! weight receives a gradient, the one-shot entropy-minimization objective, AdamW and the update
//! step. Never depends on llama.cpp: it trains on token ids, whoever sampled them.

#![warn(missing_docs)]

pub mod accumulate;
mod adapter;
pub mod flops;
pub mod fused;
mod grads;
pub mod layers;
pub mod lora;
pub mod memory;
pub mod models;
pub mod objective;
pub mod optim;
pub mod pretrain;
pub mod trainer;

pub use objective::{
    accumulate_em_gradients, accumulate_em_gradients_observed, em_loss, entropy,
    predicting_positions, EmOptions, EmStats, Gradients, Pass, Sequence, TrainError,
};
pub use optim::{AdamW, AdamWConfig, Precision};
pub use trainer::{ResumeError, TrainConfig, Trainer, UpdateStats};

/// The device named `spec`: `cpu`, `cuda` (device 0) or `cuda:N`. A CUDA device in a build
/// without the `cuda` feature, or one that cannot be opened, is an error naming it.
pub fn parse_device(spec: &str) -> Result<candle_core::Device, DeviceError> {
    let bad = |message: String| DeviceError {
        spec: spec.to_string(),
        message,
    };
    let ordinal = match spec {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        _ => spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad("expected cpu, cuda or cuda:N".into()))?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(bad(
            "this build has no CUDA support (build with `--features cuda`)".into(),
        ));
    }
    candle_core::Device::new_cuda(ordinal).map_err(|e| bad(e.to_string().replace('\n', " ")))
}

/// A `--device` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--device {spec}: {message}")]
pub struct DeviceError {
    /// What was asked for.
    pub spec: String,
    /// Why it cannot be used.
    pub message: String,
}

#[cfg(test)]
mod device_tests {
    #[test]
    fn devices_parse_or_fail_in_one_line() {
        assert!(super::parse_device("cpu").unwrap().is_cpu());
        let e = super::parse_device("tpu").unwrap_err().to_string();
        assert_eq!(e, "--device tpu: expected cpu, cuda or cuda:N");
        if !candle_core::utils::cuda_is_available() {
            let e = super::parse_device("cuda:1").unwrap_err().to_string();
            assert!(
                e.starts_with("--device cuda:1: this build has no CUDA"),
                "{e}"
            );
        }
    }
}
