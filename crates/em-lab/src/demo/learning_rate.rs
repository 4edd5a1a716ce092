//! The learning rate of each chosen prompt under each training, chosen on the validation split:
//! one run (seed 0) per rate tried, its greedy accuracy on validation, the best kept — except for
//! the worst prompt, trained on purpose at the largest rate.

use em_convert::OutType;
use em_pipeline::eval::mean_score;
use em_pipeline::{sampling_model, Result};

use super::evaluate::{eval_setting, setting};
use super::phases::Phases;
use super::train::{train_em, training_name, Arm};
use super::Demo;

/// Trains seed 0 at each of the arm's rates and evaluates it greedy on validation; notes the
/// accuracies against the base's (`base_validation`) and returns the rate to train over seeds.
pub(super) fn choose(
    demo: &Demo,
    arm: &Arm,
    base_validation: f64,
    phases: &mut Phases,
    notes: &mut Vec<String>,
) -> Result<f64> {
    let (c, training, runs_dir, lrs) = (arm.chosen, arm.training, &arm.runs_dir, arm.lrs);
    let mut best: Option<(f64, f64)> = None;
    let mut validation_notes = vec![];
    for &lr in lrs {
        let run_dir = demo.dir.join(format!("{runs_dir}/lr{lr:e}-seed0"));
        let tuned = train_em(demo, arm, &run_dir, lr, 0)?;
        phases.lap("train");
        let gguf = sampling_model(demo.backend, &tuned, &run_dir.join("gguf"), OutType::F32)?;
        phases.lap("convert");
        let g = eval_setting(
            demo,
            &tuned,
            &gguf,
            &demo.data.validation,
            &setting("val", 0.0, 1, None),
            &run_dir.join("validation"),
        )?;
        phases.lap("validation");
        validation_notes.push(format!("lr {lr:e}: {:.3}", mean_score(&g)));
        if best.is_none_or(|(_, b)| mean_score(&g) > b) {
            best = Some((lr, mean_score(&g)));
        }
    }
    let (chosen_lr, _) = best.expect("at least one learning rate");
    // The worst prompt is trained on purpose where it does most harm: the largest rate.
    let on_purpose = c.rules == ["majority-wrong"];
    let lr = if on_purpose {
        lrs.iter().copied().fold(f64::MIN, f64::max)
    } else {
        chosen_lr
    };
    notes.push(format!(
        "{} ({}): validation greedy after training {} (base {:.3}); validation picks lr {chosen_lr:e}{}",
        c.rules.join("/"),
        training_name(training.as_ref()),
        validation_notes.join(", "),
        base_validation,
        if on_purpose {
            format!("; trained over seeds at lr {lr:e}, the largest, to show the failure")
        } else {
            String::new()
        }
    ));
    Ok(lr)
}
