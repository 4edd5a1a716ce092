//! LoRA adapters (Hu et al. 2021, as PEFT implements them) on the linear layers of a
//! [`crate::models::CausalLm`]: the base weights frozen, `ΔW = (alpha / rank) · B·A` trained.
//!
//! Defaults are PEFT's `LoraConfig` (`r = 8`, `lora_alpha = 8`, no dropout) on every linear layer
//! of the decoder (PEFT's `"all-linear"`: q, k, v, o, gate, up, down); A is initialised as PEFT
//! does (`kaiming_uniform_(a = √5)`, i.e. uniform in ±1/√in), B at zero, so training starts from
//! the base model exactly. Parameters carry PEFT's names, so an adapter saves as PEFT saves it.
//!
//! The adapter's description (targets, configuration, factor sources, PEFT names) lives in the
//! lower `adapter` module, which the models depend on, and is re-exported here; A's draw sits
//! with the weight loader in [`crate::models`]. This module holds what works on a whole
//! [`CausalLm`]: conversion to and from PEFT's layout and loading an adapted checkpoint.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::models::{CausalLm, ModelError};

pub use crate::adapter::{
    factor_dtype, parse_peft_name, peft_names, AdapterSource, LoraConfig, Target,
};

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
