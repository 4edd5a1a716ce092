//! One-shot entropy minimization, on-policy.
//!
//! Each update publishes the current weights through [`Publish`]: em-convert's [`GgufRefresh`]
//! writes the sampling GGUF straight from the weights in memory (f16 by default, bf16 or f32 with
//! `--refresh-type`; f32 samples exactly the weights of an f32 run), whole once and then in place,
//! tensor by tensor. The [`Backend`] loads it and draws N responses to the one prompt with
//! METHOD.md's settings, all decoded together where they fit, with a seed derived from (seed,
//! step); em-train takes one AdamW step on the token-mean entropy of those responses (bf16/f16
//! weights through f32 master weights).
//!
//! Output directory: `manifest.json` (model, prompt file, settings; a rerun that differs is
//! refused), `metrics.jsonl` (one line per step, with `refresh_bytes`, `refresh_seconds`,
//! `written_bytes`: all this process wrote during the update before its metrics line), and
//! `checkpoint-{step}/` (HF directory with tokenizer files, `state.json`, and in the latest only
//! `optimizer/adamw.safetensors`; written under a temporary name and renamed when complete) after
//! the last update, every `--save-every` updates, the newest `--keep-last` kept; `final/` (HF
//! directory). A run started again on the same directory (after a kill -9 too) removes what was
//! half-written, resumes from its last checkpoint, drops metrics lines after it, and continues
//! with the same numbers as an uninterrupted run.
//!
//! With `--watch`, the safeguard (`crate::safeguard`) samples the held-out prompts from the
//! published weights before each update (every `--watch-every`) and once after the last:
//! `watch-baseline.json` keeps the step-0 reference, each metrics line its `watch` signals. On an
//! alarm in `stop` mode the run ends: a metrics line with the decision, `final/` from the last
//! weights whose round passed (a run resumed after a kill falls back to its newest earlier
//! checkpoint, else the base model, since its own weights have not been judged), and
//! `safeguard.json`, which makes a rerun return at once.

use std::fs;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use em_convert::refresh::{GgufRefresh, RefreshStats};
use em_convert::OutType;
use em_data::Problem;
use em_sampler::{Event, Request, Sample, SamplingParams};
use em_store::{JsonlStore, Manifest};
use em_train::lora::{AdapterSource, LoraConfig, Target};
use em_train::models::CausalLm;
use em_train::{AdamWConfig, EmOptions, Sequence, TrainConfig, Trainer};
use serde_json::{json, Value};

use crate::em_loss::ModelDtype;
use crate::prompt::{PromptOptions, PromptRenderer, RenderedPrompt};
use crate::safeguard::{self, Baseline, Round, Verdict};
use crate::{AdaptedBackend, Backend, Result};

/// What to train and how.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// HF model directory to start from (config.json, safetensors, tokenizer.json,
    /// tokenizer_config.json with a chat template).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt file: pool JSONL (`id`, `prompt` chat messages, `answer`), e.g. `screen`'s
    /// chosen.jsonl, or a bundled pool's name (`pi1`, `dsr`); the first record is used unless
    /// --prompt-id says otherwise.
    #[arg(long)]
    pub prompt: PathBuf,
    /// Which record of the prompt file to train on.
    #[arg(long)]
    pub prompt_id: Option<String>,
    /// Output directory (manifest.json, metrics.jsonl, checkpoint-*/, final/); the same run there
    /// resumes, another is refused.
    #[arg(long, default_value = "runs/em")]
    pub out: PathBuf,
    #[command(flatten)]
    pub prompt_options: PromptOptions,
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
    pub adapter: AdapterArgs,
}

/// `--adapter lora --rank --alpha --targets`, as `train`, `demo` and `bench em-step` take them.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct AdapterArgs {
    /// Train a low-rank adapter on a frozen base (`demo` and `bench em-step`: next to full
    /// fine-tuning).
    // Its own id: the field name `kind` would be shared with `bench`'s positional <KIND>.
    #[arg(id = "adapter", long = "adapter", value_enum)]
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

impl Default for AdapterArgs {
    /// The command line's defaults (read from the attributes above, so they are written once): no
    /// adapter; PEFT's settings when one is asked for.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            adapter: AdapterArgs,
        }
        <Defaults as clap::Parser>::parse_from(["defaults"]).adapter
    }
}

impl AdapterArgs {
    /// The arguments that ask for `lora`.
    pub fn of(lora: &LoraConfig) -> Self {
        Self {
            kind: Some(AdapterKind::Lora),
            rank: lora.rank,
            alpha: lora.alpha,
            targets: lora.target_modules(),
        }
    }

    /// The adapter these arguments ask for, if any.
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
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Low-rank adapters (LoRA) on linear layers.
    Lora,
}

/// What the safeguard does when a watch round alarms.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAlarm {
    Stop,
    Warn,
}

impl TrainArgs {
    /// METHOD.md's reference settings (the command line's defaults; a test keeps them equal).
    pub fn reference(model: PathBuf, prompt: PathBuf, out: PathBuf) -> Self {
        Self {
            model,
            prompt,
            prompt_id: None,
            out,
            prompt_options: PromptOptions::default(),
            fresh: false,
            steps: 10,
            samples: 64,
            micro_batch: 2,
            recompute: true,
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            temperature: 0.5,
            sample_temperature: 0.5,
            top_p: 0.95,
            top_k: 0,
            repetition_penalty: 1.15,
            max_new_tokens: 512,
            seed: 15,
            dtype: ModelDtype::F32,
            device: "cpu".into(),
            refresh_type: RefreshType::F16,
            train_pad_row: false,
            save_every: None,
            keep_last: 1,
            stop_after: None,
            watch: None,
            watch_limit: 32,
            watch_samples: 4,
            watch_every: 1,
            on_alarm: OnAlarm::Stop,
            adapter: AdapterArgs::default(),
        }
    }

    /// The adapter these arguments ask for, if any.
    pub fn lora(&self) -> Result<Option<LoraConfig>> {
        self.adapter.lora()
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

/// Float type of the sampling GGUF.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshType {
    F16,
    Bf16,
    F32,
    /// The base under an adapter only (a full refresh rewrites float tensors in place).
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl RefreshType {
    fn out_type(self) -> OutType {
        match self {
            RefreshType::F16 => OutType::F16,
            RefreshType::Bf16 => OutType::Bf16,
            RefreshType::F32 => OutType::F32,
            RefreshType::Q8_0 => OutType::Q8_0,
        }
    }
}

/// Publishes an adapter: llama.cpp's LoRA GGUF of the current factors, rewritten whole (it is
/// small) next to a base GGUF written once.
pub struct AdapterRefresh {
    lora: LoraConfig,
    config: em_train::models::ModelConfig,
    names: Vec<String>,
    path: PathBuf,
}

impl AdapterRefresh {
    /// Publishes `model`'s adapter factors (its parameters) to the LoRA GGUF at `path`.
    pub fn new(model: &em_train::models::CausalLm, path: &Path) -> Result<Self> {
        let lora = model
            .adapter()
            .context("an adapter refresh needs a model under an adapter")?;
        Ok(Self {
            lora: lora.clone(),
            config: model.config().clone(),
            names: model.parameters().into_iter().map(|(n, _)| n).collect(),
            path: path.to_path_buf(),
        })
    }
}

impl Publish for AdapterRefresh {
    fn publish(&mut self, weights: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<RefreshStats> {
        let t0 = Instant::now();
        let factors = self
            .names
            .iter()
            .map(|n| Ok((n.clone(), weights(n)?)))
            .collect::<Result<Vec<_>>>()?;
        let adapter = em_train::lora::peft_adapter(&self.lora, &factors, None)?;
        let bytes = em_convert::lora::write_lora_gguf(
            &adapter,
            &self.config,
            &self.path,
            em_convert::lora::LoraGgufType::F32,
        )?;
        Ok(RefreshStats {
            bytes,
            tensors: factors.len(),
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    fn model_path(&self) -> &Path {
        &self.path
    }
}

/// Where the loop publishes the weights it trains, for the sampler to draw the next responses
/// from: the seam between training and sampling.
pub trait Publish {
    /// Makes `weights` (values by HF name) what [`Publish::model_path`] holds; returns what was
    /// written.
    fn publish(&mut self, weights: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<RefreshStats>;
    /// The model file a sampler loads.
    fn model_path(&self) -> &Path;
}

impl Publish for GgufRefresh {
    fn publish(&mut self, weights: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<RefreshStats> {
        GgufRefresh::publish(self, weights)
    }
    fn model_path(&self) -> &Path {
        self.path()
    }
}

/// Bytes this process has written so far (`wchar` of /proc/self/io; None where there is none).
fn bytes_written() -> Option<u64> {
    let io = fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Settings a resumed run must share with the run that wrote the checkpoints.
fn run_identity(args: &TrainArgs, backend: &dyn Backend) -> Value {
    let mut v = json!({
        "prompt_options": args.prompt_options, "backend": backend.identity(),
        "seed": args.seed, "samples": args.samples, "lr": args.lr, "beta1": args.beta1,
        "beta2": args.beta2, "adam_eps": args.adam_eps, "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm, "temperature": args.temperature,
        "sample_temperature": args.sample_temperature, "top_p": args.top_p, "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty, "max_new_tokens": args.max_new_tokens,
        "dtype": format!("{:?}", args.dtype), "prompt_id": args.prompt_id,
        "device": args.device, "refresh_type": args.refresh_type,
        "train_pad_row": args.train_pad_row,
    });
    // Only when on, so that runs made before the safeguard existed still resume.
    if args.watch.is_some() {
        v["watch"] = json!({"limit": args.watch_limit, "samples": args.watch_samples,
            "every": args.watch_every, "on_alarm": args.on_alarm});
    }
    if args.adapter.kind.is_some() {
        let a = &args.adapter;
        v["adapter"] = json!({"kind": a.kind, "rank": a.rank, "alpha": a.alpha,
            "targets": a.targets, "on_policy": args.refresh_type != RefreshType::Q8_0});
    }
    v
}

/// The watched prompts, rendered.
struct Watch {
    prompts: Vec<RenderedPrompt>,
}

impl Watch {
    fn load(args: &TrainArgs, backend: &dyn Backend) -> Result<Option<Watch>> {
        let Some(path) = &args.watch else {
            return Ok(None);
        };
        if args.watch_limit == 0 || args.watch_samples == 0 || args.watch_every == 0 {
            bail!("--watch-limit, --watch-samples and --watch-every must be positive");
        }
        let path = &crate::assets::pool_path(path)?;
        let mut problems = em_data::load_pool(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        problems.truncate(args.watch_limit);
        if problems.is_empty() {
            bail!("{}: no prompts to watch", path.display());
        }
        let mut prompts = vec![];
        crate::with_vocab(backend, &args.model, &mut |vocab| {
            let renderer = PromptRenderer::new(vocab, &args.prompt_options)?;
            prompts = problems
                .iter()
                .map(|p| {
                    renderer
                        .render(p)
                        .with_context(|| format!("{}: prompt {}", path.display(), p.id))
                })
                .collect::<Result<_>>()?;
            Ok(())
        })?;
        Ok(Some(Watch { prompts }))
    }
}

/// The safeguard's decision, once made (`safeguard.json`): a rerun finds the run finished.
const SAFEGUARD_FILE: &str = "safeguard.json";
/// The step-0 reference rounds (`watch-baseline.json`), kept for a resumed run.
const BASELINE_FILE: &str = "watch-baseline.json";

/// The seed of step `step`'s samples: the same for a resumed run as for an uninterrupted one.
pub fn step_seed(seed: u64, step: usize) -> u64 {
    // splitmix64 of (seed, step)
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(step as u64)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The prompt record to train on.
pub fn load_prompt(path: &Path, id: Option<&str>) -> Result<Problem> {
    let path = &crate::assets::pool_path(path)?;
    let problems = em_data::load_pool(path)
        .or_else(|pool_err| em_data::load_suite(path).map_err(|_| pool_err))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match id {
        Some(id) => problems
            .into_iter()
            .find(|p| p.id == id)
            .with_context(|| format!("{}: no record with id \"{id}\"", path.display())),
        None => problems
            .into_iter()
            .next()
            .with_context(|| format!("{}: no records", path.display())),
    }
}

/// The prompt rendered for the model at `model_dir` (the one prompt path; no silent fallback).
pub fn render_prompt(
    backend: &dyn Backend,
    model_dir: &Path,
    problem: &Problem,
    options: &PromptOptions,
) -> Result<RenderedPrompt> {
    let mut rendered = None;
    crate::with_vocab(backend, model_dir, &mut |vocab| {
        rendered = Some(PromptRenderer::new(vocab, options)?.render(problem)?);
        Ok(())
    })?;
    rendered.context("the prompt was not rendered")
}

/// Files copied from the starting model into every checkpoint.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
];

/// Writes the current weights as a complete HF directory at `dir` (replaced if present).
fn write_hf_dir(trainer: &Trainer, source: &Path, dir: &Path, optimizer: bool) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("{}: cannot remove", dir.display()))?;
    }
    if trainer.model.adapter().is_some() {
        // A PEFT adapter directory naming its base, with llama.cpp's form of it beside.
        let base = fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
        let adapter = em_train::lora::to_peft(&trainer.model, Some(base.display().to_string()))?
            .context("an adapter")?;
        em_convert::lora::write_peft_dir(&adapter, dir)?;
        em_store::crash_point("checkpoint.write");
        if optimizer {
            trainer.save_optimizer(dir)?;
        }
        em_convert::lora::write_lora_gguf(
            &adapter,
            trainer.model.config(),
            &dir.join(ADAPTER_GGUF),
            em_convert::lora::LoraGgufType::F32,
        )?;
        return Ok(());
    }
    if optimizer {
        trainer.save(dir)?;
    } else {
        trainer.model.save_hf_dir(dir, trainer.model.dtype())?;
    }
    em_store::crash_point("checkpoint.write");
    // config.json as read, with the dtype the weights are now stored in.
    let config_path = dir.join("config.json");
    let mut config = em_convert::read_json(&config_path)?;
    let dtype = match trainer.model.dtype() {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    };
    // transformers 5 writes `dtype`, 4.x `torch_dtype`: update the one the file uses.
    let key = if config.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    config[key] = json!(dtype);
    fs::write(&config_path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("{}: cannot write", config_path.display()))?;
    for name in TOKENIZER_FILES {
        let from = source.join(name);
        if from.is_file() {
            fs::copy(&from, dir.join(name))
                .with_context(|| format!("{}: cannot copy", from.display()))?;
        }
    }
    Ok(())
}

/// llama.cpp's LoRA GGUF inside an adapter checkpoint or `final/` (for `eval --adapter`).
pub const ADAPTER_GGUF: &str = "adapter.gguf";

/// Writes `dir` under a temporary sibling name and renames it into place when complete.
fn write_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staged = em_store::Staged::new(dir)?;
    write(staged.path())?;
    Ok(staged.commit()?)
}

/// Mistral's sliding window, which llama.cpp does not apply to the GGUF it samples from: said
/// once, either as irrelevant to this run (no sequence reaches it) or as where sampling stops
/// being exactly on-policy.
fn say_window_note(model: &Path, longest: usize) {
    let Ok(cfg) = em_train::models::ModelConfig::from_file(&model.join("config.json")) else {
        return;
    };
    let Some(window) = cfg.layer_windows.iter().flatten().min().copied() else {
        return;
    };
    if cfg.architecture != em_train::models::Architecture::Mistral {
        return;
    }
    crate::drive::say(&if longest <= window {
        format!(
            "note: the sliding window of {window} is longer than any sequence of this run \
             ({longest} tokens at most): it changes nothing here"
        )
    } else {
        format!(
            "note: training keeps the sliding window of {window}, but llama.cpp samples Mistral \
             without one: tokens beyond position {window} are sampled from full attention \
             (sequences here reach {longest})"
        )
    });
}

/// The checkpoints in `out` (`checkpoint-{step}` directories), newest first.
fn checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_unstable_by(|a, b| b.0.cmp(&a.0));
    found
}

/// The latest complete checkpoint of `out` and its step.
pub fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
    checkpoints(out)
        .into_iter()
        .find(|(_, dir)| dir.join("state.json").is_file())
}

/// Samples `n` responses to the prompt from the GGUF at `gguf` through the backend, with a
/// progress line (responses done, tokens/s, ETA).
fn sample_responses(
    backend: &dyn Backend,
    gguf: &Path,
    prompt: &RenderedPrompt,
    n: usize,
    params: SamplingParams,
    label: &str,
) -> Result<Vec<Sample>> {
    let request = Request {
        prompt: prompt.to_prompt(),
        n_samples: n,
        params,
    };
    let bar = crate::drive::progress_bar(n as u64, 0, "responses", label);
    let mut out = Vec::new();
    backend.with_sampler(gguf, &mut |sampler| {
        sampler.generate(std::slice::from_ref(&request), &mut |event| {
            match event {
                Event::RequestDone { samples, .. } => out = samples,
                Event::Step {
                    samples_done,
                    generated_tokens,
                    elapsed,
                    ..
                } => {
                    bar.set_position(samples_done);
                    let rate = generated_tokens as f64 / elapsed.as_secs_f64().max(1e-9);
                    bar.set_message(format!("{rate:.0} tok/s"));
                }
            }
            ControlFlow::Continue(())
        })?;
        Ok(())
    })?;
    bar.finish_and_clear();
    if out.len() != n {
        bail!(
            "{}: the sampler returned {} of {n} responses",
            gguf.display(),
            out.len()
        );
    }
    Ok(out)
}

/// Removes what a killed run leaves half-written: staged checkpoints and `final`, and the
/// sampling GGUF (written whole again by the first refresh).
fn remove_leftovers(out: &Path) -> Result<()> {
    em_store::remove_stale_staged(out)?;
    let sampling = out.join(".sampling");
    if sampling.exists() {
        fs::remove_dir_all(&sampling)
            .with_context(|| format!("{}: cannot remove", sampling.display()))?;
    }
    Ok(())
}

/// After writing checkpoint `step`: keeps the newest `keep` checkpoints, and the optimizer state
/// only in the newest (a run resumes from there alone).
fn prune_checkpoints(out: &Path, step: usize, keep: usize) -> Result<()> {
    let older = checkpoints(out).into_iter().filter(|(s, _)| *s < step);
    for (i, (_, dir)) in older.enumerate() {
        if i + 1 >= keep.max(1) {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("{}: cannot remove", dir.display()))?;
            continue;
        }
        let optimizer = dir.join(em_train::trainer::OPTIMIZER_FILE);
        if let Some(parent) = optimizer.parent().filter(|p| p.exists()) {
            fs::remove_dir_all(parent)
                .with_context(|| format!("{}: cannot remove", parent.display()))?;
        }
    }
    Ok(())
}

/// Keeps the metrics lines of steps up to `keep_through` (a resumed run redoes the later ones).
fn truncate_metrics(path: &Path, keep_through: usize) -> Result<()> {
    let body: String = JsonlStore::<Value>::read(path)?
        .into_iter()
        .filter(|v| {
            v.get("step")
                .and_then(Value::as_u64)
                .is_some_and(|s| s as usize <= keep_through)
        })
        .map(|v| format!("{v}\n"))
        .collect();
    Ok(em_store::write_atomic(path, body)?)
}

/// Ends a run on the safeguard's alarm: records the decision in metrics.jsonl, puts back the
/// weights of the last round that passed (after `good_step` updates), writes them as `final/` and
/// the decision as `safeguard.json`.
#[allow(clippy::too_many_arguments)]
fn stop_run(
    args: &TrainArgs,
    trainer: &Trainer,
    params: &[(String, candle_core::Var)],
    weights: Vec<Tensor>,
    good_step: usize,
    step: usize,
    reason: &str,
    signals: &Value,
    metrics_path: &Path,
) -> Result<PathBuf> {
    let decision = json!({"decision": "stop", "reason": reason, "alarm_weights_step": step - 1,
        "final_weights_step": good_step});
    let line = json!({"step": step, "watch": signals, "safeguard": decision});
    JsonlStore::<Value>::open(metrics_path)?.0.append(&line)?;
    for ((_, var), w) in params.iter().zip(&weights) {
        var.set(w)?;
    }
    let final_dir = args.out.join("final");
    write_atomically(&final_dir, |tmp| {
        write_hf_dir(trainer, &args.model, tmp, false)
    })?;
    let _ = fs::remove_dir_all(args.out.join(".sampling"));
    em_store::write_atomic(
        &args.out.join(SAFEGUARD_FILE),
        serde_json::to_string_pretty(&decision)? + "\n",
    )?;
    eprintln!(
        "safeguard: stopped before update {step}: {reason}; {} holds the weights after {good_step} updates",
        final_dir.display()
    );
    Ok(final_dir)
}

/// The model a run trains: the HF directory `dir` (default: the run's `--model`), or under an
/// adapter the base with a fresh adapter (no `dir`) or the adapter saved in `dir`.
fn load_model(
    args: &TrainArgs,
    lora: Option<&LoraConfig>,
    dir: Option<&Path>,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<CausalLm> {
    Ok(match (lora, dir) {
        (None, dir) => CausalLm::from_hf_dir(dir.unwrap_or(&args.model), dtype, device)?,
        (Some(lora), None) => CausalLm::from_hf_dir_with_adapter(
            &args.model,
            dtype,
            device,
            lora.clone(),
            AdapterSource::Init { seed: args.seed },
        )?,
        (Some(_), Some(dir)) => em_train::lora::load_adapted(&args.model, dir, dtype, device)?,
    })
}

/// Trains (see the module documentation); returns the directory of the trained model when the
/// run is complete.
pub fn run(args: &TrainArgs, backend: &dyn Backend) -> Result<Option<PathBuf>> {
    if !backend.samples_local_gguf() {
        bail!("train samples on-policy from the weights it is training, so it needs an in-process backend (llama.cpp), not a server");
    }
    if args.samples == 0 || args.steps == 0 || args.max_new_tokens == 0 {
        bail!("--samples, --steps and --max-new-tokens must be positive");
    }
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        bail!(
            "--temperature {} is not a finite number > 0",
            args.temperature
        );
    }
    for f in ["config.json", "tokenizer.json"] {
        let p = args.model.join(f);
        if !p.is_file() {
            bail!("{}: missing (the model directory needs it)", p.display());
        }
    }
    let lora = args.lora()?;
    if lora.is_none() && args.refresh_type == RefreshType::Q8_0 {
        bail!("--refresh-type q8_0 needs --adapter lora (a full refresh rewrites float tensors in place)");
    }
    let problem = load_prompt(&args.prompt, args.prompt_id.as_deref())?;
    let prompt = render_prompt(backend, &args.model, &problem, &args.prompt_options)?;
    let prompt_ids = prompt.ids.clone();
    say_window_note(&args.model, prompt_ids.len() + args.max_new_tokens);
    let identity = run_identity(args, backend);
    let watch = Watch::load(args, backend)?;
    let mut manifest = Manifest::new("train", em_store::model_identity(&args.model)?, identity);
    manifest.inputs.insert(
        "prompt".into(),
        em_store::file_identity(&crate::assets::pool_path(&args.prompt)?)?,
    );
    if let Some(path) = &args.watch {
        manifest.inputs.insert(
            "watch".into(),
            em_store::file_identity(&crate::assets::pool_path(path)?)?,
        );
    }
    manifest.info = json!({ "tool": crate::TOOL, "prompt_id": problem.id, "prompt_text": prompt.text, "prompt_ids": prompt.ids });
    manifest.claim(&args.out, args.fresh)?;
    remove_leftovers(&args.out)?;
    let final_dir = args.out.join("final");
    if let Ok(text) = fs::read_to_string(args.out.join(SAFEGUARD_FILE)) {
        if final_dir.join("config.json").is_file()
            || final_dir.join(em_convert::lora::CONFIG_FILE).is_file()
        {
            eprintln!(
                "{}: the safeguard ended this run: {}",
                args.out.display(),
                text.trim()
            );
            return Ok(Some(final_dir));
        }
    }

    let dtype = args.dtype.dtype();
    let device = em_train::parse_device(&args.device)?;
    let vocab =
        em_train::models::ModelConfig::from_file(&args.model.join("config.json"))?.vocab_size;
    let config = TrainConfig {
        optimizer: AdamWConfig {
            lr: args.lr,
            betas: (args.beta1, args.beta2),
            eps: args.adam_eps,
            weight_decay: args.weight_decay,
        },
        max_grad_norm: args.max_grad_norm,
        em: EmOptions {
            recompute: args.recompute,
            ..EmOptions::new(args.temperature, args.micro_batch, vocab)
        },
    };
    let metrics_path = args.out.join("metrics.jsonl");
    let (mut trainer, start) = match latest_checkpoint(&args.out) {
        Some((step, dir)) => {
            let mut trainer = if lora.is_some() {
                Trainer::resume_adapter(&args.model, &dir, config, dtype, &device)
            } else {
                Trainer::resume(&dir, config, dtype, &device)
            }
            .with_context(|| format!("{}: cannot resume", dir.display()))?;
            if args.train_pad_row {
                trainer.model.set_padding_idx(None);
            }
            truncate_metrics(&metrics_path, step)?;
            eprintln!("resuming from {} (step {step})", dir.display());
            (trainer, step)
        }
        None => {
            truncate_metrics(&metrics_path, 0)?;
            let mut model = load_model(args, lora.as_ref(), None, dtype, &device)?;
            if args.train_pad_row {
                model.set_padding_idx(None);
            }
            (Trainer::new(model, config), 0)
        }
    };
    if start >= args.steps {
        eprintln!(
            "{}: already at step {start} of {}",
            args.out.display(),
            args.steps
        );
    }

    let work = args.out.join(".sampling");
    fs::create_dir_all(&work).with_context(|| format!("{}: cannot create", work.display()))?;
    let params = trainer.model.parameters();
    let shapes: Vec<(String, Vec<usize>)> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let (mut publisher, adapted): (Box<dyn Publish>, Option<AdaptedBackend>) = match &lora {
        None => (
            Box::new(GgufRefresh::new(
                &args.model,
                &shapes,
                args.refresh_type.out_type(),
                &work.join("model.gguf"),
            )?),
            None,
        ),
        Some(_) => {
            // The base is written once; only the adapter changes between updates.
            let out_type = args.refresh_type.out_type();
            let base = work.join(format!(
                "base.{}.gguf",
                format!("{out_type:?}").to_lowercase()
            ));
            if !base.is_file() {
                em_convert::hf_to_gguf(&args.model, &base, out_type)?;
            }
            (
                Box::new(AdapterRefresh::new(
                    &trainer.model,
                    &work.join(ADAPTER_GGUF),
                )?),
                Some(AdaptedBackend::new(backend, &base)?),
            )
        }
    };
    // What samples the published weights: the backend itself, or it with the adapter applied.
    let sampler_backend: &dyn Backend = match &adapted {
        Some(a) => a,
        None => backend,
    };
    let by_name: std::collections::HashMap<&str, &candle_core::Var> =
        params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut current_weight = |name: &str| -> Result<Tensor> {
        Ok(by_name
            .get(name)
            .with_context(|| format!("no parameter {name}"))?
            .as_tensor()
            .clone())
    };
    let save_every = args.save_every.unwrap_or(args.steps).max(1);
    let bar = crate::drive::steps_bar(args.steps as u64, start as u64);
    let watch_params = SamplingParams {
        temperature: args.sample_temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        max_new_tokens: args.max_new_tokens,
        seed: step_seed(args.seed ^ 0x5741_5443_4845_5321, 0),
        ..SamplingParams::default()
    };
    let baseline_path = args.out.join(BASELINE_FILE);
    let mut baseline: Option<Baseline> = match fs::read_to_string(&baseline_path) {
        Ok(text) if start > 0 => Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a watch baseline", baseline_path.display()))?,
        ),
        _ => None,
    };
    // The weights of the last round that passed. A resumed run's own weights have not been
    // judged yet: it falls back to the newest earlier checkpoint, else the base model.
    let snapshot = |params: &[(String, candle_core::Var)]| -> Result<Vec<Tensor>> {
        Ok(params
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    };
    // Only a `stop` run ever rolls back, so only it keeps a copy (one model's worth of memory).
    let mut last_good: Option<(usize, Vec<Tensor>)> = match &watch {
        None => None,
        Some(_) if args.on_alarm == OnAlarm::Warn => None,
        Some(_) if start == 0 => Some((0, snapshot(&params)?)),
        Some(_) => {
            let (step, dir) = checkpoints(&args.out)
                .into_iter()
                .find(|(s, d)| *s < start && d.join("state.json").is_file())
                .unwrap_or((0, args.model.clone()));
            let earlier = if step == 0 {
                load_model(args, lora.as_ref(), None, dtype, &device)?
            } else {
                load_model(args, lora.as_ref(), Some(&dir), dtype, &device)?
            };
            let by_name: std::collections::HashMap<String, candle_core::Var> =
                earlier.parameters().into_iter().collect();
            let weights = params
                .iter()
                .map(|(n, _)| {
                    by_name
                        .get(n)
                        .map(|v| v.as_tensor().clone())
                        .with_context(|| format!("{}: no parameter {n}", dir.display()))
                })
                .collect::<Result<_>>()?;
            Some((step, weights))
        }
    };
    let watch_round = |gguf: &Path, weights_step: usize, seed: u64| -> Result<Round> {
        let w = watch.as_ref().expect("watching");
        let samples = safeguard::sample_round(
            sampler_backend,
            gguf,
            &w.prompts,
            args.watch_samples,
            &SamplingParams {
                seed,
                ..watch_params.clone()
            },
        )?;
        Ok(Round::from_samples(weights_step, &samples))
    };
    // The answered shares of this run's rounds after step 0, for the trend (from metrics.jsonl,
    // already cut back to the checkpoint, when resuming).
    let mut history: Vec<f64> = if start > 0 {
        JsonlStore::<Value>::read(&metrics_path)?
            .iter()
            .filter_map(|v| v.get("watch"))
            .filter(|w| {
                w.get("weights_step")
                    .and_then(Value::as_u64)
                    .is_some_and(|s| s > 0)
            })
            .filter_map(|w| w.get("answered").and_then(Value::as_f64))
            .collect()
    } else {
        vec![]
    };
    // The watch round of the weights `gguf` holds (after `weights_step` updates): the step-0
    // reference the first time, else the verdict against it.
    let mut check = |gguf: &Path, weights_step: usize| -> Result<Verdict> {
        match &baseline {
            None => {
                let round = watch_round(gguf, weights_step, watch_params.seed)?;
                let replicate = watch_round(gguf, weights_step, watch_params.seed ^ 1)?;
                let b = Baseline { round, replicate };
                em_store::write_atomic(&baseline_path, serde_json::to_string(&b)? + "\n")?;
                let verdict = safeguard::judge(&b, &b.round, &[]);
                crate::drive::say(&format!(
                    "watch: step-0 reference on {} prompts × {}: answered {:.3}, length {:.1}, repetition {:.3}; alarm past: {}",
                    b.round.majority.len(),
                    args.watch_samples,
                    b.round.answered,
                    b.round.length,
                    b.round.repetition,
                    b.thresholds()
                ));
                baseline = Some(b);
                Ok(verdict)
            }
            Some(b) => {
                let round = watch_round(gguf, weights_step, watch_params.seed)?;
                let verdict = safeguard::judge(b, &round, &history);
                history.push(round.answered);
                Ok(verdict)
            }
        }
    };
    for step in start + 1..=args.steps {
        // Steps already taken by this invocation: step - start - 1.
        if args.stop_after.is_some_and(|k| step - start > k) {
            break;
        }
        let t0 = Instant::now();
        let written0 = bytes_written();
        // 1. The current weights, as llama.cpp will see them: the sampling GGUF, refreshed in place.
        let refresh = publisher.publish(&mut current_weight)?;
        let gguf = publisher.model_path().to_path_buf();

        // 1b. The safeguard's round on them.
        let mut verdict = None;
        if watch.is_some() && (step - 1) % args.watch_every == 0 {
            let v = check(&gguf, step - 1)?;
            match (&v.alarm, args.on_alarm) {
                (Some(reason), OnAlarm::Stop) => {
                    let (good_step, weights) = last_good.take().expect("a snapshot");
                    return stop_run(
                        args,
                        &trainer,
                        &params,
                        weights,
                        good_step,
                        step,
                        reason,
                        &v.signals,
                        &metrics_path,
                    )
                    .map(Some);
                }
                (Some(reason), OnAlarm::Warn) => {
                    crate::drive::say(&format!("safeguard (warn): {reason}"))
                }
                (None, OnAlarm::Stop) => last_good = Some((step - 1, snapshot(&params)?)),
                (None, OnAlarm::Warn) => {}
            }
            verdict = Some(v);
        }

        // 2. N responses from them.
        let t1 = Instant::now();
        let sampling = SamplingParams {
            temperature: args.sample_temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            repetition_penalty: args.repetition_penalty,
            max_new_tokens: args.max_new_tokens,
            seed: step_seed(args.seed, step),
            ..SamplingParams::default()
        };
        let samples = sample_responses(
            sampler_backend,
            &gguf,
            &prompt,
            args.samples,
            sampling,
            &format!("step {step}/{}", args.steps),
        )?;
        let t_sample = t1.elapsed().as_secs_f64();
        let sequences: Vec<Sequence> = samples
            .iter()
            .filter(|s| !s.tokens.is_empty())
            .map(|s| Sequence {
                prompt_ids: prompt_ids.clone(),
                response_ids: s.tokens.clone(),
            })
            .collect();
        let lens: Vec<usize> = sequences.iter().map(|s| s.response_ids.len()).collect();
        let generated: usize = lens.iter().sum();
        let pass = (!problem.answers.is_empty()).then(|| {
            samples
                .iter()
                .filter(|s| em_grade::grade(&s.text, &problem.answers).correct)
                .count()
        });

        // 3. One update on them.
        let t2 = Instant::now();
        let micro_batches = sequences.len().div_ceil(args.micro_batch.max(1));
        let passes = crate::drive::progress_bar(
            2 * micro_batches as u64,
            0,
            "passes",
            &format!("step {step}/{} update", args.steps),
        );
        let stats = trainer.update_observed(&sequences, &mut |p| {
            passes.inc(1);
            let phase = if p.backward { "backward" } else { "forward" };
            passes.set_message(format!(
                "micro-batch {}/{} {phase} done",
                p.micro_batch, p.micro_batches
            ));
        })?;
        passes.finish_and_clear();
        let t_train = t2.elapsed().as_secs_f64();
        let train_tokens: usize = sequences.iter().map(Sequence::len).sum();

        let mut line = json!({
            "step": step,
            "loss": stats.loss,
            "entropy": stats.loss,
            "grad_norm": stats.grad_norm,
            "lr": args.lr,
            "n_responses": sequences.len(),
            "n_tokens": stats.n_tokens,
            "resp_len_mean": generated as f64 / lens.len().max(1) as f64,
            "resp_len_min": lens.iter().min().copied().unwrap_or(0),
            "resp_len_max": lens.iter().max().copied().unwrap_or(0),
            "mean_max_logit": stats.mean_max_logit,
            "sample_seed": step_seed(args.seed, step),
            "responses_seen": step * args.samples,
            "refresh_type": args.refresh_type,
            "refresh_bytes": refresh.bytes,
            "refresh_tensors": refresh.tensors,
            "refresh_seconds": refresh.seconds,
            "sample_seconds": t_sample,
            "train_seconds": t_train,
            "sample_tokens_per_s": generated as f64 / t_sample.max(1e-9),
            "train_tokens_per_s": train_tokens as f64 / t_train.max(1e-9),
        });
        if let Some(v) = &verdict {
            line["watch"] = v.signals.clone();
            if let Some(reason) = &v.alarm {
                line["safeguard"] = json!({"decision": "warn", "reason": reason});
            }
        }
        if let Some(k) = pass {
            let (lo, hi) = em_grade::wilson_interval(k, samples.len());
            line["pass_rate"] = json!(k as f64 / samples.len().max(1) as f64);
            line["pass_ci95"] = json!([lo, hi]);
        }
        // Everything this update wrote before its metrics line and checkpoint.
        if let (Some(a), Some(b)) = (written0, bytes_written()) {
            line["written_bytes"] = json!(b - a);
        }
        line["seconds"] = json!(t0.elapsed().as_secs_f64());
        line["peak_rss_mb"] = json!(crate::peak_rss_mb());
        JsonlStore::<Value>::open(&metrics_path)?.0.append(&line)?;

        // 4. Checkpoint.
        if step % save_every == 0 || step == args.steps {
            let dir = args.out.join(format!("checkpoint-{step}"));
            write_atomically(&dir, |tmp| {
                write_hf_dir(&trainer, &args.model, tmp, true)?;
                let state = json!({ "step": step });
                fs::write(
                    tmp.join("state.json"),
                    serde_json::to_string_pretty(&state)? + "\n",
                )?;
                Ok(())
            })?;
            prune_checkpoints(&args.out, step, args.keep_last)?;
        }
        let msg = format!(
            "step {step}: entropy {:.4} grad_norm {:.3} len {:.0}{} {:.1}s",
            stats.loss,
            stats.grad_norm,
            generated as f64 / lens.len().max(1) as f64,
            pass.map(|k| format!(" pass {k}/{}", samples.len()))
                .unwrap_or_default(),
            t0.elapsed().as_secs_f64()
        );
        if bar.is_hidden() {
            crate::drive::say(&msg);
        }
        bar.set_message(msg);
        bar.inc(1);
    }
    bar.finish();
    let finished = latest_checkpoint(&args.out).is_some_and(|(s, _)| s >= args.steps);
    if finished && watch.is_some() {
        // The last update's weights get their round too.
        publisher.publish(&mut current_weight)?;
        let gguf = publisher.model_path().to_path_buf();
        let v = check(&gguf, args.steps)?;
        let step = args.steps + 1;
        match (&v.alarm, args.on_alarm) {
            (Some(reason), OnAlarm::Stop) => {
                let (good_step, weights) = last_good.take().expect("a snapshot");
                return stop_run(
                    args,
                    &trainer,
                    &params,
                    weights,
                    good_step,
                    step,
                    reason,
                    &v.signals,
                    &metrics_path,
                )
                .map(Some);
            }
            _ => {
                let mut line = json!({"step": step, "after_last_update": true, "watch": v.signals});
                if let Some(reason) = &v.alarm {
                    line["safeguard"] = json!({"decision": "warn", "reason": reason});
                }
                JsonlStore::<Value>::open(&metrics_path)?.0.append(&line)?;
            }
        }
    }
    let _ = fs::remove_dir_all(&work);
    if finished {
        write_atomically(&final_dir, |tmp| {
            write_hf_dir(&trainer, &args.model, tmp, false)
        })?;
        eprintln!("{}: trained model", final_dir.display());
        return Ok(Some(final_dir));
    }
    Ok(None)
}
