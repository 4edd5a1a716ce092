//! Where fetched assets live in the cache, and named benchmark suites.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::Result;

pub use em_store::cache_dir;

/// Where `fetch smollm2-135m` puts the SmolLM2 GGUF.
pub fn smollm2_path(cache: &Path) -> PathBuf {
    cache.join("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Where `fetch gemma3-270m` puts the Gemma-3 GGUF.
pub fn gemma3_path(cache: &Path) -> PathBuf {
    cache.join("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf")
}

/// Where `fetch math-data` puts the suites.
pub fn math_data_dir(cache: &Path) -> PathBuf {
    cache.join("data")
}

/// Where a named suite lives: the fetched cache first, then ../shared/data/bench; a path is itself.
pub fn suite_path(name: &str) -> Result<PathBuf> {
    let as_path = PathBuf::from(name);
    if as_path.is_file() {
        return Ok(as_path);
    }
    let cache = math_data_dir(&cache_dir());
    let (fetched, shared): (Option<&str>, Option<&str>) = match name {
        "math500" => (Some("math500/test.jsonl"), Some("math500.jsonl")),
        "gsm8k" => (Some("gsm8k/test.jsonl"), Some("gsm8k.jsonl")),
        "minerva" | "minerva_math" => (Some("minerva/test.jsonl"), Some("minerva_math.jsonl")),
        "math" => (Some("math/test.jsonl"), None),
        "svamp" => (Some("svamp/test.jsonl"), None),
        "mawps" => (Some("mawps/test.jsonl"), None),
        "asdiv" => (Some("asdiv/test.jsonl"), None),
        "olympiadbench" => (None, Some("olympiadbench.jsonl")),
        "amc23" => (None, Some("amc23.jsonl")),
        "aime24" => (None, Some("aime24.jsonl")),
        "aime25" => (None, Some("aime25.jsonl")),
        _ => bail!("{name}: not a file and not a known suite (math500, gsm8k, minerva, olympiadbench, amc23, aime24, aime25, math, svamp, mawps, asdiv)"),
    };
    let shared_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/bench");
    let candidates: Vec<PathBuf> = fetched
        .map(|f| cache.join(f))
        .into_iter()
        .chain(shared.map(|s| shared_root.join(s)))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "suite {name}: none of {candidates:?} exists; run `cargo xtask fetch math-data`"
            )
        })
}
