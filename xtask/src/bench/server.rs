//! `cargo xtask bench server`: the same screen in-process (llama.cpp, batched) and through
//! llama-cpp-python's OpenAI-compatible server on the same GGUF and threads, in one command.
//!
//! Knobs (environment): `EM_BENCH_THREADS` (2), `EM_BENCH_PROMPTS` (8), `EM_BENCH_K` (4),
//! `EM_BENCH_TG` (96), `EM_BENCH_B` (in-process batch, 8), `EM_BENCH_CONCURRENCY` (server, 2).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use em_llama::EngineConfig;
use em_openai::{Dialect, OpenAiConfig, PromptFormat};
use em_pipeline::assets::{cache_dir, smollm2_path};
use em_pipeline::screen::{self, PromptResult, ScreenOptions};
use em_pipeline::Backend;

use super::anchor::{env_or, load1};
use crate::backends::{LlamaBackend, ServerBackend};
use crate::server::LlamaCppServer;

/// Seconds and generated tokens of one screen.
fn timed_screen(args: &ScreenOptions, backend: &dyn Backend) -> Result<(f64, f64)> {
    let start = Instant::now();
    let results: Vec<PromptResult> = screen::run(args, backend)?;
    let secs = start.elapsed().as_secs_f64();
    let tokens: f64 = results.iter().map(|r| r.mean_length * r.n as f64).sum();
    Ok((secs, tokens))
}

pub fn bench_server(work: &Path) -> Result<()> {
    let model = smollm2_path(&cache_dir());
    if !model.is_file() {
        bail!(
            "{}: missing; run `cargo xtask fetch smollm2-135m` first",
            model.display()
        );
    }
    let threads: usize = env_or("EM_BENCH_THREADS", 2)?;
    let prompts: usize = env_or("EM_BENCH_PROMPTS", 8)?;
    let k: usize = env_or("EM_BENCH_K", 4)?;
    let tg: usize = env_or("EM_BENCH_TG", 96)?;
    let b: usize = env_or("EM_BENCH_B", 8)?;
    let concurrency: usize = env_or("EM_BENCH_CONCURRENCY", 2)?;
    let pool = em_pipeline::assets::pool_path(Path::new("dsr"))?;
    let args = |out: &str| ScreenOptions {
        k,
        limit: Some(prompts),
        max_new_tokens: tg,
        fresh: true,
        ..ScreenOptions::reference(model.clone(), pool.clone(), work.join(out))
    };
    let server = LlamaCppServer::start_with_threads(&model, "smollm2", threads)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let local = LlamaBackend::new(EngineConfig {
        threads: threads as i32,
        parallel: b,
        ..EngineConfig::default()
    });
    let remote = ServerBackend {
        config: OpenAiConfig {
            concurrency,
            dialect: Dialect::LlamaCppPython,
            prompt_format: PromptFormat::Text,
            ..OpenAiConfig::new(server.base_url(), "smollm2".into())
        },
    };
    let load = load1();
    let (l_secs, l_tokens) = timed_screen(&args("bench-screen-local"), &local)?;
    let (s_secs, s_tokens) = timed_screen(&args("bench-screen-server"), &remote)?;
    let (l_tps, s_tps) = (l_tokens / l_secs, s_tokens / s_secs);
    println!("bench server: {} | {prompts} pool prompts × k {k} | ≤{tg} new tokens | {threads} threads each | load1 {load}", model.display());
    println!("| backend | seconds | generated tokens | tokens/s | vs in-process |");
    println!("|---|---|---|---|---|");
    println!(
        "| in-process llama.cpp, batch {b} | {l_secs:.1} | {l_tokens:.0} | {l_tps:.1} | 1.00x |"
    );
    println!("| llama-cpp-python server, {concurrency} in flight | {s_secs:.1} | {s_tokens:.0} | {s_tps:.1} | {:.2}x |", s_tps / l_tps);
    Ok(())
}
