//! The stages of a run, each usable alone: [`prepare`] the run and its identity, load its
//! trainer ([`Prepared::load_trainer`]), publish the weights ([`super::Publisher`]), watch them
//! ([`super::Guard`]), [`sample_update`] through `drive`, [`take_update`], record it
//! ([`metrics_line`]) and checkpoint ([`super::write_checkpoint`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use em_convert::refresh::RefreshStats;
use em_data::Problem;
use em_sampler::{Request, Sample, SamplingParams};
use em_store::Manifest;
use em_train::lora::{AdapterSource, LoraConfig};
use em_train::models::CausalLm;
use em_train::{AdamWConfig, EmOptions, Sequence, TrainConfig, Trainer, UpdateStats};
use serde_json::{json, Value};

use super::guard::{watched_prompts, Guard, SAFEGUARD_FILE};
use super::options::{RefreshType, SampleSettings, TrainOptions, UpdateSettings};
use super::store::{checkpoints, latest_checkpoint, remove_leftovers, truncate_metrics};
use super::{load_prompts, render_prompt, step_seed};
use crate::prompt::RenderedPrompt;
use crate::safeguard::Verdict;
use crate::{Backend, Result};

/// A run ready to train: its prompt rendered, its output directory claimed.
pub struct Prepared {
    pub options: TrainOptions,
    /// The prompts trained on (one, or k for k-shot EM), and each rendered.
    pub problems: Vec<Problem>,
    pub prompts: Vec<RenderedPrompt>,
    /// The safeguard's prompts, rendered (None: no safeguard).
    pub watched: Option<Vec<RenderedPrompt>>,
    pub lora: Option<LoraConfig>,
}

/// What [`prepare`] found.
pub enum Start {
    Ready(Box<Prepared>),
    /// The safeguard already ended this run: its `final/`.
    Finished(PathBuf),
}

/// Settings a resumed run must share with the run that wrote the checkpoints.
pub fn run_identity(o: &TrainOptions, backend: &dyn Backend) -> Value {
    let (s, u) = (&o.sampling, &o.update);
    let mut v = json!({
        "prompt_options": o.prompt_options, "backend": backend.identity(),
        "seed": s.seed, "samples": s.samples, "lr": u.lr, "beta1": u.beta1,
        "beta2": u.beta2, "adam_eps": u.adam_eps, "weight_decay": u.weight_decay,
        "max_grad_norm": u.max_grad_norm, "temperature": u.temperature,
        "sample_temperature": s.sample_temperature, "top_p": s.top_p, "top_k": s.top_k,
        "repetition_penalty": s.repetition_penalty, "max_new_tokens": s.max_new_tokens,
        "dtype": format!("{:?}", u.dtype), "prompt_id": o.prompt_id,
        "device": u.device, "refresh_type": o.refresh_type,
        "train_pad_row": u.train_pad_row,
    });
    // Only when k-shot, so that one-shot runs made before it existed still resume.
    if o.shots != 1 {
        v["shots"] = json!(o.shots);
    }
    // Only when on, so that runs made before the safeguard existed still resume.
    let w = &o.safeguard;
    if w.watch.is_some() {
        v["watch"] = json!({"limit": w.watch_limit, "samples": w.watch_samples,
            "every": w.watch_every, "on_alarm": w.on_alarm});
    }
    if o.adapter.kind.is_some() {
        let a = &o.adapter;
        v["adapter"] = json!({"kind": a.kind, "rank": a.rank, "alpha": a.alpha,
            "targets": a.targets, "on_policy": o.refresh_type != RefreshType::Q8_0});
    }
    v
}

fn check_options(o: &TrainOptions, backend: &dyn Backend) -> Result<Option<LoraConfig>> {
    if !backend.samples_local_gguf() {
        bail!("train samples on-policy from the weights it is training, so it needs an in-process backend (llama.cpp), not a server");
    }
    let (s, u) = (&o.sampling, &o.update);
    if s.samples == 0 || u.steps == 0 || s.max_new_tokens == 0 || o.shots == 0 {
        bail!("--samples, --steps, --max-new-tokens and --shots must be positive");
    }
    if o.shots != 1 && o.prompt_id.is_some() {
        bail!("--shots and --prompt-id both choose the prompts: give one (--prompt-id a,b,c is k-shot too)");
    }
    if !(u.temperature.is_finite() && u.temperature > 0.0) {
        bail!("--temperature {} is not a finite number > 0", u.temperature);
    }
    for f in ["config.json", "tokenizer.json"] {
        let p = o.model.join(f);
        if !p.is_file() {
            bail!("{}: missing (the model directory needs it)", p.display());
        }
    }
    let lora = o.lora()?;
    if lora.is_none() && o.refresh_type == RefreshType::Q8_0 {
        bail!("--refresh-type q8_0 needs --adapter lora (a full refresh rewrites float tensors in place)");
    }
    Ok(lora)
}

/// Checks the options, renders the prompt and the watched prompts, and claims the output
/// directory with the run's manifest (identity: the model's content hash, the prompt file, the
/// settings that change the numbers; info: every resolved setting). A run the safeguard ended
/// is [`Start::Finished`].
pub fn prepare(options: &TrainOptions, backend: &dyn Backend) -> Result<Start> {
    let o = options;
    let lora = check_options(o, backend)?;
    let problems = load_prompts(&o.prompt, o.prompt_id.as_deref(), o.shots)?;
    if problems.len() > o.sampling.samples {
        bail!(
            "{} prompts but --samples {}: each update needs a response to every prompt",
            problems.len(),
            o.sampling.samples
        );
    }
    let prompts = problems
        .iter()
        .map(|p| render_prompt(backend, &o.model, p, &o.prompt_options))
        .collect::<Result<Vec<_>>>()?;
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    say_window_note(&o.model, longest + o.sampling.max_new_tokens);
    let watched = watched_prompts(&o.safeguard, &o.model, &o.prompt_options, backend)?;
    let mut manifest = Manifest::new(
        "train",
        em_store::model_identity(&o.model)?,
        run_identity(o, backend),
    );
    manifest.inputs.insert(
        "prompt".into(),
        em_store::file_identity(&crate::assets::pool_path(&o.prompt)?)?,
    );
    if let Some(path) = &o.safeguard.watch {
        manifest.inputs.insert(
            "watch".into(),
            em_store::file_identity(&crate::assets::pool_path(path)?)?,
        );
    }
    // Every setting of the run as resolved (not where it is written, nor this invocation's
    // `fresh` and `stop_after`): what a run file reproducing it would hold.
    let mut settings = o.to_json();
    if let Some(map) = settings.as_object_mut() {
        for key in ["out", "fresh", "stop_after"] {
            map.remove(key);
        }
    }
    let (first, rendered) = (&problems[0], &prompts[0]);
    manifest.info = json!({ "tool": crate::TOOL, "prompt_id": first.id,
        "prompt_text": rendered.text, "prompt_ids": rendered.ids, "settings": settings });
    if problems.len() > 1 {
        manifest.info["prompts"] = problems
            .iter()
            .zip(&prompts)
            .map(|(p, r)| json!({"id": p.id, "text": r.text, "ids": r.ids}))
            .collect();
    }
    manifest.claim(&o.out, o.fresh)?;
    remove_leftovers(&o.out)?;
    let final_dir = o.out.join("final");
    if let Ok(text) = fs::read_to_string(o.out.join(SAFEGUARD_FILE)) {
        if final_dir.join("config.json").is_file()
            || final_dir.join(em_convert::lora::CONFIG_FILE).is_file()
        {
            eprintln!(
                "{}: the safeguard ended this run: {}",
                o.out.display(),
                text.trim()
            );
            return Ok(Start::Finished(final_dir));
        }
    }
    Ok(Start::Ready(Box::new(Prepared {
        options: o.clone(),
        problems,
        prompts,
        watched,
        lora,
    })))
}

/// The trainer's settings from the update settings (`vocab`: the model's vocabulary size).
pub fn train_config(u: &UpdateSettings, vocab: usize) -> TrainConfig {
    TrainConfig {
        optimizer: AdamWConfig {
            lr: u.lr,
            betas: (u.beta1, u.beta2),
            eps: u.adam_eps,
            weight_decay: u.weight_decay,
        },
        max_grad_norm: u.max_grad_norm,
        em: EmOptions {
            recompute: u.recompute,
            ..EmOptions::new(u.temperature, u.micro_batch, vocab)
        },
    }
}

/// The model a run trains: the HF directory `dir` (default: `source`), or under an adapter the
/// base with a fresh adapter seeded by `seed` (no `dir`) or the adapter saved in `dir`.
pub fn load_model(
    source: &Path,
    lora: Option<&LoraConfig>,
    seed: u64,
    dir: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<CausalLm> {
    Ok(match (lora, dir) {
        (None, dir) => CausalLm::from_hf_dir(dir.unwrap_or(source), dtype, device)?,
        (Some(lora), None) => CausalLm::from_hf_dir_with_adapter(
            source,
            dtype,
            device,
            lora.clone(),
            AdapterSource::Init { seed },
        )?,
        (Some(_), Some(dir)) => em_train::lora::load_adapted(source, dir, dtype, device)?,
    })
}

impl Prepared {
    /// The trainer and the step it stands at: resumed from the output's latest checkpoint (its
    /// later metrics lines dropped), else fresh.
    pub fn load_trainer(&self) -> Result<(Trainer, usize)> {
        let (o, u) = (&self.options, &self.options.update);
        let dtype = u.dtype.dtype();
        let device = em_train::parse_device(&u.device)?;
        let vocab =
            em_train::models::ModelConfig::from_file(&o.model.join("config.json"))?.vocab_size;
        let config = train_config(u, vocab);
        let metrics_path = o.out.join("metrics.jsonl");
        let (mut trainer, start) = match latest_checkpoint(&o.out) {
            Some((step, dir)) => {
                let trainer = if self.lora.is_some() {
                    Trainer::resume_adapter(&o.model, &dir, config, dtype, &device)
                } else {
                    Trainer::resume(&dir, config, dtype, &device)
                }
                .with_context(|| format!("{}: cannot resume", dir.display()))?;
                truncate_metrics(&metrics_path, step)?;
                eprintln!("resuming from {} (step {step})", dir.display());
                (trainer, step)
            }
            None => {
                truncate_metrics(&metrics_path, 0)?;
                let model = load_model(
                    &o.model,
                    self.lora.as_ref(),
                    o.sampling.seed,
                    None,
                    dtype,
                    &device,
                )?;
                (Trainer::new(model, config), 0)
            }
        };
        if u.train_pad_row {
            trainer.model.set_padding_idx(None);
        }
        if start >= u.steps {
            eprintln!(
                "{}: already at step {start} of {}",
                o.out.display(),
                u.steps
            );
        }
        Ok((trainer, start))
    }

    /// The run's safeguard at step `start` over the trainer's `params` (None without `--watch`).
    pub fn guard(
        &self,
        start: usize,
        params: &[(String, candle_core::Var)],
    ) -> Result<Option<Guard>> {
        let Some(prompts) = &self.watched else {
            return Ok(None);
        };
        let o = &self.options;
        // A resumed run falls back to its newest earlier checkpoint, else the base model.
        let earlier = || -> Result<(usize, Vec<Tensor>)> {
            let (step, dir) = checkpoints(&o.out)
                .into_iter()
                .find(|(s, d)| *s < start && d.join("state.json").is_file())
                .unwrap_or((0, o.model.clone()));
            let (dtype, device) = (
                o.update.dtype.dtype(),
                em_train::parse_device(&o.update.device)?,
            );
            let dir_arg = (step > 0).then_some(dir.as_path());
            let earlier = load_model(
                &o.model,
                self.lora.as_ref(),
                o.sampling.seed,
                dir_arg,
                dtype,
                &device,
            )?;
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
            Ok((step, weights))
        };
        Guard::new(
            prompts.clone(),
            &o.safeguard,
            &o.sampling,
            &o.out,
            start,
            params,
            earlier,
        )
        .map(Some)
    }
}

/// The sampling settings of update `step`'s responses (seeded from the run's seed and the step,
/// so a resumed run draws what an uninterrupted one would).
pub fn update_params(s: &SampleSettings, step: usize) -> SamplingParams {
    SamplingParams {
        temperature: s.sample_temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        repetition_penalty: s.repetition_penalty,
        max_new_tokens: s.max_new_tokens,
        seed: step_seed(s.seed, step),
        ..SamplingParams::default()
    }
}

/// How many of an update's `n` responses go to prompt `j` of `k`: `n / k`, the remainder to
/// the first prompts.
pub fn responses_for(n: usize, k: usize, j: usize) -> usize {
    n / k + usize::from(j < n % k)
}

/// Samples update `step`'s responses to `prompts` (split by [`responses_for`]) from the model
/// file `gguf`, with a progress line (responses done, tokens/s). Each sample's `request` is its
/// prompt's index. The first prompt's seed is a one-shot run's; the others' derive from it.
pub fn sample_update(
    sampler: &dyn Backend,
    gguf: &Path,
    prompts: &[RenderedPrompt],
    settings: &SampleSettings,
    step: usize,
    label: &str,
) -> Result<Vec<Sample>> {
    let n = settings.samples;
    let k = prompts.len();
    let params = update_params(settings, step);
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(j, p)| Request {
            prompt: p.to_prompt(),
            n_samples: responses_for(n, k, j),
            params: SamplingParams {
                seed: match j {
                    0 => params.seed,
                    j => crate::item_seed(params.seed, &format!("shot-{j}")),
                },
                ..params.clone()
            },
        })
        .collect();
    let bar = crate::drive::progress_bar(n as u64, 0, "responses", label);
    let mut by_prompt: Vec<Vec<Sample>> = vec![vec![]; k];
    sampler.with_sampler(gguf, &mut |sampler| {
        crate::drive::sample_each(
            sampler,
            &requests,
            &bar,
            crate::drive::Count::Responses,
            &mut |j, samples| {
                by_prompt[j] = samples;
                Ok(true)
            },
        )?;
        Ok(())
    })?;
    let mut out = Vec::with_capacity(n);
    for (j, samples) in by_prompt.into_iter().enumerate() {
        if samples.len() != requests[j].n_samples {
            bail!(
                "{}: the sampler returned {} of {} responses to prompt {j}",
                gguf.display(),
                samples.len(),
                requests[j].n_samples
            );
        }
        out.extend(samples.into_iter().map(|s| Sample { request: j, ..s }));
    }
    Ok(out)
}

/// What one update did, for its metrics line.
pub struct Update {
    pub stats: UpdateStats,
    /// Each trained response's length, tokens.
    pub lengths: Vec<usize>,
    /// Prompt and response tokens trained on.
    pub tokens: usize,
    pub seconds: f64,
}

/// Takes one optimizer update on the token-mean entropy of `samples` (empty responses skipped),
/// each after its prompt's ids (`prompt_ids[sample.request]`), with a bar over its forward and
/// backward passes.
pub fn take_update(
    trainer: &mut Trainer,
    prompt_ids: &[&[u32]],
    samples: &[Sample],
    label: &str,
) -> Result<Update> {
    let t0 = Instant::now();
    let sequences: Vec<Sequence> = samples
        .iter()
        .filter(|s| !s.tokens.is_empty())
        .map(|s| Sequence {
            prompt_ids: prompt_ids[s.request].to_vec(),
            response_ids: s.tokens.clone(),
        })
        .collect();
    let micro_batches = sequences
        .len()
        .div_ceil(trainer.config.em.micro_batch.max(1));
    let passes = crate::drive::progress_bar(2 * micro_batches as u64, 0, "passes", label);
    let stats = trainer.update_observed(&sequences, &mut |p| {
        passes.inc(1);
        let phase = if p.backward { "backward" } else { "forward" };
        passes.set_message(format!(
            "micro-batch {}/{} {phase} done",
            p.micro_batch, p.micro_batches
        ));
    })?;
    passes.finish_and_clear();
    Ok(Update {
        stats,
        lengths: sequences.iter().map(|s| s.response_ids.len()).collect(),
        tokens: sequences.iter().map(Sequence::len).sum(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What an update's metrics line reports beyond the update itself.
pub struct StepRecord<'a> {
    pub step: usize,
    pub refresh: &'a RefreshStats,
    pub samples: &'a [Sample],
    pub sample_seconds: f64,
    pub update: &'a Update,
    pub verdict: Option<&'a Verdict>,
    /// Responses graded right, where the prompt has answers.
    pub pass: Option<usize>,
}

/// Update `r.step`'s line of metrics.jsonl (timing and memory fields added by the caller).
pub fn metrics_line(o: &TrainOptions, r: &StepRecord) -> Value {
    let (stats, lens) = (&r.update.stats, &r.update.lengths);
    let generated: usize = lens.iter().sum();
    let mut line = json!({
        "step": r.step,
        "loss": stats.loss,
        "entropy": stats.loss,
        "grad_norm": stats.grad_norm,
        "lr": o.update.lr,
        "n_responses": lens.len(),
        "n_tokens": stats.n_tokens,
        "resp_len_mean": generated as f64 / lens.len().max(1) as f64,
        "resp_len_min": lens.iter().min().copied().unwrap_or(0),
        "resp_len_max": lens.iter().max().copied().unwrap_or(0),
        "mean_max_logit": stats.mean_max_logit,
        "sample_seed": step_seed(o.sampling.seed, r.step),
        "responses_seen": r.step * o.sampling.samples,
        "refresh_type": o.refresh_type,
        "refresh_bytes": r.refresh.bytes,
        "refresh_tensors": r.refresh.tensors,
        "refresh_seconds": r.refresh.seconds,
        "sample_seconds": r.sample_seconds,
        "train_seconds": r.update.seconds,
        "sample_tokens_per_s": generated as f64 / r.sample_seconds.max(1e-9),
        "train_tokens_per_s": r.update.tokens as f64 / r.update.seconds.max(1e-9),
    });
    if let Some(v) = r.verdict {
        line["watch"] = v.signals.clone();
        if let Some(reason) = &v.alarm {
            line["safeguard"] = json!({"decision": "warn", "reason": reason});
        }
    }
    if let Some(k) = r.pass {
        let (lo, hi) = em_grade::wilson_interval(k, r.samples.len());
        line["pass_rate"] = json!(k as f64 / r.samples.len().max(1) as f64);
        line["pass_ci95"] = json!([lo, hi]);
    }
    line
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

#[cfg(test)]
mod tests {
    #[test]
    fn k_shot_responses_split_evenly_the_remainder_first() {
        let split = |n, k| {
            (0..k)
                .map(|j| super::responses_for(n, k, j))
                .collect::<Vec<_>>()
        };
        assert_eq!(split(64, 1), [64]);
        assert_eq!(split(64, 4), [16, 16, 16, 16]);
        assert_eq!(split(10, 4), [3, 3, 2, 2]);
        assert_eq!(split(64, 16).iter().sum::<usize>(), 64);
    }
}
