//! The command line's flags: clap structs that mirror the libraries' option structs field for
//! field, turned into them through serde ([`options`]), so each default is written once here and a
//! test keeps it equal to the library's reference settings.

mod lab;
mod select;
mod train;

use std::path::PathBuf;

use anyhow::Context;
use em_convert::OutType;
use em_pipeline::fetch::Asset;
use em_pipeline::prompt::Style;
use em_pipeline::screen::Rule;
use em_sampler::EmInf;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use lab::*;
pub use select::*;
pub use train::*;

/// The library options the flags describe (the same names, through their serde forms).
pub fn options<O: DeserializeOwned>(flags: &impl Serialize) -> anyhow::Result<O> {
    let value = serde_json::to_value(flags).context("flags to options")?;
    serde_json::from_value(value).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Prompt settings: the style and optional overrides of the turns.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct PromptFlags {
    /// How a problem becomes a prompt.
    #[arg(long = "style", value_enum, default_value_t = Style::Auto)]
    pub style: Style,
    /// Replace the system turn (an empty string drops it).
    #[arg(long)]
    pub system: Option<String>,
    /// Append this to the user turn.
    #[arg(long)]
    pub user_suffix: Option<String>,
}

/// What to screen and how.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct ScreenFlags {
    /// The model to screen with (the base model to be trained): a GGUF or an HF directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt pool: a file in the pool format (`{id, prompt: [messages], answer}` per line), or
    /// the name of a pool the project carries: `dsr` (the 1209-problem DeepScaleR subset the
    /// reference screens) or `pi1`.
    #[arg(long)]
    pub pool: PathBuf,
    /// Answers sampled per prompt.
    #[arg(long, default_value_t = 8)]
    pub k: usize,
    /// Output directory (created; rerun the same command to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N prompts of the pool.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.5)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.15)]
    pub repetition_penalty: f32,
    /// Base seed; each prompt's samples are seeded from it and the prompt id.
    #[arg(long, default_value_t = 15)]
    pub seed: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub prompt: PromptFlags,
    /// Selection rule for `chosen.jsonl`.
    #[arg(long, value_enum, default_value_t = Rule::Variance)]
    pub rule: Rule,
    /// Also keep every response text in the per-prompt lines.
    #[arg(long)]
    pub keep_responses: bool,
    /// Sample with EM-INF, inference-time entropy minimisation of each step's logits
    /// (`steps=5,lr=1,kl=0.1`, or `default`); llama.cpp backend only.
    #[arg(long)]
    pub em_inf: Option<em_sampler::EmInf>,
    /// GGUF type when --model is an HF directory (converted once into the output directory).
    #[arg(long, value_enum, default_value = "f16")]
    pub quant: em_convert::OutType,
    /// Replace an output directory that holds another run.
    #[arg(long)]
    pub fresh: bool,
    /// Stop after this many newly screened prompts, as if killed (for resume tests).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// What to evaluate and how.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct EvalFlags {
    /// A .gguf file, or an HF directory (converted with --quant first).
    #[arg(long)]
    pub model: PathBuf,
    /// GGUF type when --model (or --baseline) is an HF directory.
    #[arg(long, value_enum, default_value = "f16")]
    pub quant: OutType,
    /// Comma-separated suites: math500, gsm8k, minerva, olympiadbench, amc23, aime24, aime25, svamp,
    /// mawps, asdiv, math, or paths to JSONL/JSON files.
    #[arg(long, value_delimiter = ',', required = true)]
    pub suites: Vec<String>,
    /// Output directory (per-item JSONL, summary.json, summary.md).
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N items of each suite.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sampling temperature; 0 is greedy (the default, as the toolkit evaluates).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Samples per item (avg@n and pass@n when > 1).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 3072)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub prompt: PromptFlags,
    /// A LoRA GGUF (`adapter.gguf` of a `train --adapter lora` run) that llama.cpp applies to
    /// `--model`, which must then be the base GGUF; the manifest records the adapter as the model
    /// and the base with the backend.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A baseline for the paired comparison: a model (.gguf or HF directory), evaluated here
    /// without `--adapter`, or a finished eval folder of the same suites and settings, whose
    /// per-item results are reused (its low-temperature settings are not re-run then).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// The baseline's own LoRA GGUF, applied to `--baseline` (a base GGUF).
    #[arg(long, requires = "baseline")]
    pub baseline_adapter: Option<PathBuf>,
    /// Further temperatures at which to run the baseline (0 = greedy), since plain low-temperature
    /// sampling may beat what EM gains.
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.25")]
    pub baseline_temperatures: Vec<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decode the model with EM-INF, inference-time entropy minimisation of each step's logits
    /// (`steps=5,lr=1,kl=0.1`, or `default`); llama.cpp backend only.
    #[arg(long)]
    pub em_inf: Option<EmInf>,
    /// Also run the baseline with EM-INF (at the model's temperature): the training-free
    /// counterpart of EM, next to it.
    #[arg(long)]
    pub baseline_em_inf: Option<EmInf>,
    /// Replace an output directory that holds another run.
    #[arg(long)]
    pub fresh: bool,
}

#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct FetchFlags {
    /// Which asset to fetch.
    pub asset: Asset,
    /// Cache directory (default: $EM_CACHE_DIR, else $XDG_CACHE_HOME/oneshot-em, else ~/.cache/oneshot-em).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// Arguments of `cargo xtask grade`.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct GradeFlags {
    /// JSONL input: each line has `response` (model output) and `answer` (gold: string or list).
    #[arg(long)]
    pub input: PathBuf,
    /// JSONL output of `{"pred", "correct"}` per input line, in order (default: standard output).
    #[arg(long)]
    pub output: Option<PathBuf>,
}
