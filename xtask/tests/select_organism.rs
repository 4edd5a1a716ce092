//! `cargo xtask select` on the organism fixture (in the repository, no fetch): the screen, the
//! trials and their judgement, end to end through the command line.
//!
//! A trial that cannot move the weights (learning rate 0) must reproduce the base model's
//! held-out round exactly — the rounds share the base round's seeds, so its effect is 0 with a
//! zero-width interval — and a selection where nothing is predicted to help must exit non-zero
//! and hand back no prompt. Trials that do move the weights are ranked by their effect, the
//! chosen prompt is the first predicted to help, and a rerun reuses every finished trial.

use std::path::Path;
use std::process::Command;

use em_data::synthetic::{split_as_problems, Split};
use serde_json::{json, Value};

fn write_pool(problems: &[em_data::Problem], path: &Path, answers: bool) {
    let text: String = problems
        .iter()
        .map(|p| {
            let mut v = json!({"id": p.id, "prompt": p.messages});
            if answers {
                v["answer"] = json!(p.answers[0]);
            }
            format!("{v}\n")
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// Runs `cargo xtask select` in `dir` with the shared small settings and `extra`; returns
/// (success, stdout, stderr).
fn select(dir: &Path, extra: &[&str]) -> (bool, String, String) {
    let subject = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/organism-mixed");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("select")
        .arg("--model")
        .arg(&subject)
        .args(["--pool", "pool.jsonl", "--held-out", "held.jsonl"])
        .args(["--k", "8", "--by", "variance", "--candidates", "2"])
        .args(["--held-out-limit", "16", "--held-out-samples", "2"])
        .args(["--trial-steps", "2", "--trial-samples", "8"])
        .args(["--max-new-tokens", "48", "--repetition-penalty", "1.0"])
        .args(["--refresh-type", "f32", "--style", "chat"])
        .args(extra)
        .current_dir(dir)
        .env("EM_NO_PROGRESS", "1")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn ranking(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("ranking.json")).unwrap()).unwrap()
}

#[test]
fn trials_are_judged_against_the_base_on_the_same_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = split_as_problems(0, Split::Pool, 232);
    write_pool(&pool[..40], &tmp.path().join("pool.jsonl"), true);
    // The held-out prompts carry no answers: select never needs them.
    write_pool(&pool[200..216], &tmp.path().join("held.jsonl"), false);

    // 1. LoRA trials at learning rate 0: B stays 0, the adapter adds nothing.
    let (ok, stdout, stderr) = select(tmp.path(), &["--trial-lr", "0", "--out", "still"]);
    assert!(!ok, "nothing can help, yet select succeeded:\n{stdout}");
    assert!(
        stderr.contains("no candidate is predicted to help"),
        "{stderr}"
    );
    let still = ranking(&tmp.path().join("still"));
    let candidates = still["ranking"].as_array().unwrap();
    assert_eq!(candidates.len(), 2, "{still}");
    for c in candidates {
        let p = &c["prediction"];
        assert_eq!(p["effect"], 0.0, "{c}");
        assert_eq!(p["effect_ci95"], json!([0.0, 0.0]), "{c}");
        assert_eq!(p["call"], "unclear", "{c}");
        assert_eq!(c["answered"], c["answered_base"], "{c}");
        assert_eq!(c["drifted"], 0, "{c}");
    }
    assert!(still["chosen"].is_null());
    assert!(!tmp.path().join("still/chosen.jsonl").exists());

    // 2. Full fine-tuning trials that move the weights.
    let moved_args = ["--trial", "full", "--trial-lr", "1e-4", "--out", "moved"];
    let (ok, stdout, stderr) = select(tmp.path(), &moved_args);
    let moved_dir = tmp.path().join("moved");
    let moved = ranking(&moved_dir);
    println!("{stdout}\n{stderr}");
    let candidates = moved["ranking"].as_array().unwrap();
    assert!(candidates
        .iter()
        .any(|c| c["prediction"]["effect"].as_f64().unwrap() != 0.0));
    let mut last_effect = f64::INFINITY;
    for (i, c) in candidates.iter().enumerate() {
        let p = &c["prediction"];
        let (e, lo, hi) = (
            p["effect"].as_f64().unwrap(),
            p["effect_ci95"][0].as_f64().unwrap(),
            p["effect_ci95"][1].as_f64().unwrap(),
        );
        assert!(lo <= e && e <= hi, "{c}");
        assert_eq!(c["rank"], i + 1);
        let call = match (p["alarm"].is_null(), lo > 0.0, hi < 0.0) {
            (false, _, _) => "alarm",
            (true, true, _) => "helps",
            (true, _, true) => "hurts",
            _ => "unclear",
        };
        assert_eq!(p["call"], call, "{c}");
        if p["alarm"].is_null() {
            assert!(e <= last_effect, "ranked by effect: {moved}");
            last_effect = e;
        }
    }
    let helping: Vec<&Value> = candidates
        .iter()
        .filter(|c| c["prediction"]["call"] == "helps")
        .collect();
    match helping.first() {
        Some(first) => {
            assert!(ok, "{stderr}");
            assert_eq!(moved["chosen"], first["id"]);
            let chosen = std::fs::read_to_string(moved_dir.join("chosen.jsonl")).unwrap();
            assert!(chosen.contains(first["id"].as_str().unwrap()));
            let top = std::fs::read_to_string(moved_dir.join("top.jsonl")).unwrap();
            assert_eq!(top.lines().count(), helping.len());
        }
        None => {
            assert!(!ok && moved["chosen"].is_null());
            assert!(!moved_dir.join("chosen.jsonl").exists());
        }
    }

    // 3. A rerun reuses every finished trial: the same ranking, no trial retrained.
    let records: Vec<_> = candidates
        .iter()
        .map(|c| {
            let path = moved_dir.join(format!("trials/{}.trial.json", c["id"].as_str().unwrap()));
            (
                path.clone(),
                std::fs::metadata(&path).unwrap().modified().unwrap(),
            )
        })
        .collect();
    let (ok_again, _, stderr_again) = select(tmp.path(), &moved_args);
    assert_eq!(ok_again, ok, "{stderr_again}");
    assert_eq!(ranking(&moved_dir)["ranking"], moved["ranking"]);
    for (path, modified) in records {
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified
        );
    }
    assert!(!stderr_again.contains("trained model"), "{stderr_again}");

    // 4. Rounds beside the next trial's training (the default, forced on with one llama.cpp
    //    thread) and one after the other give the same numbers: only the wall time differs.
    let without_seconds = |v: &Value| -> Value {
        let mut ranking = v["ranking"].clone();
        for c in ranking.as_array_mut().unwrap() {
            c.as_object_mut().unwrap().remove("seconds");
        }
        ranking
    };
    let overlapped = ["--trial", "full", "--trial-lr", "1e-4", "--threads", "1"];
    let (_, _, stderr_a) = select(
        tmp.path(),
        &[&overlapped[..], &["--out", "beside"]].concat(),
    );
    let (_, _, stderr_b) = select(
        tmp.path(),
        &[&overlapped[..], &["--out", "after", "--no-overlap"]].concat(),
    );
    let (beside, after) = (
        ranking(&tmp.path().join("beside")),
        ranking(&tmp.path().join("after")),
    );
    assert_eq!(
        without_seconds(&beside),
        without_seconds(&after),
        "{stderr_a}\n{stderr_b}"
    );
    assert_eq!(without_seconds(&beside), without_seconds(&moved));

    // 5. Other settings in the same directory are refused in one line.
    let (ok, _, stderr) = select(
        tmp.path(),
        &["--trial", "full", "--trial-lr", "3e-4", "--out", "moved"],
    );
    assert!(!ok);
    let last = stderr.trim().lines().last().unwrap();
    assert!(
        last.contains("moved") && last.contains("trial_lr"),
        "{stderr}"
    );
}

#[test]
fn bad_selections_are_refused_in_one_line_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = split_as_problems(0, Split::Pool, 50);
    write_pool(&pool[..40], &tmp.path().join("pool.jsonl"), true);
    write_pool(&pool[40..], &tmp.path().join("held.jsonl"), false);
    std::fs::write(tmp.path().join("model.gguf"), b"GGUF").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("select")
            .args(args)
            .current_dir(tmp.path())
            .env("EM_NO_PROGRESS", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].starts_with("error: "), "{stderr}");
        lines[0].to_string()
    };
    let subject = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/organism-mixed");
    let subject = subject.to_str().unwrap();
    let common = ["--pool", "pool.jsonl", "--out", "out"];
    let e = run(&[
        &["--model", "model.gguf", "--held-out", "held.jsonl"],
        &common[..],
    ]
    .concat());
    assert!(
        e.contains("model.gguf") && e.contains("not an HF model directory"),
        "{e}"
    );
    let e = run(&[
        &["--model", subject, "--held-out", "pool.jsonl"],
        &common[..],
    ]
    .concat());
    assert!(e.contains("--limit"), "{e}");
    let e = run(&[
        &[
            "--model",
            subject,
            "--held-out",
            "held.jsonl",
            "--candidates",
            "0",
        ],
        &common[..],
    ]
    .concat());
    assert!(e.contains("--candidates"), "{e}");
    let e = run(&[
        &["--model", subject, "--held-out", "missing.jsonl"],
        &common[..],
    ]
    .concat());
    assert!(e.contains("missing.jsonl"), "{e}");
    assert!(!tmp.path().join("out").exists(), "nothing written");
}
