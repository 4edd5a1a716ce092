//! HF safetensors directories to GGUF, and GGUF back to HF directories.
//!
//! Architecture invariant: knows no sampler and no training; it reads and writes files. Every
//! output is written under a temporary name and renamed into place only when complete.
//!
//! Both directions stream one tensor at a time; outputs are written under a temporary name and
//! renamed into place only when complete, so a failed conversion leaves nothing behind.

pub mod arch;
pub mod gguf;
mod gguf_header;
pub mod lora;
pub mod quant;
pub mod refresh;
pub mod safetensors_io;
pub mod tokenizer;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use arch::{GgufArch, Hparams};
use em_config::ModelConfig;
use em_store::Staged;
use gguf::{GgufFile, GgufWriter, TensorSpec};
pub use quant::OutType;
use safetensors_io::{HfTensors, SafetensorsWriter};

/// Float type of the safetensors written from a GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum HfDtype {
    F32,
    Bf16,
}

/// One conversion: the direction follows from `input` (a directory or a .gguf file).
#[derive(Debug, Clone)]
pub struct ConvertArgs {
    /// An HF model directory (-> GGUF) or a .gguf file (-> HF directory).
    pub input: PathBuf,
    /// The .gguf file or the directory to write.
    pub output: PathBuf,
    /// GGUF tensor type, when writing GGUF.
    pub outtype: OutType,
    /// Safetensors float type, when writing an HF directory.
    pub hf_dtype: HfDtype,
    /// Replace the output if it exists.
    pub force: bool,
}

/// What a conversion did, for callers and benchmarks.
#[derive(Debug, Default)]
pub struct Report {
    pub tensors: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// (tensor, wanted type, stored type) for tensors whose shape a type could not take.
    pub fallbacks: Vec<(String, GgmlDType, GgmlDType)>,
    /// (key, value) for every config.json key that was absent and got its transformers class
    /// default (HF -> GGUF only; see [`ModelConfig::defaults_applied`]).
    pub defaults_applied: Vec<(String, String)>,
    /// What the target format or runtime cannot carry exactly, one line each.
    pub notes: Vec<String>,
}

/// Converts in the direction the input implies.
pub fn convert(args: &ConvertArgs) -> Result<Report> {
    if args.output.exists() && !args.force {
        bail!(
            "{}: already exists (use --force to replace it)",
            args.output.display()
        );
    }
    if args.input.is_dir() {
        hf_to_gguf(&args.input, &args.output, args.outtype)
    } else if args.input.is_file() {
        gguf_to_hf(&args.input, &args.output, args.hf_dtype)
    } else {
        bail!("{}: no such file or directory", args.input.display())
    }
}

/// Reads and parses a JSON file, naming it in every error.
pub fn read_json(path: &Path) -> Result<Json> {
    let text =
        fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: malformed JSON: {e}", path.display()))
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    fs::write(path, text + "\n").with_context(|| format!("{}: cannot write", path.display()))
}

/// HF directory -> GGUF file of the given type.
pub fn hf_to_gguf(dir: &Path, out: &Path, outtype: OutType) -> Result<Report> {
    required_config(dir)?;
    let tensors = HfTensors::open(dir)?;
    let shapes = tensors
        .names()
        .into_iter()
        .map(|n| {
            let shape = tensors.shape(&n)?;
            Ok((n, shape))
        })
        .collect::<Result<Vec<_>>>()?;
    let plan = GgufPlan::new(dir, &shapes, outtype, &|name| {
        tensors.file_of(name).to_path_buf()
    })?;
    let mut report = plan.report();
    let staged = Staged::new(out)?;
    let mut writer = GgufWriter::create(staged.path(), &plan.metadata, plan.specs())?;
    for t in &plan.tensors {
        if t.computed.is_none() {
            report.bytes_in += tensors.n_bytes(&t.hf_name)?;
        }
        let bytes = plan
            .encode_from(t, &mut |name| tensors.load_f32(name))
            .with_context(|| {
                format!(
                    "{}: tensor {}",
                    tensors.file_of(&t.hf_name).display(),
                    t.hf_name
                )
            })?;
        report.bytes_out += bytes.len() as u64;
        writer.write_tensor(&bytes)?;
    }
    writer.finish()?;
    staged.commit()?;
    Ok(report)
}

/// `dir/config.json`, which must exist.
fn required_config(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("config.json");
    if !path.exists() {
        bail!(
            "{}: missing (an HF model directory needs config.json)",
            path.display()
        );
    }
    Ok(path)
}

/// One tensor of a [`GgufPlan`]: its HF name and how the GGUF stores it.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// The HF tensor it is written from (for a computed tensor, its GGUF name).
    pub hf_name: String,
    pub spec: TensorSpec,
    /// Values the plan computes itself rather than reading from the model (`rope_freqs.weight`).
    pub computed: Option<Vec<f32>>,
}

/// What a GGUF of an HF model holds: the metadata (hyper-parameters from config.json, the
/// tokenizer) and every tensor's GGUF name, shape and type, in llama.cpp's order. Built from the
/// HF directory's config and tokenizer files and a list of tensor names and shapes, so the
/// tensors may come from the directory or from memory.
#[derive(Debug, Clone)]
pub struct GgufPlan {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<PlannedTensor>,
    hp: Hparams,
    fallbacks: Vec<(String, GgmlDType, GgmlDType)>,
    defaults_applied: Vec<(String, String)>,
}

impl GgufPlan {
    /// Checks `shapes` (HF names) against `dir`'s config.json and plans the file; `file_of` names
    /// the file a tensor came from, for errors.
    pub fn new(
        dir: &Path,
        shapes: &[(String, Vec<usize>)],
        outtype: OutType,
        file_of: &dyn Fn(&str) -> PathBuf,
    ) -> Result<Self> {
        let config_path = required_config(dir)?;
        let config = ModelConfig::from_file(&config_path)?;
        let hp = Hparams::from_model_config(&config, &config_path)?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            bail!(
                "{}: missing (the GGUF needs the tokenizer)",
                tokenizer_path.display()
            );
        }
        let tokenizer_config_path = dir.join("tokenizer_config.json");
        let tokenizer_md = tokenizer::hf_to_gguf(
            &tokenizer_path,
            tokenizer_config_path
                .exists()
                .then_some(tokenizer_config_path.as_path()),
            hp.arch.gguf_name(),
        )?;
        // Check names and shapes against config.json before writing anything.
        for name in hp.required_hf_names() {
            if !shapes.iter().any(|(n, _)| *n == name) {
                bail!(
                    "{}: missing tensor {name} (config.json describes {} layers)",
                    dir.display(),
                    hp.num_layers
                );
            }
        }
        let mut plan: Vec<(String, String, Vec<usize>)> = vec![]; // (hf, gguf, shape)
        for (name, shape) in shapes {
            let Some(expected) = hp.expected_shape(name) else {
                if name.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                bail!(
                    "{}: tensor {name} is not part of a {} model",
                    file_of(name).display(),
                    hp.arch.gguf_name()
                );
            };
            if name == "lm_head.weight" && hp.tie_word_embeddings {
                continue; // tied: llama.cpp reuses token_embd
            }
            if *shape != expected {
                bail!(
                    "{}: tensor {name} has shape {shape:?}, config.json implies {expected:?}",
                    file_of(name).display()
                );
            }
            let gguf_name = hp
                .hf_to_gguf_name(name)
                .expect("every expected tensor has a GGUF name");
            plan.push((name.clone(), gguf_name, shape.clone()));
        }
        plan.sort_by_key(|(_, g, _)| gguf_order(g));

        let has_output = plan.iter().any(|(_, g, _)| g == "output.weight");
        let mut fallbacks = vec![];
        let mut tensors = vec![];
        for (hf_name, gguf_name, shape) in plan {
            let choice = quant::choose(
                outtype,
                &quant::TensorRole {
                    gguf_name: &gguf_name,
                    shape: &shape,
                    has_output,
                    n_layers: hp.num_layers,
                },
            );
            if choice.dtype != choice.wanted {
                fallbacks.push((gguf_name.clone(), choice.wanted, choice.dtype));
            }
            tensors.push(PlannedTensor {
                hf_name,
                spec: TensorSpec {
                    name: gguf_name,
                    shape,
                    dtype: choice.dtype,
                },
                computed: None,
            });
        }
        if let Some(divisors) = hp.rope_freqs() {
            // llama.cpp's converter stores it as f32 before the blocks, whatever the file type.
            tensors.insert(
                1.min(tensors.len()),
                PlannedTensor {
                    hf_name: arch::ROPE_FREQS.into(),
                    spec: TensorSpec {
                        name: arch::ROPE_FREQS.into(),
                        shape: vec![divisors.len()],
                        dtype: GgmlDType::F32,
                    },
                    computed: Some(divisors),
                },
            );
        }

        let model_name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let mut metadata: Vec<(String, Value)> = vec![
            (
                "general.architecture".into(),
                Value::String(hp.arch.gguf_name().into()),
            ),
            (
                "general.name".into(),
                Value::String(model_name.unwrap_or_else(|| "model".into())),
            ),
            ("general.file_type".into(), Value::U32(outtype.file_type())),
        ];
        if outtype.is_quantized() {
            metadata.push(("general.quantization_version".into(), Value::U32(2)));
        }
        metadata.extend(hp.to_gguf_metadata());
        metadata.extend(tokenizer_md);
        Ok(Self {
            metadata,
            tensors,
            hp,
            fallbacks,
            defaults_applied: config.defaults_applied,
        })
    }

    /// The tensor infos of the header, in file order.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors.iter().map(|t| t.spec.clone()).collect()
    }

    /// The bytes the file stores for `t`: its computed values, or its HF values from `load`.
    pub fn encode_from(
        &self,
        t: &PlannedTensor,
        load: &mut dyn FnMut(&str) -> Result<Tensor>,
    ) -> Result<Vec<u8>> {
        match &t.computed {
            Some(values) => encode(
                &Tensor::from_slice(values, values.len(), &Device::Cpu)?,
                t.spec.dtype,
            ),
            None => self.encode(t, load(&t.hf_name)?),
        }
    }

    /// The bytes the file stores for `t`, from its HF values (f32, any device).
    pub fn encode(&self, t: &PlannedTensor, values: Tensor) -> Result<Vec<u8>> {
        let values = values.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let values = self.hp.hf_to_gguf_values(&t.hf_name, values)?;
        encode(&values, t.spec.dtype).with_context(|| format!("as {:?}", t.spec.dtype))
    }

    fn report(&self) -> Report {
        Report {
            tensors: self.tensors.len(),
            fallbacks: self.fallbacks.clone(),
            defaults_applied: self.defaults_applied.clone(),
            notes: self.hp.notes.clone(),
            ..Report::default()
        }
    }
}

/// llama.cpp's usual order: embeddings, blocks by number, then the output head.
fn gguf_order(name: &str) -> (usize, usize, String) {
    if name.starts_with("token_embd") {
        return (0, 0, name.into());
    }
    if let Some(rest) = name.strip_prefix("blk.") {
        let layer = rest
            .split('.')
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        return (1, layer, name.into());
    }
    (2, 0, name.into())
}

/// An f32 tensor's bytes as `dtype`.
fn encode(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        GgmlDType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        GgmlDType::F16 => flat
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        GgmlDType::BF16 => flat
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        q => QTensor::quantize(t, q)?.data()?.into_owned(),
    })
}

/// GGUF file -> HF directory (safetensors, config.json, tokenizer files).
pub fn gguf_to_hf(path: &Path, out_dir: &Path, dtype: HfDtype) -> Result<Report> {
    let mut gguf = GgufFile::open(path)?;
    let names = gguf.tensor_names();
    let has_output = names.iter().any(|n| n == "output.weight");
    let mut hp = Hparams::from_gguf(gguf.metadata(), has_output, path)?;
    if names.iter().any(|n| n == arch::ROPE_FREQS) {
        let divisors = gguf
            .tensor(arch::ROPE_FREQS)?
            .dequantize(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        hp.set_rope_freqs(&divisors, path)?;
    }
    let (tokenizer_json, tokenizer_config) = tokenizer::gguf_to_hf(gguf.metadata())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let token_id = |key: &str| gguf.metadata().get(key).and_then(|v| v.to_u32().ok());
    let (bos, eos, pad) = (
        token_id("tokenizer.ggml.bos_token_id"),
        token_id("tokenizer.ggml.eos_token_id"),
        token_id("tokenizer.ggml.padding_token_id"),
    );

    let mut plan = vec![];
    for name in names.iter().filter(|n| *n != arch::ROPE_FREQS) {
        let Some(hf_name) = hp.gguf_to_hf_name(name) else {
            bail!(
                "{}: tensor {name} has no HF equivalent for {} (unsupported)",
                path.display(),
                hp.arch.gguf_name()
            );
        };
        let shape = gguf.content.tensor_infos[name].shape.dims().to_vec();
        if let Some(expected) = hp.expected_shape(&hf_name) {
            if shape != expected {
                bail!(
                    "{}: tensor {name} has shape {shape:?}, the metadata implies {expected:?}",
                    path.display()
                );
            }
        }
        plan.push((name.clone(), hf_name, shape));
    }
    let present: std::collections::HashSet<&str> =
        plan.iter().map(|(_, h, _)| h.as_str()).collect();
    if let Some(missing) = hp
        .required_hf_names()
        .into_iter()
        .find(|n| !present.contains(n.as_str()))
    {
        bail!(
            "{}: missing tensor {}",
            path.display(),
            hp.hf_to_gguf_name(&missing).unwrap_or(missing)
        );
    }
    plan.sort_by(|a, b| a.1.cmp(&b.1));

    let staged = Staged::new(out_dir)?;
    fs::create_dir_all(staged.path())?;
    let (st_dtype, torch_dtype) = match dtype {
        HfDtype::F32 => (safetensors::Dtype::F32, "float32"),
        HfDtype::Bf16 => (safetensors::Dtype::BF16, "bfloat16"),
    };
    let mut report = Report::default();
    let specs: Vec<(String, Vec<usize>)> = plan
        .iter()
        .map(|(_, h, s)| (h.clone(), s.clone()))
        .collect();
    let mut writer =
        SafetensorsWriter::create(&staged.path().join("model.safetensors"), &specs, st_dtype)?;
    for (name, hf_name, _) in &plan {
        let q = gguf.tensor(name)?;
        report.bytes_in += q.storage_size_in_bytes() as u64;
        let t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        let t = hp.gguf_to_hf_values(hf_name, t)?;
        let bytes = match dtype {
            HfDtype::F32 => encode(&t, GgmlDType::F32)?,
            HfDtype::Bf16 => encode(&t, GgmlDType::BF16)?,
        };
        report.bytes_out += bytes.len() as u64;
        writer.write_tensor(&bytes)?;
    }
    writer.finish()?;
    write_json(
        &staged.path().join("config.json"),
        &hp.to_hf_config(bos, eos, pad, torch_dtype),
    )?;
    write_json(
        &staged.path().join("generation_config.json"),
        &serde_json::json!({"bos_token_id": bos, "eos_token_id": eos}),
    )?;
    write_json(&staged.path().join("tokenizer.json"), &tokenizer_json)?;
    write_json(
        &staged.path().join("tokenizer_config.json"),
        &tokenizer_config,
    )?;
    staged.commit()?;
    report.tensors = plan.len();
    Ok(report)
}

/// GGUF metadata as a map, for comparisons in tests.
pub fn gguf_metadata(path: &Path) -> Result<HashMap<String, Value>> {
    Ok(GgufFile::open(path)?.content.metadata)
}
