//! Writing so that a reader never sees half a file or directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// What a staging name holds between the destination's name and the writer's pid.
const STAGED_MARK: &str = ".tmp-";

/// What the name of a directory moved aside for its replacement holds before the writer's pid.
const ASIDE_MARK: &str = ".old-";

fn aside_name(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    dest.with_file_name(format!(".{name}{ASIDE_MARK}{}", std::process::id()))
}

/// Cleans up after [`Staged`] writers that were killed, in an output directory that one process
/// owns at a time, at its start: a directory moved aside whose replacement never arrived goes
/// back (`.NAME.old-PID` → `NAME`) or, if it did arrive, is removed; half-written staging
/// (`.NAME.tmp-PID`) is removed.
pub fn remove_stale_staged(dir: &Path) -> Result<(), StoreError> {
    let names = |dir: &Path| -> Result<Vec<String>, StoreError> {
        Ok(fs::read_dir(dir)
            .map_err(|e| StoreError::io(dir, "cannot list", e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect())
    };
    for name in names(dir)? {
        let Some((original, _pid)) = name[1..].rsplit_once(ASIDE_MARK) else {
            continue;
        };
        let (aside, dest) = (dir.join(&name), dir.join(original));
        let done = if dest.exists() {
            fs::remove_dir_all(&aside)
        } else {
            fs::rename(&aside, &dest)
        };
        done.map_err(|e| StoreError::io(&aside, "cannot clean up a replaced directory", e))?;
    }
    for name in names(dir)? {
        if !name.contains(STAGED_MARK) {
            continue;
        }
        let entry = dir.join(&name);
        let path = entry;
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

    /// Replaces `dest` with what was written. A file is renamed over the old one (atomic); a
    /// directory cannot be, so the old one is first renamed aside (`.NAME.old-PID`), and a kill
    /// between the two renames leaves it there for [`remove_stale_staged`] to put back.
    pub fn commit(mut self) -> Result<(), StoreError> {
        crate::crash_point("staged.commit");
        let aside = self.dest.is_dir().then(|| aside_name(&self.dest));
        if let Some(aside) = &aside {
            let _ = fs::remove_dir_all(aside);
            fs::rename(&self.dest, aside)
                .map_err(|e| StoreError::io(&self.dest, "cannot move aside to replace", e))?;
            crate::crash_point("staged.swap");
        }
        fs::rename(&self.tmp, &self.dest)
            .map_err(|e| StoreError::io(&self.dest, "cannot move into place", e))?;
        if let Some(parent) = self.dest.parent() {
            sync_dir(parent);
        }
        self.done = true;
        if let Some(aside) = aside {
            fs::remove_dir_all(&aside)
                .map_err(|e| StoreError::io(&aside, "cannot remove the replaced directory", e))?;
        }
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

    #[test]
    fn a_directory_replaced_by_a_killed_writer_comes_back_or_goes() {
        let dir = tempfile::tempdir().unwrap();
        let write_dir = |name: &str, content: &str| {
            let staged = Staged::new(&dir.path().join(name)).unwrap();
            fs::create_dir(staged.path()).unwrap();
            fs::write(staged.path().join("f"), content).unwrap();
            staged.commit().unwrap();
        };
        write_dir("ckpt", "one");
        write_dir("ckpt", "two");
        assert_eq!(
            fs::read_to_string(dir.path().join("ckpt/f")).unwrap(),
            "two"
        );
        // Killed between the two renames: only the old one, moved aside, and half a staging.
        fs::rename(dir.path().join("ckpt"), dir.path().join(".ckpt.old-7")).unwrap();
        fs::create_dir(dir.path().join(".ckpt.tmp-7")).unwrap();
        remove_stale_staged(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("ckpt/f")).unwrap(),
            "two"
        );
        // Killed after both renames: the old one goes.
        fs::create_dir(dir.path().join(".ckpt.old-8")).unwrap();
        remove_stale_staged(dir.path()).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["ckpt"]);
    }
}
