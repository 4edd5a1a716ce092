//! `cargo xtask train` on the tiny qwen2 fixture: a few on-policy updates lower the entropy,
//! checkpoints are HF directories that convert to GGUF and load in llama.cpp with the logits candle
//! computes, and a run stopped after 2 steps and resumed to 3 equals an uninterrupted 3-step run;
//! another model, another prompt file or other settings into a run's directory are refused.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use em_convert::{hf_to_gguf, OutType};
use em_llama::GgufModel;
use em_pipeline::train::{self, RefreshType, TrainOptions};
use em_tests::tiny_qwen2;
use em_train::models::CausalLm;
use serde_json::Value;
use xtask::backends::LlamaBackend;

fn run(args: &TrainOptions) -> anyhow::Result<Option<PathBuf>> {
    let backend = LlamaBackend::new(em_llama::EngineConfig {
        threads: 1,
        parallel: 8,
        ..Default::default()
    });
    train::run(args, &backend)
}

fn args(prompt: &Path, out: &Path, stop_after: Option<usize>) -> TrainOptions {
    let mut o = TrainOptions::reference(tiny_qwen2(), prompt.to_path_buf(), out.to_path_buf());
    (o.update.steps, o.update.micro_batch, o.update.lr) = (3, 4, 1e-3);
    (o.sampling.samples, o.sampling.max_new_tokens) = (8, 32);
    o.refresh_type = RefreshType::F32;
    (o.checkpoints.save_every, o.checkpoints.keep_last) = (Some(1), 3);
    o.stop_after = stop_after;
    o
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fields of a metrics line that do not depend on timing.
fn deterministic(line: &Value) -> Value {
    let mut v = line.clone();
    let obj = v.as_object_mut().unwrap();
    // What a refresh writes depends on whether the process restarted (the first is whole).
    obj.retain(|k, _| {
        !k.contains("seconds")
            && !k.ends_with("per_s")
            && k != "peak_rss_mb"
            && !k.starts_with("refresh_bytes")
            && k != "refresh_tensors"
            && k != "written_bytes"
    });
    v
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn pool(dir: &Path) -> PathBuf {
    let p = dir.join("prompt.jsonl");
    std::fs::write(
        &p,
        r#"{"id": "t1", "prompt": [{"role": "user", "content": "What is 12 + 30? Let's think step by step."}], "answer": "42", "data_source": "test"}
"#,
    )
    .unwrap();
    p
}

#[test]
fn training_lowers_entropy_checkpoints_load_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = pool(tmp.path());

    // Uninterrupted: 3 steps.
    let a = tmp.path().join("a");
    run(&args(&prompt, &a, None)).unwrap();
    let ma = metrics(&a);
    assert_eq!(ma.len(), 3);
    let losses: Vec<f64> = ma.iter().map(|m| m["loss"].as_f64().unwrap()).collect();
    eprintln!("entropy per step: {losses:?}");
    assert!(
        losses[2] < losses[0] - 0.05,
        "entropy did not fall: {losses:?}"
    );
    for m in &ma {
        assert_eq!(m["n_responses"], 8);
        assert!(m["grad_norm"].as_f64().unwrap() > 0.0);
        assert!(m["pass_rate"].is_number() && m["peak_rss_mb"].is_number());
        let len = m["resp_len_mean"].as_f64().unwrap();
        assert!(len > 0.0 && len <= 32.0);
    }
    // Three checkpoints kept (--keep-last 3); the optimizer state only in the latest.
    for step in 1..=3 {
        assert!(a.join(format!("checkpoint-{step}/state.json")).is_file());
        assert_eq!(
            a.join(format!("checkpoint-{step}/optimizer/adamw.safetensors"))
                .is_file(),
            step == 3
        );
    }
    // The sampling GGUF is written whole once, then refreshed in place; nothing else is written
    // between checkpoints.
    let f32_gguf = tmp.path().join("fixture.f32.gguf");
    hf_to_gguf(&tiny_qwen2(), &f32_gguf, OutType::F32).unwrap();
    let file_size = std::fs::metadata(&f32_gguf).unwrap().len();
    for m in &ma {
        let refreshed = m["refresh_bytes"].as_u64().unwrap();
        let written = m["written_bytes"].as_u64().unwrap();
        assert!(refreshed <= file_size, "{m}");
        assert!(written >= refreshed && written <= refreshed + 65536, "{m}");
        assert_eq!(m["refresh_type"], "f32");
    }
    assert_eq!(ma[0]["refresh_bytes"].as_u64().unwrap(), file_size);
    assert_eq!(ma[2]["responses_seen"], 24);
    assert_eq!(weights(&a.join("final")), weights(&a.join("checkpoint-3")));

    // Stopped after 2 steps, then resumed to 3: the same numbers and the same weights.
    let b = tmp.path().join("b");
    run(&args(&prompt, &b, Some(2))).unwrap();
    assert_eq!(metrics(&b).len(), 2);
    assert!(!b.join("final").exists());
    // A line written after the last checkpoint (as a kill between the two would leave) is dropped.
    let mut lines = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    lines.push_str("{\"step\": 3, \"loss\": 99.0}\n");
    std::fs::write(b.join("metrics.jsonl"), lines).unwrap();
    run(&args(&prompt, &b, None)).unwrap();
    let mb = metrics(&b);
    assert_eq!(mb.len(), 3);
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(deterministic(x), deterministic(y));
    }
    assert_eq!(weights(&a.join("final")), weights(&b.join("final")));

    // Another prompt file, another model or other settings into a run's directory are refused.
    let refused = |a: TrainOptions| format!("{:#}", run(&a).unwrap_err());
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let mut other_prompt = std::fs::read_to_string(&prompt).unwrap();
    other_prompt = other_prompt.replace("12 + 30", "12 + 31");
    std::fs::write(other.join("prompt.jsonl"), other_prompt).unwrap();
    let e = refused(args(&other.join("prompt.jsonl"), &b, None));
    assert!(
        e.contains("manifest.json") && e.contains("prompt: file"),
        "{e}"
    );
    let mut o = args(&prompt, &b, None);
    o.update.lr = 2e-3;
    let e = refused(o);
    assert!(e.contains("settings.lr: 0.001 there, 0.002 now"), "{e}");
    let e = refused(TrainOptions {
        model: a.join("final"),
        ..args(&prompt, &b, None)
    });
    assert!(e.contains("model: hf-dir") && e.contains("--fresh"), "{e}");
    assert_eq!(metrics(&b).len(), 3, "a refusal must not touch the run");

    assert_eq!(
        std::fs::read(a.join("checkpoint-3/optimizer/adamw.safetensors")).unwrap(),
        std::fs::read(b.join("checkpoint-3/optimizer/adamw.safetensors")).unwrap()
    );

    // A checkpoint is an HF directory: candle loads it, it converts to GGUF, llama.cpp loads
    // that and computes the logits candle computes.
    let ckpt = a.join("checkpoint-3");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }
    let model = CausalLm::from_hf_dir(&ckpt, DType::F32, &Device::Cpu).unwrap();
    let gguf = tmp.path().join("ckpt.gguf");
    hf_to_gguf(&ckpt, &gguf, OutType::F32).unwrap();
    let llama = GgufModel::load(&gguf).unwrap();
    let ids = llama.tokenize("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n", false);
    let theirs = llama.logits(&ids, 1).unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ours = model
        .forward(&x)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let scale = ours.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .flatten()
        .zip(theirs.iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-3 * scale,
        "llama.cpp logits differ by {diff} (scale {scale})"
    );
}

#[test]
fn bad_inputs_give_one_line_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let err = |a: TrainOptions| format!("{:#}", run(&a).unwrap_err());

    let missing = tmp.path().join("nope.jsonl");
    let e = err(args(&missing, &out, None));
    assert!(e.contains("nope.jsonl"), "{e}");

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": 1, \"prompt\": \n").unwrap();
    let e = err(args(&bad, &out, None));
    assert!(e.contains("bad.jsonl") && !e.contains('\n'), "{e}");

    let prompt = pool(tmp.path());
    let mut a = args(&prompt, &out, None);
    a.prompt_id = Some("zzz".into());
    let e = err(a);
    assert!(
        e.ends_with("prompt.jsonl: no record with id \"zzz\""),
        "{e}"
    );

    // A model whose chat template cannot be read is an error naming the file, not a plain prompt.
    let no_template = tmp.path().join("no-template");
    std::fs::create_dir(&no_template).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny_qwen2().join(f), no_template.join(f)).unwrap();
    }
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(tiny_qwen2().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(
        no_template.join("tokenizer_config.json"),
        config.to_string(),
    )
    .unwrap();
    let e = err(TrainOptions {
        model: no_template,
        ..args(&prompt, &out, None)
    });
    assert!(
        e.contains("tokenizer_config.json: no `chat_template`"),
        "{e}"
    );

    let mut a = args(&prompt, &out, None);
    a.model = tmp.path().to_path_buf();
    let e = err(a);
    assert!(
        e.ends_with("config.json: missing (the model directory needs it)"),
        "{e}"
    );
}
