//! Writing so that a reader never sees half a file or directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// What a staging name holds between the destination's name and the writer's pid.
const STAGED_MARK: &str = ".tmp-";

/// Removes from `dir` what [`Staged`] writers that were killed left behind (`.NAME.tmp-PID`):
/// for an output directory that one process owns at a time, at its start.
pub fn remove_stale_staged(dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io(dir, "cannot list", e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.contains(STAGED_MARK)) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| StoreError::io(&path, "cannot remove", e))?;
    }
    Ok(())
}

/// A temporary sibling of `dest` (file or directory) that becomes `dest` on [`Staged::commit`]
/// and is removed on drop otherwise.
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Staged {
    /// A staging path beside `dest`; its parent directory must exist.
    pub fn new(dest: &Path) -> Result<Self, StoreError> {
        let name = dest
            .file_name()
            .ok_or_else(|| StoreError::io(dest, "not a file name", "no final component"))?;
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(StoreError::io(
                dest,
                "cannot write",
                "parent directory does not exist",
            ));
        }
        let tmp = parent.join(format!(
            ".{}{STAGED_MARK}{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::remove_file(&tmp);
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Replaces `dest` with what was written.
    pub fn commit(mut self) -> Result<(), StoreError> {
        if self.dest.is_dir() {
            fs::remove_dir_all(&self.dest)
                .map_err(|e| StoreError::io(&self.dest, "cannot replace", e))?;
        } else if self.dest.exists() {
            fs::remove_file(&self.dest)
                .map_err(|e| StoreError::io(&self.dest, "cannot replace", e))?;
        }
        fs::rename(&self.tmp, &self.dest)
            .map_err(|e| StoreError::io(&self.dest, "cannot move into place", e))?;
        if let Some(parent) = self.dest.parent() {
            sync_dir(parent);
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsynced, then renamed.
pub fn write_atomic(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), StoreError> {
    let staged = Staged::new(path)?;
    File::create(staged.path())
        .and_then(|mut f| f.write_all(bytes.as_ref()).and_then(|_| f.sync_all()))
        .map_err(|e| StoreError::io(staged.path(), "cannot write", e))?;
    staged.commit()
}

/// Makes a rename durable; errors are ignored (not every filesystem supports it).
fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let staged = Staged::new(&dir.path().join("d")).unwrap();
        fs::create_dir(staged.path()).unwrap();
        drop(staged);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let e = write_atomic(&dir.path().join("missing/x"), b"x").unwrap_err();
        assert!(
            e.to_string().contains("parent directory does not exist"),
            "{e}"
        );
    }
}
