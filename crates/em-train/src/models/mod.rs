//! Differentiable causal language models loaded from Hugging Face checkpoints: Qwen2, Llama and
//! Gemma3 (text), one file each, built from the shared layers in [`crate::layers`].
//!
//! Every weight is a [`Var`], so a backward pass from the logits reaches all of them. There is no
//! KV cache: training runs the whole sequence at once.

pub mod gemma3;
pub mod llama;
pub mod qwen2;
mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::Deserialize;
use serde_json::Value;

use crate::layers::{Activation, RopeParams, RopeScaling};
pub use weights::Weights;

/// The model families this crate can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Qwen2 / Qwen2.5 / Qwen2.5-Math (`model_type: "qwen2"`).
    Qwen2,
    /// Llama 2/3, SmolLM2 (`model_type: "llama"`).
    Llama,
    /// Gemma3 text-only (`model_type: "gemma3_text"`).
    Gemma3,
}

impl Architecture {
    /// Recognises an HF `model_type` or `architectures` entry.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "qwen2" | "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "llama" | "LlamaForCausalLM" => Some(Self::Llama),
            "gemma3_text" | "gemma3" | "Gemma3ForCausalLM" => Some(Self::Gemma3),
            _ => None,
        }
    }
}

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
    /// A JSON file is not valid JSON.
    #[error("malformed JSON in {} at line {line}, column {column}: {message}", path.display())]
    MalformedJson {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the parser expected.
        message: String,
    },
    /// A configuration is valid JSON but lacks a field or has one of the wrong type or value.
    #[error("invalid configuration in {}: {message}", path.display())]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `model_type` names an architecture this crate does not implement.
    #[error(
        "unknown model_type \"{model_type}\" in {} (supported: qwen2, llama, gemma3_text)",
        path.display()
    )]
    UnknownModelType {
        /// The file.
        path: PathBuf,
        /// The value found (empty when absent).
        model_type: String,
    },
    /// The configuration asks for a feature this crate does not implement.
    #[error("unsupported configuration in {}: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature.
        what: String,
    },
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
    /// A tensor operation failed while building or saving the model.
    #[error("{context}: {source}")]
    Candle {
        /// What was being done.
        context: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// Architecture-independent hyper-parameters resolved from an HF config.json, with transformers'
/// defaults for absent fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Value")]
pub struct ModelConfig {
    /// Which model family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Size of each attention head (explicit `head_dim` or `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// MLP non-linearity.
    pub hidden_act: Activation,
    /// Epsilon of every RMS norm.
    pub rms_norm_eps: f64,
    /// Whether the LM head reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Rotary embedding of full-attention layers.
    pub rope: RopeParams,
    /// Rotary embedding of sliding-window layers (Gemma3's `rope_local_base_freq`; else as `rope`).
    pub local_rope: RopeParams,
    /// Per layer: `Some(window)` for a sliding-window layer, `None` for full causal attention.
    pub layer_windows: Vec<Option<usize>>,
    /// Attention logits are scaled by `query_pre_attn_scalar^-1/2` (`head_dim` unless Gemma3 says otherwise).
    pub query_pre_attn_scalar: f64,
    /// `tanh` soft-capping of attention logits.
    pub attn_logit_softcapping: Option<f64>,
    /// `tanh` soft-capping of output logits.
    pub final_logit_softcapping: Option<f64>,
    /// Context length the model was configured for.
    pub max_position_embeddings: usize,
    /// The config.json as read, for writing it back unchanged.
    pub raw: Value,
}

impl TryFrom<Value> for ModelConfig {
    type Error = ModelError;

    fn try_from(raw: Value) -> Result<Self, ModelError> {
        Self::from_value(raw, Path::new("config.json"))
    }
}

impl ModelConfig {
    /// Reads and resolves `path` (an HF config.json).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config.json text; `origin` names the file in error messages.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self, ModelError> {
        let raw: Value = serde_json::from_str(text).map_err(|e| json_error(e, origin))?;
        Self::resolve(&ConfigSource {
            raw: &raw,
            text: Some(text),
            origin,
        })
    }

    /// Resolves an already parsed config.json; `origin` names the file in error messages.
    pub fn from_value(raw: Value, origin: &Path) -> Result<Self, ModelError> {
        Self::resolve(&ConfigSource {
            raw: &raw,
            text: None,
            origin,
        })
    }

    fn resolve(src: &ConfigSource) -> Result<Self, ModelError> {
        let (raw, origin) = (src.raw, src.origin);
        let unknown = |model_type: String| ModelError::UnknownModelType {
            path: origin.to_path_buf(),
            model_type,
        };
        let model_type = raw.get("model_type").and_then(Value::as_str);
        let architecture = match model_type {
            Some(t) => Architecture::from_hf_name(t).ok_or_else(|| unknown(t.to_string()))?,
            None => raw
                .get("architectures")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .find_map(Architecture::from_hf_name)
                })
                .ok_or_else(|| unknown(String::new()))?,
        };
        let config = match architecture {
            Architecture::Qwen2 => qwen2::Config::resolve(src)?,
            Architecture::Llama => llama::Config::resolve(src)?,
            Architecture::Gemma3 => gemma3::Config::resolve(src)?,
        };
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &Path) -> Result<(), ModelError> {
        let invalid = |message: String| ModelError::InvalidConfig {
            path: origin.to_path_buf(),
            message,
        };
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(invalid(format!(
                "num_attention_heads ({h}) must be a positive multiple of num_key_value_heads ({kv})"
            )));
        }
        if self.head_dim == 0 || self.head_dim % 2 == 1 {
            return Err(invalid(format!(
                "head_dim ({}) must be even and positive",
                self.head_dim
            )));
        }
        if self.layer_windows.len() != self.num_hidden_layers {
            return Err(invalid(format!(
                "{} layer types for num_hidden_layers = {}",
                self.layer_windows.len(),
                self.num_hidden_layers
            )));
        }
        if self.layer_windows.contains(&Some(0)) {
            return Err(invalid("sliding_window must be positive".to_string()));
        }
        Ok(())
    }

    /// The HF names and shapes of every weight this configuration needs, in load order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut w = Weights::shape_recorder();
        // The recorder never fails: every shape it is asked for is recorded.
        let _ = match self.architecture {
            Architecture::Qwen2 => qwen2::Model::load(self, &mut w).map(|_| ()),
            Architecture::Llama => llama::Model::load(self, &mut w).map(|_| ()),
            Architecture::Gemma3 => gemma3::Model::load(self, &mut w).map(|_| ()),
        };
        w.recorded_shapes()
    }
}

/// Converts a serde_json error into a [`ModelError`] that names `path`.
pub(crate) fn json_error(e: serde_json::Error, path: &Path) -> ModelError {
    if e.is_data() {
        ModelError::InvalidConfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    } else {
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        ModelError::MalformedJson {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message,
        }
    }
}

/// A config.json being resolved: the parsed value, its text when known, and its path for errors.
#[derive(Debug, Clone, Copy)]
pub struct ConfigSource<'a> {
    /// The parsed JSON.
    pub raw: &'a Value,
    /// The text it was parsed from, for line numbers in errors.
    pub text: Option<&'a str>,
    /// The file, named in errors.
    pub origin: &'a Path,
}

/// Deserialises one architecture's view of config.json, naming the file (and line) on error.
pub(crate) fn parse_section<T: serde::de::DeserializeOwned>(
    src: &ConfigSource,
) -> Result<T, ModelError> {
    T::deserialize(src.raw).map_err(|e| {
        // Errors from a Value carry no position; the text, where known, does.
        let message = match src.text.map(serde_json::from_str::<T>) {
            Some(Err(with_line)) => with_line.to_string(),
            _ => e.to_string(),
        };
        ModelError::InvalidConfig {
            path: src.origin.to_path_buf(),
            message,
        }
    })
}

/// Parses an HF activation name, naming `origin` on error.
pub(crate) fn parse_activation(name: &str, origin: &Path) -> Result<Activation, ModelError> {
    Activation::from_hf_name(name).ok_or_else(|| ModelError::Unsupported {
        path: origin.to_path_buf(),
        what: format!("activation \"{name}\""),
    })
}

/// Resolves rotary parameters from `rope_theta` + `rope_scaling` (transformers 4.x) or from a
/// `rope_parameters` object (transformers 5), naming `origin` on error.
pub(crate) fn parse_rope(
    theta: f64,
    scaling: Option<&Value>,
    origin: &Path,
) -> Result<RopeParams, ModelError> {
    let unsupported = |what: String| ModelError::Unsupported {
        path: origin.to_path_buf(),
        what,
    };
    let Some(scaling) = scaling.filter(|v| !v.is_null()) else {
        return Ok(RopeParams {
            theta,
            scaling: None,
        });
    };
    let theta = scaling
        .get("rope_theta")
        .and_then(Value::as_f64)
        .unwrap_or(theta);
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, ModelError> {
        scaling
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| ModelError::InvalidConfig {
                path: origin.to_path_buf(),
                message: format!("rope scaling \"{kind}\" needs a number \"{key}\""),
            })
    };
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => return Err(unsupported(format!("rope scaling type \"{other}\""))),
    };
    Ok(RopeParams { theta, scaling })
}

/// A per-architecture model behind one interface.
#[derive(Debug, Clone)]
enum Inner {
    Qwen2(qwen2::Model),
    Llama(llama::Model),
    Gemma3(gemma3::Model),
}

/// A causal language model whose weights are all trainable [`Var`]s.
#[derive(Debug, Clone)]
pub struct CausalLm {
    config: ModelConfig,
    inner: Inner,
    parameters: Vec<(String, Var)>,
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
        Self::build(&config, tensors, dtype, device, dir.display().to_string())
    }

    /// Builds from a parsed config and a name->Tensor map (HF names), e.g. for tests with random weights.
    pub fn from_tensors(
        config: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<CausalLm, ModelError> {
        Self::build(config, tensors, dtype, device, "the tensor map".to_string())
    }

    fn build(
        config: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        source_name: String,
    ) -> Result<CausalLm, ModelError> {
        let mut w = Weights::new(tensors, dtype, device.clone(), source_name);
        let inner = match config.architecture {
            Architecture::Qwen2 => Inner::Qwen2(qwen2::Model::load(config, &mut w)?),
            Architecture::Llama => Inner::Llama(llama::Model::load(config, &mut w)?),
            Architecture::Gemma3 => Inner::Gemma3(gemma3::Model::load(config, &mut w)?),
        };
        let unused = w.unused_names();
        if !unused.is_empty() {
            tracing::debug!(count = unused.len(), first = %unused[0], "ignored tensors");
        }
        Ok(CausalLm {
            config: config.clone(),
            inner,
            parameters: w.into_parameters(),
        })
    }

    /// Logits for every position: input_ids [batch, seq] u32 -> [batch, seq, vocab] (in the model dtype).
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.logits_from_hidden(&self.hidden_states(input_ids)?)
    }

    /// Final-norm hidden states `[batch, seq, hidden]`, before the LM head.
    pub fn hidden_states(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        match &self.inner {
            Inner::Qwen2(m) => m.hidden_states(input_ids),
            Inner::Llama(m) => m.hidden_states(input_ids),
            Inner::Gemma3(m) => m.hidden_states(input_ids),
        }
    }

    /// Applies the LM head (and any final soft-capping) to hidden states `[.., hidden]`.
    pub fn logits_from_hidden(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        match &self.inner {
            Inner::Qwen2(m) => m.logits(hidden),
            Inner::Llama(m) => m.logits(hidden),
            Inner::Gemma3(m) => m.logits(hidden),
        }
    }

    /// The trainable parameters under their HF names (tied lm_head appears once, as model.embed_tokens.weight).
    pub fn parameters(&self) -> Vec<(String, Var)> {
        self.parameters.clone()
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of the weights and logits.
    pub fn dtype(&self) -> DType {
        self.parameters
            .first()
            .map_or(DType::F32, |(_, v)| v.as_tensor().dtype())
    }

    /// Writes config.json (as read) and model.safetensors (current weights, in `dtype`) to `dir`.
    pub fn save_hf_dir(&self, dir: &Path, dtype: DType) -> Result<(), ModelError> {
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
