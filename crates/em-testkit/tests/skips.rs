//! Every test that can skip goes through `em_testkit`, so under `EM_REQUIRE_ASSETS` (CI) none can.
//!
//! This walks the workspace's Rust sources, lists the tests that can skip locally (each call of
//! `available`, `fetched`, `python`, or the `asset` re-export of `tests/`), and fails on any other
//! way to skip: a skip message printed elsewhere, or `EM_REQUIRE_ASSETS` read elsewhere. It also
//! fails on a source that names the team's folder beside the checkout, which a clone
//! elsewhere does not have.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && name != "corpus" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

const SKIP_CALLS: &[&str] = &[
    "em_testkit::available(",
    "em_testkit::fetched(",
    "em_testkit::python(",
    "asset(",
];

#[test]
fn every_skip_goes_through_the_testkit() {
    // Spelled in pieces so that this file does not name the folder itself.
    let team = ["sha", "red"].concat();
    let outside = [
        format!("../{team}"),
        format!("{team}/data"),
        format!("{team}/bench"),
    ];
    let root = em_testkit::repo_root();
    let mut files = Vec::new();
    for top in ["crates", "xtask", "tests"] {
        rust_files(&root.join(top), &mut files);
    }
    files.sort();
    let own = root.join("crates/em-testkit");
    let mut can_skip = Vec::new();
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let rel = file.strip_prefix(&root).unwrap().display().to_string();
        let lines: Vec<&str> = text.lines().collect();
        let mut current_fn = String::from("?");
        for (i, line) in lines.iter().enumerate() {
            let code = line.trim_start();
            if let Some(rest) = code
                .strip_prefix("fn ")
                .or_else(|| code.strip_prefix("pub fn "))
                .or_else(|| code.strip_prefix("async fn "))
            {
                current_fn = rest.split(['(', '<']).next().unwrap_or("?").to_string();
            }
            if code.starts_with("//") || file.starts_with(&own) {
                continue;
            }
            if SKIP_CALLS.iter().any(|c| code.contains(c)) && !code.contains("fn asset(") {
                can_skip.push(format!("{rel}: {current_fn}"));
            }
            let window = lines[i..(i + 3).min(lines.len())].join(" ");
            if (code.contains("println!(") || code.contains("eprintln!("))
                && (window.contains("SKIP") || window.to_lowercase().contains("skipped"))
            {
                wrong.push(format!("{rel}:{}: prints a skip of its own", i + 1));
            }
            if code.contains("\"EM_REQUIRE_ASSETS\"") {
                wrong.push(format!("{rel}:{}: reads EM_REQUIRE_ASSETS itself", i + 1));
            }
            if outside.iter().any(|o| code.contains(o.as_str())) {
                wrong.push(format!(
                    "{rel}:{}: names the team folder beside the checkout",
                    i + 1
                ));
            }
        }
    }
    can_skip.sort();
    can_skip.dedup();
    let in_ci = if em_testkit::assets_required() {
        0
    } else {
        can_skip.len()
    };
    println!(
        "{} places where a test can skip locally (each fails instead under EM_REQUIRE_ASSETS; \
         here {} can skip):",
        can_skip.len(),
        in_ci
    );
    for s in &can_skip {
        println!("  {s}");
    }
    assert!(
        wrong.is_empty(),
        "skips or paths outside em-testkit:\n{}",
        wrong.join("\n")
    );
    assert!(!can_skip.is_empty(), "the walk found the workspace's tests");
}
