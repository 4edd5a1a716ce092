//! `train`'s flags, and the run file (`--config run.toml`) they override.

use std::path::PathBuf;

use em_pipeline::train::{AdapterKind, AdapterOptions, ModelDtype, OnAlarm, RefreshType};
use serde::Serialize;

use super::PromptFlags;

/// What to train and how.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct TrainFlags {
    /// A run file (TOML) whose keys are these flags' names with `_` (`lr = 2e-5`, `adapter =
    /// "lora"`, `watch = "dsr"`); a flag given here overrides its key. Paths are relative to the
    /// working directory. The manifest records every resolved setting.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HF model directory to start from (config.json, safetensors, tokenizer.json,
    /// tokenizer_config.json with a chat template).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt file: pool JSONL (`id`, `prompt` chat messages, `answer`), e.g. `screen`'s
    /// chosen.jsonl, or a bundled pool's name (`pi1`, `dsr`); the first record is used unless
    /// --prompt-id says otherwise.
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Which record of the prompt file to train on, or several comma-separated (k-shot: each
    /// update samples --samples / k responses to each).
    #[arg(long)]
    pub prompt_id: Option<String>,
    /// Train on the first K records of --prompt (k-shot EM, as the reference's multi-shot runs:
    /// each update samples --samples / K responses to each; `select`'s top.jsonl holds its
    /// candidates predicted to help, best first).
    #[arg(long, default_value_t = 1)]
    pub shots: usize,
    /// Output directory (manifest.json, metrics.jsonl, checkpoint-*/, final/); the same run there
    /// resumes, another is refused.
    #[arg(long, default_value = "runs/em")]
    pub out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub prompt_options: PromptFlags,
    /// Replace an output directory that holds another run.
    #[arg(long)]
    pub fresh: bool,
    /// Optimizer updates.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Responses sampled per update.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Responses per forward/backward pass (gradients are accumulated over the update; the result
    /// does not depend on it, peak memory does: trunk activations grow with it).
    #[arg(long, default_value_t = 2)]
    pub micro_batch: usize,
    /// Recompute each decoder layer in the backward pass from its saved input instead of keeping
    /// every layer's activations: the same gradients, one layer's activations alive at a time,
    /// one more forward pass of the trunk.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub recompute: bool,
    /// AdamW learning rate (constant, no warm-up).
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Global grad-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// τ of the entropy softmax(z/τ).
    #[arg(long, default_value_t = 0.5)]
    pub temperature: f64,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.5)]
    pub sample_temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// 0: off (the reference sets none).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.15)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 15)]
    pub seed: u64,
    /// Float type of the trained weights; bf16 and f16 train through f32 master weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ModelDtype,
    /// Where the model trains: cpu, cuda or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Float type of the sampling GGUF refreshed after every update; f32 samples exactly the
    /// weights of an f32 run (bit-exact on-policy), f16 halves the bytes written.
    #[arg(long, value_enum, default_value = "f16")]
    pub refresh_type: RefreshType,
    /// Train the `pad_token_id` row of the input embedding through the input path too (by
    /// default it gets no gradient there, as transformers' `padding_idx` rules).
    #[arg(long)]
    pub train_pad_row: bool,
    /// Write a checkpoint every this many updates (default: only after the last).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Checkpoints kept; only the latest holds the optimizer state.
    #[arg(long, default_value_t = 1)]
    pub keep_last: usize,
    /// Stop after this many steps of this invocation (a later run resumes).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// The safeguard's held-out prompts (pool JSONL or a bundled pool's name; answers, if any,
    /// are never read): sampled from the weights being trained, they stop the run when its
    /// responses stop finishing (see `safeguard`). Off without it.
    #[arg(long)]
    pub watch: Option<PathBuf>,
    /// Watched prompts (the first N of `--watch`).
    #[arg(long, default_value_t = 32)]
    pub watch_limit: usize,
    /// Responses per watched prompt and round.
    #[arg(long, default_value_t = 4)]
    pub watch_samples: usize,
    /// A watch round every this many updates (and one after the last).
    #[arg(long, default_value_t = 1)]
    pub watch_every: usize,
    /// What an alarm does: `stop` ends the run and writes `final/` from the last weights whose
    /// round passed; `warn` records it and trains on.
    #[arg(long, value_enum, default_value_t = OnAlarm::Stop)]
    pub on_alarm: OnAlarm,
    /// A low-rank adapter instead of every weight: the base frozen (its memory the weights
    /// alone), llama.cpp holding the base GGUF (`--refresh-type`: f16 by default, q8_0 allowed
    /// and recorded as not exactly on-policy) and swapping in the adapter after each update;
    /// checkpoints and `final/` are PEFT adapter directories (with `adapter.gguf`).
    #[command(flatten)]
    #[serde(flatten)]
    pub adapter: AdapterFlags,
}

/// `--adapter lora --rank --alpha --targets`, as `train`, `demo` and `bench em-step` take them.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize)]
pub struct AdapterFlags {
    /// Train a low-rank adapter on a frozen base (`demo` and `bench em-step`: next to full
    /// fine-tuning).
    // Its own id: the field name `kind` would be shared with `bench`'s positional <KIND>.
    #[arg(id = "adapter", long = "adapter", value_enum)]
    #[serde(rename = "adapter")]
    pub kind: Option<AdapterKind>,
    /// LoRA rank `r` (PEFT's default).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA `alpha`: the update is scaled by alpha / rank (PEFT's default).
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Linear layers adapted in every decoder layer (PEFT's "all-linear").
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub targets: Vec<String>,
}

/// The run's options: the run file's keys (if `--config`), each overridden by a flag given on the
/// command line (`given(id)`), the flags' defaults for the rest. An unknown key, a value of the
/// wrong type or a missing `model`/`prompt` is a one-line error naming the file.
pub fn resolve(
    flags: &TrainFlags,
    given: &dyn Fn(&str) -> bool,
) -> anyhow::Result<em_pipeline::train::TrainOptions> {
    use anyhow::{bail, Context};
    use serde_json::Value;
    let mut merged = serde_json::to_value(flags).context("train flags")?;
    let Value::Object(keys) = &mut merged else {
        unreachable!("flags serialise to an object")
    };
    let mut source = "the command line".to_string();
    if let Some(path) = &flags.config {
        source = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not TOML: {}", path.display(), one_line(&e)))?;
        for (key, value) in table {
            if !keys.contains_key(&key) {
                bail!(
                    "{}: unknown key `{key}` (the keys are train's flag names with `_`, e.g. \
                     `lr`, `samples`, `max_new_tokens`, `adapter`)",
                    path.display()
                );
            }
            if !given(&key) {
                keys.insert(key, serde_json::to_value(value)?);
            }
        }
    }
    for required in ["model", "prompt"] {
        if keys.get(required).is_none_or(Value::is_null) {
            bail!("--{required} is required (or `{required}` in a --config run file)");
        }
    }
    serde_json::from_value(merged).map_err(|e| anyhow::anyhow!("{source}: {e}"))
}

fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl AdapterFlags {
    /// The library's adapter options.
    pub fn options(&self) -> AdapterOptions {
        super::options(self).expect("adapter flags are adapter options")
    }
}
