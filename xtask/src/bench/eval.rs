//! `cargo xtask bench eval`: eval throughput next to llama.cpp's batched generation.

use std::path::Path;

use anyhow::{bail, Context, Result};
use em_llama::{EngineConfig, GgufModel};
use em_pipeline::assets::{cache_dir, smollm2_path, suite_path};
use em_pipeline::eval::{evaluate, Decoding, Setting};
use em_pipeline::prompt::{PromptOptions, PromptRenderer};

use super::anchor::{anchor_binary, env_or, load1, run_anchor};
use crate::backends::LlamaBackend;

/// `cargo xtask bench eval`: items/s and generated tokens/s of `eval` (greedy, GSM8K, SmolLM2),
/// next to llama.cpp's batched generation throughput at the same batch, threads and lengths, run in
/// the same command. Ours includes prompt processing, sampling, grading and the per-item writes.
pub fn bench_eval(work: &Path) -> Result<()> {
    let model_path = smollm2_path(&cache_dir());
    if !model_path.is_file() {
        bail!(
            "{}: no such model (run `cargo xtask fetch smollm2-135m`)",
            model_path.display()
        );
    }
    let threads: i32 = env_or("EM_BENCH_THREADS", em_llama::default_threads())?;
    let b: usize = env_or("EM_BENCH_B", 8)?;
    let items: usize = env_or("EM_BENCH_ITEMS", 16)?;
    let tg: usize = env_or("EM_BENCH_TG", 128)?;
    std::fs::create_dir_all(work).with_context(|| format!("{}: cannot create", work.display()))?;
    let bin = anchor_binary(work)?;
    let out = work.join("bench-eval");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let decoding = Decoding {
        prompt: PromptOptions::default(),
        top_p: 0.95,
        max_new_tokens: tg,
        seed: 0,
    };
    let problems: Vec<em_data::Problem> = em_data::load_suite(suite_path("gsm8k")?)?
        .into_iter()
        .take(items)
        .collect();
    let backend = LlamaBackend::new(EngineConfig {
        threads,
        parallel: b,
        ..EngineConfig::default()
    });
    let model = GgufModel::load(&model_path)?;
    let renderer = PromptRenderer::new(&model, &decoding.prompt)?;
    let prompt_tokens: usize = problems
        .iter()
        .map(|p| Ok(renderer.render(p)?.ids.len()))
        .sum::<Result<usize>>()?;
    let pp = prompt_tokens / problems.len().max(1);
    let load = load1();
    let setting = Setting {
        label: "bench".into(),
        temperature: 0.0,
        n: 1,
        em_inf: None,
    };
    let start = std::time::Instant::now();
    let results = evaluate(
        &backend,
        &model_path,
        &model_path,
        &problems,
        &setting,
        &decoding,
        &out.join("items.jsonl"),
    )?;
    let secs = start.elapsed().as_secs_f64();
    let generated: usize = results
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.n_tokens))
        .sum();
    let (anchor_pp_secs, anchor_tg) = run_anchor(&bin, &model_path, threads, b, pp, tg, false)?;
    let ours_tps = generated as f64 / secs;
    // The anchor's end-to-end rate for the same work: each batch of B prompts, then B × tg tokens.
    let waves = problems.len().div_ceil(b) as f64;
    let anchor_e2e =
        (problems.len() * tg) as f64 / (waves * (anchor_pp_secs + (b * tg) as f64 / anchor_tg));
    println!("bench eval: {} | GSM8K first {items} items, greedy, ≤{tg} new tokens | threads {threads} | batch {b} | load1 {load}", model_path.display());
    println!("| | items/s | generated tokens/s | vs llama.cpp batched generation |");
    println!("|---|---|---|---|");
    println!("| cargo xtask eval (prompts {pp} tokens on average, incl. prefill, sampling, grading, writes) | {:.3} | {ours_tps:.1} | {:.2}x |", results.len() as f64 / secs, ours_tps / anchor_tg);
    println!("| llama.cpp anchor, B={b}, pp {pp}, tg {tg} (generation only) | – | {anchor_tg:.1} | 1.00x |");
    println!(
        "| llama.cpp anchor, same work end to end (prompts + generation, {} waves of {b}) | {:.3} | {anchor_e2e:.1} | ours / this: {:.2}x |",
        waves,
        anchor_e2e / tg as f64,
        ours_tps / anchor_e2e
    );
    Ok(())
}
