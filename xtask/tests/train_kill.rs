//! `cargo xtask train` killed with SIGKILL at several moments, checkpoint writes included, and
//! restarted each time, ends with the bit-identical weights, optimizer state and metrics of an
//! uninterrupted run, and leaves no half-written files behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-qwen2")
}

fn train(prompt: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(["train", "--model"])
        .arg(fixture())
        .arg("--prompt")
        .arg(prompt)
        .arg("--out")
        .arg(out)
        .args([
            "--steps",
            "4",
            "--samples",
            "8",
            "--micro-batch",
            "4",
            "--max-new-tokens",
            "32",
            "--lr",
            "1e-3",
            "--save-every",
            "1",
            "--keep-last",
            "2",
            "--refresh-type",
            "f32",
            "--threads",
            "1",
        ])
        .env("EM_NO_PROGRESS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// The metrics without timings and without what depends on restarts (a first refresh is whole).
fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| {
                !k.contains("seconds")
                    && !k.ends_with("per_s")
                    && ![
                        "peak_rss_mb",
                        "refresh_bytes",
                        "refresh_tensors",
                        "written_bytes",
                    ]
                    .contains(&k.as_str())
            });
            v
        })
        .collect()
}

fn staged_checkpoint(out: &Path) -> bool {
    std::fs::read_dir(out).is_ok_and(|d| {
        d.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(".checkpoint-") && n.contains(".tmp-")
        })
    })
}

#[test]
fn kill_9_at_any_moment_resumes_to_the_identical_result() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tmp.path().join("prompt.jsonl");
    std::fs::write(
        &prompt,
        r#"{"id": "t1", "prompt": [{"role": "user", "content": "What is 12 + 30? Let's think step by step."}], "answer": "42", "data_source": "test"}
"#,
    )
    .unwrap();
    let reference = tmp.path().join("reference");
    let t0 = Instant::now();
    assert!(train(&prompt, &reference).status().unwrap().success());
    let whole = t0.elapsed();

    // A kill inside a checkpoint write first, then kills at fixed moments.
    let out = tmp.path().join("killed");
    let mut in_checkpoint = false;
    for _ in 0..5 {
        let mut child = train(&prompt, &out).spawn().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60) {
            if staged_checkpoint(&out) {
                child.kill().unwrap();
                in_checkpoint = true;
                break;
            }
            std::thread::yield_now();
        }
        child.wait().unwrap();
        if in_checkpoint || out.join("final").exists() {
            break;
        }
    }
    // Then kills at fixed fractions of the uninterrupted run's time.
    let mut kills = 0;
    for fraction in [0.15, 0.35, 0.55, 0.75, 0.9] {
        let mut child = train(&prompt, &out).spawn().unwrap();
        std::thread::sleep(whole.mul_f64(fraction));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    eprintln!(
        "uninterrupted run {:.2}s; killed {kills} times at fixed moments, inside a checkpoint write: {in_checkpoint}",
        whole.as_secs_f64()
    );
    assert!(in_checkpoint, "no checkpoint write was caught");
    assert!(kills >= 2, "the run was too quick to interrupt");
    assert!(train(&prompt, &out).status().unwrap().success());

    let read = |dir: &Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    assert!(read(&reference, "final/model.safetensors") == read(&out, "final/model.safetensors"));
    let opt = "checkpoint-4/optimizer/adamw.safetensors";
    assert!(read(&reference, opt) == read(&out, opt));
    // The metrics agree too; floats to 1e-9 relative: at the last steps this fixture has collapsed
    // (entropy ~1e-11) and its gradient norm, ~1e-9, is rounding noise that differed in the 16th
    // digit between processes once (the weights and moments stay bit-identical).
    let (a, b) = (metrics(&reference), metrics(&out));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for (k, v) in x.as_object().unwrap() {
            let w = &y[k];
            match (v.as_f64(), w.as_f64()) {
                (Some(p), Some(q)) if v.is_f64() => {
                    assert!(
                        (p - q).abs() <= 1e-9 * p.abs().max(q.abs()),
                        "{k}: {p} vs {q}"
                    )
                }
                _ => assert_eq!(v, w, "{k}"),
            }
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "checkpoint-3",
            "checkpoint-4",
            "final",
            "manifest.json",
            "metrics.jsonl"
        ],
        "two checkpoints kept, nothing half-written left"
    );
    assert!(!out.join("checkpoint-3/optimizer").exists());
}
