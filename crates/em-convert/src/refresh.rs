//! The sampling GGUF of a model being trained: written whole once, then refreshed in place.
//!
//! A training loop publishes its weights after every update. The header (metadata, tensor infos)
//! never changes, so later refreshes rewrite only tensor data, at the offsets the first write
//! laid out, and skip every tensor whose bytes are the same as last time. The file is a cache:
//! a refresh that is interrupted leaves it unusable until the next full write, which is what
//! [`GgufRefresh::new`] starts with.

use std::collections::hash_map::DefaultHasher;
use std::fs::OpenOptions;
use std::hash::{Hash, Hasher};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use em_store::Staged;

use crate::gguf::GgufWriter;
use crate::{GgufPlan, OutType};

/// What one refresh wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RefreshStats {
    /// Bytes written to the file (the header too, on the first write).
    pub bytes: u64,
    /// Tensors rewritten.
    pub tensors: usize,
    /// Wall time of encoding and writing.
    pub seconds: f64,
}

/// One reused GGUF file for a model's weights.
pub struct GgufRefresh {
    path: PathBuf,
    plan: GgufPlan,
    offsets: Vec<u64>,
    hashes: Vec<u64>,
}

impl GgufRefresh {
    /// Plans the file at `path` for weights with the names and shapes `shapes` (HF names) of the
    /// model whose config and tokenizer are in `model_dir`; nothing is written yet.
    pub fn new(
        model_dir: &Path,
        shapes: &[(String, Vec<usize>)],
        outtype: OutType,
        path: &Path,
    ) -> Result<Self> {
        let plan = GgufPlan::new(model_dir, shapes, outtype, &|_| {
            PathBuf::from("the weights in memory")
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            plan,
            offsets: vec![],
            hashes: vec![],
        })
    }

    /// The GGUF file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the current weights: `weights(hf_name)` gives a tensor's values in the HF layout
    /// (any float type, any device). The first call writes the whole file under a temporary
    /// name; later calls rewrite in place only the tensors whose bytes changed.
    pub fn publish(
        &mut self,
        weights: &mut dyn FnMut(&str) -> Result<Tensor>,
    ) -> Result<RefreshStats> {
        let start = Instant::now();
        let mut stats = RefreshStats::default();
        let mut encoded = |plan: &GgufPlan, i: usize| -> Result<(Vec<u8>, u64)> {
            let t = &plan.tensors[i];
            let bytes = plan
                .encode_from(t, weights)
                .with_context(|| format!("{}: tensor {}", self.path.display(), t.hf_name))?;
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            Ok((bytes, h.finish()))
        };
        if self.offsets.is_empty() {
            let staged = Staged::new(&self.path)?;
            let mut writer =
                GgufWriter::create(staged.path(), &self.plan.metadata, self.plan.specs())?;
            let offsets = writer.data_offsets();
            let mut hashes = Vec::with_capacity(offsets.len());
            for i in 0..self.plan.tensors.len() {
                let (bytes, hash) = encoded(&self.plan, i)?;
                writer.write_tensor(&bytes)?;
                hashes.push(hash);
                stats.tensors += 1;
            }
            writer.finish()?;
            staged.commit()?;
            stats.bytes = std::fs::metadata(&self.path)
                .with_context(|| format!("{}: cannot stat", self.path.display()))?
                .len();
            self.offsets = offsets;
            self.hashes = hashes;
        } else {
            let io =
                |e: std::io::Error| anyhow::anyhow!("{}: cannot rewrite: {e}", self.path.display());
            let mut file = OpenOptions::new()
                .write(true)
                .open(&self.path)
                .map_err(io)?;
            for i in 0..self.plan.tensors.len() {
                let (bytes, hash) = encoded(&self.plan, i)?;
                if hash == self.hashes[i] {
                    continue;
                }
                file.seek(SeekFrom::Start(self.offsets[i])).map_err(io)?;
                file.write_all(&bytes).map_err(io)?;
                self.hashes[i] = hash;
                stats.bytes += bytes.len() as u64;
                stats.tensors += 1;
            }
            file.flush().map_err(io)?;
        }
        stats.seconds = start.elapsed().as_secs_f64();
        Ok(stats)
    }
}
