//! `cargo xtask bench em-step`: seconds and peak RSS of one EM update (8 responses × 256 tokens)
//! on SmolLM2-135M in f32, next to the same step in PyTorch (`shared/bench/torch_em_step.py`) when
//! PyTorch is installed.

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

const BATCH: usize = 8;
const RESP_LEN: usize = 256;
const TIMED_STEPS: usize = 2;

/// The torch script's default prompt, without the instruction the prompt renderer appends.
const PROBLEM: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?";

/// Runs the benchmark with models and files under `work`.
pub fn bench_em_step(work: &Path) -> Result<()> {
    let gguf = smollm2_path(&cache_dir());
    let rss_before;
    let (model, prompt, what) = if gguf.exists() {
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
        let model = CausalLm::from_hf_dir(&hf, DType::F32, &Device::Cpu)?;
        (model, prompt, Some(hf))
    } else {
        println!(
            "{}: not fetched; timing random weights of SmolLM2-135M's shapes and an 87-token \
             random prompt (time and memory do not depend on the values)",
            gguf.display()
        );
        rss_before = em_pipeline::peak_rss_mb().unwrap_or(0.0);
        let model = random_smollm2()?;
        let mut rng = StdRng::seed_from_u64(7);
        let prompt = (0..87).map(|_| rng.gen_range(0..49_152u32)).collect();
        (model, prompt, None)
    };
    let vocab = model.config().vocab_size;
    let mut rng = StdRng::seed_from_u64(15);
    let sequences: Vec<Sequence> = (0..BATCH)
        .map(|_| Sequence {
            prompt_ids: prompt.clone(),
            response_ids: (0..RESP_LEN)
                .map(|_| rng.gen_range(0..vocab as u32))
                .collect(),
        })
        .collect();
    let threads = rayon_threads();
    println!(
        "SmolLM2-135M f32, {BATCH} responses × {RESP_LEN} tokens after a {}-token prompt, {threads} threads, load {:.2}",
        prompt.len(),
        load1()
    );
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let n_tokens = (BATCH * RESP_LEN) as f64;
    let mut rows = Vec::new();
    // Smaller micro-batches first: the process's peak RSS after each then belongs to it.
    // EM_BENCH_MICRO_BATCHES=1,2,8 and EM_BENCH_STEPS=N override the defaults.
    let mut micro_batches: Vec<usize> = std::env::var("EM_BENCH_MICRO_BATCHES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    micro_batches.sort_unstable();
    let timed_steps: usize = std::env::var("EM_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(TIMED_STEPS)
        .max(1);
    for micro_batch in micro_batches {
        let options = EmOptions::new(0.5, micro_batch, vocab);
        let mut times = Vec::new();
        for i in 0..=timed_steps {
            let start = Instant::now();
            let mut grads = Gradients::new(model.parameters());
            let stats =
                accumulate_em_gradients(&model, &sequences, &options, 1.0 / n_tokens, &mut grads)?;
            let t_grad = start.elapsed().as_secs_f64();
            let norm = grads.clip_norm(1.0).context("clipping")?;
            optimizer.step(&grads)?;
            drop(grads);
            let total = start.elapsed().as_secs_f64();
            println!(
                "  micro-batch {micro_batch} step {i}{}: {total:.2} s (forward+backward {t_grad:.2}, clip+AdamW {:.2}), entropy {:.4}, grad norm {norm:.3}",
                if i == 0 { " (warm-up)" } else { "" },
                total - t_grad,
                stats.entropy_sum / stats.n_tokens as f64,
            );
            if i > 0 {
                times.push(total);
            }
        }
        times.sort_by(f64::total_cmp);
        let peak = em_pipeline::peak_rss_mb().unwrap_or(0.0);
        rows.push((micro_batch, times[times.len() / 2], peak));
    }
    println!("(peak RSS before loading the model: {rss_before:.0} MB)");

    let torch = match &what {
        Some(hf) => torch_baseline(hf, threads)?,
        None => None,
    };
    println!("| implementation | s / update | peak RSS MB | vs PyTorch time |");
    println!("|---|---|---|---|");
    for (mb, secs, peak) in &rows {
        let ratio = torch
            .as_ref()
            .map_or("—".to_string(), |(t, _)| format!("{:.2}x", secs / t));
        println!("| em-train, micro-batch {mb} | {secs:.2} | {peak:.0} | {ratio} |");
    }
    match torch {
        Some((secs, rss)) => println!("| PyTorch (torch_em_step.py) | {secs:.2} | {rss:.0} | 1.00x |"),
        None => println!(
            "PyTorch is not installed (python3 -c 'import torch' fails): no baseline measured. \
             shared/bench/README.md records ≈45 s and 9.8 GiB for this step on a 2-core machine of this kind."
        ),
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// SmolLM2-135M's configuration with N(0, 0.02) weights and unit norms.
fn random_smollm2() -> Result<CausalLm> {
    let raw = serde_json::json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192
    });
    let cfg = em_train::models::ModelConfig::from_value(raw, Path::new("SmolLM2-135M config"))?;
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in em_train::models::tensor_shapes(&cfg) {
        let t = if name.ends_with("norm.weight") {
            candle_core::Tensor::ones(shape, DType::F32, &Device::Cpu)?
        } else {
            candle_core::Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?
        };
        tensors.insert(name, t);
    }
    Ok(CausalLm::from_tensors(
        &cfg,
        tensors,
        DType::F32,
        &Device::Cpu,
    )?)
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// (seconds per step, peak RSS MB) of the PyTorch step, or None without PyTorch.
fn torch_baseline(hf: &Path, threads: usize) -> Result<Option<(f64, f64)>> {
    let has_torch = Command::new("python3")
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
    let out = Command::new("python3")
        .arg(&script)
        .arg("--model-dir")
        .arg(hf)
        .args([
            "--threads",
            &threads.to_string(),
            "--batch",
            &BATCH.to_string(),
        ])
        .args([
            "--resp-len",
            &RESP_LEN.to_string(),
            "--steps",
            &TIMED_STEPS.to_string(),
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
