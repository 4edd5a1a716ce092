//! `cargo xtask demo --quick`: the whole loop (screen, EM-train with the safeguard watching,
//! convert, evaluate, plot) on the mixed model organism, in reduced form; then again with a LoRA
//! adapter beside full fine-tuning, reusing the full runs.

use em_pipeline::demo::{self, DemoArgs};

#[test]
fn quick_demo_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let args = DemoArgs {
        out: tmp.path().to_path_buf(),
        seeds: 1,
        lrs: vec![1e-4],
        quick: true,
        subject: em_tests::repo_root().join("fixtures/organism-mixed"),
        data_seed: 0,
        fresh: false,
        adapter: Default::default(),
        lora_lrs: vec![1e-3],
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
        let acc = row["accuracy"].as_f64().unwrap();
        let (lo, hi) = (
            row["ci95"][0].as_f64().unwrap(),
            row["ci95"][1].as_f64().unwrap(),
        );
        assert!(
            lo <= acc + 1e-12 && acc <= hi + 1e-12,
            "{model} {setting}: {acc} outside [{lo}, {hi}]"
        );
        assert_eq!(row["n_items"], 48);
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
    let lora = DemoArgs {
        adapter: em_pipeline::train::AdapterArgs {
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
