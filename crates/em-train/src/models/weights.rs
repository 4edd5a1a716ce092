//! Reading HF safetensors checkpoints and turning named tensors into trainable [`Var`]s.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use super::ModelError;
use crate::adapter::{factor_dtype, peft_names, AdapterSource, LoraConfig};
use crate::layers::{Linear, Lora, RmsNorm};
use em_config::json_error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Hands out named weights, checking shapes: as trainable [`Var`]s, remembered as parameters, or
/// (under a LoRA adapter) as frozen constants, the adapter's factors being the parameters.
#[derive(Debug)]
pub struct Weights {
    tensors: Option<HashMap<String, Tensor>>,
    dtype: DType,
    device: Device,
    source_name: String,
    parameters: Vec<(String, Var)>,
    shapes: Vec<(String, Vec<usize>)>,
    adapter: Option<(LoraConfig, AdapterSource)>,
}

impl Weights {
    /// Serves `tensors` (HF names), converted to `dtype` on `device`; `source_name` appears in errors.
    pub fn new(
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: Device,
        source_name: String,
    ) -> Self {
        Self {
            tensors: Some(tensors),
            dtype,
            device,
            source_name,
            parameters: Vec::new(),
            shapes: Vec::new(),
            adapter: None,
        }
    }

    /// Freezes every base weight and adds a LoRA adapter to the linear layers `config` targets,
    /// its factors taken from `source`.
    pub fn with_adapter(self, config: LoraConfig, source: AdapterSource) -> Self {
        Self {
            adapter: Some((config, source)),
            ..self
        }
    }

    /// A source that only records the names and shapes asked for (see [`super::tensor_shapes`]).
    pub(crate) fn shape_recorder() -> Self {
        Self {
            tensors: None,
            dtype: DType::F32,
            device: Device::Cpu,
            source_name: "the shape recorder".to_string(),
            parameters: Vec::new(),
            shapes: Vec::new(),
            adapter: None,
        }
    }

    /// The names and shapes asked for so far.
    pub(crate) fn recorded_shapes(self) -> Vec<(String, Vec<usize>)> {
        self.shapes
    }

    /// Names of tensors that were provided but never asked for.
    pub fn unused_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .iter()
            .flat_map(|t| t.keys().cloned())
            .collect();
        names.sort();
        names
    }

    /// Saved adapter factors no adapted layer took.
    pub fn unused_adapter_factors(&self) -> Vec<String> {
        self.adapter
            .as_ref()
            .map_or_else(Vec::new, |(_, source)| source.unused())
    }

    /// The parameters handed out, in order.
    pub fn into_parameters(self) -> Vec<(String, Var)> {
        self.parameters
    }

    /// The base tensor `name`, which must have `shape`: a trainable [`Var`]'s tensor, or a frozen
    /// constant under an adapter.
    pub fn param(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.shapes.push((name.to_string(), shape.to_vec()));
        let candle_err = |source| ModelError::Candle {
            context: format!("converting tensor \"{name}\""),
            source,
        };
        let Some(tensors) = self.tensors.as_mut() else {
            return Tensor::zeros(1, self.dtype, &self.device).map_err(candle_err);
        };
        let tensor = tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                source_name: self.source_name.clone(),
            })?;
        if tensor.dims() != shape {
            return Err(ModelError::WrongShape {
                name: name.to_string(),
                source_name: self.source_name.clone(),
                got: tensor.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let tensor = tensor
            .to_dtype(self.dtype)
            .and_then(|t| t.to_device(&self.device))
            .map_err(candle_err)?;
        if self.adapter.is_some() {
            return Ok(tensor.detach());
        }
        let var = Var::from_tensor(&tensor).map_err(candle_err)?;
        self.parameters.push((name.to_string(), var.clone()));
        Ok(var.as_tensor().clone())
    }

    /// The adapter of the linear layer `prefix` (`[out, in]`), if the adapter targets it.
    fn lora(
        &mut self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Option<Lora>, ModelError> {
        let Some((config, source)) = self.adapter.as_mut() else {
            return Ok(None);
        };
        if self.tensors.is_none() || !config.targets_module(prefix) {
            return Ok(None);
        }
        let (a, b) = adapter_factors(
            source,
            config,
            prefix,
            in_dim,
            out_dim,
            self.dtype,
            &self.device,
        )?;
        let scale = config.scale();
        let (a_name, b_name) = peft_names(prefix);
        self.parameters.push((a_name, a.clone()));
        self.parameters.push((b_name, b.clone()));
        Ok(Some(Lora { a, b, scale }))
    }

    /// `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias` `[out]`.
    pub fn linear(
        &mut self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear, ModelError> {
        let weight = self.param(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(self.param(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        let linear = Linear::new(weight, bias);
        Ok(match self.lora(prefix, in_dim, out_dim)? {
            Some(lora) => linear.with_lora(lora),
            None => linear,
        })
    }

    /// `{prefix}.weight` `[dim]` as a Llama-style RMS norm.
    pub fn rms_norm(&mut self, prefix: &str, dim: usize, eps: f64) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm::new(
            self.param(&format!("{prefix}.weight"), &[dim])?,
            eps,
        ))
    }

    /// `{prefix}.weight` `[dim]` as a Gemma-style `(1 + w)` RMS norm.
    pub fn rms_norm_unit_offset(
        &mut self,
        prefix: &str,
        dim: usize,
        eps: f64,
    ) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm::new_unit_offset(
            self.param(&format!("{prefix}.weight"), &[dim])?,
            eps,
        ))
    }
}

/// The safetensors files of an HF directory: those named by model.safetensors.index.json, else
/// model.safetensors, else every *.safetensors file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io {
            path: index_path.clone(),
            source,
        })?;
        let index: Value = serde_json::from_str(&text).map_err(|e| json_error(e, &index_path))?;
        let bad = |message: String| ModelError::BadIndex {
            path: index_path.clone(),
            message,
        };
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no \"weight_map\" object".to_string()))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("tensor \"{tensor}\" maps to a non-string")))?;
            files.insert(file.to_string());
        }
        let mut paths = Vec::new();
        for file in files {
            let path = dir.join(&file);
            if !path.is_file() {
                return Err(bad(format!("shard \"{file}\" is not in {}", dir.display())));
            }
            paths.push(path);
        }
        return Ok(paths);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && p.is_file())
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    Ok(paths)
}

/// Every tensor of the HF checkpoint in `dir`, on `device`, in its stored dtype.
pub(crate) fn load_hf_tensors(
    dir: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut tensors = HashMap::new();
    for path in weight_files(dir)? {
        let shard = candle_core::safetensors::load(&path, device).map_err(|source| {
            ModelError::Safetensors {
                path: path.clone(),
                source,
            }
        })?;
        tensors.extend(shard);
    }
    Ok(tensors)
}

/// The factors `(A [rank, in], B [out, rank])` of the layer at `prefix`, from `adapter`.
fn adapter_factors(
    adapter: &mut AdapterSource,
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
    match adapter {
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
    fn a_starts_as_peft_draws_it_and_b_at_zero() {
        let mut src = AdapterSource::Init { seed: 7 };
        let c = LoraConfig::default();
        let (a, b) = adapter_factors(
            &mut src,
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
        let again = adapter_factors(
            &mut AdapterSource::Init { seed: 7 },
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
        let other = adapter_factors(
            &mut AdapterSource::Init { seed: 7 },
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
