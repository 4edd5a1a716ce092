//! What an evaluation reports: each setting's [`SuiteSummary`] (accuracy with its interval,
//! pass@n, tokens), collected with the items in [`Results`], the paired [`Comparison`] of the model
//! against the baseline, and `summary.json` / `summary.md` ([`write_reports`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use em_data::Problem;
use em_store::write_atomic;
use serde::Serialize;
use serde_json::json;

use super::items::ItemResult;
use super::options::Setting;
use crate::Result;

/// Accuracy of one setting on one suite.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteSummary {
    pub suite: String,
    pub setting: String,
    pub n_items: usize,
    pub samples_per_item: usize,
    /// Greedy/first-sample accuracy or avg@n.
    pub accuracy: f64,
    pub ci95: (f64, f64),
    /// Fraction of items with at least one correct sample (n > 1).
    pub pass_at_n: Option<f64>,
    pub mean_tokens: f64,
    /// Fraction of samples that stopped at the token limit (graded all the same, by the
    /// toolkit's convention: their last number is their answer).
    pub truncated: f64,
}

/// Mean per-item score (accuracy, or avg@n).
pub fn mean_score(items: &[ItemResult]) -> f64 {
    items.iter().map(ItemResult::score).sum::<f64>() / items.len().max(1) as f64
}

/// Summary statistics of one setting on one suite.
pub fn summarize(suite: &str, setting: &Setting, items: &[ItemResult]) -> SuiteSummary {
    let n_items = items.len();
    let samples_per_item = items.first().map_or(setting.n, |i| i.samples.len());
    let scores: Vec<f64> = items.iter().map(ItemResult::score).collect();
    let (accuracy, ci95) = if samples_per_item <= 1 {
        let correct = items
            .iter()
            .filter(|i| i.samples.first().is_some_and(|s| s.correct))
            .count();
        (
            correct as f64 / n_items.max(1) as f64,
            em_grade::wilson_interval(correct, n_items),
        )
    } else {
        // avg@n: the normal interval over items, widened to the Wilson interval of the mean over
        // items (which stays honest when every item scores the same, e.g. all zero).
        let (m, lo, hi) = em_grade::mean_interval(&scores);
        let (wlo, whi) = em_grade::wilson_interval_p(m, n_items);
        (m, (lo.min(wlo).max(0.0), hi.max(whi).min(1.0)))
    };
    let pass_at_n = (samples_per_item > 1).then(|| {
        items
            .iter()
            .filter(|i| i.samples.iter().any(|s| s.correct))
            .count() as f64
            / n_items.max(1) as f64
    });
    let tokens: usize = items
        .iter()
        .flat_map(|i| i.samples.iter().map(|s| s.n_tokens))
        .sum();
    let n_samples: usize = items.iter().map(|i| i.samples.len()).sum();
    let at_limit = items
        .iter()
        .flat_map(|i| &i.samples)
        .filter(|s| s.finish == "length")
        .count();
    SuiteSummary {
        suite: suite.into(),
        setting: setting.tag(),
        n_items,
        samples_per_item,
        accuracy,
        ci95,
        pass_at_n,
        mean_tokens: tokens as f64 / n_samples.max(1) as f64,
        truncated: at_limit as f64 / n_samples.max(1) as f64,
    }
}

fn print_summary(s: &SuiteSummary) {
    let pass = s.pass_at_n.map_or(String::new(), |p| {
        format!(", pass@{} {:.3}", s.samples_per_item, p)
    });
    println!(
        "{} [{}]: accuracy {:.3} (95% CI {:.3}-{:.3}, n={}){pass}, {:.0} tokens/answer, {:.1}% at the token limit",
        s.suite,
        s.setting,
        s.accuracy,
        s.ci95.0,
        s.ci95.1,
        s.n_items,
        s.mean_tokens,
        100.0 * s.truncated
    );
}

/// What a run has found so far: the summaries in the order they were printed, and the items of
/// each suite at each setting, by (suite, setting tag).
#[derive(Debug, Default)]
pub struct Results {
    pub summaries: Vec<SuiteSummary>,
    pub items: BTreeMap<(String, String), Vec<ItemResult>>,
}

impl Results {
    /// Summarizes `suite`'s `items` at `setting`, prints the summary and keeps both.
    pub fn add(&mut self, suite: &str, setting: &Setting, items: Vec<ItemResult>) {
        let summary = summarize(suite, setting, &items);
        print_summary(&summary);
        self.summaries.push(summary);
        self.items.insert((suite.to_string(), setting.tag()), items);
    }

    /// The items of `suite` at `setting` (which must have been added).
    fn of(&self, suite: &str, setting: &Setting) -> &[ItemResult] {
        &self.items[&(suite.to_string(), setting.tag())]
    }
}

/// A paired comparison of the model against the baseline on one suite.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub suite: String,
    pub n_items: usize,
    pub model: f64,
    pub baseline_same_setting: f64,
    pub baseline_setting: String,
    /// model − baseline at the same setting: mean and 95% interval (paired over items).
    pub diff_same: (f64, f64, f64),
    /// Exact McNemar p-value on first samples (model right/baseline wrong vs the reverse).
    pub mcnemar_p_same: f64,
    pub best_baseline_setting: String,
    pub best_baseline: f64,
    pub diff_best: (f64, f64, f64),
    pub mcnemar_p_best: f64,
}

fn paired(a: &[ItemResult], b: &[ItemResult]) -> ((f64, f64, f64), f64) {
    let by_id: HashMap<&str, &ItemResult> = b.iter().map(|r| (r.id.as_str(), r)).collect();
    let (mut xs, mut ys, mut only_a, mut only_b) = (vec![], vec![], 0, 0);
    for r in a {
        if let Some(o) = by_id.get(r.id.as_str()) {
            xs.push(r.score());
            ys.push(o.score());
            let (x, y) = (r.samples[0].correct, o.samples[0].correct);
            only_a += (x && !y) as usize;
            only_b += (!x && y) as usize;
        }
    }
    (
        em_grade::paired_difference(&xs, &ys),
        em_grade::mcnemar_exact_p(only_a, only_b),
    )
}

/// Compares tuned results against the baseline at the same setting and at its best setting.
pub fn compare(
    suite: &str,
    tuned: &[ItemResult],
    same: &[ItemResult],
    same_tag: &str,
    best: &[ItemResult],
    best_tag: &str,
) -> Comparison {
    let (diff_same, p_same) = paired(tuned, same);
    let (diff_best, p_best) = paired(tuned, best);
    Comparison {
        suite: suite.into(),
        n_items: tuned.len(),
        model: mean_score(tuned),
        baseline_same_setting: mean_score(same),
        baseline_setting: same_tag.into(),
        diff_same,
        mcnemar_p_same: p_same,
        best_baseline_setting: best_tag.into(),
        best_baseline: mean_score(best),
        diff_best,
        mcnemar_p_best: p_best,
    }
}

/// Suite by suite, the model at `main` compared with the baseline at its first setting (the
/// model's own) and at its best; none when the baseline has no settings.
pub fn compare_all(
    results: &Results,
    suites: &[(String, Vec<Problem>)],
    main: &Setting,
    baseline: &[Setting],
) -> Vec<Comparison> {
    let mut comparisons = vec![];
    let Some(same) = baseline.first() else {
        return comparisons;
    };
    for (suite, _) in suites {
        let best = baseline
            .iter()
            .map(|s| (s, mean_score(results.of(suite, s))))
            .reduce(|best, next| if next.1 > best.1 { next } else { best })
            .expect("at least one baseline setting");
        comparisons.push(compare(
            suite,
            results.of(suite, main),
            results.of(suite, same),
            &same.tag(),
            results.of(suite, best.0),
            &best.0.tag(),
        ));
    }
    comparisons
}

/// Writes `summary.json` and `summary.md` to `out`, and prints the table.
pub fn write_reports(
    out: &Path,
    summaries: &[SuiteSummary],
    comparisons: &[Comparison],
) -> Result<()> {
    let summary = json!({ "suites": summaries, "comparisons": comparisons });
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let md = summary_table(summaries) + &comparison_table(comparisons);
    write_atomic(&out.join("summary.md"), &md)?;
    println!("\n{md}");
    println!("{}", out.join("summary.json").display());
    Ok(())
}

/// The markdown table of the summaries.
fn summary_table(summaries: &[SuiteSummary]) -> String {
    let mut md = String::from("| suite | setting | n | accuracy | 95% CI | pass@n | tokens/answer | at token limit |\n|---|---|---|---|---|---|---|---|\n");
    for s in summaries {
        md += &format!(
            "| {} | {} | {} | {:.3} | {:.3}–{:.3} | {} | {:.0} | {:.1}% |\n",
            s.suite,
            s.setting,
            s.n_items,
            s.accuracy,
            s.ci95.0,
            s.ci95.1,
            s.pass_at_n.map_or("–".into(), |p| format!("{p:.3}")),
            s.mean_tokens,
            100.0 * s.truncated
        );
    }
    md
}

/// The markdown table of the comparisons, after a blank line (empty without comparisons).
fn comparison_table(comparisons: &[Comparison]) -> String {
    let mut md = String::new();
    if comparisons.is_empty() {
        return md;
    }
    md += "\n| suite | n | model | baseline (same setting) | Δ (95% CI) | McNemar p | best baseline | Δ vs best (95% CI) | McNemar p |\n|---|---|---|---|---|---|---|---|---|\n";
    for c in comparisons {
        md += &format!(
            "| {} | {} | {:.3} | {:.3} | {:+.3} ({:+.3}, {:+.3}) | {:.3} | {:.3} [{}] | {:+.3} ({:+.3}, {:+.3}) | {:.3} |\n",
            c.suite,
            c.n_items,
            c.model,
            c.baseline_same_setting,
            c.diff_same.0,
            c.diff_same.1,
            c.diff_same.2,
            c.mcnemar_p_same,
            c.best_baseline,
            c.best_baseline_setting,
            c.diff_best.0,
            c.diff_best.1,
            c.diff_best.2,
            c.mcnemar_p_best
        );
    }
    md
}
