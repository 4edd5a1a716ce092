//! The end of a screen: [`finish`] ranks the screened prompts, prints the top of the ranking,
//! writes `ranking.json` and the chosen prompt's record to `chosen.jsonl`.

use std::collections::HashSet;

use anyhow::bail;
use em_data::Problem;
use em_store::write_atomic;
use serde_json::{json, Value};

use super::options::ScreenOptions;
use super::ranking::{choose, rank, PromptResult, Rule};
use crate::Result;

/// A nats figure, or `–` where the backend gave none.
pub(super) fn show(h: Option<f64>) -> String {
    h.map_or("–".into(), |h| format!("{h:.3}"))
}

/// Ranks, prints, and writes `ranking.json` and `chosen.jsonl`.
pub fn finish(
    args: &ScreenOptions,
    problems: &[Problem],
    raw: &[String],
    mut results: Vec<PromptResult>,
) -> Result<Vec<PromptResult>> {
    let wanted: HashSet<&str> = problems.iter().map(|p| p.id.as_str()).collect();
    results.retain(|r| wanted.contains(r.id.as_str()));
    rank(&mut results);
    let chosen = choose(&results, args.rule).cloned();
    print_ranking(&results);
    if let Some(warning) = limit_warning(&results, args.max_new_tokens) {
        eprintln!("{warning}");
    }
    let ranking = ranking_json(args, &results, chosen.as_ref());
    write_atomic(
        &args.out.join("ranking.json"),
        serde_json::to_string_pretty(&ranking)?.as_bytes(),
    )?;
    let Some(chosen) = chosen else {
        bail!(
            "no prompt qualifies under rule {:?} ({} at k = {}); ranking written to {}",
            args.rule,
            why_none(args.rule),
            args.k,
            args.out.join("ranking.json").display()
        );
    };
    let line = problems
        .iter()
        .position(|p| p.id == chosen.id)
        .map(|i| raw[i].clone())
        .expect("chosen from the pool");
    write_atomic(
        &args.out.join("chosen.jsonl"),
        format!("{line}\n").as_bytes(),
    )?;
    println!(
        "chosen ({:?}): {}  {}/{} right, p = {:.2} [{:.2}, {:.2}] -> {}",
        args.rule,
        chosen.id,
        chosen.correct,
        chosen.n,
        chosen.pass_rate,
        chosen.ci95.0,
        chosen.ci95.1,
        args.out.join("chosen.jsonl").display()
    );
    Ok(results)
}

/// The one line that says most responses stopped at the token limit, and the limit to raise.
pub(super) fn limit_warning(results: &[PromptResult], max_new_tokens: usize) -> Option<String> {
    let n: usize = results.iter().map(|r| r.n).sum();
    let at_limit: usize = results.iter().map(PromptResult::at_limit).sum();
    let unfinished: usize = results
        .iter()
        .map(|r| r.unfinished_each.iter().filter(|&&u| u).count())
        .sum();
    (2 * at_limit > n).then(|| {
        format!(
            "screen: warning: {at_limit} of {n} responses stopped at the token limit \
             (max_new_tokens {max_new_tokens}), {unfinished} of them without a final answer, \
             which no rule counts as right; raise --max-new-tokens"
        )
    })
}

/// Prints the top 20 of the ranking, with the rules' flags.
fn print_ranking(results: &[PromptResult]) {
    println!(
        "{:>4} {:>12} {:>6} {:>15} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6}",
        "rank", "id", "pass", "95% interval", "p(1-p)", "H", "length", "agree", "ended", "unfin"
    );
    for (i, r) in results.iter().enumerate().take(20) {
        let flags = [
            (r.majority_right(), "majority right"),
            (r.majority_wrong(), "majority wrong"),
            (r.agrees(), "agrees"),
        ]
        .iter()
        .filter(|f| f.0)
        .map(|f| f.1)
        .collect::<Vec<_>>()
        .join(", ");
        println!(
            "{:>4} {:>12} {:>2}/{:<3} [{:.2}, {:.2}]    {:>8.4} {:>8} {:>8.1} {:>6.2} {:>6.2} {:>6.2}  {flags}",
            i + 1,
            r.id,
            r.correct,
            r.n,
            r.ci95.0,
            r.ci95.1,
            r.variance,
            show(r.mean_entropy),
            r.mean_length,
            r.agreement().1,
            r.terminated(),
            r.unfinished(),
        );
    }
}

/// The content of `ranking.json`: the rule, the chosen id, and every prompt's figures in rank
/// order.
fn ranking_json(
    args: &ScreenOptions,
    results: &[PromptResult],
    chosen: Option<&PromptResult>,
) -> Value {
    json!({
        "rule": args.rule,
        "chosen": chosen.map(|c| c.id.clone()),
        "k": args.k,
        "prompts": results.len(),
        "ranking": results.iter().enumerate().map(|(i, r)| json!({
            "rank": i + 1, "id": r.id, "correct": r.correct, "n": r.n, "pass_rate": r.pass_rate,
            "ci95": [r.ci95.0, r.ci95.1], "variance": r.variance, "mean_entropy": r.mean_entropy,
            "mean_full_entropy": r.mean_full_entropy, "mean_length": r.mean_length,
            "majority_right": r.majority_right(), "majority_wrong": r.majority_wrong(),
            "majority_answer": r.agreement().0, "agreement": r.agreement().1,
            "agreement_ci95": r.agreement_ci95(), "terminated": r.terminated(), "agrees": r.agrees(),
            "unfinished": r.unfinished(), "at_limit": r.at_limit(),
        })).collect::<Vec<_>>(),
    })
}

/// Why no prompt qualifies under `rule`.
fn why_none(rule: Rule) -> &'static str {
    match rule {
        Rule::Variance => "the pool is empty",
        Rule::MajorityRight => "no pass rate is above 0.5 with its 95% interval",
        Rule::MajorityWrong => "no pass rate is below 0.5 with its 95% interval",
        Rule::Agreement => "no prompt's most common answer holds above 0.5 of the samples with its 95% interval while most answers terminate",
        Rule::Doubt => "no prompt's answers mostly terminate",
    }
}
