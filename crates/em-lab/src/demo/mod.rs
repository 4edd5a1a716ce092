//! The demo: the whole loop on the project's own model organism, with no network, showing both
//! faces of one-shot EM and the label-free safeguard between them.
//!
//! On `fixtures/organism-mixed` (whose style choice depends on the problem's first digit, with
//! near-ties in between): screen its synthetic pool; pick a prompt by each rule — `majority-right`
//! and `variance` (need labels), `trial` (label-free: `select`'s short trials judged on held-out
//! unlabeled prompts; it may decline) and `majority-wrong` (the worst prompt, on purpose);
//! for each, choose the learning rate on the validation split and EM-train over seeds with the
//! safeguard watching held-out unlabeled prompts; evaluate on the test split the base model
//! (greedy, low temperature, EM-INF), each tuned model, and each model as the safeguard would
//! have left it, with paired intervals; plot held-out accuracy and the safeguard's signals per
//! update for the good and the bad prompt; print a verdict in words from the numbers.
//!
//! Every run trains in the safeguard's `warn` mode with a checkpoint after each update, so its
//! whole curve is seen; the safeguarded model is the checkpoint a `stop` run ends with (the last
//! weights whose watch round passed), which the same seeds make identical.
//!
//! One stage a file, composed in order by [`run`]: `prepare` (the subject, the output directory,
//! the splits), `prompts` (screening and the prompt each rule picks), `evaluate` (decoding
//! settings, the baselines, the quantized good run), `learning_rate` (the rate chosen on
//! validation), `train` (one EM run and the model it leaves), `seeds` (training over seeds and
//! the rows of each prompt), `plots` (the curves per update, SVG and PNG), `report` (rows, the
//! verdict in words, `demo.md`), `phases` (wall time per kind of work).

mod cost;
mod evaluate;
mod kshot;
mod learning_rate;
mod phases;
mod plots;
mod prepare;
mod prompts;
mod report;
mod seeds;
mod study;
mod train;

use std::collections::BTreeMap;
use std::path::PathBuf;

use em_convert::OutType;
use em_pipeline::eval::ItemResult;
use em_pipeline::train::AdapterOptions;
use em_pipeline::{sampling_model, Backend, Result};
use em_sampler::EmInf;
use em_train::lora::LoraConfig;
use serde::Serialize;

use phases::Phases;
use plots::Curve;
pub use report::{Row, RunSummary};
use train::Arm;

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
    /// Instead of the demo: the trial study (`trial-study.md`): whether `select`'s trials predict
    /// a full run's validation gain better than the screen's statistics, over `study_prompts`
    /// prompts, each trained at every rate of `study_lrs`.
    pub trial_study: bool,
    /// Instead of the demo: what the trial rule's selection costs against one full run, both
    /// timed in the same command (`trial-cost.md`).
    pub trial_cost: bool,
    /// Also train this many prompts drawn from the pool at random (seeded; at most 9), each
    /// like a rule's pick: the floor a rule has to beat.
    pub random_prompts: usize,
    pub study_prompts: usize,
    pub study_lrs: Vec<f64>,
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

/// What is trained: the learning rates tried, the trainings, the seeds.
struct Schedule {
    /// Learning rates tried for full fine-tuning.
    lrs: Vec<f64>,
    /// The adapter, when asked for.
    lora: Option<LoraConfig>,
    /// Learning rates tried for the adapter.
    lora_lrs: Vec<f64>,
    /// Full fine-tuning always; the adapter, when asked for, next to it.
    trainings: Vec<Option<LoraConfig>>,
    /// Training seeds per prompt at its chosen learning rate.
    seeds: usize,
}

impl Schedule {
    fn new(args: &DemoOptions) -> Result<Self> {
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
        Ok(Schedule {
            lrs,
            lora,
            lora_lrs,
            trainings,
            seeds,
        })
    }
}

/// What every stage reads: the backend, the sizes, the subject, its output directory and the
/// splits.
struct Demo<'a> {
    backend: &'a dyn Backend,
    plan: Plan,
    /// The reduced form (`--quick`).
    quick: bool,
    /// The subject's HF model directory.
    subject: PathBuf,
    /// `<out>/<subject name>`.
    dir: PathBuf,
    data: prepare::Data,
}

/// What the stages gather for the report.
#[derive(Default)]
struct Tally {
    rows: Vec<Row>,
    runs: Vec<RunSummary>,
    /// Seed 0 of every (prompt, training), titled.
    curves: Vec<(String, Curve)>,
    /// The safeguarded model of seed 0 of each rule's full fine-tuning, by its first rule.
    guarded_dirs: BTreeMap<String, PathBuf>,
    /// Test items of the tuned models (each item's mean over seeds) per (rules, decoding), one
    /// entry per training.
    tuned_items: BTreeMap<(String, String), Vec<Option<Vec<ItemResult>>>>,
    /// The directories of the full fine-tuning runs (the trial rule's cost is measured on them).
    full_runs: Vec<PathBuf>,
}

/// Runs the demo (see the module documentation) and writes `demo.md` and `demo.json`.
pub fn run(args: &DemoOptions, backend: &dyn Backend) -> Result<()> {
    let plan = Plan::new(args.quick);
    let schedule = Schedule::new(args)?;
    let (subject, name) = prepare::find_subject(args)?;
    let dir = prepare::claim(args, backend, &plan, &schedule, &subject, &name)?;
    let data = prepare::write_splits(&dir, &plan, args.data_seed)?;
    let demo = Demo {
        backend,
        plan,
        quick: args.quick,
        subject,
        dir,
        data,
    };
    println!("=== {name} ===");
    let mut phases = Phases::new();
    let base_gguf = sampling_model(backend, &demo.subject, &demo.dir.join("base"), OutType::F32)?;
    phases.lap("convert");
    if args.trial_cost {
        return cost::run(&demo, &args.out);
    }
    if args.trial_study {
        return study::run(
            &demo,
            &base_gguf,
            &args.out,
            args.study_prompts,
            &args.study_lrs,
        );
    }
    let mut notes: Vec<String> = vec![];

    // 1. Screen, and the prompt each rule picks.
    let chosen = prompts::screen_and_choose(&demo, args.random_prompts, &mut phases, &mut notes)?;

    // 2. Baselines on the test split: greedy, low temperature, sampling, EM-INF.
    let mut tally = Tally::default();
    let base = evaluate::baselines(&demo, &base_gguf, &mut tally.rows)?;
    phases.lap("baselines");

    // 3. Train on each chosen prompt: the learning rate on validation, then seeds.
    for (c, training) in chosen
        .iter()
        .flat_map(|c| schedule.trainings.iter().map(move |t| (c, t)))
    {
        let arm = Arm::new(c, training, &schedule);
        let lr = learning_rate::choose(&demo, &arm, base.validation, &mut phases, &mut notes)?;
        seeds::train_over_seeds(&demo, &arm, lr, &base, &mut phases, &mut tally)?;
    }

    if let Some(note) = report::trial_cost_note(&demo.dir, &tally.full_runs)? {
        notes.push(note);
    }

    // 4. What the good run looks like served quantized, and what EM did to it.
    evaluate::quantized_good_run(&demo, &base, &mut tally, &mut phases, &mut notes)?;

    // 5. The safeguard over seeds.
    notes.push(report::safeguard_note(&tally.runs));

    let plot_dir = demo.dir.join(if schedule.lora.is_some() {
        "plots-lora"
    } else {
        "plots"
    });
    let plots = if tally.curves.is_empty() {
        vec![]
    } else {
        plots::write_curves(&tally.curves, &plot_dir)?
    };
    phases.lap("report");
    notes.push(phases.summary());
    let verdict = report::verdict(&tally.rows, &tally.runs, base.greedy);
    let (stem, comparison) = match &schedule.lora {
        None => ("demo", vec![]),
        Some(l) => ("demo-lora", report::adapter_rows(&tally.tuned_items, l)),
    };
    report::report(
        &report::Report {
            out: &args.out,
            stem,
            subject: &name,
            rows: &tally.rows,
            runs: &tally.runs,
            notes: &notes,
            plots: &plots,
            verdict: &verdict,
            curves: &tally.curves,
        },
        &comparison,
    )
}
