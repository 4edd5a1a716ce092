//! Three on-policy updates of real models (SmolLM2-135M and Gemma-3-270M, dequantized from the
//! fetched GGUFs), CI-sized: each update writes only the refreshed sampling GGUF — at most 1.1 ×
//! the f16 model — and nothing else until the one checkpoint after the last update.

use std::path::Path;

use em_convert::{gguf_to_hf, hf_to_gguf, HfDtype, OutType};
use em_pipeline::assets::{cache_dir, gemma3_path, smollm2_path};
use em_pipeline::prompt::{PromptOptions, Style};
use em_pipeline::train::{self, TrainOptions};
use em_tests::asset;
use serde_json::Value;
use xtask::backends::LlamaBackend;

fn three_updates(gguf: &Path, name: &str, style: Style) {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    gguf_to_hf(gguf, &hf, HfDtype::F32).unwrap();
    let f16 = tmp.path().join("model.f16.gguf");
    hf_to_gguf(&hf, &f16, OutType::F16).unwrap();
    let f16_bytes = std::fs::metadata(&f16).unwrap().len();
    let prompt = tmp.path().join("prompt.jsonl");
    std::fs::write(
        &prompt,
        r#"{"id": "t1", "prompt": [{"role": "user", "content": "What is 12 + 30?"}], "answer": "42", "data_source": "test"}
"#,
    )
    .unwrap();
    let out = tmp.path().join("run");
    let args = TrainOptions {
        update: train::UpdateSettings {
            steps: 3,
            micro_batch: 2,
            ..Default::default()
        },
        sampling: train::SampleSettings {
            samples: 2,
            max_new_tokens: 8,
            ..Default::default()
        },
        prompt_options: PromptOptions {
            style,
            ..Default::default()
        },
        ..TrainOptions::reference(hf.clone(), prompt, out.clone())
    };
    let backend = LlamaBackend::new(em_llama::EngineConfig {
        parallel: 2,
        ..Default::default()
    });
    let t0 = std::time::Instant::now();
    train::run(&args, &backend).unwrap().expect("finished");
    let metrics: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 3);
    for m in &metrics {
        let refreshed = m["refresh_bytes"].as_u64().unwrap();
        let written = m["written_bytes"].as_u64().unwrap();
        let secs = m["seconds"].as_f64().unwrap();
        let refresh_secs = m["refresh_seconds"].as_f64().unwrap();
        eprintln!(
            "{name} step {}: refresh {refreshed} bytes ({:.3} of the f16 model), {written} bytes written, refresh {refresh_secs:.2}s of {secs:.1}s ({:.0}%)",
            m["step"],
            refreshed as f64 / f16_bytes as f64,
            100.0 * refresh_secs / secs
        );
        assert!(refreshed as f64 <= 1.1 * f16_bytes as f64, "{name}: {m}");
        assert!(
            written >= refreshed && written <= refreshed + 65536,
            "{name}: {m}"
        );
        assert_eq!(m["refresh_type"], "f16");
    }
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["checkpoint-3", "final", "manifest.json", "metrics.jsonl"],
        "{name}: one checkpoint, after the last update"
    );
    eprintln!("{name}: 3 updates in {:.1}s", t0.elapsed().as_secs_f64());
}

/// One test for both models: `written_bytes` counts the whole process, so the two runs must not
/// overlap.
#[test]
fn real_models_refresh_only_their_sampling_gguf() {
    if let Some(gguf) = asset(smollm2_path(&cache_dir()), "smollm2-135m") {
        three_updates(&gguf, "SmolLM2-135M", Style::Chat);
    }
    if let Some(gguf) = asset(gemma3_path(&cache_dir()), "gemma3-270m") {
        // The packaged GGUF carries no chat template.
        three_updates(&gguf, "Gemma-3-270M", Style::Plain);
    }
}
