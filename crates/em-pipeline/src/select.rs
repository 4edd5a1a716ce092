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
//! Output directory (resumable: a rerun skips what is done; another model, pool or setting is
//! refused):
//! - `manifest.json`; `screen/` (the screen, resumable itself); `model/` (the base GGUF the rounds
//!   sample); `base-rounds.json` (the base round and a second-seed replicate: the noise);
//! - `trials/<id>.jsonl` (the candidate's pool line), `trials/<id>/` (its training run),
//!   `trials/<id>.trial.json` (its round and wall time, written when the trial is complete);
//! - `ranking.json` (every candidate, every signal, the decision), `chosen.jsonl` and `top.jsonl`
//!   (every candidate predicted to help, best first, for k-shot training).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use em_sampler::SamplingParams;
use em_store::{write_atomic, JsonlStore, Manifest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::prompt::{PromptOptions, RenderedPrompt};
use crate::safeguard::{self, Baseline, Round};
use crate::screen::{self, PromptResult, Rule, ScreenOptions};
use crate::train::{
    self, AdapterKind, AdapterOptions, RefreshType, SampleSettings, TrainOptions, UpdateSettings,
    WatchSettings,
};
use crate::{AdaptedBackend, Backend, Result};

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
            by: Rule::Agreement,
            candidates: 8,
            held_out,
            held_out_limit: 32,
            held_out_samples: 4,
            trial_steps: 3,
            trial_samples: 16,
            trial_lr: 1e-3,
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

    /// The trial of the prompt in `prompt` (a one-line pool file), trained in `out`.
    pub fn trial(&self, prompt: &Path, out: &Path) -> TrainOptions {
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
                ..reference.update.clone()
            },
            refresh_type: self.refresh_type,
            adapter: self.adapter.clone(),
            safeguard: WatchSettings::default(),
            ..reference
        }
    }

    /// Every setting that changes the selection (the manifest's settings).
    fn settings(&self, backend: &dyn Backend) -> Value {
        let mut v = serde_json::to_value(self).expect("options serialise");
        if let Some(map) = v.as_object_mut() {
            for key in ["out", "fresh", "model", "pool", "held_out"] {
                map.remove(key);
            }
        }
        v["backend"] = backend.identity();
        v
    }
}

/// A trial, once complete (`trials/<id>.trial.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub id: String,
    /// The held-out round sampled from the trial's weights, with the base round's seeds.
    pub round: Round,
    /// Token-mean entropy of the trial's first and last update.
    pub entropy_first: f64,
    pub entropy_last: f64,
    /// Wall time of the trial: training and its round.
    pub seconds: f64,
    /// Wall time of its updates alone (sampling and training), and responses they drew.
    pub update_seconds: f64,
    pub responses: usize,
}

/// What the trials predict for one candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Change of the held-out answered-and-stopped share from the base, paired over prompts.
    pub effect: f64,
    pub effect_ci95: (f64, f64),
    /// The safeguard's reason to stop such a run, if it would.
    pub alarm: Option<String>,
    /// `helps`, `unclear`, `hurts` (by the interval) or `alarm`.
    pub call: String,
}

impl Prediction {
    /// `trial`'s round against the base `baseline`.
    pub fn new(baseline: &Baseline, trial: &Round) -> Self {
        let base = &baseline.round;
        let (effect, lo, hi) = if base.answered_each.len() == trial.answered_each.len()
            && !base.answered_each.is_empty()
        {
            em_grade::paired_difference(&trial.answered_each, &base.answered_each)
        } else {
            let d = trial.answered - base.answered;
            (d, d, d)
        };
        let alarm = safeguard::judge(baseline, trial, &[]).alarm;
        let call = match (&alarm, lo > 0.0, hi < 0.0) {
            (Some(_), _, _) => "alarm",
            (None, true, _) => "helps",
            (None, _, true) => "hurts",
            _ => "unclear",
        };
        Prediction {
            effect,
            effect_ci95: (lo, hi),
            alarm,
            call: call.into(),
        }
    }

    /// Predicted to help: the effect's interval above zero and no alarm.
    pub fn helps(&self) -> bool {
        self.call == "helps"
    }
}

/// A candidate's line of `ranking.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub rank: usize,
    pub id: String,
    pub prediction: Prediction,
    /// The trial's held-out signals and the base's.
    pub answered: f64,
    pub answered_base: f64,
    pub length: f64,
    pub length_base: f64,
    pub repetition: f64,
    pub repetition_base: f64,
    pub drifted: usize,
    pub entropy_first: f64,
    pub entropy_last: f64,
    pub seconds: f64,
    /// The screen's figures for the prompt.
    pub screen: Value,
}

/// The selection: every candidate ranked, the chosen one if any, and what the trials cost.
#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    pub ranking: Vec<Candidate>,
    pub chosen: Option<String>,
    /// Wall time of all trials, and the projected wall time of one full run (`full_steps` updates
    /// of `full_samples` responses at the trials' own seconds per response, plus one round).
    pub trials_seconds: f64,
    pub full_run_seconds: f64,
    pub full_steps: usize,
    pub full_samples: usize,
}

impl Selection {
    /// The trials' wall time as a fraction of one full run's.
    pub fn cost(&self) -> f64 {
        self.trials_seconds / self.full_run_seconds.max(1e-9)
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
    if o.adapter.kind.is_some() && !backend.applies_adapters() {
        bail!("this backend cannot apply LoRA adapters; use --adapter none or --backend llama");
    }
    Ok(())
}

/// Screens, tries the candidates and ranks them (see the module documentation).
pub fn run(o: &SelectOptions, backend: &dyn Backend) -> Result<Selection> {
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

    // 1. The screen and the candidates.
    let screen_options = o.screen();
    let ranked = screen::run(&screen_options, backend)?;
    let pool = screen::Pool::load(&screen_options, backend)?;
    if ranked.len() < pool.problems.len() {
        bail!(
            "{}: the screen stopped before the end of the pool; rerun to resume",
            screen_options.out.display()
        );
    }
    let candidates = screen::candidates(&ranked, o.by, o.candidates);
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

    // 2. The base rounds on the held-out prompts, then the trials.
    let held_out = HeldOut::prepare(o, backend)?;
    let mut trials = vec![];
    for (i, c) in candidates.iter().enumerate() {
        let line = pool
            .problems
            .iter()
            .position(|p| p.id == c.id)
            .map(|i| pool.raw[i].clone())
            .context("a candidate is in the pool")?;
        eprintln!("select: trial {}/{}: {}", i + 1, candidates.len(), c.id);
        trials.push((*c, held_out.trial(o, backend, &c.id, &line)?));
    }
    let baseline = held_out.baseline;

    // 4. The ranking.
    let selection = rank(&baseline, &trials);
    write_selection(o, &selection, &pool)?;
    Ok(selection)
}

/// The held-out prompts trials are judged on, and the base model's rounds on them.
pub struct HeldOut {
    prompts: Vec<RenderedPrompt>,
    params: SamplingParams,
    /// The base GGUF the rounds sample (with a trial's adapter applied, under LoRA).
    base_gguf: PathBuf,
    /// The base round and its second-seed replicate (`base-rounds.json`).
    pub baseline: Baseline,
}

impl HeldOut {
    /// Renders `o.held_out`, converts the base to `<out>/model`, and samples the base round and
    /// its replicate (read back from `<out>/base-rounds.json` where done).
    pub fn prepare(o: &SelectOptions, backend: &dyn Backend) -> Result<Self> {
        let watch = WatchSettings {
            watch: Some(o.held_out.clone()),
            watch_limit: o.held_out_limit,
            watch_samples: o.held_out_samples,
            ..WatchSettings::default()
        };
        let prompts = train::watched_prompts(&watch, &o.model, &o.prompt, backend)?
            .context("held-out prompts")?;
        let base_gguf =
            crate::sampling_model(backend, &o.model, &o.out, o.refresh_type.out_type())?;
        let params = SamplingParams {
            temperature: o.temperature,
            top_p: o.top_p,
            repetition_penalty: o.repetition_penalty,
            max_new_tokens: o.max_new_tokens,
            seed: round_seed(o.seed),
            ..SamplingParams::default()
        };
        let path = o.out.join("base-rounds.json");
        let baseline = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{}: not the base rounds; use --fresh", path.display()))?,
            Err(_) => {
                let sample = |seed: u64| -> Result<Round> {
                    let samples = safeguard::sample_round(
                        backend,
                        &base_gguf,
                        &prompts,
                        o.held_out_samples,
                        &SamplingParams {
                            seed,
                            ..params.clone()
                        },
                    )?;
                    Ok(Round::from_samples(0, &samples))
                };
                let baseline = Baseline {
                    round: sample(params.seed)?,
                    replicate: sample(params.seed ^ 1)?,
                };
                write_atomic(&path, serde_json::to_string(&baseline)? + "\n")?;
                baseline
            }
        };
        eprintln!(
            "select: base on {} held-out prompts × {}: answered {:.3}, length {:.1}, repetition {:.3}; a second seed gives answered {:.3}; the safeguard's alarms: {}",
            prompts.len(),
            o.held_out_samples,
            baseline.round.answered,
            baseline.round.length,
            baseline.round.repetition,
            baseline.replicate.answered,
            baseline.thresholds()
        );
        Ok(Self {
            prompts,
            params,
            base_gguf,
            baseline,
        })
    }

    /// The trial of the prompt `pool_line` (id `id`) in `<out>/trials`: trains (resuming),
    /// samples the held-out round from its weights with the base round's seeds, and records both
    /// (`<id>.trial.json`); a complete trial is read back.
    pub fn trial(
        &self,
        o: &SelectOptions,
        backend: &dyn Backend,
        id: &str,
        pool_line: &str,
    ) -> Result<Trial> {
        let trials_dir = o.out.join("trials");
        std::fs::create_dir_all(&trials_dir)
            .with_context(|| format!("{}: cannot create", trials_dir.display()))?;
        let stem = file_stem(id);
        let record = trials_dir.join(format!("{stem}.trial.json"));
        if let Ok(text) = std::fs::read_to_string(&record) {
            return serde_json::from_str(&text)
                .with_context(|| format!("{}: not a trial record; use --fresh", record.display()));
        }
        let t0 = Instant::now();
        let prompt_file = trials_dir.join(format!("{stem}.jsonl"));
        write_atomic(&prompt_file, format!("{pool_line}\n"))?;
        let run_dir = trials_dir.join(&stem);
        let trained = train::run(&o.trial(&prompt_file, &run_dir), backend)?
            .with_context(|| format!("{}: the trial did not finish", run_dir.display()))?;
        let metrics: Vec<Value> = JsonlStore::<Value>::read(&run_dir.join("metrics.jsonl"))?;
        let updates: Vec<&Value> = metrics.iter().filter(|m| m.get("loss").is_some()).collect();
        let field = |m: Option<&&Value>, key: &str| -> f64 {
            m.and_then(|m| m.get(key))
                .and_then(Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        let update_seconds: f64 = updates
            .iter()
            .filter_map(|m| m.get("seconds").and_then(Value::as_f64))
            .sum();
        let k = o.held_out_samples;
        let samples = if o.adapter.kind.is_some() {
            let adapter = trained.join(train::ADAPTER_GGUF);
            let adapted = AdaptedBackend::new(backend, &self.base_gguf)?;
            safeguard::sample_round(&adapted, &adapter, &self.prompts, k, &self.params)?
        } else {
            let gguf =
                crate::sampling_model(backend, &trained, &run_dir, o.refresh_type.out_type())?;
            safeguard::sample_round(backend, &gguf, &self.prompts, k, &self.params)?
        };
        let trial = Trial {
            id: id.into(),
            round: Round::from_samples(o.trial_steps, &samples),
            entropy_first: field(updates.first(), "loss"),
            entropy_last: field(updates.last(), "loss"),
            seconds: t0.elapsed().as_secs_f64(),
            update_seconds,
            responses: updates.len() * o.trial_samples,
        };
        write_atomic(&record, serde_json::to_string_pretty(&trial)? + "\n")?;
        Ok(trial)
    }
}

/// Ranks the trials: alarms last, then by effect; chooses the first predicted to help.
pub fn rank(baseline: &Baseline, trials: &[(&PromptResult, Trial)]) -> Selection {
    let b = &baseline.round;
    let mut ranking: Vec<Candidate> = trials
        .iter()
        .map(|(screened, t)| {
            let (answer, share) = screened.agreement();
            Candidate {
                rank: 0,
                id: t.id.clone(),
                prediction: Prediction::new(baseline, &t.round),
                answered: t.round.answered,
                answered_base: b.answered,
                length: t.round.length,
                length_base: b.length,
                repetition: t.round.repetition,
                repetition_base: b.repetition,
                drifted: t.round.drifted_from(b),
                entropy_first: t.entropy_first,
                entropy_last: t.entropy_last,
                seconds: t.seconds,
                screen: json!({
                    "pass_rate": screened.pass_rate, "variance": screened.variance,
                    "agreement": share, "majority_answer": answer,
                    "terminated": screened.terminated(), "mean_entropy": screened.mean_entropy,
                }),
            }
        })
        .collect();
    ranking.sort_by(|x, y| {
        x.prediction
            .alarm
            .is_some()
            .cmp(&y.prediction.alarm.is_some())
            .then(y.prediction.effect.total_cmp(&x.prediction.effect))
            .then(x.id.cmp(&y.id))
    });
    for (i, c) in ranking.iter_mut().enumerate() {
        c.rank = i + 1;
    }
    let chosen = ranking
        .iter()
        .find(|c| c.prediction.helps())
        .map(|c| c.id.clone());
    let trials_seconds = trials.iter().map(|(_, t)| t.seconds).sum();
    let (update_seconds, responses) = trials.iter().fold((0.0, 0usize), |(s, n), (_, t)| {
        (s + t.update_seconds, n + t.responses)
    });
    let reference = TrainOptions::reference(PathBuf::new(), PathBuf::new(), PathBuf::new());
    let (full_steps, full_samples) = (reference.update.steps, reference.sampling.samples);
    let per_response = update_seconds / responses.max(1) as f64;
    // One round of the held-out prompts: what a trial spends beyond its updates, on average.
    let round_seconds = (trials_seconds - update_seconds) / trials.len().max(1) as f64;
    Selection {
        ranking,
        chosen,
        trials_seconds,
        full_run_seconds: per_response * (full_steps * full_samples) as f64 + round_seconds,
        full_steps,
        full_samples,
    }
}

/// Prints the ranking and writes `ranking.json` and, when a prompt was chosen, `chosen.jsonl` and
/// `top.jsonl`.
fn write_selection(o: &SelectOptions, s: &Selection, pool: &screen::Pool) -> Result<()> {
    println!(
        "{:>4}  {:<24} {:>8} {:>18} {:>9} {:>9} {:>6}  call",
        "rank", "prompt", "effect", "95% CI", "answered", "length", "drift"
    );
    for c in &s.ranking {
        let p = &c.prediction;
        println!(
            "{:>4}  {:<24} {:>+8.3} {:>18} {:>9.3} {:>9.1} {:>6}  {}",
            c.rank,
            c.id,
            p.effect,
            format!("[{:+.3}, {:+.3}]", p.effect_ci95.0, p.effect_ci95.1),
            c.answered,
            c.length,
            c.drifted,
            match &p.alarm {
                Some(why) => format!("alarm: {why}"),
                None => p.call.clone(),
            }
        );
    }
    println!(
        "select: {} trials took {:.0} s, {:.2}× one full run ({} updates × {} responses, {:.0} s projected from the trials' own time per response)",
        s.ranking.len(),
        s.trials_seconds,
        s.cost(),
        s.full_steps,
        s.full_samples,
        s.full_run_seconds
    );
    let ranking = json!({
        "by": o.by, "candidates": o.candidates, "trial_steps": o.trial_steps,
        "trial_samples": o.trial_samples, "trial_lr": o.trial_lr, "adapter": o.adapter.kind,
        "chosen": s.chosen, "ranking": s.ranking, "trials_seconds": s.trials_seconds,
        "full_run_seconds_projected": s.full_run_seconds, "cost_of_full_run": s.cost(),
    });
    write_atomic(
        &o.out.join("ranking.json"),
        serde_json::to_string_pretty(&ranking)? + "\n",
    )?;
    let line_of = |id: &str| -> Result<String> {
        pool.problems
            .iter()
            .position(|p| p.id == id)
            .map(|i| pool.raw[i].clone())
            .context("a candidate is in the pool")
    };
    // Every candidate predicted to help, best first: `train --prompt top.jsonl --shots K`.
    let helping: Vec<&Candidate> = s.ranking.iter().filter(|c| c.prediction.helps()).collect();
    let (chosen_path, top_path) = (o.out.join("chosen.jsonl"), o.out.join("top.jsonl"));
    match &s.chosen {
        Some(id) => {
            write_atomic(&chosen_path, line_of(id)? + "\n")?;
            let mut top = String::new();
            for c in &helping {
                top += &(line_of(&c.id)? + "\n");
            }
            write_atomic(&top_path, top)?;
            println!(
                "chosen: {id} -> {} ({} predicted to help, best first, in {})",
                chosen_path.display(),
                helping.len(),
                top_path.display()
            );
        }
        None => {
            let _ = std::fs::remove_file(&chosen_path);
            let _ = std::fs::remove_file(&top_path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round over 8 prompts whose answered shares are `each`, at length `length`.
    fn round(each: [f64; 8], length: f64, repetition: f64) -> Round {
        Round {
            weights_step: 0,
            n: 32,
            answered: each.iter().sum::<f64>() / 8.0,
            length,
            length_sd: 2.0,
            repetition,
            repetition_sd: 0.01,
            majority: (0..8).map(|i| Some(i.to_string())).collect(),
            answered_each: each.to_vec(),
        }
    }

    fn trial(id: &str, r: Round) -> Trial {
        Trial {
            id: id.into(),
            round: r,
            entropy_first: 0.1,
            entropy_last: 0.05,
            seconds: 2.0,
            update_seconds: 1.5,
            responses: 48,
        }
    }

    fn screened(id: &str) -> PromptResult {
        serde_json::from_value(json!({
            "id": id, "n": 4, "correct": 2, "pass_rate": 0.5, "ci95": [0.15, 0.85],
            "variance": 0.25, "mean_entropy": 0.1, "mean_full_entropy": 0.1, "mean_length": 30.0,
            "answers": ["1", "1", "2", null], "correct_each": [true, true, false, false],
            "finish": ["eos", "eos", "eos", "length"], "unfinished_each": [false, false, false, true],
            "gold": ["1"]
        }))
        .unwrap()
    }

    #[test]
    fn the_effect_is_paired_over_prompts_and_alarms_rank_last() {
        let half = [0.5; 8];
        let baseline = Baseline {
            round: round(half, 30.0, 0.05),
            replicate: round(half, 30.0, 0.05),
        };
        // Every prompt answers more often: a clear effect.
        let better = round([0.75, 0.75, 0.5, 0.75, 0.75, 0.75, 0.5, 0.75], 30.0, 0.05);
        // The same model: exactly nothing.
        let same = round(half, 30.0, 0.05);
        // More answered still, but longer and more repetitive: the safeguard's alarm.
        let rambling = round([1.0; 8], 40.0, 0.2);
        let worse = round([0.25, 0.25, 0.5, 0.25, 0.25, 0.25, 0.25, 0.5], 30.0, 0.05);

        let p = Prediction::new(&baseline, &better);
        assert_eq!(p.call, "helps");
        assert!((p.effect - 0.1875).abs() < 1e-12 && p.effect_ci95.0 > 0.0);
        let p = Prediction::new(&baseline, &same);
        assert_eq!(
            (p.effect, p.effect_ci95, p.call.as_str()),
            (0.0, (0.0, 0.0), "unclear")
        );
        let p = Prediction::new(&baseline, &rambling);
        assert_eq!(p.call, "alarm");
        assert!(p.alarm.unwrap().contains("longer"));
        assert_eq!(Prediction::new(&baseline, &worse).call, "hurts");

        let ids = ["a", "b", "c", "d"];
        let results: Vec<PromptResult> = ids.iter().map(|id| screened(id)).collect();
        let trials = [better, same, rambling, worse]
            .into_iter()
            .zip(&results)
            .map(|(r, s)| (s, trial(&s.id, r)))
            .collect::<Vec<_>>();
        let selection = rank(&baseline, &trials);
        let order: Vec<&str> = selection.ranking.iter().map(|c| c.id.as_str()).collect();
        // By effect, the alarm last although its effect is the largest.
        assert_eq!(order, ["a", "b", "d", "c"]);
        assert_eq!(selection.chosen.as_deref(), Some("a"));
        // Trials of 48 responses at 1.5 s: a full run of 640 at the same rate, plus one round.
        assert!((selection.full_run_seconds - (1.5 / 48.0 * 640.0 + 0.5)).abs() < 1e-9);
        assert!((selection.cost() - 8.0 / selection.full_run_seconds).abs() < 1e-12);

        // Nothing predicted to help: nothing chosen.
        let selection = rank(&baseline, &trials[1..]);
        assert_eq!(selection.chosen, None);
    }
}
