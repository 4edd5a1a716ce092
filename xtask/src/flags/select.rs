//! `select`'s flags.

use std::path::PathBuf;

use em_pipeline::screen::Rule;
use em_pipeline::select::SelectOptions;
use em_pipeline::train::{AdapterKind, AdapterOptions, RefreshType};

use super::PromptFlags;

/// What the trials train: a LoRA adapter on the frozen base, or every weight.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrialTraining {
    Lora,
    Full,
}

/// What to select from and how the trials run.
#[derive(clap::Args, Debug, Clone)]
pub struct SelectFlags {
    /// The base model: an HF directory (the trials train it).
    #[arg(long)]
    pub model: PathBuf,
    /// The pool to screen: a pool file or a bundled pool's name (`dsr`, `pi1`).
    #[arg(long)]
    pub pool: PathBuf,
    /// Unlabeled held-out prompts the trials are judged on (pool JSONL or a bundled pool's name;
    /// answers, if any, are never read). The pool itself takes the prompts after the screened
    /// ones (`--pool dsr --limit 200 --held-out dsr`: dsr's next --held-out-limit prompts).
    #[arg(long)]
    pub held_out: PathBuf,
    /// Output directory (rerun the same command to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N prompts of the pool.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Answers sampled per prompt by the screen.
    #[arg(long, default_value_t = 8)]
    pub k: usize,
    /// The cheap rule whose first --candidates prompts get a trial (`doubt`, the default, and `agreement` need no labels).
    #[arg(long, value_enum, default_value_t = Rule::Doubt)]
    pub by: Rule,
    /// Prompts tried.
    #[arg(long, default_value_t = 8)]
    pub candidates: usize,
    /// Held-out prompts used (the first N of --held-out).
    #[arg(long, default_value_t = 32)]
    pub held_out_limit: usize,
    /// Responses per held-out prompt and round.
    #[arg(long, default_value_t = 2)]
    pub held_out_samples: usize,
    /// Updates per trial.
    #[arg(long, default_value_t = 2)]
    pub trial_steps: usize,
    /// Responses sampled per trial update.
    #[arg(long, default_value_t = 16)]
    pub trial_samples: usize,
    /// Responses per forward/backward pass of a trial update (memory, not results).
    #[arg(long, default_value_t = 2)]
    pub micro_batch: usize,
    /// The trials' learning rate: a probe, larger than a full run's (LoRA starts from B = 0; on
    /// organism-mixed, LoRA trials at 1e-3 barely moved the held-out prompts, at 1e-2 they
    /// ranked the full runs' gains best; see the README).
    #[arg(long, default_value_t = 1e-2)]
    pub trial_lr: f64,
    /// What the trials train: a LoRA adapter on the frozen base (the base GGUF loaded once per
    /// trial, nothing rewritten) or every weight.
    #[arg(long, value_enum, default_value_t = TrialTraining::Lora)]
    pub trial: TrialTraining,
    /// The trials' LoRA rank `r` (PEFT's default).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// The trials' LoRA `alpha` (PEFT's default).
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Linear layers the trials' adapter covers (PEFT's "all-linear").
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub targets: Vec<String>,
    /// Float type of the GGUF the screen, trials and rounds sample.
    #[arg(long, value_enum, default_value = "f16")]
    pub refresh_type: RefreshType,
    /// Most new tokens per response.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.5)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.15)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 15)]
    pub seed: u64,
    #[command(flatten)]
    pub prompt: PromptFlags,
    /// Replace an output directory that holds another selection.
    #[arg(long)]
    pub fresh: bool,
    /// Run each trial's held-out round after its training, not beside the next trial's (where
    /// llama.cpp's threads leave half the cores free, the default, they overlap; the numbers are
    /// the same either way).
    #[arg(long)]
    pub no_overlap: bool,
}

impl SelectFlags {
    /// The library's options.
    pub fn options(&self) -> anyhow::Result<SelectOptions> {
        let adapter = AdapterOptions {
            kind: match self.trial {
                TrialTraining::Lora => Some(AdapterKind::Lora),
                TrialTraining::Full => None,
            },
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
        };
        Ok(SelectOptions {
            model: self.model.clone(),
            pool: self.pool.clone(),
            out: self.out.clone(),
            limit: self.limit,
            k: self.k,
            by: self.by,
            candidates: self.candidates,
            held_out: self.held_out.clone(),
            held_out_limit: self.held_out_limit,
            held_out_samples: self.held_out_samples,
            trial_steps: self.trial_steps,
            trial_samples: self.trial_samples,
            micro_batch: self.micro_batch,
            trial_lr: self.trial_lr,
            adapter,
            refresh_type: self.refresh_type,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            prompt: super::options(&self.prompt)?,
            fresh: self.fresh,
            overlap: !self.no_overlap,
        })
    }
}
