//! The ranking of the trials, the choice, and what is written: `ranking.json`, `chosen.jsonl`,
//! `top.jsonl`.

use std::path::PathBuf;

use em_store::write_atomic;
use serde::Serialize;
use serde_json::{json, Value};

use super::{Prediction, SelectOptions, Trial};
use crate::safeguard::Baseline;
use crate::screen::PromptResult;
use crate::train::TrainOptions;
use crate::Result;

/// A candidate's line of `ranking.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub rank: usize,
    pub id: String,
    pub prediction: Prediction,
    /// The trial's held-out signals and the base's.
    pub answered: f64,
    pub answered_base: f64,
    pub length: f64,
    pub length_base: f64,
    pub repetition: f64,
    pub repetition_base: f64,
    pub drifted: usize,
    pub entropy_first: f64,
    pub entropy_last: f64,
    pub seconds: f64,
    /// The screen's figures for the prompt.
    pub screen: Value,
}

/// The selection: every candidate ranked, the chosen one if any, and what the trials cost.
#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    pub ranking: Vec<Candidate>,
    pub chosen: Option<String>,
    /// Wall time of all trials, and the projected wall time of one full run (`full_steps` updates
    /// of `full_samples` responses at the trials' own seconds per response, plus one round).
    pub trials_seconds: f64,
    pub full_run_seconds: f64,
    pub full_steps: usize,
    pub full_samples: usize,
}

impl Selection {
    /// The trials' wall time as a fraction of one full run's.
    pub fn cost(&self) -> f64 {
        self.trials_seconds / self.full_run_seconds.max(1e-9)
    }
}

/// Ranks the trials: alarms last, then by effect; chooses the first predicted to help.
pub fn rank(baseline: &Baseline, trials: &[(&PromptResult, Trial)]) -> Selection {
    let b = &baseline.round;
    let mut ranking: Vec<Candidate> = trials
        .iter()
        .map(|(screened, t)| {
            let (answer, share) = screened.agreement();
            Candidate {
                rank: 0,
                id: t.id.clone(),
                prediction: Prediction::new(baseline, &t.round),
                answered: t.round.answered,
                answered_base: b.answered,
                length: t.round.length,
                length_base: b.length,
                repetition: t.round.repetition,
                repetition_base: b.repetition,
                drifted: t.round.drifted_from(b),
                entropy_first: t.entropy_first,
                entropy_last: t.entropy_last,
                seconds: t.seconds,
                screen: json!({
                    "pass_rate": screened.pass_rate, "variance": screened.variance,
                    "agreement": share, "majority_answer": answer,
                    "terminated": screened.terminated(), "mean_entropy": screened.mean_entropy,
                }),
            }
        })
        .collect();
    ranking.sort_by(|x, y| {
        x.prediction
            .alarm
            .is_some()
            .cmp(&y.prediction.alarm.is_some())
            .then(y.prediction.effect.total_cmp(&x.prediction.effect))
            .then(x.id.cmp(&y.id))
    });
    for (i, c) in ranking.iter_mut().enumerate() {
        c.rank = i + 1;
    }
    let chosen = ranking
        .iter()
        .find(|c| c.prediction.helps())
        .map(|c| c.id.clone());
    let trials_seconds = trials.iter().map(|(_, t)| t.seconds).sum();
    let (update_seconds, responses) = trials.iter().fold((0.0, 0usize), |(s, n), (_, t)| {
        (s + t.update_seconds, n + t.responses)
    });
    let reference = TrainOptions::reference(PathBuf::new(), PathBuf::new(), PathBuf::new());
    let (full_steps, full_samples) = (reference.update.steps, reference.sampling.samples);
    let per_response = update_seconds / responses.max(1) as f64;
    // One round of the held-out prompts: what a trial spends beyond its updates, on average.
    let round_seconds = (trials_seconds - update_seconds) / trials.len().max(1) as f64;
    Selection {
        ranking,
        chosen,
        trials_seconds,
        full_run_seconds: per_response * (full_steps * full_samples) as f64 + round_seconds,
        full_steps,
        full_samples,
    }
}

/// Prints the ranking and writes `ranking.json` and, when a prompt was chosen, `chosen.jsonl` and
/// `top.jsonl`.
pub(super) fn write_selection(
    o: &SelectOptions,
    s: &Selection,
    line_of: &dyn Fn(&str) -> Result<String>,
) -> Result<()> {
    println!(
        "{:>4}  {:<24} {:>8} {:>18} {:>9} {:>9} {:>6}  call",
        "rank", "prompt", "effect", "95% CI", "answered", "length", "drift"
    );
    for c in &s.ranking {
        let p = &c.prediction;
        println!(
            "{:>4}  {:<24} {:>+8.3} {:>18} {:>9.3} {:>9.1} {:>6}  {}",
            c.rank,
            c.id,
            p.effect,
            format!("[{:+.3}, {:+.3}]", p.effect_ci95.0, p.effect_ci95.1),
            c.answered,
            c.length,
            c.drifted,
            match &p.alarm {
                Some(why) => format!("alarm: {why}"),
                None => p.call.clone(),
            }
        );
    }
    println!(
        "select: {} trials took {:.0} s, {:.2}× one full run ({} updates × {} responses, {:.0} s projected at the trials' own seconds per response, which their small updates inflate)",
        s.ranking.len(),
        s.trials_seconds,
        s.cost(),
        s.full_steps,
        s.full_samples,
        s.full_run_seconds
    );
    let ranking = json!({
        "by": o.by, "candidates": o.candidates, "trial_steps": o.trial_steps,
        "trial_samples": o.trial_samples, "trial_lr": o.trial_lr, "adapter": o.adapter.kind,
        "chosen": s.chosen, "ranking": s.ranking, "trials_seconds": s.trials_seconds,
        "full_run_seconds_projected": s.full_run_seconds, "cost_of_full_run": s.cost(),
    });
    write_atomic(
        &o.out.join("ranking.json"),
        serde_json::to_string_pretty(&ranking)? + "\n",
    )?;
    // Every candidate predicted to help, best first: `train --prompt top.jsonl --shots K`.
    let helping: Vec<&Candidate> = s.ranking.iter().filter(|c| c.prediction.helps()).collect();
    let (chosen_path, top_path) = (o.out.join("chosen.jsonl"), o.out.join("top.jsonl"));
    match &s.chosen {
        Some(id) => {
            write_atomic(&chosen_path, line_of(id)? + "\n")?;
            let mut top = String::new();
            for c in &helping {
                top += &(line_of(&c.id)? + "\n");
            }
            write_atomic(&top_path, top)?;
            println!(
                "chosen: {id} -> {} ({} predicted to help, best first, in {})",
                chosen_path.display(),
                helping.len(),
                top_path.display()
            );
        }
        None => {
            let _ = std::fs::remove_file(&chosen_path);
            let _ = std::fs::remove_file(&top_path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safeguard::Round;

    /// A round over 8 prompts whose answered shares are `each`, at length `length`.
    fn round(each: [f64; 8], length: f64, repetition: f64) -> Round {
        Round {
            weights_step: 0,
            n: 32,
            answered: each.iter().sum::<f64>() / 8.0,
            length,
            length_sd: 2.0,
            repetition,
            repetition_sd: 0.01,
            majority: (0..8).map(|i| Some(i.to_string())).collect(),
            answered_each: each.to_vec(),
        }
    }

    fn trial(id: &str, r: Round) -> Trial {
        Trial {
            id: id.into(),
            round: r,
            entropy_first: 0.1,
            entropy_last: 0.05,
            seconds: 2.0,
            update_seconds: 1.5,
            responses: 48,
            settings: Value::Null,
        }
    }

    fn screened(id: &str) -> PromptResult {
        serde_json::from_value(json!({
            "id": id, "n": 4, "correct": 2, "pass_rate": 0.5, "ci95": [0.15, 0.85],
            "variance": 0.25, "mean_entropy": 0.1, "mean_full_entropy": 0.1, "mean_length": 30.0,
            "answers": ["1", "1", "2", null], "correct_each": [true, true, false, false],
            "finish": ["eos", "eos", "eos", "length"], "unfinished_each": [false, false, false, true],
            "gold": ["1"]
        }))
        .unwrap()
    }

    #[test]
    fn the_effect_is_paired_over_prompts_and_alarms_rank_last() {
        let half = [0.5; 8];
        let baseline = Baseline {
            round: round(half, 30.0, 0.05),
            replicate: round(half, 30.0, 0.05),
        };
        // Every prompt answers more often: a clear effect.
        let better = round([0.75, 0.75, 0.5, 0.75, 0.75, 0.75, 0.5, 0.75], 30.0, 0.05);
        // The same model: exactly nothing.
        let same = round(half, 30.0, 0.05);
        // More answered still, but longer and more repetitive: the safeguard's alarm.
        let rambling = round([1.0; 8], 40.0, 0.2);
        let worse = round([0.25, 0.25, 0.5, 0.25, 0.25, 0.25, 0.25, 0.5], 30.0, 0.05);

        let p = Prediction::new(&baseline, &better);
        assert_eq!(p.call, "helps");
        assert!((p.effect - 0.1875).abs() < 1e-12 && p.effect_ci95.0 > 0.0);
        let p = Prediction::new(&baseline, &same);
        assert_eq!(
            (p.effect, p.effect_ci95, p.call.as_str()),
            (0.0, (0.0, 0.0), "unclear")
        );
        let p = Prediction::new(&baseline, &rambling);
        assert_eq!(p.call, "alarm");
        assert!(p.alarm.unwrap().contains("longer"));
        assert_eq!(Prediction::new(&baseline, &worse).call, "hurts");

        let ids = ["a", "b", "c", "d"];
        let results: Vec<PromptResult> = ids.iter().map(|id| screened(id)).collect();
        let trials = [better, same, rambling, worse]
            .into_iter()
            .zip(&results)
            .map(|(r, s)| (s, trial(&s.id, r)))
            .collect::<Vec<_>>();
        let selection = rank(&baseline, &trials);
        let order: Vec<&str> = selection.ranking.iter().map(|c| c.id.as_str()).collect();
        // By effect, the alarm last although its effect is the largest.
        assert_eq!(order, ["a", "b", "d", "c"]);
        assert_eq!(selection.chosen.as_deref(), Some("a"));
        // Trials of 48 responses at 1.5 s: a full run of 640 at the same rate, plus one round.
        assert!((selection.full_run_seconds - (1.5 / 48.0 * 640.0 + 0.5)).abs() < 1e-9);
        assert!((selection.cost() - 8.0 / selection.full_run_seconds).abs() < 1e-12);

        // Nothing predicted to help: nothing chosen.
        let selection = rank(&baseline, &trials[1..]);
        assert_eq!(selection.chosen, None);
    }
}
