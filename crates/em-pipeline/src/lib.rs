//! Screening, evaluation and the on-policy EM loop, written against the sampler seam.
//!
//! Architecture invariant: this crate knows no sampling backend. It draws samples through
//! [`Backend`] (llama.cpp in-process or an OpenAI-compatible fleet, picked by the caller), renders
//! every prompt through [`prompt::PromptRenderer`], stores every resumable result through
//! `em_store` (manifests that refuse another model, prompt or settings; JSONL that survives kills),
//! and trains through `em_train`.

pub mod assets;
mod backend;
pub mod drive;
pub mod eval;
pub mod fetch;
pub mod grade_file;
pub mod hf_vocab;
pub mod prompt;
pub mod safeguard;
pub mod screen;
pub mod select;
pub mod train;

pub use anyhow::{Error, Result};
pub use backend::{with_vocab, AdaptedBackend, Backend};

use std::path::{Path, PathBuf};

/// Name and version of the tool, recorded in every manifest.
pub const TOOL: &str = concat!("oneshot-em ", env!("CARGO_PKG_VERSION"));

/// A per-item seed: FNV-1a of the item id mixed with the run's seed, so sample i of every item
/// does not draw the same uniforms.
pub fn item_seed(seed: u64, id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The model file a backend samples from: a GGUF as given, or an HF directory converted once to
/// `out/model/model.<quant>.gguf` (the output's manifest ties that file to the directory's
/// identity). Backends that do not sample local weights get `model` unchanged.
pub fn sampling_model(
    backend: &dyn Backend,
    model: &Path,
    out: &Path,
    quant: em_convert::OutType,
) -> Result<PathBuf> {
    if !model.is_dir() || !backend.samples_local_gguf() {
        return Ok(model.to_path_buf());
    }
    let dir = out.join("model");
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
    let gguf = dir.join(format!(
        "model.{}.gguf",
        format!("{quant:?}").to_lowercase()
    ));
    if !gguf.exists() {
        em_convert::hf_to_gguf(model, &gguf, quant)?;
    }
    Ok(gguf)
}

/// Peak resident memory of this process so far, in MB (Linux; `None` elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
