//! The README's journey on a real model, through the command line as a user types it, at small
//! sizes: fetch SmolLM2-135M → convert it to an HF directory and back to an f16 GGUF → screen the
//! bundled `dsr` pool → train full and LoRA on the chosen prompt with the safeguard watching →
//! select a prompt by short trials judged on held-out prompts (which may decline) →
//! eval the base, the adapter on its base against the base GGUF (the paired table), the fully
//! tuned model against the base HF directory, the merged adapter against the adapter's eval
//! folder → merge → analyze curves, fidelity and logits. Every command's exit status, outputs and
//! manifest are checked; each step's wall time is printed. Skips locally without the fetched
//! model; fails in CI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The journey's working directory and its running clock.
struct Journey {
    dir: PathBuf,
    started: Instant,
    steps: Vec<(String, f64)>,
}

impl Journey {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `cargo xtask <args>` in the journey's directory; it must succeed. Returns (stdout,
    /// stderr).
    fn run<S: AsRef<str>>(&mut self, args: &[S]) -> (String, String) {
        let (ok, stdout, stderr) = self.try_run(args);
        assert!(
            ok,
            "cargo xtask {}: failed\n{stdout}\n{stderr}",
            args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ")
        );
        (stdout, stderr)
    }

    /// Runs `cargo xtask <args>`, which may fail but never panics. Returns (success, stdout,
    /// stderr).
    fn try_run<S: AsRef<str>>(&mut self, args: &[S]) -> (bool, String, String) {
        let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
        let t0 = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(&args)
            .current_dir(&self.dir)
            .env("EM_NO_PROGRESS", "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(
            !stderr.contains("panicked") && !stdout.contains("panicked"),
            "{args:?}: {stderr}"
        );
        let secs = t0.elapsed().as_secs_f64();
        eprintln!("journey: {secs:6.1} s  cargo xtask {}", args.join(" "));
        self.steps.push((args[..2.min(args.len())].join(" "), secs));
        (out.status.success(), stdout, stderr)
    }
}

/// The manifest of `dir`: its kind, and the sha256 of its model.
fn manifest(dir: &Path, kind: &str) -> Value {
    let m = json(&dir.join("manifest.json"));
    assert_eq!(m["kind"], kind, "{}: {m}", dir.display());
    assert_eq!(
        m["model"]["sha256"].as_str().map(str::len),
        Some(64),
        "{}: {m}",
        dir.display()
    );
    m
}

/// An eval folder's summary: the settings it has, each over `n` items, and its comparisons.
fn eval_summary(dir: &Path, settings: &[&str], n: usize) -> Value {
    let summary = json(&dir.join("summary.json"));
    let have: Vec<&str> = summary["suites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["setting"].as_str().unwrap())
        .collect();
    assert_eq!(have, settings, "{}", dir.display());
    for s in summary["suites"].as_array().unwrap() {
        assert_eq!(s["n_items"], n, "{s}");
        let (lo, hi) = (
            s["ci95"][0].as_f64().unwrap(),
            s["ci95"][1].as_f64().unwrap(),
        );
        let acc = s["accuracy"].as_f64().unwrap();
        assert!(lo <= acc && acc <= hi && hi > lo, "{s}");
    }
    for setting in settings {
        let items = jsonl(&dir.join(format!("amc23.{setting}.jsonl")));
        assert_eq!(items.len(), n, "{}: {setting}", dir.display());
        for item in &items {
            let response = item["samples"][0]["response"].as_str().unwrap();
            assert!(
                response.chars().filter(char::is_ascii_alphabetic).count() > 10,
                "{}: not text: {item}",
                dir.display()
            );
        }
    }
    summary
}

/// A paired comparison over `n` items is in the summary and in the terminal's table.
fn paired(summary: &Value, stdout: &str, n: usize) {
    let comparisons = summary["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 1, "{summary}");
    let c = &comparisons[0];
    assert_eq!(c["n_items"], n, "{c}");
    assert_eq!(c["baseline_setting"], "baseline.greedy", "{c}");
    let p = c["mcnemar_p_same"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{c}");
    assert!(
        stdout.contains("| suite | n | model | baseline (same setting) | Δ (95% CI) | McNemar p"),
        "no paired table:\n{stdout}"
    );
}

#[test]
fn the_readme_journey_on_smollm2() {
    let cache = em_pipeline::assets::cache_dir();
    let Some(packaged) =
        em_testkit::fetched(em_pipeline::assets::smollm2_path(&cache), "smollm2-135m")
    else {
        return;
    };
    let packaged = packaged.to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap();
    let mut j = Journey {
        dir: tmp.path().to_path_buf(),
        started: Instant::now(),
        steps: vec![],
    };

    // fetch: already in the cache, so this checks it (sha256) and downloads nothing.
    j.run(&["fetch", "smollm2-135m"]);

    // convert: the packaged Q4_1 GGUF to a trainable HF directory, and that to an f16 GGUF.
    j.run(&["convert", &packaged, "-o", "hf"]);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(j.path("hf").join(f).is_file(), "hf/{f}");
    }
    let config = json(&j.path("hf/config.json"));
    assert_eq!(config["model_type"], "llama");
    j.run(&["convert", "hf", "-o", "base.gguf"]);
    let head = std::fs::read(j.path("base.gguf")).unwrap();
    assert_eq!(&head[..4], b"GGUF");
    drop(head);

    // screen: 4 prompts of the bundled pool, k = 4.
    j.run(&[
        "screen",
        "--model",
        "base.gguf",
        "--pool",
        "dsr",
        "--limit",
        "4",
        "--k",
        "4",
        "--max-new-tokens",
        "48",
        "--keep-responses",
        "--out",
        "screen",
    ]);
    let screened = jsonl(&j.path("screen/prompts.jsonl"));
    assert_eq!(screened.len(), 4);
    for r in &screened {
        assert_eq!(r["n"], 4, "{r}");
        assert_eq!(r["answers"].as_array().unwrap().len(), 4, "{r}");
        let (h, len) = (
            r["mean_entropy"].as_f64().unwrap(),
            r["mean_length"].as_f64().unwrap(),
        );
        assert!(
            h.is_finite() && h > 0.0 && (1.0..=48.0).contains(&len),
            "{r}"
        );
        let text = r["responses"][0].as_str().unwrap();
        assert!(
            text.chars().filter(char::is_ascii_alphabetic).count() > 20,
            "{text:?}"
        );
    }
    let ranking = json(&j.path("screen/ranking.json"));
    let ranked = ranking["ranking"].as_array().unwrap();
    assert_eq!(ranked.len(), 4);
    assert!(
        ranked
            .windows(2)
            .all(|w| w[0]["variance"].as_f64() >= w[1]["variance"].as_f64()),
        "not sorted by variance: {ranking}"
    );
    let chosen = json(&j.path("screen/chosen.jsonl"));
    assert_eq!(chosen["id"], ranking["chosen"]);
    assert!(chosen["prompt"].is_array(), "the pool's format: {chosen}");
    let screen_manifest = manifest(&j.path("screen"), "screen");
    let base_gguf_sha = screen_manifest["model"]["sha256"].clone();
    assert!(screen_manifest["inputs"]["pool"]["path"]
        .as_str()
        .unwrap()
        .ends_with("dsr_sub.jsonl"));

    // train: full, then LoRA, each with the safeguard watching 2 held-out pool prompts.
    let watch = [
        "--watch",
        "dsr",
        "--watch-limit",
        "2",
        "--watch-samples",
        "2",
    ];
    let train = |out: &str, steps: &str, extra: &[&str]| -> Vec<String> {
        [
            "train",
            "--model",
            "hf",
            "--prompt",
            "screen/chosen.jsonl",
            "--out",
            out,
            "--steps",
            steps,
            "--samples",
            "2",
            "--max-new-tokens",
            "16",
        ]
        .iter()
        .chain(&watch)
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let (_, full_err) = j.run(&train("full", "1", &[]));
    let (_, lora_err) = j.run(&train("lora", "2", &["--adapter", "lora", "--lr", "1e-3"]));
    for (out, steps, err) in [("full", 1, &full_err), ("lora", 2, &lora_err)] {
        let dir = j.path(out);
        let m = manifest(&dir, "train");
        assert_eq!(m["info"]["prompt_id"], chosen["id"], "{out}: {m}");
        assert!(m["inputs"]["watch"].is_object(), "{out}: {m}");
        assert!(
            err.contains("watch: step-0 reference") && err.contains("may fall by"),
            "{out}: the thresholds in words: {err}"
        );
        assert!(
            !err.contains("Thresholds {"),
            "{out}: a debug struct: {err}"
        );
        let metrics = jsonl(&dir.join("metrics.jsonl"));
        let updates: Vec<&Value> = metrics.iter().filter(|l| l.get("loss").is_some()).collect();
        assert_eq!(updates.len(), steps, "{out}: {metrics:?}");
        for u in &updates {
            let loss = u["loss"].as_f64().unwrap();
            assert!(loss.is_finite() && loss > 0.0, "{out}: {u}");
            assert_eq!(u["n_responses"], 2, "{out}: {u}");
        }
        let last = metrics.last().unwrap();
        assert_eq!(
            last["after_last_update"], true,
            "{out}: the safeguard's last round"
        );
        assert!(dir.join(format!("checkpoint-{steps}")).is_dir(), "{out}");
    }
    assert!(j.path("full/final/model.safetensors").is_file());
    for f in [
        "adapter.gguf",
        "adapter_config.json",
        "adapter_model.safetensors",
    ] {
        assert!(j.path("lora/final").join(f).is_file(), "lora/final/{f}");
    }

    // select: the label-free choice, on the same 4 prompts: the first 2 by variance each trained
    // for one LoRA update, judged on the 2 dsr prompts after the screened ones. It may decline
    // (no trial predicted to help): then it exits non-zero and hands back no prompt.
    let (chose, stdout, stderr) = j.try_run(&[
        "select",
        "--model",
        "hf",
        "--pool",
        "dsr",
        "--limit",
        "4",
        "--k",
        "4",
        "--by",
        "variance",
        "--candidates",
        "2",
        "--held-out",
        "dsr",
        "--held-out-limit",
        "2",
        "--held-out-samples",
        "2",
        "--trial-steps",
        "1",
        "--trial-samples",
        "2",
        "--max-new-tokens",
        "16",
        "--out",
        "select",
    ]);
    let selection = json(&j.path("select/ranking.json"));
    let tried = selection["ranking"].as_array().unwrap();
    assert_eq!(tried.len(), 2, "{selection}");
    for c in tried {
        let p = &c["prediction"];
        assert!(p["effect"].as_f64().unwrap().is_finite(), "{c}");
        assert!(["helps", "unclear", "hurts", "alarm"].contains(&p["call"].as_str().unwrap()));
    }
    assert_eq!(
        chose,
        j.path("select/chosen.jsonl").is_file(),
        "{stdout}\n{stderr}"
    );
    if !chose {
        assert!(
            stderr.contains("no candidate is predicted to help"),
            "{stderr}"
        );
    }
    assert!(stdout.contains("× one full run"), "{stdout}");
    manifest(&j.path("select"), "select");

    // eval: the base alone, the adapter on its base against the base GGUF (the command),
    // the full model against the base HF directory, the merged adapter against the adapter's
    // eval folder (reused, nothing sampled for the baseline).
    let suite = [
        "--suites",
        "amc23",
        "--limit",
        "4",
        "--max-new-tokens",
        "48",
    ];
    let eval = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["eval".into()];
        v.extend(args.iter().chain(&suite).map(|s| s.to_string()));
        v
    };
    let lows = [
        "model.greedy",
        "baseline.greedy",
        "baseline.t0.1-n1",
        "baseline.t0.25-n1",
    ];

    let a = eval(&["--model", "base.gguf", "--out", "ev-base"]);
    j.run(&a);
    eval_summary(&j.path("ev-base"), &["model.greedy"], 4);
    let m = manifest(&j.path("ev-base"), "eval");
    assert_eq!(m["model"]["sha256"], base_gguf_sha);
    let first = &jsonl(&j.path("ev-base/amc23.model.greedy.jsonl"))[0];
    assert!(
        first["prompt"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>user"),
        "the rendered prompt is recorded: {first}"
    );

    let a = eval(&[
        "--model",
        "base.gguf",
        "--adapter",
        "lora/final/adapter.gguf",
        "--baseline",
        "base.gguf",
        "--out",
        "ev-lora",
    ]);
    let (stdout, _) = j.run(&a);
    let summary = eval_summary(&j.path("ev-lora"), &lows, 4);
    paired(&summary, &stdout, 4);
    let m = manifest(&j.path("ev-lora"), "eval");
    assert!(
        m["model"]["path"]
            .as_str()
            .unwrap()
            .ends_with("adapter.gguf"),
        "{m}"
    );
    assert_eq!(
        m["settings"]["backend"]["adapter_base"]["sha256"],
        base_gguf_sha
    );
    assert_eq!(m["inputs"]["baseline"]["sha256"], base_gguf_sha);

    let a = eval(&[
        "--model",
        "full/final",
        "--baseline",
        "hf",
        "--out",
        "ev-full",
    ]);
    let (stdout, _) = j.run(&a);
    let summary = eval_summary(&j.path("ev-full"), &lows, 4);
    paired(&summary, &stdout, 4);
    let m = manifest(&j.path("ev-full"), "eval");
    assert_eq!(m["model"]["kind"], "hf-dir");
    assert_eq!(m["inputs"]["baseline"]["kind"], "hf-dir");

    j.run(&[
        "merge",
        "--base",
        "hf",
        "--adapter",
        "lora/final",
        "-o",
        "merged",
    ]);
    assert!(j.path("merged/model.safetensors").is_file());
    assert_eq!(json(&j.path("merged/config.json"))["model_type"], "llama");

    let a = eval(&[
        "--model",
        "merged",
        "--baseline",
        "ev-lora",
        "--out",
        "ev-merged",
    ]);
    let (stdout, _) = j.run(&a);
    let summary = eval_summary(
        &j.path("ev-merged"),
        &["model.greedy", "baseline.greedy"],
        4,
    );
    paired(&summary, &stdout, 4);
    assert!(stdout.contains("reused from ev-lora"), "{stdout}");
    let m = manifest(&j.path("ev-merged"), "eval");
    assert_eq!(m["settings"]["baseline_from"], "eval folder");
    // The folder's model was an adapter on the base: both are recorded.
    assert_eq!(m["inputs"]["baseline"]["sha256"], base_gguf_sha, "{m}");
    assert!(
        m["inputs"]["baseline_adapter"]["path"]
            .as_str()
            .unwrap()
            .ends_with("adapter.gguf"),
        "{m}"
    );
    // The reused baseline is the adapter's own results, item for item.
    assert_eq!(
        jsonl(&j.path("ev-merged/amc23.baseline.greedy.jsonl")),
        jsonl(&j.path("ev-lora/amc23.model.greedy.jsonl"))
    );

    // analyze: the LoRA run's curves, the full update against quantization error, and the
    // logit shift of the merged model on its own eval responses.
    j.run(&[
        "analyze",
        "curves",
        "--metrics",
        "lora/metrics.jsonl",
        "--out",
        "curves",
    ]);
    let svg = std::fs::read_to_string(j.path("curves/training_curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.len() > 1000, "{}", svg.len());
    let (stdout, _) = j.run(&[
        "analyze",
        "fidelity",
        "--base",
        "hf",
        "--tuned",
        "full/final",
        "--out",
        "fid",
    ]);
    let fidelity = json(&j.path("fid/fidelity.json"));
    assert_eq!(
        fidelity.as_array().unwrap().len(),
        272,
        "one row per tensor"
    );
    assert!(stdout.contains("tensors changed by EM"), "{stdout}");
    j.run(&[
        "analyze",
        "logits",
        "--base",
        "hf",
        "--tuned",
        "merged",
        "--pairs",
        "ev-merged/amc23.model.greedy.jsonl",
        "--limit",
        "4",
        "--out",
        "logits",
    ]);
    let shift = json(&j.path("logits/logit_shift.json"));
    let n = shift["n_positions"].as_u64().unwrap();
    assert!(n >= 4 * 40, "{shift}");
    assert_ne!(shift["base"]["mean"], shift["tuned"]["mean"], "{shift}");

    let total = j.started.elapsed().as_secs_f64();
    eprintln!("journey: {total:.1} s in all, {} commands", j.steps.len());
}
