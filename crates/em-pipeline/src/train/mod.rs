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

mod guard;
mod options;
mod publish;
mod stages;
mod store;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use em_data::Problem;
use em_store::JsonlStore;
use serde_json::{json, Value};

pub use guard::{watched_prompts, Decision, Guard, SAFEGUARD_FILE};
pub use options::{
    default_parallel, AdapterKind, AdapterOptions, CheckpointSettings, ModelDtype, OnAlarm,
    RefreshType, SampleSettings, TrainOptions, UpdateSettings, WatchSettings,
};
pub use publish::{AdapterRefresh, Publish, Publisher};
pub use stages::{
    load_model, metrics_line, prepare, responses_for, run_identity, sample_update, take_update,
    train_config, update_params, Prepared, Start, StepRecord, Update,
};
pub use store::{latest_checkpoint, write_checkpoint, write_final, ADAPTER_GGUF};

use crate::prompt::{PromptOptions, PromptRenderer, RenderedPrompt};
use crate::{Backend, Result};

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

/// The prompt records to train on: those of `ids` (comma-separated) in that order, else the first
/// `shots` of the file.
pub fn load_prompts(path: &Path, ids: Option<&str>, shots: usize) -> Result<Vec<Problem>> {
    let path = &crate::assets::pool_path(path)?;
    let problems = em_data::load_pool(path)
        .or_else(|pool_err| em_data::load_suite(path).map_err(|_| pool_err))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    match ids {
        Some(ids) => ids
            .split(',')
            .map(str::trim)
            .map(|id| {
                problems
                    .iter()
                    .find(|p| p.id == id)
                    .cloned()
                    .with_context(|| format!("{}: no record with id \"{id}\"", path.display()))
            })
            .collect(),
        None => {
            if problems.is_empty() {
                anyhow::bail!("{}: no records", path.display());
            }
            if problems.len() < shots {
                anyhow::bail!(
                    "{}: {} records, fewer than --shots {shots}",
                    path.display(),
                    problems.len()
                );
            }
            Ok(problems.into_iter().take(shots).collect())
        }
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

/// The step's line on the terminal: in the step bar's message, or printed where bars are hidden.
fn report_step(bar: &indicatif::ProgressBar, r: &StepRecord, seconds: f64) {
    let lens = &r.update.lengths;
    let msg = format!(
        "step {}: entropy {:.4} grad_norm {:.3} len {:.0}{} {seconds:.1}s",
        r.step,
        r.update.stats.loss,
        r.update.stats.grad_norm,
        lens.iter().sum::<usize>() as f64 / lens.len().max(1) as f64,
        r.pass
            .map(|k| format!(" pass {k}/{}", r.samples.len()))
            .unwrap_or_default(),
    );
    if bar.is_hidden() {
        crate::drive::say(&msg);
    }
    bar.set_message(msg);
}

/// Trains (see the module documentation): the stages above, composed; returns the directory of
/// the trained model when the run is complete.
pub fn run(options: &TrainOptions, backend: &dyn Backend) -> Result<Option<PathBuf>> {
    let run = match prepare(options, backend)? {
        Start::Ready(run) => run,
        Start::Finished(final_dir) => return Ok(Some(final_dir)),
    };
    let o = &run.options;
    let steps = o.update.steps;
    let (mut trainer, start) = run.load_trainer()?;
    let params = trainer.model.parameters();
    let work = o.out.join(".sampling");
    let mut publisher = Publisher::new(
        backend,
        &o.model,
        &trainer.model,
        o.refresh_type,
        &work,
        o.adapter_base.as_deref(),
    )?;
    let mut guard = run.guard(start, &params)?;
    let metrics_path = o.out.join("metrics.jsonl");
    let save_every = o.checkpoints.save_every.unwrap_or(steps).max(1);
    let bar = crate::drive::steps_bar(steps as u64, start as u64);
    for step in start + 1..=steps {
        // Steps already taken by this invocation: step - start - 1.
        if o.stop_after.is_some_and(|k| step - start > k) {
            break;
        }
        let t0 = Instant::now();
        let written0 = store::bytes_written();
        // 1. The current weights, as llama.cpp will see them; the safeguard's round on them.
        let refresh = publisher.publish(&params)?;
        let gguf = publisher.model_path().to_path_buf();
        let mut verdict = None;
        if let Some(g) = guard.as_mut().filter(|g| g.due(step)) {
            let (v, decision) = g.before_update(publisher.sampler(), &gguf, step - 1, &params)?;
            if let Decision::Stop { reason } = decision {
                return g
                    .stop(
                        &trainer, &params, &o.model, &o.out, step, &reason, &v.signals,
                    )
                    .map(Some);
            }
            verdict = Some(v);
        }
        // 2. N responses from them.
        let t1 = Instant::now();
        let label = format!("step {step}/{steps}");
        let samples = sample_update(
            publisher.sampler(),
            &gguf,
            &run.prompts,
            &o.sampling,
            step,
            &label,
        )?;
        let sample_seconds = t1.elapsed().as_secs_f64();
        let pass = run.problems.iter().all(|p| !p.answers.is_empty()).then(|| {
            samples
                .iter()
                .filter(|s| em_grade::grade(&s.text, &run.problems[s.request].answers).correct)
                .count()
        });
        // 3. One update on them.
        let prompt_ids: Vec<&[u32]> = run.prompts.iter().map(|p| p.ids.as_slice()).collect();
        let update = take_update(
            &mut trainer,
            &prompt_ids,
            &samples,
            &format!("{label} update"),
        )?;
        let record = StepRecord {
            step,
            refresh: &refresh,
            samples: &samples,
            sample_seconds,
            update: &update,
            verdict: verdict.as_ref(),
            pass,
        };
        let mut line = metrics_line(o, &record);
        // Everything this update wrote before its metrics line and checkpoint.
        if let (Some(a), Some(b)) = (written0, store::bytes_written()) {
            line["written_bytes"] = json!(b - a);
        }
        line["seconds"] = json!(t0.elapsed().as_secs_f64());
        line["peak_rss_mb"] = json!(crate::peak_rss_mb());
        JsonlStore::<Value>::open(&metrics_path)?.0.append(&line)?;
        // 4. Checkpoint.
        if step % save_every == 0 || step == steps {
            write_checkpoint(&o.out, &trainer, &o.model, step, o.checkpoints.keep_last)?;
        }
        let seconds = t0.elapsed().as_secs_f64();
        report_step(&bar, &record, seconds);
        bar.inc(1);
    }
    bar.finish();
    let finished = latest_checkpoint(&o.out).is_some_and(|(s, _)| s >= steps);
    if let (true, Some(g)) = (finished, guard.as_mut()) {
        // The last update's weights get their round too.
        publisher.publish(&params)?;
        if let Some(final_dir) = g.after_last(&publisher, &trainer, &params, o)? {
            return Ok(Some(final_dir));
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    if !finished {
        return Ok(None);
    }
    let final_dir = write_final(&o.out, &trainer, &o.model)?;
    eprintln!("{}: trained model", final_dir.display());
    Ok(Some(final_dir))
}
