//! An interrupted `cargo xtask eval`, rerun with the same command, ends with every item exactly once
//! and the same results as an uninterrupted run; a corrupt line in the middle of the results is an
//! error naming the file and line; another model, another suite file or other settings into the
//! same output are refused with one line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn eval_cmd(out: &Path) -> Command {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-qwen2");
    eval_cmd_with(out, &fixture, &arith(), "48")
}

/// A suite of 40 short sums (the fixture's context is 512 tokens), the same file for every call.
fn arith() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("em-eval-resume-{}", std::process::id()));
    let path = dir.join("arith.jsonl");
    let text: String = (0..40)
        .map(|i| {
            let (a, b) = (7 * i + 3, 11 * i % 17 + 2);
            format!(
                "{{\"problem\": \"What is {a} + {b}?\", \"answer\": \"{}\"}}\n",
                a + b
            )
        })
        .collect();
    std::fs::create_dir_all(&dir).unwrap();
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&path, text).unwrap();
    }
    path
}

fn eval_cmd_with(out: &Path, model: &Path, suite: &Path, max_new_tokens: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(["eval", "--model"])
        .arg(model)
        .args(["--quant", "f32", "--suites"])
        .arg(suite)
        .args([
            "--limit",
            "40",
            "--max-new-tokens",
            max_new_tokens,
            "--parallel",
            "4",
            "--threads",
            "1",
            "--out",
        ])
        .arg(out)
        .env("EM_NO_PROGRESS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn ids_and_responses(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                v["samples"][0]["response"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn killed_eval_resumes_with_every_item_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (killed, clean) = (tmp.path().join("killed"), tmp.path().join("clean"));
    let items = killed.join("arith.model.greedy.jsonl");

    let mut child = eval_cmd(&killed).spawn().unwrap();
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(&items)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("eval ended ({status}) before it could be interrupted");
        }
        // A hang guard: the first items come in seconds.
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "eval wrote fewer than 3 items in 15 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = ids_and_responses(&items).len();
    assert!(before < 40, "the run finished before it was killed");
    // A write torn by the kill.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&items)
        .and_then(|mut f| {
            use std::io::Write;
            f.write_all(b"{\"id\":\"arith-9")
        })
        .unwrap();

    let out = eval_cmd(&killed).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed = ids_and_responses(&items);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &resumed {
        *counts.entry(id).or_default() += 1;
    }
    assert_eq!(resumed.len(), 40, "items after resume");
    assert!(
        counts.values().all(|&c| c == 1),
        "an item was evaluated twice"
    );

    let out = eval_cmd(&clean).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut a = resumed.clone();
    let mut b = ids_and_responses(&clean.join("arith.model.greedy.jsonl"));
    a.sort();
    b.sort();
    assert_eq!(a, b, "resumed results differ from an uninterrupted run");

    // A corrupt line in the middle is an error naming the file and the line; nothing is rewritten.
    let clean_items = clean.join("arith.model.greedy.jsonl");
    let good = std::fs::read_to_string(&clean_items).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines[5] = "{\"id\": \"arith-5\", \"gold\": [";
    std::fs::write(&clean_items, lines.join("\n") + "\n").unwrap();
    let e = one_line_error(eval_cmd(&clean));
    assert!(
        e.contains("arith.model.greedy.jsonl:6: not a valid record"),
        "{e}"
    );
    std::fs::write(&clean_items, &good).unwrap();

    // Another model, another suite file, other settings: refused, naming what differs.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (fixture, bundled) = (root.join("../fixtures/tiny-qwen2"), arith());
    let organism = root.join("../fixtures/organism-good");
    let e = one_line_error(eval_cmd_with(&clean, &organism, &bundled, "48"));
    assert!(
        e.contains("manifest.json") && e.contains("model: hf-dir") && e.contains("--fresh"),
        "{e}"
    );
    let e = one_line_error(eval_cmd_with(&clean, &fixture, &bundled, "47"));
    assert!(
        e.contains("settings.max_new_tokens: 48 there, 47 now"),
        "{e}"
    );
    let suite = tmp.path().join("arith.jsonl");
    let text = std::fs::read_to_string(arith()).unwrap();
    std::fs::write(&suite, text.replacen("What", "Find", 1)).unwrap();
    let e = one_line_error(eval_cmd_with(&clean, &fixture, &suite, "48"));
    assert!(e.contains("suite:arith: file"), "{e}");
    assert_eq!(std::fs::read_to_string(&clean_items).unwrap(), good);
}

/// Runs a command that must fail and returns its one-line error.
fn one_line_error(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the command succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: "), "{stderr}");
    last
}
