//! `eval` on the fetched SmolLM2-135M over a small GSM8K slice: the path works on a real model and
//! real data (the accuracy will be near zero; METHOD.md: neither packaged model solves GSM8K).

use em_convert::OutType;
use em_pipeline::assets::{cache_dir, smollm2_path};
use em_pipeline::eval::{self, EvalOptions};
use em_pipeline::prompt::PromptOptions;
use em_tests::asset;

#[test]
fn smollm2_gsm8k_slice_evaluates() {
    let Some(model) = asset(smollm2_path(&cache_dir()), "smollm2-135m") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let args = EvalOptions {
        model,
        quant: OutType::F16,
        suites: vec!["gsm8k".into()],
        out: tmp.path().to_path_buf(),
        limit: Some(6),
        temperature: 0.0,
        n: 1,
        top_p: 0.95,
        max_new_tokens: 128,
        prompt: PromptOptions::default(),
        baseline: None,
        adapter: None,
        baseline_adapter: None,
        baseline_temperatures: vec![],
        seed: 0,
        em_inf: None,
        baseline_em_inf: None,
        fresh: false,
    };
    let backend = xtask::backends::LlamaBackend::new(em_llama::EngineConfig {
        parallel: 6,
        ..Default::default()
    });
    eval::run(&args, &backend).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("summary.json")).unwrap())
            .unwrap();
    let suite = &summary["suites"][0];
    assert_eq!(suite["n_items"], 6);
    let items = std::fs::read_to_string(tmp.path().join("gsm8k.model.greedy.jsonl")).unwrap();
    assert_eq!(items.lines().count(), 6);
    // The summary's accuracy and interval, recomputed from the per-item results: each response
    // graded again against its gold answers, counted, and the Wilson interval written out below.
    let mut correct = 0;
    for line in items.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let response = v["samples"][0]["response"].as_str().unwrap();
        assert!(
            !response.trim().is_empty(),
            "empty response for {}",
            v["id"]
        );
        let gold: Vec<String> = serde_json::from_value(v["gold"].clone()).unwrap();
        let verdict = em_grade::grade(response, &gold);
        assert_eq!(
            v["samples"][0]["correct"].as_bool(),
            Some(verdict.correct),
            "{}: the recorded verdict is not the response's",
            v["id"]
        );
        correct += verdict.correct as usize;
    }
    let acc = suite["accuracy"].as_f64().unwrap();
    assert!(
        (acc - correct as f64 / 6.0).abs() < 1e-9,
        "{acc} vs {correct}/6"
    );
    let (lo, hi) = wilson95(correct, 6);
    for (got, want) in [(&suite["ci95"][0], lo), (&suite["ci95"][1], hi)] {
        let got = got.as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-6,
            "ci95 {got} but {correct}/6 gives {want}"
        );
    }
    assert!(tmp.path().join("summary.md").exists());
}

/// The 95% Wilson score interval of `k` successes in `n` (Wilson 1927), written out here rather
/// than taken from em-grade: (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n).
fn wilson95(k: usize, n: usize) -> (f64, f64) {
    let (p, n, z) = (k as f64 / n as f64, n as f64, 1.959_963_984_540_054_f64);
    let centre = p + z * z / (2.0 * n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    let denom = 1.0 + z * z / n;
    (
        ((centre - half) / denom).max(0.0),
        ((centre + half) / denom).min(1.0),
    )
}

/// The formula above reproduces published intervals (Newcombe 1998, the score method's examples).
#[test]
fn wilson95_matches_published_intervals() {
    for (k, n, lo, hi) in [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ] {
        let (l, h) = wilson95(k, n);
        assert!(
            (l - lo).abs() < 5e-5 && (h - hi).abs() < 5e-5,
            "{k}/{n}: [{l:.4}, {h:.4}], published [{lo}, {hi}]"
        );
    }
}
