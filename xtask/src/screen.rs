//! `cargo xtask screen`: sample k answers per pool prompt, grade them, rank the prompts by the
//! variance p(1−p) of their pass rate and choose the one-shot prompt (METHOD.md, "Choosing the
//! prompt").
//!
//! Output directory:
//! - `screen.json`: the settings; a rerun with other settings into the same directory is refused.
//! - `prompts.jsonl`: one line per screened prompt, appended and fsynced as each finishes; a rerun
//!   of the same command skips the prompts already there (a torn last line is dropped and redone).
//! - `ranking.json`, `chosen.jsonl`: written at the end, atomically (temporary file + rename).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use em_data::{ChatTemplate, Problem, PromptStyle};
use em_sample::{
    Engine, EngineConfig, Event, GgufModel, Prompt, Request, Sample, Sampler, SamplingParams,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsutil::write_atomic;

/// How a problem becomes a prompt.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// The model's own chat template (GGUF `tokenizer.chat_template`).
    Chat,
    /// Qwen2.5-Math CoT (ChatML with the step-by-step system prompt).
    QwenMath,
    /// Plain "Question: … Answer:" text for base models.
    Plain,
}

/// Which prompt to choose from the ranking.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Highest variance p(1−p); ties: p nearest 0.5, then higher entropy.
    Variance,
    /// Highest variance among prompts whose pass rate is above 0.5 with its 95% interval (EM
    /// amplifies what the majority of its samples does, right or wrong).
    MajorityRight,
}

/// Arguments of `cargo xtask screen`.
#[derive(clap::Args, Debug, Clone)]
pub struct ScreenArgs {
    /// GGUF model to sample from (the base model to be trained).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt pool in the pool format (`{id, prompt: [messages], answer}` per line).
    #[arg(long)]
    pub pool: PathBuf,
    /// Answers sampled per prompt.
    #[arg(long, default_value_t = 8)]
    pub k: usize,
    /// Output directory (created; rerun the same command to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N prompts of the pool.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.5)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.15)]
    pub repetition_penalty: f32,
    /// Base seed; each prompt's samples are seeded from it and the prompt id.
    #[arg(long, default_value_t = 15)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Style::Chat)]
    pub prompt_style: Style,
    /// Selection rule for `chosen.jsonl`.
    #[arg(long, value_enum, default_value_t = Rule::Variance)]
    pub rule: Rule,
    /// llama.cpp threads (default: the cores but one).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Also keep every response text in the per-prompt lines.
    #[arg(long)]
    pub keep_responses: bool,
    /// Stop after this many newly screened prompts, as if killed (for resume tests).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// The settings a screen directory was made with.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Settings {
    model_file: String,
    model_bytes: u64,
    pool_file: String,
    k: usize,
    max_new_tokens: usize,
    temperature: f32,
    top_p: f32,
    repetition_penalty: f32,
    seed: u64,
    prompt_style: Style,
}

/// One screened prompt, a line of `prompts.jsonl`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PromptResult {
    pub id: String,
    pub n: usize,
    pub correct: usize,
    pub pass_rate: f64,
    /// 95% Wilson interval of the pass rate.
    pub ci95: (f64, f64),
    /// p(1−p).
    pub variance: f64,
    /// Token mean of the entropy of the sampling distribution (after top-p), nats.
    pub mean_entropy: f64,
    /// Token mean of the full-vocabulary entropy at the sampling temperature (EM's loss), nats.
    pub mean_full_entropy: f64,
    /// Mean generated tokens per answer.
    pub mean_length: f64,
    /// Extracted answer per sample (null where none).
    pub answers: Vec<Option<String>>,
    pub correct_each: Vec<bool>,
    pub finish: Vec<String>,
    pub gold: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<Vec<String>>,
}

impl PromptResult {
    fn from_samples(problem: &Problem, samples: &[Sample], keep_responses: bool) -> Self {
        let verdicts: Vec<em_grade::Verdict> = samples
            .iter()
            .map(|s| em_grade::grade(&s.text, &problem.answers))
            .collect();
        let n = samples.len();
        let correct = verdicts.iter().filter(|v| v.correct).count();
        let p = correct as f64 / n as f64;
        let (mut h, mut hf, mut tokens) = (0.0, 0.0, 0usize);
        for s in samples {
            if let Some(st) = &s.stats {
                h += st.entropies.iter().map(|&x| x as f64).sum::<f64>();
                hf += st.full_entropies.iter().map(|&x| x as f64).sum::<f64>();
            }
            tokens += s.tokens.len();
        }
        let per_token = |x: f64| if tokens == 0 { 0.0 } else { x / tokens as f64 };
        Self {
            id: problem.id.clone(),
            n,
            correct,
            pass_rate: p,
            ci95: em_grade::wilson_interval(correct, n),
            variance: p * (1.0 - p),
            mean_entropy: per_token(h),
            mean_full_entropy: per_token(hf),
            mean_length: tokens as f64 / n as f64,
            answers: verdicts.iter().map(|v| v.pred.clone()).collect(),
            correct_each: verdicts.iter().map(|v| v.correct).collect(),
            finish: samples
                .iter()
                .map(|s| format!("{:?}", s.finish).to_lowercase())
                .collect(),
            gold: problem.answers.clone(),
            responses: keep_responses.then(|| samples.iter().map(|s| s.text.clone()).collect()),
        }
    }

    /// Majority right with confidence: the lower end of the 95% interval is above 0.5.
    pub fn majority_right(&self) -> bool {
        self.ci95.0 > 0.5
    }
}

/// Highest variance first; ties: pass rate nearest 0.5, then higher entropy, then id.
pub fn rank(results: &mut [PromptResult]) {
    results.sort_by(|a, b| {
        b.variance
            .total_cmp(&a.variance)
            .then(
                (a.pass_rate - 0.5)
                    .abs()
                    .total_cmp(&(b.pass_rate - 0.5).abs()),
            )
            .then(b.mean_entropy.total_cmp(&a.mean_entropy))
            .then(a.id.cmp(&b.id))
    });
}

/// The prompt `rule` picks from a ranked list.
pub fn choose(ranked: &[PromptResult], rule: Rule) -> Option<&PromptResult> {
    match rule {
        Rule::Variance => ranked.first(),
        Rule::MajorityRight => ranked.iter().find(|r| r.majority_right()),
    }
}

/// A stable per-prompt seed (the same derivation `eval` uses per item).
fn prompt_seed(seed: u64, id: &str) -> u64 {
    crate::eval::item_seed(seed, id)
}

/// Reads the finished prompts of `prompts.jsonl`, cutting off a torn last line.
fn read_done(path: &Path) -> Result<Vec<PromptResult>> {
    let Ok(file) = File::open(path) else {
        return Ok(Vec::new());
    };
    let mut done = Vec::new();
    let mut good_bytes = 0u64;
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut lineno = 0;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        if !line.ends_with('\n') {
            break; // torn by a kill (lines are written whole, newline last): redo that prompt
        }
        match serde_json::from_str::<PromptResult>(line.trim_end()) {
            Ok(r) => {
                done.push(r);
                good_bytes += n as u64;
            }
            Err(e) => bail!(
                "{}:{lineno}: not a screened prompt ({e}); remove the line or the file",
                path.display()
            ),
        }
    }
    let len = std::fs::metadata(path)?.len();
    if good_bytes < len {
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(good_bytes))
            .with_context(|| format!("{}: cannot cut the torn last line", path.display()))?;
    }
    Ok(done)
}

/// The pool's own records, by id, to write the chosen prompt in the pool's format.
fn raw_records(path: &Path, problems: &[Problem]) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let same = lines.len() == problems.len()
        && lines.iter().zip(problems).all(|(l, p)| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .is_none_or(|id| id == p.id.as_str())
        });
    if same {
        Ok(lines.into_iter().map(String::from).collect())
    } else {
        problems
            .iter()
            .map(|p| serde_json::to_string(p).context("serialise a problem"))
            .collect()
    }
}

fn prompt_style(args: &ScreenArgs, model: &GgufModel) -> Result<PromptStyle> {
    Ok(match args.prompt_style {
        Style::QwenMath => PromptStyle::QwenMathCot,
        Style::Plain => PromptStyle::Plain,
        Style::Chat => {
            let template = model.meta("tokenizer.chat_template").with_context(|| {
                format!(
                    "{}: no tokenizer.chat_template; use --prompt-style qwen-math or plain",
                    args.model.display()
                )
            })?;
            let (bos, eos) = model.bos_eos();
            PromptStyle::ChatTemplate(ChatTemplate {
                template,
                bos_token: model.token_text(bos),
                eos_token: model.token_text(eos),
            })
        }
    })
}

/// Runs the screen (see the module documentation).
pub fn run(args: &ScreenArgs) -> Result<()> {
    if args.k == 0 {
        bail!("--k must be at least 1");
    }
    let mut problems = em_data::load_pool(&args.pool)?;
    let mut raw = raw_records(&args.pool, &problems)?;
    if let Some(n) = args.limit {
        problems.truncate(n);
        raw.truncate(n);
    }
    let mut ids = HashSet::new();
    if let Some(p) = problems.iter().find(|p| !ids.insert(p.id.as_str())) {
        bail!("{}: prompt id {} appears twice", args.pool.display(), p.id);
    }
    if let Some(p) = problems.iter().find(|p| p.answers.is_empty()) {
        bail!(
            "{}: prompt {} has no gold answer to grade against",
            args.pool.display(),
            p.id
        );
    }

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let settings = Settings {
        model_file: file_name(&args.model),
        model_bytes: std::fs::metadata(&args.model)
            .with_context(|| format!("{}: cannot read", args.model.display()))?
            .len(),
        pool_file: file_name(&args.pool),
        k: args.k,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        prompt_style: args.prompt_style,
    };
    let settings_path = args.out.join("screen.json");
    if settings_path.exists() {
        let text = std::fs::read_to_string(&settings_path)
            .with_context(|| format!("{}: cannot read", settings_path.display()))?;
        let old: Settings = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a screen settings file", settings_path.display()))?;
        if old != settings {
            bail!(
                "{}: this directory was screened with other settings ({old:?}); use another --out",
                settings_path.display()
            );
        }
    } else {
        write_atomic(
            &settings_path,
            serde_json::to_string_pretty(&settings)?.as_bytes(),
        )?;
    }

    let prompts_path = args.out.join("prompts.jsonl");
    let mut results = read_done(&prompts_path)?;
    let done: HashSet<String> = results.iter().map(|r| r.id.clone()).collect();
    let todo: Vec<&Problem> = problems.iter().filter(|p| !done.contains(&p.id)).collect();
    eprintln!(
        "screen: {} prompts, {} already screened, {} to go, k = {}",
        problems.len(),
        problems.len() - todo.len(),
        todo.len(),
        args.k
    );

    if !todo.is_empty() {
        let model = GgufModel::load(&args.model)?;
        let style = prompt_style(args, &model)?;
        let bos_text = model.token_text(model.bos_eos().0);
        let mut requests = Vec::with_capacity(todo.len());
        for p in &todo {
            let text = em_data::render_prompt(&style, p)
                .with_context(|| format!("{}: prompt {}", args.pool.display(), p.id))?;
            // A template that writes BOS itself must not get a second one from the tokenizer.
            let add_bos = bos_text.is_empty() || !text.starts_with(&bos_text);
            let params = SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                repetition_penalty: args.repetition_penalty,
                max_new_tokens: args.max_new_tokens,
                seed: prompt_seed(args.seed, &p.id),
                logprobs: true,
                stop: em_sample::request::EVAL_STOP.map(String::from).to_vec(),
                ..SamplingParams::default()
            };
            requests.push(Request {
                prompt: Prompt::Tokens(model.tokenize(&text, add_bos)),
                n_samples: args.k,
                params,
            });
        }
        let config = EngineConfig {
            threads: args.threads.unwrap_or_else(em_sample::default_threads),
            parallel: args.parallel,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(&model, config);
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&prompts_path)
            .with_context(|| format!("{}: cannot open for appending", prompts_path.display()))?;
        let bar = indicatif::ProgressBar::new(todo.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} prompts, {msg}, ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        let mut write_err: Option<anyhow::Error> = None;
        let mut new = 0usize;
        let stats = engine.generate(&requests, &mut |event| {
            match event {
                Event::RequestDone { request, samples } => {
                    let r =
                        PromptResult::from_samples(todo[request], &samples, args.keep_responses);
                    let line = serde_json::to_string(&r).expect("serialisable") + "\n";
                    if let Err(e) = out.write_all(line.as_bytes()).and_then(|_| out.sync_data()) {
                        write_err = Some(
                            anyhow::Error::new(e)
                                .context(format!("{}: cannot append", prompts_path.display())),
                        );
                        return ControlFlow::Break(());
                    }
                    bar.println(format!(
                        "{:>12}  {}/{}  p = {:.2} [{:.2}, {:.2}]  H = {:.3}",
                        r.id, r.correct, r.n, r.pass_rate, r.ci95.0, r.ci95.1, r.mean_entropy
                    ));
                    results.push(r);
                    bar.inc(1);
                    new += 1;
                    if args.stop_after.is_some_and(|n| new >= n) {
                        return ControlFlow::Break(());
                    }
                }
                Event::Step {
                    generated_tokens,
                    elapsed,
                    ..
                } => {
                    let secs = elapsed.as_secs_f64().max(1e-9);
                    bar.set_message(format!("{:.1} tok/s", generated_tokens as f64 / secs));
                }
            }
            ControlFlow::Continue(())
        })?;
        bar.finish_and_clear();
        if let Some(e) = write_err {
            return Err(e);
        }
        eprintln!(
            "screen: {} tokens in {:.1}s ({:.1} tok/s); prompt tokens decoded {} of {} without sharing",
            stats.generated_tokens,
            stats.elapsed.as_secs_f64(),
            stats.generated_tokens as f64 / stats.elapsed.as_secs_f64().max(1e-9),
            stats.prompt_tokens,
            stats.prompt_tokens_unshared
        );
        if args.stop_after.is_some() && results.len() < problems.len() {
            eprintln!("screen: stopped early after {new} prompts (--stop-after); rerun to resume");
            return Ok(());
        }
    }
    finish(args, &problems, &raw, results)
}

/// Ranks, prints, and writes `ranking.json` and `chosen.jsonl`.
fn finish(
    args: &ScreenArgs,
    problems: &[Problem],
    raw: &[String],
    mut results: Vec<PromptResult>,
) -> Result<()> {
    let wanted: HashSet<&str> = problems.iter().map(|p| p.id.as_str()).collect();
    results.retain(|r| wanted.contains(r.id.as_str()));
    rank(&mut results);
    let chosen = choose(&results, args.rule).cloned();
    println!(
        "{:>4} {:>12} {:>6} {:>15} {:>8} {:>8} {:>8}",
        "rank", "id", "pass", "95% interval", "p(1-p)", "H", "length"
    );
    for (i, r) in results.iter().enumerate().take(20) {
        println!(
            "{:>4} {:>12} {:>2}/{:<3} [{:.2}, {:.2}]    {:>8.4} {:>8.3} {:>8.1}{}",
            i + 1,
            r.id,
            r.correct,
            r.n,
            r.ci95.0,
            r.ci95.1,
            r.variance,
            r.mean_entropy,
            r.mean_length,
            if r.majority_right() {
                "  majority right"
            } else {
                ""
            }
        );
    }
    let ranking = serde_json::json!({
        "rule": args.rule,
        "chosen": chosen.as_ref().map(|c| c.id.clone()),
        "k": args.k,
        "prompts": results.len(),
        "ranking": results.iter().enumerate().map(|(i, r)| serde_json::json!({
            "rank": i + 1, "id": r.id, "correct": r.correct, "n": r.n, "pass_rate": r.pass_rate,
            "ci95": [r.ci95.0, r.ci95.1], "variance": r.variance, "mean_entropy": r.mean_entropy,
            "mean_full_entropy": r.mean_full_entropy, "mean_length": r.mean_length,
            "majority_right": r.majority_right(),
        })).collect::<Vec<_>>(),
    });
    write_atomic(
        &args.out.join("ranking.json"),
        serde_json::to_string_pretty(&ranking)?.as_bytes(),
    )?;
    let Some(chosen) = chosen else {
        bail!(
            "no prompt qualifies under rule {:?} (no pass rate is above 0.5 with its 95% interval at k = {}); ranking written to {}",
            args.rule,
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, correct: usize, n: usize, h: f64) -> PromptResult {
        let p = correct as f64 / n as f64;
        PromptResult {
            id: id.into(),
            n,
            correct,
            pass_rate: p,
            ci95: em_grade::wilson_interval(correct, n),
            variance: p * (1.0 - p),
            mean_entropy: h,
            mean_full_entropy: h,
            mean_length: 1.0,
            answers: vec![],
            correct_each: vec![],
            finish: vec![],
            gold: vec![],
            responses: None,
        }
    }

    #[test]
    fn ranking_and_rules() {
        let mut r = vec![
            result("a", 8, 8, 0.1),
            result("b", 3, 8, 0.5),
            result("c", 5, 8, 0.2),
            result("d", 4, 8, 0.1),
            result("e", 7, 8, 0.9),
        ];
        rank(&mut r);
        let ids: Vec<&str> = r.iter().map(|x| x.id.as_str()).collect();
        // 4/8 first; 3/8 and 5/8 tie on variance and distance to 0.5, so entropy decides.
        assert_eq!(ids, ["d", "b", "c", "e", "a"]);
        assert_eq!(choose(&r, Rule::Variance).unwrap().id, "d");
        assert_eq!(choose(&r, Rule::MajorityRight).unwrap().id, "e");
        assert!(choose(&r[..3], Rule::MajorityRight).is_none());
    }

    #[test]
    fn torn_last_line_is_cut_and_redone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.jsonl");
        let line = serde_json::to_string(&result("a", 1, 2, 0.0)).unwrap();
        std::fs::write(&path, format!("{line}\n{}", &line[..line.len() / 2])).unwrap();
        let done = read_done(&path).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{line}\n"));
        std::fs::write(&path, format!("{line}\nnot json\n{line}\n")).unwrap();
        let err = read_done(&path).unwrap_err().to_string();
        assert!(err.contains("prompts.jsonl:2"), "{err}");
    }
}
