//! A small screen on the fetched SmolLM2-135M-Instruct (Q4_1): 10 prompts of the bundled `dsr`
//! pool, k = 4, 128 new tokens, the model's own chat template. Skips locally without the model;
//! fails in CI.

use em_pipeline::prompt::{PromptOptions, Style};
use em_pipeline::screen::{self, Rule, ScreenArgs};
use em_tests::asset;

#[test]
fn small_screen_on_smollm2() {
    let Some(model) = asset(
        em_pipeline::assets::smollm2_path(&em_pipeline::assets::cache_dir()),
        "smollm2-135m",
    ) else {
        return;
    };
    let pool = std::path::PathBuf::from("dsr");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("screen");
    let args = ScreenArgs {
        model,
        pool: pool.clone(),
        k: 4,
        out: out.clone(),
        limit: Some(10),
        max_new_tokens: 128,
        temperature: 0.5,
        top_p: 0.95,
        repetition_penalty: 1.15,
        seed: 15,
        prompt: PromptOptions {
            style: Style::Chat,
            ..Default::default()
        },
        rule: Rule::Variance,
        keep_responses: true,
        em_inf: None,
        quant: em_convert::OutType::F16,
        fresh: false,
        stop_after: None,
    };
    screen::run(&args, &xtask::backends::llama_default()).unwrap();

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("prompts.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    for r in &lines {
        assert_eq!(r["n"], 4);
        assert_eq!(r["answers"].as_array().unwrap().len(), 4);
        let (h, len) = (
            r["mean_entropy"].as_f64().unwrap(),
            r["mean_length"].as_f64().unwrap(),
        );
        assert!(
            h.is_finite() && h > 0.0 && (1.0..=128.0).contains(&len),
            "{r}"
        );
        // Real text from the instruct model, not gibberish bytes.
        let text = r["responses"][0].as_str().unwrap();
        assert!(
            text.chars().filter(|c| c.is_ascii_alphabetic()).count() > 20,
            "{text:?}"
        );
    }
    let ranking: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ranking.json")).unwrap()).unwrap();
    let ranked = ranking["ranking"].as_array().unwrap();
    assert_eq!(ranked.len(), 10);
    assert!(
        ranked
            .windows(2)
            .all(|w| w[0]["variance"].as_f64() >= w[1]["variance"].as_f64()),
        "not sorted by variance"
    );
    let chosen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("chosen.jsonl")).unwrap()).unwrap();
    assert_eq!(chosen["id"], ranking["chosen"]);
    assert!(
        chosen["prompt"].is_array(),
        "chosen.jsonl must keep the pool's format: {chosen}"
    );
}
