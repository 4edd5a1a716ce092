//! `cargo xtask bench em-step`: seconds, peak memory and FLOP/s of one EM update (8 responses ×
//! 256 tokens) on SmolLM2-135M in f32, next to the same step in PyTorch (the project's
//! `bench/torch_em_step.py`, embedded in this binary) when PyTorch is installed, and the memory
//! model projected to Qwen2.5-Math-1.5B and -7B, Qwen3-1.7B and Llama-3.2-1B. With `--random-config`, one update of a
//! random-weight model of a published configuration on `--device` (the GPU script's figure).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use em_data::Problem;
use em_pipeline::train::{train_config, UpdateSettings};
use em_pipeline::train::{AdapterRefresh, Publish};
use em_train::lora::{AdapterSource, LoraConfig};
use em_train::models::CausalLm;
use em_train::{EmOptions, Sequence, Trainer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use em_convert::refresh::GgufRefresh;
use em_pipeline::assets::{cache_dir, smollm2_path};
use em_pipeline::hf_vocab::HfVocab;
use em_pipeline::prompt::{PromptOptions, PromptRenderer};

use em_train::memory;

use super::profile;

/// Settings of `bench em-step`.
#[derive(clap::Args, Debug, Clone)]
pub struct EmStepArgs {
    /// Where the update runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Time a random-weight model of this published configuration instead of SmolLM2-135M.
    #[arg(long, value_enum)]
    pub random_config: Option<RandomConfig>,
    /// Responses of the update.
    #[arg(long, default_value_t = 8)]
    pub responses: usize,
    /// Tokens of each response.
    #[arg(long, default_value_t = 256)]
    pub response_len: usize,
    /// Prompt tokens (random prompts only; SmolLM2 renders the torch script's problem).
    #[arg(long, default_value_t = 87)]
    pub prompt_len: usize,
    /// Float type of the weights (bf16 trains through f32 master weights).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: em_pipeline::train::ModelDtype,
    /// Micro-batch sizes to time, comma-separated (default 1,2).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2])]
    pub micro_batches: Vec<usize>,
    /// Also time every micro-batch without layer recomputation.
    #[arg(long)]
    pub no_recompute_too: bool,
    /// Timed updates per setting, after one warm-up.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Also sample where each setting's timed updates spend their CPU time (Linux `perf` on
    /// PATH): shares by kernel (matmul, elementwise, copies, memory, …) and the matmuls'
    /// FLOP/s against the per-core peak.
    #[arg(long)]
    pub profile: bool,
    /// Skip the memory model (its layer measurements take a minute or two).
    #[arg(long)]
    pub no_memory_model: bool,
    /// Only the memory model: its measurements and projections, for the settings given, without
    /// timing updates (the measured-peak column is then empty).
    #[arg(long)]
    pub memory_only: bool,
    /// Instead of timing: the loss and every gradient of the same random weights and responses on
    /// `--device` and on this device; fails beyond em-loss's tolerances (1e-4 loss, 1e-3 gradients).
    #[arg(long)]
    pub check_against: Option<String>,
    /// Instead of timing: write the `--random-config` model as an HF directory (bf16) here.
    #[arg(long)]
    pub save_hf: Option<std::path::PathBuf>,
    /// With `--adapter lora`: the update also timed training the adapter (the base frozen) on
    /// the same responses, next to full fine-tuning: time, peak memory, refresh bytes and the
    /// projected peaks.
    #[command(flatten)]
    pub adapter: crate::flags::AdapterFlags,
}

/// Published configurations with random weights.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum RandomConfig {
    #[value(name = "smollm2-135m")]
    Smollm2,
    #[value(name = "qwen2.5-math-1.5b")]
    QwenMath1_5b,
    #[value(name = "qwen2.5-math-7b")]
    QwenMath7b,
    #[value(name = "qwen3-1.7b")]
    Qwen3_1_7b,
    #[value(name = "llama-3.2-1b")]
    Llama3_2_1b,
}

/// The torch script's default prompt, without the instruction the prompt renderer appends.
const PROBLEM: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?";

/// Where the benchmark's weights come from.
enum Source {
    /// Random weights of a configuration.
    Random(Box<em_train::models::ModelConfig>),
    /// An HF checkpoint.
    Hf(std::path::PathBuf),
}

impl Source {
    /// The model, frozen under a fresh adapter when `lora` is given.
    fn load(&self, dtype: DType, device: &Device, lora: Option<&LoraConfig>) -> Result<CausalLm> {
        Ok(match (self, lora) {
            (Source::Random(cfg), _) => memory::random_model(cfg, dtype, device, lora)?,
            (Source::Hf(dir), None) => CausalLm::from_hf_dir(dir, dtype, device)?,
            (Source::Hf(dir), Some(l)) => CausalLm::from_hf_dir_with_adapter(
                dir,
                dtype,
                device,
                l.clone(),
                AdapterSource::Init { seed: 15 },
            )?,
        })
    }
}

/// One timed setting.
struct Row {
    /// The adapter trained, or None for full fine-tuning.
    lora: Option<LoraConfig>,
    micro_batch: usize,
    recompute: bool,
    /// Median seconds of an update.
    secs: f64,
    /// Peak RSS of the setting, MB.
    peak_mb: f64,
    /// RSS before its model was loaded, MB.
    rss_before: f64,
}

impl Row {
    fn label(&self) -> String {
        format!(
            "{}, micro-batch {}{}",
            training_label(self.lora.as_ref()),
            self.micro_batch,
            if self.recompute { ", recompute" } else { "" }
        )
    }
}

fn training_label(lora: Option<&LoraConfig>) -> String {
    match lora {
        None => "full".into(),
        Some(l) => format!(
            "LoRA r{} α{} ({} targets)",
            l.rank,
            l.alpha,
            l.targets.len()
        ),
    }
}

/// Bytes and seconds of one refresh after an update, for full fine-tuning and the adapter.
struct Refresh {
    lora: Option<LoraConfig>,
    bytes: u64,
    secs: f64,
}

/// Runs the benchmark with models and files under `work`.
pub fn bench_em_step(work: &Path, args: &EmStepArgs) -> Result<()> {
    let device = em_train::parse_device(&args.device)?;
    let dtype = args.dtype.dtype();
    // em-train's fused kernels run on the CPU in f32/f64.
    let fused = device.is_cpu() && matches!(dtype, DType::F32 | DType::F64);
    let lora = args.adapter.options().lora()?;
    let gguf = smollm2_path(&cache_dir());
    let mut rng = StdRng::seed_from_u64(7);
    let (source, cfg, prompt, name) = if let Some(which) = args.random_config {
        let known = memory::known_configs();
        let (raw, label) = match which {
            RandomConfig::Smollm2 => (smollm2_config(), "SmolLM2-135M"),
            RandomConfig::QwenMath1_5b => (known[0].raw.clone(), known[0].name),
            RandomConfig::QwenMath7b => (known[1].raw.clone(), known[1].name),
            RandomConfig::Qwen3_1_7b => (known[2].raw.clone(), known[2].name),
            RandomConfig::Llama3_2_1b => (known[3].raw.clone(), known[3].name),
        };
        let cfg = memory::config(&raw, label)?;
        if let Some(other) = &args.check_against {
            return check_devices(&cfg, args, other);
        }
        if let Some(dir) = &args.save_hf {
            let model = memory::random_model(&cfg, DType::F32, &Device::Cpu, None)?;
            model.save_hf_dir(dir, DType::BF16)?;
            println!("{label} with random weights -> {}", dir.display());
            return Ok(());
        }
        let prompt = random_ids(&mut rng, args.prompt_len, cfg.vocab_size);
        (
            Source::Random(Box::new(cfg.clone())),
            cfg,
            prompt,
            format!("{label} (random weights)"),
        )
    } else if gguf.exists() {
        let hf = work.join("smollm2-hf");
        if !hf.join("model.safetensors").exists() {
            // In a child process, so that the conversion's memory does not count in this one's peak.
            let out = Command::new(std::env::current_exe()?)
                .args(["convert", "--force", "-o"])
                .arg(&hf)
                .arg(&gguf)
                .output()?;
            if !out.status.success() {
                bail!(
                    "converting {}: {}",
                    gguf.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let problem = Problem {
            id: "bench".into(),
            problem: PROBLEM.into(),
            answers: vec!["72".into()],
            source: "bench".into(),
            messages: None,
        };
        let prompt = PromptRenderer::new(&HfVocab::open(&hf)?, &PromptOptions::default())?
            .render(&problem)?
            .ids;
        let cfg = em_train::models::ModelConfig::from_file(&hf.join("config.json"))?;
        (Source::Hf(hf), cfg, prompt, "SmolLM2-135M".to_string())
    } else {
        println!(
            "{}: not fetched; timing random weights of SmolLM2-135M's shapes and an 87-token \
             random prompt (time and memory do not depend on the values)",
            gguf.display()
        );
        let cfg = memory::config(&smollm2_config(), "SmolLM2-135M config")?;
        let prompt = random_ids(&mut rng, args.prompt_len, cfg.vocab_size);
        (
            Source::Random(Box::new(cfg.clone())),
            cfg,
            prompt,
            "SmolLM2-135M (random weights)".to_string(),
        )
    };
    let vocab = cfg.vocab_size;
    let mut rng = StdRng::seed_from_u64(15);
    let sequences: Vec<Sequence> = (0..args.responses)
        .map(|_| Sequence {
            prompt_ids: prompt.clone(),
            response_ids: random_ids(&mut rng, args.response_len, vocab),
        })
        .collect();
    let threads = rayon_threads();
    let seq_len = prompt.len() + args.response_len;
    println!(
        "{name} {:?} on {}, {} responses × {} tokens after a {}-token prompt, {threads} threads, load {:.2}",
        dtype,
        args.device,
        args.responses,
        args.response_len,
        prompt.len(),
        load1()
    );
    let mut micro_batches = args.micro_batches.clone();
    micro_batches.sort_unstable();
    let mut settings: Vec<(usize, bool)> = micro_batches.iter().map(|&mb| (mb, true)).collect();
    if args.no_recompute_too {
        settings.extend(micro_batches.iter().map(|&mb| (mb, false)));
    }
    // Full fine-tuning always, the adapter next to it on the same responses.
    let trainings: Vec<Option<LoraConfig>> = std::iter::once(None)
        .chain(lora.iter().cloned().map(Some))
        .collect();
    if args.memory_only {
        let rows: Vec<Row> = trainings
            .iter()
            .flat_map(|l| {
                settings.iter().map(|&(micro_batch, recompute)| Row {
                    lora: l.clone(),
                    micro_batch,
                    recompute,
                    secs: f64::NAN,
                    peak_mb: f64::NAN,
                    rss_before: f64::NAN,
                })
            })
            .collect();
        return memory_model(&cfg, dtype, seq_len, &rows, &trainings);
    }
    let mut rows = Vec::new();
    let mut refreshes = Vec::new();
    // Measured once, before any setting runs, for the profiles and the table alike.
    let peak = cpu_peak_gflops(threads);
    for training in &trainings {
        memory::trim();
        let rss_before = memory::rss_mb();
        let model = source.load(dtype, &device, training.as_ref())?;
        let vocab = model.config().vocab_size;
        // The update `train` takes: its trainer, with the run's reference settings.
        let reference = em_pipeline::train::UpdateSettings::default();
        let mut trainer = Trainer::new(model, train_config(&reference, vocab));
        for &(micro_batch, recompute) in &settings {
            let update = UpdateSettings {
                micro_batch,
                recompute,
                ..reference.clone()
            };
            trainer.config = train_config(&update, vocab);
            let profile = args.profile.then(|| Profile {
                work,
                flops: em_train::flops::update_flops(
                    &cfg,
                    &sequences,
                    recompute,
                    training.is_some(),
                    fused,
                ),
                peak_per_core: peak.as_ref().map(|(p, _)| p / threads as f64),
            });
            let (secs, peak_mb) =
                time_setting(&mut trainer, &sequences, args.steps, &device, profile)?;
            println!(
                "  {}: {secs:.2} s, peak RSS {peak_mb:.0} MB (RSS before loading {rss_before:.0} MB)",
                training_label(training.as_ref())
            );
            rows.push(Row {
                lora: training.clone(),
                micro_batch,
                recompute,
                secs,
                peak_mb,
                rss_before,
            });
        }
        if let Source::Hf(hf) = &source {
            refreshes.push(measure_refresh(&trainer.model, hf, work)?);
        }
    }

    let n_tokens_note = args.responses * args.response_len;
    let torch = match &source {
        Source::Hf(hf) if device.is_cpu() && dtype == DType::F32 => {
            torch_baseline(work, hf, threads, &sequences[0].prompt_ids, args)?
        }
        _ => None,
    };
    let peak_gflops = peak;
    println!("s / update: the median of each row's timed updates (the upper middle one of an even count), PyTorch's included");
    println!("| implementation | s / update | peak RSS MB | TFLOP | GFLOP/s | of CPU peak | vs PyTorch time | vs PyTorch RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let flops = em_train::flops::update_flops(
            &cfg,
            &sequences,
            row.recompute,
            row.lora.is_some(),
            fused,
        );
        let (t_ratio, m_ratio) = torch.as_ref().map_or(("—".into(), "—".into()), |(t, m)| {
            (
                format!("{:.2}x", row.secs / t),
                format!("{:.2}x", row.peak_mb / m),
            )
        });
        let of_peak = peak_gflops.as_ref().map_or("—".into(), |(p, _)| {
            format!("{:.0}%", 100.0 * flops / row.secs / 1e9 / p)
        });
        println!(
            "| em-train {} | {:.2} | {:.0} | {:.2} | {:.0} | {of_peak} | {t_ratio} | {m_ratio} |",
            row.label(),
            row.secs,
            row.peak_mb,
            flops / 1e12,
            flops / row.secs / 1e9,
        );
    }
    match &torch {
        Some((secs, rss)) => {
            let flops = em_train::flops::update_flops(&cfg, &sequences, false, false, false);
            println!(
                "| PyTorch (torch_em_step.py) | {secs:.2} | {rss:.0} | {:.2} | {:.0} | {} | 1.00x | 1.00x |",
                flops / 1e12,
                flops / secs / 1e9,
                peak_gflops.as_ref().map_or("—".into(), |(p, _)| format!("{:.0}%", 100.0 * flops / secs / 1e9 / p)),
            )
        }
        None if device.is_cpu() && matches!(source, Source::Hf(_)) => println!(
            "PyTorch is not installed (EM_TORCH_PYTHON, else python3, cannot import torch and \
             transformers): no baseline measured. `bash .ci/install-torch.sh` installs them into \
             the cache and prints the Python to put in EM_TORCH_PYTHON."
        ),
        None => {}
    }
    if let Some((p, how)) = &peak_gflops {
        println!("CPU peak {p:.0} GFLOP/s ({how}); FLOPs counted from the shapes: 3× the forward's matmuls (forward, both backward products; 2× for a frozen weight, whose gradient is not formed), attention over the full square with one more trunk forward under recompute for PyTorch and off em-train's fused path; em-train's fused CPU attention over its causal blocks (7 products, 9 with recompute) and its recompute replaying the projections");
    }
    if let Some(l) = &lora {
        adapter_comparison(&cfg, l, &rows, &refreshes, n_tokens_note);
    }
    if device.is_cpu() && !args.no_memory_model && args.random_config.is_none() {
        memory_model(&cfg, dtype, seq_len, &rows, &trainings)?;
    }
    Ok(())
}

/// Median seconds and peak RSS (MB) of the trainer's updates at its setting, after a warm-up;
/// each update's forward+backward time is read when its last backward pass reports.
fn time_setting(
    trainer: &mut Trainer,
    sequences: &[Sequence],
    steps: usize,
    device: &Device,
    profile: Option<Profile>,
) -> Result<(f64, f64)> {
    let (micro_batch, recompute) = (trainer.config.em.micro_batch, trainer.config.em.recompute);
    let label = format!(
        "{} micro-batch {micro_batch}{}",
        training_label(trainer.model.adapter()),
        if recompute { ", recompute" } else { "" }
    );
    let mut times = Vec::new();
    let mut recording = None;
    // Each setting's own peak: the high-water mark is reset to the current RSS first.
    memory::reset_peak_rss();
    for i in 0..=steps.max(1) {
        if let (1, Some(p)) = (i, &profile) {
            recording = Some(profile::Recording::start(
                p.work,
                &format!("mb{micro_batch}"),
            )?);
        }
        let start = Instant::now();
        let mut t_grad = 0.0;
        let stats = trainer.update_observed(sequences, &mut |p| {
            if p.backward && p.micro_batch == p.micro_batches {
                t_grad = start.elapsed().as_secs_f64();
            }
        })?;
        device.synchronize()?;
        let total = start.elapsed().as_secs_f64();
        println!(
            "  {label} step {i}{}: {total:.2} s (forward+backward {t_grad:.2}, clip+AdamW {:.2}), entropy {:.4}, grad norm {:.3}",
            if i == 0 { " (warm-up)" } else { "" },
            total - t_grad,
            stats.loss,
            stats.grad_norm,
        );
        if i > 0 {
            times.push(total);
        }
    }
    if let (Some(r), Some(p)) = (recording, &profile) {
        let (by, cpu) = r.finish()?;
        let wall: f64 = times.iter().sum();
        profile::print(
            &label,
            &by,
            cpu,
            wall,
            times.len(),
            p.flops,
            p.peak_per_core,
        );
    }
    Ok((median(&mut times), memory::peak_mb()))
}

/// The median of timed steps (the upper of the middle two for an even count), which every row
/// of the table reports, PyTorch's included.
fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// What `--profile` needs to report a setting.
struct Profile<'a> {
    work: &'a Path,
    /// Matmul FLOPs of one update.
    flops: f64,
    peak_per_core: Option<f64>,
}

/// What the sampler is handed after an update: the whole model as the f16 GGUF the full run
/// rewrites in place, or the adapter's LoRA GGUF. Published twice (the first call writes the
/// file, the second is a refresh after an update); the second's bytes and seconds.
fn measure_refresh(model: &CausalLm, hf: &Path, work: &Path) -> Result<Refresh> {
    let params = model.parameters();
    let by_name: std::collections::HashMap<String, candle_core::Var> =
        params.iter().cloned().collect();
    let mut publisher: Box<dyn Publish> = match model.adapter() {
        None => {
            let shapes: Vec<(String, Vec<usize>)> = params
                .iter()
                .map(|(n, v)| (n.clone(), v.dims().to_vec()))
                .collect();
            Box::new(GgufRefresh::new(
                hf,
                &shapes,
                em_convert::OutType::F16,
                &work.join("refresh-full.gguf"),
            )?)
        }
        Some(_) => Box::new(AdapterRefresh::new(
            model,
            &work.join("refresh-adapter.gguf"),
        )?),
    };
    let mut weights = |n: &str| -> Result<candle_core::Tensor> {
        Ok(by_name
            .get(n)
            .with_context(|| format!("no parameter {n}"))?
            .as_tensor()
            .clone())
    };
    publisher.publish(&mut weights)?;
    // An update changes every trained value; a small shift of each stands for it here.
    for (_, v) in &params {
        v.set(&v.as_tensor().affine(1.0, 1e-3)?)?;
    }
    let stats = publisher.publish(&mut weights)?;
    Ok(Refresh {
        lora: model.adapter().cloned(),
        bytes: stats.bytes,
        secs: stats.seconds,
    })
}

/// The adapter's update and refresh next to full fine-tuning's, as ratios.
fn adapter_comparison(
    cfg: &em_train::models::ModelConfig,
    lora: &LoraConfig,
    rows: &[Row],
    refreshes: &[Refresh],
    n_tokens: usize,
) {
    println!(
        "\n{} next to full fine-tuning on the same {n_tokens} response tokens ({} adapter parameters, {:.3}% of {}); memory is the peak RSS above the RSS before loading the model:",
        training_label(Some(lora)),
        memory::adapter_parameter_count(cfg, lora),
        100.0 * memory::adapter_parameter_count(cfg, lora) as f64
            / memory::parameter_count(cfg) as f64,
        memory::parameter_count(cfg)
    );
    println!(
        "| setting | full s | LoRA s | LoRA / full time | full MB | LoRA MB | LoRA / full memory |"
    );
    println!("|---|---|---|---|---|---|---|");
    for full in rows.iter().filter(|r| r.lora.is_none()) {
        let Some(adapted) = rows.iter().find(|r| {
            r.lora.is_some() && r.micro_batch == full.micro_batch && r.recompute == full.recompute
        }) else {
            continue;
        };
        let (fm, am) = (
            full.peak_mb - full.rss_before,
            adapted.peak_mb - adapted.rss_before,
        );
        println!(
            "| micro-batch {}{} | {:.2} | {:.2} | {:.2}x | {fm:.0} | {am:.0} | {:.2}x |",
            full.micro_batch,
            if full.recompute { ", recompute" } else { "" },
            full.secs,
            adapted.secs,
            adapted.secs / full.secs,
            am / fm
        );
    }
    let full = refreshes.iter().find(|r| r.lora.is_none());
    let adapted = refreshes.iter().find(|r| r.lora.is_some());
    if let (Some(f), Some(a)) = (full, adapted) {
        println!("\nrefresh after an update (what the sampler is handed):");
        println!("| published | bytes | seconds | vs full bytes |");
        println!("|---|---|---|---|");
        println!(
            "| full model, f16 GGUF rewritten in place | {} | {:.3} | 1.00x |",
            f.bytes, f.secs
        );
        println!(
            "| adapter, f32 LoRA GGUF | {} | {:.3} | {:.4}x |",
            a.bytes,
            a.secs,
            a.bytes as f64 / f.bytes as f64
        );
    }
}

/// The loss and gradients of one random model and one set of random responses on `--device` and
/// on `other`, compared as `em-loss --check-against` does.
fn check_devices(
    cfg: &em_train::models::ModelConfig,
    args: &EmStepArgs,
    other: &str,
) -> Result<()> {
    use em_lab::em_loss::{self, EmLossInput, CHECK_GRAD_RTOL, CHECK_LOSS_RTOL};
    let tensors = memory::random_tensors(cfg, &Device::Cpu)?;
    let mut rng = StdRng::seed_from_u64(7);
    let prompt = random_ids(&mut rng, args.prompt_len, cfg.vocab_size);
    let input = EmLossInput {
        temperature: 0.5,
        sequences: (0..args.responses)
            .map(|_| Sequence {
                prompt_ids: prompt.clone(),
                response_ids: random_ids(&mut rng, args.response_len, cfg.vocab_size),
            })
            .collect(),
    };
    let mb = args.micro_batches.first().copied().unwrap_or(1);
    let mut results = Vec::new();
    for spec in [args.device.as_str(), other] {
        let device = em_train::parse_device(spec)?;
        let model = CausalLm::from_tensors(cfg, tensors.clone(), args.dtype.dtype(), &device)?;
        let start = Instant::now();
        let (loss, _, grads) = em_loss::compute(&model, &input, mb, true)?;
        device.synchronize()?;
        println!(
            "{spec}: loss {loss:.8} in {:.2} s",
            start.elapsed().as_secs_f64()
        );
        results.push((loss, grads));
    }
    let loss_rel = (results[0].0 - results[1].0).abs() / results[1].0.abs();
    let (grad_rel, worst) = em_loss::worst_gradient_difference(&results[0].1, &results[1].1)?;
    println!(
        "{} vs {other}: loss relative difference {loss_rel:.2e} (limit {CHECK_LOSS_RTOL:.0e}), \
         worst gradient {worst} {grad_rel:.2e} (limit {CHECK_GRAD_RTOL:.0e})",
        args.device
    );
    if !(loss_rel <= CHECK_LOSS_RTOL && grad_rel <= CHECK_GRAD_RTOL) {
        bail!("{} and {other} disagree beyond the tolerances", args.device);
    }
    Ok(())
}

fn random_ids(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

fn smollm2_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192
    })
}

/// The CPU's f32 peak over `threads` cores in GFLOP/s, with how it was found: the larger of the
/// nominal figure (2 FMA units × SIMD lanes × 2 FLOP × `cpu MHz`) and a measured one (every
/// thread running independent 8-lane FMA chains at once). In a VM `cpu MHz` is the base clock,
/// and a core that boosts above it would otherwise show more than 100 % of its "peak".
fn cpu_peak_gflops(threads: usize) -> Option<(f64, String)> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = info.lines().find(|l| l.starts_with("flags"))?;
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let lanes = if has("avx512f") {
        16.0
    } else if has("avx2") && has("fma") {
        8.0
    } else {
        4.0
    };
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    let ghz = mhz / 1000.0;
    let nominal = threads as f64 * 2.0 * lanes * 2.0 * ghz;
    let how = format!("{threads} cores × 2 FMA × {lanes} f32 lanes × 2 FLOP × {ghz:.2} GHz");
    match measured_fma_gflops(threads) {
        Some(m) if m > nominal => Some((
            m,
            format!("measured: {threads} threads of independent 8-lane FMA chains; the nominal {nominal:.0} = {how}"),
        )),
        Some(m) => Some((nominal, format!("{how}; measured FMA chains reach {m:.0}"))),
        None => Some((nominal, how)),
    }
}

/// GFLOP/s of `threads` threads each running 12 independent chains of 8-lane f32 FMAs at once
/// (`None` without AVX2 and FMA).
fn measured_fma_gflops(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return None;
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn chains(iters: u64) -> f32 {
            use std::arch::x86_64::*;
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_set1_ps(0.0); 12];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, a, b);
                }
            }
            let mut sum = _mm256_set1_ps(0.0);
            for x in acc {
                sum = _mm256_add_ps(sum, x);
            }
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), sum);
            out.iter().sum()
        }
        const ITERS: u64 = 40_000_000;
        let start = std::time::Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..threads.max(1) {
                // SAFETY: AVX2 and FMA were detected above.
                scope
                    .spawn(|| std::hint::black_box(unsafe { chains(std::hint::black_box(ITERS)) }));
            }
        });
        let flops = threads.max(1) as f64 * ITERS as f64 * 12.0 * 8.0 * 2.0;
        Some(flops / start.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// Prints the memory model: measured per-layer and LM-head transients, checked against this
/// run's peaks, then projected to Qwen2.5-Math-1.5B and -7B, Qwen3-1.7B and Llama-3.2-1B, for full fine-tuning and for each
/// adapter in `trainings`.
fn memory_model(
    cfg: &em_train::models::ModelConfig,
    dtype: DType,
    seq_len: usize,
    rows: &[Row],
    trainings: &[Option<LoraConfig>],
) -> Result<()> {
    let chunk = EmOptions::new(0.5, 1, cfg.vocab_size).logit_chunk_rows;
    let head_mb = memory::measure_head_chunk_mb(chunk, cfg.vocab_size)?;
    let mut layer_mbs = Vec::new();
    for training in trainings {
        let layer_mb = memory::measure_layer_mb(&cfg.raw, seq_len, dtype, training.as_ref())?;
        println!(
            "\nmemory model, {}: one {:?} decoder layer, forward + backward on 1 × {seq_len} tokens: {layer_mb:.0} MB \
             ({:.1} KB per token per layer); one LM-head chunk ({chunk} rows × {} logits): {head_mb:.0} MB",
            training_label(training.as_ref()),
            dtype,
            layer_mb * 1024.0 / seq_len as f64,
            cfg.vocab_size
        );
        layer_mbs.push(layer_mb);
    }
    println!("| setting | predicted peak MB | measured peak MB (RSS − RSS before loading) |");
    println!("|---|---|---|");
    for row in rows {
        let i = trainings.iter().position(|t| *t == row.lora).unwrap_or(0);
        let p = memory::project(
            cfg,
            dtype,
            row.lora.as_ref(),
            row.micro_batch,
            seq_len,
            layer_mbs[i],
            head_mb,
            row.recompute,
        );
        println!(
            "| {} | {:.0} (static {:.0}, saved inputs and MLP products {:.0}, layers {:.0}, head {:.0}) | {:.0} |",
            row.label(),
            p.total(),
            p.static_mb,
            p.saved_inputs_mb,
            p.layer_mb,
            p.head_mb,
            row.peak_mb - row.rss_before
        );
    }
    const SEQ: usize = 1024;
    println!("\nprojected peak GB of one update at {SEQ} tokens per sequence (static: weights; for full fine-tuning also an f32 master copy for bf16 and f32 gradients and moments; for an adapter the f32 factors, their gradients and moments). Refresh: what the sampler is handed after each update (f16 GGUF of the model, or the f32 LoRA GGUF).");
    println!("| model | training | dtype | trained params | static GB | mb 1 | mb 2 | mb 3 | mb 4 | mb 4 without recompute | refresh MB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for known in memory::known_configs() {
        let qcfg = memory::config(&known.raw, known.name)?;
        for training in trainings {
            for dt in [DType::F32, DType::BF16] {
                let t0 = Instant::now();
                let layer = memory::measure_layer_mb(&known.raw, SEQ, dt, training.as_ref())?;
                let project = |b, recompute| {
                    memory::project(
                        &qcfg,
                        dt,
                        training.as_ref(),
                        b,
                        SEQ,
                        layer,
                        head_mb,
                        recompute,
                    )
                };
                let cols: Vec<String> = (1..=4)
                    .map(|b| format!("{:.1}", project(b, true).total() / 1024.0))
                    .collect();
                let (trained, refresh_bytes) = match training {
                    None => {
                        let n = memory::parameter_count(&qcfg);
                        (n, n * 2)
                    }
                    Some(l) => {
                        let n = memory::adapter_parameter_count(&qcfg, l);
                        (n, n * 4)
                    }
                };
                println!(
                    "| {} | {} | {:?} | {:.3} B | {:.1} | {} | {:.1} | {:.0} |",
                    known.name,
                    training_label(training.as_ref()),
                    dt,
                    trained as f64 / 1e9,
                    project(1, true).static_mb / 1024.0,
                    cols.join(" | "),
                    project(4, false).total() / 1024.0,
                    refresh_bytes as f64 / 1024.0 / 1024.0
                );
                eprintln!(
                    "  ({} {} {:?}: one layer at 1 × {SEQ} tokens measured {layer:.0} MB in {:.0} s)",
                    known.name,
                    training_label(training.as_ref()),
                    dt,
                    t0.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The PyTorch reference step, written into the work directory before it runs.
const TORCH_EM_STEP: &str = include_str!("../../../bench/torch_em_step.py");

/// (seconds per step, peak RSS MB) of the PyTorch step over the same prompt ids and response
/// lengths, or None without PyTorch. The Python is
/// `EM_TORCH_PYTHON` when set, else `python3`.
fn torch_baseline(
    work: &Path,
    hf: &Path,
    threads: usize,
    prompt_ids: &[u32],
    args: &EmStepArgs,
) -> Result<Option<(f64, f64)>> {
    let python = std::env::var("EM_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch = Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        return Ok(None);
    }
    let script = work.join("torch_em_step.py");
    std::fs::write(&script, TORCH_EM_STEP)
        .with_context(|| format!("{}: cannot write", script.display()))?;
    let out = Command::new(&python)
        .arg(&script)
        .arg("--model-dir")
        .arg(hf)
        .args([
            "--threads",
            &threads.to_string(),
            "--batch",
            &args.responses.to_string(),
        ])
        .args([
            "--resp-len",
            &args.response_len.to_string(),
            "--steps",
            &args.steps.to_string(),
        ])
        .arg("--prompt-ids")
        .arg(
            prompt_ids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last)
        .with_context(|| format!("{}: last line is not JSON: {last}", script.display()))?;
    // The same statistic as em-train's rows: the median step ([`median`]), not the mean.
    let mut steps: Vec<f64> = v["step_s"]
        .as_array()
        .context("no step_s")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    if steps.is_empty() {
        bail!("{}: no timed step in step_s", script.display());
    }
    let secs = median(&mut steps);
    let rss = v["ru_maxrss_mb"].as_f64().context("no ru_maxrss_mb")?;
    println!("PyTorch: {}", last);
    Ok(Some((secs, rss)))
}
