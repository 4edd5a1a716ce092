//! GGUF files: a streaming writer, and reading with errors that name the file.
//!
//! The writer lays out the header from tensor shapes and types alone, then takes each tensor's bytes
//! one at a time, so a model is never held in memory whole. Headers are read by `gguf_header`,
//! which bounds every length by the file; tensors by candle.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

pub use crate::gguf_header::read_header;

/// GGUF's default data alignment (`general.alignment` is not written, so readers assume it).
pub const ALIGNMENT: u64 = 32;

/// One tensor as the header describes it; its bytes come later.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    /// Shape in row-major (PyTorch/candle) order; written reversed as GGUF wants.
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorSpec {
    /// Bytes the tensor takes in the file, before padding.
    pub fn n_bytes(&self) -> u64 {
        let elems: usize = self.shape.iter().product();
        (elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// Writes a GGUF v3 file: metadata and tensor infos up front, then tensor data in the same order.
pub struct GgufWriter {
    out: BufWriter<File>,
    specs: Vec<TensorSpec>,
    next: usize,
    path: PathBuf,
    data_start: u64,
}

impl GgufWriter {
    /// Writes the header of `path`; tensors must then be written in `specs` order.
    pub fn create(
        path: &Path,
        metadata: &[(String, Value)],
        specs: Vec<TensorSpec>,
    ) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 22, file);
        let w = &mut out;
        w.write_all(&0x4655_4747u32.to_le_bytes())?; // "GGUF"
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(specs.len() as u64).to_le_bytes())?;
        w.write_all(&(metadata.len() as u64).to_le_bytes())?;
        for (key, value) in metadata {
            write_string(w, key)?;
            w.write_all(&value_type(value).to_le_bytes())?;
            match value {
                // An empty array carries no element type; llama.cpp checks it, so use the key's.
                Value::Array(items) if items.is_empty() => {
                    w.write_all(&empty_array_element_type(key).to_le_bytes())?;
                    w.write_all(&0u64.to_le_bytes())?;
                }
                _ => write_value(w, value)?,
            }
        }
        let mut offset = 0u64;
        for spec in &specs {
            let block = spec.dtype.block_size();
            if spec.shape.last().is_some_and(|&d| d % block != 0) {
                bail!(
                    "{}: tensor {} of shape {:?} cannot be stored as {:?}",
                    path.display(),
                    spec.name,
                    spec.shape,
                    spec.dtype
                );
            }
            write_string(w, &spec.name)?;
            w.write_all(&(spec.shape.len() as u32).to_le_bytes())?;
            for &d in spec.shape.iter().rev() {
                w.write_all(&(d as u64).to_le_bytes())?;
            }
            w.write_all(&ggml_type_id(spec.dtype).to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset += align(spec.n_bytes());
        }
        let pos = out.stream_position()?;
        out.write_all(&vec![0u8; (align(pos) - pos) as usize])?;
        Ok(Self {
            out,
            specs,
            next: 0,
            path: path.to_path_buf(),
            data_start: align(pos),
        })
    }

    /// Where in the file each tensor's data starts, in `specs` order.
    pub fn data_offsets(&self) -> Vec<u64> {
        let mut at = self.data_start;
        self.specs
            .iter()
            .map(|s| {
                let here = at;
                at += align(s.n_bytes());
                here
            })
            .collect()
    }

    /// Appends the data of the next tensor, which must be exactly its spec's size.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let Some(spec) = self.specs.get(self.next) else {
            bail!(
                "{}: more tensors written than announced",
                self.path.display()
            );
        };
        if data.len() as u64 != spec.n_bytes() {
            bail!(
                "{}: tensor {} has {} bytes, expected {}",
                self.path.display(),
                spec.name,
                data.len(),
                spec.n_bytes()
            );
        }
        self.out.write_all(data)?;
        let n = data.len() as u64;
        self.out.write_all(&vec![0u8; (align(n) - n) as usize])?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs; fails if a tensor announced in the header was never written.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.specs.len() {
            bail!(
                "{}: {} of {} tensors written",
                self.path.display(),
                self.next,
                self.specs.len()
            );
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok(())
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn write_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// The element type llama.cpp expects for array keys that may be empty (e.g. the merges of a
/// byte-level tokenizer without merges).
fn empty_array_element_type(key: &str) -> u32 {
    match key {
        "tokenizer.ggml.tokens" | "tokenizer.ggml.merges" => {
            value_type(&Value::String(String::new()))
        }
        "tokenizer.ggml.token_type" => value_type(&Value::I32(0)),
        "tokenizer.ggml.scores" => value_type(&Value::F32(0.0)),
        _ => value_type(&Value::U8(0)),
    }
}

/// GGUF metadata value type ids (gguf.h).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(w: &mut impl Write, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes())?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[*x as u8])?,
        Value::String(s) => write_string(w, s)?,
        Value::Array(items) => {
            let elem_type = items
                .first()
                .map(value_type)
                .unwrap_or(value_type(&Value::U8(0)));
            if items.iter().any(|x| value_type(x) != elem_type) {
                bail!("GGUF arrays must hold values of one type");
            }
            w.write_all(&elem_type.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for item in items {
                write_value(w, item)?;
            }
        }
    }
    Ok(())
}

/// ggml's type ids (ggml.h); candle keeps its own mapping private.
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// A parsed GGUF file, open for reading tensors one at a time.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: File,
}

impl GgufFile {
    /// Opens and parses the header; errors name the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let content = read_header(&mut std::io::BufReader::new(&file), path)?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    /// A metadata value, or an error naming the file and key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .with_context(|| format!("{}: missing metadata key {key}", self.path.display()))
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Reads one tensor as stored (possibly quantized).
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: tensor {name}: {}",
                    self.path.display(),
                    one_line(&e.to_string())
                )
            })
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<_> = self
            .content
            .tensor_infos
            .iter()
            .map(|(n, i)| (i.offset, n.clone()))
            .collect();
        names.sort();
        names.into_iter().map(|(_, n)| n).collect()
    }
}

/// Collapses an error message onto one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
