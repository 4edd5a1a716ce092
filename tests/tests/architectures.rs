//! Every architecture against transformers itself. For Qwen2, Llama, Llama with `rope_type:
//! llama3`, Gemma-3, Qwen3 (tied and untied) and Mistral, `tests/python/tiny_arch.py` makes a tiny
//! random model *with transformers* (saved as transformers 5 writes it, and as its 4.x twin) and
//! computes its logits and EM-loss gradients. Then, for each:
//! - both layouts resolve to the same configuration;
//! - the EM loss is within 1e-4 (relative) and every gradient within 1e-3 (relative to the
//!   tensor's largest entry) of transformers';
//! - converted to an f32 GGUF, llama.cpp's logits are within 1e-3 of transformers' (relative to
//!   the logit scale) over 30 tokens, longer than Llama 3's original context (16) and the sliding
//!   windows (8) — except Mistral, which llama.cpp runs as llama without a window, so there only
//!   the first 8 positions are compared and the conversion says so;
//! - GGUF → HF gives a directory whose transformers logits are the original's;
//! - `train` runs 2 updates in full and 2 with `--adapter lora`, and PEFT applies the adapter to
//!   give the logits of the merged model.
//!
//! Skips locally without the PyTorch venv (`EM_TORCH_PYTHON`); fails in CI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use em_convert::{gguf_to_hf, hf_to_gguf, HfDtype, OutType};
use em_pipeline::prompt::{PromptOptions, Style};
use em_pipeline::train::{self, RefreshType, TrainOptions};
use em_train::models::{CausalLm, ModelConfig};
use em_train::{accumulate_em_gradients, EmOptions, Gradients, Sequence};
use xtask::backends::LlamaBackend;

const CASES: &[&str] = &[
    "qwen2",
    "llama",
    "llama3",
    "gemma3",
    "qwen3-tied",
    "qwen3-untied",
    "mistral",
];
const TAU: f64 = 0.7;
/// llama.cpp on an f32 GGUF, in f32 throughout (`GgufModel::reference_logits`): about 1e-6 of the logit
/// scale from transformers here, 1.3e-4 for Gemma-3 (ggml's GELU table).
const LLAMA_CPP_TOL: f32 = 1e-3;

fn python(py: &Path, args: &[String]) -> String {
    let script = em_testkit::repo_root().join("tests/python/tiny_arch.py");
    let out = Command::new(py).arg(&script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tiny_arch.py {args:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn sequences() -> Vec<Sequence> {
    vec![
        Sequence {
            prompt_ids: vec![1, 2, 3, 4, 5],
            response_ids: (10..30).collect(),
        },
        Sequence {
            prompt_ids: vec![7, 8, 9],
            response_ids: (30..38).collect(),
        },
    ]
}

fn logits_ids() -> Vec<u32> {
    (1..=30).collect()
}

/// The reference input: the sequences, τ and the logits sequence.
fn write_input(path: &Path) {
    let seqs: Vec<serde_json::Value> = sequences()
        .iter()
        .map(|s| serde_json::json!({"prompt_ids": s.prompt_ids, "response_ids": s.response_ids}))
        .collect();
    let input =
        serde_json::json!({"temperature": TAU, "sequences": seqs, "logits_ids": logits_ids()});
    std::fs::write(path, input.to_string()).unwrap();
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

/// max |a − b| over the first `n` rows, relative to the largest |b| there.
fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>], n: usize) -> f32 {
    let scale = b[..n]
        .iter()
        .flatten()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(1e-6);
    let diff = a[..n]
        .iter()
        .flatten()
        .zip(b[..n].iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn candle_logits(dir: &Path) -> Vec<Vec<f32>> {
    let model = CausalLm::from_hf_dir(dir, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(logits_ids().as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    rows(&model.forward(&ids).unwrap().squeeze(0).unwrap())
}

/// Loss and gradients of our EM objective against transformers'.
fn check_em_loss(case: &str, dir: &Path, reference: &HashMap<String, Tensor>) {
    let model = CausalLm::from_hf_dir(dir, DType::F32, &Device::Cpu).unwrap();
    let seqs = sequences();
    let n: usize = seqs.iter().map(|s| s.response_ids.len()).sum();
    let mut grads = Gradients::new(model.parameters());
    let options = EmOptions::new(TAU, 2, model.config().vocab_size);
    let stats = accumulate_em_gradients(&model, &seqs, &options, 1.0 / n as f64, &mut grads)
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let loss = stats.entropy_sum / n as f64;
    let want = reference["loss"].to_vec1::<f64>().unwrap()[0];
    assert!(
        ((loss - want) / want).abs() < 1e-4,
        "{case}: loss {loss} vs transformers {want}"
    );
    let mut compared = 0;
    for (name, want) in reference.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &name["grad.".len()..];
        let ours = grads
            .get(name)
            .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1e-12);
        let diff = (ours.to_dtype(DType::F32).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff / scale < 1e-3,
            "{case}: gradient of {name} differs by {diff} (scale {scale})"
        );
        compared += 1;
    }
    assert_eq!(
        compared,
        model.parameters().len(),
        "{case}: every parameter's gradient compared"
    );
}

fn train_twice(case: &str, hf: &Path, work: &Path) -> PathBuf {
    let prompt = work.join("prompt.jsonl");
    std::fs::write(
        &prompt,
        "{\"id\": \"t1\", \"problem\": \"What is 2 + 3?\", \"answer\": \"5\"}\n",
    )
    .unwrap();
    let backend = LlamaBackend::new(em_llama::EngineConfig {
        parallel: 2,
        ..Default::default()
    });
    let args = |out: PathBuf, lora: bool| TrainOptions {
        update: train::UpdateSettings {
            steps: 2,
            micro_batch: 2,
            lr: 1e-3,
            ..Default::default()
        },
        sampling: train::SampleSettings {
            samples: 2,
            max_new_tokens: 12,
            ..Default::default()
        },
        refresh_type: RefreshType::F32,
        prompt_options: PromptOptions {
            style: Style::Plain,
            ..Default::default()
        },
        adapter: train::AdapterOptions {
            kind: lora.then_some(train::AdapterKind::Lora),
            alpha: 16.0,
            ..Default::default()
        },
        ..TrainOptions::reference(hf.to_path_buf(), prompt.clone(), out)
    };
    for (name, lora) in [("full", false), ("lora", true)] {
        let out = work.join(name);
        let final_dir = train::run(&args(out.clone(), lora), &backend)
            .unwrap_or_else(|e| panic!("{case}: train {name}: {e:#}"))
            .expect("finished");
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 2, "{case} {name}: {metrics}");
        assert!(final_dir.is_dir());
    }
    work.join("lora/final")
}

#[test]
fn every_architecture_matches_transformers_through_training_conversion_and_peft() {
    let Some(py) = em_testkit::python("EM_TORCH_PYTHON", ".ci/install-torch.sh") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let tokenizer = em_testkit::repo_root().join("fixtures/tiny-qwen2");
    let input = root.join("input.json");
    write_input(&input);
    let s = |p: &Path| p.to_string_lossy().into_owned();

    // 1. The models, made by transformers, and their references (both layouts).
    let mut args: Vec<String> = vec!["make".into(), "--case".into()];
    args.extend(CASES.iter().map(|c| c.to_string()));
    args.extend([
        "--tokenizer".into(),
        s(&tokenizer),
        "--out".into(),
        s(&root.join("models")),
    ]);
    python(&py, &args);
    let dir = |case: &str, layout: &str| root.join("models").join(case).join(layout);
    let mut args = vec!["reference".into(), "--input".into(), s(&input)];
    for case in CASES {
        for layout in ["v5", "v4"] {
            args.push("--job".into());
            args.push(format!(
                "{}={}",
                s(&dir(case, layout)),
                s(&root.join(format!("{case}.{layout}.st")))
            ));
        }
    }
    python(&py, &args);

    // 2. Ours, case by case; the way back to transformers is gathered for one more call.
    let mut back = vec!["reference".to_string(), "--input".into(), s(&input)];
    let mut merged_dirs = vec![];
    for case in CASES {
        let (v5, v4) = (dir(case, "v5"), dir(case, "v4"));
        let work = root.join("work").join(case);
        std::fs::create_dir_all(&work).unwrap();
        let c5 = ModelConfig::from_file(&v5.join("config.json")).unwrap();
        let c4 = ModelConfig::from_file(&v4.join("config.json")).unwrap();
        assert_eq!(c5, c4, "{case}: the 4.x twin resolves to another model");
        let reference = load(&root.join(format!("{case}.v5.st")));
        let reference4 = load(&root.join(format!("{case}.v4.st")));
        let want = rows(&reference["logits"]);
        assert_eq!(
            want,
            rows(&reference4["logits"]),
            "{case}: v4 and v5 weights"
        );

        check_em_loss(case, &v5, &reference);
        check_em_loss(case, &v4, &reference);
        let ours = candle_logits(&v5);
        let d = rel_diff(&ours, &want, want.len());
        eprintln!("{case}: candle vs transformers: {d:.2e}");
        assert!(d < 1e-3, "{case}: candle logits differ by {d}");

        // llama.cpp on the f32 GGUF.
        let gguf = work.join("model.f32.gguf");
        let report =
            hf_to_gguf(&v5, &gguf, OutType::F32).unwrap_or_else(|e| panic!("{case}: {e:#}"));
        let compared = if *case == "mistral" {
            assert!(
                report
                    .notes
                    .iter()
                    .any(|n| n.contains("without the sliding window of 8")),
                "{case}: {:?}",
                report.notes
            );
            8
        } else {
            want.len()
        };
        let weights = em_llama::GgufModel::load(&gguf).unwrap();
        let llama = weights.reference_logits(&logits_ids(), 2).unwrap();
        let d = rel_diff(&llama, &want, compared);
        eprintln!("{case}: llama.cpp vs transformers over {compared} positions: {d:.2e}");
        assert!(d < LLAMA_CPP_TOL, "{case}: llama.cpp logits differ by {d}");
        if compared < want.len() {
            // What the note says: beyond the window llama.cpp attends to everything.
            let beyond = rel_diff(&llama, &want, want.len());
            assert!(
                beyond > LLAMA_CPP_TOL,
                "{case}: llama.cpp applied the window ({beyond})"
            );
        }

        // GGUF -> HF, read back by transformers below.
        let back_dir = work.join("back");
        gguf_to_hf(&gguf, &back_dir, HfDtype::F32).unwrap_or_else(|e| panic!("{case}: {e:#}"));
        let c_back = ModelConfig::from_file(&back_dir.join("config.json")).unwrap();
        assert_eq!(c_back.architecture, c5.architecture, "{case}");
        assert_eq!(c_back.rope, c5.rope, "{case}");
        assert_eq!(c_back.layer_windows, c5.layer_windows, "{case}");
        back.push("--job".into());
        back.push(format!("{}={}", s(&back_dir), s(&work.join("back.st"))));

        // Training, full and LoRA; the adapter through PEFT against the merged model.
        let adapter = train_twice(case, &v5, &work);
        let merged = work.join("merged");
        let peft = em_convert::lora::read_peft_dir(&adapter).unwrap();
        em_convert::lora::merge_into(&v5, &peft, &merged).unwrap();
        back.push("--job".into());
        back.push(format!(
            "{}+{}={}",
            s(&v5),
            s(&adapter),
            s(&work.join("peft.st"))
        ));
        merged_dirs.push((case, work.clone(), merged));
    }
    python(&py, &back);
    for (case, work, merged) in merged_dirs {
        let want = rows(&load(&root.join(format!("{case}.v5.st")))["logits"]);
        let got = rows(&load(&work.join("back.st"))["logits"]);
        let d = rel_diff(&got, &want, want.len());
        assert!(
            d < 1e-5,
            "{case}: GGUF -> HF -> transformers differs by {d}"
        );
        let peft = rows(&load(&work.join("peft.st"))["logits"]);
        let ours = candle_logits(&merged);
        let d = rel_diff(&ours, &peft, peft.len());
        assert!(
            d < 1e-3,
            "{case}: PEFT's adapter vs our merge differ by {d}"
        );
        let base = rows(&load(&root.join(format!("{case}.v5.st")))["logits"]);
        assert!(
            rel_diff(&peft, &base, base.len()) > 1e-4,
            "{case}: the trained adapter changes nothing"
        );
    }
}
