//! k-shot EM at the same responses per update (part of `demo --trial-study`): the label-free
//! `doubt` rule's first k prompts for k = 1, 4 and 16, each trained over 3 seeds (`samples / k`
//! responses per prompt per update), greedy on the test split against the base, paired over
//! items, with the spread over seeds.

use std::path::Path;

use em_convert::OutType;
use em_pipeline::eval::{mean_score, ItemResult};
use em_pipeline::screen::{self, PromptResult, Rule};
use em_pipeline::{sampling_model, Result};
use em_store::write_atomic;

use super::evaluate::{eval_setting, setting};
use super::study::full_run;
use super::Demo;

/// The shots compared, and the seeds of each.
const SHOTS: [usize; 3] = [1, 4, 16];
const SEEDS: u64 = 3;

/// Trains and evaluates every (k, seed) at `lr` (resuming what is done); returns the report's
/// markdown section.
pub(super) fn run(
    demo: &Demo,
    base_gguf: &Path,
    screened: &[PromptResult],
    raw: &[String],
    lr: f64,
) -> Result<String> {
    let base = eval_setting(
        demo,
        &demo.subject,
        base_gguf,
        &demo.data.test,
        &setting("base", 0.0, 1, None),
        &demo.dir.join("test"),
    )?;
    let base_scores: Vec<f64> = base.iter().map(ItemResult::score).collect();
    let max_k = *SHOTS.iter().max().expect("shots");
    let prompts = screen::candidates(screened, Rule::Doubt, max_k);
    let dir = demo.dir.join("study/k-shot");
    std::fs::create_dir_all(&dir)?;
    let mut md = format!(
        "\n## k-shot EM at {} responses per update\n\nThe label-free `doubt` rule's first k prompts, each update sampling {}/k responses to each; lr {lr:e}, {} updates, {SEEDS} seeds; greedy accuracy on the {} test problems against the base's {:.3}, paired over items (the mean of the seeds' per-item scores).\n\n| k | prompts | gain (95% CI) | per seed | seed spread (sd) |\n|---|---|---|---|---|\n",
        demo.plan.samples_per_update,
        demo.plan.samples_per_update,
        demo.plan.steps,
        base.len(),
        mean_score(&base)
    );
    for k in SHOTS {
        if prompts.len() < k {
            md += &format!(
                "| {k} | only {} prompts qualify | — | — | — |\n",
                prompts.len()
            );
            continue;
        }
        let file = dir.join(format!("prompts-{k}.jsonl"));
        let mut text = String::new();
        for p in &prompts[..k] {
            let i = demo
                .data
                .pool
                .iter()
                .position(|q| q.id == p.id)
                .expect("a screened prompt is in the pool");
            text += &format!("{}\n", raw[i]);
        }
        write_atomic(&file, text)?;
        let mut per_seed = vec![];
        let mut mean_items = vec![0.0; base_scores.len()];
        for seed in 0..SEEDS {
            let run_dir = dir.join(format!("k{k}-seed{seed}"));
            let tuned = full_run(demo, &file, &run_dir, lr, k, seed)?;
            let gguf = sampling_model(demo.backend, &tuned, &run_dir.join("gguf"), OutType::F32)?;
            let items = eval_setting(
                demo,
                &tuned,
                &gguf,
                &demo.data.test,
                &setting("test", 0.0, 1, None),
                &run_dir.join("test"),
            )?;
            per_seed.push(mean_score(&items));
            for (m, it) in mean_items.iter_mut().zip(&items) {
                *m += it.score() / SEEDS as f64;
            }
        }
        let (d, lo, hi) = em_grade::paired_difference(&mean_items, &base_scores);
        let mean = per_seed.iter().sum::<f64>() / per_seed.len() as f64;
        let sd = (per_seed.iter().map(|a| (a - mean).powi(2)).sum::<f64>()
            / (per_seed.len() - 1).max(1) as f64)
            .sqrt();
        md += &format!(
            "| {k} | {} | {d:+.3} ({lo:+.3}, {hi:+.3}) | {} | {sd:.3} |\n",
            if k == 1 {
                prompts[0].id.clone()
            } else {
                format!("{} … {}", prompts[0].id, prompts[k - 1].id)
            },
            per_seed
                .iter()
                .map(|a| format!("{a:.3}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    Ok(md)
}
