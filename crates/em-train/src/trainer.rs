//! One EM update from sampled responses: gradient of the token-mean entropy over all of them,
//! global grad-norm clipping, AdamW; and the model + optimizer state a run resumes from.

use std::path::Path;

use candle_core::{DType, Device};

use crate::models::{CausalLm, ModelError};
use crate::objective::{
    accumulate_em_gradients_observed, EmOptions, Gradients, Pass, Sequence, TrainError,
};
use crate::optim::{AdamW, AdamWConfig};

/// The optimizer state file inside a checkpoint directory: in a subdirectory, so that tools that
/// read every top-level `*.safetensors` of an HF directory see only the model.
pub const OPTIMIZER_FILE: &str = "optimizer/adamw.safetensors";

/// Settings of an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// AdamW hyper-parameters.
    pub optimizer: AdamWConfig,
    /// Global L2 grad-norm clip (`clip_grad_norm_`); 0 disables it.
    pub max_grad_norm: f64,
    /// Temperature, micro-batch and logit chunking of the objective.
    pub em: EmOptions,
}

/// Figures of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// The EM loss before the update: token-mean entropy over all responses.
    pub loss: f64,
    /// Response tokens (= response-predicting positions) of the update.
    pub n_tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Mean over response-predicting positions of the largest raw logit.
    pub mean_max_logit: f64,
}

/// A model with its optimizer.
#[derive(Debug)]
pub struct Trainer {
    /// The model being trained.
    pub model: CausalLm,
    /// Its optimizer state.
    pub optimizer: AdamW,
    /// The update settings.
    pub config: TrainConfig,
}

impl Trainer {
    /// A fresh optimizer on `model`.
    pub fn new(model: CausalLm, config: TrainConfig) -> Self {
        Self {
            model,
            optimizer: AdamW::new(config.optimizer),
            config,
        }
    }

    /// Loads a checkpoint written by [`Trainer::save`] (an HF directory with the optimizer state).
    pub fn resume(
        dir: &Path,
        config: TrainConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ResumeError> {
        let model = CausalLm::from_hf_dir(dir, dtype, device)?;
        Self::with_saved_optimizer(model, dir, config, device)
    }

    /// Resumes a run under a LoRA adapter: the frozen base from `base`, the adapter and the
    /// optimizer state from the checkpoint `dir` written by [`Trainer::save`].
    pub fn resume_adapter(
        base: &Path,
        dir: &Path,
        config: TrainConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, ResumeError> {
        let model = crate::lora::load_adapted(base, dir, dtype, device)?;
        Self::with_saved_optimizer(model, dir, config, device)
    }

    /// `model` with the optimizer state saved in the checkpoint `dir`, which must fit it.
    fn with_saved_optimizer(
        model: CausalLm,
        dir: &Path,
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self, ResumeError> {
        let path = dir.join(OPTIMIZER_FILE);
        let optimizer = AdamW::load(&path, config.optimizer, device)?;
        optimizer.check_fits(&model.parameters(), &path)?;
        Ok(Self {
            model,
            optimizer,
            config,
        })
    }

    /// Writes the model as an HF directory (config.json, model.safetensors in the model's dtype)
    /// or, under an adapter, the adapter as a PEFT directory; and the optimizer state next to it.
    pub fn save(&self, dir: &Path) -> Result<(), ResumeError> {
        self.save_model(dir, None)?;
        self.save_optimizer(dir)
    }

    /// The optimizer state alone, at [`OPTIMIZER_FILE`] inside `dir`.
    pub fn save_optimizer(&self, dir: &Path) -> Result<(), ResumeError> {
        let path = dir.join(OPTIMIZER_FILE);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ModelError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        self.optimizer.save(&path)?;
        Ok(())
    }

    /// The model alone: an HF directory, or a PEFT adapter directory naming `base_model`.
    pub fn save_model(&self, dir: &Path, base_model: Option<String>) -> Result<(), ResumeError> {
        match crate::lora::to_peft(&self.model, base_model)? {
            Some(adapter) => em_convert::lora::write_peft_dir(&adapter, dir).map_err(|e| {
                ModelError::BadAdapter {
                    message: format!("{e:#}"),
                }
            })?,
            None => self.model.save_hf_dir(dir, self.model.dtype())?,
        }
        Ok(())
    }

    /// One update on `sequences` (all responses of the update): gradient of their token-mean
    /// entropy, clipped, then one AdamW step.
    pub fn update(&mut self, sequences: &[Sequence]) -> Result<UpdateStats, TrainError> {
        self.update_observed(sequences, &mut |_| {})
    }

    /// [`Trainer::update`], calling `on_pass` after each micro-batch's forward and backward pass.
    pub fn update_observed(
        &mut self,
        sequences: &[Sequence],
        on_pass: &mut dyn FnMut(Pass),
    ) -> Result<UpdateStats, TrainError> {
        let n_tokens: usize = sequences.iter().map(|s| s.response_ids.len()).sum();
        let mut grads = Gradients::new(self.model.parameters());
        let stats = accumulate_em_gradients_observed(
            &self.model,
            sequences,
            &self.config.em,
            1.0 / n_tokens.max(1) as f64,
            &mut grads,
            on_pass,
        )?;
        let grad_norm = if self.config.max_grad_norm > 0.0 {
            grads.clip_norm(self.config.max_grad_norm)
        } else {
            grads.global_norm()
        }
        .map_err(|source| TrainError::Candle {
            context: "gradient norm".to_string(),
            source,
        })?;
        self.optimizer.step(&grads)?;
        let n = stats.n_tokens.max(1) as f64;
        Ok(UpdateStats {
            loss: stats.entropy_sum / n,
            n_tokens: stats.n_tokens,
            grad_norm,
            mean_max_logit: stats.max_logit_sum / n,
        })
    }
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The model part.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The optimizer part.
    #[error(transparent)]
    Train(#[from] TrainError),
}
