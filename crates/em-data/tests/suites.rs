//! Every suite file of ../shared/data loads with the item count of its README and non-empty golds.

use std::path::PathBuf;

fn data_dir() -> Option<PathBuf> {
    let d = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"));
    if d.is_dir() {
        Some(d)
    } else {
        println!("SKIPPED: {} is absent", d.display());
        None
    }
}

#[test]
fn bench_suites_load() {
    let Some(dir) = data_dir() else { return };
    let want = [
        ("math500", 500),
        ("minerva_math", 272),
        ("olympiadbench", 675),
        ("amc23", 40),
        ("aime24", 30),
        ("aime25", 30),
        ("gsm8k", 1319),
    ];
    for (name, n) in want {
        let path = dir.join("bench").join(format!("{name}.jsonl"));
        let ps = em_data::load_suite(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ps.len(), n, "{name}");
        for p in &ps {
            assert!(!p.problem.trim().is_empty(), "{name} {}", p.id);
            assert!(
                !p.answers.is_empty() && p.answers.iter().all(|a| !a.trim().is_empty()),
                "{name} {}",
                p.id
            );
            assert_eq!(p.source, name);
        }
        let ids: std::collections::BTreeSet<&str> = ps.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), n, "{name}: ids are unique");
    }
    let m = em_data::load_suite(dir.join("bench/minerva_math.jsonl")).unwrap();
    assert_eq!(m[0].answers, ["1.6"]);
    let g = em_data::load_suite(dir.join("bench/gsm8k.jsonl")).unwrap();
    assert_eq!(g[0].answers, ["18"]);
    let a = em_data::load_suite(dir.join("bench/amc23.jsonl")).unwrap();
    assert_eq!(a[0].answers, ["27"]);
}

#[test]
fn pools_load() {
    let Some(dir) = data_dir() else { return };
    let pool = em_data::load_pool(dir.join("pool/dsr_sub.jsonl")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pool.len(), 1209);
    assert!(pool
        .iter()
        .all(|p| p.messages.is_some() && p.answers.iter().all(|a| !a.is_empty())));
    // one pool item (dsr-265) has an empty answer in the data
    let without: Vec<&str> = pool
        .iter()
        .filter(|p| p.answers.is_empty())
        .map(|p| p.id.as_str())
        .collect();
    assert_eq!(without, ["dsr-265"]);
    let pi1 = em_data::load_pool(dir.join("pool/pi1.jsonl")).unwrap();
    assert_eq!(pi1.len(), 1);
    assert_eq!(pi1[0].answers, ["12.8"]);
    assert_eq!(pi1[0].id, "pi1");
    assert!(pi1[0].problem.contains("\\boxed{}"));
}

/// The suites as `cargo xtask fetch math-data` lays them out in the cache ($EM_CACHE_DIR, else
/// $XDG_CACHE_HOME/oneshot-em, else ~/.cache/oneshot-em). Skips when absent, unless
/// EM_REQUIRE_ASSETS is set (as in CI).
#[test]
fn fetched_suites_load() {
    let cache = std::env::var_os("EM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("oneshot-em")
        });
    let root = cache.join("data");
    if !root.join("mmath/en.json").exists() {
        if std::env::var_os("EM_REQUIRE_ASSETS").is_some() {
            panic!(
                "{} is missing: run `cargo xtask fetch math-data`",
                root.display()
            );
        }
        println!(
            "SKIPPED: {} is missing; run `cargo xtask fetch math-data`",
            root.display()
        );
        return;
    }
    for (rel, n) in [
        ("gsm8k/test.jsonl", 1319),
        ("math/test.jsonl", 5000),
        ("math500/test.jsonl", 500),
        ("minerva/test.jsonl", 272),
        ("svamp/test.jsonl", 1000),
        ("mawps/test.jsonl", 2065),
        ("asdiv/test.jsonl", 2215),
        ("mmath/en.json", 374),
    ] {
        let ps = em_data::load_suite(root.join(rel)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ps.len(), n, "{rel}");
        assert!(
            ps.iter()
                .all(|p| p.answers.iter().all(|a| !a.trim().is_empty())),
            "{rel}"
        );
    }
}
