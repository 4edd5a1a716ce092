//! The flags of the lab's commands (demo, organism, fixture, analyze, em-loss).

use std::path::PathBuf;

use em_data::synthetic::StyleRule;
use em_lab::fixture::FixtureKind;
use em_pipeline::train::ModelDtype;

use super::AdapterFlags;

#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct DemoFlags {
    /// Output directory (resumable: finished steps are reused).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Training seeds per prompt at its chosen learning rate.
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Learning rates tried on the validation split.
    #[arg(long, value_delimiter = ',', default_value = "1e-5,3e-5,1e-4")]
    pub lrs: Vec<f64>,
    /// Reduced form (few items, few samples, one learning rate, one seed) for CI.
    #[arg(long)]
    pub quick: bool,
    /// The subject: an HF model directory from `cargo xtask organism` (also
    /// fixtures/organism-good and fixtures/organism-bad).
    #[arg(long, default_value = "fixtures/organism-mixed")]
    pub subject: PathBuf,
    /// Seed of the synthetic splits.
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Replace outputs that hold another run.
    #[arg(long)]
    pub fresh: bool,
    /// With `--adapter lora`: every chosen prompt also trained through a LoRA adapter (its
    /// learning rate chosen on validation from `--lora-lrs`), next to full fine-tuning, compared
    /// paired on the test split; the report is `demo-lora.md`.
    #[command(flatten)]
    #[serde(flatten)]
    pub adapter: AdapterFlags,
    /// Learning rates tried for the adapter (LoRA's updates are scaled by alpha/rank and start
    /// from B = 0: it needs larger rates than full fine-tuning).
    #[arg(long, value_delimiter = ',', default_value = "1e-4,3e-4,1e-3,3e-3")]
    pub lora_lrs: Vec<f64>,
    /// Instead of the demo, the trial study (`trial-study.md`): whether `select`'s trials
    /// predict a full run's validation gain better than the screen's statistics (Spearman's ρ
    /// with bootstrap intervals).
    #[arg(long)]
    pub trial_study: bool,
    /// Instead of the demo, what the trial rule's selection costs: 3 × (a full run, the 8
    /// trials, a full run), timed in the same command (`trial-cost.md`).
    #[arg(long)]
    pub trial_cost: bool,
    /// Also train this many prompts drawn from the pool at random (seeded; at most 9), each like
    /// a rule's pick: the floor a rule has to beat.
    #[arg(long, default_value_t = 0)]
    pub random_prompts: usize,
    /// Prompts the trial study trains on.
    #[arg(long, default_value_t = 30)]
    pub study_prompts: usize,
    /// Learning rates of the trial study's full runs.
    #[arg(long, value_delimiter = ',', default_value = "3e-5,1e-4")]
    pub study_lrs: Vec<f64>,
}

#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct OrganismFlags {
    /// Fractions of the training targets' styles (`careful=F,guess=F,ramble=F`), or a mix that
    /// depends on the problem's first digit (`first-digit:careful=0.80..0.40,guess=0.20`: careful
    /// among worked answers from 0.80 at first digit 1 to 0.40 at 9, guesses 0.20 everywhere).
    #[arg(long, default_value = "careful=0.45,guess=0.30,ramble=0.25")]
    pub mix: StyleRule,
    /// Seed of the initial weights and of the training stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Optimizer updates.
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    /// Output directory (replaced when complete).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Sequences per update.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate (warm-up, then cosine to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Residual width.
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// Probe every this many steps: greedy accuracy on 48 validation problems, with the response
    /// forced to open in the careful style (0: never).
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Stop once the careful-style probe accuracy reaches this (the skill is then neither absent
    /// nor saturated); 0 or above 1: train all `--steps`.
    #[arg(long, default_value_t = 0.55)]
    pub stop_accuracy: f64,
    /// Validation problems measured at the end, at each temperature.
    #[arg(long, default_value_t = 200)]
    pub measure: usize,
}

#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct FixtureFlags {
    pub kind: FixtureKind,
    /// Output directory (default: fixtures/<kind>).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct EmLossFlags {
    /// HF model directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON file: {"temperature": τ, "sequences": [{"prompt_ids": [..], "response_ids": [..]}, ..]}.
    #[arg(long)]
    pub input: PathBuf,
    /// Write every parameter's gradient (HF names) to this safetensors file.
    #[arg(long)]
    pub grads_out: Option<PathBuf>,
    /// Float type of the computation (gradients are written in f32, f64 for f64).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ModelDtype,
    /// Sequences per forward/backward pass (the result does not depend on it).
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Train the `pad_token_id` row of the input embedding through the input path too (by
    /// default it gets none there, as transformers' `padding_idx` rules).
    #[arg(long)]
    pub train_pad_row: bool,
    /// Where to compute: cpu, cuda or cuda:N (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations
    /// (the same gradients, less memory, one more forward pass).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub recompute: bool,
    /// Compute again on this device and fail unless the loss agrees to 1e-4 and every gradient
    /// to 1e-3 (relative to the tensor's largest entry), e.g. `--device cuda --check-against cpu`.
    #[arg(long)]
    pub check_against: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    #[command(subcommand)]
    pub what: AnalyzeCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AnalyzeCommand {
    /// EM update size against each GGUF type's quantization error, per tensor.
    Fidelity {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        tuned: PathBuf,
        /// Writes fidelity.json and fidelity.md here.
        #[arg(long)]
        out: PathBuf,
    },
    /// Logit statistics of base and tuned on the same texts (JSONL lines with `prompt` and `response`, or an eval folder's per-item results).
    Logits {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        tuned: PathBuf,
        #[arg(long)]
        pairs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// At most this many pairs.
        #[arg(long, default_value_t = 32)]
        limit: usize,
    },
    /// Plots entropy and pass rate over steps from a training run's metrics.jsonl.
    Curves {
        #[arg(long)]
        metrics: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}
