//! What the trial rule costs (`demo --trial-cost`): `select`'s trials of the demo's trial rule
//! (its candidates, its settings) against one full EM run, both timed in the same command.
//!
//! Each repetition runs a full run, then the selection, then another full run, all from scratch
//! in `<dir>/cost` (never resumed: a resumed run would time nothing); the selection is divided by
//! the mean of the two runs around it, so drift in the machine's load between repetitions cancels.
//! A full run is `train::run` whole (set-up, 10 updates of 64 responses, checkpoint and `final/`),
//! without the safeguard; the trials are `select`'s, and "selection" adds its base rounds.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use em_pipeline::screen::{self, Rule};
use em_pipeline::select;
use em_pipeline::Result;
use em_store::write_atomic;
use serde_json::json;

use super::Demo;

/// Repetitions of (full run, selection, full run).
const REPS: usize = 3;

/// Measures (see the module documentation); writes `trial-cost.md` and `.json` in `out`.
pub(super) fn run(demo: &Demo, out: &Path) -> Result<()> {
    let screened = screen::run(&super::prompts::screen_options(demo), demo.backend)?;
    let raw: Vec<String> = std::fs::read_to_string(&demo.data.pool_path)?
        .lines()
        .map(String::from)
        .collect();
    let first = screen::candidates(&screened, Rule::Doubt, 1)
        .first()
        .map(|r| r.id.clone())
        .context("no prompt qualifies under the doubt rule")?;
    let line = demo
        .data
        .pool
        .iter()
        .position(|p| p.id == first)
        .map(|k| raw[k].clone())
        .context("the first candidate is in the pool")?;
    let dir = demo.dir.join("cost");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let prompt_file = dir.join("prompt.jsonl");
    write_atomic(&prompt_file, format!("{line}\n"))?;
    let full = |name: String| -> Result<f64> {
        let t0 = Instant::now();
        super::study::full_run(demo, &prompt_file, &dir.join(name), 3e-5, 1, 0)?;
        Ok(t0.elapsed().as_secs_f64())
    };
    let mut rows = vec![];
    for rep in 0..REPS {
        let before = full(format!("full-{rep}a"))?;
        let mut o = super::prompts::trial_options(demo);
        o.out = dir.join(format!("select-{rep}"));
        let t0 = Instant::now();
        select::claim(&o, demo.backend)?;
        let selection = select::try_candidates(&o, demo.backend, &screened, &demo.data.pool, &raw)?;
        let selection_seconds = t0.elapsed().as_secs_f64();
        let after = full(format!("full-{rep}b"))?;
        let full_mean = (before + after) / 2.0;
        println!(
            "cost: rep {}: full runs {before:.1} s and {after:.1} s; {} trials {:.1} s ({:.2}×); the selection with its base rounds {selection_seconds:.1} s ({:.2}×)",
            rep + 1,
            selection.ranking.len(),
            selection.trials_seconds,
            selection.trials_seconds / full_mean,
            selection_seconds / full_mean,
        );
        rows.push(json!({
            "full_before": before, "full_after": after, "candidates": selection.ranking.len(),
            "trials": selection.trials_seconds, "selection": selection_seconds,
            "trials_ratio": selection.trials_seconds / full_mean,
            "selection_ratio": selection_seconds / full_mean,
        }));
    }
    let median = |key: &str| {
        let mut xs: Vec<f64> = rows.iter().filter_map(|r| r[key].as_f64()).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let o = super::prompts::trial_options(demo);
    let md = format!(
        "# What the trial rule costs on {}\n\n{} candidates by `doubt`, each {} updates × {} responses (LoRA, lr {:e}) and a held-out round of {} prompts × {}, against one full run ({} updates × {} responses, no safeguard), timed in the same command, {REPS} repetitions of (full run, selection, full run).\n\n| rep | full run before (s) | trials (s) | selection with base rounds (s) | full run after (s) | trials / full | selection / full |\n|---|---|---|---|---|---|---|\n{}\nMedian: the trials take **{:.2}×** one full run; the whole selection with its base rounds {:.2}× (the screen, which every rule needs, not counted).\n",
        demo.dir.file_name().unwrap_or_default().to_string_lossy(),
        o.candidates,
        o.trial_steps,
        o.trial_samples,
        o.trial_lr,
        o.held_out_limit,
        o.held_out_samples,
        demo.plan.steps,
        demo.plan.samples_per_update,
        rows.iter()
            .enumerate()
            .map(|(i, r)| format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                i + 1,
                r["full_before"].as_f64().unwrap_or(f64::NAN),
                r["trials"].as_f64().unwrap_or(f64::NAN),
                r["selection"].as_f64().unwrap_or(f64::NAN),
                r["full_after"].as_f64().unwrap_or(f64::NAN),
                r["trials_ratio"].as_f64().unwrap_or(f64::NAN),
                r["selection_ratio"].as_f64().unwrap_or(f64::NAN),
            ))
            .collect::<Vec<_>>()
            .join("\n"),
        median("trials_ratio"),
        median("selection_ratio"),
    );
    print!("{md}");
    let stem = out.join("trial-cost");
    write_atomic(&stem.with_extension("md"), &md)?;
    write_atomic(
        &stem.with_extension("json"),
        serde_json::to_string_pretty(&json!({
            "reps": rows, "trials_ratio_median": median("trials_ratio"),
            "selection_ratio_median": median("selection_ratio"), "settings": o.trial_settings(),
        }))? + "\n",
    )?;
    Ok(())
}
