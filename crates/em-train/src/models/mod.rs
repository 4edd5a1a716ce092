//! Differentiable causal language models loaded from Hugging Face checkpoints, one file per decoder
//! built from the shared layers in [`crate::layers`]: the Llama layout (Llama, Qwen2, Qwen3,
//! Mistral: what differs between them is configuration, which em-config's family files set) and
//! Gemma3's. em-config's [`em_config::Family::decoder`] says which a family uses.
//!
//! Every weight is a [`Var`], so a backward pass from the logits reaches all of them. There is no
//! KV cache: training runs the whole sequence at once.

pub mod gemma3;
pub mod llama;
mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::adapter::{AdapterSource, LoraConfig};
use crate::layers::{GradientSinks, LayerContext, Linear, ProjectionTape};

/// The configuration types are em-config's: one reading of config.json for every crate.
pub use em_config::{Architecture, ConfigError, ConfigSource, Decoder, ModelConfig};
pub use weights::Weights;

/// Errors while reading a configuration or building a model; each names the file or source at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The directory has no config.json.
    #[error("missing config.json in {}", dir.display())]
    MissingConfig {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// config.json could not be resolved (see [`ConfigError`]).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The directory holds no safetensors weights.
    #[error("no model.safetensors, model.safetensors.index.json or *.safetensors in {}", dir.display())]
    NoWeights {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// The shard index is inconsistent with the directory.
    #[error("bad shard index {}: {message}", path.display())]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file could not be parsed.
    #[error("cannot load safetensors file {}: {source}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: candle_core::Error,
    },
    /// A weight the architecture needs is absent.
    #[error("missing tensor \"{name}\" in {source_name}")]
    MissingTensor {
        /// HF name of the tensor.
        name: String,
        /// Where the weights came from (a directory or "the tensor map").
        source_name: String,
    },
    /// A weight has the wrong shape for the configuration.
    #[error("wrong shape {got:?} (expected {expected:?}) for tensor \"{name}\" in {source_name}")]
    WrongShape {
        /// HF name of the tensor.
        name: String,
        /// Where the weights came from.
        source_name: String,
        /// The shape found.
        got: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// An adapter that cannot be built or does not fit the model.
    #[error("LoRA adapter: {message}")]
    BadAdapter {
        /// What is wrong.
        message: String,
    },
    /// A tensor operation failed while building or saving the model.
    #[error("{context}: {source}")]
    Candle {
        /// What was being done.
        context: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// The HF names and shapes of every weight `config` needs, in load order.
pub fn tensor_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut w = Weights::shape_recorder();
    // The recorder never fails: every shape it is asked for is recorded.
    let _ = match config.architecture.family().decoder {
        Decoder::Llama => llama::Model::load(config, &mut w).map(|_| ()),
        Decoder::Gemma3 => gemma3::Model::load(config, &mut w).map(|_| ()),
    };
    w.recorded_shapes()
}

/// A per-architecture model behind one interface.
#[derive(Debug, Clone)]
enum Inner {
    /// The Llama-layout decoder: Llama, Qwen2, Qwen3, Mistral.
    Llama(llama::Model),
    Gemma3(gemma3::Model),
}

/// A causal language model whose weights are all trainable [`Var`]s, or whose base is frozen
/// under a LoRA adapter whose factors are the only parameters.
#[derive(Debug, Clone)]
pub struct CausalLm {
    config: ModelConfig,
    inner: Inner,
    parameters: Vec<(String, Var)>,
    adapter: Option<LoraConfig>,
}

impl CausalLm {
    /// Loads config.json and *.safetensors (single file or sharded with model.safetensors.index.json) from an HF directory.
    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<CausalLm, ModelError> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let config = ModelConfig::from_file(&config_path)?;
        let tensors = weights::load_hf_tensors(dir, device)?;
        Self::build(
            &config,
            tensors,
            dtype,
            device,
            dir.display().to_string(),
            None,
        )
    }

    /// The HF checkpoint in `dir`, frozen, under a LoRA adapter `lora` whose factors come from
    /// `source` (fresh or saved).
    pub fn from_hf_dir_with_adapter(
        dir: &Path,
        dtype: DType,
        device: &Device,
        lora: LoraConfig,
        source: AdapterSource,
    ) -> Result<CausalLm, ModelError> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(ModelError::MissingConfig {
                dir: dir.to_path_buf(),
            });
        }
        let config = ModelConfig::from_file(&config_path)?;
        let tensors = weights::load_hf_tensors(dir, device)?;
        let source_name = dir.display().to_string();
        Self::build(
            &config,
            tensors,
            dtype,
            device,
            source_name,
            Some((lora, source)),
        )
    }

    /// Builds from a parsed config and a name->Tensor map (HF names), e.g. for tests with random weights.
    pub fn from_tensors(
        config: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<CausalLm, ModelError> {
        Self::build(
            config,
            tensors,
            dtype,
            device,
            "the tensor map".to_string(),
            None,
        )
    }

    /// [`CausalLm::from_tensors`] under a LoRA adapter (see [`CausalLm::from_hf_dir_with_adapter`]).
    pub fn from_tensors_with_adapter(
        config: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        lora: LoraConfig,
        source: AdapterSource,
    ) -> Result<CausalLm, ModelError> {
        let name = "the tensor map".to_string();
        Self::build(config, tensors, dtype, device, name, Some((lora, source)))
    }

    fn build(
        config: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        source_name: String,
        adapter: Option<(LoraConfig, AdapterSource)>,
    ) -> Result<CausalLm, ModelError> {
        let lora = adapter.as_ref().map(|(c, _)| c.clone());
        if let Some(c) = &lora {
            if c.rank == 0 || c.targets.is_empty() || !c.alpha.is_finite() {
                return Err(ModelError::BadAdapter {
                    message: format!(
                        "rank {} with {} targets and alpha {}: an adapter needs a rank ≥ 1, a target and a finite alpha",
                        c.rank,
                        c.targets.len(),
                        c.alpha
                    ),
                });
            }
        }
        let mut w = Weights::new(tensors, dtype, device.clone(), source_name);
        if let Some((c, src)) = adapter {
            w = w.with_adapter(c, src);
        }
        let inner = match config.architecture.family().decoder {
            Decoder::Llama => Inner::Llama(llama::Model::load(config, &mut w)?),
            Decoder::Gemma3 => Inner::Gemma3(gemma3::Model::load(config, &mut w)?),
        };
        let unused = w.unused_names();
        if !unused.is_empty() {
            tracing::debug!(count = unused.len(), first = %unused[0], "ignored tensors");
        }
        let stray = w.unused_adapter_factors();
        if let Some(first) = stray.first() {
            return Err(ModelError::BadAdapter {
                message: format!(
                    "{} saved factors fit no adapted layer of this model (first: \"{first}\")",
                    stray.len()
                ),
            });
        }
        Ok(CausalLm {
            config: config.clone(),
            inner,
            parameters: w.into_parameters(),
            adapter: lora,
        })
    }

    /// Logits for every position: input_ids [batch, seq] u32 -> [batch, seq, vocab] (in the model dtype).
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.logits_from_hidden(&self.hidden_states(input_ids)?)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`, before the LM head.
    pub fn hidden_states(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.hidden_states_with(input_ids, None)
    }

    /// [`Self::hidden_states`], the projection weights sending their gradients to `sinks`.
    pub fn hidden_states_with(
        &self,
        input_ids: &Tensor,
        sinks: Option<&GradientSinks>,
    ) -> candle_core::Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        let mut x = self.embed(input_ids)?;
        let ctx = self.layer_context(seq, x.dtype(), &x.device().clone())?;
        let ctx = match sinks {
            Some(s) => ctx.with_sinks(s.clone()),
            None => ctx,
        };
        for i in 0..self.num_layers() {
            x = self.layer(i, &x, &ctx, None)?;
        }
        self.final_norm(&x)
    }

    /// Applies the LM head (and any final soft-capping) to hidden states `[.., hidden]`.
    pub fn logits_from_hidden(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.cap_logits(&self.lm_head().forward(hidden)?)
    }

    /// The scaled input embeddings `[batch, seq, hidden]` the first layer reads.
    pub fn embed(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        match &self.inner {
            Inner::Llama(m) => m.embed(input_ids),
            Inner::Gemma3(m) => m.embed(input_ids),
        }
    }

    /// The rope tables and masks shared by every layer of a batch of `seq_len` positions.
    pub fn layer_context(
        &self,
        seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<LayerContext> {
        match &self.inner {
            Inner::Llama(m) => m.layer_context(seq_len, dtype, device),
            Inner::Gemma3(m) => m.layer_context(seq_len, dtype, device),
        }
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        match &self.inner {
            Inner::Llama(m) => m.num_layers(),
            Inner::Gemma3(m) => m.num_layers(),
        }
    }

    /// Decoder layer `i` (0-based) on `x` `[batch, seq, hidden]`, recording its MLP's gate and
    /// up products on `tape` or replaying them from it (see [`ProjectionTape`]).
    pub fn layer(
        &self,
        i: usize,
        x: &Tensor,
        ctx: &LayerContext,
        tape: Option<&ProjectionTape>,
    ) -> candle_core::Result<Tensor> {
        match &self.inner {
            Inner::Llama(m) => m.layer(i, x, ctx, tape),
            Inner::Gemma3(m) => m.layer(i, x, ctx, tape),
        }
    }

    /// The norm after the last layer.
    pub fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.inner {
            Inner::Llama(m) => m.final_norm(x),
            Inner::Gemma3(m) => m.final_norm(x),
        }
    }

    /// Every decoder layer's attention and MLP projections.
    pub fn projections(&self) -> Vec<&Linear> {
        match &self.inner {
            Inner::Llama(m) => m.projections().collect(),
            Inner::Gemma3(m) => m.projections().collect(),
        }
    }

    /// The LM head (the embedding table when tied).
    pub fn lm_head(&self) -> &Linear {
        match &self.inner {
            Inner::Llama(m) => m.lm_head(),
            Inner::Gemma3(m) => m.lm_head(),
        }
    }

    /// Whether [`CausalLm::cap_logits`] changes the head's output (Gemma's final soft-capping).
    pub fn caps_logits(&self) -> bool {
        matches!(&self.inner, Inner::Gemma3(m) if m.final_logit_softcapping().is_some())
    }

    /// Logits from the LM head's raw output: Gemma's final soft-capping, identity elsewhere.
    pub fn cap_logits(&self, raw: &Tensor) -> candle_core::Result<Tensor> {
        let cap = match &self.inner {
            Inner::Gemma3(m) => m.final_logit_softcapping(),
            _ => None,
        };
        match cap {
            Some(cap) => (raw / cap)?.tanh()? * cap,
            None => Ok(raw.clone()),
        }
    }

    /// Sets the input-embedding row that gets no gradient through the input path (transformers'
    /// `padding_idx`; from `pad_token_id` when loaded), or `None` to train every row.
    pub fn set_padding_idx(&mut self, padding_idx: Option<u32>) {
        match &mut self.inner {
            Inner::Llama(m) => m.embed_tokens_mut().set_padding_idx(padding_idx),
            Inner::Gemma3(m) => m.embed_tokens_mut().set_padding_idx(padding_idx),
        }
    }

    /// The trainable parameters under their HF names (tied lm_head appears once, as model.embed_tokens.weight).
    pub fn parameters(&self) -> Vec<(String, Var)> {
        self.parameters.clone()
    }

    /// The adapter's configuration, when the base is frozen under one.
    pub fn adapter(&self) -> Option<&LoraConfig> {
        self.adapter.as_ref()
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of the weights and logits.
    pub fn dtype(&self) -> DType {
        self.lm_head().weight().dtype()
    }

    /// Writes config.json (as read) and model.safetensors (current weights, in `dtype`) to `dir`.
    /// A model under an adapter has no weights of its own to write: save its adapter instead.
    pub fn save_hf_dir(&self, dir: &Path, dtype: DType) -> Result<(), ModelError> {
        if self.adapter.is_some() {
            return Err(ModelError::BadAdapter {
                message: format!(
                    "{}: the base is frozen under an adapter; save the adapter, or merge it",
                    dir.display()
                ),
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config.raw).unwrap_or_default();
        std::fs::write(&config_path, text).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let weights_path = dir.join("model.safetensors");
        let candle_err = |source| ModelError::Candle {
            context: format!("saving {}", weights_path.display()),
            source,
        };
        let mut tensors = HashMap::new();
        for (name, var) in &self.parameters {
            let t = var.as_tensor().to_dtype(dtype).map_err(candle_err)?;
            tensors.insert(name.clone(), t);
        }
        candle_core::safetensors::save(&tensors, &weights_path).map_err(candle_err)
    }
}
