//! `cargo xtask demo --quick`: the whole loop (screen, EM-train, convert, evaluate, analyse) on both
//! model organisms, in reduced form.

use em_pipeline::demo::{self, DemoArgs};

#[test]
fn quick_demo_runs_end_to_end_on_both_subjects() {
    let tmp = tempfile::tempdir().unwrap();
    let root = em_tests::repo_root();
    let args = DemoArgs {
        out: tmp.path().to_path_buf(),
        seeds: 1,
        lrs: vec![1e-4],
        quick: true,
        subjects: vec![
            root.join("fixtures/organism-good"),
            root.join("fixtures/organism-bad"),
        ],
        data_seed: 0,
        fresh: false,
    };
    demo::run(&args, &xtask::backends::llama_default()).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("demo.json")).unwrap())
            .unwrap();
    let rows = report["rows"].as_array().unwrap();
    for subject in ["organism-good", "organism-bad"] {
        for (model, setting) in [
            ("base", "greedy"),
            ("base", "T=0.1"),
            ("base", "T=0.25"),
            ("tuned", "greedy"),
            ("tuned", "T=0.5"),
            ("tuned (q4_k_m)", "greedy"),
        ] {
            let row = rows
                .iter()
                .find(|r| r["subject"] == subject && r["model"] == model && r["setting"] == setting)
                .unwrap_or_else(|| panic!("no row {subject} {model} {setting}"));
            let acc = row["accuracy"].as_f64().unwrap();
            let (lo, hi) = (
                row["ci95"][0].as_f64().unwrap(),
                row["ci95"][1].as_f64().unwrap(),
            );
            assert!(
                lo <= acc + 1e-12 && acc <= hi + 1e-12,
                "{subject} {model} {setting}: {acc} outside [{lo}, {hi}]"
            );
            assert_eq!(row["n_items"], 48);
        }
    }
    // The good subject's greedy answers are mostly careful, the bad one's ramble: the subjects differ.
    let greedy_careful = |subject: &str| {
        rows.iter()
            .find(|r| r["subject"] == subject && r["model"] == "base" && r["setting"] == "greedy")
            .unwrap()["styles"][0]
            .as_f64()
            .unwrap()
    };
    assert!(greedy_careful("organism-good") > 0.5);
    assert!(greedy_careful("organism-bad") < 0.5);
    for plot in report["plots"].as_array().unwrap() {
        let path = plot.as_str().unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(
            svg.starts_with("<svg") || svg.contains("<svg"),
            "{path} is not an SVG"
        );
    }
    let notes = report["notes"].as_array().unwrap();
    assert!(notes
        .iter()
        .any(|n| n.as_str().unwrap().contains("majority right")));
}
