//! Trial selection: choose the one-shot prompt by what a short EM run on it does to the model,
//! without labels.
//!
//! Base statistics of a prompt's samples (pass rate, agreement) predict poorly whether EM on it
//! helps: EM amplifies whatever the prompt's responses share, and which way that moves the model
//! shows only once it moves. So [`run`] screens the pool, takes the first `candidates` prompts of a
//! cheap rule (`by`), trains each for a few on-policy updates (a LoRA adapter by default: the base
//! is never rewritten), and samples held-out unlabeled prompts from every trial's weights with the
//! seeds of a base-model round (common random numbers: what moves is the model). A trial is scored
//! by the safeguard's signals against the base: its *effect* is the change of the share of
//! held-out responses that end by themselves with a final answer, paired over prompts, with its
//! 95% interval; longer and more repetitive responses, or majority answers drifting while that
//! share does not rise, are the safeguard's alarms and disqualify a trial. The chosen prompt is the
//! largest effect among trials whose interval lies above zero and that raise no alarm; when there
//! is none, the selection says so and chooses nothing.
//!
//! The trials are independent, so where the backend [forks](Backend::fork) (on the CPU, when
//! llama.cpp's threads leave half the cores free) each trial's held-out round runs on the fork
//! while the next trial trains on an [`em_train::fused::training_pool`] of the other cores: the
//! same numbers, in less time (`options.overlap`, on by default).
//!
//! Output directory (resumable: a rerun skips what is done; another model, pool or setting is
//! refused):
//! - `manifest.json`; `screen/` (the screen, resumable itself); `model/` (the base GGUF the rounds
//!   sample); `base-rounds.json` (the base round and a second-seed replicate: the noise);
//! - `trials/<id>.jsonl` (the candidate's pool line), `trials/<id>/` (its training run),
//!   `trials/<id>.trial.json` (its round and wall time, written when the trial is complete);
//! - `trials-seconds.json` (the trials' wall time, where they all ran in one invocation);
//! - `ranking.json` (every candidate, every signal, the decision), `chosen.jsonl` and `top.jsonl`
//!   (every candidate predicted to help, best first, for k-shot training).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use em_data::Problem;
use em_store::Manifest;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::prompt::PromptOptions;
use crate::screen::{self, PromptResult, Rule, ScreenOptions};
use crate::train::{
    self, AdapterKind, AdapterOptions, RefreshType, SampleSettings, TrainOptions, UpdateSettings,
    WatchSettings,
};
use crate::{Backend, Result};

mod ranking;
mod trial;

use ranking::write_selection;
pub use ranking::{rank, Candidate, Selection};
pub use trial::{HeldOut, Prediction, Trial};

/// What to select from and how the trials run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectOptions {
    /// The base model (an HF directory: the trials train it).
    pub model: PathBuf,
    /// The pool to screen (a pool file or a bundled pool's name).
    pub pool: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Only the first N prompts of the pool.
    pub limit: Option<usize>,
    /// Answers sampled per prompt by the screen.
    pub k: usize,
    /// The cheap rule whose first `candidates` prompts get a trial.
    pub by: Rule,
    /// Prompts tried.
    pub candidates: usize,
    /// Unlabeled held-out prompts (pool JSONL or a bundled pool's name; answers never read).
    pub held_out: PathBuf,
    /// Held-out prompts used (the first N).
    pub held_out_limit: usize,
    /// Responses per held-out prompt and round.
    pub held_out_samples: usize,
    /// Updates per trial.
    pub trial_steps: usize,
    /// Responses per trial update.
    pub trial_samples: usize,
    /// Responses per forward/backward pass of a trial update (memory, not results).
    pub micro_batch: usize,
    /// The trials' learning rate.
    pub trial_lr: f64,
    /// `lora` (the default) or none: full fine-tuning trials.
    #[serde(flatten)]
    pub adapter: AdapterOptions,
    /// Float type of the GGUF the trials and rounds sample.
    pub refresh_type: RefreshType,
    /// Most new tokens per response (screen, trials and rounds).
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
    #[serde(flatten)]
    pub prompt: PromptOptions,
    /// Replace an output directory that holds another selection.
    pub fresh: bool,
    /// Each trial's held-out round runs beside the next trial's training where the backend
    /// [forks](Backend::fork); off, one after the other. The numbers are the same either way.
    #[serde(default = "yes")]
    pub overlap: bool,
}

fn yes() -> bool {
    true
}

impl SelectOptions {
    /// The reference settings (the command line's defaults).
    pub fn reference(model: PathBuf, pool: PathBuf, held_out: PathBuf, out: PathBuf) -> Self {
        Self {
            model,
            pool,
            out,
            limit: None,
            k: 8,
            by: Rule::Doubt,
            candidates: 8,
            held_out,
            held_out_limit: 32,
            held_out_samples: 2,
            trial_steps: 2,
            trial_samples: 16,
            micro_batch: 2,
            trial_lr: 1e-2,
            adapter: AdapterOptions {
                kind: Some(AdapterKind::Lora),
                ..AdapterOptions::default()
            },
            refresh_type: RefreshType::F16,
            max_new_tokens: 512,
            temperature: 0.5,
            top_p: 0.95,
            repetition_penalty: 1.15,
            seed: 15,
            prompt: PromptOptions::default(),
            fresh: false,
            overlap: true,
        }
    }

    /// The screen this selection starts from, in `<out>/screen`.
    pub fn screen(&self) -> ScreenOptions {
        ScreenOptions {
            limit: self.limit,
            k: self.k,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            prompt: self.prompt.clone(),
            rule: self.by,
            quant: self.refresh_type.out_type(),
            ..ScreenOptions::reference(
                self.model.clone(),
                self.pool.clone(),
                self.out.join("screen"),
            )
        }
    }

    /// The trial of the prompt in `prompt` (a one-line pool file), trained in `out`, under an
    /// adapter sampling the base GGUF `base`.
    pub fn trial(&self, prompt: &Path, out: &Path, base: &Path) -> TrainOptions {
        let reference = TrainOptions::reference(self.model.clone(), prompt.into(), out.into());
        TrainOptions {
            prompt_options: self.prompt.clone(),
            sampling: SampleSettings {
                samples: self.trial_samples,
                sample_temperature: self.temperature,
                top_p: self.top_p,
                repetition_penalty: self.repetition_penalty,
                max_new_tokens: self.max_new_tokens,
                seed: self.seed,
                ..reference.sampling.clone()
            },
            update: UpdateSettings {
                steps: self.trial_steps,
                lr: self.trial_lr,
                micro_batch: self.micro_batch,
                ..reference.update.clone()
            },
            refresh_type: self.refresh_type,
            adapter: self.adapter.clone(),
            safeguard: WatchSettings::default(),
            adapter_base: Some(base.to_path_buf()),
            ..reference
        }
    }

    /// Every setting that changes a trial and its round.
    pub fn trial_settings(&self) -> Value {
        json!({
            "steps": self.trial_steps, "samples": self.trial_samples, "lr": self.trial_lr,
            "adapter": self.adapter, "refresh_type": self.refresh_type,
            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
            "prompt": self.prompt, "held_out_limit": self.held_out_limit,
            "held_out_samples": self.held_out_samples,
        })
    }

    /// Every setting that changes the selection (the manifest's settings).
    fn settings(&self, backend: &dyn Backend) -> Value {
        let mut v = serde_json::to_value(self).expect("options serialise");
        if let Some(map) = v.as_object_mut() {
            for key in ["out", "fresh", "overlap", "model", "pool", "held_out"] {
                map.remove(key);
            }
        }
        v["backend"] = backend.identity();
        v
    }
}

/// The seed of the held-out rounds (the second-seed replicate flips its low bit).
fn round_seed(seed: u64) -> u64 {
    train::step_seed(seed ^ 0x5345_4c45_4354_5253, 0)
}

/// A file name for a prompt id.
fn file_stem(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn check(o: &SelectOptions, backend: &dyn Backend) -> Result<()> {
    if !o.model.join("config.json").is_file() {
        bail!(
            "{}: not an HF model directory (select trains its trials, so --model must be one)",
            o.model.display()
        );
    }
    if !backend.samples_local_gguf() {
        bail!("select trains on-policy trials, so it needs an in-process backend (llama.cpp), not a server");
    }
    if o.candidates == 0 || o.trial_steps == 0 || o.trial_samples == 0 || o.k == 0 {
        bail!("--candidates, --trial-steps, --trial-samples and --k must be positive");
    }
    if o.held_out_limit == 0 || o.held_out_samples == 0 {
        bail!("--held-out-limit and --held-out-samples must be positive");
    }
    let pool = crate::assets::pool_path(&o.pool)?;
    if crate::assets::pool_path(&o.held_out)? == pool && o.limit.is_none() {
        bail!(
            "{}: --held-out is the pool, and the screen takes all of it: give --limit N to keep the prompts after the first N held out",
            pool.display()
        );
    }
    if o.adapter.kind.is_some() && !backend.applies_adapters() {
        bail!("this backend cannot apply LoRA adapters; use --adapter none or --backend llama");
    }
    Ok(())
}

/// Checks the options and claims the output directory with the selection's manifest (the
/// model, the pool, the held-out prompts, every setting): another selection there is refused.
pub fn claim(o: &SelectOptions, backend: &dyn Backend) -> Result<()> {
    check(o, backend)?;
    let mut manifest = Manifest::new(
        "select",
        em_store::model_identity(&o.model)?,
        o.settings(backend),
    );
    let pool_path = crate::assets::pool_path(&o.pool)?;
    let held_out_path = crate::assets::pool_path(&o.held_out)?;
    manifest
        .inputs
        .insert("pool".into(), em_store::file_identity(&pool_path)?);
    manifest
        .inputs
        .insert("held_out".into(), em_store::file_identity(&held_out_path)?);
    manifest.info = json!({ "tool": crate::TOOL });
    manifest.claim(&o.out, o.fresh)?;
    Ok(())
}

/// Screens, tries the candidates and ranks them (see the module documentation).
pub fn run(o: &SelectOptions, backend: &dyn Backend) -> Result<Selection> {
    claim(o, backend)?;
    let screen_options = o.screen();
    let ranked = screen::run(&screen_options, backend)?;
    let pool = screen::Pool::load(&screen_options, backend)?;
    if ranked.len() < pool.problems.len() {
        bail!(
            "{}: the screen stopped before the end of the pool; rerun to resume",
            screen_options.out.display()
        );
    }
    try_candidates(o, backend, &ranked, &pool.problems, &pool.raw)
}

/// The trials of `ranked`'s first `o.candidates` prompts by `o.by` (a claimed output), their
/// ranking and the choice, written as the module documentation says. `problems` and `raw` are
/// the pool's records and their lines in its own format.
pub fn try_candidates(
    o: &SelectOptions,
    backend: &dyn Backend,
    ranked: &[PromptResult],
    problems: &[Problem],
    raw: &[String],
) -> Result<Selection> {
    let line_of = |id: &str| -> Result<String> {
        problems
            .iter()
            .position(|p| p.id == id)
            .map(|i| raw[i].clone())
            .with_context(|| format!("{id} is not in the pool"))
    };
    let candidates = screen::candidates(ranked, o.by, o.candidates);
    if candidates.is_empty() {
        bail!("no prompt qualifies under rule {:?} to be tried", o.by);
    }
    eprintln!(
        "select: {} candidate{} by {:?}: {}",
        candidates.len(),
        if candidates.len() == 1 { "" } else { "s" },
        o.by,
        candidates
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let held_out = HeldOut::prepare(o, backend)?;
    let t0 = std::time::Instant::now();
    let (trials, all_ran) = run_trials(o, backend, &held_out, &candidates, &line_of)?;
    let mut selection = rank(&held_out.baseline, &trials);
    // Rounds that ran beside the next trial's training overlap it: the wall time is the cost,
    // kept for a rerun that reads the trials back (a partial rerun sums the trials' own times).
    let wall = o.out.join("trials-seconds.json");
    if all_ran {
        selection.trials_seconds = t0.elapsed().as_secs_f64();
        em_store::write_atomic(
            &wall,
            json!({"seconds": selection.trials_seconds}).to_string() + "\n",
        )?;
    } else if let Some(seconds) = std::fs::read_to_string(&wall)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["seconds"].as_f64())
    {
        selection.trials_seconds = seconds;
    }
    write_selection(o, &selection, &line_of)?;
    Ok(selection)
}

/// The trials of `candidates`, in order, and whether every one ran now (none read back). Where the
/// backend [forks](Backend::fork), each trial's held-out round runs on a second thread while the
/// next trial trains: the trials are independent, so only the cores limit how many run at once,
/// and every number is what the sequential order gives.
fn run_trials<'c>(
    o: &SelectOptions,
    backend: &dyn Backend,
    held_out: &HeldOut,
    candidates: &[&'c PromptResult],
    line_of: &dyn Fn(&str) -> Result<String>,
) -> Result<(Vec<(&'c PromptResult, Trial)>, bool)> {
    let mut trials = vec![];
    let mut all_ran = true;
    // The fork, while no round runs on it; with it, a trial trains on the other half of the
    // cores (the whole of the other core, on two): oversubscribed, both would crawl. Candle's
    // threads only split the work, so the numbers do not change.
    let mut idle = backend.fork().filter(|_| o.overlap);
    let training = match idle {
        Some(_) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Some(
                em_train::fused::training_pool(cores - cores / 2)
                    .context("cannot start the trials' training threads")?,
            )
        }
        None => None,
    };
    type Judged = (Box<dyn Backend + Send>, Result<Trial>);
    std::thread::scope(|scope| -> Result<()> {
        // The round in flight on the fork, whose thread hands the fork back.
        let mut pending: Option<(&'c PromptResult, std::thread::ScopedJoinHandle<Judged>)> = None;
        let join =
            |pending: &mut Option<(&'c PromptResult, std::thread::ScopedJoinHandle<Judged>)>,
             trials: &mut Vec<(&'c PromptResult, Trial)>|
             -> Result<Option<Box<dyn Backend + Send>>> {
                let Some((done, handle)) = pending.take() else {
                    return Ok(None);
                };
                let (fork, trial) = handle.join().map_err(|_| {
                    anyhow::anyhow!("{}: the held-out round's thread panicked", done.id)
                })?;
                trials.push((done, trial?));
                Ok(Some(fork))
            };
        for (i, c) in candidates.iter().enumerate() {
            eprintln!("select: trial {}/{}: {}", i + 1, candidates.len(), c.id);
            let line = line_of(&c.id)?;
            let train = || held_out.train(o, backend, &c.id, &line);
            let trained = match &training {
                Some(pool) => pool.install(train)?,
                None => train()?,
            };
            if let Some(fork) = join(&mut pending, &mut trials)? {
                idle = Some(fork);
            }
            match trained {
                trial::Trained::Done(t) => {
                    all_ran = false;
                    trials.push((*c, t));
                }
                trial::Trained::Ready(ready) => match idle.take() {
                    Some(worker) => {
                        pending = Some((
                            *c,
                            scope.spawn(move || {
                                let trial = held_out.judge(o, &*worker, *ready);
                                (worker, trial)
                            }),
                        ));
                    }
                    None => trials.push((*c, held_out.judge(o, backend, *ready)?)),
                },
            }
        }
        join(&mut pending, &mut trials)?;
        Ok(())
    })?;
    Ok((trials, all_ran))
}
