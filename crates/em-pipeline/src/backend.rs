//! The seam between the pipeline and whatever draws samples.

use std::path::Path;

use em_sampler::{Sampler, Vocab};
use serde_json::Value;

use crate::Result;

/// The concrete sampling backend, picked by the caller: llama.cpp in-process, or a server fleet.
/// Shared between threads: a stage may run its work on a worker thread.
pub trait Backend: Sync {
    /// A backend of the same settings (so the same numbers) for a worker thread that samples
    /// beside this one, with models of its own; `None` (the default) where the machine has no
    /// cores to spare for it and it would only compete.
    fn fork(&self) -> Option<Box<dyn Backend + Send>> {
        None
    }

    /// What manifests record of the backend: its kind and, for servers, the served model (not
    /// the URL, so a fleet can move). Outputs of different backends never mix.
    fn identity(&self) -> Value;

    /// Whether samples come from local GGUF weights (then an HF directory is converted first).
    fn samples_local_gguf(&self) -> bool;

    /// Runs `f` with the tokenizer and chat template of the GGUF at `gguf`.
    fn with_gguf_vocab(
        &self,
        gguf: &Path,
        f: &mut dyn FnMut(&dyn Vocab) -> Result<()>,
    ) -> Result<()>;

    /// Runs `f` with a sampler drawing from `model` (the GGUF, for in-process backends; the model a
    /// server serves is named by the backend's own settings).
    fn with_sampler(
        &self,
        model: &Path,
        f: &mut dyn FnMut(&mut dyn Sampler) -> Result<()>,
    ) -> Result<()>;

    /// Whether [`Backend::with_adapted_sampler`] works here.
    fn applies_adapters(&self) -> bool {
        false
    }

    /// Runs `f` with a sampler drawing from the base GGUF `model` with the LoRA GGUF `adapter`
    /// applied. In-process backends keep the base loaded between calls, so swapping adapters
    /// costs the adapter's bytes, not the model's.
    fn with_adapted_sampler(
        &self,
        model: &Path,
        adapter: &Path,
        f: &mut dyn FnMut(&mut dyn Sampler) -> Result<()>,
    ) -> Result<()> {
        let _ = (model, f);
        anyhow::bail!(
            "{}: this backend cannot apply a LoRA adapter (use --backend llama)",
            adapter.display()
        )
    }
}

/// Runs `f` with the vocabulary of `model`: an HF directory's own files, else the GGUF's.
pub fn with_vocab(
    backend: &dyn Backend,
    model: &Path,
    f: &mut dyn FnMut(&dyn Vocab) -> Result<()>,
) -> Result<()> {
    if model.is_dir() {
        let vocab = crate::hf_vocab::HfVocab::open(model)?;
        f(&vocab)
    } else {
        backend.with_gguf_vocab(model, f)
    }
}

/// A backend whose "model" files are LoRA GGUFs applied to one base GGUF: whatever samples
/// through it (training, the safeguard, eval) names the adapter where it would name a model.
pub struct AdaptedBackend<'a> {
    inner: &'a dyn Backend,
    base: std::path::PathBuf,
    base_identity: Value,
}

impl<'a> AdaptedBackend<'a> {
    /// Adapters on the base GGUF `base`, sampled by `inner`.
    pub fn new(inner: &'a dyn Backend, base: &Path) -> Result<Self> {
        Ok(Self {
            inner,
            base: base.to_path_buf(),
            base_identity: serde_json::to_value(em_store::file_identity(base)?)?,
        })
    }

    /// The base GGUF.
    pub fn base(&self) -> &Path {
        &self.base
    }
}

impl Backend for AdaptedBackend<'_> {
    fn identity(&self) -> Value {
        let mut id = self.inner.identity();
        id["adapter_base"] = self.base_identity.clone();
        id
    }

    fn samples_local_gguf(&self) -> bool {
        self.inner.samples_local_gguf()
    }

    fn applies_adapters(&self) -> bool {
        self.inner.applies_adapters()
    }

    fn with_gguf_vocab(
        &self,
        _adapter: &Path,
        f: &mut dyn FnMut(&dyn Vocab) -> Result<()>,
    ) -> Result<()> {
        self.inner.with_gguf_vocab(&self.base, f)
    }

    fn with_sampler(
        &self,
        adapter: &Path,
        f: &mut dyn FnMut(&mut dyn Sampler) -> Result<()>,
    ) -> Result<()> {
        self.inner.with_adapted_sampler(&self.base, adapter, f)
    }
}
