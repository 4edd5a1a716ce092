//! `cargo xtask screen` on SmolLM2-135M with a token limit too small to finish: pool item dsr-4,
//! whose gold answer (2022) appears in its own question. Cut-off responses graded by their last
//! number would copy the question's 2022 back and count as right; the screen must record them as
//! unfinished, count none of them as right under any rule, and say in one line which limit to
//! raise. Skips locally without the fetched model; fails in CI.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs `cargo xtask screen` on `pool` under `rule`; returns (success, stdout, stderr).
fn screen(dir: &Path, model: &str, pool: &Path, rule: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["screen", "--model", model, "--pool"])
        .arg(pool)
        .args(["--k", "8", "--max-new-tokens", "40", "--seed", "3"])
        .args(["--rule", rule, "--keep-responses", "--out", rule])
        .current_dir(dir)
        .env("EM_NO_PROGRESS", "1")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn responses_cut_off_without_an_answer_are_right_for_no_rule() {
    let cache = em_pipeline::assets::cache_dir();
    let Some(model) =
        em_testkit::fetched(em_pipeline::assets::smollm2_path(&cache), "smollm2-135m")
    else {
        return;
    };
    let model = model.to_string_lossy().into_owned();
    let tmp = tempfile::tempdir().unwrap();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/pool/dsr_sub.jsonl");
    let line = std::fs::read_to_string(&bundled)
        .unwrap()
        .lines()
        .find(|l| l.contains("\"id\": \"dsr-4\""))
        .expect("dsr-4 in the bundled pool")
        .to_string();
    let item: Value = serde_json::from_str(&line).unwrap();
    let question = item["prompt"][0]["content"].as_str().unwrap();
    assert!(
        question.contains("2022") && item["answer"] == "2022",
        "dsr-4's gold answer appears in its question"
    );
    let pool = tmp.path().join("pool.jsonl");
    std::fs::write(&pool, format!("{line}\n")).unwrap();

    let (ok, stdout, stderr) = screen(tmp.path(), &model, &pool, "variance");
    assert!(ok, "variance screen failed:\n{stdout}\n{stderr}");
    assert!(
        stderr.contains("stopped at the token limit") && stderr.contains("raise --max-new-tokens"),
        "no warning about the token limit:\n{stderr}"
    );
    let text = std::fs::read_to_string(tmp.path().join("variance/prompts.jsonl")).unwrap();
    let r: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let responses = r["responses"].as_array().unwrap();
    let (mut unfinished, mut fallback_right) = (0, 0);
    for (i, response) in responses.iter().enumerate() {
        let response = response.as_str().unwrap();
        let cut_off = r["finish"][i] == "length" && !em_grade::states_final_answer(response);
        assert_eq!(r["unfinished_each"][i], cut_off, "sample {i}: {response:?}");
        if cut_off {
            unfinished += 1;
            assert_eq!(r["correct_each"][i], false, "sample {i}: {response:?}");
            assert!(r["answers"][i].is_null(), "sample {i}: {response:?}");
            // What the evaluation convention (last number) would have said.
            fallback_right += usize::from(em_grade::grade(response, &["2022".into()]).correct);
        }
    }
    assert!(unfinished > responses.len() / 2, "{r}");
    // On this machine 1 of the 8 cut-off responses ends on the question's "2022 terms" (samples
    // can differ with the CPU's kernels, so this is reported, not required).
    eprintln!("{fallback_right} cut-off responses would be right by their last number");
    let ranking: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("variance/ranking.json")).unwrap(),
    )
    .unwrap();
    let first = &ranking["ranking"][0];
    assert_eq!(
        first["unfinished"].as_f64().unwrap(),
        unfinished as f64 / responses.len() as f64
    );
    assert_eq!(first["correct"], r["correct"]);

    // The labelled rule that needs a right majority finds none: nothing cut off counts.
    if r["correct"].as_u64().unwrap() * 2 <= responses.len() as u64 {
        let (ok, _, stderr) = screen(tmp.path(), &model, &pool, "majority-right");
        assert!(!ok, "majority-right chose a prompt it cannot know is right");
        assert!(stderr.contains("no prompt qualifies"), "{stderr}");
    }
}
