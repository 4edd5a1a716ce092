//! The memory model of one EM update (`bench em-step` prints it): what an update holds at its
//! peak, from parts measured on this machine (one decoder layer's forward + backward, one LM-head
//! chunk) and parts that are arithmetic (weights, master copies, gradients, moments, saved layer
//! inputs and taped products), projected to published configurations. Linux: the measurements
//! read the process's RSS from `/proc/self`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::lora::{AdapterSource, LoraConfig};
use crate::models::{tensor_shapes, CausalLm, ModelConfig};

/// A model or configuration error as a candle error (this module's one error type).
fn model<T, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| candle_core::Error::Msg(e.to_string()))
}

const MB: f64 = 1024.0 * 1024.0;

fn status_mb(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the process's peak RSS to its current RSS (Linux `clear_refs` 5).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The current RSS in MB.
pub fn rss_mb() -> f64 {
    status_mb("VmRSS:").unwrap_or(0.0)
}

/// The peak RSS in MB since the last [`reset_peak_rss`].
pub fn peak_mb() -> f64 {
    status_mb("VmHWM:").unwrap_or(0.0)
}

extern "C" {
    /// glibc: returns the heap's free memory to the system.
    fn malloc_trim(pad: usize) -> i32;
}

/// Returns the heap's free pages to the system, so that the RSS shows what is held.
pub fn trim() {
    // SAFETY: malloc_trim only releases free heap pages; it takes no pointers.
    unsafe { malloc_trim(0) };
}

/// How far above the RSS at its start the process's RSS peaked while `f` ran, in MB. Memory the
/// allocator kept from earlier work is returned first; reused, it would not show in the RSS.
pub fn transient_peak_mb(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    trim();
    reset_peak_rss();
    let before = rss_mb();
    f()?;
    Ok(peak_mb() - before)
}

/// A published configuration whose memory the model projects.
pub struct KnownConfig {
    /// The model's name.
    pub name: &'static str,
    /// Its config.json values.
    pub raw: serde_json::Value,
}

/// Qwen2.5-Math-1.5B and -7B, Qwen3-1.7B and Llama-3.2-1B, from the values of their config.json
/// files.
pub fn known_configs() -> Vec<KnownConfig> {
    vec![
        KnownConfig {
            name: "Qwen2.5-Math-1.5B",
            raw: serde_json::json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": 4096,
                "max_window_layers": 21, "hidden_act": "silu"
            }),
        },
        KnownConfig {
            name: "Qwen2.5-Math-7B",
            raw: serde_json::json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                "tie_word_embeddings": false, "use_sliding_window": false, "sliding_window": 4096,
                "max_window_layers": 28, "hidden_act": "silu"
            }),
        },
        KnownConfig {
            name: "Qwen3-1.7B",
            raw: serde_json::json!({
                "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "attention_bias": false,
                "use_sliding_window": false, "sliding_window": null, "max_window_layers": 28,
                "hidden_act": "silu"
            }),
        },
        KnownConfig {
            name: "Llama-3.2-1B",
            raw: serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "attention_bias": false,
                "mlp_bias": false, "hidden_act": "silu"
            }),
        },
    ]
}

/// Parses a configuration given as JSON values.
pub fn config(raw: &serde_json::Value, name: &str) -> Result<ModelConfig> {
    model(ModelConfig::from_value(raw.clone(), Path::new(name)))
}

/// Number of parameters of `cfg` (a tied head counted once).
pub fn parameter_count(cfg: &ModelConfig) -> usize {
    tensor_shapes(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// Number of parameters of the adapter `lora` on `cfg`: `rank × (in + out)` per adapted linear.
pub fn adapter_parameter_count(cfg: &ModelConfig, lora: &LoraConfig) -> usize {
    tensor_shapes(cfg)
        .iter()
        .filter_map(|(name, shape)| {
            let prefix = name.strip_suffix(".weight")?;
            (shape.len() == 2 && lora.targets_module(prefix))
                .then(|| lora.rank * (shape[0] + shape[1]))
        })
        .sum()
}

/// Random weights of `cfg`'s shapes on `device`: N(0, 0.02), unit norms.
pub fn random_tensors(cfg: &ModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for (name, shape) in tensor_shapes(cfg) {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(shape, DType::F32, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?
        };
        tensors.insert(name, t);
    }
    Ok(tensors)
}

/// A random model with `cfg`'s shapes (see [`random_tensors`]), frozen under a fresh adapter
/// when `lora` is given.
pub fn random_model(
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
    lora: Option<&LoraConfig>,
) -> Result<CausalLm> {
    let tensors = random_tensors(cfg, device)?;
    Ok(match lora {
        None => model(CausalLm::from_tensors(cfg, tensors, dtype, device))?,
        Some(l) => model(CausalLm::from_tensors_with_adapter(
            cfg,
            tensors,
            dtype,
            device,
            l.clone(),
            AdapterSource::Init { seed: 15 },
        ))?,
    })
}

/// Peak MB above the start of one decoder layer's forward and backward on `[1, seq, hidden]` in
/// `dtype`, on a one-layer model with `raw`'s layer shapes (and a small vocabulary), frozen under
/// `lora` when given (the backward then keeps no weight gradients).
pub fn measure_layer_mb(
    raw: &serde_json::Value,
    seq: usize,
    dtype: DType,
    lora: Option<&LoraConfig>,
) -> Result<f64> {
    let mut one = raw.clone();
    one["num_hidden_layers"] = 1.into();
    one["vocab_size"] = 256.into();
    one["max_window_layers"] = 1.into();
    let cfg = config(&one, "one-layer model")?;
    let model = random_model(&cfg, dtype, &Device::Cpu, lora)?;
    let hidden = cfg.hidden_size;
    let x = Var::from_tensor(
        &Tensor::randn(0f32, 1.0, (1, seq, hidden), &Device::Cpu)?.to_dtype(dtype)?,
    )?;
    let upstream = Tensor::randn(0f32, 1.0, (1, seq, hidden), &Device::Cpu)?.to_dtype(dtype)?;
    let ctx = model.layer_context(seq, dtype, &Device::Cpu)?;
    transient_peak_mb(|| {
        let out = model.layer(0, x.as_tensor(), &ctx, None)?;
        let store = (out * &upstream)?.sum_all()?.backward()?;
        drop(store);
        Ok(())
    })
}

/// Peak MB above the start of the entropy and its gradient on one LM-head chunk of `rows` ×
/// `vocab` logits, as the objective computes them (the chunk size is fixed in elements, so this
/// does not depend on the model).
pub fn measure_head_chunk_mb(rows: usize, vocab: usize) -> Result<f64> {
    transient_peak_mb(|| {
        let z = Tensor::randn(0f32, 3.0, (rows, vocab), &Device::Cpu)?;
        let (sum, grad) = crate::objective::entropy_sum_and_grad(&z, 0.5)?;
        drop((sum, grad));
        Ok(())
    })
}

/// The projected peak of one update, in MB, and its parts.
pub struct Projection {
    /// Held across the update: weights, master copies, gradients and moments.
    pub static_mb: f64,
    /// Each layer's saved input and, on the fused path, its taped products (with recompute).
    pub saved_inputs_mb: f64,
    /// Live layer activations: one layer's with recompute, every layer's without.
    pub layer_mb: f64,
    /// One LM-head chunk's logits and entropy gradient.
    pub head_mb: f64,
}

impl Projection {
    /// The projected peak.
    pub fn total(&self) -> f64 {
        self.static_mb + self.saved_inputs_mb + self.layer_mb + self.head_mb
    }
}

/// Bytes held across the update per trained parameter: weights in `dtype`, an f32 master copy
/// for bf16/f16, f32 gradients and two f32 moments. (Adapter factors are f32 under any base, so
/// theirs are `bytes_per_parameter(F32)`.)
pub fn bytes_per_parameter(dtype: DType) -> f64 {
    let weights = dtype.size_in_bytes() as f64;
    let master = if matches!(dtype, DType::BF16 | DType::F16) {
        4.0
    } else {
        0.0
    };
    weights + master + 4.0 + 8.0
}

/// The peak of an update of `cfg` at `micro_batch` sequences of `seq` tokens: `layer_mb` is one
/// layer's measured transient at one sequence of `seq` (it grows linearly with the batch). Under
/// `lora` the base holds its weights alone and only the factors carry training state.
#[allow(clippy::too_many_arguments)]
pub fn project(
    cfg: &ModelConfig,
    dtype: DType,
    lora: Option<&LoraConfig>,
    micro_batch: usize,
    seq: usize,
    layer_mb: f64,
    head_mb: f64,
    recompute: bool,
) -> Projection {
    let params = parameter_count(cfg) as f64;
    let b = micro_batch as f64;
    let layers = cfg.num_hidden_layers as f64;
    let act_bytes = dtype.size_in_bytes() as f64;
    // Recomputation saves each layer's input and, where the fused CPU matmul runs (f32/f64,
    // trainable weights), the products of its projections (em-train's ProjectionTape): q, k, v,
    // the attention and MLP outputs, gate and up.
    let taped = lora.is_none() && matches!(dtype, DType::F32 | DType::F64);
    let products = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        + 2 * cfg.hidden_size
        + 2 * cfg.intermediate_size;
    let saved_per_token = cfg.hidden_size + if taped { products } else { 0 };
    let (saved_inputs_mb, layer_mb) = if recompute {
        (
            layers * b * (seq * saved_per_token) as f64 * act_bytes / MB,
            b * layer_mb,
        )
    } else {
        (0.0, layers * b * layer_mb)
    };
    Projection {
        static_mb: match lora {
            None => params * bytes_per_parameter(dtype),
            Some(l) => {
                params * dtype.size_in_bytes() as f64
                    + adapter_parameter_count(cfg, l) as f64 * bytes_per_parameter(DType::F32)
            }
        } / MB,
        saved_inputs_mb,
        layer_mb,
        head_mb,
    }
}
