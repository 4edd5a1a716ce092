//! `cargo xtask bench`: figures that are not tests. Each prints ratios against a baseline measured in
//! the same command, because the machines these run on are shared and noisy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use em_pipeline::assets::{cache_dir, smollm2_path};

mod anchor;
mod em_step;
mod eval;
mod profile;
mod sample;
mod server;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum BenchKind {
    /// Converting SmolLM2-135M: GGUF -> HF f32, then HF -> GGUF f16 and q4_k_m.
    Convert,
    /// One EM update on SmolLM2-135M (8 responses × 256 tokens), against PyTorch when installed.
    EmStep,
    /// Batched sampling vs llama.cpp's own batched throughput on SmolLM2-135M, in the same command.
    Sample,
    /// `eval` throughput (items/s, tokens/s) vs llama.cpp's batched throughput, in the same command.
    Eval,
    /// `screen` throughput in-process vs through llama-cpp-python's server on the same GGUF.
    Server,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    pub kind: BenchKind,
    /// Working directory for the converted files (default: target/bench).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[command(flatten)]
    pub em_step: em_step::EmStepArgs,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench"));
    std::fs::create_dir_all(&work).with_context(|| format!("{}: cannot create", work.display()))?;
    match args.kind {
        BenchKind::Convert => bench_convert(&work),
        BenchKind::EmStep => em_step::bench_em_step(&work, &args.em_step),
        BenchKind::Sample => sample::bench_sample(&work),
        BenchKind::Eval => eval::bench_eval(&work),
        BenchKind::Server => server::bench_server(&work),
    }
}

/// Runs `xtask convert` in a child process; returns (seconds, peak RSS MB).
fn timed_convert(input: &Path, output: &Path, extra: &[&str]) -> Result<(f64, f64)> {
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let out = Command::new(exe)
        .arg("convert")
        .arg(input)
        .arg("-o")
        .arg(output)
        .arg("--force")
        .args(extra)
        .env("EM_REPORT_PEAK_RSS", "1")
        .output()?;
    let secs = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("convert {} failed: {}", input.display(), stderr.trim());
    }
    let rss = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_mb="))
        .and_then(|v| v.trim().parse().ok())
        .context("child did not report its peak RSS")?;
    Ok((secs, rss))
}

fn dir_size(path: &Path) -> u64 {
    if path.is_file() {
        return path.metadata().map_or(0, |m| m.len());
    }
    std::fs::read_dir(path).map_or(0, |d| d.flatten().map(|e| dir_size(&e.path())).sum())
}

fn bench_convert(work: &Path) -> Result<()> {
    let gguf = smollm2_path(&cache_dir());
    if !gguf.exists() {
        bail!(
            "{}: missing; run `cargo xtask fetch smollm2-135m` first",
            gguf.display()
        );
    }
    let hf = work.join("smollm2-hf");
    let (secs, rss) = timed_convert(&gguf, &hf, &[])?;
    let st = hf.join("model.safetensors");
    let st_mb = dir_size(&st) as f64 / 1e6;

    // Baseline: copying the same bytes, read and written once.
    let copy = work.join("copy.safetensors");
    let start = Instant::now();
    std::fs::copy(&st, &copy)?;
    std::fs::File::open(&copy)?.sync_all()?;
    let copy_secs = start.elapsed().as_secs_f64();
    std::fs::remove_file(&copy)?;
    let copy_mbs = st_mb / copy_secs;

    println!("SmolLM2-135M: HF f32 safetensors {st_mb:.0} MB; baseline copy {copy_mbs:.0} MB/s ({copy_secs:.2} s)");
    println!(
        "| conversion | wall s | MB/s (of f32 input) | vs copy | peak RSS MB | RSS / f32 model |"
    );
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, secs: f64, rss: f64| {
        let mbs = st_mb / secs;
        println!(
            "| {name} | {secs:.2} | {mbs:.0} | {:.2}x | {rss:.0} | {:.2} |",
            mbs / copy_mbs,
            rss / st_mb
        );
    };
    row("GGUF Q4_1 -> HF f32", secs, rss);
    for outtype in ["f16", "q4_k_m"] {
        let out = work.join(format!("smollm2.{outtype}.gguf"));
        let (secs, rss) = timed_convert(&hf, &out, &["--outtype", outtype])?;
        row(&format!("HF f32 -> GGUF {outtype}"), secs, rss);
    }
    Ok(())
}
