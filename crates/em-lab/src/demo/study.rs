//! The trial study (`demo --trial-study`): does a short trial predict what a full EM run on a
//! prompt does, better than the base screen's statistics?
//!
//! On the subject's pool: screen (the demo's screen, reused), take a spread of prompts (the named
//! ones of the issue that asked for it, the first six of every screen rule, then prompts evenly
//! spaced through the ranking), train each for a full run (`steps` × `samples`, seed 0, at each
//! learning rate of `--study-lrs`) and measure its greedy validation gain over the base, paired
//! over items. Next to that, each prompt's trial under each trial setting (`select`'s trials,
//! judged on the held-out unlabeled prompts) and its screen statistics. The report gives, per
//! learning rate, Spearman's ρ between each predictor and the gain with a bootstrap interval over
//! prompts, and what each trial setting calls the majority-wrong prompts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use em_convert::OutType;
use em_pipeline::eval::{mean_score, ItemResult};
use em_pipeline::screen::{self, PromptResult, Rule};
use em_pipeline::select::{HeldOut, Prediction, SelectOptions, Trial};
use em_pipeline::train::{self, AdapterKind, AdapterOptions, RefreshType, TrainOptions};
use em_pipeline::{sampling_model, Result};
use em_store::write_atomic;
use serde_json::json;

use super::evaluate::{eval_setting, setting};
use super::Demo;
use crate::organism;

/// Prompts the study always includes (where the pool has them): the outcomes that showed the
/// base statistics failing on organism-mixed.
const NAMED: [&str; 6] = [
    "organism-pool-52",
    "organism-pool-116",
    "organism-pool-2",
    "organism-pool-31",
    "organism-pool-0",
    "organism-pool-137",
];

/// A trial setting the study compares.
struct TrialSetting {
    name: String,
    /// Its directory under `study/`.
    dir: String,
    adapter: Option<AdapterKind>,
    lr: f64,
    steps: usize,
    samples: usize,
    /// Responses per held-out prompt and round.
    held_out_samples: usize,
}

fn trial_settings() -> Vec<TrialSetting> {
    let setting = |name: &str, dir: &str, adapter, lr, steps, held_out_samples| TrialSetting {
        name: name.into(),
        dir: dir.into(),
        adapter,
        lr,
        steps,
        samples: 16,
        held_out_samples,
    };
    let lora = Some(AdapterKind::Lora);
    vec![
        setting(
            "LoRA 2×16 lr 1e-2, 2 per held-out prompt (select's default)",
            "trials-lora-lr1e-2-steps2-held2",
            lora,
            1e-2,
            2,
            2,
        ),
        setting("LoRA 3×16 lr 1e-2", "trials-lora-lr1e-2", lora, 1e-2, 3, 4),
        setting("LoRA 3×16 lr 1e-3", "trials-lora-lr1e-3", lora, 1e-3, 3, 4),
        setting("full 3×16 lr 1e-4", "trials-full-lr1e-4", None, 1e-4, 3, 4),
        setting(
            "LoRA 2×16 lr 1e-2",
            "trials-lora-lr1e-2-steps2",
            lora,
            1e-2,
            2,
            4,
        ),
        setting(
            "LoRA 3×16 lr 1e-2, 2 per held-out prompt",
            "trials-lora-lr1e-2-held2",
            lora,
            1e-2,
            3,
            2,
        ),
    ]
}

/// The prompts studied: the named ones, the first six of every rule, then evenly spaced through
/// the ranking, `n` in all.
fn study_prompts(ranked: &[PromptResult], n: usize) -> Vec<&PromptResult> {
    let mut ids: Vec<String> = vec![];
    let mut push = |id: &str| {
        if ids.len() < n && !ids.iter().any(|x| x == id) {
            ids.push(id.to_string());
        }
    };
    for id in NAMED {
        if ranked.iter().any(|r| r.id == id) {
            push(id);
        }
    }
    for rule in [
        Rule::Variance,
        Rule::MajorityRight,
        Rule::MajorityWrong,
        Rule::Agreement,
    ] {
        for r in screen::candidates(ranked, rule, 6) {
            push(&r.id);
        }
    }
    let stride = (ranked.len() / n.max(1)).max(1);
    for offset in 0..stride {
        for r in ranked.iter().skip(offset).step_by(stride) {
            push(&r.id);
        }
    }
    ids.iter()
        .filter_map(|id| ranked.iter().find(|r| &r.id == id))
        .collect()
}

/// One full EM run on the first `shots` prompts in `prompt_file` at `lr` (no safeguard), seeded
/// by `seed`, in `out`.
pub(super) fn full_run(
    demo: &Demo,
    prompt_file: &Path,
    out: &Path,
    lr: f64,
    shots: usize,
    seed: u64,
) -> Result<PathBuf> {
    let options = TrainOptions {
        shots,
        ..super::train::organism_run(demo, prompt_file, out, lr, seed)
    };
    train::run(&options, demo.backend)?
        .with_context(|| format!("{}: training did not finish", out.display()))
}

/// The wall seconds of a run's updates, from its metrics.
fn updates_seconds(metrics: &Path) -> Result<f64> {
    Ok(em_store::JsonlStore::<serde_json::Value>::read(metrics)?
        .iter()
        .filter_map(|v| v.get("seconds").and_then(serde_json::Value::as_f64))
        .sum())
}

/// `select`'s options for the trial setting `t`, writing under `out`.
fn select_options(demo: &Demo, t: &TrialSetting, out: &Path) -> SelectOptions {
    let mut o = SelectOptions::reference(
        demo.subject.clone(),
        demo.data.pool_path.clone(),
        demo.data.watch_path.clone(),
        out.to_path_buf(),
    );
    o.k = demo.plan.k;
    o.held_out_limit = demo.plan.watch;
    o.held_out_samples = t.held_out_samples;
    o.trial_steps = t.steps;
    o.trial_samples = t.samples;
    // One pass per update: the organism is tiny.
    o.micro_batch = t.samples;
    o.trial_lr = t.lr;
    o.adapter = AdapterOptions {
        kind: t.adapter,
        ..AdapterOptions::default()
    };
    o.refresh_type = RefreshType::F32;
    o.max_new_tokens = demo.plan.max_new_tokens;
    o.repetition_penalty = 1.0;
    o.prompt = organism::prompt_options();
    o
}

/// What the study measured for one prompt.
struct Measured<'a> {
    screened: &'a PromptResult,
    /// Validation greedy gain over the base per learning rate: mean and 95% interval.
    gains: Vec<(f64, f64, f64)>,
    /// The prediction of each trial setting.
    predictions: Vec<Prediction>,
    trial_seconds: Vec<f64>,
    full_seconds: Vec<f64>,
}

/// Runs the study (see the module documentation); writes `trial-study.md` and `.json` in the
/// demo's output directory.
pub(super) fn run(demo: &Demo, base_gguf: &Path, out: &Path, n: usize, lrs: &[f64]) -> Result<()> {
    let screened = screen::run(&super::prompts::screen_options(demo), demo.backend)?;
    let base_items = eval_setting(
        demo,
        &demo.subject,
        base_gguf,
        &demo.data.validation,
        &setting("val-base", 0.0, 1, None),
        &demo.dir.join("validation"),
    )?;
    let base_scores: Vec<f64> = base_items.iter().map(ItemResult::score).collect();
    let prompts = study_prompts(&screened, n);
    let raw: Vec<String> = std::fs::read_to_string(&demo.data.pool_path)?
        .lines()
        .map(String::from)
        .collect();
    let study_dir = demo.dir.join("study");
    let settings = trial_settings();
    let held_outs = settings
        .iter()
        .map(|t| {
            HeldOut::prepare(
                &select_options(demo, t, &study_dir.join(&t.dir)),
                demo.backend,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut measured = vec![];
    for (i, r) in prompts.iter().enumerate() {
        println!("study: prompt {}/{}: {}", i + 1, prompts.len(), r.id);
        let line = demo
            .data
            .pool
            .iter()
            .position(|p| p.id == r.id)
            .map(|k| raw[k].clone())
            .context("a studied prompt is in the pool")?;
        let prompt_file = study_dir.join("prompts").join(format!("{}.jsonl", r.id));
        std::fs::create_dir_all(prompt_file.parent().expect("a parent"))?;
        write_atomic(&prompt_file, format!("{line}\n"))?;
        let mut gains = vec![];
        let mut full_seconds = vec![];
        for &lr in lrs {
            let run_dir = study_dir.join(format!("full-lr{lr:e}")).join(&r.id);
            let tuned = full_run(demo, &prompt_file, &run_dir, lr, 1, 0)?;
            full_seconds.push(updates_seconds(&run_dir.join("metrics.jsonl"))?);
            let gguf = sampling_model(demo.backend, &tuned, &run_dir.join("gguf"), OutType::F32)?;
            let items = eval_setting(
                demo,
                &tuned,
                &gguf,
                &demo.data.validation,
                &setting("val", 0.0, 1, None),
                &run_dir.join("validation"),
            )?;
            let scores: Vec<f64> = items.iter().map(ItemResult::score).collect();
            gains.push(em_grade::paired_difference(&scores, &base_scores));
        }
        let mut predictions = vec![];
        let mut trial_seconds = vec![];
        for (t, held_out) in settings.iter().zip(&held_outs) {
            let o = select_options(demo, t, &study_dir.join(&t.dir));
            let trial: Trial = held_out.trial(&o, demo.backend, &r.id, &line)?;
            predictions.push(Prediction::new(&held_out.baseline, &trial.round));
            trial_seconds.push(trial.seconds);
        }
        measured.push(Measured {
            screened: r,
            gains,
            predictions,
            trial_seconds,
            full_seconds,
        });
    }
    let k_shot = super::kshot::run(demo, base_gguf, &screened, &raw, lrs[0])?;
    report(
        demo,
        out,
        &measured,
        &settings,
        lrs,
        mean_score(&base_items),
        base_items.len(),
        &k_shot,
    )
}

/// Writes `trial-study.md` and `trial-study.json`.
#[allow(clippy::too_many_arguments)]
fn report(
    demo: &Demo,
    out: &Path,
    measured: &[Measured],
    settings: &[TrialSetting],
    lrs: &[f64],
    base_accuracy: f64,
    n_validation: usize,
    k_shot: &str,
) -> Result<()> {
    let mut predictors: Vec<(String, Vec<f64>)> = settings
        .iter()
        .enumerate()
        .map(|(k, t)| {
            (
                format!("trial: {}", t.name),
                measured.iter().map(|m| m.predictions[k].effect).collect(),
            )
        })
        .collect();
    predictors.extend([
        (
            "screen: pass rate (labels)".to_string(),
            measured.iter().map(|m| m.screened.pass_rate).collect(),
        ),
        (
            "screen: variance p(1−p) (labels)".to_string(),
            measured.iter().map(|m| m.screened.variance).collect(),
        ),
        (
            "screen: agreement (majority share)".to_string(),
            measured.iter().map(|m| m.screened.agreement().1).collect(),
        ),
        (
            "screen: answered-and-stopped share".to_string(),
            measured.iter().map(|m| m.screened.terminated()).collect(),
        ),
    ]);
    let mut md = format!(
        "# Trial study on {}\n\n{} prompts; each trained for a full run ({} updates × {} responses, seed 0) at lr {}; gain = greedy validation accuracy ({} items) − the base's {:.3}, paired over items. Spearman's ρ between each predictor and the gain, with a 95% bootstrap interval over prompts (2000 resamples).\n\n",
        demo.dir.file_name().unwrap_or_default().to_string_lossy(),
        measured.len(),
        demo.plan.steps,
        demo.plan.samples_per_update,
        lrs.iter().map(|l| format!("{l:e}")).collect::<Vec<_>>().join(" and "),
        n_validation,
        base_accuracy
    );
    let mut correlations = vec![];
    md += "| predictor | ";
    md += &lrs
        .iter()
        .map(|l| format!("ρ with the gain at lr {l:e} (95% CI)"))
        .collect::<Vec<_>>()
        .join(" | ");
    md += " |\n|---|";
    md += &"---|".repeat(lrs.len());
    md += "\n";
    for (name, xs) in &predictors {
        md += &format!("| {name} |");
        for (j, lr) in lrs.iter().enumerate() {
            let gains: Vec<f64> = measured.iter().map(|m| m.gains[j].0).collect();
            let (rho, lo, hi) = em_grade::spearman_interval(xs, &gains, 2000, 17);
            md += &format!(" {rho:+.2} ({lo:+.2}, {hi:+.2}) |");
            correlations.push(json!({"predictor": name, "lr": lr, "rho": rho, "ci95": [lo, hi]}));
        }
        md += "\n";
    }
    md += "\n| prompt | pass | agreement | answered-and-stopped | ";
    for lr in lrs {
        md += &format!("gain at lr {lr:e} | ");
    }
    for t in settings {
        md += &format!("{} effect, call | ", t.name);
    }
    md += "\n|---|---|---|---|";
    md += &"---|".repeat(lrs.len() + settings.len());
    md += "\n";
    let mut rows = vec![];
    for m in measured {
        let r = m.screened;
        md += &format!(
            "| {} | {}/{} | {:.2} | {:.2} |",
            r.id,
            r.correct,
            r.n,
            r.agreement().1,
            r.terminated()
        );
        for g in &m.gains {
            md += &format!(" {:+.3} ({:+.3}, {:+.3}) |", g.0, g.1, g.2);
        }
        for p in &m.predictions {
            md += &format!(
                " {:+.3} ({:+.3}, {:+.3}) {} |",
                p.effect, p.effect_ci95.0, p.effect_ci95.1, p.call
            );
        }
        md += "\n";
        rows.push(json!({
            "id": r.id, "pass_rate": r.pass_rate, "majority_right": r.majority_right(),
            "majority_wrong": r.majority_wrong(), "agreement": r.agreement().1,
            "terminated": r.terminated(),
            "gains": m.gains.iter().zip(lrs).map(|(g, lr)| json!({"lr": lr, "gain": g.0, "ci95": [g.1, g.2]})).collect::<Vec<_>>(),
            "trials": m.predictions.iter().zip(settings).zip(&m.trial_seconds).map(|((p, t), s)| json!({"setting": t.name, "prediction": p, "seconds": s})).collect::<Vec<_>>(),
            "full_seconds": m.full_seconds,
        }));
    }
    // Cost: the trials of each setting against the full runs, by wall time.
    md += "\n";
    let full_mean: f64 =
        measured.iter().map(|m| m.full_seconds[0]).sum::<f64>() / measured.len().max(1) as f64;
    for (k, t) in settings.iter().enumerate() {
        let trial_mean: f64 =
            measured.iter().map(|m| m.trial_seconds[k]).sum::<f64>() / measured.len().max(1) as f64;
        let wrong: Vec<String> = measured
            .iter()
            .filter(|m| m.screened.majority_wrong())
            .map(|m| format!("{} {}", m.screened.id, m.predictions[k].call))
            .collect();
        md += &format!(
            "- {}: a trial takes {:.1} s against {:.1} s for a full run ({:.2}×; 8 candidates {:.2}×); majority-wrong prompts: {}\n",
            t.name,
            trial_mean,
            full_mean,
            trial_mean / full_mean.max(1e-9),
            8.0 * trial_mean / full_mean.max(1e-9),
            if wrong.is_empty() { "none studied".into() } else { wrong.join(", ") }
        );
    }
    md += "\nWall times as recorded when each ran: a full run's updates (sampling and training) from its metrics.jsonl; a trial's updates and its held-out round.\n";
    md += k_shot;
    let stem = out.join("trial-study");
    write_atomic(&stem.with_extension("md"), &md)?;
    write_atomic(
        &stem.with_extension("json"),
        serde_json::to_string_pretty(&json!({"correlations": correlations, "prompts": rows}))?,
    )?;
    println!("{md}");
    Ok(())
}
