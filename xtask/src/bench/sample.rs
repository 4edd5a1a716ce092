//! `cargo xtask bench sample`: em-llama's batched generation against llama.cpp's own batched
//! throughput (the project's anchor, `bench/llamacpp-anchor`, built from the llama.cpp sources
//! that llama-cpp-sys-2 vendors), on the same GGUF, threads, batch and prompt length, interleaved
//! in one command. Ours includes the sampling (reference settings, log-probs and entropies on); the
//! anchor's generation figure does not sample at all.
//!
//! Knobs (environment): `EM_BENCH_MODEL` (default: the fetched SmolLM2-135M Q4_1),
//! `EM_BENCH_THREADS` (default: [`em_llama::default_threads`]), `EM_BENCH_B` (8), `EM_BENCH_PP`
//! (256), `EM_BENCH_TG` (128), `EM_BENCH_REPS` (3), `LLAMA_SRC` (the llama.cpp sources to build
//! the anchor from).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use em_llama::{Engine, EngineConfig, GgufModel};
use em_sampler::{Event, Prompt, Request, Sampler, SamplingParams};
use rand::{Rng, SeedableRng};

use em_pipeline::assets::{cache_dir, smollm2_path};

use super::anchor::{anchor_binary, env_or, load1, median, run_anchor};

/// Ours: (prompt-phase seconds, generation tokens/s including sampling, prompt tokens decoded,
/// prompt tokens without sharing).
fn run_ours(
    engine: &mut Engine<'_>,
    prompt: &[u32],
    b: usize,
    tg: usize,
    seed: u64,
) -> Result<(f64, f64, u64, u64)> {
    let params = SamplingParams {
        max_new_tokens: tg,
        ignore_eos: true,
        logprobs: true,
        ..SamplingParams::reference(tg, seed)
    };
    let request = Request {
        prompt: Prompt::Tokens(prompt.to_vec()),
        n_samples: b,
        params,
    };
    let mut first: Option<(f64, u64)> = None;
    let mut last = (0.0, 0u64);
    let stats = engine.generate(&[request], &mut |e| {
        if let Event::Step {
            generated_tokens,
            elapsed,
            ..
        } = e
        {
            let t = elapsed.as_secs_f64();
            first.get_or_insert((t, generated_tokens));
            last = (t, generated_tokens);
        }
        ControlFlow::Continue(())
    })?;
    let (t0, g0) = first.context("no decode step ran")?;
    if stats.generated_tokens != (b * tg) as u64 {
        bail!(
            "generated {} tokens, expected {}",
            stats.generated_tokens,
            b * tg
        );
    }
    eprintln!(
        "    ours: decode {:.2}s, sampling + detokenising {:.2}s of {:.2}s",
        stats.decode_time.as_secs_f64(),
        stats.sample_time.as_secs_f64(),
        stats.elapsed.as_secs_f64()
    );
    Ok((
        t0,
        (last.1 - g0) as f64 / (last.0 - t0),
        stats.prompt_tokens,
        stats.prompt_tokens_unshared,
    ))
}

/// Our generation throughput alone (no baseline to divide by: a figure for the record, not a ratio).
fn ours_alone(
    engine: &mut Engine<'_>,
    prompt: &[u32],
    path: &Path,
    b: usize,
    tg: usize,
    reps: usize,
) -> Result<()> {
    let pp = prompt.len();
    let mut tps = Vec::new();
    for rep in 0..reps {
        let (t_pp, s_tg, _, _) = run_ours(engine, prompt, b, tg, rep as u64)?;
        println!(
            "rep {rep}: prompt phase {t_pp:.3} s, generation {s_tg:.1} tokens/s with sampling"
        );
        tps.push(s_tg);
    }
    println!(
        "bench sample (no anchor): {} | gpu layers {} | B {b} | prompt {pp} | generate {tg}: median {:.1} tokens/s",
        path.display(),
        em_llama::default_gpu_layers(),
        median(tps)
    );
    Ok(())
}

/// Runs the comparison and prints the ratios (see the module documentation).
pub fn bench_sample(work: &Path) -> Result<()> {
    let model_path = match std::env::var_os("EM_BENCH_MODEL") {
        Some(p) => PathBuf::from(p),
        None => smollm2_path(&cache_dir()),
    };
    if !model_path.is_file() {
        bail!(
            "{}: no such model (run `cargo xtask fetch smollm2-135m` or set EM_BENCH_MODEL)",
            model_path.display()
        );
    }
    let threads: i32 = env_or("EM_BENCH_THREADS", em_llama::default_threads())?;
    let b: usize = env_or("EM_BENCH_B", 8)?;
    let pp: usize = env_or("EM_BENCH_PP", 256)?;
    let tg: usize = env_or("EM_BENCH_TG", 128)?;
    let reps: usize = env_or::<usize>("EM_BENCH_REPS", 3)?.max(1);
    std::fs::create_dir_all(work).with_context(|| format!("{}: cannot create", work.display()))?;
    // EM_BENCH_ANCHOR=0: ours alone, where llama.cpp's sources cannot be built (a GPU machine).
    let with_anchor = env_or::<u8>("EM_BENCH_ANCHOR", 1)? != 0;
    let model = GgufModel::load(&model_path)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let prompt: Vec<u32> = (0..pp)
        .map(|_| rng.gen_range(0..model.n_vocab() as u32))
        .collect();
    let config = EngineConfig {
        threads,
        parallel: b,
        shared_prefix: true,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&model, config);
    run_ours(&mut engine, &prompt[..16.min(pp)], b, 4, 0)?; // warm-up: context, caches
    if !with_anchor {
        return ours_alone(&mut engine, &prompt, &model_path, b, tg, reps);
    }
    let bin = anchor_binary(work)?;

    println!(
        "bench sample: {} | threads {threads} | B {b} | prompt {pp} | generate {tg} | {reps} reps, interleaved",
        model_path.display()
    );
    println!(
        "{:>3} {:>6} | {:>14} {:>14} {:>14} | {:>12} {:>12}",
        "rep", "load1", "anchor TG t/s", "anchor-pps TG", "ours TG t/s", "anchor PP s", "ours PP s"
    );
    let (mut a_tg, mut a_pps_tg, mut o_tg, mut a_pp, mut a_pps_pp, mut o_pp) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut saved = (0, 0);
    for rep in 0..reps {
        let load = load1();
        let (t_pp, s_tg) = run_anchor(&bin, &model_path, threads, b, pp, tg, false)?;
        let (t_pps, s_pps_tg) = run_anchor(&bin, &model_path, threads, b, pp, tg, true)?;
        let (t_ours, s_ours, decoded, unshared) =
            run_ours(&mut engine, &prompt, b, tg, rep as u64)?;
        println!("{rep:>3} {load:>6} | {s_tg:>14.1} {s_pps_tg:>14.1} {s_ours:>14.1} | {t_pp:>12.3} {t_ours:>12.3}");
        a_tg.push(s_tg);
        a_pps_tg.push(s_pps_tg);
        o_tg.push(s_ours);
        a_pp.push(t_pp);
        a_pps_pp.push(t_pps);
        o_pp.push(t_ours);
        saved = (decoded, unshared);
    }
    // Each rep's ratio against the anchor run just before it: the paired figure, which the
    // machine's drift between reps does not move.
    let paired: Vec<f64> = o_tg.iter().zip(&a_pps_tg).map(|(o, a)| o / a).collect();
    let paired_median = median(paired.clone());
    let (a_tg, a_pps_tg, o_tg) = (median(a_tg), median(a_pps_tg), median(o_tg));
    let (a_pp, a_pps_pp, o_pp) = (median(a_pp), median(a_pps_pp), median(o_pp));
    println!("medians: anchor TG {a_tg:.1} t/s (B separate prompts), {a_pps_tg:.1} t/s (shared prompt); ours {o_tg:.1} t/s with sampling");
    println!(
        "generated tokens/s, ours / anchor (shared prompt):   {:.3}",
        o_tg / a_pps_tg
    );
    println!(
        "generated tokens/s, ours / anchor (separate prompts): {:.3}",
        o_tg / a_tg
    );
    println!(
        "generated tokens/s, ours / anchor (shared prompt), rep by rep: {} (median {paired_median:.3})",
        paired
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "prompt tokens decoded with prefix sharing: {} of {} ({:.3} of unshared; {:.1}x fewer)",
        saved.0,
        saved.1,
        saved.0 as f64 / saved.1 as f64,
        saved.1 as f64 / saved.0.max(1) as f64
    );
    println!(
        "prompt phase seconds, ours (shared, incl. first-token sampling) / anchor B separate prompts: {:.3}; / anchor shared prompt: {:.3}",
        o_pp / a_pp,
        o_pp / a_pps_pp
    );
    let summary = serde_json::json!({
        "model": model_path, "threads": threads, "b": b, "pp": pp, "tg": tg, "reps": reps,
        "anchor_tg_tps": a_tg, "anchor_pps_tg_tps": a_pps_tg, "ours_tg_tps": o_tg,
        "ratio_tg_vs_pps": o_tg / a_pps_tg, "ratio_tg_vs_separate": o_tg / a_tg,
        "ratio_tg_vs_pps_per_rep": paired, "ratio_tg_vs_pps_per_rep_median": paired_median,
        "prompt_tokens": saved.0, "prompt_tokens_unshared": saved.1,
        "anchor_pp_s": a_pp, "anchor_pps_pp_s": a_pps_pp, "ours_pp_s": o_pp,
    });
    let path = work.join("bench-sample.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    println!("summary: {}", path.display());
    Ok(())
}
