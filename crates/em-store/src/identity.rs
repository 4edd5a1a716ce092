//! Content hashes: what a model or input file *is*, whatever its name.
//!
//! A GGUF is the sha256 of its bytes. An HF directory is the sha256 of a listing of its
//! `config.json`, tokenizer files, chat template and every top-level `*.safetensors` (name and
//! sha256 of each, sorted), so a renamed copy has the same identity and a changed weight does not.
//! Each file's hash is streamed once and cached in `cache_dir()/identity-cache.jsonl` by
//! canonical path, size, mtime and inode.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::StoreError;

/// What a model or file is: its kind and content hash (the path is only for messages).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Identity {
    /// `gguf`, `hf-dir` or `file`.
    pub kind: String,
    /// Hex sha256 of the content (see the module documentation for directories).
    pub sha256: String,
    /// Total bytes hashed.
    pub bytes: u64,
    /// Where it was read from when recorded (not compared).
    pub path: String,
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.sha256 == other.sha256
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (sha256 {})",
            self.kind,
            self.path,
            &self.sha256[..12.min(self.sha256.len())]
        )
    }
}

/// The files of an HF directory that define the model.
const HF_DEFINING: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// The identity of a model: a GGUF file or an HF directory.
pub fn model_identity(path: &Path) -> Result<Identity, StoreError> {
    if path.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| StoreError::io(path, "cannot list", e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors") || HF_DEFINING.contains(&n.as_str()))
            .collect();
        names.sort();
        if !names.iter().any(|n| n == "config.json") {
            return Err(StoreError::io(
                path,
                "not a model",
                "an HF directory needs config.json",
            ));
        }
        let (mut listing, mut bytes) = (String::new(), 0);
        for name in &names {
            let (sha, n) = cached_file_sha256(&path.join(name))?;
            listing.push_str(&format!("{name}\t{sha}\n"));
            bytes += n;
        }
        Ok(Identity {
            kind: "hf-dir".into(),
            sha256: hex(&Sha256::digest(listing.as_bytes())),
            bytes,
            path: path.display().to_string(),
        })
    } else {
        let mut id = file_identity(path)?;
        id.kind = "gguf".into();
        Ok(id)
    }
}

/// The identity of one file (a prompt, a pool, a suite).
pub fn file_identity(path: &Path) -> Result<Identity, StoreError> {
    let (sha256, bytes) = cached_file_sha256(path)?;
    Ok(Identity {
        kind: "file".into(),
        sha256,
        bytes,
        path: path.display().to_string(),
    })
}

#[derive(Serialize, Deserialize)]
struct CacheLine {
    path: String,
    size: u64,
    mtime_ns: i128,
    inode: u64,
    sha256: String,
}

fn stamp(path: &Path) -> Result<(PathBuf, u64, i128, u64), StoreError> {
    let meta = std::fs::metadata(path).map_err(|e| StoreError::io(path, "cannot read", e))?;
    if !meta.is_file() {
        return Err(StoreError::io(path, "cannot hash", "not a file"));
    }
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Ok((canonical, meta.len(), mtime_ns, inode))
}

/// sha256 and size of `path`, from the cache when its path, size, mtime and inode match.
fn cached_file_sha256(path: &Path) -> Result<(String, u64), StoreError> {
    let (canonical, size, mtime_ns, inode) = stamp(path)?;
    let key = canonical.display().to_string();
    let cache = crate::cache_dir().join("identity-cache.jsonl");
    // File times are coarse (milliseconds): a file changed in the last seconds could share its
    // stamp with an earlier content, so it is hashed afresh and not cached (git's "racy" rule).
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let racy = now_ns - mtime_ns < 3_000_000_000;
    if racy {
        return Ok((stream_sha256(path)?, size));
    }
    if let Ok(text) = std::fs::read_to_string(&cache) {
        // Later lines win; unreadable lines (a concurrent writer's torn line) are skipped.
        let hit = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<CacheLine>(l).ok())
            .find(|c| {
                c.path == key && c.size == size && c.mtime_ns == mtime_ns && c.inode == inode
            });
        if let Some(hit) = hit {
            return Ok((hit.sha256, size));
        }
    }
    let sha256 = stream_sha256(path)?;
    let line = CacheLine {
        path: key,
        size,
        mtime_ns,
        inode,
        sha256: sha256.clone(),
    };
    // The cache is an optimisation: failing to write it is not an error.
    if std::fs::create_dir_all(crate::cache_dir()).is_ok() {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&cache) {
            let _ = f.write_all(
                format!("{}\n", serde_json::to_string(&line).unwrap_or_default()).as_bytes(),
            );
        }
    }
    Ok((sha256, size))
}

/// sha256 of a file's bytes, streamed.
pub fn stream_sha256(path: &Path) -> Result<String, StoreError> {
    let mut file = File::open(path).map_err(|e| StoreError::io(path, "cannot read", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| StoreError::io(path, "cannot read", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_their_content_not_their_name() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("config.json"), "{}").unwrap();
        std::fs::write(a.join("model.safetensors"), "weights").unwrap();
        std::fs::write(a.join("notes.txt"), "ignored").unwrap();
        let b = root.path().join("b");
        std::fs::create_dir(&b).unwrap();
        std::fs::write(b.join("config.json"), "{}").unwrap();
        std::fs::write(b.join("model.safetensors"), "weights").unwrap();
        let (ia, ib) = (model_identity(&a).unwrap(), model_identity(&b).unwrap());
        assert_eq!(ia, ib);
        assert_eq!(ia.kind, "hf-dir");
        std::fs::write(b.join("model.safetensors"), "weightz").unwrap();
        assert_ne!(ia, model_identity(&b).unwrap());
        let f = root.path().join("m.gguf");
        std::fs::write(&f, "GGUF").unwrap();
        let g = model_identity(&f).unwrap();
        assert_eq!(
            (g.kind.as_str(), g.sha256.as_str()),
            (
                "gguf",
                "b83633aa785344791618f2fddf131b010ea04912a60430760b070bad293f65bd"
            )
        );
        assert!(model_identity(&root.path().join("none.gguf")).is_err());
    }
}
