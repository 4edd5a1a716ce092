//! `cargo xtask prompt` shows what transformers' `apply_chat_template` produces, text and token ids,
//! for SmolLM2 and Gemma 3 (the HF directories `convert` makes from the fetched GGUFs; Gemma 3's base
//! GGUF has no template, so a Gemma-3-style `chat_template.jinja` is added, which also exercises that
//! source). The expected values were stored from transformers by `tests/reference/chat_template_ids.py`.
//! The GGUF itself renders the same ids as its HF directory, and `auto` gives SmolLM2 (a ChatML
//! model) the toolkit's `qwen25-math-cot` prompt, which its template renders identically.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xtask {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `(id, text, ids)` of each line of `xtask prompt --json`.
fn prompts(model: &Path, source: &[&str], style: &str) -> Vec<(String, String, Vec<u64>)> {
    let model = model.to_str().unwrap();
    let mut args = vec![
        "prompt", "--model", model, "--style", style, "--json", "--limit",
    ];
    args.push(if source[0] == "--suite" { "3" } else { "2" });
    args.extend_from_slice(source);
    xtask(&args)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let ids = v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            (
                v["id"].as_str().unwrap().into(),
                v["text"].as_str().unwrap().into(),
                ids,
            )
        })
        .collect()
}

fn expected(reference: &Value, name: &str) -> Vec<(String, String, Vec<u64>)> {
    reference["models"][name]
        .as_array()
        .unwrap_or_else(|| panic!("no {name} in the reference"))
        .iter()
        .map(|v| {
            let ids = v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            (
                v["id"].as_str().unwrap().into(),
                v["text"].as_str().unwrap().into(),
                ids,
            )
        })
        .collect()
}

#[test]
fn prompts_equal_transformers_apply_chat_template() {
    let smollm2 = em_pipeline::assets::cache_dir()
        .join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    let gemma3 =
        em_pipeline::assets::cache_dir().join("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf");
    let math500 = em_pipeline::assets::cache_dir().join("data/math500/test.jsonl");
    if !em_testkit::available(
        smollm2.is_file() && gemma3.is_file() && math500.is_file(),
        "the fetched SmolLM2, Gemma-3 and MATH500",
        "run `cargo xtask fetch all`",
    ) {
        return;
    }
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/reference/prompts_transformers.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (smollm2_dir, gemma3_dir) = (tmp.path().join("smollm2"), tmp.path().join("gemma3"));
    for (gguf, dir) in [(&smollm2, &smollm2_dir), (&gemma3, &gemma3_dir)] {
        xtask(&[
            "convert",
            gguf.to_str().unwrap(),
            "-o",
            dir.to_str().unwrap(),
            "--hf-dtype",
            "bf16",
        ]);
    }
    std::fs::copy(
        root().join("tests/data/gemma3-chat_template.jinja"),
        gemma3_dir.join("chat_template.jinja"),
    )
    .unwrap();
    let pool = "dsr";
    for (name, dir) in [("smollm2", &smollm2_dir), ("gemma3", &gemma3_dir)] {
        let suite = prompts(dir, &["--suite", "math500"], "chat");
        assert_eq!(
            suite,
            expected(&reference, &format!("{name}-suite")),
            "{name}: suite items"
        );
        let from_pool = prompts(dir, &["--pool", pool], "chat");
        assert_eq!(
            from_pool,
            expected(&reference, &format!("{name}-pool")),
            "{name}: pool prompts"
        );
        if name == "gemma3" {
            // The template writes <bos>; no second one is added.
            assert!(
                suite.iter().all(|(_, _, ids)| ids[0] == 2 && ids[1] != 2),
                "{suite:?}"
            );
        }
    }
    // The GGUF renders the ids of its HF directory; `auto` is the toolkit prompt for ChatML models.
    assert_eq!(
        prompts(&smollm2, &["--pool", pool], "chat"),
        prompts(&smollm2_dir, &["--pool", pool], "chat")
    );
    let auto = prompts(&smollm2_dir, &["--suite", "math500"], "auto");
    assert_eq!(auto, expected(&reference, "smollm2-suite"));
    assert!(auto[0].1.starts_with("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>user\n"));
    // A model without a template: an error naming the file, unless the style is plain.
    std::fs::remove_file(gemma3_dir.join("chat_template.jinja")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "prompt",
            "--model",
            gemma3_dir.to_str().unwrap(),
            "--suite",
            "math500",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("tokenizer_config.json: no `chat_template`"),
        "{stderr}"
    );
    let plain = prompts(&gemma3_dir, &["--suite", "math500"], "plain");
    assert!(
        plain[0].1.starts_with("Question: ") && plain[0].2[0] == 2,
        "plain gets the tokenizer's BOS"
    );
}
