//! em-config: the one reading of a Hugging Face `config.json` that every crate uses.
//!
//! Architecture invariant: knows JSON and transformers' configuration rules, and describes each
//! model family once ([`Family`]: its config reader, its decoder, llama.cpp's layout of it as plain
//! data); nothing of tensors, candle or llama.cpp's code. `em-train` builds its models from a
//! [`ModelConfig`] and `em-convert` writes GGUF from the same value and the family's layout, so the
//! two cannot disagree about a model.
//!
//! # Both transformers versions
//!
//! transformers 4.x writes the rotary base at the top level (`rope_theta`, with `rope_scaling`
//! and, for Gemma3, `rope_local_base_freq`) and the storage type as `torch_dtype`. transformers 5
//! writes a `rope_parameters` object (`{rope_theta, rope_type, factor, …}`; for Gemma3 one per
//! layer type, `{"full_attention": {…}, "sliding_attention": {…}}`) and `dtype`. Both resolve to
//! the same [`ModelConfig`]; a file that carries both forms with different values is an error.
//!
//! # Required keys and defaults
//!
//! Nothing that changes the model is defaulted silently. These keys are required, and a file
//! without one is a [`ConfigError::MissingKey`] that names the key and the file:
//! `vocab_size`, `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`,
//! `rms_norm_eps`, `max_position_embeddings`, the rotary base (`rope_theta` or
//! `rope_parameters.rope_theta`; Gemma3: or `rope_parameters.full_attention.rope_theta`) and, for
//! Gemma3, `sliding_window` and the local rotary base (`rope_local_base_freq` or
//! `rope_parameters.sliding_attention.rope_theta`).
//!
//! The other keys are ones transformers' configuration class fills in when they are absent
//! (`save_pretrained` writes a diff against the class defaults, and hand-written or older files
//! leave them out). Such a key gets that class's value, and every one applied is listed in
//! [`ModelConfig::defaults_applied`] as `(key, value)`:
//!
//! | key | `LlamaConfig` | `Qwen2Config` | `Gemma3TextConfig` |
//! |---|---|---|---|
//! | `num_key_value_heads` | `num_attention_heads` | 32 (`num_attention_heads` when null) | 4 |
//! | `head_dim` | `hidden_size / num_attention_heads` | `hidden_size / num_attention_heads` | 256 |
//! | `hidden_act` (Gemma3: `hidden_activation`, else `hidden_act`) | `silu` | `silu` | `gelu_pytorch_tanh` |
//! | `tie_word_embeddings` | false | false | true |
//! | `attention_bias` | false | (no key: q/k/v biased, o not) | false |
//! | `mlp_bias` | false | (no key: none) | (no key: none) |
//! | `use_sliding_window` | — | false | — |
//! | `sliding_window` | — | 4096, read only when `use_sliding_window` | required |
//! | `max_window_layers` | — | 28, read only for a sliding window without `layer_types` | — |
//! | `sliding_window_pattern` | — | — | 6, read only without `layer_types` |
//! | `query_pre_attn_scalar` | — | — | 256 |
//!
//! Keys whose class default is "none" mean the same absent as null and are not listed:
//! `rope_scaling` (no scaling), `layer_types` (derived as above), `attn_logit_softcapping` and
//! `final_logit_softcapping` (no cap), `dtype`/`torch_dtype` (unknown).

#![warn(missing_docs)]

pub mod family;
pub mod gemma3;
pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;
mod rope;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

pub use family::{Decoder, Family, GgufLayout, GgufShape, Windows, FAMILIES};
pub use rope::{parse_scaling, RopeParams, RopeScaling};

/// Most decoder layers a config.json may declare (released models have under 200): per-layer
/// tables are built from this count before any weight is read.
pub const MAX_LAYERS: usize = 1 << 16;

/// The model families the workspace supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Qwen2 / Qwen2.5 / Qwen2.5-Math (`model_type: "qwen2"`).
    Qwen2,
    /// Llama 2/3, SmolLM2 (`model_type: "llama"`).
    Llama,
    /// Gemma3 text-only (`model_type: "gemma3_text"`).
    Gemma3,
    /// Qwen3 dense (`model_type: "qwen3"`): q/k RMS norms over each head, no q/k/v bias.
    Qwen3,
    /// Mistral (`model_type: "mistral"`): the Llama layout with an optional sliding window.
    Mistral,
}

impl Architecture {
    /// Every architecture (a test checks it against [`FAMILIES`]).
    pub const ALL: &'static [Architecture] = &[
        Self::Qwen2,
        Self::Qwen3,
        Self::Llama,
        Self::Mistral,
        Self::Gemma3,
    ];

    /// Recognises an HF `model_type` or `architectures` entry.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        FAMILIES
            .iter()
            .find(|f| f.hf_model_type == name || f.hf_class == name || f.hf_aliases.contains(&name))
            .map(|f| f.architecture)
    }

    /// The `model_type` transformers writes.
    pub fn hf_model_type(self) -> &'static str {
        self.family().hf_model_type
    }

    /// The causal-LM class transformers writes in `architectures`.
    pub fn hf_class(self) -> &'static str {
        self.family().hf_class
    }
}

/// The non-linearity of the gated MLP (HF `hidden_act` / `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(x)` ("silu", "swish").
    Silu,
    /// GELU with the tanh approximation ("gelu_pytorch_tanh", "gelu_new", "gelu_fast").
    GeluTanh,
    /// Exact GELU with erf ("gelu").
    Gelu,
}

impl Activation {
    /// Parses an HF activation name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Self::GeluTanh),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    /// The canonical HF name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::GeluTanh => "gelu_pytorch_tanh",
            Self::Gelu => "gelu",
        }
    }
}

/// Why a config.json could not be resolved; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid JSON.
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
    /// A key that changes the model is absent (or null), and is never defaulted.
    #[error(
        "missing required key \"{key}\"{} in {} (it changes the model, so it is never defaulted)",
        or_alternatives(alternatives),
        path.display()
    )]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key, as transformers 4.x writes it.
        key: String,
        /// Other places the same value may be given (e.g. `rope_parameters.rope_theta`).
        alternatives: Vec<String>,
    },
    /// A key has the wrong type, or keys contradict each other or the architecture.
    #[error("invalid configuration in {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `model_type` (or `architectures`) names no supported architecture.
    #[error(
        "unsupported architecture: {} in {} (supported: qwen2, qwen3, llama, mistral, gemma3_text; dense models only)",
        describe_model_type(model_type),
        path.display()
    )]
    UnknownModelType {
        /// The file.
        path: PathBuf,
        /// The `model_type` found (empty when there is none).
        model_type: String,
    },
    /// The configuration asks for a feature that is not implemented.
    #[error("unsupported configuration in {}: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature.
        what: String,
    },
}

fn or_alternatives(alternatives: &[String]) -> String {
    alternatives
        .iter()
        .map(|a| format!(" or \"{a}\""))
        .collect()
}

fn describe_model_type(model_type: &str) -> String {
    if model_type.is_empty() {
        "no model_type and no known architectures entry".to_string()
    } else {
        format!("model_type \"{model_type}\"")
    }
}

impl ConfigError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::MalformedJson { path, .. }
            | Self::MissingKey { path, .. }
            | Self::Invalid { path, .. }
            | Self::UnknownModelType { path, .. }
            | Self::Unsupported { path, .. } => path,
        }
    }
}

/// An HF config.json resolved into the hyper-parameters that define the model (see the crate
/// documentation for which keys are required and which get transformers' defaults).
///
/// Two values are equal when they describe the same model with the same defaults applied; `raw`,
/// the JSON as read, is not compared, so a transformers 4.x file equals its 5.x twin.
#[derive(Debug, Clone, Deserialize)]
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
    /// Size of each attention head.
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
    /// RMS norms over `head_dim` on each query and key head before the rotary embedding (Qwen3,
    /// Gemma3: `self_attn.q_norm`, `self_attn.k_norm`).
    pub qk_norm: bool,
    /// Rotary embedding of full-attention layers.
    pub rope: RopeParams,
    /// Rotary embedding of sliding-window layers (Gemma3's local base; else the same as `rope`).
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
    /// The declared storage type (`dtype`, or 4.x `torch_dtype`), e.g. "bfloat16"; informational.
    pub dtype: Option<String>,
    /// `pad_token_id`: transformers' `nn.Embedding(padding_idx=…)` gives this row of the input
    /// embedding no gradient through the input path (absent or null: none).
    pub pad_token_id: Option<u32>,
    /// `(key, value)` for every absent key that got its transformers class default, in the order applied.
    pub defaults_applied: Vec<(String, String)>,
    /// The config.json as read, for writing it back unchanged.
    pub raw: Value,
}

impl PartialEq for ModelConfig {
    fn eq(&self, other: &Self) -> bool {
        // Destructured so that a new field cannot be left out of the comparison by accident.
        let Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            rms_norm_eps,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            rope,
            local_rope,
            layer_windows,
            query_pre_attn_scalar,
            attn_logit_softcapping,
            final_logit_softcapping,
            max_position_embeddings,
            dtype,
            pad_token_id,
            defaults_applied,
            raw: _,
        } = self;
        *architecture == other.architecture
            && *vocab_size == other.vocab_size
            && *hidden_size == other.hidden_size
            && *intermediate_size == other.intermediate_size
            && *num_hidden_layers == other.num_hidden_layers
            && *num_attention_heads == other.num_attention_heads
            && *num_key_value_heads == other.num_key_value_heads
            && *head_dim == other.head_dim
            && *hidden_act == other.hidden_act
            && *rms_norm_eps == other.rms_norm_eps
            && *tie_word_embeddings == other.tie_word_embeddings
            && *qkv_bias == other.qkv_bias
            && *o_bias == other.o_bias
            && *mlp_bias == other.mlp_bias
            && *qk_norm == other.qk_norm
            && *rope == other.rope
            && *local_rope == other.local_rope
            && *layer_windows == other.layer_windows
            && *query_pre_attn_scalar == other.query_pre_attn_scalar
            && *attn_logit_softcapping == other.attn_logit_softcapping
            && *final_logit_softcapping == other.final_logit_softcapping
            && *max_position_embeddings == other.max_position_embeddings
            && *dtype == other.dtype
            && *pad_token_id == other.pad_token_id
            && *defaults_applied == other.defaults_applied
    }
}

impl TryFrom<Value> for ModelConfig {
    type Error = ConfigError;

    fn try_from(raw: Value) -> Result<Self, ConfigError> {
        Self::from_value(raw, Path::new("config.json"))
    }
}

impl ModelConfig {
    /// Reads and resolves `path` (an HF config.json).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config.json text; `origin` names the file in error messages.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let raw: Value = serde_json::from_str(text).map_err(|e| json_error(e, origin))?;
        Self::resolve(&ConfigSource {
            raw: &raw,
            text: Some(text),
            origin,
        })
    }

    /// Resolves an already parsed config.json; `origin` names the file in error messages.
    pub fn from_value(raw: Value, origin: &Path) -> Result<Self, ConfigError> {
        Self::resolve(&ConfigSource {
            raw: &raw,
            text: None,
            origin,
        })
    }

    /// Picks the architecture from `model_type` (else `architectures`), resolves its keys and
    /// checks the result.
    pub fn resolve(src: &ConfigSource) -> Result<Self, ConfigError> {
        let (raw, origin) = (src.raw, src.origin);
        if !raw.is_object() {
            return Err(src.invalid("the top level must be a JSON object".to_string()));
        }
        let unknown = |model_type: String| ConfigError::UnknownModelType {
            path: origin.to_path_buf(),
            model_type,
        };
        let architecture = match raw.get("model_type").and_then(Value::as_str) {
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
        let config = (architecture.family().resolve)(src)?;
        config.validate(origin)?;
        Ok(config)
    }

    /// The value applied for `key` when it was absent, if it was.
    pub fn default_applied(&self, key: &str) -> Option<&str> {
        self.defaults_applied
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            message,
        };
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ] {
            if value == 0 {
                return Err(invalid(format!("{key} must be positive")));
            }
        }
        // llama.cpp stores sizes as u32, and products of two sizes then fit in 64 bits.
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value > u32::MAX as usize {
                return Err(invalid(format!("{key} ({value}) is more than 2^32 - 1")));
            }
        }
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
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid(format!(
                "rms_norm_eps ({}) must be positive",
                self.rms_norm_eps
            )));
        }
        for (what, rope) in [("rope", &self.rope), ("local rope", &self.local_rope)] {
            if !(rope.theta.is_finite() && rope.theta > 0.0) {
                return Err(invalid(format!(
                    "{what} base ({}) must be positive",
                    rope.theta
                )));
            }
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
}

/// Converts a serde_json error about the file `path` into a [`ConfigError`] that names it.
pub fn json_error(e: serde_json::Error, path: &Path) -> ConfigError {
    if e.is_data() {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    } else {
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        ConfigError::MalformedJson {
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

impl ConfigSource<'_> {
    /// Deserialises one view of the file, naming the file (and, from the text, the line) on error.
    pub(crate) fn section<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        T::deserialize(self.raw).map_err(|e| {
            // Errors from a Value carry no position; the text, where known, does.
            let message = match self.text.map(serde_json::from_str::<T>) {
                Some(Err(with_line)) => with_line.to_string(),
                _ => e.to_string(),
            };
            self.invalid(message)
        })
    }

    pub(crate) fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.origin.to_path_buf(),
            message,
        }
    }

    pub(crate) fn unsupported(&self, what: String) -> ConfigError {
        ConfigError::Unsupported {
            path: self.origin.to_path_buf(),
            what,
        }
    }

    pub(crate) fn missing(&self, key: &str, alternatives: &[String]) -> ConfigError {
        ConfigError::MissingKey {
            path: self.origin.to_path_buf(),
            key: key.to_string(),
            alternatives: alternatives.to_vec(),
        }
    }

    /// Whether `key` is present at the top level, even as null.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.raw.get(key).is_some()
    }
}

/// The keys every architecture reads, each `None` when absent or null.
#[derive(Debug, Deserialize)]
pub(crate) struct CommonKeys {
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub layer_types: Option<Vec<String>>,
    pub dtype: Option<Value>,
    pub torch_dtype: Option<Value>,
    pub pad_token_id: Option<Value>,
}

/// The required hyper-parameters, present in every file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Required {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
}

/// Resolution of one file: the source, its common keys, and the defaults applied so far.
pub(crate) struct Resolver<'a> {
    pub src: &'a ConfigSource<'a>,
    pub common: CommonKeys,
    applied: Vec<(String, String)>,
}

impl<'a> Resolver<'a> {
    pub fn new(src: &'a ConfigSource<'a>) -> Result<Self, ConfigError> {
        Ok(Self {
            src,
            common: src.section()?,
            applied: Vec::new(),
        })
    }

    /// `value`, or a [`ConfigError::MissingKey`] for `key`.
    pub fn required<T>(&self, key: &str, value: Option<T>) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.src.missing(key, &[]))
    }

    /// The keys no architecture defaults.
    pub fn required_common(&self) -> Result<Required, ConfigError> {
        let c = &self.common;
        if let Some(n) = c.num_hidden_layers.filter(|&n| n > MAX_LAYERS) {
            return Err(self
                .src
                .invalid(format!("num_hidden_layers ({n}) is more than {MAX_LAYERS}")));
        }
        Ok(Required {
            vocab_size: self.required("vocab_size", c.vocab_size)?,
            hidden_size: self.required("hidden_size", c.hidden_size)?,
            intermediate_size: self.required("intermediate_size", c.intermediate_size)?,
            num_hidden_layers: self.required("num_hidden_layers", c.num_hidden_layers)?,
            num_attention_heads: self.required("num_attention_heads", c.num_attention_heads)?,
            max_position_embeddings: self
                .required("max_position_embeddings", c.max_position_embeddings)?,
            rms_norm_eps: self.required("rms_norm_eps", c.rms_norm_eps)?,
        })
    }

    /// `value`, or `default` recorded as applied for `key`.
    pub fn or_default<T: ToString>(&mut self, key: &str, value: Option<T>, default: T) -> T {
        match value {
            Some(v) => v,
            None => {
                self.applied.push((key.to_string(), default.to_string()));
                default
            }
        }
    }

    /// `head_dim`, or `hidden_size / num_attention_heads` (Llama's and Qwen2's rule) recorded.
    pub fn head_dim_or_split(&mut self, req: &Required) -> usize {
        let split = req.hidden_size / req.num_attention_heads.max(1);
        self.or_default("head_dim", self.common.head_dim, split)
    }

    /// The activation named by `value` (or `default`, recorded as applied for `key`).
    pub fn activation(
        &mut self,
        key: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<Activation, ConfigError> {
        let name = self.or_default(key, value, default.to_string());
        Activation::from_hf_name(&name)
            .ok_or_else(|| self.src.unsupported(format!("activation \"{name}\"")))
    }

    /// The declared storage type: 5.x `dtype`, else 4.x `torch_dtype`.
    pub fn dtype(&self) -> Option<String> {
        let c = &self.common;
        c.dtype
            .as_ref()
            .or(c.torch_dtype.as_ref())
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// `pad_token_id` when it is a token id (null, absent or a list: none).
    pub fn pad_token_id(&self) -> Option<u32> {
        self.common
            .pad_token_id
            .as_ref()
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok())
    }

    pub fn into_applied(self) -> Vec<(String, String)> {
        self.applied
    }

    /// The one rotary embedding of a Llama-layout family: 4.x `rope_theta` and `rope_scaling`,
    /// or 5.x `rope_parameters`.
    pub fn global_rope(&self) -> Result<RopeParams, ConfigError> {
        rope::resolve_rope(
            self.src,
            rope::RopeSource {
                theta_key: "rope_theta",
                theta: self.common.rope_theta,
                scaling: self.common.rope_scaling.as_ref(),
                params_key: "rope_parameters",
                params: self.common.rope_parameters.as_ref(),
            },
        )
    }

    /// `num_key_value_heads`: absent, the class default `absent` (recorded); null, `heads`.
    pub fn kv_heads(&mut self, heads: usize, absent: usize) -> usize {
        let default = if self.src.has("num_key_value_heads") {
            heads
        } else {
            absent
        };
        self.or_default(
            "num_key_value_heads",
            self.common.num_key_value_heads,
            default,
        )
    }

    /// The configuration of a Llama-layout decoder from what its family decided: the same rotary
    /// embedding on every layer, attention scaled by `head_dim`, no soft-capping.
    pub fn llama_layout(self, req: &Required, parts: LlamaLayout) -> ModelConfig {
        let dtype = self.dtype();
        let pad_token_id = self.pad_token_id();
        let raw = self.src.raw.clone();
        ModelConfig {
            architecture: parts.architecture,
            vocab_size: req.vocab_size,
            hidden_size: req.hidden_size,
            intermediate_size: req.intermediate_size,
            num_hidden_layers: req.num_hidden_layers,
            num_attention_heads: req.num_attention_heads,
            num_key_value_heads: parts.num_key_value_heads,
            head_dim: parts.head_dim,
            hidden_act: parts.hidden_act,
            rms_norm_eps: req.rms_norm_eps,
            tie_word_embeddings: parts.tie_word_embeddings,
            qkv_bias: parts.qkv_bias,
            o_bias: parts.o_bias,
            mlp_bias: parts.mlp_bias,
            qk_norm: parts.qk_norm,
            local_rope: parts.rope.clone(),
            rope: parts.rope,
            layer_windows: parts.layer_windows,
            query_pre_attn_scalar: parts.head_dim as f64,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            max_position_embeddings: req.max_position_embeddings,
            dtype,
            pad_token_id,
            defaults_applied: self.applied,
            raw,
        }
    }
}

/// What a Llama-layout family decides for [`Resolver::llama_layout`].
pub(crate) struct LlamaLayout {
    pub architecture: Architecture,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: Activation,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub qk_norm: bool,
    pub rope: RopeParams,
    pub layer_windows: Vec<Option<usize>>,
}

/// Per-layer windows from `layer_types` ("full_attention" / "sliding_attention").
pub(crate) fn windows_from_layer_types(
    src: &ConfigSource,
    types: &[String],
    window: Option<usize>,
) -> Result<Vec<Option<usize>>, ConfigError> {
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => window.map(Some).ok_or_else(|| {
                src.invalid(
                    "layer_types has \"sliding_attention\" but sliding_window is null".to_string(),
                )
            }),
            other => Err(src.unsupported(format!("layer type \"{other}\""))),
        })
        .collect()
}

#[cfg(test)]
mod tests;
