//! LoRA EM on SmolLM2-135M (dequantized from the fetched GGUF): three on-policy updates with the
//! adapter swapped into llama.cpp after each, a run stopped after two and resumed equal to an
//! uninterrupted one bit for bit, and the trained adapter applied by llama.cpp giving the logits
//! of the merged model (llama.cpp on its f16 GGUF, candle on its HF directory).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use em_convert::{gguf_to_hf, hf_to_gguf, HfDtype, OutType};
use em_llama::GgufModel;
use em_pipeline::assets::{cache_dir, gemma3_path, smollm2_path};
use em_pipeline::prompt::{PromptOptions, Style};
use em_pipeline::train::{self, RefreshType, TrainOptions, ADAPTER_GGUF};
use em_tests::asset;
use em_train::models::CausalLm;
use serde_json::Value;
use xtask::backends::LlamaBackend;

fn backend() -> LlamaBackend {
    LlamaBackend::new(em_llama::EngineConfig {
        parallel: 4,
        ..Default::default()
    })
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fields of a metrics line that do not depend on timing or on a restart.
fn deterministic(line: &Value) -> Value {
    let mut v = line.clone();
    v.as_object_mut().unwrap().retain(|k, _| {
        !k.contains("seconds")
            && !k.ends_with("per_s")
            && k != "peak_rss_mb"
            && k != "written_bytes"
    });
    v
}

/// A one-prompt pool file in `dir`.
fn prompt_file(dir: &Path) -> std::path::PathBuf {
    let prompt = dir.join("prompt.jsonl");
    std::fs::write(
        &prompt,
        r#"{"id": "t1", "prompt": [{"role": "user", "content": "What is 12 + 30?"}], "answer": "42", "data_source": "test"}
"#,
    )
    .unwrap();
    prompt
}

fn max_abs(rows: &[Vec<f32>]) -> f32 {
    rows.iter().flatten().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Largest difference relative to the logit scale, and the share of positions whose argmax agrees.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f64) {
    let scale = max_abs(a).max(1e-6);
    let diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    let argmax = |r: &Vec<f32>| {
        r.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0
    };
    let same = a
        .iter()
        .zip(b)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    (diff / scale, same as f64 / a.len() as f64)
}

#[test]
fn lora_em_on_smollm2_resumes_exactly_and_llama_cpp_applies_the_adapter_as_merged() {
    let Some(gguf) = asset(smollm2_path(&cache_dir()), "smollm2-135m") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    gguf_to_hf(&gguf, &hf, HfDtype::F32).unwrap();
    let prompt = prompt_file(tmp.path());
    let args = |out: &Path, stop_after: Option<usize>| TrainOptions {
        update: train::UpdateSettings {
            steps: 3,
            micro_batch: 4,
            // Large enough that the adapter moves the logits well beyond the comparison's tolerance.
            lr: 3e-3,
            ..Default::default()
        },
        sampling: train::SampleSettings {
            samples: 4,
            max_new_tokens: 12,
            ..Default::default()
        },
        adapter: train::AdapterOptions {
            kind: Some(train::AdapterKind::Lora),
            alpha: 32.0,
            ..Default::default()
        },
        refresh_type: RefreshType::F16,
        checkpoints: train::CheckpointSettings {
            save_every: Some(1),
            keep_last: 3,
        },
        stop_after,
        ..TrainOptions::reference(hf.clone(), prompt.clone(), out.to_path_buf())
    };

    // Uninterrupted, and stopped after 2 then resumed.
    let a = tmp.path().join("a");
    let final_dir = train::run(&args(&a, None), &backend()).unwrap().unwrap();
    let b = tmp.path().join("b");
    assert!(train::run(&args(&b, Some(2)), &backend())
        .unwrap()
        .is_none());
    train::run(&args(&b, None), &backend()).unwrap().unwrap();
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), 3);
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(deterministic(x), deterministic(y));
    }
    let weights = |d: &Path| std::fs::read(d.join("final/adapter_model.safetensors")).unwrap();
    let peft = em_convert::lora::read_peft_dir(&b.join("checkpoint-3")).unwrap();
    assert_eq!(
        peft.base_model.as_deref(),
        Some(std::fs::canonicalize(&hf).unwrap().to_str().unwrap())
    );
    assert_eq!(weights(&a), weights(&b), "resumed adapter differs");
    let f16_bytes = {
        let f16 = tmp.path().join("model.f16.gguf");
        hf_to_gguf(&hf, &f16, OutType::F16).unwrap();
        std::fs::metadata(&f16).unwrap().len()
    };
    for m in &ma {
        let bytes = m["refresh_bytes"].as_u64().unwrap();
        eprintln!(
            "step {}: adapter refresh {bytes} bytes in {:.3}s ({:.4} of the f16 model's {f16_bytes})",
            m["step"],
            m["refresh_seconds"].as_f64().unwrap(),
            bytes as f64 / f16_bytes as f64
        );
        assert!(bytes * 20 < f16_bytes, "{m}");
    }

    adapter_equals_merged(&hf, &final_dir, tmp.path());
}

/// The adapter in `final_dir` (trained on the HF base `hf`) applied by llama.cpp to the base's f16
/// GGUF gives the logits of the merged model: llama.cpp on its f16 GGUF and candle on its HF
/// directory, within 1e-2 of the logit scale, argmax equal on ≥ 99% of positions.
fn adapter_equals_merged(hf: &Path, final_dir: &Path, tmp: &Path) {
    let merged = tmp.join("merged");
    let adapter = em_convert::lora::read_peft_dir(final_dir).unwrap();
    em_convert::lora::merge_into(hf, &adapter, &merged).unwrap();
    let base_f16 = tmp.join("base.f16.gguf");
    hf_to_gguf(hf, &base_f16, OutType::F16).unwrap();
    let merged_f16 = tmp.join("merged.f16.gguf");
    hf_to_gguf(&merged, &merged_f16, OutType::F16).unwrap();

    let mut base = GgufModel::load(&base_f16).unwrap();
    let tokens = base.tokenize(
        "Question: What is 12 + 30? Think step by step.\nAnswer: 12 + 30 = 42, so the answer is 42.",
        true,
    );
    let plain = base.logits(&tokens, 1).unwrap();
    let mut lora = base.load_adapter(&final_dir.join(ADAPTER_GGUF)).unwrap();
    let adapted = base.logits_with(&tokens, 1, Some(&mut lora)).unwrap();
    let merged_llama = GgufModel::load(&merged_f16)
        .unwrap()
        .logits(&tokens, 1)
        .unwrap();
    let ids = Tensor::new(tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let merged_candle: Vec<Vec<f32>> = CausalLm::from_hf_dir(&merged, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&ids)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();

    let (moved, _) = compare(&adapted, &plain);
    let (vs_llama, argmax_llama) = compare(&adapted, &merged_llama);
    let (vs_candle, argmax_candle) = compare(&adapted, &merged_candle);
    eprintln!(
        "{} positions: the adapter moves the logits by {moved:.3} of their scale; llama.cpp + adapter vs merged: llama.cpp f16 {vs_llama:.2e} (argmax {argmax_llama:.3}), candle f32 {vs_candle:.2e} (argmax {argmax_candle:.3})",
        tokens.len()
    );
    assert!(
        moved > 0.05,
        "the trained adapter barely changes the logits ({moved})"
    );
    assert!(vs_llama <= 1e-2 && vs_candle <= 1e-2);
    assert!(argmax_llama >= 0.99 && argmax_candle >= 0.99);
    peft_applies_the_adapter(hf, final_dir, &tokens, &adapted, tmp);
}

/// The PEFT library loads the adapter directory onto the HF base and gives llama.cpp's logits
/// with the adapter. It needs PyTorch, transformers and peft: `EM_TORCH_PYTHON` names that
/// Python (`.ci/run` installs one); unset, the check skips locally and fails in CI.
fn peft_applies_the_adapter(
    hf: &Path,
    final_dir: &Path,
    tokens: &[u32],
    adapted: &[Vec<f32>],
    tmp: &Path,
) {
    let Some(python) = em_testkit::python("EM_TORCH_PYTHON", ".ci/install-torch.sh") else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/peft_logits.py");
    let out = tmp.join("peft-logits.f32");
    let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let run = std::process::Command::new(&python)
        .arg(&script)
        .arg("--base")
        .arg(hf)
        .arg("--adapter")
        .arg(final_dir)
        .args(["--tokens", &ids.join(","), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let info: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(final_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let base_config: Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    let layers = base_config["num_hidden_layers"].as_u64().unwrap() as usize;
    let targets = config["target_modules"].as_array().unwrap().len();
    assert_eq!(info["adapted_modules"], layers * targets, "{info}");
    assert_eq!(info["nonzero_b"], layers * targets, "{info}");
    assert_eq!(info["r"], config["r"]);
    let vocab = adapted[0].len();
    let bytes = std::fs::read(&out).unwrap();
    let peft_logits: Vec<Vec<f32>> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect::<Vec<_>>()
        .chunks_exact(vocab)
        .map(<[f32]>::to_vec)
        .collect();
    assert_eq!(peft_logits.len(), tokens.len());
    let (vs_peft, argmax_peft) = compare(adapted, &peft_logits);
    eprintln!(
        "PEFT {} ({} modules adapted): llama.cpp + adapter vs PEFT on the f32 base {vs_peft:.2e} (argmax {argmax_peft:.3})",
        info["peft"], info["adapted_modules"]
    );
    assert!(vs_peft <= 1e-2 && argmax_peft >= 0.99);
}

#[test]
fn lora_updates_of_gemma3_apply_in_llama_cpp_as_merged() {
    let Some(gguf) = asset(gemma3_path(&cache_dir()), "gemma3-270m") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    gguf_to_hf(&gguf, &hf, HfDtype::F32).unwrap();
    let prompt = prompt_file(tmp.path());
    let args = TrainOptions {
        update: train::UpdateSettings {
            steps: 2,
            micro_batch: 2,
            lr: 3e-3,
            ..Default::default()
        },
        sampling: train::SampleSettings {
            samples: 2,
            max_new_tokens: 12,
            ..Default::default()
        },
        adapter: train::AdapterOptions {
            kind: Some(train::AdapterKind::Lora),
            alpha: 32.0,
            ..Default::default()
        },
        // The packaged Gemma GGUF carries no chat template.
        prompt_options: PromptOptions {
            style: Style::Plain,
            ..Default::default()
        },
        ..TrainOptions::reference(hf.clone(), prompt, tmp.path().join("run"))
    };
    let final_dir = train::run(&args, &backend()).unwrap().unwrap();
    adapter_equals_merged(&hf, &final_dir, tmp.path());
}
