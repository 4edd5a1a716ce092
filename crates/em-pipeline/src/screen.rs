//! Screening: sample k answers per pool prompt, grade them, rank the prompts by the
//! variance p(1−p) of their pass rate and choose the one-shot prompt (METHOD.md, "Choosing the
//! prompt").
//!
//! Output directory:
//! - `manifest.json`: the model, the pool and the settings; a rerun that differs is refused.
//! - `prompts.jsonl`: one line per screened prompt, appended and fsynced as each finishes; a rerun
//!   of the same command skips the prompts already there (a torn last line is cut and redone).
//! - `ranking.json`, `chosen.jsonl`: written at the end, atomically (temporary file + rename).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use em_data::Problem;
use em_sampler::{Request, Sample, SamplingParams};
use em_store::{write_atomic, JsonlStore, Manifest};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::prompt::{PromptOptions, PromptRenderer};
use crate::{Backend, Result};

/// Which prompt to choose from the ranking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Highest variance p(1−p); ties: p nearest 0.5, then higher entropy.
    Variance,
    /// Highest variance among prompts whose pass rate is above 0.5 with its 95% interval (EM
    /// amplifies what the majority of its samples does, right or wrong).
    MajorityRight,
    /// No labels: among prompts whose most common final answer is held by a share a above 0.5
    /// with its 95% interval and whose answers mostly terminate, the most doubt a(1−a); ties:
    /// higher entropy. The label-free stand-in for `majority-right`.
    Agreement,
    /// Highest variance among prompts whose pass rate is below 0.5 with its 95% interval: the
    /// prompt EM should *not* be trained on, for demonstrating what it does to a model.
    MajorityWrong,
}

impl Rule {
    /// Whether the rule reads gold answers.
    pub fn needs_labels(self) -> bool {
        !matches!(self, Rule::Agreement)
    }
}

/// What to screen and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScreenOptions {
    /// The model to screen with (the base model to be trained): a GGUF or an HF directory.
    pub model: PathBuf,
    /// Prompt pool: a file in the pool format (`{id, prompt: [messages], answer}` per line), or
    /// the name of a pool the project carries: `dsr` (the 1209-problem DeepScaleR subset the
    /// reference screens) or `pi1`.
    pub pool: PathBuf,
    /// Answers sampled per prompt.
    pub k: usize,
    /// Output directory (created; rerun the same command to resume).
    pub out: PathBuf,
    /// Only the first N prompts of the pool.
    pub limit: Option<usize>,
    /// Most new tokens per answer.
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// Base seed; each prompt's samples are seeded from it and the prompt id.
    pub seed: u64,
    #[serde(flatten)]
    pub prompt: PromptOptions,
    /// Selection rule for `chosen.jsonl`.
    pub rule: Rule,
    /// Also keep every response text in the per-prompt lines.
    pub keep_responses: bool,
    /// Sample with EM-INF, inference-time entropy minimisation of each step's logits
    /// (`steps=5,lr=1,kl=0.1`, or `default`); llama.cpp backend only.
    pub em_inf: Option<em_sampler::EmInf>,
    /// GGUF type when --model is an HF directory (converted once into the output directory).
    pub quant: em_convert::OutType,
    /// Replace an output directory that holds another run.
    pub fresh: bool,
    /// Stop after this many newly screened prompts, as if killed (for resume tests).
    pub stop_after: Option<usize>,
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
    /// Token mean of the entropy of the sampling distribution (after top-p), nats; null where the
    /// backend does not report distributions (servers).
    pub mean_entropy: Option<f64>,
    /// Token mean of the full-vocabulary entropy at the sampling temperature (EM's loss), nats.
    pub mean_full_entropy: Option<f64>,
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
        let (mut h, mut hf, mut tokens, mut with_entropy) = (0.0, 0.0, 0usize, 0usize);
        for s in samples {
            if let Some(st) = s.stats.as_ref().filter(|st| !st.entropies.is_empty()) {
                h += st.entropies.iter().map(|&x| x as f64).sum::<f64>();
                hf += st.full_entropies.iter().map(|&x| x as f64).sum::<f64>();
                with_entropy += st.entropies.len();
            }
            tokens += s.n_tokens;
        }
        let per_token = |x: f64| (with_entropy > 0).then(|| x / with_entropy as f64);
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

    /// Majority wrong with confidence: the upper end of the 95% interval is below 0.5.
    pub fn majority_wrong(&self) -> bool {
        self.ci95.1 < 0.5
    }

    /// The most common final answer and the share of samples that gave it (0 when none did).
    pub fn agreement(&self) -> (Option<String>, f64) {
        match em_grade::plurality(&self.answers) {
            Some((a, c)) => (Some(a), c as f64 / self.n.max(1) as f64),
            None => (None, 0.0),
        }
    }

    /// The 95% Wilson interval of [`Self::agreement`]'s share.
    pub fn agreement_ci95(&self) -> (f64, f64) {
        let c = em_grade::plurality(&self.answers).map_or(0, |(_, c)| c);
        em_grade::wilson_interval(c, self.n)
    }

    /// Share of samples that ended by themselves (not at the token limit) with a final answer.
    pub fn terminated(&self) -> f64 {
        let done = self
            .finish
            .iter()
            .zip(&self.answers)
            .filter(|(f, a)| f.as_str() != "length" && a.is_some())
            .count();
        done as f64 / self.n.max(1) as f64
    }

    /// The label-free rule's condition: a confident majority answer, mostly terminated answers.
    pub fn agrees(&self) -> bool {
        self.agreement_ci95().0 > 0.5 && self.terminated() > 0.5
    }
}

/// A nats figure, or `–` where the backend gave none.
fn show(h: Option<f64>) -> String {
    h.map_or("–".into(), |h| format!("{h:.3}"))
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
            .then(
                b.mean_entropy
                    .unwrap_or(0.0)
                    .total_cmp(&a.mean_entropy.unwrap_or(0.0)),
            )
            .then(a.id.cmp(&b.id))
    });
}

/// The prompt `rule` picks from a ranked list.
pub fn choose(ranked: &[PromptResult], rule: Rule) -> Option<&PromptResult> {
    match rule {
        Rule::Variance => ranked.first(),
        Rule::MajorityRight => ranked.iter().find(|r| r.majority_right()),
        Rule::MajorityWrong => ranked.iter().find(|r| r.majority_wrong()),
        Rule::Agreement => ranked
            .iter()
            .filter(|r| r.agrees())
            .map(|r| (r, r.agreement().1))
            .fold(None, |best: Option<(&PromptResult, f64)>, (r, a)| {
                let doubt = a * (1.0 - a);
                match best {
                    Some((b, ba)) if ba * (1.0 - ba) > doubt => Some((b, ba)),
                    Some((b, ba))
                        if ba * (1.0 - ba) == doubt
                            && b.mean_entropy.unwrap_or(0.0) >= r.mean_entropy.unwrap_or(0.0) =>
                    {
                        Some((b, ba))
                    }
                    _ => Some((r, a)),
                }
            })
            .map(|(r, _)| r),
    }
}

/// A stable per-prompt seed (the same derivation `eval` uses per item).
fn prompt_seed(seed: u64, id: &str) -> u64 {
    crate::item_seed(seed, id)
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

impl ScreenOptions {
    /// The reference settings (the command line's defaults; a test keeps them equal).
    pub fn reference(model: PathBuf, pool: PathBuf, out: PathBuf) -> Self {
        Self {
            model,
            pool,
            k: 8,
            out,
            limit: None,
            max_new_tokens: 512,
            temperature: 0.5,
            top_p: 0.95,
            repetition_penalty: 1.15,
            seed: 15,
            prompt: PromptOptions::default(),
            rule: Rule::Variance,
            keep_responses: false,
            em_inf: None,
            quant: em_convert::OutType::F16,
            fresh: false,
            stop_after: None,
        }
    }
}

/// The settings that change a screen's results (the manifest's `settings`).
fn settings(args: &ScreenOptions, backend: &dyn Backend) -> Value {
    let mut v = json!({
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "prompt": args.prompt,
        "quant": if args.model.is_dir() { format!("{:?}", args.quant).to_lowercase() } else { "as given".into() },
        "backend": backend.identity(),
    });
    // Recorded only when on, so that screens made before the option existed still resume.
    if let Some(e) = args.em_inf {
        v["em_inf"] = json!(e);
    }
    v
}

/// Runs the screen (see the module documentation) and returns the ranked prompts.
pub fn run(args: &ScreenOptions, backend: &dyn Backend) -> Result<Vec<PromptResult>> {
    if args.k == 0 {
        bail!("--k must be at least 1");
    }
    let pool = crate::assets::pool_path(&args.pool)?;
    let mut problems = em_data::load_pool(&pool)?;
    let mut raw = raw_records(&pool, &problems)?;
    if let Some(n) = args.limit {
        problems.truncate(n);
        raw.truncate(n);
    }
    let mut ids = HashSet::new();
    if let Some(p) = problems.iter().find(|p| !ids.insert(p.id.as_str())) {
        bail!("{}: prompt id {} appears twice", pool.display(), p.id);
    }
    if let Some(p) = problems
        .iter()
        .find(|p| args.rule.needs_labels() && p.answers.is_empty())
    {
        bail!(
            "{}: prompt {} has no gold answer to grade against (rule {:?} needs one; `--rule agreement` does not)",
            pool.display(),
            p.id,
            args.rule
        );
    }

    let mut rendered = Vec::with_capacity(problems.len());
    let mut style = String::new();
    crate::with_vocab(backend, &args.model, &mut |vocab| {
        let renderer = PromptRenderer::new(vocab, &args.prompt)?;
        style = renderer.description.clone();
        rendered = problems
            .iter()
            .map(|p| {
                renderer
                    .render(p)
                    .with_context(|| format!("{}: prompt {}", pool.display(), p.id))
            })
            .collect::<Result<_>>()?;
        Ok(())
    })?;
    let mut manifest = Manifest::new(
        "screen",
        em_store::model_identity(&args.model)?,
        settings(args, backend),
    );
    manifest
        .inputs
        .insert("pool".into(), em_store::file_identity(&pool)?);
    manifest.info = json!({
        "tool": crate::TOOL,
        "style": style,
        "first_prompt": problems.first().map(|p| json!({"id": p.id, "text": rendered[0].text, "ids": rendered[0].ids})),
    });
    manifest.claim(&args.out, args.fresh)?;

    let (mut store, mut results) =
        JsonlStore::<PromptResult>::open(&args.out.join("prompts.jsonl"))?;
    let done: HashSet<String> = results.iter().map(|r| r.id.clone()).collect();
    let todo: Vec<usize> = (0..problems.len())
        .filter(|&i| !done.contains(&problems[i].id))
        .collect();
    eprintln!(
        "screen: {} prompts, {} already screened, {} to go, k = {}; prompt style {style}",
        problems.len(),
        problems.len() - todo.len(),
        todo.len(),
        args.k
    );

    if !todo.is_empty() {
        let requests: Vec<Request> = todo
            .iter()
            .map(|&i| Request {
                prompt: rendered[i].to_prompt(),
                n_samples: args.k,
                params: SamplingParams {
                    temperature: args.temperature,
                    top_p: args.top_p,
                    repetition_penalty: args.repetition_penalty,
                    max_new_tokens: args.max_new_tokens,
                    seed: prompt_seed(args.seed, &problems[i].id),
                    logprobs: true,
                    stop: em_sampler::EVAL_STOP.map(String::from).to_vec(),
                    em_inf: args.em_inf,
                    ..SamplingParams::default()
                },
            })
            .collect();
        let gguf = crate::sampling_model(backend, &args.model, &args.out, args.quant)?;
        let bar = crate::drive::progress_bar(
            problems.len() as u64,
            (problems.len() - todo.len()) as u64,
            "prompts",
            "screen",
        );
        let mut new = 0usize;
        let mut stats = None;
        backend.with_sampler(&gguf, &mut |sampler| {
            stats = Some(crate::drive::sample_each(
                sampler,
                &requests,
                &bar,
                crate::drive::Count::Requests,
                &mut |request, samples| {
                    let r = PromptResult::from_samples(
                        &problems[todo[request]],
                        &samples,
                        args.keep_responses,
                    );
                    store.append(&r)?;
                    bar.println(format!(
                        "{:>12}  {}/{}  p = {:.2} [{:.2}, {:.2}]  H = {}",
                        r.id,
                        r.correct,
                        r.n,
                        r.pass_rate,
                        r.ci95.0,
                        r.ci95.1,
                        show(r.mean_entropy)
                    ));
                    results.push(r);
                    new += 1;
                    Ok(args.stop_after.is_none_or(|n| new < n))
                },
            )?);
            Ok(())
        })?;
        if let Some(stats) = stats {
            eprintln!(
                "screen: {} tokens in {:.1}s ({:.1} tok/s); prompt tokens decoded {} of {} without sharing",
                stats.generated_tokens,
                stats.elapsed.as_secs_f64(),
                stats.generated_tokens as f64 / stats.elapsed.as_secs_f64().max(1e-9),
                stats.prompt_tokens,
                stats.prompt_tokens_unshared
            );
        }
        if results.len() < problems.len() {
            eprintln!("screen: stopped early after {new} prompts; rerun to resume");
            return Ok(results);
        }
    }
    finish(args, &problems, &raw, results)
}

/// Ranks, prints, and writes `ranking.json` and `chosen.jsonl`.
fn finish(
    args: &ScreenOptions,
    problems: &[Problem],
    raw: &[String],
    mut results: Vec<PromptResult>,
) -> Result<Vec<PromptResult>> {
    let wanted: HashSet<&str> = problems.iter().map(|p| p.id.as_str()).collect();
    results.retain(|r| wanted.contains(r.id.as_str()));
    rank(&mut results);
    let chosen = choose(&results, args.rule).cloned();
    println!(
        "{:>4} {:>12} {:>6} {:>15} {:>8} {:>8} {:>8} {:>6} {:>6}",
        "rank", "id", "pass", "95% interval", "p(1-p)", "H", "length", "agree", "ended"
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
            "{:>4} {:>12} {:>2}/{:<3} [{:.2}, {:.2}]    {:>8.4} {:>8} {:>8.1} {:>6.2} {:>6.2}  {flags}",
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
            "majority_right": r.majority_right(), "majority_wrong": r.majority_wrong(),
            "majority_answer": r.agreement().0, "agreement": r.agreement().1,
            "agreement_ci95": r.agreement_ci95(), "terminated": r.terminated(), "agrees": r.agrees(),
        })).collect::<Vec<_>>(),
    });
    write_atomic(
        &args.out.join("ranking.json"),
        serde_json::to_string_pretty(&ranking)?.as_bytes(),
    )?;
    let Some(chosen) = chosen else {
        bail!(
            "no prompt qualifies under rule {:?} ({} at k = {}); ranking written to {}",
            args.rule,
            match args.rule {
                Rule::Variance => "the pool is empty",
                Rule::MajorityRight => "no pass rate is above 0.5 with its 95% interval",
                Rule::MajorityWrong => "no pass rate is below 0.5 with its 95% interval",
                Rule::Agreement => "no prompt's most common answer holds above 0.5 of the samples with its 95% interval while most answers terminate",
            },
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
            mean_entropy: Some(h),
            mean_full_entropy: Some(h),
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
        assert!(choose(&r, Rule::MajorityWrong).is_none());
        let mut w = r.clone();
        w.push(result("f", 1, 16, 0.3));
        rank(&mut w);
        assert_eq!(choose(&w, Rule::MajorityWrong).unwrap().id, "f");
    }

    /// A prompt's samples as (answer, finished by itself).
    fn sampled(id: &str, samples: &[(Option<&str>, bool)], h: f64) -> PromptResult {
        let mut r = result(id, 0, samples.len(), h);
        r.answers = samples.iter().map(|s| s.0.map(String::from)).collect();
        r.finish = samples
            .iter()
            .map(|s| if s.1 { "eos" } else { "length" }.to_string())
            .collect();
        r
    }

    #[test]
    fn agreement_rule_needs_no_labels() {
        let n = |k: usize, x: (Option<&'static str>, bool)| vec![x; k];
        let cat = |parts: Vec<Vec<(Option<&'static str>, bool)>>| parts.concat();
        // 13 of 16 agree: a confident majority with some doubt.
        let a = sampled(
            "a",
            &cat(vec![n(13, (Some("12"), true)), n(3, (Some("15"), true))]),
            0.2,
        );
        // 16 of 16 agree: no doubt at all.
        let b = sampled("b", &n(16, (Some("7"), true)), 0.1);
        // A plurality that is not a confident majority.
        let c = sampled(
            "c",
            &cat(vec![n(8, (Some("3"), true)), n(8, (Some("4"), true))]),
            0.9,
        );
        // Agreeing answers, but most responses run to the token limit without one.
        let d = sampled(
            "d",
            &cat(vec![n(7, (Some("5"), true)), n(9, (None, false))]),
            0.9,
        );
        // 14 of 16, the same answer written two ways.
        let e = sampled(
            "e",
            &cat(vec![
                n(7, (Some("1/2"), true)),
                n(7, (Some("0.5"), true)),
                n(2, (Some("2"), true)),
            ]),
            0.3,
        );
        assert_eq!(a.agreement(), (Some("12".into()), 13.0 / 16.0));
        assert_eq!(d.terminated(), 7.0 / 16.0);
        assert_eq!(e.agreement().1, 14.0 / 16.0);
        assert!(a.agrees() && b.agrees() && e.agrees());
        assert!(!c.agrees() && !d.agrees());
        let all = vec![b, c, d, e, a];
        assert_eq!(choose(&all, Rule::Agreement).unwrap().id, "a");
        assert!(choose(&all[1..3], Rule::Agreement).is_none());
        assert!(!Rule::Agreement.needs_labels() && Rule::MajorityRight.needs_labels());
    }
}
