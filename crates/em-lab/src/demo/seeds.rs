//! Training over seeds: each seed's EM run at the chosen learning rate, the models it leaves
//! (tuned, and safeguarded where an alarm rolled it back) evaluated on the test split, the curve
//! of seed 0, and the prompt's rows over all seeds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use em_convert::OutType;
use em_pipeline::eval::{mean_score, ItemResult, Setting};
use em_pipeline::{sampling_model, Result};

use super::evaluate::{decoding_name, eval_setting, setting, Baselines};
use super::phases::Phases;
use super::plots::curve;
use super::report::{mean_over_seeds, row, RunSummary};
use super::train::{as_model, first_alarm, train_em, training_name, Arm};
use super::{Demo, Tally};

/// Test results per decoding name, one entry per seed.
type BySetting = BTreeMap<String, Vec<Vec<ItemResult>>>;

/// The test results of one prompt under one training, over seeds.
#[derive(Default)]
struct OverSeeds {
    tuned: BySetting,
    /// The safeguarded models: greedy only.
    guarded: BySetting,
}

/// What the safeguard makes of one run.
struct Guarded {
    /// Weights step of the first alarm, and its reason.
    alarm: Option<(usize, String)>,
    /// Updates in the model the safeguard leaves.
    step: usize,
    /// That model.
    model: PathBuf,
}

/// Trains the arm over seeds at `lr`, evaluates each seed's models on the test split and plots
/// seed 0; adds the runs, the curves and the prompt's rows to `tally`.
pub(super) fn train_over_seeds(
    demo: &Demo,
    arm: &Arm,
    lr: f64,
    base: &Baselines,
    phases: &mut Phases,
    tally: &mut Tally,
) -> Result<()> {
    let (c, runs_dir, kind) = (arm.chosen, &arm.runs_dir, &arm.kind);
    let mut results = OverSeeds::default();
    for seed in 0..arm.seeds as u64 {
        let run_dir = demo.dir.join(format!("{runs_dir}/lr{lr:e}-seed{seed}"));
        let tuned = train_em(demo, arm, &run_dir, lr, seed)?;
        if arm.training.is_none() {
            tally.full_runs.push(run_dir.clone());
        }
        phases.lap("train");
        let guarded = guarded_model(demo, &run_dir, &tuned)?;
        let greedy = evaluate_models(demo, &run_dir, &tuned, &guarded.model, phases, &mut results)?;
        tally.runs.push(RunSummary {
            rule: c.rules.join("/"),
            prompt: c.result.id.clone(),
            training: training_name(arm.training.as_ref()),
            lr,
            seed,
            alarm: guarded.alarm.clone(),
            guarded_step: guarded.step,
            test_greedy_tuned: greedy.0,
            test_greedy_guarded: greedy.1,
            test_greedy_base: base.greedy,
        });
        if seed == 0 {
            if arm.training.is_none() {
                tally
                    .guarded_dirs
                    .insert(arm.tag.to_string(), guarded.model.clone());
            }
            let test = &demo.data.test;
            tally.curves.push((
                format!("{} ({}, {kind}lr {lr:e})", c.rules.join("/"), c.result.id),
                curve(demo, &run_dir, &test[..demo.plan.curve.min(test.len())])?,
            ));
            phases.lap("curve");
        }
    }
    prompt_rows(demo, arm, lr, base, &results, tally);
    Ok(())
}

/// The run's first alarm and the model the safeguard leaves: the subject (no update passed),
/// the tuned model (no alarm), or the checkpoint before the alarm.
fn guarded_model(demo: &Demo, run_dir: &Path, tuned: &Path) -> Result<Guarded> {
    let alarm = first_alarm(&run_dir.join("metrics.jsonl"))?;
    let step = alarm
        .as_ref()
        .map_or(demo.plan.steps, |(s, _)| s.saturating_sub(1));
    let model = if step == 0 {
        demo.subject.clone()
    } else if step == demo.plan.steps {
        tuned.to_path_buf()
    } else {
        as_model(&demo.subject, &run_dir.join(format!("checkpoint-{step}")))?
    };
    Ok(Guarded { alarm, step, model })
}

/// Evaluates the tuned model (greedy and T=0.5) and, where it differs, the safeguarded one
/// (greedy) on the test split into `results`; returns their greedy accuracies.
fn evaluate_models(
    demo: &Demo,
    run_dir: &Path,
    tuned: &PathBuf,
    guarded: &PathBuf,
    phases: &mut Phases,
    results: &mut OverSeeds,
) -> Result<(f64, f64)> {
    let mut greedy = (0.0, 0.0);
    let mut models = vec![(tuned, "tuned")];
    if guarded != tuned {
        models.push((guarded, "guarded"));
    }
    for (model, which) in models {
        let gguf = sampling_model(
            demo.backend,
            model,
            &run_dir.join(format!("gguf-{which}")),
            OutType::F32,
        )?;
        phases.lap("convert");
        // The safeguarded model differs only where an alarm rolled it back: greedy only.
        let settings = if which == "tuned" {
            vec![
                setting(which, 0.0, 1, None),
                setting(which, 0.5, demo.plan.eval_n, None),
            ]
        } else {
            vec![setting(which, 0.0, 1, None)]
        };
        for s in settings {
            let items = eval_setting(
                demo,
                model,
                &gguf,
                &demo.data.test,
                &s,
                &run_dir.join(format!("test-{which}")),
            )?;
            phases.lap("test");
            let by = if which == "tuned" {
                &mut results.tuned
            } else {
                &mut results.guarded
            };
            if s.temperature == 0.0 {
                *(if which == "tuned" {
                    &mut greedy.0
                } else {
                    &mut greedy.1
                }) = mean_score(&items);
            }
            by.entry(decoding_name(&s)).or_default().push(items);
        }
    }
    if guarded == tuned {
        // No alarm: the safeguarded model is the tuned one.
        for (k, v) in results.tuned.iter().filter(|(k, _)| k.as_str() == "greedy") {
            results
                .guarded
                .entry(k.clone())
                .or_default()
                .push(v.last().expect("tuned results").clone());
        }
        greedy.1 = greedy.0;
    }
    Ok(greedy)
}

/// The prompt's rows under this training (tuned and safeguarded, per decoding, over seeds,
/// paired with the base), and its tuned items for the adapter comparison.
fn prompt_rows(
    demo: &Demo,
    arm: &Arm,
    lr: f64,
    base: &Baselines,
    results: &OverSeeds,
    tally: &mut Tally,
) {
    let (c, kind) = (arm.chosen, &arm.kind);
    for (label, by) in [("tuned", &results.tuned), ("safeguarded", &results.guarded)] {
        for (decoding, per_seed) in by {
            let s = Setting {
                label: label.into(),
                temperature: if decoding == "greedy" { 0.0 } else { 0.5 },
                n: if decoding == "greedy" {
                    1
                } else {
                    demo.plan.eval_n
                },
                em_inf: None,
            };
            let model = format!(
                "{label} on {} ({}, {kind}lr {lr:e})",
                c.rules.join("/"),
                c.result.id
            );
            tally
                .rows
                .push(row(&model, &s, per_seed, base.by_decoding.get(decoding)));
            if label == "tuned" {
                let by_training = tally
                    .tuned_items
                    .entry((c.rules.join("/"), decoding.clone()))
                    .or_insert_with(|| vec![None; arm.trainings.len()]);
                let i = arm
                    .trainings
                    .iter()
                    .position(|t| t == arm.training)
                    .unwrap_or(0);
                by_training[i] = Some(mean_over_seeds(per_seed));
            }
        }
    }
}
