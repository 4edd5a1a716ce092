//! LoRA adapters (Hu et al. 2021, as PEFT implements them) on the linear layers of a
//! [`crate::models::CausalLm`]: the base weights frozen, `ΔW = (alpha / rank) · B·A` trained.
//!
//! Defaults are PEFT's `LoraConfig` (`r = 8`, `lora_alpha = 8`, no dropout) on every linear layer
//! of the decoder (PEFT's `"all-linear"`: q, k, v, o, gate, up, down); A is initialised as PEFT
//! does (`kaiming_uniform_(a = √5)`, i.e. uniform in ±1/√in), B at zero, so training starts from
//! the base model exactly. Parameters carry PEFT's names, so an adapter saves as PEFT saves it.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::models::{CausalLm, ModelError};

/// A linear layer of the decoder an adapter can sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
}

impl Target {
    /// Every target, in the order of `--targets`' default.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The HF module name (`q_proj`, …).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// `q`, `k`, `v`, `o`, `gate`, `up`, `down`, or the module names themselves.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        Target::ALL
            .into_iter()
            .find(|t| t.module() == s || t.module().trim_end_matches("_proj") == s)
            .ok_or_else(|| {
                format!("unknown LoRA target {s:?} (expected q, k, v, o, gate, up or down)")
            })
    }
}

/// Rank, alpha and targets of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`: the inner dimension of `B·A`.
    pub rank: usize,
    /// `lora_alpha`: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// The linear layers adapted, in every decoder layer.
    pub targets: Vec<Target>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            targets: Target::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }

    /// Whether the linear layer at `prefix` (`model.layers.3.mlp.up_proj`) is adapted.
    pub fn targets_module(&self, prefix: &str) -> bool {
        prefix.starts_with("model.layers.")
            && prefix
                .rsplit('.')
                .next()
                .is_some_and(|m| self.targets.iter().any(|t| t.module() == m))
    }

    /// The targets' module names, as PEFT's `target_modules`.
    pub fn target_modules(&self) -> Vec<String> {
        self.targets
            .iter()
            .map(|t| t.module().to_string())
            .collect()
    }
}

/// PEFT's names of the factors of the layer at `prefix`: `base_model.model.{prefix}.lora_A.weight`
/// and `….lora_B.weight`.
pub fn peft_names(prefix: &str) -> (String, String) {
    (
        format!("base_model.model.{prefix}.lora_A.weight"),
        format!("base_model.model.{prefix}.lora_B.weight"),
    )
}

/// The layer prefix of a PEFT factor name, and whether it is A.
pub fn parse_peft_name(name: &str) -> Option<(&str, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        return Some((p, true));
    }
    rest.strip_suffix(".lora_B.weight").map(|p| (p, false))
}

/// The dtype adapter factors train in for a model in `dtype`: f32 under a bf16/f16 base (the
/// factors are small; their updates would vanish in bf16), the model's own otherwise.
pub fn factor_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// Where an adapter's factors come from.
#[derive(Debug)]
pub enum AdapterSource {
    /// A fresh adapter: A as PEFT initialises it from this seed (each layer's stream from the seed
    /// and the layer's name), B zero.
    Init {
        /// The seed.
        seed: u64,
    },
    /// Saved factors under their PEFT names (a checkpoint being resumed).
    Tensors {
        /// The factors.
        tensors: HashMap<String, Tensor>,
        /// Where they came from, for errors.
        origin: String,
    },
}

impl AdapterSource {
    /// The factors `(A [rank, in], B [out, rank])` of the layer at `prefix`.
    pub(crate) fn factors(
        &mut self,
        config: &LoraConfig,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        model_dtype: DType,
        device: &Device,
    ) -> Result<(Var, Var), ModelError> {
        let dtype = factor_dtype(model_dtype);
        let r = config.rank;
        let candle_err = |source| ModelError::Candle {
            context: format!("building the adapter of \"{prefix}\""),
            source,
        };
        match self {
            AdapterSource::Init { seed } => {
                let mut rng = StdRng::seed_from_u64(*seed ^ fnv1a(prefix));
                let bound = 1.0 / (in_dim as f64).sqrt();
                let a: Vec<f64> = (0..r * in_dim)
                    .map(|_| rng.gen_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (r, in_dim), device)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| Var::from_tensor(&t))
                    .map_err(candle_err)?;
                let b = Var::zeros((out_dim, r), dtype, device).map_err(candle_err)?;
                Ok((a, b))
            }
            AdapterSource::Tensors { tensors, origin } => {
                let (a_name, b_name) = peft_names(prefix);
                let mut take = |name: &str, shape: [usize; 2]| -> Result<Var, ModelError> {
                    let t = tensors
                        .remove(name)
                        .ok_or_else(|| ModelError::MissingTensor {
                            name: name.to_string(),
                            source_name: origin.clone(),
                        })?;
                    if t.dims() != shape {
                        return Err(ModelError::WrongShape {
                            name: name.to_string(),
                            source_name: origin.clone(),
                            got: t.dims().to_vec(),
                            expected: shape.to_vec(),
                        });
                    }
                    t.to_dtype(dtype)
                        .and_then(|t| t.to_device(device))
                        .and_then(|t| Var::from_tensor(&t))
                        .map_err(candle_err)
                };
                Ok((take(&a_name, [r, in_dim])?, take(&b_name, [out_dim, r])?))
            }
        }
    }

    /// Factors left over after every targeted layer took its own (a saved adapter for layers
    /// this configuration does not target).
    pub(crate) fn unused(&self) -> Vec<String> {
        match self {
            AdapterSource::Init { .. } => vec![],
            AdapterSource::Tensors { tensors, .. } => {
                let mut names: Vec<String> = tensors.keys().cloned().collect();
                names.sort();
                names
            }
        }
    }
}

/// The adapter of `model` in the PEFT layout em-convert writes and reads (factors as f32;
/// `base_model` is PEFT's `base_model_name_or_path`). None for a model without an adapter.
pub fn to_peft(
    model: &CausalLm,
    base_model: Option<String>,
) -> Result<Option<em_convert::lora::Adapter>, ModelError> {
    let Some(config) = model.adapter() else {
        return Ok(None);
    };
    let factors: Vec<(String, Tensor)> = model
        .parameters()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    peft_adapter(config, &factors, base_model).map(Some)
}

/// An adapter of `config` from its factors under their PEFT names.
pub fn peft_adapter(
    config: &LoraConfig,
    factors: &[(String, Tensor)],
    base_model: Option<String>,
) -> Result<em_convert::lora::Adapter, ModelError> {
    let by_name: HashMap<&str, &Tensor> = factors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let values = |n: &str| -> Result<(Vec<f32>, Vec<usize>), ModelError> {
        let t = by_name.get(n).ok_or_else(|| ModelError::BadAdapter {
            message: format!("factor \"{n}\" is missing"),
        })?;
        let v = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|source| ModelError::Candle {
                context: format!("reading the adapter factor \"{n}\""),
                source,
            })?;
        Ok((v, t.dims().to_vec()))
    };
    let mut modules = std::collections::BTreeMap::new();
    for (name, _) in factors {
        let Some((prefix, true)) = parse_peft_name(name) else {
            continue;
        };
        let (a_name, b_name) = peft_names(prefix);
        let (a, a_dims) = values(&a_name)?;
        let (b, b_dims) = values(&b_name)?;
        modules.insert(
            prefix.to_string(),
            em_convert::lora::LoraPair {
                a,
                b,
                rank: a_dims[0],
                in_features: a_dims[1],
                out_features: b_dims[0],
            },
        );
    }
    Ok(em_convert::lora::Adapter {
        rank: config.rank,
        alpha: config.alpha,
        target_modules: config.target_modules(),
        base_model,
        modules,
    })
}

/// The configuration and saved factors of a PEFT adapter, to build a model on its base.
pub fn from_peft(
    adapter: &em_convert::lora::Adapter,
    origin: &str,
    device: &Device,
) -> Result<(LoraConfig, AdapterSource), ModelError> {
    let bad = |message: String| ModelError::BadAdapter {
        message: format!("{origin}: {message}"),
    };
    let targets = adapter
        .target_modules
        .iter()
        .map(|m| Target::parse(m))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let mut tensors = HashMap::new();
    for (prefix, pair) in &adapter.modules {
        let (a_name, b_name) = peft_names(prefix);
        let t = |v: &[f32], dims: (usize, usize)| {
            Tensor::from_slice(v, dims, device).map_err(|source| ModelError::Candle {
                context: format!("{origin}: loading \"{prefix}\""),
                source,
            })
        };
        tensors.insert(a_name, t(&pair.a, (pair.rank, pair.in_features))?);
        tensors.insert(b_name, t(&pair.b, (pair.out_features, pair.rank))?);
    }
    Ok((
        LoraConfig {
            rank: adapter.rank,
            alpha: adapter.alpha,
            targets,
        },
        AdapterSource::Tensors {
            tensors,
            origin: origin.to_string(),
        },
    ))
}

/// The base checkpoint in `base` under the PEFT adapter saved in `adapter_dir`.
pub fn load_adapted(
    base: &std::path::Path,
    adapter_dir: &std::path::Path,
    dtype: DType,
    device: &Device,
) -> Result<CausalLm, ModelError> {
    let adapter =
        em_convert::lora::read_peft_dir(adapter_dir).map_err(|e| ModelError::BadAdapter {
            message: format!("{e:#}"),
        })?;
    let (config, source) = from_peft(&adapter, &adapter_dir.display().to_string(), device)?;
    CausalLm::from_hf_dir_with_adapter(base, dtype, device, config, source)
}

/// 64-bit FNV-1a of `s`: a stable per-layer seed that does not depend on load order.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_by_short_and_module_name() {
        assert_eq!(Target::parse("q").unwrap(), Target::Q);
        assert_eq!(Target::parse("down_proj").unwrap(), Target::Down);
        assert!(Target::parse("lm_head")
            .unwrap_err()
            .contains("unknown LoRA target"));
        let c = LoraConfig::default();
        assert!(c.targets_module("model.layers.0.self_attn.q_proj"));
        assert!(!c.targets_module("lm_head"));
        assert_eq!(
            parse_peft_name(&peft_names("model.layers.1.mlp.up_proj").1),
            Some(("model.layers.1.mlp.up_proj", false))
        );
    }

    #[test]
    fn a_starts_as_peft_draws_it_and_b_at_zero() {
        let mut src = AdapterSource::Init { seed: 7 };
        let c = LoraConfig::default();
        let (a, b) = src
            .factors(
                &c,
                "model.layers.0.mlp.up_proj",
                64,
                32,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let a = a
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bound = 1.0f32 / 8.0;
        assert!(a.iter().all(|v| v.abs() < bound));
        // Spread over the interval: the sample's variance near bound²/3.
        let var = a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            (var / (bound as f64).powi(2) * 3.0 - 1.0).abs() < 0.15,
            "{var}"
        );
        assert_eq!(b.as_tensor().dims(), &[32, 8]);
        assert_eq!(
            b.as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        // The same seed and layer give the same draw, another layer another.
        let again = AdapterSource::Init { seed: 7 }
            .factors(
                &c,
                "model.layers.0.mlp.up_proj",
                64,
                32,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
            .0;
        assert_eq!(
            again
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            a
        );
        let other = AdapterSource::Init { seed: 7 }
            .factors(
                &c,
                "model.layers.1.mlp.up_proj",
                64,
                32,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
            .0;
        assert_ne!(
            other
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            a
        );
    }
}
