//! `eval` against a baseline in each form a user has: a model file evaluated here, a finished eval
//! folder whose items are reused (refused, naming what differs, when its settings are not this
//! run's), and a LoRA adapter on its base with the base as the baseline (the adapter is not
//! applied to the baseline). On the tiny fixture, through the command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("EM_NO_PROGRESS", "1")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = xtask(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn error(args: &[&str]) -> String {
    let out = xtask(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    lines[0].to_string()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn baselines_as_model_folder_and_under_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let suite = tmp.path().join("sums.jsonl");
    let text: String = (0..6)
        .map(|i| {
            format!(
                "{{\"problem\": \"What is {i} + 3?\", \"answer\": \"{}\"}}\n",
                i + 3
            )
        })
        .collect();
    std::fs::write(&suite, text).unwrap();
    let suite = suite.to_string_lossy().into_owned();
    let fixture = root().join("fixtures/tiny-qwen2");
    let fixture = fixture.to_string_lossy().into_owned();
    let eval = |model: &str, out: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["eval", "--model", model, "--suites", &suite]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(
            ["--quant", "f32", "--threads", "1", "--out", out]
                .iter()
                .map(|s| s.to_string()),
        );
        v.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--max-new-tokens") {
            v.extend(["--max-new-tokens".to_string(), "16".to_string()]);
        }
        v
    };

    // The base, evaluated alone; then as a folder baseline of the same model: its items reused,
    // so the paired difference is exactly zero on every item.
    ok(&refs(&eval(&fixture, &t("base"), &[])));
    let base_accuracy = summary(&tmp.path().join("base"))["suites"][0]["accuracy"].clone();
    let printed = ok(&refs(&eval(
        &fixture,
        &t("again"),
        &["--baseline", &t("base")],
    )));
    assert!(
        printed.contains("per-item results reused from"),
        "{printed}"
    );
    let s = summary(&tmp.path().join("again"));
    let c = &s["comparisons"][0];
    assert_eq!(c["baseline_same_setting"], base_accuracy);
    assert_eq!(c["diff_same"][0].as_f64(), Some(0.0), "{c}");
    // The folder's items, copied so that the new folder holds every result it summarizes.
    let sorted_lines = |p: &str| {
        let mut lines: Vec<String> = std::fs::read_to_string(tmp.path().join(p))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(
        sorted_lines("again/sums.baseline.greedy.jsonl"),
        sorted_lines("base/sums.model.greedy.jsonl")
    );

    // A folder made with other settings, or without a suite, is refused before any work.
    let e = error(&refs(&eval(
        &fixture,
        &t("other"),
        &["--baseline", &t("base"), "--max-new-tokens", "15"],
    )));
    assert!(
        e.contains("cannot serve as the baseline: max_new_tokens: 16 there, 15 now"),
        "{e}"
    );
    assert!(!tmp.path().join("other/sums.model.greedy.jsonl").exists());

    // A LoRA adapter on the base GGUF, compared with that base: the baseline samples the base
    // alone (before the fix, llama.cpp was asked to load the base as an adapter).
    ok(&[
        "convert",
        &fixture,
        "-o",
        &t("base.gguf"),
        "--outtype",
        "f32",
    ]);
    std::fs::write(
        tmp.path().join("prompt.jsonl"),
        r#"{"id": "t1", "prompt": [{"role": "user", "content": "What is 12 + 30?"}], "answer": "42"}
"#,
    )
    .unwrap();
    ok(&[
        "train",
        "--model",
        &fixture,
        "--prompt",
        &t("prompt.jsonl"),
        "--adapter",
        "lora",
        "--steps",
        "1",
        "--samples",
        "2",
        "--micro-batch",
        "2",
        "--max-new-tokens",
        "8",
        "--lr",
        "1e-2",
        "--threads",
        "1",
        "--out",
        &t("lora"),
    ]);
    let adapter = t("lora/final/adapter.gguf");
    ok(&refs(&eval(
        &t("base.gguf"),
        &t("tuned"),
        &[
            "--adapter",
            &adapter,
            "--baseline",
            &t("base.gguf"),
            "--baseline-temperatures",
            "0",
        ],
    )));
    let s = summary(&tmp.path().join("tuned"));
    assert_eq!(s["comparisons"].as_array().unwrap().len(), 1, "{s}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("tuned/manifest.json")).unwrap(),
    )
    .unwrap();
    assert!(manifest["model"]["path"]
        .as_str()
        .unwrap()
        .ends_with("adapter.gguf"));
    assert!(manifest["inputs"]["baseline"]["path"]
        .as_str()
        .unwrap()
        .ends_with("base.gguf"));
    // The f32 base GGUF as baseline gives the fixture's own greedy answers.
    let base_items =
        std::fs::read_to_string(tmp.path().join("base/sums.model.greedy.jsonl")).unwrap();
    let tuned_baseline =
        std::fs::read_to_string(tmp.path().join("tuned/sums.baseline.greedy.jsonl")).unwrap();
    let responses = |text: &str| -> Vec<String> {
        let mut v: Vec<(String, String)> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["id"].as_str().unwrap().into(),
                    v["samples"][0]["response"].as_str().unwrap().into(),
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, r)| r).collect()
    };
    assert_eq!(responses(&base_items), responses(&tuned_baseline));

    // The adapter on the baseline side instead: the base against base + adapter, whose greedy
    // answers are the adapted model's above.
    ok(&refs(&eval(
        &t("base.gguf"),
        &t("reverse"),
        &[
            "--baseline",
            &t("base.gguf"),
            "--baseline-adapter",
            &adapter,
            "--baseline-temperatures",
            "0",
        ],
    )));
    let adapted_items =
        std::fs::read_to_string(tmp.path().join("tuned/sums.model.greedy.jsonl")).unwrap();
    let reverse_baseline =
        std::fs::read_to_string(tmp.path().join("reverse/sums.baseline.greedy.jsonl")).unwrap();
    assert_eq!(responses(&adapted_items), responses(&reverse_baseline));
    let reverse_model =
        std::fs::read_to_string(tmp.path().join("reverse/sums.model.greedy.jsonl")).unwrap();
    assert_eq!(responses(&base_items), responses(&reverse_model));

    // --adapter needs a base GGUF file.
    let e = error(&refs(&eval(&fixture, &t("bad"), &["--adapter", &adapter])));
    assert!(e.contains("needs its base to be a GGUF file"), "{e}");
    // A server backend cannot apply an adapter: one line, before any request is made (nothing
    // listens on the port).
    let e = error(&refs(&eval(
        &t("base.gguf"),
        &t("server"),
        &[
            "--adapter",
            &adapter,
            "--backend",
            "openai",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--served-model",
            "m",
        ],
    )));
    assert!(e.contains("cannot apply a LoRA adapter"), "{e}");
    assert!(
        !tmp.path().join("server").exists(),
        "no output before the refusal"
    );
}
