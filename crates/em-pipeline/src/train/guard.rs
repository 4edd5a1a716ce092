//! The safeguard inside a run: the watched prompts, the step-0 reference kept for a resumed run,
//! each round's verdict, the weights of the last round that passed, and the roll-back an alarm in
//! `stop` mode ends the run with.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Tensor, Var};
use em_sampler::SamplingParams;
use em_store::JsonlStore;
use em_train::Trainer;
use serde_json::{json, Value};

use super::options::{OnAlarm, SampleSettings, TrainOptions, WatchSettings};
use super::publish::Publisher;
use super::step_seed;
use super::store::write_final;
use crate::prompt::{PromptOptions, PromptRenderer, RenderedPrompt};
use crate::safeguard::{self, Baseline, Round, Verdict};
use crate::{Backend, Result};

/// The safeguard's decision, once made (`safeguard.json`): a rerun finds the run finished.
pub const SAFEGUARD_FILE: &str = "safeguard.json";
/// The step-0 reference rounds (`watch-baseline.json`), kept for a resumed run.
const BASELINE_FILE: &str = "watch-baseline.json";

/// The watched prompts of `settings`, rendered for the model at `model_dir` (None: no safeguard).
pub fn watched_prompts(
    settings: &WatchSettings,
    model_dir: &Path,
    prompt_options: &PromptOptions,
    backend: &dyn Backend,
) -> Result<Option<Vec<RenderedPrompt>>> {
    let Some(path) = &settings.watch else {
        return Ok(None);
    };
    if settings.watch_limit == 0 || settings.watch_samples == 0 || settings.watch_every == 0 {
        bail!("--watch-limit, --watch-samples and --watch-every must be positive");
    }
    let path = &crate::assets::pool_path(path)?;
    let mut problems = em_data::load_pool(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    problems.truncate(settings.watch_limit);
    if problems.is_empty() {
        bail!("{}: no prompts to watch", path.display());
    }
    let mut prompts = vec![];
    crate::with_vocab(backend, model_dir, &mut |vocab| {
        let renderer = PromptRenderer::new(vocab, prompt_options)?;
        prompts = renderer.render_all(&problems, path)?;
        Ok(())
    })?;
    Ok(Some(prompts))
}

/// What a round decided.
pub enum Decision {
    /// Train on (a `warn` alarm included).
    Go,
    /// End the run with the weights of the last round that passed.
    Stop { reason: String },
}

/// The safeguard of one run.
pub struct Guard {
    prompts: Vec<RenderedPrompt>,
    settings: WatchSettings,
    params: SamplingParams,
    baseline_path: PathBuf,
    baseline: Option<Baseline>,
    /// The answered shares of this run's rounds after step 0, for the trend.
    history: Vec<f64>,
    /// The weights of the last round that passed, and their step (`stop` runs only).
    last_good: Option<(usize, Vec<Tensor>)>,
}

fn snapshot(params: &[(String, Var)]) -> Result<Vec<Tensor>> {
    Ok(params
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?)
}

impl Guard {
    /// The guard of a run in `out` at step `start` over `params`. A resumed run finds its step-0
    /// reference and its trend in `out`; its own weights have not been judged yet, so the
    /// weights to fall back to are `earlier` (the newest earlier checkpoint or the base model,
    /// with its step), loaded only in `stop` mode.
    pub fn new(
        prompts: Vec<RenderedPrompt>,
        settings: &WatchSettings,
        sampling: &SampleSettings,
        out: &Path,
        start: usize,
        params: &[(String, Var)],
        earlier: impl FnOnce() -> Result<(usize, Vec<Tensor>)>,
    ) -> Result<Self> {
        let params_watch = SamplingParams {
            temperature: sampling.sample_temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            repetition_penalty: sampling.repetition_penalty,
            max_new_tokens: sampling.max_new_tokens,
            seed: step_seed(sampling.seed ^ 0x5741_5443_4845_5321, 0),
            ..SamplingParams::default()
        };
        let baseline_path = out.join(BASELINE_FILE);
        let baseline =
            match fs::read_to_string(&baseline_path) {
                Ok(text) if start > 0 => Some(serde_json::from_str(&text).with_context(|| {
                    format!("{}: not a watch baseline", baseline_path.display())
                })?),
                _ => None,
            };
        // From metrics.jsonl, already cut back to the checkpoint.
        let history = if start > 0 {
            JsonlStore::<Value>::read(&out.join("metrics.jsonl"))?
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
        // Only a `stop` run ever rolls back, so only it keeps a copy (one model's worth of memory).
        let last_good = match settings.on_alarm {
            OnAlarm::Warn => None,
            OnAlarm::Stop if start == 0 => Some((0, snapshot(params)?)),
            OnAlarm::Stop => Some(earlier()?),
        };
        Ok(Self {
            prompts,
            settings: settings.clone(),
            params: params_watch,
            baseline_path,
            baseline,
            history,
            last_good,
        })
    }

    /// Whether the weights before update `step` get a round.
    pub fn due(&self, step: usize) -> bool {
        (step - 1).is_multiple_of(self.settings.watch_every)
    }

    fn sample(
        &self,
        sampler: &dyn Backend,
        gguf: &Path,
        weights_step: usize,
        seed: u64,
    ) -> Result<Round> {
        let samples = safeguard::sample_round(
            sampler,
            gguf,
            &self.prompts,
            self.settings.watch_samples,
            &SamplingParams {
                seed,
                ..self.params.clone()
            },
        )?;
        Ok(Round::from_samples(weights_step, &samples))
    }

    /// The round of the weights `gguf` holds (after `weights_step` updates): the step-0
    /// reference the first time, else the verdict against it.
    pub fn check(
        &mut self,
        sampler: &dyn Backend,
        gguf: &Path,
        weights_step: usize,
    ) -> Result<Verdict> {
        let seed = self.params.seed;
        if let Some(b) = &self.baseline {
            let round = self.sample(sampler, gguf, weights_step, seed)?;
            let verdict = safeguard::judge(b, &round, &self.history);
            self.history.push(round.answered);
            return Ok(verdict);
        }
        let round = self.sample(sampler, gguf, weights_step, seed)?;
        let replicate = self.sample(sampler, gguf, weights_step, seed ^ 1)?;
        let b = Baseline { round, replicate };
        em_store::write_atomic(&self.baseline_path, serde_json::to_string(&b)? + "\n")?;
        let verdict = safeguard::judge(&b, &b.round, &[]);
        crate::drive::say(&format!(
            "watch: step-0 reference on {} prompts × {}: answered {:.3}, length {:.1}, repetition {:.3}; alarm past: {}",
            b.round.majority.len(),
            self.settings.watch_samples,
            b.round.answered,
            b.round.length,
            b.round.repetition,
            b.thresholds()
        ));
        self.baseline = Some(b);
        Ok(verdict)
    }

    /// A round before an update: the verdict, and whether the run goes on. A passed round in
    /// `stop` mode keeps its weights (`params`) as the ones to fall back to.
    pub fn before_update(
        &mut self,
        sampler: &dyn Backend,
        gguf: &Path,
        weights_step: usize,
        params: &[(String, Var)],
    ) -> Result<(Verdict, Decision)> {
        let verdict = self.check(sampler, gguf, weights_step)?;
        let decision = match (&verdict.alarm, self.settings.on_alarm) {
            (Some(reason), OnAlarm::Stop) => Decision::Stop {
                reason: reason.clone(),
            },
            (Some(reason), OnAlarm::Warn) => {
                crate::drive::say(&format!("safeguard (warn): {reason}"));
                Decision::Go
            }
            (None, OnAlarm::Stop) => {
                self.last_good = Some((weights_step, snapshot(params)?));
                Decision::Go
            }
            (None, OnAlarm::Warn) => Decision::Go,
        };
        Ok((verdict, decision))
    }

    /// The round after the last update (`steps`) on the weights `publisher` holds: recorded in
    /// metrics.jsonl, or in `stop` mode on an alarm the run rolled back (its `final/` returned).
    pub fn after_last(
        &mut self,
        publisher: &Publisher,
        trainer: &Trainer,
        params: &[(String, Var)],
        o: &TrainOptions,
    ) -> Result<Option<PathBuf>> {
        let steps = o.update.steps;
        let verdict = self.check(publisher.sampler(), publisher.model_path(), steps)?;
        let step = steps + 1;
        if let (Some(reason), OnAlarm::Stop) = (&verdict.alarm, self.settings.on_alarm) {
            let reason = reason.clone();
            return self
                .stop(
                    trainer,
                    params,
                    &o.model,
                    &o.out,
                    step,
                    &reason,
                    &verdict.signals,
                )
                .map(Some);
        }
        let mut line = json!({"step": step, "after_last_update": true, "watch": verdict.signals});
        if let Some(reason) = &verdict.alarm {
            line["safeguard"] = json!({"decision": "warn", "reason": reason});
        }
        JsonlStore::<Value>::open(&o.out.join("metrics.jsonl"))?
            .0
            .append(&line)?;
        Ok(None)
    }

    /// Ends the run on an alarm before update `step`: records the decision in metrics.jsonl, puts
    /// back the weights of the last round that passed, writes them as `final/` and the decision
    /// as `safeguard.json`.
    #[allow(clippy::too_many_arguments)]
    pub fn stop(
        &mut self,
        trainer: &Trainer,
        params: &[(String, Var)],
        source: &Path,
        out: &Path,
        step: usize,
        reason: &str,
        signals: &Value,
    ) -> Result<PathBuf> {
        let (good_step, weights) = self
            .last_good
            .take()
            .context("a stop run keeps a snapshot")?;
        let decision = json!({"decision": "stop", "reason": reason, "alarm_weights_step": step - 1,
            "final_weights_step": good_step});
        let line = json!({"step": step, "watch": signals, "safeguard": decision});
        JsonlStore::<Value>::open(&out.join("metrics.jsonl"))?
            .0
            .append(&line)?;
        for ((_, var), w) in params.iter().zip(&weights) {
            var.set(w)?;
        }
        let final_dir = write_final(out, trainer, source)?;
        let _ = fs::remove_dir_all(out.join(".sampling"));
        em_store::write_atomic(
            &out.join(SAFEGUARD_FILE),
            serde_json::to_string_pretty(&decision)? + "\n",
        )?;
        eprintln!(
            "safeguard: stopped before update {step}: {reason}; {} holds the weights after {good_step} updates",
            final_dir.display()
        );
        Ok(final_dir)
    }
}
