//! k-shot EM through the command line on the organism fixture: `train --shots K` trains on the
//! first K prompts of the file, each update drawing `--samples / K` responses to each, and the
//! manifest records every prompt; `--prompt-id a,b` names them instead.

use std::path::Path;
use std::process::Command;

use em_data::synthetic::{split_as_problems, Split};
use serde_json::{json, Value};

fn train(dir: &Path, extra: &[&str]) -> (bool, String) {
    let subject = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/organism-mixed");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("train")
        .arg("--model")
        .arg(&subject)
        .args(["--prompt", "pool.jsonl", "--steps", "1"])
        .args(if extra.contains(&"--samples") {
            &[][..]
        } else {
            &["--samples", "8"][..]
        })
        .args(["--max-new-tokens", "48", "--repetition-penalty", "1.0"])
        .args(["--refresh-type", "f32", "--style", "chat", "--lr", "1e-5"])
        .args(extra)
        .current_dir(dir)
        .env("EM_NO_PROGRESS", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn k_shot_training_samples_each_prompt_and_records_them_all() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = split_as_problems(0, Split::Pool, 5);
    let text: String = pool
        .iter()
        .map(|p| {
            format!(
                "{}\n",
                json!({"id": p.id, "prompt": p.messages, "answer": p.answers[0]})
            )
        })
        .collect();
    std::fs::write(tmp.path().join("pool.jsonl"), text).unwrap();

    let (ok, stderr) = train(tmp.path(), &["--shots", "3", "--out", "three"]);
    assert!(ok, "{stderr}");
    let manifest = read(&tmp.path().join("three/manifest.json"));
    let ids: Vec<&str> = manifest["info"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [&pool[0].id, &pool[1].id, &pool[2].id]);
    assert_eq!(manifest["settings"]["shots"], 3);
    let metrics = std::fs::read_to_string(tmp.path().join("three/metrics.jsonl")).unwrap();
    let first: Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    // 8 responses over 3 prompts (3 + 3 + 2), graded each against its own prompt's answer.
    assert_eq!(first["n_responses"], 8, "{first}");
    assert!(first["pass_rate"].is_number(), "{first}");
    assert!(tmp.path().join("three/final/config.json").is_file());

    // Another number of shots is another run.
    let (ok, stderr) = train(tmp.path(), &["--shots", "2", "--out", "three"]);
    assert!(!ok && stderr.contains("shots"), "{stderr}");

    // Named prompts, in the order given.
    let named = format!("{},{}", pool[4].id, pool[1].id);
    let (ok, stderr) = train(tmp.path(), &["--prompt-id", &named, "--out", "named"]);
    assert!(ok, "{stderr}");
    let manifest = read(&tmp.path().join("named/manifest.json"));
    assert_eq!(manifest["info"]["prompts"][0]["id"], json!(pool[4].id));
    assert_eq!(manifest["info"]["prompts"][1]["id"], json!(pool[1].id));

    // Both ways at once, more shots than prompts, or more prompts than responses: one line each.
    for (args, says) in [
        (
            vec!["--shots", "2", "--prompt-id", "x"],
            "--shots and --prompt-id",
        ),
        (vec!["--shots", "6"], "fewer than --shots 6"),
        (
            vec!["--shots", "5", "--samples", "4"],
            "5 prompts but --samples 4",
        ),
    ] {
        let (ok, stderr) = train(tmp.path(), &[&args[..], &["--out", "bad"]].concat());
        assert!(!ok, "{args:?}");
        let last = stderr.trim().lines().last().unwrap();
        assert!(last.contains(says), "{args:?}: {stderr}");
    }
}
