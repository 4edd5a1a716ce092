//! Safetensors in HF model directories: reading (single or sharded, memory-mapped) and a streaming
//! writer that takes one tensor's bytes at a time.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
pub use safetensors::Dtype;
use safetensors::SafeTensors;

/// The safetensors files of an HF model directory, memory-mapped.
pub struct HfTensors {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

impl HfTensors {
    /// Opens the shards of `model.safetensors.index.json`, else `model.safetensors`, else every
    /// `*.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let index = super::read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no \"weight_map\" object", index_path.display()))?;
            let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            files.sort();
            files.dedup();
            for f in &files {
                // A shard elsewhere could be any file, a device or a pipe that never ends.
                let inside = Path::new(f)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if f.is_empty() || !inside {
                    bail!(
                        "{}: shard {f:?} is not a file inside {}",
                        index_path.display(),
                        dir.display()
                    );
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if dir.join("model.safetensors").is_file() {
            // As transformers does: a single-file checkpoint wins over other safetensors beside it.
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("{}: cannot read directory", dir.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if paths.is_empty() {
            bail!("{}: no *.safetensors files", dir.display());
        }
        Self::open_files(paths)
    }

    /// Opens the given safetensors files as one set of tensors (a name in two files is an error).
    pub fn open_files(paths: Vec<PathBuf>) -> Result<Self> {
        let mut files = vec![];
        let mut index = BTreeMap::new();
        for path in paths {
            let file =
                File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: the file is opened read-only; a concurrent writer is the user's error, as with any mmap reader.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("{}: cannot map", path.display()))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display())
            })?;
            for name in st.names() {
                if let Some(prev) = index.insert(name.to_string(), files.len()) {
                    let prev: &(PathBuf, Mmap) = &files[prev];
                    bail!(
                        "{}: tensor {name} also in {}",
                        path.display(),
                        prev.0.display()
                    );
                }
            }
            files.push((path, mmap));
        }
        Ok(Self { files, index })
    }

    pub fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> &Path {
        self.index
            .get(name)
            .map_or(Path::new("?"), |&i| self.files[i].0.as_path())
    }

    fn view(&self, name: &str) -> Result<(safetensors::tensor::TensorView<'_>, &Path)> {
        let &i = self
            .index
            .get(name)
            .with_context(|| format!("no tensor {name}"))?;
        let (path, mmap) = &self.files[i];
        let st = SafeTensors::deserialize(mmap).expect("validated in open");
        let view = st
            .tensor(name)
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", path.display()))?;
        Ok((view, path))
    }

    /// Where `name`'s bytes lie: its file, the byte range within that file, and its dtype.
    pub fn location(&self, name: &str) -> Result<(&Path, std::ops::Range<u64>, Dtype)> {
        let (view, path) = self.view(name)?;
        let mmap = &self.files[self.index[name]].1;
        let start = (view.data().as_ptr() as usize - mmap.as_ptr() as usize) as u64;
        Ok((path, start..start + view.data().len() as u64, view.dtype()))
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.view(name)?.0.shape().to_vec())
    }

    pub fn n_bytes(&self, name: &str) -> Result<u64> {
        Ok(self.view(name)?.0.data().len() as u64)
    }

    /// One tensor, converted to f32 on the CPU.
    pub fn load_f32(&self, name: &str) -> Result<Tensor> {
        let (view, path) = self.view(name)?;
        match view.dtype() {
            safetensors::Dtype::F32
            | safetensors::Dtype::F16
            | safetensors::Dtype::BF16
            | safetensors::Dtype::F64 => {}
            other => bail!(
                "{}: tensor {name} has dtype {other:?}; expected a float type",
                path.display()
            ),
        }
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", path.display()))?;
        self.release_pages(name, view.data());
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Drops the mapped pages of a tensor already copied out, so that streaming a model through a
    /// conversion keeps about one tensor resident rather than the whole file.
    fn release_pages(&self, name: &str, data: &[u8]) {
        #[cfg(unix)]
        if let Some(&i) = self.index.get(name) {
            let mmap = &self.files[i].1;
            let start = data.as_ptr() as usize - mmap.as_ptr() as usize;
            let page = 4096;
            let aligned = start / page * page;
            let len = start + data.len() - aligned;
            // SAFETY: the mapping is a read-only file mapping and the data was copied out above;
            // MADV_DONTNEED only makes later reads fault the pages in from the file again.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, aligned, len)
            };
        }
        #[cfg(not(unix))]
        let _ = (name, data);
    }

    /// Every tensor as f32, by name (for tests and small models).
    pub fn load_all_f32(&self) -> Result<HashMap<String, Tensor>> {
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.load_f32(&n)?)))
            .collect()
    }
}

/// Writes one safetensors file: the header from names, shapes and one dtype, then data in order.
pub struct SafetensorsWriter {
    out: BufWriter<File>,
    sizes: Vec<(String, usize)>,
    next: usize,
    path: PathBuf,
}

impl SafetensorsWriter {
    pub fn create(
        path: &Path,
        specs: &[(String, Vec<usize>)],
        dtype: safetensors::Dtype,
    ) -> Result<Self> {
        let elem = match dtype {
            safetensors::Dtype::F32 => 4,
            safetensors::Dtype::BF16 | safetensors::Dtype::F16 => 2,
            other => bail!("unsupported safetensors dtype {other:?}"),
        };
        let dtype_name = format!("{dtype:?}");
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0usize;
        let mut sizes = vec![];
        for (name, shape) in specs {
            let n = shape.iter().product::<usize>() * elem;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + n]}),
            );
            offset += n;
            sizes.push((name.clone(), n));
        }
        let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
        header.resize(header.len().div_ceil(8) * 8, b' ');
        let file =
            File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 22, file);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        Ok(Self {
            out,
            sizes,
            next: 0,
            path: path.to_path_buf(),
        })
    }

    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let Some((name, n)) = self.sizes.get(self.next) else {
            bail!(
                "{}: more tensors written than announced",
                self.path.display()
            );
        };
        if data.len() != *n {
            bail!(
                "{}: tensor {name} has {} bytes, expected {n}",
                self.path.display(),
                data.len()
            );
        }
        self.out.write_all(data)?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if self.next != self.sizes.len() {
            bail!(
                "{}: {} of {} tensors written",
                self.path.display(),
                self.next,
                self.sizes.len()
            );
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_naming_files_outside_the_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for shard in ["/dev/stdin", "../model.safetensors", "", "."] {
            let index = serde_json::json!({"weight_map": {"w": shard}});
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
            let e = HfTensors::open(dir.path()).err().unwrap().to_string();
            assert!(
                e.contains("model.safetensors.index.json: shard")
                    && e.contains("is not a file inside"),
                "{e}"
            );
        }
    }
}
