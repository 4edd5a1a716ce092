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
use serde::Serialize;
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
    let mut reps: Vec<Rep> = vec![];
    for rep in 0..REPS {
        let full_before = full(format!("full-{rep}a"))?;
        let mut o = super::prompts::trial_options(demo);
        o.out = dir.join(format!("select-{rep}"));
        let t0 = Instant::now();
        select::claim(&o, demo.backend)?;
        let selection = select::try_candidates(&o, demo.backend, &screened, &demo.data.pool, &raw)?;
        let r = Rep {
            full_before,
            trials: selection.trials_seconds,
            selection: t0.elapsed().as_secs_f64(),
            full_after: full(format!("full-{rep}b"))?,
        };
        println!(
            "cost: rep {}: full runs {:.1} s and {:.1} s; {} trials {:.1} s ({:.2}×); the selection with its base rounds {:.1} s ({:.2}×)",
            rep + 1,
            r.full_before,
            r.full_after,
            selection.ranking.len(),
            r.trials,
            r.trials_ratio(),
            r.selection,
            r.selection_ratio(),
        );
        reps.push(r);
    }
    let median = |ratio: fn(&Rep) -> f64| {
        let mut xs: Vec<f64> = reps.iter().map(ratio).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    let (trials_median, selection_median) =
        (median(Rep::trials_ratio), median(Rep::selection_ratio));
    let o = super::prompts::trial_options(demo);
    let md = format!(
        "# What the trial rule costs on {}\n\n{} candidates by `doubt`, each {} updates × {} responses (LoRA, lr {:e}) and a held-out round of {} prompts × {}, against one full run ({} updates × {} responses, no safeguard), timed in the same command, {REPS} repetitions of (full run, selection, full run).\n\n| rep | full run before (s) | trials (s) | selection with base rounds (s) | full run after (s) | trials / full | selection / full |\n|---|---|---|---|---|---|---|\n{}\nMedian: the trials take **{trials_median:.2}×** one full run; the whole selection with its base rounds {selection_median:.2}× (the screen, which every rule needs, not counted).\n",
        demo.dir.file_name().unwrap_or_default().to_string_lossy(),
        o.candidates,
        o.trial_steps,
        o.trial_samples,
        o.trial_lr,
        o.held_out_limit,
        o.held_out_samples,
        demo.plan.steps,
        demo.plan.samples_per_update,
        reps.iter()
            .enumerate()
            .map(|(i, r)| format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                i + 1,
                r.full_before,
                r.trials,
                r.selection,
                r.full_after,
                r.trials_ratio(),
                r.selection_ratio(),
            ))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    print!("{md}");
    let stem = out.join("trial-cost");
    write_atomic(&stem.with_extension("md"), &md)?;
    write_atomic(
        &stem.with_extension("json"),
        serde_json::to_string_pretty(&json!({
            "reps": reps, "trials_ratio_median": trials_median,
            "selection_ratio_median": selection_median, "settings": o.trial_settings(),
        }))? + "\n",
    )?;
    Ok(())
}

/// One repetition's wall seconds: a full run, the trials, the whole selection (the trials and
/// the base rounds), another full run.
#[derive(Serialize)]
struct Rep {
    full_before: f64,
    trials: f64,
    selection: f64,
    full_after: f64,
}

impl Rep {
    fn full(&self) -> f64 {
        (self.full_before + self.full_after) / 2.0
    }

    fn trials_ratio(&self) -> f64 {
        self.trials / self.full()
    }

    fn selection_ratio(&self) -> f64 {
        self.selection / self.full()
    }
}
