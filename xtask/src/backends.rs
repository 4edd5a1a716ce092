//! The one place that picks concrete backends: llama.cpp in-process, or an OpenAI-compatible
//! server fleet, behind `em_pipeline::Backend`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use em_llama::{Engine, EngineConfig, GgufModel};
use em_openai::{Dialect, OpenAiConfig, OpenAiSampler, PromptFormat};
use em_pipeline::Backend;
use em_sampler::{Sampler, Vocab};
use serde_json::{json, Value};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// llama.cpp in this process.
    Llama,
    /// An OpenAI-compatible server (vLLM, SGLang, llama-server, llama-cpp-python).
    Openai,
}

/// Where samples come from.
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    #[arg(long, value_enum, default_value = "llama")]
    pub backend: BackendKind,
    /// llama.cpp threads (default: all cores but one).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Model layers llama.cpp runs on the GPU (default: all in a `cuda` build, none otherwise).
    #[arg(long)]
    pub gpu_layers: Option<u32>,
    /// Sequences llama.cpp decodes together (default 8; train: all responses of an update,
    /// as many as fit in 65,536 KV cells).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Server base URL (`http://host:port`), with --backend openai.
    #[arg(long)]
    pub base_url: Option<String>,
    /// The model name the server serves, with --backend openai.
    #[arg(long)]
    pub served_model: Option<String>,
    /// Environment variable that holds the API key, if the server wants one.
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Which server: its field names for the sampling settings differ.
    #[arg(long, value_enum, default_value = "vllm")]
    pub dialect: Dialect,
    /// Send prompts as token ids (exactly what we rendered) or as text (default: text for
    /// llama-cpp-python, which takes only text; token ids otherwise).
    #[arg(long, value_enum)]
    pub prompt_format: Option<PromptFormat>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Seconds one request may take before it is retried.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
}

impl BackendArgs {
    /// The backend these arguments describe.
    pub fn build(&self) -> Result<Box<dyn Backend>> {
        Ok(match self.backend {
            BackendKind::Llama => Box::new(LlamaBackend {
                gpu_layers: self.gpu_layers.unwrap_or_else(em_llama::default_gpu_layers),
                ..LlamaBackend::new(EngineConfig {
                    threads: self.threads.unwrap_or_else(em_llama::default_threads),
                    parallel: self.parallel.unwrap_or(8),
                    ..EngineConfig::default()
                })
            }),
            BackendKind::Openai => {
                let base_url = self
                    .base_url
                    .clone()
                    .context("--backend openai needs --base-url")?;
                let served_model = self
                    .served_model
                    .clone()
                    .context("--backend openai needs --served-model")?;
                let api_key = match &self.api_key_env {
                    Some(var) => Some(std::env::var(var).with_context(|| {
                        format!("--api-key-env {var}: the variable is not set")
                    })?),
                    None => None,
                };
                Box::new(ServerBackend {
                    config: OpenAiConfig {
                        api_key,
                        concurrency: self.concurrency,
                        timeout: Duration::from_secs(self.request_timeout),
                        dialect: self.dialect,
                        prompt_format: self.prompt_format.unwrap_or(match self.dialect {
                            Dialect::LlamaCppPython => PromptFormat::Text,
                            _ => PromptFormat::Tokens,
                        }),
                        ..OpenAiConfig::new(base_url, served_model)
                    },
                })
            }
        })
    }
}

/// A loaded base GGUF: its path, its file's size and mtime when loaded, and the model.
type LoadedBase = (PathBuf, (u64, Option<SystemTime>), GgufModel);

/// llama.cpp in-process: every plain sampler loads the GGUF it is given; a base under adapters
/// stays loaded while the same unchanged file is asked for.
pub struct LlamaBackend {
    pub config: EngineConfig,
    /// Layers offloaded to the GPU.
    pub gpu_layers: u32,
    /// The base model adapters were last applied to, with its file's size and mtime.
    base: Mutex<Option<LoadedBase>>,
}

impl LlamaBackend {
    /// The engine `config` with [`em_llama::default_gpu_layers`].
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
            gpu_layers: em_llama::default_gpu_layers(),
            base: Mutex::new(None),
        }
    }
}

/// Size and mtime of `path`, to tell a rewritten file from the one loaded.
fn file_stamp(path: &Path) -> Result<(u64, Option<SystemTime>)> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok((meta.len(), meta.modified().ok()))
}

impl Backend for LlamaBackend {
    /// On the CPU, where the cores are at least twice llama.cpp's threads (the default, all cores
    /// but one, leaves one of two idle): a second engine of the same settings. Its GGUFs are
    /// mapped, not copied, so f16/f32 weights are in memory once; quantized weights that
    /// llama.cpp repacks for the CPU (q8_0, q4_0) are held twice (`select --no-overlap` avoids
    /// it). On a GPU the weights would be uploaded twice, and there is no fork.
    fn fork(&self) -> Option<Box<dyn Backend + Send>> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = usize::try_from(self.config.threads).unwrap_or(usize::MAX);
        (self.gpu_layers == 0 && cores >= 2 * threads.max(1)).then(|| {
            Box::new(LlamaBackend {
                gpu_layers: 0,
                ..LlamaBackend::new(self.config.clone())
            }) as Box<dyn Backend + Send>
        })
    }

    fn identity(&self) -> Value {
        // The batch shape changes llama.cpp's quantized accumulation and so can flip greedy
        // near-ties: outputs sampled at different `parallel` do not mix.
        // GPU kernels round differently again; CPU-only identities carry no GPU key.
        let mut id = json!({ "kind": "llama.cpp", "parallel": self.config.parallel, "n_batch": self.config.n_batch });
        if self.gpu_layers > 0 {
            id["gpu_layers"] = json!(self.gpu_layers);
        }
        id
    }

    fn samples_local_gguf(&self) -> bool {
        true
    }

    fn applies_adapters(&self) -> bool {
        true
    }

    fn with_gguf_vocab(
        &self,
        gguf: &Path,
        f: &mut dyn FnMut(&dyn Vocab) -> Result<()>,
    ) -> Result<()> {
        gguf_vocab(gguf, f)
    }

    fn with_sampler(
        &self,
        gguf: &Path,
        f: &mut dyn FnMut(&mut dyn Sampler) -> Result<()>,
    ) -> Result<()> {
        let model = load_gguf(gguf, self.gpu_layers)?;
        let mut engine = Engine::new(&model, self.config.clone());
        f(&mut engine)
    }

    fn with_adapted_sampler(
        &self,
        gguf: &Path,
        adapter: &Path,
        f: &mut dyn FnMut(&mut dyn Sampler) -> Result<()>,
    ) -> Result<()> {
        let stamp = file_stamp(gguf)?;
        let cached = self.base.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut model = match cached {
            Some((path, s, model)) if path == gguf && s == stamp => model,
            _ => load_gguf(gguf, self.gpu_layers)?,
        };
        let result = model
            .load_adapter(adapter)
            .map_err(anyhow::Error::from)
            .and_then(|a| {
                let mut engine = Engine::with_adapter(&model, a, self.config.clone());
                f(&mut engine)
            });
        *self.base.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((gguf.to_path_buf(), stamp, model));
        result
    }
}

/// An OpenAI-compatible server; the local model file gives the tokenizer, the template and the
/// identity of what the server is told to serve.
pub struct ServerBackend {
    pub config: OpenAiConfig,
}

impl Backend for ServerBackend {
    fn identity(&self) -> Value {
        json!({
            "kind": "openai",
            "served_model": self.config.served_model,
            "dialect": format!("{:?}", self.config.dialect).to_lowercase(),
            "prompt_format": format!("{:?}", self.config.prompt_format).to_lowercase(),
        })
    }

    fn samples_local_gguf(&self) -> bool {
        false
    }

    fn with_gguf_vocab(
        &self,
        gguf: &Path,
        f: &mut dyn FnMut(&dyn Vocab) -> Result<()>,
    ) -> Result<()> {
        gguf_vocab(gguf, f)
    }

    fn with_sampler(
        &self,
        _model: &Path,
        f: &mut dyn FnMut(&mut dyn Sampler) -> Result<()>,
    ) -> Result<()> {
        let mut sampler = OpenAiSampler::new(self.config.clone())?;
        f(&mut sampler)
    }
}

/// Runs `f` with the tokenizer and chat template of a local GGUF (llama.cpp reads them).
fn gguf_vocab(gguf: &Path, f: &mut dyn FnMut(&dyn Vocab) -> Result<()>) -> Result<()> {
    // Only the vocabulary is read: nothing goes to the GPU.
    f(&load_gguf(gguf, 0)?)
}

/// Loads a GGUF into llama.cpp; em-llama checks its header first (em-convert's bounded reader).
fn load_gguf(gguf: &Path, gpu_layers: u32) -> Result<GgufModel> {
    Ok(GgufModel::load_with_gpu_layers(gguf, gpu_layers)?)
}

/// The in-process backend with default settings (for commands that take no backend flags).
pub fn llama_default() -> LlamaBackend {
    LlamaBackend::new(EngineConfig::default())
}

/// Refuses a server backend where a command needs local weights.
pub fn require_local(args: &BackendArgs, what: &str) -> Result<()> {
    if args.backend != BackendKind::Llama {
        bail!("{what} samples from the weights it trains, so it needs --backend llama");
    }
    Ok(())
}
