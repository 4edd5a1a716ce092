//! What differs between architectures on the way between HF and GGUF: hyperparameter keys, tensor
//! names, and the few tensors whose values change (llama's Q/K row order, gemma's `1 + w` norms).
//!
//! config.json is read by em-config, the same reader training uses; this module only maps a
//! [`ModelConfig`] to llama.cpp's metadata and refuses what llama.cpp's architectures cannot express.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::Tensor;
use em_config::{GgufShape, ModelConfig, RopeScaling, Windows};
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::path::Path;

/// The architectures `convert` knows: em-config's.
pub use em_config::Architecture as Arch;

/// GGUF's names of the architectures.
pub trait GgufArch: Sized {
    /// `general.architecture` in GGUF.
    fn gguf_name(self) -> &'static str;
    /// The architecture a GGUF's `general.architecture` names; `path` appears in the error.
    fn from_gguf_name(name: &str, path: &Path) -> Result<Self>;
}

impl GgufArch for Arch {
    fn gguf_name(self) -> &'static str {
        self.family().gguf.name
    }

    /// The first family llama.cpp names so (Llama for `llama`; Mistral files are recognised by
    /// their recorded window in [`Hparams::from_gguf`]).
    fn from_gguf_name(name: &str, path: &Path) -> Result<Self> {
        if let Some(f) = em_config::FAMILIES.iter().find(|f| f.gguf.name == name) {
            return Ok(f.architecture);
        }
        let mut known: Vec<&str> = em_config::FAMILIES.iter().map(|f| f.gguf.name).collect();
        known.dedup();
        bail!(
            "{}: unsupported architecture {name:?} (supported: {})",
            path.display(),
            known.join(", ")
        )
    }
}

/// Largest size GGUF metadata holds (llama.cpp reads sizes as u32).
const MAX_SIZE: usize = u32::MAX as usize;

/// The hyperparameters both formats carry.
#[derive(Debug, Clone)]
pub struct Hparams {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// gemma3: sliding window size, per-layer sliding flags, local rope base, linear rope scaling.
    pub sliding_window: Option<usize>,
    pub sliding_layers: Vec<bool>,
    pub rope_local_base_freq: Option<f64>,
    pub rope_linear_factor: Option<f64>,
    /// llama/mistral: Llama 3's frequency-dependent rope scaling, stored in GGUF as the
    /// per-frequency divisors of `rope_freqs.weight` (as llama.cpp's converter does).
    pub rope_llama3: Option<RopeScaling>,
    /// What the conversion cannot carry exactly, for the user (one line each).
    pub notes: Vec<String>,
}

/// The GGUF tensor of Llama 3's rope scaling: one divisor per rotary frequency.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

impl Hparams {
    /// Reads config.json (as JSON already parsed from `path`) through em-config.
    pub fn from_hf_config(config: &Json, path: &Path) -> Result<Self> {
        let cfg = ModelConfig::from_value(config.clone(), path)?;
        Self::from_model_config(&cfg, path)
    }

    /// The GGUF view of a resolved config.json; an error for anything the GGUF architecture
    /// would silently compute differently (`path` names the file).
    pub fn from_model_config(cfg: &ModelConfig, path: &Path) -> Result<Self> {
        let arch = cfg.architecture;
        let layout = &arch.family().gguf;
        let name = layout.name;
        let unsupported = |what: String| -> anyhow::Error {
            anyhow::anyhow!(
                "{}: {what} is not supported for {name} by llama.cpp",
                path.display()
            )
        };
        let (rope_linear_factor, rope_llama3) = match &cfg.rope.scaling {
            None => (None, None),
            Some(s) if !layout.rope_scalings.contains(&s.rope_type()) => {
                return Err(unsupported(format!("rope scaling \"{}\"", s.rope_type())))
            }
            Some(RopeScaling::Linear { factor }) => (Some(*factor), None),
            Some(s @ RopeScaling::Llama3 { .. }) => (None, Some(s.clone())),
        };
        if cfg.hidden_act != layout.activation {
            return Err(unsupported(format!(
                "activation \"{}\"",
                cfg.hidden_act.hf_name()
            )));
        }
        if cfg.qkv_bias != layout.qkv_bias || cfg.o_bias || cfg.mlp_bias {
            return Err(unsupported(format!(
                "biases (q/k/v {}, o {}, mlp {})",
                cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias
            )));
        }
        if cfg.qk_norm != layout.qk_norm {
            return Err(unsupported(format!("q/k norms ({})", cfg.qk_norm)));
        }
        if cfg.attn_logit_softcapping.is_some() || cfg.final_logit_softcapping.is_some() {
            return Err(unsupported("logit soft-capping".to_string()));
        }
        let mut windows = cfg.layer_windows.iter().flatten();
        let window = windows.next().copied();
        if windows.any(|w| Some(*w) != window) {
            return Err(unsupported(
                "sliding windows of different sizes".to_string(),
            ));
        }
        let sliding_layers: Vec<bool> = cfg.layer_windows.iter().map(Option::is_some).collect();
        let mut notes = vec![];
        let (sliding_window, sliding_layers, rope_local_base_freq) = match layout.windows {
            Windows::Refused if window.is_some() => {
                return Err(unsupported("sliding-window attention".to_string()))
            }
            Windows::Refused => (None, vec![], None),
            Windows::Pattern => {
                if let Some(s) = &cfg.local_rope.scaling {
                    return Err(unsupported(format!(
                        "rope scaling \"{}\" of sliding-window layers",
                        s.rope_type()
                    )));
                }
                (window, sliding_layers, Some(cfg.local_rope.theta))
            }
            Windows::RecordedOnly => {
                if let Some(w) = window.filter(|&w| w < cfg.max_position_embeddings) {
                    notes.push(format!(
                        "{}: llama.cpp runs {} as {name}, without the sliding window of {w}: \
                         sequences longer than {w} tokens sample from full attention there \
                         (training keeps the window)",
                        path.display(),
                        arch.hf_class()
                    ));
                }
                (window, sliding_layers, None)
            }
        };
        let hp = Self::with_arch(
            cfg,
            arch,
            sliding_window,
            sliding_layers,
            rope_local_base_freq,
            rope_linear_factor,
            rope_llama3,
            notes,
        );
        let expected = (layout.query_pre_attn_scalar)(&hp.shape());
        if cfg.query_pre_attn_scalar != expected as f64 {
            return Err(unsupported(format!(
                "query_pre_attn_scalar {} (llama.cpp uses {expected})",
                cfg.query_pre_attn_scalar
            )));
        }
        Ok(hp)
    }

    /// The shape facts the family rules of em-config read.
    pub fn shape(&self) -> GgufShape {
        GgufShape {
            num_layers: self.num_layers,
            hidden_size: self.hidden_size,
            num_heads: self.num_heads,
            head_dim: self.head_dim,
            sliding_window: self.sliding_window,
            sliding_layers: self.sliding_layers.clone(),
            rope_local_base_freq: self.rope_local_base_freq,
            rope_linear_factor: self.rope_linear_factor,
        }
    }

    /// How llama.cpp holds this family.
    fn layout(&self) -> &'static em_config::GgufLayout {
        &self.arch.family().gguf
    }

    #[allow(clippy::too_many_arguments)]
    fn with_arch(
        cfg: &ModelConfig,
        arch: Arch,
        sliding_window: Option<usize>,
        sliding_layers: Vec<bool>,
        rope_local_base_freq: Option<f64>,
        rope_linear_factor: Option<f64>,
        rope_llama3: Option<RopeScaling>,
        notes: Vec<String>,
    ) -> Self {
        Self {
            arch,
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            max_position_embeddings: cfg.max_position_embeddings,
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope.theta,
            tie_word_embeddings: cfg.tie_word_embeddings,
            sliding_window,
            sliding_layers,
            rope_local_base_freq,
            rope_linear_factor,
            rope_llama3,
            notes,
        }
    }

    /// The divisors llama.cpp applies to each rotary frequency (`rope_freqs.weight`) for Llama 3
    /// scaling, computed as transformers' `_compute_llama3_parameters` scales `inv_freq`.
    pub fn rope_freqs(&self) -> Option<Vec<f32>> {
        let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = &self.rope_llama3
        else {
            return None;
        };
        Some(llama3_divisors(
            self.rope_theta,
            self.head_dim,
            *factor,
            *low_freq_factor,
            *high_freq_factor,
            *original_max_position_embeddings as f64,
        ))
    }

    /// Reads Llama 3 scaling back from `rope_freqs.weight`: the factor is the largest divisor;
    /// Meta's low/high frequency factors (1 and 4) are assumed and the original context length
    /// solved from a divisor between the two bounds; the result must reproduce every divisor,
    /// or the file is refused (`path` names it).
    pub fn set_rope_freqs(&mut self, divisors: &[f32], path: &Path) -> Result<()> {
        if !self.layout().rope_scalings.contains(&"llama3") {
            bail!(
                "{}: {ROPE_FREQS} in a {} model (llama.cpp reads it only for llama)",
                path.display(),
                self.arch.gguf_name()
            );
        }
        if divisors.len() != self.head_dim / 2 {
            bail!(
                "{}: {ROPE_FREQS} has {} values for a head size of {}",
                path.display(),
                divisors.len(),
                self.head_dim
            );
        }
        let (low, high) = (1.0, 4.0);
        let factor = divisors.iter().fold(1.0f32, |m, &d| m.max(d)) as f64;
        let inv_freq = |i: usize| {
            self.rope_theta
                .powf(-((2 * i) as f64) / self.head_dim as f64)
        };
        // A divisor strictly between 1 and the factor sits in the smooth band, where
        // 1/d = (1 − s)/factor + s and s = (original / wavelength − low) / (high − low).
        let smooth = divisors
            .iter()
            .enumerate()
            .find(|(_, &d)| (d as f64) > 1.0 + 1e-4 && (d as f64) < factor * (1.0 - 1e-4));
        let wavelength = |i: usize| 2.0 * std::f64::consts::PI / inv_freq(i);
        let original = match smooth {
            Some((i, &d)) => {
                let s = (1.0 / d as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
                (s * (high - low) + low) * wavelength(i)
            }
            // No divisor in the band: any original length between the last kept and the first
            // scaled wavelength gives these divisors; take the one at the band's lower edge.
            None => {
                let first_scaled = divisors.iter().position(|&d| d as f64 > 1.0 + 1e-4);
                match first_scaled {
                    Some(i) => wavelength(i) * low,
                    None => bail!(
                        "{}: {ROPE_FREQS} scales no frequency; it is not Llama 3 scaling",
                        path.display()
                    ),
                }
            }
        }
        .round();
        let want = llama3_divisors(self.rope_theta, self.head_dim, factor, low, high, original);
        if let Some((i, (a, b))) = divisors
            .iter()
            .zip(&want)
            .enumerate()
            .find(|(_, (a, b))| ((**a - **b) / **b).abs() > 1e-4)
        {
            bail!(
                "{}: {ROPE_FREQS}[{i}] is {a}, but Llama 3 scaling (factor {factor}, low/high frequency factors 1/4, original context {original}) gives {b}; other scalings are not supported",
                path.display()
            );
        }
        self.rope_llama3 = Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original as usize,
        });
        Ok(())
    }

    /// `{arch}.*` GGUF metadata as llama.cpp reads it.
    pub fn to_gguf_metadata(&self) -> Vec<(String, Value)> {
        let a = self.arch.gguf_name();
        let k = |s: &str| format!("{a}.{s}");
        let u = |x: usize| Value::U32(x as u32);
        let mut m = vec![
            (k("context_length"), u(self.max_position_embeddings)),
            (k("embedding_length"), u(self.hidden_size)),
            (k("block_count"), u(self.num_layers)),
            (k("feed_forward_length"), u(self.intermediate_size)),
            (k("attention.head_count"), u(self.num_heads)),
            (k("attention.head_count_kv"), u(self.num_kv_heads)),
            (k("attention.key_length"), u(self.head_dim)),
            (k("attention.value_length"), u(self.head_dim)),
            (k("rope.freq_base"), Value::F32(self.rope_theta as f32)),
            (
                k("attention.layer_norm_rms_epsilon"),
                Value::F32(self.rms_norm_eps as f32),
            ),
            (k("vocab_size"), u(self.vocab_size)),
        ];
        let layout = self.layout();
        if layout.rope_dimension_count {
            m.push((k("rope.dimension_count"), u(self.head_dim)));
        }
        // llama.cpp's llama reads no window; the key marks the file as Mistral's for the way
        // back to HF.
        if let (Windows::RecordedOnly, Some(window)) = (layout.windows, self.sliding_window) {
            m.push((k("attention.sliding_window"), u(window)));
        }
        if layout.windows == Windows::Pattern {
            if let Some(window) = self.sliding_window {
                m.push((k("attention.sliding_window"), u(window)));
                m.push((
                    k("attention.sliding_window_pattern"),
                    Value::Array(
                        self.sliding_layers
                            .iter()
                            .map(|&b| Value::Bool(b))
                            .collect(),
                    ),
                ));
            }
            if let Some(base) = self.rope_local_base_freq {
                m.push((k("rope.freq_base_swa"), Value::F32(base as f32)));
            }
        }
        if let Some(factor) = self.rope_linear_factor {
            m.push((k("rope.scaling.type"), Value::String("linear".into())));
            m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        m
    }

    /// Reads the hyperparameters back from GGUF metadata; `has_output` says whether `output.weight` exists.
    pub fn from_gguf(md: &HashMap<String, Value>, has_output: bool, path: &Path) -> Result<Self> {
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .with_context(|| format!("{}: missing general.architecture", path.display()))?;
        let mut arch = Arch::from_gguf_name(arch_name, path)?;
        let a = arch.gguf_name();
        let num = |key: &str| -> Result<usize> {
            let full = format!("{a}.{key}");
            let v = md
                .get(&full)
                .with_context(|| format!("{}: missing {full}", path.display()))?;
            as_u64(v)
                .map(|x| x as usize)
                .with_context(|| format!("{}: {full} is not an integer", path.display()))
        };
        let opt_num = |key: &str| {
            md.get(&format!("{a}.{key}"))
                .and_then(as_u64)
                .map(|x| x as usize)
        };
        // GGUF stores f32; the shortest decimal that rounds to it is what config.json said
        // (1e-6, not 9.99999997e-7), so a converted config reads back to the same numbers.
        let float = |key: &str| {
            md.get(&format!("{a}.{key}")).and_then(|v| {
                v.to_f32()
                    .ok()
                    .map(|x| x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
                    .or(v.to_f64().ok())
            })
        };
        let hidden_size = num("embedding_length")?;
        let num_heads = num("attention.head_count")?;
        let num_layers = num("block_count")?;
        // Shapes and per-layer tables are built from these next.
        let bounded = |key: &str, value: usize, max: usize| -> Result<()> {
            if value == 0 || value > max {
                bail!(
                    "{}: {a}.{key} is {value}; it must be between 1 and {max}",
                    path.display()
                );
            }
            Ok(())
        };
        bounded("embedding_length", hidden_size, MAX_SIZE)?;
        bounded("attention.head_count", num_heads, MAX_SIZE)?;
        bounded("block_count", num_layers, em_config::MAX_LAYERS)?;
        let vocab_size = match opt_num("vocab_size") {
            Some(v) => v,
            None => md
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.to_vec().ok())
                .map(Vec::len)
                .with_context(|| {
                    format!(
                        "{}: no {a}.vocab_size and no tokenizer.ggml.tokens",
                        path.display()
                    )
                })?,
        };
        let head_dim = opt_num("attention.key_length")
            .or(opt_num("rope.dimension_count").filter(|_| arch.family().gguf.rope_dimension_count))
            .unwrap_or(hidden_size / num_heads);
        // A family written under another's name keeps its window where llama.cpp does not read
        // it (Mistral under llama): the window says which family the file is.
        let recorded_window = opt_num("attention.sliding_window").and_then(|w| {
            em_config::FAMILIES
                .iter()
                .find(|f| f.gguf.name == a && f.gguf.windows == Windows::RecordedOnly)
                .filter(|_| arch.family().gguf.windows == Windows::Refused)
                .map(|f| (f.architecture, w))
        });
        if let Some((family, _)) = recorded_window {
            arch = family;
        }
        let pattern = arch.family().gguf.windows == Windows::Pattern;
        let (sliding_window, sliding_layers) = if pattern {
            let window = opt_num("attention.sliding_window");
            let layers = match md.get(&format!("{a}.attention.sliding_window_pattern")) {
                Some(Value::Array(flags)) => flags
                    .iter()
                    .map(|f| matches!(f, Value::Bool(true)))
                    .collect(),
                other => {
                    let pattern = other.and_then(as_u64).unwrap_or(6).max(1);
                    (0..num_layers)
                        .map(|i| window.is_some() && !(i as u64 + 1).is_multiple_of(pattern))
                        .collect()
                }
            };
            (window, layers)
        } else if let Some((_, w)) = recorded_window {
            (Some(w), vec![true; num_layers])
        } else {
            (None, vec![])
        };
        let rope_linear_factor = match md
            .get(&format!("{a}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
        {
            Some(t) if t == "linear" => float("rope.scaling.factor"),
            Some(t) if t == "none" => None,
            Some(t) => bail!("{}: rope scaling {t:?} is not supported", path.display()),
            None => None,
        };
        let intermediate_size = num("feed_forward_length")?;
        let num_kv_heads = opt_num("attention.head_count_kv").unwrap_or(num_heads);
        bounded("vocab_size", vocab_size, MAX_SIZE)?;
        bounded("feed_forward_length", intermediate_size, MAX_SIZE)?;
        bounded("attention.key_length (the head size)", head_dim, MAX_SIZE)?;
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!(
                "{}: {a}.attention.head_count ({num_heads}) must be a positive multiple of {a}.attention.head_count_kv ({num_kv_heads})",
                path.display()
            );
        }
        Ok(Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: opt_num("context_length").unwrap_or(2048),
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
            tie_word_embeddings: !has_output,
            sliding_window,
            sliding_layers,
            rope_local_base_freq: pattern.then(|| float("rope.freq_base_swa").unwrap_or(10_000.0)),
            rope_linear_factor,
            rope_llama3: None,
            notes: vec![],
        })
    }

    /// config.json for transformers. `pad` matters beyond tokenization: transformers gives its
    /// input-embedding row no gradient (`padding_idx`), so dropping it would change training.
    pub fn to_hf_config(
        &self,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
        torch_dtype: &str,
    ) -> Json {
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.hf_model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "torch_dtype": torch_dtype,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "rope_scaling": null,
        });
        let o = c.as_object_mut().expect("object");
        if let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = &self.rope_llama3
        {
            o.insert(
                "rope_scaling".into(),
                json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                }),
            );
        }
        for (key, value) in (self.layout().hf_keys)(&self.shape()) {
            o.insert(key.into(), value);
        }
        c
    }

    /// The row-major shape an HF tensor must have, or None for a name this architecture lacks.
    pub fn expected_shape(&self, hf_name: &str) -> Option<Vec<usize>> {
        let (h, v, ff) = (self.hidden_size, self.vocab_size, self.intermediate_size);
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        match hf_name {
            "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![v, h]),
            "model.norm.weight" => return Some(vec![h]),
            _ => {}
        }
        let (layer, rest) = split_layer(hf_name)?;
        if layer >= self.num_layers {
            return None;
        }
        let layout = self.layout();
        let (gemma, qk_norm, bias_ok) = (layout.sandwich_norms, layout.qk_norm, layout.qkv_bias);
        Some(match rest {
            "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
            "pre_feedforward_layernorm.weight" | "post_feedforward_layernorm.weight" if gemma => {
                vec![h]
            }
            "self_attn.q_norm.weight" | "self_attn.k_norm.weight" if qk_norm => vec![self.head_dim],
            "self_attn.q_proj.weight" => vec![q, h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
            "self_attn.o_proj.weight" => vec![h, q],
            "self_attn.q_proj.bias" if bias_ok => vec![q],
            "self_attn.k_proj.bias" | "self_attn.v_proj.bias" if bias_ok => vec![kv],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![ff, h],
            "mlp.down_proj.weight" => vec![h, ff],
            _ => return None,
        })
    }

    /// Every HF tensor name the model needs.
    pub fn required_hf_names(&self) -> Vec<String> {
        let mut names = vec!["model.embed_tokens.weight".to_string()];
        let mut per_layer = vec![
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ];
        let layout = self.layout();
        if layout.qkv_bias {
            per_layer.extend([
                "self_attn.q_proj.bias",
                "self_attn.k_proj.bias",
                "self_attn.v_proj.bias",
            ]);
        }
        if layout.sandwich_norms {
            per_layer.extend([
                "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight",
            ]);
        }
        if layout.qk_norm {
            per_layer.extend(["self_attn.q_norm.weight", "self_attn.k_norm.weight"]);
        }
        for i in 0..self.num_layers {
            names.extend(per_layer.iter().map(|p| format!("model.layers.{i}.{p}")));
        }
        names.push("model.norm.weight".into());
        if !self.tie_word_embeddings {
            names.push("lm_head.weight".into());
        }
        names
    }

    /// GGUF name of an HF tensor.
    pub fn hf_to_gguf_name(&self, hf: &str) -> Option<String> {
        match hf {
            "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
            "model.norm.weight" => return Some("output_norm.weight".into()),
            "lm_head.weight" => return Some("output.weight".into()),
            _ => {}
        }
        let (layer, rest) = split_layer(hf)?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let (gemma, qk_norm) = (self.layout().sandwich_norms, self.layout().qk_norm);
        let g = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" if gemma => "post_attention_norm",
            "post_attention_layernorm" => "ffn_norm",
            "pre_feedforward_layernorm" if gemma => "ffn_norm",
            "post_feedforward_layernorm" if gemma => "post_ffw_norm",
            "self_attn.q_norm" if qk_norm => "attn_q_norm",
            "self_attn.k_norm" if qk_norm => "attn_k_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{g}.{suffix}"))
    }

    /// HF name of a GGUF tensor.
    pub fn gguf_to_hf_name(&self, gguf: &str) -> Option<String> {
        match gguf {
            "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
            "output_norm.weight" => return Some("model.norm.weight".into()),
            "output.weight" => return Some("lm_head.weight".into()),
            _ => {}
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let (gemma, qk_norm) = (self.layout().sandwich_norms, self.layout().qk_norm);
        let h = match module {
            "attn_norm" => "input_layernorm",
            "post_attention_norm" if gemma => "post_attention_layernorm",
            "ffn_norm" if gemma => "pre_feedforward_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "post_ffw_norm" if gemma => "post_feedforward_layernorm",
            "attn_q_norm" if qk_norm => "self_attn.q_norm",
            "attn_k_norm" if qk_norm => "self_attn.k_norm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        Some(format!("model.layers.{layer}.{h}.{suffix}"))
    }

    /// HF values -> GGUF values for one tensor (f32 in, f32 out).
    pub fn hf_to_gguf_values(&self, hf_name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        if self.layout().unit_offset_norms && hf_name.ends_with("norm.weight") {
            return t + 1.0;
        }
        self.hf_to_gguf_rows(hf_name, t)
    }

    /// The reordering of output rows `hf_to_gguf_values` applies to `hf_name` (llama's Q/K rope
    /// permutation; else none), on any matrix whose rows are that tensor's rows, such as a LoRA B.
    pub fn hf_to_gguf_rows(&self, hf_name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        if !(self.layout().permute_qk && is_q_or_k(hf_name)) {
            return Ok(t);
        }
        permute_rope_rows(&t, self.qk_heads(hf_name), false)
    }

    /// GGUF values -> HF values for one tensor (f32 in, f32 out), undoing `hf_to_gguf_values`.
    pub fn gguf_to_hf_values(&self, hf_name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let layout = self.layout();
        if layout.permute_qk && is_q_or_k(hf_name) {
            return permute_rope_rows(&t, self.qk_heads(hf_name), true);
        }
        if layout.unit_offset_norms && hf_name.ends_with("norm.weight") {
            return t - 1.0;
        }
        Ok(t)
    }

    /// The heads whose rows `hf_name` (q_proj or k_proj) holds.
    fn qk_heads(&self, hf_name: &str) -> usize {
        if hf_name.contains("q_proj") {
            self.num_heads
        } else {
            self.num_kv_heads
        }
    }
}

/// Llama 3's divisor of each rotary frequency `θ^(−2i/d)`: 1 for wavelengths below
/// `original / high`, `factor` above `original / low`, and between them the reciprocal of the
/// smooth interpolation transformers applies.
fn llama3_divisors(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let inv_freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
            let wavelength = 2.0 * std::f64::consts::PI / inv_freq;
            let divisor = if wavelength < original / high {
                1.0
            } else if wavelength > original / low {
                factor
            } else {
                let s = (original / wavelength - low) / (high - low);
                1.0 / ((1.0 - s) / factor + s)
            };
            divisor as f32
        })
        .collect()
}

fn is_q_or_k(hf_name: &str) -> bool {
    hf_name.contains("self_attn.q_proj.") || hf_name.contains("self_attn.k_proj.")
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

/// `model.layers.{i}.{rest}` -> (i, rest).
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    Some((layer.parse().ok()?, rest))
}

/// llama.cpp's llama GGUFs interleave the two rotary halves of each head's rows (HF: the first half of
/// a head's rows pairs with the second; GGUF: rows 2i and 2i+1 pair). `inverse` undoes it.
fn permute_rope_rows(t: &Tensor, heads: usize, inverse: bool) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    if heads == 0 || dims.is_empty() {
        candle_core::bail!("cannot split a tensor of shape {dims:?} into {heads} rotary heads");
    }
    let rows = dims[0];
    let rest: Vec<usize> = dims[1..].to_vec();
    let half = rows / heads / 2;
    let mut split = vec![heads, 2, half];
    let mut split_inv = vec![heads, half, 2];
    split.extend(&rest);
    split_inv.extend(&rest);
    let shaped = if inverse {
        t.reshape(split_inv)?
    } else {
        t.reshape(split)?
    };
    shaped.transpose(1, 2)?.contiguous()?.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn rope_permutation_is_inverted_and_moves_rows_like_llama_cpp() {
        // 2 heads of 4 rows, 1 column: HF rows [0,1,2,3 | 4,5,6,7] -> GGUF [0,2,1,3 | 4,6,5,7].
        let t = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let g = permute_rope_rows(&t, 2, false).unwrap();
        assert_eq!(
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
        let back = permute_rope_rows(&g, 2, true).unwrap();
        assert_eq!(
            back.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            (0..8).map(|x| x as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn tensor_names_round_trip_for_every_architecture() {
        for (model_type, arch) in [
            ("qwen2", Arch::Qwen2),
            ("llama", Arch::Llama),
            ("gemma3_text", Arch::Gemma3),
        ] {
            let config = json!({"model_type": model_type, "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 2,
                "intermediate_size": 16, "vocab_size": 10, "head_dim": 4, "tie_word_embeddings": false,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
                "sliding_window": 4, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 4,
                "num_key_value_heads": 2});
            let hp = Hparams::from_hf_config(&config, Path::new("config.json")).unwrap();
            assert_eq!(hp.arch, arch);
            let mut gguf_names = std::collections::HashSet::new();
            for hf in hp.required_hf_names() {
                assert!(hp.expected_shape(&hf).is_some(), "{hf}");
                let g = hp
                    .hf_to_gguf_name(&hf)
                    .unwrap_or_else(|| panic!("{hf} has no GGUF name"));
                assert!(gguf_names.insert(g.clone()), "two HF names map to {g}");
                assert_eq!(hp.gguf_to_hf_name(&g).as_deref(), Some(hf.as_str()));
            }
        }
    }

    fn model_config(raw: Json) -> ModelConfig {
        ModelConfig::from_value(raw, Path::new("config.json")).unwrap()
    }

    /// config.json -> GGUF metadata -> config.json, as the two directions of `convert` do it.
    fn through_gguf(cfg: &ModelConfig) -> ModelConfig {
        let hp = Hparams::from_model_config(cfg, Path::new("config.json")).unwrap();
        let mut md: HashMap<String, Value> = hp.to_gguf_metadata().into_iter().collect();
        md.insert(
            "general.architecture".into(),
            Value::String(hp.arch.gguf_name().into()),
        );
        let back = Hparams::from_gguf(&md, !hp.tie_word_embeddings, Path::new("x.gguf")).unwrap();
        model_config(back.to_hf_config(Some(1), Some(2), cfg.pad_token_id, "float32"))
    }

    #[test]
    fn emitted_config_reads_back_to_the_same_model() {
        let llama = json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
            "tie_word_embeddings": true, "dtype": "bfloat16", "pad_token_id": 2});
        let qwen2 = json!({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
            "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
            "rope_theta": 10000, "sliding_window": 4096, "max_window_layers": 21,
            "use_sliding_window": false, "tie_word_embeddings": true, "hidden_act": "silu"});
        let gemma3 = json!({"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
            "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "sliding_window": 512, "sliding_window_pattern": 6,
            "rope_parameters": {
                "full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}});
        for raw in [llama, qwen2, gemma3] {
            let original = model_config(raw);
            assert!(!original.defaults_applied.is_empty());
            let mut back = through_gguf(&original);
            // The emitted file spells out every key and names the dtype it was written in.
            assert_eq!(back.defaults_applied, vec![]);
            assert_eq!(back.dtype.as_deref(), Some("float32"));
            back.defaults_applied = original.defaults_applied.clone();
            back.dtype = original.dtype.clone();
            assert_eq!(back, original);
        }
    }

    #[test]
    fn hostile_gguf_hyperparameters_are_errors() {
        let gemma = json!({"model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 4, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
            "max_position_embeddings": 64, "sliding_window": 4, "rope_local_base_freq": 1e4,
            "query_pre_attn_scalar": 4});
        let hp = Hparams::from_model_config(&model_config(gemma), Path::new("c")).unwrap();
        let mut md: HashMap<String, Value> = hp.to_gguf_metadata().into_iter().collect();
        md.insert(
            "general.architecture".into(),
            Value::String("gemma3".into()),
        );
        md.remove("gemma3.attention.sliding_window_pattern");
        let read = |key: &str, v: Value| {
            let mut md = md.clone();
            md.insert(format!("gemma3.{key}"), v);
            md.remove("gemma3.attention.key_length");
            Hparams::from_gguf(&md, true, Path::new("x.gguf")).map(|_| ())
        };
        let error = |key: &str, v: Value| read(key, v).unwrap_err().to_string();
        let e = error("attention.head_count", Value::U32(0));
        assert!(
            e.contains("x.gguf: gemma3.attention.head_count is 0"),
            "{e}"
        );
        let e = error("block_count", Value::U64(1_000_000_000_000));
        assert!(
            e.contains("block_count is 1000000000000; it must be between 1 and 65536"),
            "{e}"
        );
        let e = error("attention.head_count_kv", Value::U32(0));
        assert!(e.contains("positive multiple"), "{e}");
        let e = error("embedding_length", Value::U64(u64::MAX));
        assert!(
            e.contains("embedding_length is 18446744073709551615"),
            "{e}"
        );
        // A pattern of 0 reads as 1 (every layer full attention), as em-config reads it.
        read("attention.sliding_window_pattern", Value::U32(0)).unwrap();
        let t = Tensor::zeros((4, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(permute_rope_rows(&t, 0, true).is_err());
    }

    #[test]
    fn llama3_rope_scaling_round_trips_through_rope_freqs() {
        // Llama-3.2-1B's scaling, on a head size whose frequencies fall on both sides of the band
        // and inside it.
        let raw = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 128,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3",
            "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}});
        let hp = Hparams::from_hf_config(&raw, Path::new("config.json")).unwrap();
        let divisors = hp.rope_freqs().expect("llama3 scaling gives rope_freqs");
        assert_eq!(divisors.len(), 32);
        assert_eq!(divisors[0], 1.0, "the highest frequency is kept");
        assert_eq!(
            *divisors.last().unwrap(),
            32.0,
            "the lowest is divided by the factor"
        );
        assert!(
            divisors.iter().any(|&d| d > 1.0 && d < 32.0),
            "{divisors:?}"
        );
        let mut back = hp.clone();
        back.rope_llama3 = None;
        back.set_rope_freqs(&divisors, Path::new("m.gguf")).unwrap();
        assert_eq!(back.rope_llama3, hp.rope_llama3);
        // Divisors no Llama 3 scaling gives are refused, naming the file.
        let mut bent = divisors.clone();
        bent[5] *= 1.5;
        let e = back.set_rope_freqs(&bent, Path::new("m.gguf")).unwrap_err();
        assert!(
            e.to_string().starts_with("m.gguf: rope_freqs.weight["),
            "{e}"
        );
    }

    #[test]
    fn what_llama_cpp_cannot_compute_is_refused() {
        let base = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 64});
        let with = |extra: Json| {
            let mut v = base.clone();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        for (raw, expected) in [
            // Llama 3 scaling travels as rope_freqs.weight, which only llama.cpp's llama reads.
            (
                with(
                    json!({"model_type": "qwen2", "rope_scaling": {"rope_type": "llama3",
                    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8}}),
                ),
                "rope scaling \"llama3\"",
            ),
            (
                with(json!({"model_type": "qwen3", "head_dim": 4, "attention_bias": true})),
                "biases",
            ),
            (with(json!({"attention_bias": true})), "biases"),
            (with(json!({"hidden_act": "gelu"})), "activation \"gelu\""),
            (
                with(json!({"model_type": "qwen2", "use_sliding_window": true,
                    "sliding_window": 4, "max_window_layers": 1})),
                "sliding-window attention",
            ),
            (
                with(
                    json!({"model_type": "gemma3_text", "sliding_window": 4, "head_dim": 4,
                    "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 4,
                    "final_logit_softcapping": 30.0}),
                ),
                "soft-capping",
            ),
            (
                with(
                    json!({"model_type": "gemma3_text", "sliding_window": 4, "head_dim": 4,
                    "rope_local_base_freq": 1e4}),
                ),
                "query_pre_attn_scalar 256",
            ),
        ] {
            let err = Hparams::from_hf_config(&raw, Path::new("m/config.json")).unwrap_err();
            let msg = err.to_string();
            assert!(msg.starts_with("m/config.json: "), "{msg}");
            assert!(msg.contains(expected), "{msg}");
        }
    }
}
