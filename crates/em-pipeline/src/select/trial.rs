//! A trial and its judgement: [`HeldOut`] (the held-out prompts and the base model's rounds on
//! them), [`HeldOut::trial`] (a few updates on one candidate and the round of its weights with
//! the base round's seeds), and the [`Prediction`] read from the two.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use em_sampler::SamplingParams;
use em_store::{write_atomic, JsonlStore};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{file_stem, round_seed, SelectOptions};
use crate::prompt::RenderedPrompt;
use crate::safeguard::{self, Baseline, Round};
use crate::train;
use crate::{AdaptedBackend, Backend, Result};

/// A trial, once complete (`trials/<id>.trial.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub id: String,
    /// The held-out round sampled from the trial's weights, with the base round's seeds.
    pub round: Round,
    /// Token-mean entropy of the trial's first and last update.
    pub entropy_first: f64,
    pub entropy_last: f64,
    /// Wall time of the trial: its training and its round, each timed on its own thread.
    pub seconds: f64,
    /// Wall time of its updates alone (sampling and training), and responses they drew.
    pub update_seconds: f64,
    pub responses: usize,
    /// The settings the trial ran with ([`SelectOptions::trial_settings`]): a record of other
    /// settings is refused, not reused.
    pub settings: Value,
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

/// The held-out prompts, rendered: the first `held_out_limit` of `held_out`, or where that is the
/// pool itself, the first after the screened ones (`--limit`), so that no held-out prompt is a
/// candidate.
fn held_out_prompts(o: &SelectOptions, backend: &dyn Backend) -> Result<Vec<RenderedPrompt>> {
    let path = crate::assets::pool_path(&o.held_out)?;
    let mut problems = em_data::load_pool(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if path == crate::assets::pool_path(&o.pool)? {
        let Some(skip) = o.limit.filter(|&n| n < problems.len()) else {
            anyhow::bail!(
                "{}: --held-out is the pool, and the screen takes all of it: give --limit N to keep the prompts after the first N held out",
                path.display()
            );
        };
        problems.drain(..skip);
    }
    problems.truncate(o.held_out_limit);
    if problems.is_empty() {
        anyhow::bail!("{}: no held-out prompts", path.display());
    }
    let mut prompts = vec![];
    crate::with_vocab(backend, &o.model, &mut |vocab| {
        let renderer = crate::prompt::PromptRenderer::new(vocab, &o.prompt)?;
        prompts = renderer.render_all(&problems, &path)?;
        Ok(())
    })?;
    Ok(prompts)
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
        let prompts = held_out_prompts(o, backend)?;
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
                let sample = |backend: &dyn Backend, seed: u64| -> Result<Round> {
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
                // The replicate on a fork of the backend, beside the round, where there is one.
                let (round, replicate) = match backend.fork().filter(|_| o.overlap) {
                    Some(fork) => std::thread::scope(|scope| {
                        let replicate = scope.spawn(|| sample(&*fork, params.seed ^ 1));
                        let round = sample(backend, params.seed);
                        let replicate = replicate
                            .join()
                            .map_err(|_| anyhow::anyhow!("the base replicate's thread panicked"));
                        (round, replicate)
                    }),
                    None => (
                        sample(backend, params.seed),
                        Ok(sample(backend, params.seed ^ 1)),
                    ),
                };
                let baseline = Baseline {
                    round: round?,
                    replicate: replicate??,
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
        match self.train(o, backend, id, pool_line)? {
            Trained::Done(trial) => Ok(trial),
            Trained::Ready(ready) => self.judge(o, backend, *ready),
        }
    }

    /// The first half of [`HeldOut::trial`]: the record where the trial is complete, else its
    /// training run (resuming), ready for [`HeldOut::judge`].
    pub fn train(
        &self,
        o: &SelectOptions,
        backend: &dyn Backend,
        id: &str,
        pool_line: &str,
    ) -> Result<Trained> {
        let trials_dir = o.out.join("trials");
        std::fs::create_dir_all(&trials_dir)
            .with_context(|| format!("{}: cannot create", trials_dir.display()))?;
        let stem = file_stem(id);
        let record = trials_dir.join(format!("{stem}.trial.json"));
        let settings = o.trial_settings();
        if let Ok(text) = std::fs::read_to_string(&record) {
            let done: Trial = serde_json::from_str(&text).with_context(|| {
                format!("{}: not a trial record; use --fresh", record.display())
            })?;
            if done.settings != settings {
                anyhow::bail!(
                    "{}: a trial of other settings ({} there, {settings} now); use --fresh or another output directory",
                    record.display(),
                    done.settings
                );
            }
            return Ok(Trained::Done(done));
        }
        let t0 = Instant::now();
        let prompt_file = trials_dir.join(format!("{stem}.jsonl"));
        write_atomic(&prompt_file, format!("{pool_line}\n"))?;
        let run_dir = trials_dir.join(&stem);
        let trained = train::run(&o.trial(&prompt_file, &run_dir, &self.base_gguf), backend)?
            .with_context(|| format!("{}: the trial did not finish", run_dir.display()))?;
        let metrics: Vec<Value> = JsonlStore::<Value>::read(&run_dir.join("metrics.jsonl"))?;
        let updates: Vec<&Value> = metrics.iter().filter(|m| m.get("loss").is_some()).collect();
        let field = |m: Option<&&Value>, key: &str| -> f64 {
            m.and_then(|m| m.get(key))
                .and_then(Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        Ok(Trained::Ready(Box::new(ReadyTrial {
            id: id.into(),
            record,
            run_dir,
            trained,
            entropy_first: field(updates.first(), "loss"),
            entropy_last: field(updates.last(), "loss"),
            train_seconds: t0.elapsed().as_secs_f64(),
            update_seconds: updates
                .iter()
                .filter_map(|m| m.get("seconds").and_then(Value::as_f64))
                .sum(),
            responses: updates.len() * o.trial_samples,
            settings,
        })))
    }

    /// The second half of [`HeldOut::trial`]: the held-out round of a trained trial's weights,
    /// with the base round's seeds, recorded (`<id>.trial.json`). `backend` may be a
    /// [`Backend::fork`] of the one that trained it, on another thread.
    pub fn judge(&self, o: &SelectOptions, backend: &dyn Backend, t: ReadyTrial) -> Result<Trial> {
        let t0 = Instant::now();
        let k = o.held_out_samples;
        let samples = if o.adapter.kind.is_some() {
            let adapter = t.trained.join(train::ADAPTER_GGUF);
            let adapted = AdaptedBackend::new(backend, &self.base_gguf)?;
            safeguard::sample_round(&adapted, &adapter, &self.prompts, k, &self.params)?
        } else {
            let gguf =
                crate::sampling_model(backend, &t.trained, &t.run_dir, o.refresh_type.out_type())?;
            safeguard::sample_round(backend, &gguf, &self.prompts, k, &self.params)?
        };
        let trial = Trial {
            id: t.id,
            round: Round::from_samples(o.trial_steps, &samples),
            entropy_first: t.entropy_first,
            entropy_last: t.entropy_last,
            seconds: t.train_seconds + t0.elapsed().as_secs_f64(),
            update_seconds: t.update_seconds,
            responses: t.responses,
            settings: t.settings,
        };
        write_atomic(&t.record, serde_json::to_string_pretty(&trial)? + "\n")?;
        Ok(trial)
    }
}

/// A trial after [`HeldOut::train`]: complete already, or trained and awaiting its round.
pub enum Trained {
    Done(Trial),
    Ready(Box<ReadyTrial>),
}

/// A trained trial awaiting its held-out round ([`HeldOut::judge`]).
pub struct ReadyTrial {
    id: String,
    /// Where its record goes.
    record: PathBuf,
    run_dir: PathBuf,
    /// The trained weights (the adapter's directory under LoRA).
    trained: PathBuf,
    entropy_first: f64,
    entropy_last: f64,
    train_seconds: f64,
    update_seconds: f64,
    responses: usize,
    settings: Value,
}
