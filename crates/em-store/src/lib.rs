//! Outputs that survive a kill and know what produced them.
//!
//! - [`write_atomic`] and [`Staged`]: a reader never sees half a file or directory.
//! - [`JsonlStore`]: results appended one fsynced line at a time; reopening cuts a torn last line
//!   (a kill mid-write) and refuses a corrupt line anywhere else, naming the file and line.
//! - [`identity`]: content hashes of models (a GGUF, or an HF directory's config, tokenizer and
//!   weights) and of input files, streamed once and cached by path, size and mtime.
//! - [`crash_point`]: named moments a test can kill the process at (`EM_CRASH_AT`).
//! - [`Manifest`]: what an output directory holds (model, inputs, settings); a rerun that differs
//!   stops with one line naming what differs.
//!
//! Architecture invariant: knows nothing of models, samplers or training; plain files only.

mod atomic;
mod crash;
pub mod identity;
mod jsonl;
mod manifest;

pub use atomic::{remove_stale_staged, write_atomic, Staged};
pub use crash::{crash_point, crash_point_with};
pub use identity::{file_identity, model_identity, Identity};
pub use jsonl::JsonlStore;
pub use manifest::Manifest;

use std::path::{Path, PathBuf};

/// Why a store operation failed; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("{}:{line}: {message}", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    Mismatch { path: PathBuf, message: String },
}

impl StoreError {
    pub(crate) fn io(path: &Path, what: &str, e: impl std::fmt::Display) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            message: format!("{what}: {e}"),
        }
    }
}

/// The cache directory for fetched assets and hashes: `$EM_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/oneshot-em`, else `~/.cache/oneshot-em`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EM_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("oneshot-em")
}
