//! What a run trains and how, as plain settings: grouped by the stage that reads them, flat when
//! written (`#[serde(flatten)]`), so a run file's keys are the command line's flag names
//! (`lr = 2e-5`, `adapter = "lora"`). Every default is METHOD.md's reference setting, written
//! once here; a missing `model` or `prompt` is an error.

use std::path::PathBuf;

use anyhow::bail;
use candle_core::DType;
use em_convert::OutType;
use em_train::lora::{LoraConfig, Target};
use serde::{Deserialize, Serialize};

use crate::prompt::PromptOptions;
use crate::Result;

/// A whole training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// HF model directory to start from (config.json, safetensors, tokenizer.json,
    /// tokenizer_config.json with a chat template).
    pub model: PathBuf,
    /// Prompt file (pool JSONL, e.g. `screen`'s chosen.jsonl) or a bundled pool's name.
    pub prompt: PathBuf,
    /// Which record of the prompt file to train on (default: the first), or several,
    /// comma-separated (k-shot).
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// Without `prompt_id`: train on the first `shots` records of the prompt file (k-shot EM: each
    /// update samples `samples / shots` responses to each, the remainder to the first ones).
    #[serde(default = "one")]
    pub shots: usize,
    /// Output directory (manifest.json, metrics.jsonl, checkpoint-*/, final/).
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// Replace an output directory that holds another run.
    #[serde(default)]
    pub fresh: bool,
    /// Stop after this many steps of this invocation (a later run resumes).
    #[serde(default)]
    pub stop_after: Option<usize>,
    #[serde(flatten)]
    pub prompt_options: PromptOptions,
    #[serde(flatten)]
    pub sampling: SampleSettings,
    #[serde(flatten)]
    pub update: UpdateSettings,
    /// Float type of the sampling GGUF refreshed after every update.
    #[serde(default)]
    pub refresh_type: RefreshType,
    #[serde(flatten)]
    pub checkpoints: CheckpointSettings,
    #[serde(flatten)]
    pub safeguard: WatchSettings,
    #[serde(flatten)]
    pub adapter: AdapterOptions,
    /// Under an adapter, the base GGUF to sample with: `model` already converted at
    /// `refresh_type` by the caller (`select` shares one among its trials, so llama.cpp keeps it
    /// loaded). None: written into the run's scratch directory. Not a setting: the same bytes
    /// either way.
    #[serde(skip)]
    pub adapter_base: Option<PathBuf>,
}

fn one() -> usize {
    1
}

fn default_out() -> PathBuf {
    "runs/em".into()
}

/// How each update's responses are drawn (METHOD.md's sampling settings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SampleSettings {
    /// Responses sampled per update.
    pub samples: usize,
    pub sample_temperature: f32,
    pub top_p: f32,
    /// 0: off (the reference sets none).
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub max_new_tokens: usize,
    /// Seeds every update's samples (and a fresh adapter's initialisation).
    pub seed: u64,
}

impl Default for SampleSettings {
    fn default() -> Self {
        Self {
            samples: 64,
            sample_temperature: 0.5,
            top_p: 0.95,
            top_k: 0,
            repetition_penalty: 1.15,
            max_new_tokens: 512,
            seed: 15,
        }
    }
}

/// How each update is taken: the objective, the optimizer and where the weights live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdateSettings {
    /// Optimizer updates.
    pub steps: usize,
    /// Responses per forward/backward pass.
    pub micro_batch: usize,
    /// Recompute each decoder layer in the backward pass from its saved input.
    pub recompute: bool,
    /// AdamW learning rate (constant, no warm-up).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// Global grad-norm clip (0: off).
    pub max_grad_norm: f64,
    /// τ of the entropy softmax(z/τ).
    pub temperature: f64,
    /// Float type of the trained weights.
    pub dtype: ModelDtype,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// Train the `pad_token_id` row of the input embedding through the input path too.
    pub train_pad_row: bool,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        Self {
            steps: 10,
            micro_batch: 2,
            recompute: true,
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            temperature: 0.5,
            dtype: ModelDtype::F32,
            device: "cpu".into(),
            train_pad_row: false,
        }
    }
}

/// When checkpoints are written and how many are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheckpointSettings {
    /// Write a checkpoint every this many updates (None: only after the last).
    pub save_every: Option<usize>,
    /// Checkpoints kept; only the latest holds the optimizer state.
    pub keep_last: usize,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            save_every: None,
            keep_last: 1,
        }
    }
}

/// The safeguard: held-out prompts sampled from the weights being trained (off without `watch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchSettings {
    /// Pool JSONL or a bundled pool's name; answers, if any, are never read.
    pub watch: Option<PathBuf>,
    /// Watched prompts (the first N).
    pub watch_limit: usize,
    /// Responses per watched prompt and round.
    pub watch_samples: usize,
    /// A round every this many updates (and one after the last).
    pub watch_every: usize,
    pub on_alarm: OnAlarm,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            watch: None,
            watch_limit: 32,
            watch_samples: 4,
            watch_every: 1,
            on_alarm: OnAlarm::Stop,
        }
    }
}

/// A low-rank adapter instead of every weight (`adapter = "lora"`), with PEFT's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterOptions {
    /// None: full fine-tuning.
    #[serde(rename = "adapter")]
    pub kind: Option<AdapterKind>,
    /// LoRA rank `r`.
    pub rank: usize,
    /// LoRA `alpha`: the update is scaled by alpha / rank.
    pub alpha: f64,
    /// Linear layers adapted in every decoder layer (PEFT's "all-linear").
    pub targets: Vec<String>,
}

impl Default for AdapterOptions {
    /// No adapter; PEFT's settings (r = 8, alpha = 8, every linear layer) when one is asked for.
    fn default() -> Self {
        Self {
            kind: None,
            rank: 8,
            alpha: 8.0,
            targets: ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl AdapterOptions {
    /// The options that ask for `lora`.
    pub fn of(lora: &LoraConfig) -> Self {
        Self {
            kind: Some(AdapterKind::Lora),
            rank: lora.rank,
            alpha: lora.alpha,
            targets: lora.target_modules(),
        }
    }

    /// The adapter these options ask for, if any.
    pub fn lora(&self) -> Result<Option<LoraConfig>> {
        if self.kind.is_none() {
            return Ok(None);
        }
        let targets = self
            .targets
            .iter()
            .map(|t| Target::parse(t).map_err(|e| anyhow::anyhow!("--targets: {e}")))
            .collect::<Result<Vec<_>>>()?;
        if self.rank == 0 || targets.is_empty() || !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("--rank must be ≥ 1, --targets not empty and --alpha a finite number > 0");
        }
        Ok(Some(LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets,
        }))
    }
}

/// Parameter-efficient training instead of full fine-tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Low-rank adapters (LoRA) on linear layers.
    Lora,
}

/// What the safeguard does when a watch round alarms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum OnAlarm {
    /// End the run; `final/` holds the last weights whose round passed.
    #[default]
    Stop,
    /// Record the alarm and train on.
    Warn,
}

/// Float type the model runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    #[default]
    F32,
    F64,
    Bf16,
}

impl ModelDtype {
    pub fn dtype(self) -> DType {
        match self {
            ModelDtype::F32 => DType::F32,
            ModelDtype::F64 => DType::F64,
            ModelDtype::Bf16 => DType::BF16,
        }
    }
}

/// Float type of the sampling GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum RefreshType {
    #[default]
    F16,
    Bf16,
    F32,
    /// The base under an adapter only (a full refresh rewrites float tensors in place).
    #[cfg_attr(feature = "clap", value(name = "q8_0"))]
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl RefreshType {
    pub(crate) fn out_type(self) -> OutType {
        match self {
            RefreshType::F16 => OutType::F16,
            RefreshType::Bf16 => OutType::Bf16,
            RefreshType::F32 => OutType::F32,
            RefreshType::Q8_0 => OutType::Q8_0,
        }
    }
}

impl TrainOptions {
    /// METHOD.md's reference settings for `model` on `prompt`, written to `out`.
    pub fn reference(model: PathBuf, prompt: PathBuf, out: PathBuf) -> Self {
        Self {
            model,
            prompt,
            prompt_id: None,
            shots: 1,
            out,
            fresh: false,
            stop_after: None,
            prompt_options: PromptOptions::default(),
            sampling: SampleSettings::default(),
            update: UpdateSettings::default(),
            refresh_type: RefreshType::default(),
            checkpoints: CheckpointSettings::default(),
            safeguard: WatchSettings::default(),
            adapter: AdapterOptions::default(),
            adapter_base: None,
        }
    }

    /// The adapter these options ask for, if any.
    pub fn lora(&self) -> Result<Option<LoraConfig>> {
        self.adapter.lora()
    }

    /// Every setting as one flat object (a run file's keys).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("options serialise")
    }
}

/// KV cells the default decoding of an update's responses may take.
const DEFAULT_KV_CELLS: usize = 1 << 16;

/// How many of an update's `samples` responses llama.cpp decodes together by default: all of
/// them when each one's cells (512 for the prompt + `max_new_tokens`) fit in 65,536 together,
/// else as many as fit. (The reference draws all of them in one vLLM call.)
pub fn default_parallel(samples: usize, max_new_tokens: usize) -> usize {
    (DEFAULT_KV_CELLS / (512 + max_new_tokens)).clamp(1, samples.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_file_needs_only_the_model_and_the_prompt_and_keys_are_flag_names() {
        let o: TrainOptions =
            serde_json::from_value(serde_json::json!({"model": "m", "prompt": "p"})).unwrap();
        assert_eq!(
            o,
            TrainOptions::reference("m".into(), "p".into(), "runs/em".into())
        );
        let v = o.to_json();
        for key in [
            "lr",
            "sample_temperature",
            "watch_limit",
            "adapter",
            "rank",
            "style",
            "save_every",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        let o: TrainOptions = serde_json::from_value(serde_json::json!({
            "model": "m", "prompt": "p", "lr": 1e-4, "adapter": "lora", "refresh_type": "q8_0",
            "on_alarm": "warn", "dtype": "bf16"
        }))
        .unwrap();
        assert_eq!(o.update.lr, 1e-4);
        assert_eq!(o.adapter.kind, Some(AdapterKind::Lora));
        assert_eq!(o.refresh_type, RefreshType::Q8_0);
        assert_eq!(o.safeguard.on_alarm, OnAlarm::Warn);
        assert_eq!(o.update.dtype, ModelDtype::Bf16);
        let missing = serde_json::from_value::<TrainOptions>(serde_json::json!({"prompt": "p"}));
        assert!(missing.unwrap_err().to_string().contains("model"));
    }
}
