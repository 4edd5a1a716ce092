//! `cargo xtask eval`: accuracy of a model on math suites with quantized llama.cpp inference, per-item
//! results written as they come (and resumed), summaries with intervals, and the paired comparison
//! against a baseline — including the baseline at lower temperatures, which in our trials beat EM.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use em_data::{ChatTemplate, Problem, PromptStyle};
use em_sample::{Engine, EngineConfig, Event, GgufModel, Request, Sampler, SamplingParams};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::convert::{self, gguf::GgufFile, OutType};
use crate::fsutil::write_atomic;

/// How prompts are built.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StyleArg {
    /// The model's chat template if it has one, else plain.
    Auto,
    /// The model's own chat template (error if it has none).
    Chat,
    /// Qwen2.5-Math CoT (ChatML with the step-by-step system prompt).
    QwenCot,
    /// Plain `Question: … Answer:` text for base models.
    Plain,
}

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// A .gguf file, or an HF directory (converted with --quant first).
    #[arg(long)]
    pub model: PathBuf,
    /// GGUF type when --model (or --baseline) is an HF directory.
    #[arg(long, value_enum, default_value = "f16")]
    pub quant: OutType,
    /// Comma-separated suites: math500, gsm8k, minerva, olympiadbench, amc23, aime24, aime25, svamp,
    /// mawps, asdiv, math, or paths to JSONL/JSON files.
    #[arg(long, value_delimiter = ',', required = true)]
    pub suites: Vec<String>,
    /// Output directory (per-item JSONL, summary.json, summary.md).
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N items of each suite.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sampling temperature; 0 is greedy (the default, as the toolkit evaluates).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Samples per item (avg@n and pass@n when > 1).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 3072)]
    pub max_new_tokens: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub prompt_style: StyleArg,
    /// A baseline model (.gguf or HF directory) for the paired comparison.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Further temperatures at which to run the baseline (0 = greedy), since plain low-temperature
    /// sampling may beat what EM gains.
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.25")]
    pub baseline_temperatures: Vec<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// llama.cpp threads (default: all cores but one).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
}

/// One setting of a run: which model, at which temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub label: String,
    pub temperature: f32,
    pub n: usize,
}

impl Setting {
    /// The file-name tag of this setting, e.g. `model.greedy` or `model.t0.5-n4`.
    pub fn tag(&self) -> String {
        if self.temperature <= 0.0 {
            format!("{}.greedy", self.label)
        } else {
            format!("{}.t{}-n{}", self.label, self.temperature, self.n)
        }
    }
}

/// One item's samples, as written to the per-item JSONL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
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

pub fn run(args: &EvalArgs) -> Result<()> {
    fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let suites = load_suites(&args.suites, args.limit)?;
    let model = resolve_gguf(&args.model, args.quant, &args.out.join("model"))?;
    let mut main_setting = Setting {
        label: "model".into(),
        temperature: args.temperature,
        n: args.n,
    };
    if main_setting.temperature <= 0.0 {
        main_setting.n = 1;
    }
    let mut summaries = vec![];
    let mut results: BTreeMap<(String, String), Vec<ItemResult>> = BTreeMap::new();
    let mut run_one = |gguf: &Path, setting: &Setting| -> Result<()> {
        let loaded = GgufModel::load(gguf)?;
        let style = prompt_style(gguf, args.prompt_style)?;
        for (suite, problems) in &suites {
            let items = evaluate(
                &loaded,
                &style,
                problems,
                setting,
                args,
                &args.out.join(format!("{suite}.{}.jsonl", setting.tag())),
            )?;
            let summary = summarize(suite, setting, &items);
            print_summary(&summary);
            summaries.push(summary);
            results.insert((suite.clone(), setting.tag()), items);
        }
        Ok(())
    };
    run_one(&model, &main_setting)?;

    let mut comparisons = vec![];
    if let Some(baseline) = &args.baseline {
        let base = resolve_gguf(baseline, args.quant, &args.out.join("baseline"))?;
        let mut settings = vec![Setting {
            label: "baseline".into(),
            ..main_setting.clone()
        }];
        for &t in &args.baseline_temperatures {
            let s = Setting {
                label: "baseline".into(),
                temperature: t,
                n: if t <= 0.0 { 1 } else { args.n },
            };
            if !settings.iter().any(|x| x.tag() == s.tag()) {
                settings.push(s);
            }
        }
        for s in &settings {
            run_one(&base, s)?;
        }
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
    Ok(())
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

/// The GGUF to evaluate: the file itself, or an HF directory converted once into `cache`.
pub fn resolve_gguf(model: &Path, quant: OutType, cache: &Path) -> Result<PathBuf> {
    if model.is_file() {
        return Ok(model.to_path_buf());
    }
    if !model.is_dir() {
        bail!("{}: no such file or directory", model.display());
    }
    fs::create_dir_all(cache)?;
    let out = cache.join(format!(
        "model.{}.gguf",
        format!("{quant:?}").to_lowercase()
    ));
    if !out.exists() {
        convert::hf_to_gguf(model, &out, quant)?;
    }
    Ok(out)
}

/// The prompt style for a GGUF: its chat template when asked for (or when `auto` finds one).
pub fn prompt_style(gguf: &Path, style: StyleArg) -> Result<PromptStyle> {
    Ok(match style {
        StyleArg::Plain => PromptStyle::Plain,
        StyleArg::QwenCot => PromptStyle::QwenMathCot,
        StyleArg::Auto | StyleArg::Chat => match chat_template_of(gguf)? {
            Some(t) => PromptStyle::ChatTemplate(t),
            None if style == StyleArg::Auto => PromptStyle::Plain,
            None => bail!(
                "{}: has no tokenizer.chat_template; use --prompt-style plain or qwen-cot",
                gguf.display()
            ),
        },
    })
}

/// `tokenizer.chat_template` with the BOS/EOS token texts, from GGUF metadata.
pub fn chat_template_of(gguf: &Path) -> Result<Option<ChatTemplate>> {
    let file = GgufFile::open(gguf)?;
    let md = file.metadata();
    let Some(template) = md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    else {
        return Ok(None);
    };
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok());
    let text_of = |key: &str| -> String {
        let id = md.get(key).and_then(|v| v.to_u32().ok());
        match (id, tokens) {
            (Some(id), Some(tokens)) => tokens
                .get(id as usize)
                .and_then(|t| t.to_string().ok())
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        }
    };
    Ok(Some(ChatTemplate {
        template: template.clone(),
        bos_token: text_of("tokenizer.ggml.bos_token_id"),
        eos_token: text_of("tokenizer.ggml.eos_token_id"),
    }))
}

/// Where a named suite lives: the fetched cache first, then ../shared/data/bench.
pub fn suite_path(name: &str) -> Result<PathBuf> {
    let as_path = PathBuf::from(name);
    if as_path.is_file() {
        return Ok(as_path);
    }
    let cache = crate::fetch::math_data_dir(&crate::fetch::cache_dir());
    let (fetched, shared): (Option<&str>, Option<&str>) = match name {
        "math500" => (Some("math500/test.jsonl"), Some("math500.jsonl")),
        "gsm8k" => (Some("gsm8k/test.jsonl"), Some("gsm8k.jsonl")),
        "minerva" | "minerva_math" => (Some("minerva/test.jsonl"), Some("minerva_math.jsonl")),
        "math" => (Some("math/test.jsonl"), None),
        "svamp" => (Some("svamp/test.jsonl"), None),
        "mawps" => (Some("mawps/test.jsonl"), None),
        "asdiv" => (Some("asdiv/test.jsonl"), None),
        "olympiadbench" => (None, Some("olympiadbench.jsonl")),
        "amc23" => (None, Some("amc23.jsonl")),
        "aime24" => (None, Some("aime24.jsonl")),
        "aime25" => (None, Some("aime25.jsonl")),
        _ => bail!("{name}: not a file and not a known suite (math500, gsm8k, minerva, olympiadbench, amc23, aime24, aime25, math, svamp, mawps, asdiv)"),
    };
    let shared_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/bench");
    let candidates: Vec<PathBuf> = fetched
        .map(|f| cache.join(f))
        .into_iter()
        .chain(shared.map(|s| shared_root.join(s)))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "suite {name}: none of {candidates:?} exists; run `cargo xtask fetch math-data`"
            )
        })
}

fn load_suites(names: &[String], limit: Option<usize>) -> Result<Vec<(String, Vec<Problem>)>> {
    names
        .iter()
        .map(|name| {
            let path = suite_path(name)?;
            let mut problems = em_data::load_suite(&path)?;
            if let Some(n) = limit {
                problems.truncate(n);
            }
            let label = Path::new(name)
                .file_stem()
                .map_or(name.clone(), |s| s.to_string_lossy().into_owned());
            Ok((label, problems))
        })
        .collect()
}

/// Reads the items already in `path`; a torn last line (a killed run) is dropped.
pub fn read_done(path: &Path) -> Result<Vec<ItemResult>> {
    let Ok(file) = File::open(path) else {
        return Ok(vec![]);
    };
    let mut done = vec![];
    for line in BufReader::new(file).lines() {
        let line = line?;
        match serde_json::from_str::<ItemResult>(&line) {
            Ok(item) => done.push(item),
            Err(_) => break, // torn write at the end: redo from here
        }
    }
    Ok(done)
}

/// Rewrites `path` to exactly `items` (dropping a torn tail) and reopens it for appending.
fn reopen_for_append(path: &Path, items: &[ItemResult]) -> Result<File> {
    let tmp = path.with_extension("jsonl.tmp");
    {
        let mut f =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        for item in items {
            writeln!(f, "{}", serde_json::to_string(item)?)?;
        }
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    Ok(OpenOptions::new().append(true).open(path)?)
}

/// Evaluates `problems` at `setting`, appending one JSON line per finished item to `out` and
/// skipping items already there. Returns all items in suite order.
pub fn evaluate(
    model: &GgufModel,
    style: &PromptStyle,
    problems: &[Problem],
    setting: &Setting,
    args: &EvalArgs,
    out: &Path,
) -> Result<Vec<ItemResult>> {
    let done = read_done(out)?;
    let done_ids: HashSet<String> = done.iter().map(|d| d.id.clone()).collect();
    let mut file = reopen_for_append(out, &done)?;
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
    let requests: Vec<Request> = todo
        .iter()
        .map(|p| {
            let prompt =
                em_data::render_prompt(style, p).with_context(|| format!("problem {}", p.id))?;
            // Each item gets its own random stream: with one seed for all, sample i of every item
            // would draw the same uniforms and make the same early choices across items.
            let item_params = SamplingParams {
                seed: item_seed(params.seed, &p.id),
                ..params.clone()
            };
            Ok(Request::text(prompt, setting.n, item_params))
        })
        .collect::<Result<_>>()?;
    let bar = ProgressBar::new(problems.len() as u64).with_position(done.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} items {msg} ETA {eta}")
            .expect("valid template"),
    );
    bar.set_prefix(
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    if std::env::var_os("CI").is_some() || std::env::var_os("EM_NO_PROGRESS").is_some() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut new_items: Vec<ItemResult> = vec![];
    if !requests.is_empty() {
        let config = EngineConfig {
            threads: args.threads.unwrap_or_else(em_sample::default_threads),
            parallel: args.parallel,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(model, config);
        let mut write_error: Option<anyhow::Error> = None;
        engine.generate(&requests, &mut |event| match event {
            Event::RequestDone { request, samples } => {
                let problem = todo[request];
                let item = ItemResult {
                    id: problem.id.clone(),
                    gold: problem.answers.clone(),
                    samples: samples
                        .iter()
                        .map(|s| {
                            let verdict = em_grade::grade(&s.text, &problem.answers);
                            SampleResult {
                                response: s.text.clone(),
                                pred: verdict.pred,
                                correct: verdict.correct,
                                n_tokens: s.tokens.len(),
                                finish: format!("{:?}", s.finish).to_lowercase(),
                            }
                        })
                        .collect(),
                };
                let line = serde_json::to_string(&item).expect("serialisable");
                if let Err(e) = writeln!(file, "{line}").and_then(|_| file.sync_data()) {
                    write_error = Some(anyhow::anyhow!("{}: {e}", out.display()));
                    return ControlFlow::Break(());
                }
                new_items.push(item);
                bar.inc(1);
                ControlFlow::Continue(())
            }
            Event::Step {
                generated_tokens,
                elapsed,
                ..
            } => {
                let secs = elapsed.as_secs_f64().max(1e-9);
                bar.set_message(format!("{:.0} tok/s", generated_tokens as f64 / secs));
                ControlFlow::Continue(())
            }
        })?;
        if let Some(e) = write_error {
            return Err(e);
        }
    }
    bar.finish_and_clear();
    let mut by_id: std::collections::HashMap<String, ItemResult> = done
        .into_iter()
        .chain(new_items)
        .map(|i| (i.id.clone(), i))
        .collect();
    Ok(problems
        .iter()
        .filter_map(|p| by_id.remove(&p.id))
        .collect())
}

/// A per-item seed: FNV-1a of the item id mixed with the run's seed.
pub fn item_seed(seed: u64, id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn write_reports(out: &Path, summaries: &[SuiteSummary], comparisons: &[Comparison]) -> Result<()> {
    let summary = json!({ "suites": summaries, "comparisons": comparisons });
    write_atomic(
        &out.join("summary.json"),
        &(serde_json::to_string_pretty(&summary)? + "\n"),
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
