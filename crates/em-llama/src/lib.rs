//! Sampling and scoring with GGUF models through llama.cpp, in-process.
//!
//! Architecture invariant: this crate knows llama.cpp and nothing of candle, training, data or
//! grading; callers hand it a GGUF path and token ids or text. Every GGUF it loads (model or
//! adapter) first passes em-convert's bounded header reader, the one GGUF header check of the
//! project (em-convert brings candle in as a library; no candle type is used here). [`Engine`] implements
//! [`em_sampler::Sampler`] (many prompts × many answers at once, continuous batching, shared
//! prompt prefixes) and [`GgufModel`] implements [`em_sampler::Vocab`].

pub mod batch;

pub use batch::{Engine, EngineConfig};
pub use em_sampler::SamplerError;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;

/// llama.cpp's process-wide backend, initialised once.
pub fn backend() -> Result<&'static LlamaBackend, SamplerError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            if std::env::var_os("EM_LLAMA_LOGS").is_none() {
                backend.void_logs();
            }
            Ok(backend)
        })
        .as_ref()
        .map_err(|e| SamplerError::backend("llama.cpp backend", e.clone()))
}

/// A thread count that does not collapse on a busy machine: all cores but one, at least one.
pub fn default_threads() -> i32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_sub(1).max(1) as i32
}

/// Layers llama.cpp offloads to the GPU when none is asked for: all of them in a build with the
/// `cuda` feature, none otherwise.
pub fn default_gpu_layers() -> u32 {
    if cfg!(feature = "cuda") {
        u32::MAX
    } else {
        0
    }
}

/// A GGUF model loaded into llama.cpp (on the CPU, or with layers offloaded to a GPU).
pub struct GgufModel {
    model: LlamaModel,
    path: PathBuf,
}

impl GgufModel {
    /// Loads `path` with [`default_gpu_layers`]; errors name the file.
    pub fn load(path: &Path) -> Result<Self, SamplerError> {
        Self::load_with_gpu_layers(path, default_gpu_layers())
    }

    /// Loads `path` with `gpu_layers` of its layers on the GPU (0: CPU only; more than the model
    /// has: all). A build without the `cuda` feature refuses any offload. The header is checked
    /// first ([`check_header`]), so a malformed file is one line naming it.
    pub fn load_with_gpu_layers(path: &Path, gpu_layers: u32) -> Result<Self, SamplerError> {
        if !path.is_file() {
            return Err(SamplerError::backend(path.display(), "no such file"));
        }
        if gpu_layers > 0 && !cfg!(feature = "cuda") {
            return Err(SamplerError::backend(
                path.display(),
                "--gpu-layers needs a build with the `cuda` feature (docs/cuda.md)",
            ));
        }
        check_header(path)?;
        let params = LlamaModelParams::default().with_n_gpu_layers(gpu_layers);
        let model = LlamaModel::load_from_file(backend()?, path, &params).map_err(|e| {
            SamplerError::backend(
                path.display(),
                format!("llama.cpp could not load the model: {e}"),
            )
        })?;
        Ok(Self {
            model,
            path: path.into(),
        })
    }

    /// The underlying llama.cpp model.
    pub fn inner(&self) -> &LlamaModel {
        &self.model
    }

    /// A GGUF metadata value as text (e.g. `tokenizer.chat_template`), if present.
    pub fn meta(&self, key: &str) -> Option<String> {
        self.model.meta_val_str(key).ok()
    }

    /// The text of token `id`, special tokens rendered.
    pub fn token_text(&self, id: u32) -> String {
        let bytes = self
            .model
            .vocab()
            .token_to_piece(LlamaToken(id as i32), true, None);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The BOS and EOS token ids.
    pub fn bos_eos(&self) -> (u32, u32) {
        let vocab = self.model.vocab();
        (vocab.bos().0 as u32, vocab.eos().0 as u32)
    }

    /// The GGUF file this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the vocabulary (length of a logit vector).
    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab() as usize
    }

    /// Token ids of `text`, special tokens parsed, BOS added only if `add_bos` and the model wants it.
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let vocab = self.model.vocab();
        let add_special = add_bos && vocab.should_add_bos();
        vocab
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    /// Loads the LoRA GGUF at `path` (written for this base) next to the loaded weights. llama.cpp
    /// keeps every adapter it loaded until the model is dropped (llama-cpp-2 offers no free), so
    /// a long run holds each update's adapter: megabytes each.
    pub fn load_adapter(&mut self, path: &Path) -> Result<Adapter, SamplerError> {
        if !path.is_file() {
            return Err(SamplerError::backend(path.display(), "no such file"));
        }
        check_header(path)?;
        let inner = self.model.lora_adapter_init(path).map_err(|e| {
            SamplerError::backend(
                path.display(),
                format!(
                    "llama.cpp could not load the LoRA adapter for {}: {e}",
                    self.path.display()
                ),
            )
        })?;
        Ok(Adapter {
            inner,
            path: path.into(),
        })
    }

    /// The logits llama.cpp computes at every position of `tokens` (one forward pass, one
    /// sequence), with the context settings the sampler uses (f16 KV cache, flash attention
    /// where llama.cpp picks it).
    pub fn logits(&self, tokens: &[u32], threads: i32) -> Result<Vec<Vec<f32>>, SamplerError> {
        self.logits_with(tokens, threads, None)
    }

    /// [`GgufModel::logits`] with `adapter` applied (scale 1).
    pub fn logits_with(
        &self,
        tokens: &[u32],
        threads: i32,
        adapter: Option<&mut Adapter>,
    ) -> Result<Vec<Vec<f32>>, SamplerError> {
        self.forward(tokens, threads, adapter, false)
    }

    /// The logits of the weights in f32 throughout: an f32 KV cache and no flash attention
    /// (llama.cpp's flash-attention path casts f32 keys and values to f16, 5e-4 of the logit
    /// scale). For numerics checks against other implementations.
    pub fn reference_logits(
        &self,
        tokens: &[u32],
        threads: i32,
    ) -> Result<Vec<Vec<f32>>, SamplerError> {
        self.forward(tokens, threads, None, true)
    }

    fn forward(
        &self,
        tokens: &[u32],
        threads: i32,
        adapter: Option<&mut Adapter>,
        f32_attention: bool,
    ) -> Result<Vec<Vec<f32>>, SamplerError> {
        let n = tokens.len();
        let run_err = |message: String| SamplerError::backend(self.path.display(), message);
        let n_ctx = (n.max(1) as u32).next_multiple_of(256);
        let mut params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        if f32_attention {
            params = params
                .with_type_k(KvCacheType::F32)
                .with_type_v(KvCacheType::F32)
                // LLAMA_FLASH_ATTN_TYPE_DISABLED (llama-cpp-2 does not re-export the constant).
                .with_flash_attention_policy(0);
        }
        let mut ctx = self
            .model
            .new_context(backend()?, params)
            .map_err(|e| run_err(e.to_string()))?;
        if let Some(a) = adapter {
            a.apply(&mut ctx)?;
        }
        let mut batch = LlamaBatch::new(n.max(1), 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch
                .add(LlamaToken(t as i32), i as i32, &[0], true)
                .map_err(|e| run_err(e.to_string()))?;
        }
        ctx.decode(&mut batch).map_err(|e| run_err(e.to_string()))?;
        Ok((0..n)
            .map(|i| ctx.get_logits_ith(i as i32).to_vec())
            .collect())
    }
}

/// Checks the header of the GGUF at `path` with em-convert's bounded reader (every count, length,
/// offset and alignment against the bytes there, before anything is allocated) before llama.cpp
/// reads the file: llama.cpp refuses a malformed file too, but says only "null result", and may
/// first allocate what a hostile header claims. The error is one line naming the file. The reader
/// accepts the ggml types candle reads, so a GGUF in another llama.cpp type (the IQ quants) is
/// refused.
pub fn check_header(path: &Path) -> Result<(), SamplerError> {
    em_convert::gguf::GgufFile::open(path)
        .map(drop)
        .map_err(|e| {
            let text = em_convert::gguf::one_line(&format!("{e:#}"));
            let at = path.display().to_string();
            let message = text
                .strip_prefix(&at)
                .and_then(|rest| rest.strip_prefix(": "))
                .unwrap_or(&text);
            SamplerError::backend(at.clone(), message)
        })
}

/// A LoRA adapter loaded next to a [`GgufModel`]'s weights.
pub struct Adapter {
    inner: LlamaLoraAdapter,
    path: PathBuf,
}

impl Adapter {
    /// The adapter's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `ctx` compute with this adapter at scale 1 (alone).
    pub(crate) fn apply(
        &mut self,
        ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    ) -> Result<(), SamplerError> {
        ctx.lora_adapter_set(&mut self.inner, 1.0).map_err(|e| {
            SamplerError::backend(
                self.path.display(),
                format!("llama.cpp could not apply the adapter: {e}"),
            )
        })
    }
}

impl em_sampler::Vocab for GgufModel {
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, SamplerError> {
        Ok(self.tokenize(text, false))
    }

    fn token_text(&self, id: u32) -> String {
        GgufModel::token_text(self, id)
    }

    fn auto_bos(&self) -> Option<u32> {
        let vocab = self.model.vocab();
        vocab.should_add_bos().then(|| vocab.bos().0 as u32)
    }

    fn special_texts(&self) -> (String, String) {
        let (bos, eos) = self.bos_eos();
        let text = |id: u32| {
            if (id as usize) < self.n_vocab() {
                GgufModel::token_text(self, id)
            } else {
                String::new()
            }
        };
        (text(bos), text(eos))
    }

    fn chat_template(&self) -> Result<em_sampler::TemplateSource, SamplerError> {
        let key = "tokenizer.chat_template";
        match self.meta(key) {
            Some(template) if !template.trim().is_empty() => Ok(em_sampler::TemplateSource {
                template,
                origin: format!("{}:{key}", self.path.display()),
            }),
            _ => Err(SamplerError::backend(
                self.path.display(),
                format!(
                    "no `{key}` in the GGUF metadata (choose another prompt style, e.g. plain)"
                ),
            )),
        }
    }

    fn origin(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header by hand: `n_tensors` claimed, no metadata, padded to 32 bytes.
    fn header(n_tensors: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.resize(32, 0);
        b
    }

    fn write(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("em-llama-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// The error of loading `path`, checked to be one line naming the file once, at its start.
    fn load_error(path: &Path) -> String {
        let e = GgufModel::load_with_gpu_layers(path, 0)
            .err()
            .expect("a malformed GGUF loads")
            .to_string();
        let at = format!("{}: ", path.display());
        assert!(e.starts_with(&at), "{e}");
        assert_eq!(e.matches(&at).count(), 1, "{e}");
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn every_load_checks_the_header_first() {
        let p = write("not-gguf.gguf", b"PK\x03\x04 a zip file, not a model");
        let e = load_error(&p);
        assert!(
            e.ends_with(": not a GGUF file (it starts with \"PK\\x03\\x04\", not \"GGUF\")"),
            "{e}"
        );
        // What em-convert's reader says, word for word, with the file named once.
        let p = write("many-tensors.gguf", &header(1_000_000_000_000));
        let e = load_error(&p);
        assert_eq!(
            e,
            format!(
                "{}: the header claims 1000000000000 tensors and 0 metadata entries, which need \
                 at least 32000000000000 bytes; the file has 8 left",
                p.display()
            )
        );
        assert_eq!(e, check_header(&p).unwrap_err().to_string());
        let p = write("short.gguf", b"GGU");
        assert!(load_error(&p).contains("the magic"));
        // A header that passes reaches llama.cpp (which wants an architecture).
        let p = write("empty.gguf", &header(0));
        check_header(&p).unwrap();
        assert!(load_error(&p).contains("llama.cpp could not load the model"));
        // No file: said before anything is read.
        let e = load_error(Path::new("/nonexistent/m.gguf"));
        assert!(e.ends_with("no such file"), "{e}");
    }
}
