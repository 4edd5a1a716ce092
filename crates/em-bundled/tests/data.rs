//! The embedded bytes, their recorded sha256, `data/README.md`'s table and the item counts agree,
//! and every bundled file loads with the project's own loaders.

use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn bytes_match_their_sha256() {
    for b in em_bundled::ALL {
        assert_eq!(hex(b.bytes), b.sha256, "data/{}", b.file);
    }
}

#[test]
fn readme_table_lists_every_file_with_its_sha256() {
    let readme = include_str!("../../../data/README.md");
    for b in em_bundled::ALL {
        let row = readme
            .lines()
            .find(|l| l.starts_with('|') && l.contains(&format!("`{}`", b.file)))
            .unwrap_or_else(|| panic!("data/README.md has no row for `{}`", b.file));
        assert!(
            row.contains(b.sha256),
            "data/README.md's row for {} does not give sha256 {}",
            b.file,
            b.sha256
        );
        assert!(
            row.contains(&format!("| {} |", b.items)),
            "data/README.md's row for {} does not give {} items",
            b.file,
            b.items
        );
    }
}

#[test]
fn every_file_loads_with_its_item_count() {
    for b in em_bundled::ALL {
        let text = std::str::from_utf8(b.bytes).expect("utf-8");
        let path = std::path::Path::new(b.file_name());
        let problems = match b.kind {
            em_bundled::Kind::Pool => em_data::parse_pool(text, path),
            em_bundled::Kind::Suite => em_data::parse_suite(text, path),
        }
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(problems.len(), b.items, "{}", b.file);
        let ids: std::collections::BTreeSet<&str> =
            problems.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), b.items, "{}: ids are unique", b.file);
        for p in &problems {
            assert!(!p.problem.trim().is_empty(), "{} {}", b.file, p.id);
        }
    }
}

#[test]
fn names_resolve_by_kind() {
    assert_eq!(em_bundled::pool("dsr").unwrap().file, "pool/dsr_sub.jsonl");
    assert_eq!(em_bundled::pool("dsr_sub").unwrap().name, "dsr");
    assert!(em_bundled::suite("dsr").is_none());
    assert!(em_bundled::pool("amc23").is_none());
    assert_eq!(em_bundled::suite("olympiadbench").unwrap().items, 675);
    assert_eq!(em_bundled::names(em_bundled::Kind::Pool), ["dsr", "pi1"]);
}

fn load(name: &str) -> Vec<em_data::Problem> {
    let b = em_bundled::ALL.iter().find(|b| b.name == name).unwrap();
    let text = std::str::from_utf8(b.bytes).unwrap();
    let path = std::path::Path::new(b.file_name());
    match b.kind {
        em_bundled::Kind::Pool => em_data::parse_pool(text, path),
        em_bundled::Kind::Suite => em_data::parse_suite(text, path),
    }
    .unwrap()
}

/// Golds read from the source files by hand: a loader that took the wrong field would differ.
#[test]
fn known_golds() {
    let pool = load("dsr");
    assert!(pool.iter().all(|p| p.messages.is_some()));
    let without: Vec<&str> = pool
        .iter()
        .filter(|p| p.answers.is_empty())
        .map(|p| p.id.as_str())
        .collect();
    assert_eq!(
        without,
        ["dsr-265"],
        "the one item with an empty answer in the source"
    );
    assert_eq!(pool[0].answers, ["\\frac{3}{7}"]);
    assert_eq!(pool[124].answers, ["12.8"]);
    let pi1 = load("pi1");
    assert_eq!(
        (pi1[0].id.as_str(), pi1[0].answers.as_slice()),
        ("pi1", &["12.8".to_string()][..])
    );
    assert_eq!(pi1[0].messages, pool[124].messages, "π1 is dsr-124");
    assert!(pi1[0].problem.contains("\\boxed{}"));
    assert_eq!(load("amc23")[0].answers, ["27"]);
    let aime25 = load("aime25");
    assert_eq!(aime25[0].answers, ["70"]);
    for name in ["amc23", "olympiadbench", "aime24", "aime25"] {
        for p in load(name) {
            assert!(
                !p.answers.is_empty() && p.answers.iter().all(|a| !a.trim().is_empty()),
                "{name} {}",
                p.id
            );
            assert_eq!(p.source, name);
        }
    }
}
