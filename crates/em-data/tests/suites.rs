//! The suites `cargo xtask fetch math-data` lays out in the cache load with their item counts and
//! the golds read from the files by hand. The suites and pools the project carries are checked by
//! `em-bundled`'s tests. Absent, this skips locally and fails under `EM_REQUIRE_ASSETS` (CI).

#[test]
fn fetched_suites_load() {
    let root = em_testkit::cache_dir().join("data");
    if em_testkit::fetched(root.join("mmath/en.json"), "math-data").is_none() {
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
                .all(|p| !p.problem.trim().is_empty()
                    && p.answers.iter().all(|a| !a.trim().is_empty())),
            "{rel}"
        );
    }
    let first = |rel: &str| {
        em_data::load_suite(root.join(rel)).unwrap()[0]
            .answers
            .clone()
    };
    assert_eq!(
        first("minerva/test.jsonl"),
        ["1.6"],
        "the last \\boxed{{}} of the solution"
    );
    assert_eq!(first("gsm8k/test.jsonl"), ["18"], "the number after ####");
    for rel in [
        "math500/test.jsonl",
        "minerva/test.jsonl",
        "gsm8k/test.jsonl",
    ] {
        let ps = em_data::load_suite(root.join(rel)).unwrap();
        let ids: std::collections::BTreeSet<&str> = ps.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), ps.len(), "{rel}: ids are unique");
    }
}
