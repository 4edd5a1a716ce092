//! The demo: the whole loop on the project's own model organisms, with no network.
//!
//! For each subject (`fixtures/organism-good`, whose majority style is the careful one, and
//! `fixtures/organism-bad`, whose majority rambles): screen its synthetic pool, pick the prompt,
//! choose the learning rate on the validation split, EM-train, convert, and evaluate base and tuned
//! on the held-out test split — next to the base model at low temperature, which in our trials did
//! better than EM. Whatever the result, it is printed as it is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use em_convert::OutType;
use em_data::synthetic::{classify_style, split_as_problems, Split};
use em_data::Problem;
use em_store::{write_atomic, Manifest};
use serde::Serialize;
use serde_json::json;

use crate::eval::{self, mean_score, Decoding, ItemResult, Setting};
use crate::screen::{self, Rule, ScreenArgs};
use crate::train::{self, RefreshType, TrainArgs};
use crate::{analyze, organism, sampling_model, Backend, Result};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Output directory (resumable: finished steps are reused).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Training repeated over this many seeds; tuned figures reported as mean ± sd.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// Learning rates tried on the validation split.
    #[arg(long, value_delimiter = ',', default_value = "1e-5,3e-5,1e-4")]
    pub lrs: Vec<f64>,
    /// Reduced form (few items, few samples, one learning rate) for CI.
    #[arg(long)]
    pub quick: bool,
    /// Subjects: directories of HF models from `cargo xtask organism`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fixtures/organism-good,fixtures/organism-bad"
    )]
    pub subjects: Vec<PathBuf>,
    /// Seed of the synthetic splits.
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Replace outputs that hold another run.
    #[arg(long)]
    pub fresh: bool,
}

/// Sizes of one demo run.
#[derive(Serialize)]
struct Plan {
    pool: usize,
    k: usize,
    validation: usize,
    test: usize,
    samples_per_update: usize,
    steps: usize,
    eval_n: usize,
    max_new_tokens: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                pool: 24,
                k: 4,
                validation: 24,
                test: 48,
                samples_per_update: 16,
                steps: 3,
                eval_n: 2,
                max_new_tokens: 48,
            }
        } else {
            Plan {
                pool: 200,
                k: 8,
                validation: 200,
                test: 500,
                samples_per_update: 64,
                steps: 10,
                eval_n: 4,
                max_new_tokens: 48,
            }
        }
    }
}

/// One evaluated setting of one model on the test split.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub subject: String,
    pub model: String,
    pub setting: String,
    pub n_items: usize,
    pub accuracy: f64,
    pub ci95: (f64, f64),
    /// careful / guess / ramble fractions of all sampled responses.
    pub styles: (f64, f64, f64),
    /// mean ± sd over training seeds (tuned rows with --seeds > 1).
    pub seeds_sd: Option<f64>,
}

/// Runs the demo (see the module documentation) and writes `demo.md` and `demo.json`.
pub fn run(args: &DemoArgs, backend: &dyn Backend) -> Result<()> {
    let plan = Plan::new(args.quick);
    let lrs: Vec<f64> = if args.quick {
        vec![args.lrs.iter().copied().fold(0.0, f64::max)]
    } else {
        args.lrs.clone()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let data = args.out.join("data");
    std::fs::create_dir_all(&data)?;
    let pool = split_as_problems(args.data_seed, Split::Pool, plan.pool);
    let validation = split_as_problems(args.data_seed, Split::Validation, plan.validation);
    let test = split_as_problems(args.data_seed, Split::Test, plan.test);
    let pool_path = data.join("pool.jsonl");
    write_pool(&pool, &pool_path)?;

    let mut rows: Vec<Row> = vec![];
    let mut notes: Vec<String> = vec![];
    let mut plots: Vec<PathBuf> = vec![];
    for subject in &args.subjects {
        // The default subjects are repository paths: find them from any working directory.
        let in_repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(subject);
        let subject = if !subject.exists() && subject.is_relative() && in_repo.exists() {
            &in_repo
        } else {
            subject
        };
        if !subject.join("config.json").is_file() {
            bail!(
                "{}: not a model directory (expected an organism from `cargo xtask organism`)",
                subject.display()
            );
        }
        let name = subject
            .file_name()
            .map_or("subject".into(), |n| n.to_string_lossy().into_owned());
        let dir = args.out.join(&name);
        // Everything under `dir` (screen, runs, evaluations) belongs to this subject and plan.
        let mut manifest = Manifest::new(
            "demo",
            em_store::model_identity(subject)?,
            json!({ "plan": plan, "lrs": lrs, "seeds": args.seeds, "data_seed": args.data_seed, "backend": backend.identity() }),
        );
        manifest.info = json!({ "tool": crate::TOOL });
        manifest.claim(&dir, args.fresh)?;
        println!("\n=== {name} ===");
        let base_gguf = sampling_model(backend, subject, &dir.join("base"), OutType::F32)?;

        // 1. Screen the pool with the base model. The organisms write characters one token at a
        //    time: a repetition penalty would punish every repeated digit of a worked sum, so it is
        //    off here (the reference's 1.15 suits real tokenizers).
        let screen_dir = dir.join("screen");
        let screen_args = ScreenArgs {
            k: plan.k,
            max_new_tokens: plan.max_new_tokens,
            repetition_penalty: 1.0,
            prompt: organism::prompt_options(),
            quant: OutType::F32,
            ..ScreenArgs::reference(subject.to_path_buf(), pool_path.clone(), screen_dir.clone())
        };
        let screened = screen::run(&screen_args, backend)?;
        let by_variance = screen::choose(&screened, Rule::Variance)
            .context("screening found no prompt")?
            .clone();
        let majority = screened.iter().filter(|r| r.majority_right()).count();
        let by_majority = screen::choose(&screened, Rule::MajorityRight).map(|r| r.id.clone());
        notes.push(format!(
            "{name}: screening {} prompts × {} samples: variance rule picks {} (pass {:.2}, 95% CI {:.2}-{:.2}); \
             {majority} prompts have a majority right with confidence{}",
            screened.len(),
            plan.k,
            by_variance.id,
            by_variance.pass_rate,
            by_variance.ci95.0,
            by_variance.ci95.1,
            by_majority.map_or(" (majority-right rule: none qualifies, so it would refuse to train)".into(), |id| format!(" (majority-right rule picks {id})"))
        ));
        let prompt_file = screen_dir.join("chosen.jsonl");

        // 2. Learning rate on the validation split.
        let mut best: Option<(f64, f64)> = None;
        for &lr in &lrs {
            let run_dir = dir.join(format!("lr{lr:e}-seed0"));
            let tuned = train_em(backend, subject, &prompt_file, &run_dir, lr, 15, &plan)?;
            let tuned_gguf = sampling_model(backend, &tuned, &run_dir.join("gguf"), OutType::F32)?;
            let g = eval_setting(
                backend,
                &tuned,
                &tuned_gguf,
                &validation,
                &Setting {
                    label: "val".into(),
                    temperature: 0.0,
                    n: 1,
                    em_inf: None,
                },
                &plan,
                &run_dir.join("validation"),
            )?;
            let t = eval_setting(
                backend,
                &tuned,
                &tuned_gguf,
                &validation,
                &Setting {
                    label: "val".into(),
                    temperature: 0.5,
                    n: plan.eval_n,
                    em_inf: None,
                },
                &plan,
                &run_dir.join("validation"),
            )?;
            let score = (mean_score(&g) + mean_score(&t)) / 2.0;
            notes.push(format!(
                "{name}: lr {lr:e}: validation greedy {:.3}, T=0.5 {:.3}",
                mean_score(&g),
                mean_score(&t)
            ));
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((lr, score));
            }
        }
        let (lr, _) = best.expect("at least one learning rate");
        notes.push(format!(
            "{name}: chosen lr {lr:e} (mean of validation greedy and T=0.5 accuracy)"
        ));

        // 3. Test split: base at every temperature, tuned over seeds.
        let base_settings = [0.0f32, 0.1, 0.25, 0.5, 1.0];
        let tuned_settings = [0.0f32, 0.5, 1.0];
        let mut base_results: BTreeMap<String, Vec<ItemResult>> = BTreeMap::new();
        for &t in &base_settings {
            let setting = Setting {
                label: "base".into(),
                temperature: t,
                n: if t > 0.0 { plan.eval_n } else { 1 },
                em_inf: None,
            };
            let items = eval_setting(
                backend,
                subject,
                &base_gguf,
                &test,
                &setting,
                &plan,
                &dir.join("test"),
            )?;
            rows.push(row(&name, "base", &setting, &items, None));
            base_results.insert(setting_name(t), items);
        }
        let mut tuned_by_seed: BTreeMap<String, Vec<Vec<ItemResult>>> = BTreeMap::new();
        let mut first_run = None;
        for seed_index in 0..args.seeds.max(1) {
            let seed = 15 + seed_index as u64;
            let run_dir = dir.join(format!("lr{lr:e}-seed{seed_index}"));
            let tuned = train_em(backend, subject, &prompt_file, &run_dir, lr, seed, &plan)?;
            let tuned_gguf = sampling_model(backend, &tuned, &run_dir.join("gguf"), OutType::F32)?;
            for &t in &tuned_settings {
                let setting = Setting {
                    label: "tuned".into(),
                    temperature: t,
                    n: if t > 0.0 { plan.eval_n } else { 1 },
                    em_inf: None,
                };
                let items = eval_setting(
                    backend,
                    &tuned,
                    &tuned_gguf,
                    &test,
                    &setting,
                    &plan,
                    &run_dir.join("test"),
                )?;
                tuned_by_seed
                    .entry(setting_name(t))
                    .or_default()
                    .push(items);
            }
            first_run.get_or_insert(run_dir);
        }
        for &t in &tuned_settings {
            let runs = &tuned_by_seed[&setting_name(t)];
            let accs: Vec<f64> = runs.iter().map(|r| mean_score(r)).collect();
            let sd = (runs.len() > 1).then(|| sd(&accs));
            let setting = Setting {
                label: "tuned".into(),
                temperature: t,
                n: if t > 0.0 { plan.eval_n } else { 1 },
                em_inf: None,
            };
            let mut r = row(&name, "tuned", &setting, &runs[0], sd);
            r.accuracy = accs.iter().sum::<f64>() / accs.len() as f64;
            rows.push(r);
            // Paired against the base at the same setting and at its best temperature.
            let same = &base_results[&setting_name(t)];
            let best_base = base_results
                .iter()
                .reduce(|a, b| {
                    if mean_score(b.1) > mean_score(a.1) {
                        b
                    } else {
                        a
                    }
                })
                .expect("base results");
            let c = eval::compare(
                &name,
                &runs[0],
                same,
                &format!("base {}", setting_name(t)),
                best_base.1,
                &format!("base {}", best_base.0),
            );
            notes.push(format!(
                "{name}: tuned {} − base same setting {:+.3} (95% CI {:+.3}, {:+.3}; McNemar p {:.3}); − best base [{}] {:+.3} (95% CI {:+.3}, {:+.3}; p {:.3})",
                setting_name(t), c.diff_same.0, c.diff_same.1, c.diff_same.2, c.mcnemar_p_same,
                c.best_baseline_setting, c.diff_best.0, c.diff_best.1, c.diff_best.2, c.mcnemar_p_best
            ));
        }

        // 4. What the tuned model looks like served quantized, and what EM did to it.
        let run_dir = first_run.expect("one run");
        let tuned_dir = run_dir.join("final");
        for quant in [OutType::F16, OutType::Q8_0, OutType::Q4KM] {
            let gguf = sampling_model(backend, &tuned_dir, &run_dir.join("gguf"), quant)?;
            let setting = Setting {
                label: format!("tuned-{}", analyze::out_name(quant)),
                temperature: 0.0,
                n: 1,
                em_inf: None,
            };
            let items = eval_setting(
                backend,
                &tuned_dir,
                &gguf,
                &test,
                &setting,
                &plan,
                &run_dir.join("test"),
            )?;
            rows.push(row(
                &name,
                &format!("tuned ({})", analyze::out_name(quant)),
                &setting,
                &items,
                None,
            ));
        }
        let fidelity = analyze::fidelity(subject, &tuned_dir)?;
        notes.push(format!(
            "{name}: {}",
            analyze::fidelity_summary(&fidelity).replace('\n', "; ")
        ));
        let pairs: Vec<(String, String)> = base_results[&setting_name(0.5)]
            .iter()
            .zip(&test)
            .take(32)
            .map(|(item, problem)| {
                (
                    problem
                        .messages
                        .as_ref()
                        .map_or(problem.problem.clone(), |m| m[0].content.clone()),
                    item.samples[0].response.clone(),
                )
            })
            .collect();
        let shift = analyze::logit_shift(subject, &tuned_dir, &pairs)?;
        notes.push(format!(
            "{name}: logits on {} base-sampled answer positions: std {:.3} → {:.3}, skew {:.3} → {:.3}",
            shift.n_positions, shift.base.std, shift.tuned.std, shift.base.skew, shift.tuned.skew
        ));
        plots.push(analyze::write_logit_shift(&shift, &dir.join("plots"))?);
        plots.push(analyze::plot_curves(
            &run_dir.join("metrics.jsonl"),
            &dir.join("plots"),
        )?);
    }
    report(&args.out, &rows, &notes, &plots)
}

fn setting_name(t: f32) -> String {
    if t <= 0.0 {
        "greedy".into()
    } else {
        format!("T={t}")
    }
}

fn sd(xs: &[f64]) -> f64 {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1).max(1) as f64).sqrt()
}

fn row(
    subject: &str,
    model: &str,
    setting: &Setting,
    items: &[ItemResult],
    seeds_sd: Option<f64>,
) -> Row {
    let summary = eval::summarize("test", setting, items);
    let mut counts = [0usize; 3];
    let mut total = 0usize;
    for s in items.iter().flat_map(|i| &i.samples) {
        let idx = match classify_style(&s.response) {
            em_data::synthetic::Style::Careful => 0,
            em_data::synthetic::Style::Guess => 1,
            em_data::synthetic::Style::Ramble => 2,
        };
        counts[idx] += 1;
        total += 1;
    }
    let f = |c: usize| c as f64 / total.max(1) as f64;
    Row {
        subject: subject.into(),
        model: model.into(),
        setting: setting_name(setting.temperature),
        n_items: summary.n_items,
        accuracy: summary.accuracy,
        ci95: summary.ci95,
        styles: (f(counts[0]), f(counts[1]), f(counts[2])),
        seeds_sd,
    }
}

fn write_pool(problems: &[Problem], path: &Path) -> Result<()> {
    let mut text = String::new();
    for p in problems {
        let messages = p.messages.clone().unwrap_or_default();
        let line = json!({"id": p.id, "prompt": messages, "answer": p.answers.first(), "data_source": p.source});
        text += &format!("{line}\n");
    }
    Ok(write_atomic(path, &text)?)
}

/// EM training of `subject` on the chosen prompt (resumes if `out` holds the run); returns the
/// trained model's directory.
fn train_em(
    backend: &dyn Backend,
    subject: &Path,
    prompt: &Path,
    out: &Path,
    lr: f64,
    seed: u64,
    plan: &Plan,
) -> Result<PathBuf> {
    let args = TrainArgs {
        steps: plan.steps,
        samples: plan.samples_per_update,
        micro_batch: 16,
        lr,
        seed,
        max_new_tokens: plan.max_new_tokens,
        // No repetition penalty for character-level organisms (see the screen above).
        repetition_penalty: 1.0,
        // The organisms are tiny: sampling exactly the f32 weights being trained costs nothing
        // (and is what the demo's figures were measured with).
        refresh_type: RefreshType::F32,
        prompt_options: organism::prompt_options(),
        ..TrainArgs::reference(
            subject.to_path_buf(),
            prompt.to_path_buf(),
            out.to_path_buf(),
        )
    };
    train::run(&args, backend)?
        .with_context(|| format!("{}: training did not finish", out.display()))
}

#[allow(clippy::too_many_arguments)]
fn eval_setting(
    backend: &dyn Backend,
    source: &Path,
    gguf: &Path,
    problems: &[Problem],
    setting: &Setting,
    plan: &Plan,
    out_dir: &Path,
) -> Result<Vec<ItemResult>> {
    std::fs::create_dir_all(out_dir)?;
    let decoding = Decoding {
        prompt: organism::prompt_options(),
        top_p: 0.95,
        max_new_tokens: plan.max_new_tokens,
        seed: 1234,
    };
    let file = out_dir.join(format!("{}.jsonl", setting.tag()));
    eval::evaluate(backend, source, gguf, problems, setting, &decoding, &file)
}

fn report(out: &Path, rows: &[Row], notes: &[String], plots: &[PathBuf]) -> Result<()> {
    let mut md = String::from(
        "| subject | model | decoding | n | accuracy | 95% CI | careful / guess / ramble |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let acc = match r.seeds_sd {
            Some(sd) => format!("{:.3} ± {sd:.3}", r.accuracy),
            None => format!("{:.3}", r.accuracy),
        };
        md += &format!(
            "| {} | {} | {} | {} | {acc} | {:.3}–{:.3} | {:.2} / {:.2} / {:.2} |\n",
            r.subject,
            r.model,
            r.setting,
            r.n_items,
            r.ci95.0,
            r.ci95.1,
            r.styles.0,
            r.styles.1,
            r.styles.2
        );
    }
    md += "\n";
    for n in notes {
        md += &format!("- {n}\n");
    }
    md += "\nPlots:\n";
    for p in plots {
        md += &format!("- {}\n", p.display());
    }
    write_atomic(&out.join("demo.md"), &md)?;
    write_atomic(
        &out.join("demo.json"),
        serde_json::to_string_pretty(&json!({"rows": rows, "notes": notes, "plots": plots}))?
            + "\n",
    )?;
    println!("\n{md}");
    println!("{}", out.join("demo.md").display());
    Ok(())
}
