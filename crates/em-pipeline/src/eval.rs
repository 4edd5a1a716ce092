//! Evaluation: accuracy of a model on math suites through any [`Backend`], per-item results
//! written as they come (and resumed), summaries with intervals, and the paired comparison against
//! a baseline — including the baseline at lower temperatures, which in our trials beat EM.
//!
//! Output directory: `manifest.json` (model, baseline, suites, settings; a rerun that differs is
//! refused), `model/` and `baseline/` (GGUFs converted from HF directories),
//! `{suite}.{setting}.jsonl` (one fsynced line per item), `summary.json` and `summary.md`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use em_convert::OutType;
use em_data::Problem;
use em_sampler::{EmInf, Request, SamplingParams};
use em_store::{write_atomic, JsonlStore, Manifest};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::prompt::{PromptOptions, PromptRenderer};
use crate::{Backend, Result};

/// What to evaluate and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalOptions {
    /// A .gguf file, or an HF directory (converted with --quant first).
    pub model: PathBuf,
    /// GGUF type when --model (or --baseline) is an HF directory.
    pub quant: OutType,
    /// Comma-separated suites: math500, gsm8k, minerva, olympiadbench, amc23, aime24, aime25, svamp,
    /// mawps, asdiv, math, or paths to JSONL/JSON files.
    pub suites: Vec<String>,
    /// Output directory (per-item JSONL, summary.json, summary.md).
    pub out: PathBuf,
    /// Only the first N items of each suite.
    pub limit: Option<usize>,
    /// Sampling temperature; 0 is greedy (the default, as the toolkit evaluates).
    pub temperature: f32,
    /// Samples per item (avg@n and pass@n when > 1).
    pub n: usize,
    pub top_p: f32,
    pub max_new_tokens: usize,
    #[serde(flatten)]
    pub prompt: PromptOptions,
    /// A LoRA GGUF (`adapter.gguf` of a `train --adapter lora` run) that llama.cpp applies to
    /// `--model`, which must then be the base GGUF; the manifest records the adapter as the model
    /// and the base with the backend.
    pub adapter: Option<PathBuf>,
    /// A baseline for the paired comparison: a model (.gguf or HF directory), evaluated here
    /// without `--adapter`, or a finished eval folder of the same suites and settings, whose
    /// per-item results are reused (its low-temperature settings are not re-run then).
    pub baseline: Option<PathBuf>,
    /// The baseline's own LoRA GGUF, applied to `--baseline` (a base GGUF).
    pub baseline_adapter: Option<PathBuf>,
    /// Further temperatures at which to run the baseline (0 = greedy), since plain low-temperature
    /// sampling may beat what EM gains.
    pub baseline_temperatures: Vec<f32>,
    pub seed: u64,
    /// Decode the model with EM-INF, inference-time entropy minimisation of each step's logits
    /// (`steps=5,lr=1,kl=0.1`, or `default`); llama.cpp backend only.
    pub em_inf: Option<EmInf>,
    /// Also run the baseline with EM-INF (at the model's temperature): the training-free
    /// counterpart of EM, next to it.
    pub baseline_em_inf: Option<EmInf>,
    /// Replace an output directory that holds another run.
    pub fresh: bool,
}

/// How every item is prompted and decoded, whatever the setting's temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    pub prompt: PromptOptions,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl EvalOptions {
    /// The decoding settings of this evaluation.
    pub fn decoding(&self) -> Decoding {
        Decoding {
            prompt: self.prompt.clone(),
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        }
    }
}

/// One setting of a run: which model, at which temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub label: String,
    pub temperature: f32,
    pub n: usize,
    /// Inference-time entropy minimisation of each decoding step (EM-INF), or none.
    pub em_inf: Option<EmInf>,
}

impl Setting {
    /// The file-name tag of this setting, e.g. `model.greedy` or `model.t0.5-n4`.
    pub fn tag(&self) -> String {
        let decoding = if self.temperature <= 0.0 {
            "greedy".to_string()
        } else {
            format!("t{}-n{}", self.temperature, self.n)
        };
        match &self.em_inf {
            Some(e) => format!(
                "{}.{decoding}-eminf{}-lr{}-kl{}",
                self.label, e.steps, e.lr, e.max_kl
            ),
            None => format!("{}.{decoding}", self.label),
        }
    }
}

/// One item's samples, as written to the per-item JSONL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    /// The rendered prompt text the model was given (absent in folders written before it was
    /// recorded); `analyze logits` reads it with each response.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prompt: String,
    pub gold: Vec<String>,
    pub samples: Vec<SampleResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleResult {
    pub response: String,
    pub pred: Option<String>,
    pub correct: bool,
    pub n_tokens: usize,
    pub finish: String,
}

impl ItemResult {
    /// Fraction of samples correct.
    pub fn score(&self) -> f64 {
        self.samples.iter().filter(|s| s.correct).count() as f64 / self.samples.len().max(1) as f64
    }
}

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
}

/// The manifest of an eval output: the model, the baseline and suites, and the settings.
fn manifest(
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
    match baseline {
        Some(Baseline::Model { path, adapter }) => {
            m.inputs
                .insert("baseline".into(), em_store::model_identity(path)?);
            if let Some(a) = adapter {
                m.inputs
                    .insert("baseline_adapter".into(), em_store::file_identity(a)?);
            }
        }
        Some(Baseline::Folder { manifest, .. }) => {
            // A folder made under --adapter names the adapter as its model and its base in the
            // backend's identity: recorded as a baseline model with its adapter.
            let base = manifest.settings["backend"].get("adapter_base").cloned();
            match base.and_then(|b| serde_json::from_value::<em_store::Identity>(b).ok()) {
                Some(base) => {
                    m.inputs.insert("baseline".into(), base);
                    m.inputs
                        .insert("baseline_adapter".into(), manifest.model.clone());
                }
                None => {
                    m.inputs.insert("baseline".into(), manifest.model.clone());
                }
            }
            m.settings["baseline_from"] = json!("eval folder");
        }
        None => {}
    }
    m.info = json!({ "tool": crate::TOOL });
    Ok(m)
}

/// Runs the evaluation (see the module documentation); returns the summaries and comparisons.
pub fn run(
    args: &EvalOptions,
    backend: &dyn Backend,
) -> Result<(Vec<SuiteSummary>, Vec<Comparison>)> {
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
    let suites = load_suites(&args.suites, args.limit)?;
    let baseline = args
        .baseline
        .as_deref()
        .map(|b| Baseline::resolve(b, args.baseline_adapter.as_deref()))
        .transpose()?;
    // Under --adapter the model side samples the base with the adapter applied, and names the
    // adapter where it would name a model; the baseline side samples without it.
    let adapted = match &args.adapter {
        Some(_) => Some(crate::AdaptedBackend::new(backend, &args.model)?),
        None => None,
    };
    let model_backend: &dyn Backend = match &adapted {
        Some(a) => a,
        None => backend,
    };
    let model_source = args.adapter.as_ref().unwrap_or(&args.model);
    let ours = manifest(
        args,
        model_backend,
        model_source,
        baseline.as_ref(),
        &suites,
    )?;
    if let Some(Baseline::Folder { dir, manifest }) = &baseline {
        check_folder(dir, manifest, &ours)?;
    }
    ours.claim(&args.out, args.fresh)?;
    let suites: Vec<(String, Vec<Problem>)> = suites.into_iter().map(|(l, _, p)| (l, p)).collect();
    let model = crate::sampling_model(model_backend, model_source, &args.out, args.quant)?;
    let mut main_setting = Setting {
        label: "model".into(),
        temperature: args.temperature,
        n: args.n,
        em_inf: args.em_inf,
    };
    if main_setting.temperature <= 0.0 {
        main_setting.n = 1;
    }
    let mut summaries = vec![];
    let mut results: BTreeMap<(String, String), Vec<ItemResult>> = BTreeMap::new();
    let mut run_one =
        |backend: &dyn Backend, source: &Path, gguf: &Path, setting: &Setting| -> Result<()> {
            for (suite, problems) in &suites {
                let items = evaluate(
                    backend,
                    source,
                    gguf,
                    problems,
                    setting,
                    &args.decoding(),
                    &args.out.join(format!("{suite}.{}.jsonl", setting.tag())),
                )?;
                let summary = summarize(suite, setting, &items);
                print_summary(&summary);
                summaries.push(summary);
                results.insert((suite.clone(), setting.tag()), items);
            }
            Ok(())
        };
    // A folder baseline is read before any sampling, so a folder that lacks items stops the run
    // before it does work.
    let reused = match &baseline {
        Some(Baseline::Folder { dir, .. }) => Some(
            suites
                .iter()
                .map(|(suite, problems)| {
                    Ok((
                        suite.clone(),
                        folder_items(dir, suite, &main_setting.tag(), problems)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        _ => None,
    };
    run_one(model_backend, model_source, &model, &main_setting)?;

    let baseline_setting = Setting {
        label: "baseline".into(),
        ..main_setting.clone()
    };
    let settings = match &baseline {
        None => vec![],
        Some(Baseline::Folder { dir, .. }) => {
            for (suite, items) in reused.expect("read for a folder baseline") {
                // A copy in this folder, so that it holds every result it summarizes.
                let mut lines = String::new();
                for item in &items {
                    lines += &serde_json::to_string(item)?;
                    lines.push('\n');
                }
                em_store::write_atomic(
                    &args
                        .out
                        .join(format!("{suite}.{}.jsonl", baseline_setting.tag())),
                    lines,
                )?;
                let summary = summarize(&suite, &baseline_setting, &items);
                print_summary(&summary);
                summaries.push(summary);
                results.insert((suite, baseline_setting.tag()), items);
            }
            println!(
                "baseline: per-item results reused from {}; its lower temperatures are not run \
                 (evaluate the base model itself for them)",
                dir.display()
            );
            vec![baseline_setting]
        }
        Some(Baseline::Model { path, adapter }) => {
            let adapted = match adapter {
                Some(_) => Some(crate::AdaptedBackend::new(backend, path)?),
                None => None,
            };
            let base_backend: &dyn Backend = match &adapted {
                Some(a) => a,
                None => backend,
            };
            let source = adapter.as_ref().unwrap_or(path);
            let base = crate::sampling_model(
                base_backend,
                source,
                &args.out.join("baseline"),
                args.quant,
            )?;
            let settings = baseline_settings(args, &main_setting, baseline_setting);
            for s in &settings {
                run_one(base_backend, source, &base, s)?;
            }
            settings
        }
    };
    let mut comparisons = vec![];
    if !settings.is_empty() {
        for (suite, _) in &suites {
            let tuned = &results[&(suite.clone(), main_setting.tag())];
            let same = &results[&(suite.clone(), settings[0].tag())];
            let best = settings
                .iter()
                .map(|s| (s, mean_score(&results[&(suite.clone(), s.tag())])))
                .reduce(|best, next| if next.1 > best.1 { next } else { best })
                .expect("at least one baseline setting");
            let best_items = &results[&(suite.clone(), best.0.tag())];
            comparisons.push(compare(
                suite,
                tuned,
                same,
                &settings[0].tag(),
                best_items,
                &best.0.tag(),
            ));
        }
    }
    write_reports(&args.out, &summaries, &comparisons)?;
    Ok((summaries, comparisons))
}

/// What the model is compared with.
enum Baseline {
    /// A model evaluated here, with its own adapter or none.
    Model {
        path: PathBuf,
        adapter: Option<PathBuf>,
    },
    /// A finished eval output whose model results are reused.
    Folder { dir: PathBuf, manifest: Manifest },
}

impl Baseline {
    fn resolve(path: &Path, adapter: Option<&Path>) -> Result<Self> {
        let manifest_path = path.join("manifest.json");
        if !(path.is_dir() && manifest_path.is_file()) {
            return Ok(Baseline::Model {
                path: path.to_path_buf(),
                adapter: adapter.map(Path::to_path_buf),
            });
        }
        if let Some(a) = adapter {
            anyhow::bail!(
                "--baseline-adapter {}: --baseline {} is an eval folder, whose results already \
                 say what was evaluated",
                a.display(),
                path.display()
            );
        }
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("{}: cannot read", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a manifest", manifest_path.display()))?;
        if manifest.kind != "eval" {
            anyhow::bail!(
                "{}: holds a {} output; --baseline takes a model or an eval folder",
                path.display(),
                manifest.kind
            );
        }
        Ok(Baseline::Folder {
            dir: path.to_path_buf(),
            manifest,
        })
    }
}

/// The settings of an eval output that its model results depend on.
const RESULT_SETTINGS: [&str; 7] = [
    "temperature",
    "n",
    "top_p",
    "max_new_tokens",
    "seed",
    "prompt",
    "em_inf",
];

/// Refuses an eval folder whose model results were not made by the suites and settings of `ours`,
/// naming what differs.
fn check_folder(dir: &Path, folder: &Manifest, ours: &Manifest) -> Result<()> {
    let mut differs = vec![];
    for key in RESULT_SETTINGS {
        let (there, now) = (&folder.settings[key], &ours.settings[key]);
        if there != now {
            differs.push(format!("{key}: {there} there, {now} now"));
        }
    }
    for (role, id) in ours.inputs.iter().filter(|(r, _)| r.starts_with("suite:")) {
        match folder.inputs.get(role) {
            Some(t) if t == id => {}
            Some(t) => differs.push(format!("{role}: {t} there, {id} now")),
            None => differs.push(format!("{role}: not evaluated there")),
        }
    }
    if !differs.is_empty() {
        anyhow::bail!(
            "{}: cannot serve as the baseline: {}",
            dir.display(),
            differs.join("; ")
        );
    }
    Ok(())
}

/// The folder's model results at `tag` for `problems`, in their order.
fn folder_items(
    dir: &Path,
    suite: &str,
    tag: &str,
    problems: &[Problem],
) -> Result<Vec<ItemResult>> {
    let path = dir.join(format!("{suite}.{tag}.jsonl"));
    if !path.is_file() {
        anyhow::bail!(
            "{}: missing (the eval there did not finish {suite})",
            path.display()
        );
    }
    let (_, done) = JsonlStore::<ItemResult>::open(&path)?;
    let items = in_suite_order(problems, done);
    if items.len() < problems.len() {
        anyhow::bail!(
            "{}: holds {} of the {} items asked for (rerun that eval with a larger --limit)",
            path.display(),
            items.len(),
            problems.len()
        );
    }
    Ok(items)
}

/// The baseline's settings: the model's own, the lower temperatures, and EM-INF when asked.
fn baseline_settings(args: &EvalOptions, main: &Setting, same: Setting) -> Vec<Setting> {
    let mut settings = vec![same];
    for &t in &args.baseline_temperatures {
        let s = Setting {
            label: "baseline".into(),
            temperature: t,
            n: if t <= 0.0 { 1 } else { args.n },
            em_inf: None,
        };
        if !settings.iter().any(|x| x.tag() == s.tag()) {
            settings.push(s);
        }
    }
    if let Some(e) = args.baseline_em_inf {
        settings.push(Setting {
            label: "baseline".into(),
            em_inf: Some(e),
            ..main.clone()
        });
    }
    settings
}

/// Mean per-item score (accuracy, or avg@n).
pub fn mean_score(items: &[ItemResult]) -> f64 {
    items.iter().map(ItemResult::score).sum::<f64>() / items.len().max(1) as f64
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
    let by_id: std::collections::HashMap<&str, &ItemResult> =
        b.iter().map(|r| (r.id.as_str(), r)).collect();
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
    SuiteSummary {
        suite: suite.into(),
        setting: setting.tag(),
        n_items,
        samples_per_item,
        accuracy,
        ci95,
        pass_at_n,
        mean_tokens: tokens as f64 / n_samples.max(1) as f64,
    }
}

fn print_summary(s: &SuiteSummary) {
    let pass = s.pass_at_n.map_or(String::new(), |p| {
        format!(", pass@{} {:.3}", s.samples_per_item, p)
    });
    println!(
        "{} [{}]: accuracy {:.3} (95% CI {:.3}-{:.3}, n={}){pass}, {:.0} tokens/answer",
        s.suite, s.setting, s.accuracy, s.ci95.0, s.ci95.1, s.n_items, s.mean_tokens
    );
}

/// The suites by label, with their files and (limited) problems.
pub fn load_suites(
    names: &[String],
    limit: Option<usize>,
) -> Result<Vec<(String, PathBuf, Vec<Problem>)>> {
    names
        .iter()
        .map(|name| {
            let path = crate::assets::suite_path(name)?;
            let mut problems = em_data::load_suite(&path)?;
            if let Some(n) = limit {
                problems.truncate(n);
            }
            let label = Path::new(name)
                .file_stem()
                .map_or(name.clone(), |s| s.to_string_lossy().into_owned());
            Ok((label, path, problems))
        })
        .collect()
}

/// Evaluates `problems` at `setting` with the model `source` (sampled from `gguf`), appending one
/// JSON line per finished item to `out` and skipping items already there. Returns all items in
/// suite order.
pub fn evaluate(
    backend: &dyn Backend,
    source: &Path,
    gguf: &Path,
    problems: &[Problem],
    setting: &Setting,
    args: &Decoding,
    out: &Path,
) -> Result<Vec<ItemResult>> {
    let (mut store, done) = JsonlStore::<ItemResult>::open(out)?;
    let done_ids: HashSet<String> = done.iter().map(|d| d.id.clone()).collect();
    let todo: Vec<&Problem> = problems
        .iter()
        .filter(|p| !done_ids.contains(&p.id))
        .collect();
    let mut params = SamplingParams::greedy(args.max_new_tokens);
    if setting.temperature > 0.0 {
        params.greedy = false;
        params.temperature = setting.temperature;
        params.top_p = args.top_p;
        params.seed = args.seed;
    }
    params.em_inf = setting.em_inf;
    let mut requests = Vec::with_capacity(todo.len());
    let mut prompt_texts = Vec::with_capacity(todo.len());
    // A finished suite loads nothing: the model is read only when items remain.
    if !todo.is_empty() {
        crate::with_vocab(backend, source, &mut |vocab| {
            let renderer = PromptRenderer::new(vocab, &args.prompt)?;
            for p in &todo {
                let prompt = renderer
                    .render(p)
                    .with_context(|| format!("problem {}", p.id))?;
                // What the model saw on the suite's first problem, in the output's manifest (when
                // the output has one; a resumed run wrote it before that problem was done).
                if p.id == problems[0].id {
                    if let Some(dir) = out.parent().filter(|d| d.join("manifest.json").is_file()) {
                        let name = out.file_stem().unwrap_or_default().to_string_lossy();
                        Manifest::note(
                            dir,
                            &format!("first_prompt:{name}"),
                            json!({"id": p.id, "text": prompt.text, "ids": prompt.ids}),
                        )?;
                    }
                }
                // Each item gets its own random stream: with one seed for all, sample i of every item
                // would draw the same uniforms and make the same early choices across items.
                let params = SamplingParams {
                    seed: crate::item_seed(params.seed, &p.id),
                    ..params.clone()
                };
                requests.push(Request {
                    prompt: prompt.to_prompt(),
                    n_samples: setting.n,
                    params,
                });
                prompt_texts.push(prompt.text.clone());
            }
            Ok(())
        })?;
    }
    let prefix = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bar =
        crate::drive::progress_bar(problems.len() as u64, done.len() as u64, "items", &prefix);
    let mut new_items: Vec<ItemResult> = vec![];
    if !requests.is_empty() {
        backend.with_sampler(gguf, &mut |sampler| {
            crate::drive::sample_each(
                sampler,
                &requests,
                &bar,
                crate::drive::Count::Requests,
                &mut |request, samples| {
                    let problem = todo[request];
                    let item = ItemResult {
                        id: problem.id.clone(),
                        prompt: prompt_texts[request].clone(),
                        gold: problem.answers.clone(),
                        samples: samples
                            .iter()
                            .map(|s| {
                                let verdict = em_grade::grade(&s.text, &problem.answers);
                                SampleResult {
                                    response: s.text.clone(),
                                    pred: verdict.pred,
                                    correct: verdict.correct,
                                    n_tokens: s.n_tokens,
                                    finish: format!("{:?}", s.finish).to_lowercase(),
                                }
                            })
                            .collect(),
                    };
                    store.append(&item)?;
                    new_items.push(item);
                    Ok(true)
                },
            )?;
            Ok(())
        })?;
    }
    let items = in_suite_order(problems, done.into_iter().chain(new_items));
    if items.len() < problems.len() {
        anyhow::bail!(
            "{}: {} of {} items were not evaluated (the sampler stopped early)",
            out.display(),
            problems.len() - items.len(),
            problems.len()
        );
    }
    Ok(items)
}

/// The results for `problems`, in their order (one per problem that has one).
fn in_suite_order(
    problems: &[Problem],
    results: impl IntoIterator<Item = ItemResult>,
) -> Vec<ItemResult> {
    let mut by_id: std::collections::HashMap<String, ItemResult> =
        results.into_iter().map(|i| (i.id.clone(), i)).collect();
    problems
        .iter()
        .filter_map(|p| by_id.remove(&p.id))
        .collect()
}

fn write_reports(out: &Path, summaries: &[SuiteSummary], comparisons: &[Comparison]) -> Result<()> {
    let summary = json!({ "suites": summaries, "comparisons": comparisons });
    write_atomic(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let mut md = String::from("| suite | setting | n | accuracy | 95% CI | pass@n | tokens/answer |\n|---|---|---|---|---|---|---|\n");
    for s in summaries {
        md += &format!(
            "| {} | {} | {} | {:.3} | {:.3}–{:.3} | {} | {:.0} |\n",
            s.suite,
            s.setting,
            s.n_items,
            s.accuracy,
            s.ci95.0,
            s.ci95.1,
            s.pass_at_n.map_or("–".into(), |p| format!("{p:.3}")),
            s.mean_tokens
        );
    }
    if !comparisons.is_empty() {
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
    }
    write_atomic(&out.join("summary.md"), &md)?;
    println!("\n{md}");
    println!("{}", out.join("summary.json").display());
    Ok(())
}
