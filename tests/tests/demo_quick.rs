//! `cargo xtask demo --quick`: the whole loop (screen, EM-train with the safeguard watching,
//! convert, evaluate, plot) on the mixed model organism, in reduced form; then again with a LoRA
//! adapter beside full fine-tuning, reusing the full runs.

use std::path::{Path, PathBuf};

use em_lab::demo::{self, DemoOptions};

#[test]
fn quick_demo_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let args = DemoOptions {
        out: tmp.path().to_path_buf(),
        seeds: 1,
        lrs: vec![1e-4],
        quick: true,
        subject: em_tests::repo_root().join("fixtures/organism-mixed"),
        data_seed: 0,
        fresh: false,
        adapter: Default::default(),
        lora_lrs: vec![1e-3],
        trial_study: false,
        trial_cost: false,
        study_prompts: 30,
        study_lrs: vec![3e-5],
        random_prompts: 0,
    };
    demo::run(&args, &xtask::backends::llama_default()).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("demo.json")).unwrap())
            .unwrap();
    let rows = report["rows"].as_array().unwrap();
    let find = |model: &str, setting: &str| {
        rows.iter()
            .find(|r| r["model"].as_str().unwrap().starts_with(model) && r["setting"] == setting)
            .unwrap_or_else(|| panic!("no row {model} {setting}"))
    };
    for (model, setting) in [
        ("base", "greedy"),
        ("base", "T=0.1"),
        ("base", "T=0.25"),
        ("base", "T=0.5 EM-INF"),
        ("tuned on", "greedy"),
        ("tuned on", "T=0.5"),
        ("safeguarded on", "greedy"),
    ] {
        let row = find(model, setting);
        assert_eq!(row["n_items"], 48);
        // The row's accuracy and interval, recomputed from the per-item results it came from.
        let file = items_file(&tmp.path().join("organism-mixed"), row);
        let (acc, lo, hi) = recompute(&file);
        eprintln!(
            "{} {setting}: {acc:.3} [{lo:.3}, {hi:.3}] from {}",
            row["model"],
            file.display()
        );
        for (what, got, want) in [
            ("accuracy", &row["accuracy"], acc),
            ("ci95 low", &row["ci95"][0], lo),
            ("ci95 high", &row["ci95"][1], hi),
        ] {
            let got = got.as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-6,
                "{model} {setting}: {what} {got}, but {} gives {want}",
                file.display()
            );
        }
    }
    // Tuned rows carry their paired difference from the base.
    let d = &find("tuned on", "greedy")["vs_base"];
    assert!(d[1].as_f64().unwrap() <= d[0].as_f64().unwrap());
    // Every run records what the safeguard did, and the plot shows its signals per update.
    let runs = report["runs"].as_array().unwrap();
    assert!(!runs.is_empty());
    let curve = &report["curves"][0]["curve"];
    assert_eq!(curve["accuracy"].as_array().unwrap().len(), 4);
    assert_eq!(curve["signals"].as_array().unwrap().len(), 4);
    let plots: Vec<&str> = report["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(plots.iter().any(|p| p.ends_with(".svg")));
    let png = plots.iter().find(|p| p.ends_with(".png")).expect("a PNG");
    assert!(std::fs::read(png).unwrap().starts_with(b"\x89PNG"));
    assert!(!report["verdict"].as_array().unwrap().is_empty());

    // The adapter beside full fine-tuning: its runs, rows and the paired comparison.
    let lora = DemoOptions {
        adapter: em_pipeline::train::AdapterOptions {
            kind: Some(em_pipeline::train::AdapterKind::Lora),
            ..Default::default()
        },
        ..args
    };
    demo::run(&lora, &xtask::backends::llama_default()).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("demo-lora.json")).unwrap())
            .unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert!(runs.iter().any(|r| r["training"] == "full"));
    assert!(runs.iter().any(|r| r["training"] == "LoRA r8 α8"));
    let comparison: Vec<&str> = report["comparison"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        comparison.iter().any(|l| l.contains("| greedy |")),
        "{comparison:?}"
    );
}

/// The per-item results behind a row of the quick demo (one seed) in the subject's directory `dir`:
/// the base model's under `test/`, a tuned or safeguarded model's in its run directory.
fn items_file(dir: &Path, row: &serde_json::Value) -> PathBuf {
    let (model, setting) = (
        row["model"].as_str().unwrap(),
        row["setting"].as_str().unwrap(),
    );
    if model == "base" {
        // "greedy", "T=0.1", "T=0.5 EM-INF" → base.greedy.jsonl, base.t0.1-n2.jsonl, base.t0.5-n2-eminf….jsonl
        let (decoding, em_inf) = match setting.strip_suffix(" EM-INF") {
            Some(d) => (d, true),
            None => (setting, false),
        };
        let prefix = match decoding.strip_prefix("T=") {
            Some(t) => format!("base.t{t}-n"),
            None => format!("base.{decoding}"),
        };
        let found: Vec<PathBuf> = std::fs::read_dir(dir.join("test"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with(&prefix)
                    && name.ends_with(".jsonl")
                    && name.contains("eminf") == em_inf
            })
            .collect();
        assert_eq!(found.len(), 1, "{model} {setting}: {found:?}");
        return found[0].clone();
    }
    // "tuned on majority-right/agreement (pool-7, lr 1e-4)" → majority-right/lr1e-4-seed0
    let (label, rest) = model.split_once(" on ").unwrap();
    let rule = rest.split([' ', '/']).next().unwrap();
    let lr = rest.rsplit_once("lr ").unwrap().1.trim_end_matches(')');
    let run = dir.join(rule).join(format!("lr{lr}-seed0"));
    let decoding = match setting.strip_prefix("T=") {
        Some(t) => format!("t{t}-n2"),
        None => setting.to_string(),
    };
    let guarded = run.join(format!("test-guarded/guarded.{decoding}.jsonl"));
    if label == "safeguarded" && guarded.exists() {
        return guarded;
    }
    // Without an alarm the safeguarded model is the tuned one, evaluated once.
    run.join(format!("test-tuned/tuned.{decoding}.jsonl"))
}

/// Accuracy and 95% interval of a per-item JSONL, each response graded again against its gold:
/// with one sample an item, the share correct and its Wilson interval; with several (avg@n),
/// the mean of the items' shares and the normal interval over items widened to the Wilson
/// interval of that mean.
fn recompute(file: &Path) -> (f64, f64, f64) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut scores = vec![];
    let mut samples_per_item = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let gold: Vec<String> = serde_json::from_value(v["gold"].clone()).unwrap();
        let samples = v["samples"].as_array().unwrap();
        samples_per_item = samples.len();
        let mut right = 0;
        for s in samples {
            let verdict = em_grade::grade(s["response"].as_str().unwrap(), &gold);
            assert_eq!(
                s["correct"].as_bool(),
                Some(verdict.correct),
                "{}: {}: the recorded verdict is not the response's",
                file.display(),
                v["id"]
            );
            right += verdict.correct as usize;
        }
        scores.push(right as f64 / samples.len() as f64);
    }
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let (wlo, whi) = wilson95(mean, scores.len());
    if samples_per_item == 1 {
        return (mean, wlo, whi);
    }
    let var = scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let half = Z95 * (var / n).sqrt();
    (
        mean,
        (mean - half).min(wlo).max(0.0),
        (mean + half).max(whi).min(1.0),
    )
}

const Z95: f64 = 1.959_963_984_540_054;

/// The 95% Wilson score interval of a proportion `p` over `n` items (Wilson 1927), written out
/// here rather than taken from em-grade: (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n).
fn wilson95(p: f64, n: usize) -> (f64, f64) {
    let (n, z) = (n as f64, Z95);
    let centre = p + z * z / (2.0 * n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    let denom = 1.0 + z * z / n;
    (
        ((centre - half) / denom).max(0.0),
        ((centre + half) / denom).min(1.0),
    )
}
