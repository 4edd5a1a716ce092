//! Evaluation: accuracy of a model on math suites through any [`Backend`], per-item results
//! written as they come (and resumed), summaries with intervals, and the paired comparison against
//! a baseline — including the baseline at lower temperatures, which in our trials beat EM.
//!
//! Output directory: `manifest.json` (model, baseline, suites, settings; a rerun that differs is
//! refused), `model/` and `baseline/` (GGUFs converted from HF directories),
//! `{suite}.{setting}.jsonl` (one fsynced line per item), `summary.json` and `summary.md`.
//!
//! [`run`] composes the stages, each usable alone: the options and settings ([`EvalOptions`],
//! [`Setting`]), [`load_suites`], the [`Baseline`] and its [`manifest`], each setting evaluated
//! suite by suite ([`evaluate_setting`] through [`evaluate`]), the [`Results`] summarized and
//! compared ([`compare_all`]) and written ([`write_reports`]).

mod baseline;
mod items;
mod options;
mod report;

use std::path::{Path, PathBuf};

use em_data::Problem;
use em_store::Manifest;
use serde_json::json;

pub use baseline::{adopt_folder, baseline_settings, check_folder, read_folder, Baseline};
pub use items::{evaluate, load_suites, ItemResult, SampleResult};
pub use options::{Decoding, EvalOptions, Setting};
pub use report::{
    compare, compare_all, mean_score, summarize, write_reports, Comparison, Results, SuiteSummary,
};

use crate::{AdaptedBackend, Backend, Result};

/// One side of the comparison as it is sampled: the backend, with the side's LoRA adapter applied
/// when it has one, and the model it names (the adapter where it has one, else the model).
pub struct Side<'a> {
    adapted: Option<AdaptedBackend<'a>>,
    plain: &'a dyn Backend,
    pub source: PathBuf,
}

impl<'a> Side<'a> {
    /// `model` sampled through `backend`, with `adapter` (a LoRA GGUF on the base GGUF `model`).
    pub fn new(backend: &'a dyn Backend, model: &Path, adapter: Option<&Path>) -> Result<Self> {
        let adapted = match adapter {
            Some(_) => Some(AdaptedBackend::new(backend, model)?),
            None => None,
        };
        Ok(Side {
            adapted,
            plain: backend,
            source: adapter.unwrap_or(model).to_path_buf(),
        })
    }

    /// The backend this side samples through.
    pub fn backend(&self) -> &dyn Backend {
        match &self.adapted {
            Some(a) => a,
            None => self.plain,
        }
    }
}

/// Refuses `--adapter` or `--baseline-adapter` where the backend cannot apply one or its base is
/// not a GGUF file.
pub fn check_adapters(args: &EvalOptions, backend: &dyn Backend) -> Result<()> {
    for (flag, adapter, base) in [
        ("--adapter", &args.adapter, Some(&args.model)),
        (
            "--baseline-adapter",
            &args.baseline_adapter,
            args.baseline.as_ref(),
        ),
    ] {
        let (Some(adapter), Some(base)) = (adapter, base) else {
            continue;
        };
        if !backend.applies_adapters() {
            anyhow::bail!(
                "{}: {flag}: this backend cannot apply a LoRA adapter (use --backend llama)",
                adapter.display()
            );
        }
        if !base.is_file() {
            anyhow::bail!(
                "{flag} {} needs its base to be a GGUF file, not {}",
                adapter.display(),
                base.display()
            );
        }
    }
    Ok(())
}

/// The manifest of an eval output: the model, the baseline and suites, and the settings.
pub fn manifest(
    args: &EvalOptions,
    backend: &dyn Backend,
    model: &Path,
    baseline: Option<&Baseline>,
    suites: &[(String, PathBuf, Vec<Problem>)],
) -> Result<Manifest> {
    let quant = |m: &Path| {
        if m.is_dir() {
            format!("{:?}", args.quant).to_lowercase()
        } else {
            "as given".into()
        }
    };
    let mut m = Manifest::new(
        "eval",
        em_store::model_identity(model)?,
        json!({
            "temperature": args.temperature,
            "n": args.n,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "prompt": args.prompt,
            "quant": quant(&args.model),
            "baseline_quant": match baseline {
                Some(Baseline::Model { path, .. }) => Some(quant(path)),
                _ => None,
            },
            "backend": backend.identity(),
        }),
    );
    // Recorded only when on, so that evaluations made before the option existed still resume.
    if let Some(e) = args.em_inf {
        m.settings["em_inf"] = json!(e);
    }
    if let Some(e) = args.baseline_em_inf {
        m.settings["baseline_em_inf"] = json!(e);
    }
    for (label, path, _) in suites {
        m.inputs
            .insert(format!("suite:{label}"), em_store::file_identity(path)?);
    }
    if let Some(b) = baseline {
        b.record(&mut m)?;
    }
    m.info = json!({ "tool": crate::TOOL });
    Ok(m)
}

/// Evaluates every suite at `setting` with `side`'s model (sampled from `gguf`) into
/// `{suite}.{tag}.jsonl` under the output directory, adding each suite's items to `results`.
pub fn evaluate_setting(
    args: &EvalOptions,
    suites: &[(String, Vec<Problem>)],
    side: &Side,
    gguf: &Path,
    setting: &Setting,
    results: &mut Results,
) -> Result<()> {
    for (suite, problems) in suites {
        let items = evaluate(
            side.backend(),
            &side.source,
            gguf,
            problems,
            setting,
            &args.decoding(),
            &args.out.join(format!("{suite}.{}.jsonl", setting.tag())),
        )?;
        results.add(suite, setting, items);
    }
    Ok(())
}

/// Runs the evaluation (see the module documentation); returns the summaries and comparisons.
pub fn run(
    args: &EvalOptions,
    backend: &dyn Backend,
) -> Result<(Vec<SuiteSummary>, Vec<Comparison>)> {
    check_adapters(args, backend)?;
    let suites = load_suites(&args.suites, args.limit)?;
    let baseline = args
        .baseline
        .as_deref()
        .map(|b| Baseline::resolve(b, args.baseline_adapter.as_deref()))
        .transpose()?;
    // Under --adapter the model side samples the base with the adapter applied, and names the
    // adapter where it would name a model; the baseline side samples without it.
    let model = Side::new(backend, &args.model, args.adapter.as_deref())?;
    let ours = manifest(
        args,
        model.backend(),
        &model.source,
        baseline.as_ref(),
        &suites,
    )?;
    if let Some(Baseline::Folder { dir, manifest }) = &baseline {
        check_folder(dir, manifest, &ours)?;
    }
    ours.claim(&args.out, args.fresh)?;
    let suites: Vec<(String, Vec<Problem>)> = suites.into_iter().map(|(l, _, p)| (l, p)).collect();
    let gguf = crate::sampling_model(model.backend(), &model.source, &args.out, args.quant)?;
    let main = args.model_setting();
    let mut results = Results::default();
    // A folder baseline is read before any sampling, so a folder that lacks items stops the run
    // before it does work.
    let reused = match &baseline {
        Some(Baseline::Folder { dir, .. }) => Some(read_folder(dir, &suites, &main.tag())?),
        _ => None,
    };
    evaluate_setting(args, &suites, &model, &gguf, &main, &mut results)?;

    let same = Setting {
        label: "baseline".into(),
        ..main.clone()
    };
    let settings = match &baseline {
        None => vec![],
        Some(Baseline::Folder { dir, .. }) => {
            let reused = reused.expect("read for a folder baseline");
            adopt_folder(&args.out, dir, reused, &same, &mut results)?;
            vec![same]
        }
        Some(Baseline::Model { path, adapter }) => {
            let side = Side::new(backend, path, adapter.as_deref())?;
            let out = args.out.join("baseline");
            let gguf = crate::sampling_model(side.backend(), &side.source, &out, args.quant)?;
            let settings = baseline_settings(args, &main, same);
            for s in &settings {
                evaluate_setting(args, &suites, &side, &gguf, s, &mut results)?;
            }
            settings
        }
    };
    let comparisons = compare_all(&results, &suites, &main, &settings);
    write_reports(&args.out, &results.summaries, &comparisons)?;
    Ok((results.summaries, comparisons))
}
