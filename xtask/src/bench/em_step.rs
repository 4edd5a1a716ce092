//! `cargo xtask bench em-step`: seconds, peak memory and FLOP/s of one EM update (8 responses ×
//! 256 tokens) on SmolLM2-135M in f32, next to the same step in PyTorch
//! (`shared/bench/torch_em_step.py`) when PyTorch is installed, and the memory model projected to
//! Qwen2.5-Math-1.5B and -7B. With `--random-config`, one update of a random-weight model of a
//! published configuration on `--device` (the GPU script's figure).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use em_data::Problem;
use em_train::models::CausalLm;
use em_train::{accumulate_em_gradients, AdamW, AdamWConfig, EmOptions, Gradients, Sequence};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use em_pipeline::assets::{cache_dir, smollm2_path};
use em_pipeline::hf_vocab::HfVocab;
use em_pipeline::prompt::{PromptOptions, PromptRenderer};

use super::memory;

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
    pub dtype: em_pipeline::em_loss::ModelDtype,
    /// Micro-batch sizes to time, comma-separated (default 1,2).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 2])]
    pub micro_batches: Vec<usize>,
    /// Also time every micro-batch without layer recomputation.
    #[arg(long)]
    pub no_recompute_too: bool,
    /// Timed updates per setting, after one warm-up.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
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
}

/// The torch script's default prompt, without the instruction the prompt renderer appends.
const PROBLEM: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?";

/// Runs the benchmark with models and files under `work`.
pub fn bench_em_step(work: &Path, args: &EmStepArgs) -> Result<()> {
    let device = em_train::parse_device(&args.device)?;
    let dtype = args.dtype.dtype();
    let gguf = smollm2_path(&cache_dir());
    let rss_before;
    let mut rng = StdRng::seed_from_u64(7);
    let (model, prompt, hf, name) = if let Some(which) = args.random_config {
        let known = memory::qwen_math_configs();
        let (raw, label) = match which {
            RandomConfig::Smollm2 => (smollm2_config(), "SmolLM2-135M"),
            RandomConfig::QwenMath1_5b => (known[0].raw.clone(), known[0].name),
            RandomConfig::QwenMath7b => (known[1].raw.clone(), known[1].name),
        };
        let cfg = memory::config(&raw, label)?;
        if let Some(other) = &args.check_against {
            return check_devices(&cfg, args, other);
        }
        if let Some(dir) = &args.save_hf {
            let model = memory::random_model(&cfg, DType::F32, &Device::Cpu)?;
            model.save_hf_dir(dir, DType::BF16)?;
            println!("{label} with random weights -> {}", dir.display());
            return Ok(());
        }
        rss_before = em_pipeline::peak_rss_mb().unwrap_or(0.0);
        let model = memory::random_model(&cfg, dtype, &device)?;
        let prompt = random_ids(&mut rng, args.prompt_len, cfg.vocab_size);
        (model, prompt, None, format!("{label} (random weights)"))
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
        rss_before = em_pipeline::peak_rss_mb().unwrap_or(0.0);
        let model = CausalLm::from_hf_dir(&hf, dtype, &device)?;
        (model, prompt, Some(hf), "SmolLM2-135M".to_string())
    } else {
        println!(
            "{}: not fetched; timing random weights of SmolLM2-135M's shapes and an 87-token \
             random prompt (time and memory do not depend on the values)",
            gguf.display()
        );
        rss_before = em_pipeline::peak_rss_mb().unwrap_or(0.0);
        let cfg = memory::config(&smollm2_config(), "SmolLM2-135M config")?;
        let model = memory::random_model(&cfg, dtype, &device)?;
        let prompt = random_ids(&mut rng, args.prompt_len, cfg.vocab_size);
        (
            model,
            prompt,
            None,
            "SmolLM2-135M (random weights)".to_string(),
        )
    };
    let cfg = model.config().clone();
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
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let n_tokens = (args.responses * args.response_len) as f64;
    let mut micro_batches = args.micro_batches.clone();
    micro_batches.sort_unstable();
    let mut settings: Vec<(usize, bool)> = micro_batches.iter().map(|&mb| (mb, true)).collect();
    if args.no_recompute_too {
        settings.extend(micro_batches.iter().map(|&mb| (mb, false)));
    }
    let mut rows = Vec::new();
    if args.memory_only {
        let rows: Vec<_> = settings
            .iter()
            .map(|&(mb, rc)| (mb, rc, f64::NAN, f64::NAN))
            .collect();
        return memory_model(&cfg, dtype, seq_len, &rows, rss_before);
    }
    for (micro_batch, recompute) in settings {
        let options = EmOptions {
            recompute,
            ..EmOptions::new(0.5, micro_batch, vocab)
        };
        let mut times = Vec::new();
        // Each setting's own peak: the high-water mark is reset to the current RSS first.
        memory::reset_peak_rss();
        for i in 0..=args.steps.max(1) {
            let start = Instant::now();
            let mut grads = Gradients::new(model.parameters());
            let stats =
                accumulate_em_gradients(&model, &sequences, &options, 1.0 / n_tokens, &mut grads)?;
            device.synchronize()?;
            let t_grad = start.elapsed().as_secs_f64();
            let norm = grads.clip_norm(1.0).context("clipping")?;
            optimizer.step(&grads)?;
            drop(grads);
            device.synchronize()?;
            let total = start.elapsed().as_secs_f64();
            println!(
                "  micro-batch {micro_batch}{} step {i}{}: {total:.2} s (forward+backward {t_grad:.2}, clip+AdamW {:.2}), entropy {:.4}, grad norm {norm:.3}",
                if recompute { ", recompute" } else { "" },
                if i == 0 { " (warm-up)" } else { "" },
                total - t_grad,
                stats.entropy_sum / stats.n_tokens as f64,
            );
            if i > 0 {
                times.push(total);
            }
        }
        times.sort_by(f64::total_cmp);
        rows.push((
            micro_batch,
            recompute,
            times[times.len() / 2],
            memory::peak_mb(),
        ));
    }
    println!("(RSS before loading the model: {rss_before:.0} MB)");

    let torch = match &hf {
        Some(hf) if device.is_cpu() && dtype == DType::F32 => torch_baseline(hf, threads, args)?,
        _ => None,
    };
    let peak_gflops = cpu_peak_gflops(threads);
    println!("| implementation | s / update | peak RSS MB | TFLOP | GFLOP/s | of CPU peak | vs PyTorch time | vs PyTorch RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    for (mb, recompute, secs, peak) in &rows {
        let flops = step_flops(&cfg, &sequences, *recompute);
        let (t_ratio, m_ratio) = torch.as_ref().map_or(("—".into(), "—".into()), |(t, m)| {
            (format!("{:.2}x", secs / t), format!("{:.2}x", peak / m))
        });
        let of_peak = peak_gflops.as_ref().map_or("—".into(), |(p, _)| {
            format!("{:.0}%", 100.0 * flops / secs / 1e9 / p)
        });
        println!(
            "| em-train, micro-batch {mb}{} | {secs:.2} | {peak:.0} | {:.2} | {:.0} | {of_peak} | {t_ratio} | {m_ratio} |",
            if *recompute { ", recompute" } else { "" },
            flops / 1e12,
            flops / secs / 1e9,
        );
    }
    match &torch {
        Some((secs, rss)) => {
            let flops = step_flops(&cfg, &sequences, false);
            println!(
                "| PyTorch (torch_em_step.py) | {secs:.2} | {rss:.0} | {:.2} | {:.0} | {} | 1.00x | 1.00x |",
                flops / 1e12,
                flops / secs / 1e9,
                peak_gflops.as_ref().map_or("—".into(), |(p, _)| format!("{:.0}%", 100.0 * flops / secs / 1e9 / p)),
            )
        }
        None if device.is_cpu() && hf.is_some() => println!(
            "PyTorch is not installed (EM_TORCH_PYTHON, else python3, cannot import torch and \
             transformers): no baseline measured. shared/bench/README.md records ≈45 s and \
             9.8 GiB for this step on a 2-core machine of this kind."
        ),
        None => {}
    }
    if let Some((p, how)) = &peak_gflops {
        println!("CPU peak {p:.0} GFLOP/s ({how}); FLOPs counted from the shapes: 3× the forward's matmuls (forward, both backward products), one more trunk forward with recompute, attention over the full square");
    }
    if device.is_cpu() && !args.no_memory_model && args.random_config.is_none() {
        memory_model(&cfg, dtype, seq_len, &rows, rss_before)?;
    }
    Ok(())
}

/// The loss and gradients of one random model and one set of random responses on `--device` and
/// on `other`, compared as `em-loss --check-against` does.
fn check_devices(
    cfg: &em_train::models::ModelConfig,
    args: &EmStepArgs,
    other: &str,
) -> Result<()> {
    use em_pipeline::em_loss::{self, EmLossInput, CHECK_GRAD_RTOL, CHECK_LOSS_RTOL};
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

/// FLOPs of one update over `sequences` (padded per micro-batch to equal lengths here).
fn step_flops(cfg: &em_train::models::ModelConfig, sequences: &[Sequence], recompute: bool) -> f64 {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let (q, kv) = (
        (cfg.num_attention_heads * cfg.head_dim) as f64,
        (cfg.num_key_value_heads * cfg.head_dim) as f64,
    );
    let linear_per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let layers = cfg.num_hidden_layers as f64;
    let (mut trunk, mut attention, mut head) = (0.0, 0.0, 0.0);
    for s in sequences {
        let t = s.len() as f64;
        trunk += 2.0 * t * linear_per_layer * layers;
        attention += 2.0 * 2.0 * t * t * q * layers;
        head += 2.0 * s.response_ids.len() as f64 * cfg.vocab_size as f64 * h;
    }
    let forward = trunk + attention + head;
    3.0 * forward + if recompute { trunk + attention } else { 0.0 }
}

/// This CPU's f32 peak for `threads` cores: cores × 2 FMA pipes × SIMD lanes × 2 FLOP × GHz.
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
    let peak = threads as f64 * 2.0 * lanes * 2.0 * ghz;
    Some((
        peak,
        format!("{threads} cores × 2 FMA × {lanes} f32 lanes × 2 FLOP × {ghz:.2} GHz"),
    ))
}

/// Prints the memory model: measured per-layer and LM-head transients, checked against this
/// run's peaks, then projected to Qwen2.5-Math-1.5B and -7B.
fn memory_model(
    cfg: &em_train::models::ModelConfig,
    dtype: DType,
    seq_len: usize,
    rows: &[(usize, bool, f64, f64)],
    rss_before: f64,
) -> Result<()> {
    let chunk = EmOptions::new(0.5, 1, cfg.vocab_size).logit_chunk_rows;
    let head_mb = memory::measure_head_chunk_mb(chunk, cfg.vocab_size)?;
    let layer_mb = memory::measure_layer_mb(&cfg.raw, seq_len, dtype)?;
    println!(
        "\nmemory model: one {:?} decoder layer, forward + backward on 1 × {seq_len} tokens: {layer_mb:.0} MB \
         ({:.1} KB per token per layer); one LM-head chunk ({chunk} rows × {} logits): {head_mb:.0} MB",
        dtype,
        layer_mb * 1024.0 / seq_len as f64,
        cfg.vocab_size
    );
    println!("| setting | predicted peak MB | measured peak MB (RSS − RSS before loading) |");
    println!("|---|---|---|");
    for (mb, recompute, _, peak) in rows {
        let p = memory::project(cfg, dtype, *mb, seq_len, layer_mb, head_mb, *recompute);
        println!(
            "| micro-batch {mb}{} | {:.0} (static {:.0}, saved inputs {:.0}, layers {:.0}, head {:.0}) | {:.0} |",
            if *recompute { ", recompute" } else { "" },
            p.total(),
            p.static_mb,
            p.saved_inputs_mb,
            p.layer_mb,
            p.head_mb,
            peak - rss_before
        );
    }
    const SEQ: usize = 1024;
    println!("\nprojected peak GB of one update at {SEQ} tokens per sequence (static: weights, f32 master copy for bf16, f32 gradients and moments):");
    println!("| model | dtype | params | static GB | mb 1 | mb 2 | mb 3 | mb 4 | mb 4 without recompute |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for known in memory::qwen_math_configs() {
        let qcfg = memory::config(&known.raw, known.name)?;
        for dt in [DType::F32, DType::BF16] {
            let t0 = Instant::now();
            let layer = memory::measure_layer_mb(&known.raw, SEQ, dt)?;
            let cols: Vec<String> = (1..=4)
                .map(|b| {
                    let p = memory::project(&qcfg, dt, b, SEQ, layer, head_mb, true);
                    format!("{:.1}", p.total() / 1024.0)
                })
                .collect();
            let full = memory::project(&qcfg, dt, 4, SEQ, layer, head_mb, false);
            let p1 = memory::project(&qcfg, dt, 1, SEQ, layer, head_mb, true);
            println!(
                "| {} | {:?} | {:.2} B | {:.1} | {} | {:.1} |",
                known.name,
                dt,
                memory::parameter_count(&qcfg) as f64 / 1e9,
                p1.static_mb / 1024.0,
                cols.join(" | "),
                full.total() / 1024.0
            );
            eprintln!(
                "  ({} {:?}: one layer at 1 × {SEQ} tokens measured {layer:.0} MB in {:.0} s)",
                known.name,
                dt,
                t0.elapsed().as_secs_f64()
            );
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

/// (seconds per step, peak RSS MB) of the PyTorch step, or None without PyTorch. The Python is
/// `EM_TORCH_PYTHON` when set, else `python3`.
fn torch_baseline(hf: &Path, threads: usize, args: &EmStepArgs) -> Result<Option<(f64, f64)>> {
    let python = std::env::var("EM_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch = Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_torch {
        return Ok(None);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/torch_em_step.py");
    if !script.is_file() {
        bail!("{}: missing", script.display());
    }
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
    let secs = v["sec_per_step"].as_f64().context("no sec_per_step")?;
    let rss = v["ru_maxrss_mb"].as_f64().context("no ru_maxrss_mb")?;
    println!("PyTorch: {}", last);
    Ok(Some((secs, rss)))
}
