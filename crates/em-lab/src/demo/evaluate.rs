//! Evaluation on the organism's splits: the decoding settings and their names, one setting of
//! one model on some problems, the base model's baselines, and the good run served quantized.

use std::collections::BTreeMap;
use std::path::Path;

use em_convert::OutType;
use em_data::Problem;
use em_pipeline::eval::{self, mean_score, Decoding, ItemResult, Setting};
use em_pipeline::{sampling_model, Result};
use em_sampler::EmInf;

use super::phases::Phases;
use super::report::{row, Row};
use super::{Demo, Tally};
use crate::{analyze, organism};

pub(super) fn setting(label: &str, temperature: f32, n: usize, em_inf: Option<EmInf>) -> Setting {
    Setting {
        label: label.into(),
        temperature,
        n,
        em_inf,
    }
}

/// `greedy`, `T=0.5`, `T=0.5 EM-INF`.
pub(super) fn decoding_name(s: &Setting) -> String {
    let t = if s.temperature <= 0.0 {
        "greedy".to_string()
    } else {
        format!("T={}", s.temperature)
    };
    match s.em_inf {
        Some(_) => format!("{t} EM-INF"),
        None => t,
    }
}

/// Evaluates `setting` of the model `source` (served as `gguf`) on `problems`, into
/// `<out_dir>/<setting tag>.jsonl` (reused where it holds the same evaluation).
pub(super) fn eval_setting(
    demo: &Demo,
    source: &Path,
    gguf: &Path,
    problems: &[Problem],
    setting: &Setting,
    out_dir: &Path,
) -> Result<Vec<ItemResult>> {
    std::fs::create_dir_all(out_dir)?;
    let decoding = Decoding {
        prompt: organism::prompt_options(),
        top_p: 0.95,
        max_new_tokens: demo.plan.max_new_tokens,
        seed: 1234,
    };
    let file = out_dir.join(format!("{}.jsonl", setting.tag()));
    eval::evaluate(
        demo.backend,
        source,
        gguf,
        problems,
        setting,
        &decoding,
        &file,
    )
}

/// The base model's results the tuned ones are compared with.
pub(super) struct Baselines {
    /// Test items per decoding name.
    pub(super) by_decoding: BTreeMap<String, Vec<ItemResult>>,
    /// Greedy accuracy on the test split.
    pub(super) greedy: f64,
    /// Greedy accuracy on the validation split.
    pub(super) validation: f64,
}

/// The base model on the test split (greedy, low temperature, sampling, EM-INF; one row each)
/// and greedy on the validation split.
pub(super) fn baselines(demo: &Demo, base_gguf: &Path, rows: &mut Vec<Row>) -> Result<Baselines> {
    let plan = &demo.plan;
    let eval_dir = demo.dir.join("test");
    let base_settings = vec![
        setting("base", 0.0, 1, None),
        setting("base", 0.1, plan.eval_n, None),
        setting("base", 0.25, plan.eval_n, None),
        setting("base", 0.5, plan.eval_n, None),
        setting("base", 0.0, 1, Some(plan.em_inf)),
        setting("base", 0.5, plan.eval_n, Some(plan.em_inf)),
    ];
    let mut base: BTreeMap<String, Vec<ItemResult>> = BTreeMap::new();
    for s in &base_settings {
        let items = eval_setting(
            demo,
            &demo.subject,
            base_gguf,
            &demo.data.test,
            s,
            &eval_dir,
        )?;
        rows.push(row("base", s, std::slice::from_ref(&items), None));
        base.insert(decoding_name(s), items);
    }
    let greedy = mean_score(&base["greedy"]);
    let validation = mean_score(&eval_setting(
        demo,
        &demo.subject,
        base_gguf,
        &demo.data.validation,
        &setting("val-base", 0.0, 1, None),
        &demo.dir.join("validation"),
    )?);
    Ok(Baselines {
        by_decoding: base,
        greedy,
        validation,
    })
}

/// The safeguarded good run (`majority-right`, else `trial`; seed 0, full fine-tuning)
/// served quantized, greedy on the test split, and a note on what EM did to its weights; nothing
/// where the safeguard left the base model.
pub(super) fn quantized_good_run(
    demo: &Demo,
    base: &Baselines,
    tally: &mut Tally,
    phases: &mut Phases,
    notes: &mut Vec<String>,
) -> Result<()> {
    let guarded_dirs = &tally.guarded_dirs;
    let Some(good) = guarded_dirs
        .get("majority-right")
        .or_else(|| guarded_dirs.get("trial"))
        .filter(|d| d.as_path() != demo.subject.as_path())
    else {
        return Ok(());
    };
    let tuned_dir = good.clone();
    let quant = OutType::Q4KM;
    let out = tuned_dir.with_extension(format!("gguf-{}", analyze::out_name(quant)));
    let gguf = sampling_model(demo.backend, &tuned_dir, &out, quant)?;
    let s = setting(&format!("good-{}", analyze::out_name(quant)), 0.0, 1, None);
    let items = eval_setting(demo, &tuned_dir, &gguf, &demo.data.test, &s, &out)?;
    tally.rows.push(row(
        &format!("safeguarded good run ({})", analyze::out_name(quant)),
        &s,
        &[items],
        base.by_decoding.get("greedy"),
    ));
    phases.lap("quantized");
    let fidelity = analyze::fidelity(&demo.subject, &tuned_dir)?;
    notes.push(format!(
        "good run: {}",
        analyze::fidelity_summary(&fidelity).replace('\n', "; ")
    ));
    Ok(())
}
