//! What the demo reports: a row per evaluated setting of each model, a summary per training
//! run, the adapter next to full fine-tuning, the verdict in words, and `demo.md` with
//! `demo.json` (or `demo-lora.*`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use em_data::synthetic::classify_style;
use em_pipeline::eval::{self, mean_score, ItemResult, Setting};
use em_pipeline::Result;
use em_store::write_atomic;
use em_train::lora::LoraConfig;
use serde::Serialize;
use serde_json::json;

use super::evaluate::decoding_name;
use super::plots::Curve;
use super::train::training_name;

/// One evaluated setting of one model on the test split.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: String,
    pub setting: String,
    pub n_items: usize,
    pub accuracy: f64,
    pub ci95: (f64, f64),
    /// careful / guess / ramble fractions of all sampled responses.
    pub styles: (f64, f64, f64),
    /// Paired difference from the base model at the same decoding (mean over seeds per item):
    /// mean and 95% interval.
    pub vs_base: Option<(f64, f64, f64)>,
    /// Per seed accuracies (tuned rows).
    pub per_seed: Vec<f64>,
}

/// One training run and what the safeguard made of it.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub rule: String,
    pub prompt: String,
    /// "full", or the adapter trained.
    pub training: String,
    pub lr: f64,
    pub seed: u64,
    /// Weights step of the first alarm, and its reason.
    pub alarm: Option<(usize, String)>,
    /// Updates in the model the safeguard leaves.
    pub guarded_step: usize,
    pub test_greedy_tuned: f64,
    pub test_greedy_guarded: f64,
    pub test_greedy_base: f64,
}

pub(super) fn row(
    model: &str,
    setting: &Setting,
    per_seed: &[Vec<ItemResult>],
    base: Option<&Vec<ItemResult>>,
) -> Row {
    // Items scored by their mean over seeds, so the interval is over items (paired with base).
    let mean_items = mean_over_seeds(per_seed);
    let summary = eval::summarize("test", setting, &mean_items);
    let vs_base = base.map(|b| {
        let by_id: BTreeMap<&str, f64> = b.iter().map(|r| (r.id.as_str(), r.score())).collect();
        let (a, c): (Vec<f64>, Vec<f64>) = mean_items
            .iter()
            .filter_map(|r| by_id.get(r.id.as_str()).map(|&s| (r.score(), s)))
            .unzip();
        em_grade::paired_difference(&a, &c)
    });
    Row {
        model: model.into(),
        setting: decoding_name(setting),
        n_items: summary.n_items,
        accuracy: summary.accuracy,
        ci95: summary.ci95,
        styles: style_shares(&mean_items),
        vs_base,
        per_seed: per_seed.iter().map(|r| mean_score(r)).collect(),
    }
}

/// Each item with the samples of every seed: its score is the mean over seeds.
pub(super) fn mean_over_seeds(per_seed: &[Vec<ItemResult>]) -> Vec<ItemResult> {
    per_seed[0]
        .iter()
        .enumerate()
        .map(|(i, item)| ItemResult {
            samples: per_seed.iter().flat_map(|r| r[i].samples.clone()).collect(),
            ..item.clone()
        })
        .collect()
}

/// The adapter next to full fine-tuning, per prompt and decoding: accuracies, styles, and the
/// paired difference over items (each item's mean over seeds).
pub(super) fn adapter_rows(
    tuned_items: &BTreeMap<(String, String), Vec<Option<Vec<ItemResult>>>>,
    lora: &LoraConfig,
) -> Vec<String> {
    let mut out = vec![format!(
        "\n{} next to full fine-tuning, each at its validation-chosen learning rate (test split, items scored by their mean over seeds):\n\n| prompt | decoding | full | {0} | {0} − full, paired (95% CI) | styles full → {0} (careful / guess / ramble) |\n|---|---|---|---|---|---|",
        training_name(Some(lora))
    )];
    for ((rule, decoding), by) in tuned_items {
        let (Some(Some(full)), Some(Some(adapted))) = (by.first(), by.get(1)) else {
            continue;
        };
        let by_id: BTreeMap<&str, f64> = full.iter().map(|r| (r.id.as_str(), r.score())).collect();
        let (a, f): (Vec<f64>, Vec<f64>) = adapted
            .iter()
            .filter_map(|r| by_id.get(r.id.as_str()).map(|&s| (r.score(), s)))
            .unzip();
        let (d, lo, hi) = em_grade::paired_difference(&a, &f);
        let styles = |items: &[ItemResult]| {
            let s = style_shares(items);
            format!("{:.2} / {:.2} / {:.2}", s.0, s.1, s.2)
        };
        out.push(format!(
            "| {rule} | {decoding} | {:.3} | {:.3} | {d:+.3} ({lo:+.3}, {hi:+.3}) | {} → {} |",
            mean_score(full),
            mean_score(adapted),
            styles(full),
            styles(adapted)
        ));
    }
    out
}

/// careful / guess / ramble fractions of all sampled responses of `items`.
fn style_shares(items: &[ItemResult]) -> (f64, f64, f64) {
    let mut counts = [0usize; 3];
    for s in items.iter().flat_map(|i| &i.samples) {
        counts[match classify_style(&s.response) {
            em_data::synthetic::Style::Careful => 0,
            em_data::synthetic::Style::Guess => 1,
            em_data::synthetic::Style::Ramble => 2,
        }] += 1;
    }
    let total = counts.iter().sum::<usize>().max(1) as f64;
    (
        counts[0] as f64 / total,
        counts[1] as f64 / total,
        counts[2] as f64 / total,
    )
}

/// The safeguard over seeds: runs that helped and how many of them alarmed, runs that hurt and
/// how many of them it stopped.
pub(super) fn safeguard_note(runs: &[RunSummary]) -> String {
    let helped = |r: &RunSummary| r.test_greedy_tuned > r.test_greedy_base;
    let hurt = |r: &RunSummary| r.test_greedy_tuned < r.test_greedy_base - 0.02;
    let false_alarms = runs
        .iter()
        .filter(|r| helped(r) && r.alarm.is_some())
        .count();
    let caught = runs.iter().filter(|r| hurt(r) && r.alarm.is_some()).count();
    format!(
        "safeguard: {} runs; {} helped (tuned greedy above base), {false_alarms} of them alarmed (false alarms); {} hurt by more than 2 points, {caught} of them stopped",
        runs.len(),
        runs.iter().filter(|r| helped(r)).count(),
        runs.iter().filter(|r| hurt(r)).count(),
    )
}

/// A few sentences from the numbers.
pub(super) fn verdict(rows: &[Row], runs: &[RunSummary], base_greedy: f64) -> Vec<String> {
    let mut out = vec![];
    let best_base = rows
        .iter()
        .filter(|r| r.model == "base")
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy));
    for r in rows
        .iter()
        .filter(|r| r.model.starts_with("tuned on") && r.setting == "greedy")
    {
        let Some((d, lo, hi)) = r.vs_base else {
            continue;
        };
        let word = if lo > 0.0 {
            "lifts"
        } else if hi < 0.0 {
            "lowers"
        } else {
            "does not measurably change"
        };
        out.push(format!(
            "EM {} {word} greedy accuracy: {:.3} against the base's {base_greedy:.3}, {:+.3} (95% CI {:+.3}, {:+.3}) over {} seeds.",
            r.model.trim_start_matches("tuned on "),
            r.accuracy,
            d,
            lo,
            hi,
            r.per_seed.len()
        ));
    }
    if let Some(b) = best_base {
        out.push(format!(
            "The best training-free baseline is the base model at {} ({:.3}).",
            b.setting, b.accuracy
        ));
    }
    let alarms: Vec<&RunSummary> = runs.iter().filter(|r| r.alarm.is_some()).collect();
    if !alarms.is_empty() {
        let worst = alarms
            .iter()
            .map(|r| r.test_greedy_guarded - r.test_greedy_base)
            .fold(f64::INFINITY, f64::min);
        out.push(format!(
            "The safeguard stopped {} of {} runs; the models it left are at most {:.1} points below the base (greedy), where the unguarded ones reach {:+.1}.",
            alarms.len(),
            runs.len(),
            -worst.min(0.0) * 100.0,
            alarms
                .iter()
                .map(|r| r.test_greedy_tuned - r.test_greedy_base)
                .fold(f64::INFINITY, f64::min)
                * 100.0
        ));
    } else {
        out.push(format!(
            "The safeguard stopped none of the {} runs.",
            runs.len()
        ));
    }
    out
}

/// What the report is written from.
pub(super) struct Report<'a> {
    pub(super) out: &'a Path,
    /// The file names: `<stem>.md` and `<stem>.json`.
    pub(super) stem: &'a str,
    pub(super) subject: &'a str,
    pub(super) rows: &'a [Row],
    pub(super) runs: &'a [RunSummary],
    pub(super) notes: &'a [String],
    pub(super) plots: &'a [PathBuf],
    pub(super) verdict: &'a [String],
    pub(super) curves: &'a [(String, Curve)],
}

/// Writes the report; `extra` lines follow the main table.
pub(super) fn report(r: &Report, extra: &[String]) -> Result<()> {
    let Report {
        out,
        stem,
        subject,
        rows,
        runs,
        notes,
        plots,
        verdict,
        curves,
    } = *r;
    let mut md = format!("# One-shot EM on {subject}\n\n");
    for v in verdict {
        md += &format!("{v}\n");
    }
    md += &rows_table(rows);
    for line in extra {
        md += &format!("{line}\n");
    }
    md += &runs_table(runs);
    md += "\n";
    for n in notes {
        md += &format!("- {n}\n");
    }
    md += "\nPlots:\n";
    for p in plots {
        md += &format!("- {}\n", p.display());
    }
    let md_path = out.join(format!("{stem}.md"));
    write_atomic(&md_path, &md)?;
    write_atomic(
        &out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json!({"subject": subject, "rows": rows, "runs": runs,
            "notes": notes, "plots": plots, "verdict": verdict, "comparison": extra,
            "curves": curves.iter().map(|(t, c)| json!({"title": t, "curve": c})).collect::<Vec<_>>()}))?
            + "\n",
    )?;
    println!("\n{md}");
    println!("{}", md_path.display());
    Ok(())
}

/// The main table: a line per row.
fn rows_table(rows: &[Row]) -> String {
    let mut md = String::new();
    md += "\n| model | decoding | n | accuracy | 95% CI | − base, paired (95% CI) | per seed | careful / guess / ramble |\n|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        let vs = r.vs_base.map_or("—".into(), |(d, lo, hi)| {
            format!("{d:+.3} ({lo:+.3}, {hi:+.3})")
        });
        let seeds = if r.per_seed.len() > 1 {
            r.per_seed
                .iter()
                .map(|a| format!("{a:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            "—".into()
        };
        md += &format!(
            "| {} | {} | {} | {:.3} | {:.3}–{:.3} | {vs} | {seeds} | {:.2} / {:.2} / {:.2} |\n",
            r.model,
            r.setting,
            r.n_items,
            r.accuracy,
            r.ci95.0,
            r.ci95.1,
            r.styles.0,
            r.styles.1,
            r.styles.2
        );
    }
    md
}

/// A line per training run: its alarm, the model the safeguard leaves, greedy accuracies.
fn runs_table(runs: &[RunSummary]) -> String {
    let mut md = String::new();
    md += "\n| rule | prompt | training | lr | seed | alarm (weights step: reason) | safeguarded model | greedy: tuned / safeguarded / base |\n|---|---|---|---|---|---|---|---|\n";
    for r in runs {
        md += &format!(
            "| {} | {} | {} | {:e} | {} | {} | after {} updates | {:.3} / {:.3} / {:.3} |\n",
            r.rule,
            r.prompt,
            r.training,
            r.lr,
            r.seed,
            r.alarm
                .as_ref()
                .map_or("none".into(), |(s, why)| format!("{s}: {why}")),
            r.guarded_step,
            r.test_greedy_tuned,
            r.test_greedy_guarded,
            r.test_greedy_base
        );
    }
    md
}

/// The trial rule's cost, measured: the wall time of `select`'s trials (`<dir>/select`) against the
/// updates of this demo's full fine-tuning runs (sampling, publishing and training; not the
/// safeguard's rounds, which a bare run does not have). None where no trial or no run ran.
pub(super) fn trial_cost_note(dir: &Path, runs: &[PathBuf]) -> Result<Option<String>> {
    let Ok(text) = std::fs::read_to_string(dir.join("select/ranking.json")) else {
        return Ok(None);
    };
    let ranking: serde_json::Value = serde_json::from_str(&text)?;
    let Some(trials) = ranking["trials_seconds"].as_f64() else {
        return Ok(None);
    };
    let mut per_run = vec![];
    for run in runs {
        let lines = em_store::JsonlStore::<serde_json::Value>::read(&run.join("metrics.jsonl"))?;
        per_run.push(
            lines
                .iter()
                .filter(|m| m.get("loss").is_some())
                .flat_map(|m| {
                    ["sample_seconds", "refresh_seconds", "train_seconds"]
                        .map(|k| m[k].as_f64().unwrap_or(0.0))
                })
                .sum::<f64>(),
        );
    }
    if per_run.is_empty() {
        return Ok(None);
    }
    let full = per_run.iter().sum::<f64>() / per_run.len() as f64;
    Ok(Some(format!(
        "trial cost: select's trials took {trials:.1} s against {full:.1} s for a full run's updates (the mean of this demo's {} full fine-tuning runs: sampling, publishing and training, without the safeguard's rounds): {:.2}×; `demo --trial-cost` times both in one command",
        per_run.len(),
        trials / full.max(1e-9)
    )))
}
