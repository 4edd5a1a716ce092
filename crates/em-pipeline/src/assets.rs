//! Where assets live: the models and suites `fetch` puts in the cache, and the names of the suites
//! and pools the project carries itself (`em-bundled`), written out to the cache on first use so
//! every consumer reads a plain file. Nothing resolves relative to the source tree the binary was
//! built from.

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

/// The suites `fetch math-data` provides: (name, file under [`math_data_dir`]).
pub const FETCHED_SUITES: &[(&str, &str)] = &[
    ("math500", "math500/test.jsonl"),
    ("gsm8k", "gsm8k/test.jsonl"),
    ("minerva", "minerva/test.jsonl"),
    ("math", "math/test.jsonl"),
    ("svamp", "svamp/test.jsonl"),
    ("mawps", "mawps/test.jsonl"),
    ("asdiv", "asdiv/test.jsonl"),
];

/// Every suite name `--suites` accepts, for messages.
pub fn suite_names() -> Vec<&'static str> {
    FETCHED_SUITES
        .iter()
        .map(|(n, _)| *n)
        .chain(em_bundled::names(em_bundled::Kind::Suite))
        .collect()
}

/// A suite by file path or name: a file is itself; a bundled suite (amc23, olympiadbench, aime24,
/// aime25) is written to the cache once; a fetched one (math500, gsm8k, minerva, …) must have been
/// fetched, and the error says by which command.
pub fn suite_path(name: &str) -> Result<PathBuf> {
    let as_path = PathBuf::from(name);
    if as_path.is_file() {
        return Ok(as_path);
    }
    let key = if name == "minerva_math" {
        "minerva"
    } else {
        name
    };
    if let Some(b) = em_bundled::suite(key) {
        return materialize(b);
    }
    let Some((_, file)) = FETCHED_SUITES.iter().find(|(n, _)| *n == key) else {
        bail!(
            "{name}: not a file and not a known suite ({})",
            suite_names().join(", ")
        );
    };
    let path = math_data_dir(&cache_dir()).join(file);
    if !path.is_file() {
        bail!(
            "suite {name}: {} is not there yet; `cargo xtask fetch math-data` provides it",
            path.display()
        );
    }
    Ok(path)
}

/// A prompt pool by file path or name (`dsr`, the 1209-problem DeepScaleR subset; `pi1`): a file
/// is itself, a name is the bundled pool, written to the cache once.
pub fn pool_path(pool: &Path) -> Result<PathBuf> {
    if pool.is_file() {
        return Ok(pool.to_path_buf());
    }
    let name = pool.to_string_lossy();
    match em_bundled::pool(&name) {
        Some(b) => materialize(b),
        None if pool.exists() => bail!("{}: not a file", pool.display()),
        None => bail!(
            "{}: no such file, and not a bundled pool ({})",
            pool.display(),
            em_bundled::names(em_bundled::Kind::Pool).join(", ")
        ),
    }
}

/// The bundled file's bytes as a file in the cache (`bundled/<its data/ path>`), written atomically
/// unless a file with the same bytes is already there.
fn materialize(b: &em_bundled::Bundled) -> Result<PathBuf> {
    let path = cache_dir().join("bundled").join(b.file);
    if std::fs::read(&path).is_ok_and(|bytes| bytes == b.bytes) {
        return Ok(path);
    }
    let dir = path.parent().expect("has a parent");
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    em_store::write_atomic(&path, b.bytes)?;
    Ok(path)
}
