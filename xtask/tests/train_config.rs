//! `cargo xtask train --config run.toml` is the run its flags describe: the same manifest
//! identity, metrics and trained weights; the manifest records every resolved setting, and a
//! flag given next to the file overrides its key.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-qwen2")
}

fn train(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("train")
        .args(args)
        .args(["--threads", "1"])
        .env("EM_NO_PROGRESS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metrics without timings and sizes.
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| {
                !k.contains("seconds")
                    && !k.ends_with("per_s")
                    && !["peak_rss_mb", "written_bytes"].contains(&k.as_str())
            });
            v
        })
        .collect()
}

fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn a_run_file_reproduces_the_run_of_its_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tmp.path().join("prompt.jsonl");
    std::fs::write(
        &prompt,
        r#"{"id": "t1", "prompt": [{"role": "user", "content": "What is 12 + 30? Let's think step by step."}], "answer": "42", "data_source": "test"}
"#,
    )
    .unwrap();
    let (model, prompt_s) = (fixture(), prompt.to_str().unwrap().to_string());
    let model_s = model.to_str().unwrap();
    let by_flags = tmp.path().join("flags");
    train(&[
        "--model",
        model_s,
        "--prompt",
        &prompt_s,
        "--out",
        by_flags.to_str().unwrap(),
        "--steps",
        "2",
        "--samples",
        "4",
        "--micro-batch",
        "2",
        "--max-new-tokens",
        "16",
        "--lr",
        "1e-3",
        "--refresh-type",
        "f32",
        "--style",
        "plain",
    ]);
    let by_file = tmp.path().join("file");
    let run_toml = tmp.path().join("run.toml");
    std::fs::write(
        &run_toml,
        format!(
            "model = {model_s:?}\nprompt = {prompt_s:?}\nout = {:?}\nsteps = 2\nsamples = 4\n\
             micro_batch = 2\nmax_new_tokens = 16\nlr = 1e-3\nrefresh_type = \"f32\"\n\
             style = \"plain\"\n",
            by_file.to_str().unwrap()
        ),
    )
    .unwrap();
    train(&["--config", run_toml.to_str().unwrap()]);

    assert_eq!(metrics(&by_flags), metrics(&by_file));
    assert_eq!(metrics(&by_file).len(), 2);
    assert_eq!(
        std::fs::read(by_flags.join("final/model.safetensors")).unwrap(),
        std::fs::read(by_file.join("final/model.safetensors")).unwrap()
    );
    let (a, b) = (manifest(&by_flags), manifest(&by_file));
    assert_eq!(a["model"], b["model"]);
    assert_eq!(a["settings"], b["settings"]);
    // Every resolved setting is recorded, the defaults the file left out included.
    let settings = b["info"]["settings"].clone();
    assert_eq!(settings["lr"], 1e-3);
    assert_eq!(settings["samples"], 4);
    assert_eq!(settings["style"], "plain");
    assert_eq!(settings["top_p"], a["info"]["settings"]["top_p"]);
    assert_eq!(settings["weight_decay"], 0.01);
    assert_eq!(settings["adapter"], serde_json::Value::Null);
    // Where the run is written and how this invocation was told to go are not settings.
    assert!(settings.get("out").is_none() && settings.get("stop_after").is_none());
    assert_eq!(settings, a["info"]["settings"]);

    // A flag next to the file overrides its key; the manifest says so.
    let overridden = tmp.path().join("overridden");
    train(&[
        "--config",
        run_toml.to_str().unwrap(),
        "--lr",
        "2e-3",
        "--out",
        overridden.to_str().unwrap(),
        "--stop-after",
        "1",
    ]);
    let c = manifest(&overridden);
    assert_eq!(c["info"]["settings"]["lr"], 2e-3);
    assert_eq!(c["info"]["settings"]["samples"], 4);
    assert_ne!(metrics(&overridden)[0]["loss"], serde_json::Value::Null);
}
