//! A resumable JSONL file: one record a line, appended and fsynced as results arrive.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::StoreError;

/// Records of type `T`, one JSON line each. Lines are written whole with the newline last, so a
/// line without its newline can only be a write cut short by a kill: [`JsonlStore::open`] cuts it
/// off (its record is redone). A complete line that does not parse is corruption and an error.
pub struct JsonlStore<T> {
    path: PathBuf,
    file: File,
    _record: PhantomData<fn(T)>,
}

impl<T: Serialize + DeserializeOwned> JsonlStore<T> {
    /// Opens (creating) `path` and returns the records already in it, in order.
    pub fn open(path: &Path) -> Result<(Self, Vec<T>), StoreError> {
        let records = Self::read(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| StoreError::io(path, "cannot open for appending", e))?;
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
                _record: PhantomData,
            },
            records,
        ))
    }

    /// The complete records of `path` (none if it does not exist), cutting a torn last line.
    pub fn read(path: &Path) -> Result<Vec<T>, StoreError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io(path, "cannot read", e)),
        };
        let mut reader = BufReader::new(file);
        let (mut records, mut good_bytes, mut line, mut lineno) = (Vec::new(), 0u64, Vec::new(), 0);
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| StoreError::io(path, "cannot read", e))?;
            if n == 0 {
                break;
            }
            lineno += 1;
            if line.last() != Some(&b'\n') {
                break; // torn by a kill: cut below, redone by the caller
            }
            let text = std::str::from_utf8(&line).map_err(|_| StoreError::Corrupt {
                path: path.to_path_buf(),
                line: lineno,
                message: "not UTF-8; remove the line or the file".into(),
            })?;
            if !text.trim().is_empty() {
                let record =
                    serde_json::from_str(text.trim_end()).map_err(|e| StoreError::Corrupt {
                        path: path.to_path_buf(),
                        line: lineno,
                        message: format!("not a valid record ({e}); remove the line or the file"),
                    })?;
                records.push(record);
            }
            good_bytes += n as u64;
        }
        let len = std::fs::metadata(path)
            .map_err(|e| StoreError::io(path, "cannot read", e))?
            .len();
        if good_bytes < len {
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(good_bytes).and_then(|_| f.sync_all()))
                .map_err(|e| StoreError::io(path, "cannot cut the torn last line", e))?;
        }
        Ok(records)
    }

    /// Appends one record and makes it durable before returning.
    pub fn append(&mut self, record: &T) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(record)
            .map_err(|e| StoreError::io(&self.path, "cannot serialise a record", e))?;
        line.push(b'\n');
        let file = &mut self.file;
        crate::crash_point_with("jsonl.append", || {
            let _ = file.write_all(&line[..line.len() / 2]);
            let _ = file.sync_data();
        });
        self.file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| StoreError::io(&self.path, "cannot append", e))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct R {
        id: u32,
    }

    #[test]
    fn resumes_cuts_a_torn_last_line_and_refuses_a_corrupt_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let (mut store, done) = JsonlStore::<R>::open(&p).unwrap();
        assert!(done.is_empty());
        store.append(&R { id: 1 }).unwrap();
        store.append(&R { id: 2 }).unwrap();
        drop(store);
        // A kill mid-write leaves a line without its newline: cut, and the file is appendable.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"id\": 3").unwrap();
        drop(f);
        let (mut store, done) = JsonlStore::<R>::open(&p).unwrap();
        assert_eq!(done, vec![R { id: 1 }, R { id: 2 }]);
        store.append(&R { id: 3 }).unwrap();
        drop(store);
        assert_eq!(JsonlStore::<R>::read(&p).unwrap().len(), 3);
        // A complete line that does not parse is corruption, named by file and line.
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replacen("{\"id\":2}", "{\"id\":", 1)).unwrap();
        let e = JsonlStore::<R>::open(&p).err().unwrap().to_string();
        assert!(
            e.starts_with(&format!("{}:2: not a valid record", p.display())),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(&p).unwrap().lines().count(),
            3,
            "left as it was"
        );
    }
}
