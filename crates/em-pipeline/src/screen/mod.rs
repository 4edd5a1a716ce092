//! Screening: sample k answers per pool prompt, grade them, rank the prompts by the
//! variance p(1−p) of their pass rate and choose the one-shot prompt (METHOD.md, "Choosing the
//! prompt").
//!
//! Output directory:
//! - `manifest.json`: the model, the pool and the settings; a rerun that differs is refused.
//! - `prompts.jsonl`: one line per screened prompt, appended and fsynced as each finishes; a rerun
//!   of the same command skips the prompts already there (a torn last line is cut and redone).
//! - `ranking.json`, `chosen.jsonl`: written at the end, atomically (temporary file + rename).
//!
//! [`run`] composes the stages, each usable alone: load the [`Pool`] and render its prompts,
//! [`claim`] the output directory, [`sample`] the prompts still to do into [`PromptResult`]s, and
//! [`finish`]: [`rank`], [`choose`] by the [`Rule`] and write the ranking and the choice.

mod options;
mod pool;
mod ranking;
mod report;

use em_sampler::{Request, SamplingParams};
use em_store::{JsonlStore, Manifest};
use serde_json::json;

pub use options::{settings, ScreenOptions};
pub use pool::Pool;
pub use ranking::{candidates, choose, rank, PromptResult, Rule};
pub use report::finish;

use crate::{Backend, Result};

/// A stable per-prompt seed (the same derivation `eval` uses per item).
fn prompt_seed(seed: u64, id: &str) -> u64 {
    crate::item_seed(seed, id)
}

/// Claims the output directory with the screen's manifest: the model, the pool and the
/// [`settings`]; the prompt style and the first prompt as the model sees it for information.
pub fn claim(args: &ScreenOptions, backend: &dyn Backend, pool: &Pool) -> Result<()> {
    let mut manifest = Manifest::new(
        "screen",
        em_store::model_identity(&args.model)?,
        settings(args, backend),
    );
    manifest
        .inputs
        .insert("pool".into(), em_store::file_identity(&pool.path)?);
    manifest.info = json!({
        "tool": crate::TOOL,
        "style": pool.style,
        "first_prompt": pool.problems.first().map(|p| json!({"id": p.id, "text": pool.prompts[0].text, "ids": pool.prompts[0].ids})),
    });
    manifest.claim(&args.out, args.fresh)?;
    Ok(())
}

/// The sampling request of each pool problem in `todo` (indices): k answers, seeded per prompt.
fn requests(args: &ScreenOptions, pool: &Pool, todo: &[usize]) -> Vec<Request> {
    todo.iter()
        .map(|&i| Request {
            prompt: pool.prompts[i].to_prompt(),
            n_samples: args.k,
            params: SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                repetition_penalty: args.repetition_penalty,
                max_new_tokens: args.max_new_tokens,
                seed: prompt_seed(args.seed, &pool.problems[i].id),
                logprobs: true,
                stop: em_sampler::EVAL_STOP.map(String::from).to_vec(),
                em_inf: args.em_inf,
                ..SamplingParams::default()
            },
        })
        .collect()
}

/// Samples the pool problems in `todo` (indices), grading each prompt as it finishes, appending
/// it to `store` and `results` and printing its line; returns how many it screened (fewer where
/// `--stop-after` stops it).
pub fn sample(
    args: &ScreenOptions,
    backend: &dyn Backend,
    pool: &Pool,
    todo: &[usize],
    store: &mut JsonlStore<PromptResult>,
    results: &mut Vec<PromptResult>,
) -> Result<usize> {
    let requests = requests(args, pool, todo);
    let gguf = crate::sampling_model(backend, &args.model, &args.out, args.quant)?;
    let total = pool.problems.len();
    let bar = crate::drive::progress_bar(
        total as u64,
        (total - todo.len()) as u64,
        "prompts",
        "screen",
    );
    let mut new = 0usize;
    let mut stats = None;
    backend.with_sampler(&gguf, &mut |sampler| {
        stats = Some(crate::drive::sample_each(
            sampler,
            &requests,
            &bar,
            crate::drive::Count::Requests,
            &mut |request, samples| {
                let problem = &pool.problems[todo[request]];
                let r = PromptResult::from_samples(problem, &samples, args.keep_responses);
                store.append(&r)?;
                let unfinished = r.unfinished_each.iter().filter(|&&u| u).count();
                bar.println(format!(
                    "{:>12}  {}/{}  p = {:.2} [{:.2}, {:.2}]  H = {}{}",
                    r.id,
                    r.correct,
                    r.n,
                    r.pass_rate,
                    r.ci95.0,
                    r.ci95.1,
                    report::show(r.mean_entropy),
                    match unfinished {
                        0 => String::new(),
                        u => format!("  {u} unfinished at the token limit"),
                    }
                ));
                results.push(r);
                new += 1;
                Ok(args.stop_after.is_none_or(|n| new < n))
            },
        )?);
        Ok(())
    })?;
    if let Some(stats) = stats {
        eprintln!(
            "screen: {} tokens in {:.1}s ({:.1} tok/s); prompt tokens decoded {} of {} without sharing",
            stats.generated_tokens,
            stats.elapsed.as_secs_f64(),
            stats.generated_tokens as f64 / stats.elapsed.as_secs_f64().max(1e-9),
            stats.prompt_tokens,
            stats.prompt_tokens_unshared
        );
    }
    Ok(new)
}

/// Runs the screen (see the module documentation) and returns the ranked prompts.
pub fn run(args: &ScreenOptions, backend: &dyn Backend) -> Result<Vec<PromptResult>> {
    if args.k == 0 {
        anyhow::bail!("--k must be at least 1");
    }
    let pool = Pool::load(args, backend)?;
    claim(args, backend, &pool)?;
    let (mut store, mut results) =
        JsonlStore::<PromptResult>::open(&args.out.join("prompts.jsonl"))?;
    let todo = pool.todo(&results);
    let total = pool.problems.len();
    eprintln!(
        "screen: {} prompts, {} already screened, {} to go, k = {}; prompt style {}",
        total,
        total - todo.len(),
        todo.len(),
        args.k,
        pool.style
    );
    if !todo.is_empty() {
        let new = sample(args, backend, &pool, &todo, &mut store, &mut results)?;
        if results.len() < total {
            eprintln!("screen: stopped early after {new} prompts; rerun to resume");
            return Ok(results);
        }
    }
    finish(args, &pool.problems, &pool.raw, results)
}
