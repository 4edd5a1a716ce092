//! The demo: the whole loop on the project's own model organism, with no network, showing both
//! faces of one-shot EM and the label-free safeguard between them.
//!
//! On `fixtures/organism-mixed` (whose style choice depends on the problem's first digit, with
//! near-ties in between): screen its synthetic pool; pick a prompt by each rule — `majority-right`
//! (needs labels), `agreement` (label-free) and `majority-wrong` (the worst prompt, on purpose);
//! for each, choose the learning rate on the validation split and EM-train over seeds with the
//! safeguard watching held-out unlabeled prompts; evaluate on the test split the base model
//! (greedy, low temperature, EM-INF), each tuned model, and each model as the safeguard would
//! have left it, with paired intervals; plot held-out accuracy and the safeguard's signals per
//! update for the good and the bad prompt; print a verdict in words from the numbers.
//!
//! Every run trains in the safeguard's `warn` mode with a checkpoint after each update, so its
//! whole curve is seen; the safeguarded model is the checkpoint a `stop` run ends with (the last
//! weights whose watch round passed), which the same seeds make identical.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use em_convert::OutType;
use em_data::synthetic::{classify_style, split_as_problems, Split};
use em_data::Problem;
use em_sampler::EmInf;
use em_store::{write_atomic, JsonlStore, Manifest};
use serde::Serialize;
use serde_json::{json, Value};

use crate::{analyze, organism};
use em_pipeline::eval::{self, mean_score, Decoding, ItemResult, Setting};
use em_pipeline::screen::{self, PromptResult, Rule, ScreenOptions};
use em_pipeline::train::{
    self, AdapterOptions, CheckpointSettings, OnAlarm, RefreshType, SampleSettings, TrainOptions,
    UpdateSettings, WatchSettings,
};
use em_pipeline::{sampling_model, Backend, Result};
use em_train::lora::LoraConfig;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DemoOptions {
    /// Output directory (resumable: finished steps are reused).
    pub out: PathBuf,
    /// Training seeds per prompt at its chosen learning rate.
    pub seeds: usize,
    /// Learning rates tried on the validation split.
    pub lrs: Vec<f64>,
    /// Reduced form (few items, few samples, one learning rate, one seed) for CI.
    pub quick: bool,
    /// The subject: an HF model directory from `cargo xtask organism` (also
    /// fixtures/organism-good and fixtures/organism-bad).
    pub subject: PathBuf,
    /// Seed of the synthetic splits.
    pub data_seed: u64,
    /// Replace outputs that hold another run.
    pub fresh: bool,
    /// With `--adapter lora`: every chosen prompt also trained through a LoRA adapter (its
    /// learning rate chosen on validation from `--lora-lrs`), next to full fine-tuning, compared
    /// paired on the test split; the report is `demo-lora.md`.
    #[serde(flatten)]
    pub adapter: AdapterOptions,
    /// Learning rates tried for the adapter (LoRA's updates are scaled by alpha/rank and start
    /// from B = 0: it needs larger rates than full fine-tuning).
    pub lora_lrs: Vec<f64>,
}

/// Sizes of one demo run.
#[derive(Serialize, Clone)]
struct Plan {
    pool: usize,
    k: usize,
    validation: usize,
    test: usize,
    /// Test problems each checkpoint of the plotted runs is evaluated on.
    curve: usize,
    samples_per_update: usize,
    steps: usize,
    eval_n: usize,
    max_new_tokens: usize,
    watch: usize,
    watch_samples: usize,
    em_inf: EmInf,
}

impl Plan {
    fn new(quick: bool) -> Self {
        let em_inf = EmInf::DEFAULT;
        if quick {
            Plan {
                pool: 24,
                k: 8,
                validation: 24,
                test: 48,
                curve: 24,
                samples_per_update: 16,
                steps: 3,
                eval_n: 2,
                max_new_tokens: 48,
                watch: 8,
                watch_samples: 2,
                em_inf,
            }
        } else {
            Plan {
                pool: 200,
                k: 16,
                validation: 200,
                test: 500,
                curve: 200,
                samples_per_update: 64,
                steps: 10,
                eval_n: 4,
                max_new_tokens: 48,
                watch: 32,
                watch_samples: 4,
                em_inf,
            }
        }
    }
}

/// One evaluated setting of one model on the test split.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub model: String,
    pub setting: String,
    pub n_items: usize,
    pub accuracy: f64,
    pub ci95: (f64, f64),
    /// careful / guess / ramble fractions of all sampled responses.
    pub styles: (f64, f64, f64),
    /// Paired difference from the base model at the same decoding (mean over seeds per item):
    /// mean and 95% interval.
    pub vs_base: Option<(f64, f64, f64)>,
    /// Per seed accuracies (tuned rows).
    pub per_seed: Vec<f64>,
}

/// One training run and what the safeguard made of it.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub rule: String,
    pub prompt: String,
    /// "full", or the adapter trained.
    pub training: String,
    pub lr: f64,
    pub seed: u64,
    /// Weights step of the first alarm, and its reason.
    pub alarm: Option<(usize, String)>,
    /// Updates in the model the safeguard leaves.
    pub guarded_step: usize,
    pub test_greedy_tuned: f64,
    pub test_greedy_guarded: f64,
    pub test_greedy_base: f64,
}

/// A prompt trained on, with the rules that picked it and its screening figures.
struct Chosen {
    rules: Vec<&'static str>,
    result: PromptResult,
    file: PathBuf,
}

/// Runs the demo (see the module documentation) and writes `demo.md` and `demo.json`.
pub fn run(args: &DemoOptions, backend: &dyn Backend) -> Result<()> {
    let plan = Plan::new(args.quick);
    let grid = |lrs: &[f64]| -> Vec<f64> {
        if args.quick {
            vec![lrs.iter().copied().fold(0.0, f64::max)]
        } else {
            lrs.to_vec()
        }
    };
    let lrs = grid(&args.lrs);
    let lora = args.adapter.lora()?;
    let lora_lrs = grid(&args.lora_lrs);
    // Full fine-tuning always; the adapter, when asked for, next to it.
    let trainings: Vec<Option<LoraConfig>> = std::iter::once(None)
        .chain(lora.clone().map(Some))
        .collect();
    let seeds = if args.quick { 1 } else { args.seeds.max(1) };
    // The default subject is a repository path: find it from any working directory.
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(&args.subject);
    let subject = if !args.subject.exists() && args.subject.is_relative() && in_repo.exists() {
        in_repo
    } else {
        args.subject.clone()
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
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let dir = args.out.join(&name);
    // The adapter's runs live in their own directories (`<rule>/lora-r<rank>/`), each recording
    // its settings: a LoRA demo reuses a full one's runs, so the adapter is not in this identity.
    let mut manifest = Manifest::new(
        "demo",
        em_store::model_identity(&subject)?,
        json!({ "plan": plan, "lrs": lrs, "seeds": seeds, "data_seed": args.data_seed, "backend": backend.identity() }),
    );
    manifest.info = json!({ "tool": em_pipeline::TOOL });
    manifest.claim(&dir, args.fresh)?;

    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let mut pool = split_as_problems(args.data_seed, Split::Pool, plan.pool + plan.watch);
    let watch = pool.split_off(plan.pool);
    let validation = split_as_problems(args.data_seed, Split::Validation, plan.validation);
    let test = split_as_problems(args.data_seed, Split::Test, plan.test);
    let pool_path = data.join("pool.jsonl");
    write_pool(&pool, &pool_path)?;
    // The evaluation splits too, in the same format, for `cargo xtask eval --suites FILE`.
    write_pool(&validation, &data.join("validation.jsonl"))?;
    write_pool(&test, &data.join("test.jsonl"))?;
    // The safeguard never reads labels: its prompts are written without answers.
    let watch_path = data.join("watch.jsonl");
    write_pool(
        &watch
            .iter()
            .map(|p| Problem {
                answers: vec![],
                ..p.clone()
            })
            .collect::<Vec<_>>(),
        &watch_path,
    )?;
    println!("=== {name} ===");
    let mut phases = Phases::new();
    let base_gguf = sampling_model(backend, &subject, &dir.join("base"), OutType::F32)?;
    phases.lap("convert");
    let mut notes: Vec<String> = vec![];

    // 1. Screen. The organisms write one character a token: a repetition penalty would punish
    //    every repeated digit of a worked sum, so it is off (the reference's 1.15 suits real
    //    tokenizers).
    let screen_dir = dir.join("screen");
    let screen_args = ScreenOptions {
        k: plan.k,
        max_new_tokens: plan.max_new_tokens,
        repetition_penalty: 1.0,
        prompt: organism::prompt_options(),
        quant: OutType::F32,
        ..ScreenOptions::reference(subject.clone(), pool_path.clone(), screen_dir.clone())
    };
    let screened = screen::run(&screen_args, backend)?;
    phases.lap("screen");
    let raw: Vec<String> = std::fs::read_to_string(&pool_path)?
        .lines()
        .map(String::from)
        .collect();
    let mut chosen: Vec<Chosen> = vec![];
    for (label, rule) in [
        ("majority-right", Rule::MajorityRight),
        ("agreement", Rule::Agreement),
        ("majority-wrong", Rule::MajorityWrong),
    ] {
        let Some(r) = screen::choose(&screened, rule) else {
            notes.push(format!(
                "screen: rule {label} finds no qualifying prompt among {}",
                screened.len()
            ));
            continue;
        };
        if let Some(c) = chosen.iter_mut().find(|c| c.result.id == r.id) {
            c.rules.push(label);
            continue;
        }
        let line = pool
            .iter()
            .position(|p| p.id == r.id)
            .map(|i| raw[i].clone())
            .context("a chosen prompt is in the pool")?;
        let file = screen_dir.join(format!("chosen-{label}.jsonl"));
        write_atomic(&file, format!("{line}\n"))?;
        chosen.push(Chosen {
            rules: vec![label],
            result: r.clone(),
            file,
        });
    }
    for c in &chosen {
        let (answer, share) = c.result.agreement();
        notes.push(format!(
            "screen ({} prompts × {}): {} picks {}: pass {}/{} [{:.2}, {:.2}], majority answer {} held by {:.2}, answered-and-stopped {:.2}",
            screened.len(),
            plan.k,
            c.rules.join(" and "),
            c.result.id,
            c.result.correct,
            c.result.n,
            c.result.ci95.0,
            c.result.ci95.1,
            answer.as_deref().unwrap_or("(none)"),
            share,
            c.result.terminated()
        ));
    }
    if chosen.is_empty() {
        bail!("screening found no prompt under any rule");
    }

    // 2. Baselines on the test split: greedy, low temperature, sampling, EM-INF.
    let eval_dir = dir.join("test");
    let mut rows: Vec<Row> = vec![];
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
        let items = eval_setting(backend, &subject, &base_gguf, &test, s, &plan, &eval_dir)?;
        rows.push(row("base", s, &[items.clone()], None));
        base.insert(decoding_name(s), items);
    }
    let base_greedy = mean_score(&base["greedy"]);
    let base_validation = mean_score(&eval_setting(
        backend,
        &subject,
        &base_gguf,
        &validation,
        &setting("val-base", 0.0, 1, None),
        &plan,
        &dir.join("validation"),
    )?);
    phases.lap("baselines");

    // 3. Train on each chosen prompt: the learning rate on validation, then seeds.
    let mut runs: Vec<RunSummary> = vec![];
    let mut curves: Vec<(String, Curve)> = vec![];
    let mut guarded_dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut tuned_items: BTreeMap<(String, String), Vec<Option<Vec<ItemResult>>>> = BTreeMap::new();
    for (c, training) in chosen
        .iter()
        .flat_map(|c| trainings.iter().map(move |t| (c, t)))
    {
        let tag = c.rules[0];
        let (runs_dir, lrs, kind) = match training {
            None => (tag.to_string(), &lrs, String::new()),
            Some(l) => (
                format!("{tag}/lora-r{}", l.rank),
                &lora_lrs,
                format!("{}, ", training_name(training.as_ref())),
            ),
        };
        let mut best: Option<(f64, f64)> = None;
        let mut validation_notes = vec![];
        for &lr in lrs {
            let run_dir = dir.join(format!("{runs_dir}/lr{lr:e}-seed0"));
            let tuned = train_em(
                backend,
                &subject,
                &c.file,
                &run_dir,
                &watch_path,
                lr,
                0,
                &plan,
                training.as_ref(),
            )?;
            phases.lap("train");
            let gguf = sampling_model(backend, &tuned, &run_dir.join("gguf"), OutType::F32)?;
            phases.lap("convert");
            let g = eval_setting(
                backend,
                &tuned,
                &gguf,
                &validation,
                &setting("val", 0.0, 1, None),
                &plan,
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
        let mut tuned_by_setting: BTreeMap<String, Vec<Vec<ItemResult>>> = BTreeMap::new();
        let mut guarded_by_setting: BTreeMap<String, Vec<Vec<ItemResult>>> = BTreeMap::new();
        for seed in 0..seeds as u64 {
            let run_dir = dir.join(format!("{runs_dir}/lr{lr:e}-seed{seed}"));
            let tuned = train_em(
                backend,
                &subject,
                &c.file,
                &run_dir,
                &watch_path,
                lr,
                seed,
                &plan,
                training.as_ref(),
            )?;
            phases.lap("train");
            let alarm = first_alarm(&run_dir.join("metrics.jsonl"))?;
            let guarded_step = alarm
                .as_ref()
                .map_or(plan.steps, |(s, _)| s.saturating_sub(1));
            let guarded = if guarded_step == 0 {
                subject.clone()
            } else if guarded_step == plan.steps {
                tuned.clone()
            } else {
                as_model(
                    &subject,
                    &run_dir.join(format!("checkpoint-{guarded_step}")),
                )?
            };
            let mut greedy = (0.0, 0.0);
            let mut models = vec![(&tuned, "tuned")];
            if guarded != tuned {
                models.push((&guarded, "guarded"));
            }
            for (model, which) in models {
                let gguf = sampling_model(
                    backend,
                    model,
                    &run_dir.join(format!("gguf-{which}")),
                    OutType::F32,
                )?;
                phases.lap("convert");
                // The safeguarded model differs only where an alarm rolled it back: greedy only.
                let settings = if which == "tuned" {
                    vec![
                        setting(which, 0.0, 1, None),
                        setting(which, 0.5, plan.eval_n, None),
                    ]
                } else {
                    vec![setting(which, 0.0, 1, None)]
                };
                for s in settings {
                    let items = eval_setting(
                        backend,
                        model,
                        &gguf,
                        &test,
                        &s,
                        &plan,
                        &run_dir.join(format!("test-{which}")),
                    )?;
                    phases.lap("test");
                    let by = if which == "tuned" {
                        &mut tuned_by_setting
                    } else {
                        &mut guarded_by_setting
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
                for (k, v) in tuned_by_setting
                    .iter()
                    .filter(|(k, _)| k.as_str() == "greedy")
                {
                    guarded_by_setting
                        .entry(k.clone())
                        .or_default()
                        .push(v.last().expect("tuned results").clone());
                }
                greedy.1 = greedy.0;
            }
            runs.push(RunSummary {
                rule: c.rules.join("/"),
                prompt: c.result.id.clone(),
                training: training_name(training.as_ref()),
                lr,
                seed,
                alarm: alarm.clone(),
                guarded_step,
                test_greedy_tuned: greedy.0,
                test_greedy_guarded: greedy.1,
                test_greedy_base: base_greedy,
            });
            if seed == 0 {
                if training.is_none() {
                    guarded_dirs.insert(tag.to_string(), guarded.clone());
                }
                curves.push((
                    format!("{} ({}, {kind}lr {lr:e})", c.rules.join("/"), c.result.id),
                    curve(
                        backend,
                        &subject,
                        &run_dir,
                        &test[..plan.curve.min(test.len())],
                        &plan,
                    )?,
                ));
                phases.lap("curve");
            }
        }
        for (label, by) in [
            ("tuned", &tuned_by_setting),
            ("safeguarded", &guarded_by_setting),
        ] {
            for (decoding, per_seed) in by {
                let s = Setting {
                    label: label.into(),
                    temperature: if decoding == "greedy" { 0.0 } else { 0.5 },
                    n: if decoding == "greedy" { 1 } else { plan.eval_n },
                    em_inf: None,
                };
                let model = format!(
                    "{label} on {} ({}, {kind}lr {lr:e})",
                    c.rules.join("/"),
                    c.result.id
                );
                rows.push(row(&model, &s, per_seed, base.get(decoding)));
                if label == "tuned" {
                    let by_training = tuned_items
                        .entry((c.rules.join("/"), decoding.clone()))
                        .or_insert_with(|| vec![None; trainings.len()]);
                    let i = trainings.iter().position(|t| t == training).unwrap_or(0);
                    by_training[i] = Some(mean_over_seeds(per_seed));
                }
            }
        }
    }

    // 4. What the good run looks like served quantized, and what EM did to it.
    if let Some(good) = guarded_dirs
        .get("majority-right")
        .or_else(|| guarded_dirs.get("agreement"))
        .filter(|d| d.as_path() != subject.as_path())
    {
        let tuned_dir = good.clone();
        for quant in [OutType::Q4KM] {
            let out = tuned_dir.with_extension(format!("gguf-{}", analyze::out_name(quant)));
            let gguf = sampling_model(backend, &tuned_dir, &out, quant)?;
            let s = setting(&format!("good-{}", analyze::out_name(quant)), 0.0, 1, None);
            let items = eval_setting(backend, &tuned_dir, &gguf, &test, &s, &plan, &out)?;
            rows.push(row(
                &format!("safeguarded good run ({})", analyze::out_name(quant)),
                &s,
                &[items],
                base.get("greedy"),
            ));
        }
        phases.lap("quantized");
        let fidelity = analyze::fidelity(&subject, &tuned_dir)?;
        notes.push(format!(
            "good run: {}",
            analyze::fidelity_summary(&fidelity).replace('\n', "; ")
        ));
    }

    // 5. The safeguard over seeds.
    let helped = |r: &RunSummary| r.test_greedy_tuned > r.test_greedy_base;
    let hurt = |r: &RunSummary| r.test_greedy_tuned < r.test_greedy_base - 0.02;
    let false_alarms = runs
        .iter()
        .filter(|r| helped(r) && r.alarm.is_some())
        .count();
    let caught = runs.iter().filter(|r| hurt(r) && r.alarm.is_some()).count();
    notes.push(format!(
        "safeguard: {} runs; {} helped (tuned greedy above base), {false_alarms} of them alarmed (false alarms); {} hurt by more than 2 points, {caught} of them stopped",
        runs.len(),
        runs.iter().filter(|r| helped(r)).count(),
        runs.iter().filter(|r| hurt(r)).count(),
    ));

    let plot_dir = dir.join(if lora.is_some() {
        "plots-lora"
    } else {
        "plots"
    });
    let plots = if curves.is_empty() {
        vec![]
    } else {
        write_curves(&curves, &plot_dir)?
    };
    phases.lap("report");
    notes.push(phases.summary());
    let verdict = verdict(&rows, &runs, base_greedy);
    let (stem, comparison) = match &lora {
        None => ("demo", vec![]),
        Some(l) => ("demo-lora", adapter_rows(&tuned_items, l)),
    };
    report(
        &Report {
            out: &args.out,
            stem,
            subject: &name,
            rows: &rows,
            runs: &runs,
            notes: &notes,
            plots: &plots,
            verdict: &verdict,
            curves: &curves,
        },
        &comparison,
    )
}

/// Wall time per kind of work (steps reused from an earlier run cost nearly nothing).
struct Phases {
    last: Instant,
    start: Instant,
    spent: Vec<(&'static str, f64)>,
}

impl Phases {
    fn new() -> Self {
        let now = Instant::now();
        Phases {
            last: now,
            start: now,
            spent: vec![],
        }
    }

    /// Adds the time since the previous lap to `kind`.
    fn lap(&mut self, kind: &'static str) {
        let now = Instant::now();
        let secs = (now - self.last).as_secs_f64();
        self.last = now;
        match self.spent.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, s)) => *s += secs,
            None => self.spent.push((kind, secs)),
        }
    }

    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .spent
            .iter()
            .map(|(k, s)| format!("{k} {s:.0} s"))
            .collect();
        format!(
            "wall time {:.0} s: {}",
            self.start.elapsed().as_secs_f64(),
            parts.join(", ")
        )
    }
}

fn setting(label: &str, temperature: f32, n: usize, em_inf: Option<EmInf>) -> Setting {
    Setting {
        label: label.into(),
        temperature,
        n,
        em_inf,
    }
}

/// `greedy`, `T=0.5`, `T=0.5 EM-INF`.
fn decoding_name(s: &Setting) -> String {
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

/// The weights step and reason of a run's first alarm, from its metrics.
fn first_alarm(metrics: &Path) -> Result<Option<(usize, String)>> {
    Ok(JsonlStore::<Value>::read(metrics)?
        .into_iter()
        .find_map(|v| {
            let reason = v.get("safeguard")?.get("reason")?.as_str()?.to_string();
            let step = v.get("watch")?.get("weights_step")?.as_u64()? as usize;
            Some((step, reason))
        }))
}

/// Held-out greedy accuracy and the safeguard's signals per update of one run.
#[derive(Debug, Clone, Serialize)]
struct Curve {
    /// (weights step, greedy accuracy on the curve problems)
    accuracy: Vec<(usize, f64)>,
    /// (weights step, answered share, drifted share of watched prompts)
    signals: Vec<(usize, f64, f64)>,
    /// Thresholds: lowest answered share and most drifted share that pass.
    answered_floor: f64,
    drift_ceiling: f64,
    alarm: Option<usize>,
}

fn curve(
    backend: &dyn Backend,
    subject: &Path,
    run_dir: &Path,
    problems: &[Problem],
    plan: &Plan,
) -> Result<Curve> {
    let mut accuracy = vec![];
    for step in 0..=plan.steps {
        let model = if step == 0 {
            subject.to_path_buf()
        } else {
            as_model(subject, &run_dir.join(format!("checkpoint-{step}")))?
        };
        let gguf = sampling_model(
            backend,
            &model,
            &run_dir.join(format!("curve/gguf-{step}")),
            OutType::F32,
        )?;
        let items = eval_setting(
            backend,
            &model,
            &gguf,
            problems,
            &setting(&format!("curve-{step}"), 0.0, 1, None),
            plan,
            &run_dir.join("curve"),
        )?;
        accuracy.push((step, mean_score(&items)));
    }
    let mut signals = vec![];
    let (mut floor, mut ceiling) = (0.0, 1.0);
    for v in JsonlStore::<Value>::read(&run_dir.join("metrics.jsonl"))? {
        let Some(w) = v.get("watch") else { continue };
        let get = |k: &str| w.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let prompts = get("prompts").max(1.0);
        signals.push((
            get("weights_step") as usize,
            get("answered"),
            get("drifted") / prompts,
        ));
        floor = get("answered_step0") - get("answered_drop_max");
        ceiling = get("drift_max") / prompts;
    }
    Ok(Curve {
        accuracy,
        signals,
        answered_floor: floor,
        drift_ceiling: ceiling,
        alarm: first_alarm(&run_dir.join("metrics.jsonl"))?.map(|(s, _)| s),
    })
}

/// One panel per plotted run: held-out greedy accuracy, the answered share and the drifted share
/// per update, the thresholds dashed, the first alarm marked; SVG and PNG.
fn write_curves(curves: &[(String, Curve)], out: &Path) -> Result<Vec<PathBuf>> {
    use plotters::prelude::*;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let svg = out.join("safeguard.svg");
    {
        let root = SVGBackend::new(&svg, (520 * curves.len() as u32, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((1, curves.len()));
        for (panel, (title, c)) in panels.iter().zip(curves) {
            let x1 = c.accuracy.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 15))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(40)
                .build_cartesian_2d(0f64..x1, 0f64..1f64)?;
            chart
                .configure_mesh()
                .x_desc("updates")
                .y_desc("share")
                .draw()?;
            let acc: Vec<(f64, f64)> = c.accuracy.iter().map(|&(s, a)| (s as f64, a)).collect();
            let answered: Vec<(f64, f64)> =
                c.signals.iter().map(|&(s, a, _)| (s as f64, a)).collect();
            let drifted: Vec<(f64, f64)> =
                c.signals.iter().map(|&(s, _, d)| (s as f64, d)).collect();
            for (points, color, label) in [
                (acc, BLUE, "held-out greedy accuracy (labels, eval only)"),
                (answered, GREEN, "watch: answered and stopped"),
                (drifted, RED, "watch: majority answers drifted"),
            ] {
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            for (y, color) in [(c.answered_floor, GREEN), (c.drift_ceiling, RED)] {
                chart.draw_series(DashedLineSeries::new(
                    vec![(0.0, y), (x1, y)],
                    6,
                    4,
                    color.mix(0.6).stroke_width(1),
                ))?;
            }
            if let Some(a) = c.alarm {
                chart
                    .draw_series(LineSeries::new(
                        vec![(a as f64, 0.0), (a as f64, 1.0)],
                        BLACK.stroke_width(2),
                    ))?
                    .label(format!(
                        "safeguard alarm on the weights after {a} updates (keeps {})",
                        a.saturating_sub(1)
                    ))
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 11))
                .draw()?;
        }
        root.present()?;
    }
    let png = out.join("safeguard.png");
    svg_to_png(&svg, &png)?;
    Ok(vec![svg, png])
}

/// Renders an SVG file to PNG (system fonts for the text, where there are any).
fn svg_to_png(svg: &Path, png: &Path) -> Result<()> {
    let data = std::fs::read(svg).with_context(|| format!("{}: cannot read", svg.display()))?;
    let mut options = resvg::usvg::Options::default();
    let db = options.fontdb_mut();
    db.load_system_fonts();
    // fontdb maps `sans-serif` to Arial; use a sans face this machine has.
    let families: Vec<String> = db
        .faces()
        .flat_map(|f| f.families.iter().map(|(name, _)| name.clone()))
        .collect();
    if !families.iter().any(|f| f == "Arial") {
        if let Some(f) = families
            .iter()
            .find(|f| f.contains("Sans") && !f.contains("Mono"))
            .or(families.first())
        {
            db.set_sans_serif_family(f.clone());
        }
    }
    let tree = resvg::usvg::Tree::from_data(&data, &options)
        .map_err(|e| anyhow::anyhow!("{}: not a valid SVG: {e}", svg.display()))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .with_context(|| format!("{}: empty image", svg.display()))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap
        .save_png(png)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", png.display()))?;
    Ok(())
}

fn row(
    model: &str,
    setting: &Setting,
    per_seed: &[Vec<ItemResult>],
    base: Option<&Vec<ItemResult>>,
) -> Row {
    // Items scored by their mean over seeds, so the interval is over items (paired with base).
    let mean_items = mean_over_seeds(per_seed);
    let summary = eval::summarize("test", setting, &mean_items);
    let vs_base = base.map(|b| {
        let by_id: BTreeMap<&str, f64> = b.iter().map(|r| (r.id.as_str(), r.score())).collect();
        let (a, c): (Vec<f64>, Vec<f64>) = mean_items
            .iter()
            .filter_map(|r| by_id.get(r.id.as_str()).map(|&s| (r.score(), s)))
            .unzip();
        em_grade::paired_difference(&a, &c)
    });
    Row {
        model: model.into(),
        setting: decoding_name(setting),
        n_items: summary.n_items,
        accuracy: summary.accuracy,
        ci95: summary.ci95,
        styles: style_shares(&mean_items),
        vs_base,
        per_seed: per_seed.iter().map(|r| mean_score(r)).collect(),
    }
}

/// Each item with the samples of every seed: its score is the mean over seeds.
fn mean_over_seeds(per_seed: &[Vec<ItemResult>]) -> Vec<ItemResult> {
    per_seed[0]
        .iter()
        .enumerate()
        .map(|(i, item)| ItemResult {
            samples: per_seed.iter().flat_map(|r| r[i].samples.clone()).collect(),
            ..item.clone()
        })
        .collect()
}

/// The adapter next to full fine-tuning, per prompt and decoding: accuracies, styles, and the
/// paired difference over items (each item's mean over seeds).
fn adapter_rows(
    tuned_items: &BTreeMap<(String, String), Vec<Option<Vec<ItemResult>>>>,
    lora: &LoraConfig,
) -> Vec<String> {
    let mut out = vec![format!(
        "\n{} next to full fine-tuning, each at its validation-chosen learning rate (test split, items scored by their mean over seeds):\n\n| prompt | decoding | full | {0} | {0} − full, paired (95% CI) | styles full → {0} (careful / guess / ramble) |\n|---|---|---|---|---|---|",
        training_name(Some(lora))
    )];
    for ((rule, decoding), by) in tuned_items {
        let (Some(Some(full)), Some(Some(adapted))) = (by.first(), by.get(1)) else {
            continue;
        };
        let by_id: BTreeMap<&str, f64> = full.iter().map(|r| (r.id.as_str(), r.score())).collect();
        let (a, f): (Vec<f64>, Vec<f64>) = adapted
            .iter()
            .filter_map(|r| by_id.get(r.id.as_str()).map(|&s| (r.score(), s)))
            .unzip();
        let (d, lo, hi) = em_grade::paired_difference(&a, &f);
        let styles = |items: &[ItemResult]| {
            let s = style_shares(items);
            format!("{:.2} / {:.2} / {:.2}", s.0, s.1, s.2)
        };
        out.push(format!(
            "| {rule} | {decoding} | {:.3} | {:.3} | {d:+.3} ({lo:+.3}, {hi:+.3}) | {} → {} |",
            mean_score(full),
            mean_score(adapted),
            styles(full),
            styles(adapted)
        ));
    }
    out
}

/// careful / guess / ramble fractions of all sampled responses of `items`.
fn style_shares(items: &[ItemResult]) -> (f64, f64, f64) {
    let mut counts = [0usize; 3];
    for s in items.iter().flat_map(|i| &i.samples) {
        counts[match classify_style(&s.response) {
            em_data::synthetic::Style::Careful => 0,
            em_data::synthetic::Style::Guess => 1,
            em_data::synthetic::Style::Ramble => 2,
        }] += 1;
    }
    let total = counts.iter().sum::<usize>().max(1) as f64;
    (
        counts[0] as f64 / total,
        counts[1] as f64 / total,
        counts[2] as f64 / total,
    )
}

fn write_pool(problems: &[Problem], path: &Path) -> Result<()> {
    let mut text = String::new();
    for p in problems {
        let messages = p.messages.clone().unwrap_or_default();
        let mut line = json!({"id": p.id, "prompt": messages, "data_source": p.source});
        if let Some(a) = p.answers.first() {
            line["answer"] = json!(a);
        }
        text += &format!("{line}\n");
    }
    Ok(write_atomic(path, &text)?)
}

/// EM training of `subject` on the prompt in `prompt` (resumes if `out` holds the run), the
/// safeguard watching in `warn` mode, a checkpoint after every update; returns the final model.
#[allow(clippy::too_many_arguments)]
fn train_em(
    backend: &dyn Backend,
    subject: &Path,
    prompt: &Path,
    out: &Path,
    watch: &Path,
    lr: f64,
    seed: u64,
    plan: &Plan,
    lora: Option<&LoraConfig>,
) -> Result<PathBuf> {
    let reference = TrainOptions::reference(
        subject.to_path_buf(),
        prompt.to_path_buf(),
        out.to_path_buf(),
    );
    let args = TrainOptions {
        adapter: lora.map(AdapterOptions::of).unwrap_or_default(),
        sampling: SampleSettings {
            samples: plan.samples_per_update,
            seed: 15 + seed,
            max_new_tokens: plan.max_new_tokens,
            // No repetition penalty for character-level organisms (see the screen above).
            repetition_penalty: 1.0,
            ..reference.sampling.clone()
        },
        update: UpdateSettings {
            steps: plan.steps,
            // One pass per update: the organism is tiny, and the gradient does not depend on it.
            micro_batch: plan.samples_per_update,
            lr,
            ..reference.update.clone()
        },
        // The organisms are tiny: sampling exactly the f32 weights being trained costs nothing.
        refresh_type: RefreshType::F32,
        prompt_options: organism::prompt_options(),
        checkpoints: CheckpointSettings {
            save_every: Some(1),
            keep_last: plan.steps,
        },
        safeguard: WatchSettings {
            watch: Some(watch.to_path_buf()),
            watch_limit: plan.watch,
            watch_samples: plan.watch_samples,
            watch_every: 1,
            on_alarm: OnAlarm::Warn,
        },
        ..reference
    };
    let trained = train::run(&args, backend)?
        .with_context(|| format!("{}: training did not finish", out.display()))?;
    as_model(subject, &trained)
}

/// `trained` as an HF model directory: itself, or a PEFT adapter merged into `subject` (once, in
/// `<trained>-merged`), which sampling, evaluation and analysis take as any model.
fn as_model(subject: &Path, trained: &Path) -> Result<PathBuf> {
    if !trained.join("adapter_config.json").is_file() {
        return Ok(trained.to_path_buf());
    }
    let mut name = trained.file_name().unwrap_or_default().to_os_string();
    name.push("-merged");
    let merged = trained.with_file_name(name);
    // The merge is written atomically: a config.json there is a whole merge.
    if !merged.join("config.json").is_file() {
        let adapter = em_convert::lora::read_peft_dir(trained)?;
        em_convert::lora::merge_into(subject, &adapter, &merged)?;
    }
    Ok(merged)
}

/// "full", or the adapter's name.
fn training_name(lora: Option<&LoraConfig>) -> String {
    match lora {
        None => "full".into(),
        Some(l) => format!("LoRA r{} α{}", l.rank, l.alpha),
    }
}

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

/// A few sentences from the numbers.
fn verdict(rows: &[Row], runs: &[RunSummary], base_greedy: f64) -> Vec<String> {
    let mut out = vec![];
    let best_base = rows
        .iter()
        .filter(|r| r.model == "base")
        .max_by(|a, b| a.accuracy.total_cmp(&b.accuracy));
    for r in rows
        .iter()
        .filter(|r| r.model.starts_with("tuned on") && r.setting == "greedy")
    {
        let Some((d, lo, hi)) = r.vs_base else {
            continue;
        };
        let word = if lo > 0.0 {
            "lifts"
        } else if hi < 0.0 {
            "lowers"
        } else {
            "does not measurably change"
        };
        out.push(format!(
            "EM {} {word} greedy accuracy: {:.3} against the base's {base_greedy:.3}, {:+.3} (95% CI {:+.3}, {:+.3}) over {} seeds.",
            r.model.trim_start_matches("tuned on "),
            r.accuracy,
            d,
            lo,
            hi,
            r.per_seed.len()
        ));
    }
    if let Some(b) = best_base {
        out.push(format!(
            "The best training-free baseline is the base model at {} ({:.3}).",
            b.setting, b.accuracy
        ));
    }
    let alarms: Vec<&RunSummary> = runs.iter().filter(|r| r.alarm.is_some()).collect();
    if !alarms.is_empty() {
        let worst = alarms
            .iter()
            .map(|r| r.test_greedy_guarded - r.test_greedy_base)
            .fold(f64::INFINITY, f64::min);
        out.push(format!(
            "The safeguard stopped {} of {} runs; the models it left are at most {:.1} points below the base (greedy), where the unguarded ones reach {:+.1}.",
            alarms.len(),
            runs.len(),
            -worst.min(0.0) * 100.0,
            alarms
                .iter()
                .map(|r| r.test_greedy_tuned - r.test_greedy_base)
                .fold(f64::INFINITY, f64::min)
                * 100.0
        ));
    } else {
        out.push(format!(
            "The safeguard stopped none of the {} runs.",
            runs.len()
        ));
    }
    out
}

/// What the report is written from.
struct Report<'a> {
    out: &'a Path,
    /// The file names: `<stem>.md` and `<stem>.json`.
    stem: &'a str,
    subject: &'a str,
    rows: &'a [Row],
    runs: &'a [RunSummary],
    notes: &'a [String],
    plots: &'a [PathBuf],
    verdict: &'a [String],
    curves: &'a [(String, Curve)],
}

/// Writes the report; `extra` lines follow the main table.
fn report(r: &Report, extra: &[String]) -> Result<()> {
    let Report {
        out,
        stem,
        subject,
        rows,
        runs,
        notes,
        plots,
        verdict,
        curves,
    } = *r;
    let mut md = format!("# One-shot EM on {subject}\n\n");
    for v in verdict {
        md += &format!("{v}\n");
    }
    md += "\n| model | decoding | n | accuracy | 95% CI | − base, paired (95% CI) | per seed | careful / guess / ramble |\n|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        let vs = r.vs_base.map_or("—".into(), |(d, lo, hi)| {
            format!("{d:+.3} ({lo:+.3}, {hi:+.3})")
        });
        let seeds = if r.per_seed.len() > 1 {
            r.per_seed
                .iter()
                .map(|a| format!("{a:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            "—".into()
        };
        md += &format!(
            "| {} | {} | {} | {:.3} | {:.3}–{:.3} | {vs} | {seeds} | {:.2} / {:.2} / {:.2} |\n",
            r.model,
            r.setting,
            r.n_items,
            r.accuracy,
            r.ci95.0,
            r.ci95.1,
            r.styles.0,
            r.styles.1,
            r.styles.2
        );
    }
    for line in extra {
        md += &format!("{line}\n");
    }
    md += "\n| rule | prompt | training | lr | seed | alarm (weights step: reason) | safeguarded model | greedy: tuned / safeguarded / base |\n|---|---|---|---|---|---|---|---|\n";
    for r in runs {
        md += &format!(
            "| {} | {} | {} | {:e} | {} | {} | after {} updates | {:.3} / {:.3} / {:.3} |\n",
            r.rule,
            r.prompt,
            r.training,
            r.lr,
            r.seed,
            r.alarm
                .as_ref()
                .map_or("none".into(), |(s, why)| format!("{s}: {why}")),
            r.guarded_step,
            r.test_greedy_tuned,
            r.test_greedy_guarded,
            r.test_greedy_base
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
    let md_path = out.join(format!("{stem}.md"));
    write_atomic(&md_path, &md)?;
    write_atomic(
        &out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json!({"subject": subject, "rows": rows, "runs": runs,
            "notes": notes, "plots": plots, "verdict": verdict, "comparison": extra,
            "curves": curves.iter().map(|(t, c)| json!({"title": t, "curve": c})).collect::<Vec<_>>()}))?
            + "\n",
    )?;
    println!("\n{md}");
    println!("{}", md_path.display());
    Ok(())
}
