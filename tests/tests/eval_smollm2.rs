//! `eval` on the fetched SmolLM2-135M over a small GSM8K slice: the path works on a real model and
//! real data (the accuracy will be near zero; METHOD.md: neither packaged model solves GSM8K).

use em_convert::OutType;
use em_pipeline::assets::{cache_dir, smollm2_path};
use em_pipeline::eval::{self, EvalArgs};
use em_pipeline::prompt::PromptOptions;
use em_tests::asset;

#[test]
fn smollm2_gsm8k_slice_evaluates() {
    let Some(model) = asset(smollm2_path(&cache_dir()), "smollm2-135m") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let args = EvalArgs {
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
    let acc = suite["accuracy"].as_f64().unwrap();
    let (lo, hi) = (
        suite["ci95"][0].as_f64().unwrap(),
        suite["ci95"][1].as_f64().unwrap(),
    );
    assert!(lo <= acc && acc <= hi);
    let items = std::fs::read_to_string(tmp.path().join("gsm8k.model.greedy.jsonl")).unwrap();
    assert_eq!(items.lines().count(), 6);
    for line in items.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let response = v["samples"][0]["response"].as_str().unwrap();
        assert!(
            !response.trim().is_empty(),
            "empty response for {}",
            v["id"]
        );
    }
    assert!(tmp.path().join("summary.md").exists());
}
