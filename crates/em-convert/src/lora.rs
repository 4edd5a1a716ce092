//! LoRA adapters: PEFT directories both ways, llama.cpp's LoRA GGUF, and merging into an HF model.
//!
//! An [`Adapter`] holds each targeted module's factors in PEFT's layout, `A` [rank, in] and `B`
//! [out, rank]; the module's weight `W` [out, in] becomes `W + alpha / rank · B·A`. Every output is
//! staged under a temporary name and renamed into place only when complete.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use serde_json::{json, Value as Json};

use crate::arch::{GgufArch, Hparams};
use crate::gguf::{GgufWriter, TensorSpec};
use crate::safetensors_io::{Dtype, HfTensors, SafetensorsWriter};
use em_config::ModelConfig;
use em_store::Staged;

/// The configuration file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT puts before a module's path in its tensor names.
const PEFT_PREFIX: &str = "base_model.model.";

/// The two factors of one adapted linear module, row-major f32 in PEFT's layout.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// `lora_A.weight`, shape [rank, in_features].
    pub a: Vec<f32>,
    /// `lora_B.weight`, shape [out_features, rank].
    pub b: Vec<f32>,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
}

impl LoraPair {
    /// A as a [rank, in_features] tensor.
    pub fn a_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.a,
            (self.rank, self.in_features),
            &Device::Cpu,
        )?)
    }

    /// B as an [out_features, rank] tensor.
    pub fn b_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.b,
            (self.out_features, self.rank),
            &Device::Cpu,
        )?)
    }

    /// `scale · B·A`, the [out_features, in_features] update of the base weight, in f32.
    pub fn delta(&self, scale: f64) -> Result<Tensor> {
        Ok(self
            .b_tensor()?
            .matmul(&self.a_tensor()?)?
            .affine(scale, 0.0)?)
    }

    /// Why the factors disagree with the dimensions, if they do.
    fn inconsistency(&self, rank: usize) -> Option<String> {
        if self.rank != rank {
            return Some(format!("rank {} but the adapter's r is {rank}", self.rank));
        }
        let (a, b) = (self.rank * self.in_features, self.out_features * self.rank);
        (self.a.len() != a || self.b.len() != b).then(|| {
            format!(
                "lora_A has {} values and lora_B {}, rank {} with {} in and {} out features needs {a} and {b}",
                self.a.len(),
                self.b.len(),
                self.rank,
                self.in_features,
                self.out_features
            )
        })
    }

    /// Why the pair cannot adapt a base weight of row-major `shape` (which `source` gives), if it
    /// cannot.
    fn mismatch(&self, shape: &[usize], source: &str) -> Option<String> {
        (shape != [self.out_features, self.in_features]).then(|| {
            format!(
                "the adapter's factors imply shape [{}, {}], {source} {shape:?}",
                self.out_features, self.in_features
            )
        })
    }
}

/// A LoRA adapter: one rank and alpha for every module (PEFT without rank or alpha patterns).
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub rank: usize,
    pub alpha: f64,
    /// PEFT's `target_modules`, e.g. `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
    /// PEFT's `base_model_name_or_path`.
    pub base_model: Option<String>,
    /// The factors by the base model's module path without `.weight`, e.g.
    /// `model.layers.0.self_attn.q_proj`.
    pub modules: BTreeMap<String, LoraPair>,
}

impl Adapter {
    /// `alpha / rank`, the factor of `B·A` in the update.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Refuses an adapter whose factors disagree with their dimensions (`dest` names the output).
    fn check(&self, dest: &Path) -> Result<()> {
        if self.rank == 0 || !self.alpha.is_finite() {
            bail!(
                "{}: the adapter needs r >= 1 and a finite alpha (r = {}, alpha = {})",
                dest.display(),
                self.rank,
                self.alpha
            );
        }
        for (module, pair) in &self.modules {
            if let Some(why) = pair.inconsistency(self.rank) {
                bail!("{}: module {module}: {why}", dest.display());
            }
        }
        Ok(())
    }
}

/// PEFT's tensor name of one factor (`'A'` or `'B'`) of `module`.
fn peft_name(module: &str, factor: char) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{factor}.weight")
}

/// `module` and factor (0 for A, 1 for B) of a PEFT tensor name, with or without an adapter name
/// before `.weight` (`…q_proj.lora_A.default.weight`).
fn parse_peft_name(name: &str) -> Option<(&str, usize)> {
    let rest = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
    let rest = rest.strip_suffix(".weight")?;
    let factor = |s: &str| match s {
        "lora_A" => Some(0),
        "lora_B" => Some(1),
        _ => None,
    };
    let (head, last) = rest.rsplit_once('.')?;
    let (module, f) = match factor(last) {
        Some(f) => (head, f),
        None => {
            let (module, f) = head.rsplit_once('.')?;
            (module, factor(f)?)
        }
    };
    (!module.is_empty()).then_some((module, f))
}

/// `adapter_config.json` as PEFT writes it for a plain LoRA of a causal LM.
fn peft_config(adapter: &Adapter) -> Json {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "target_modules": adapter.target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": adapter.base_model,
        "revision": null,
    })
}

/// Writes `dir` as a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`
/// in f32), replacing it whole.
pub fn write_peft_dir(adapter: &Adapter, dir: &Path) -> Result<()> {
    adapter.check(dir)?;
    let staged = Staged::new(dir)?;
    fs::create_dir_all(staged.path())
        .with_context(|| format!("{}: cannot create", staged.path().display()))?;
    crate::write_json(&staged.path().join(CONFIG_FILE), &peft_config(adapter))?;
    let mut specs = vec![];
    let mut data: Vec<&[f32]> = vec![];
    for (module, p) in &adapter.modules {
        specs.push((peft_name(module, 'A'), vec![p.rank, p.in_features]));
        specs.push((peft_name(module, 'B'), vec![p.out_features, p.rank]));
        data.extend([p.a.as_slice(), p.b.as_slice()]);
    }
    let mut writer =
        SafetensorsWriter::create(&staged.path().join(WEIGHTS_FILE), &specs, Dtype::F32)?;
    for values in data {
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        writer.write_tensor(&bytes)?;
    }
    writer.finish()?;
    staged.commit()?;
    Ok(())
}

/// The settings of a PEFT `adapter_config.json` that an [`Adapter`] keeps, after refusing what it
/// cannot represent.
struct PeftSettings {
    rank: usize,
    alpha: f64,
    target_modules: Vec<String>,
    base_model: Option<String>,
}

impl PeftSettings {
    fn from_json(config: &Json, path: &Path) -> Result<Self> {
        let at = path.display();
        let Some(obj) = config.as_object() else {
            bail!("{at}: the top level must be a JSON object");
        };
        match obj.get("peft_type").and_then(Json::as_str) {
            Some("LORA") => {}
            Some(other) => bail!("{at}: peft_type is {other:?}; only LORA adapters are supported"),
            None => bail!("{at}: missing \"peft_type\" (a LoRA adapter says \"LORA\")"),
        }
        for (key, what) in [
            ("use_dora", "DoRA"),
            ("use_rslora", "rank-stabilized LoRA"),
            ("fan_in_fan_out", "transposed (Conv1D) factors"),
        ] {
            if obj.get(key) == Some(&Json::Bool(true)) {
                bail!("{at}: {key} is true: {what} is not supported");
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if obj
                .get(key)
                .and_then(Json::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                bail!("{at}: {key} is not empty: per-module ranks and alphas are not supported");
            }
        }
        if let Some(bias) = obj.get("bias").and_then(Json::as_str) {
            if bias != "none" {
                bail!("{at}: bias is {bias:?}: trained biases are not supported (only \"none\")");
            }
        }
        if obj
            .get("modules_to_save")
            .and_then(Json::as_array)
            .is_some_and(|m| !m.is_empty())
        {
            bail!("{at}: modules_to_save is not empty: fully trained modules are not supported");
        }
        let rank = match obj.get("r") {
            None | Some(Json::Null) => bail!("{at}: missing \"r\""),
            Some(v) => v
                .as_u64()
                .filter(|&r| r > 0)
                .with_context(|| format!("{at}: \"r\" must be a positive integer, got {v}"))?
                as usize,
        };
        let alpha = match obj.get("lora_alpha") {
            None | Some(Json::Null) => bail!("{at}: missing \"lora_alpha\""),
            Some(v) => v
                .as_f64()
                .with_context(|| format!("{at}: \"lora_alpha\" must be a number, got {v}"))?,
        };
        let target_modules = match obj.get("target_modules") {
            None | Some(Json::Null) => vec![],
            Some(Json::String(s)) => vec![s.clone()],
            Some(Json::Array(items)) => items
                .iter()
                .map(|m| m.as_str().map(String::from))
                .collect::<Option<_>>()
                .with_context(|| format!("{at}: \"target_modules\" must list strings"))?,
            Some(v) => bail!("{at}: \"target_modules\" must be a list of strings, got {v}"),
        };
        let base_model = obj
            .get("base_model_name_or_path")
            .and_then(Json::as_str)
            .map(String::from);
        Ok(Self {
            rank,
            alpha,
            target_modules,
            base_model,
        })
    }
}

/// Reads a PEFT adapter directory (weights in f32, f16 or bf16); every error names the file.
pub fn read_peft_dir(dir: &Path) -> Result<Adapter> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        bail!(
            "{}: missing (a PEFT adapter directory needs {CONFIG_FILE})",
            config_path.display()
        );
    }
    let settings = PeftSettings::from_json(&crate::read_json(&config_path)?, &config_path)?;
    let path = dir.join(WEIGHTS_FILE);
    let at = path.display();
    if !path.is_file() {
        let bin = dir.join("adapter_model.bin").is_file();
        bail!(
            "{at}: missing{}",
            if bin {
                " (adapter_model.bin is not read: save with safe_serialization=True)"
            } else {
                ""
            }
        );
    }
    let tensors = HfTensors::open_files(vec![path.clone()])?;
    let mut factors: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    for name in tensors.names() {
        let (module, f) = parse_peft_name(&name).with_context(|| {
            format!("{at}: tensor {name} is not a LoRA factor (expected <module>.lora_A.weight or <module>.lora_B.weight)")
        })?;
        let slot = &mut factors.entry(module.to_string()).or_default()[f];
        if let Some(prev) = slot {
            bail!("{at}: tensors {prev} and {name} are the same factor of {module}");
        }
        *slot = Some(name.clone());
    }
    if factors.is_empty() {
        bail!("{at}: no LoRA tensors");
    }
    let r = settings.rank;
    let mut modules = BTreeMap::new();
    for (module, [a, b]) in factors {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => bail!("{at}: tensor {a} has no lora_B beside it"),
            (None, b) => bail!(
                "{at}: tensor {} has no lora_A beside it",
                b.unwrap_or_default()
            ),
        };
        let (sa, sb) = (tensors.shape(&a)?, tensors.shape(&b)?);
        let in_features = match sa[..] {
            [rank, i] if rank == r => i,
            _ => bail!("{at}: tensor {a} has shape {sa:?}, {CONFIG_FILE} says r = {r} (expected [{r}, in_features])"),
        };
        let out_features = match sb[..] {
            [o, rank] if rank == r => o,
            _ => bail!("{at}: tensor {b} has shape {sb:?}, {CONFIG_FILE} says r = {r} (expected [out_features, {r}])"),
        };
        let values = |name: &str| -> Result<Vec<f32>> {
            Ok(tensors.load_f32(name)?.flatten_all()?.to_vec1::<f32>()?)
        };
        modules.insert(
            module,
            LoraPair {
                a: values(&a)?,
                b: values(&b)?,
                rank: r,
                in_features,
                out_features,
            },
        );
    }
    Ok(Adapter {
        rank: r,
        alpha: settings.alpha,
        target_modules: settings.target_modules,
        base_model: settings.base_model,
        modules,
    })
}

/// Float type of the factors in a LoRA GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LoraGgufType {
    F32,
    F16,
}

/// The GGUF name of the base weight `hf_weight` that `pair` adapts, or why it cannot.
fn gguf_base_name(hp: &Hparams, hf_weight: &str, pair: &LoraPair) -> Result<String, String> {
    let arch = hp.arch.gguf_name();
    if hf_weight == "model.embed_tokens.weight" {
        return Err(format!(
            "{hf_weight}: LoRA of the embedding is not supported"
        ));
    }
    if hf_weight == "lm_head.weight" && hp.tie_word_embeddings {
        return Err(format!(
            "{hf_weight}: the base ties the LM head to the embedding, so its GGUF has no output.weight to adapt"
        ));
    }
    let (Some(name), Some(shape)) = (hp.hf_to_gguf_name(hf_weight), hp.expected_shape(hf_weight))
    else {
        return Err(format!("{hf_weight} is not a tensor of a {arch} model"));
    };
    if shape.len() != 2 {
        return Err(format!("{hf_weight} is not a linear layer's weight"));
    }
    match pair.mismatch(
        &shape,
        &format!("the base's config.json implies for {hf_weight}"),
    ) {
        Some(why) => Err(why),
        None => Ok(name),
    }
}

/// Writes `adapter` as llama.cpp's LoRA GGUF for the GGUF that `hf_to_gguf` makes of the base
/// model with config `base_config`; returns the file's size.
pub fn write_lora_gguf(
    adapter: &Adapter,
    base_config: &ModelConfig,
    out: &Path,
    dtype: LoraGgufType,
) -> Result<u64> {
    adapter.check(out)?;
    if adapter.alpha == 0.0 {
        // llama.cpp reads alpha 0 as "no alpha" and applies B·A unscaled.
        bail!(
            "{}: lora_alpha 0 cannot be written (llama.cpp would apply B·A unscaled)",
            out.display()
        );
    }
    let hp = Hparams::from_model_config(base_config, Path::new("config.json"))?;
    let dtype = match dtype {
        LoraGgufType::F32 => GgmlDType::F32,
        LoraGgufType::F16 => GgmlDType::F16,
    };
    let mut planned = vec![];
    for (module, pair) in &adapter.modules {
        let hf = format!("{module}.weight");
        let gguf = gguf_base_name(&hp, &hf, pair)
            .map_err(|why| anyhow!("{}: module {module}: {why}", out.display()))?;
        planned.push((gguf, hf, pair));
    }
    planned.sort_by_key(|(gguf, ..)| crate::gguf_order(gguf));
    let specs = planned
        .iter()
        .flat_map(|(gguf, _, p)| {
            [
                (format!("{gguf}.lora_a"), vec![p.rank, p.in_features]),
                (format!("{gguf}.lora_b"), vec![p.out_features, p.rank]),
            ]
        })
        .map(|(name, shape)| TensorSpec { name, shape, dtype })
        .collect();
    let metadata = [
        ("general.type", Value::String("adapter".into())),
        (
            "general.architecture",
            Value::String(hp.arch.gguf_name().into()),
        ),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(adapter.alpha as f32)),
    ]
    .map(|(k, v)| (k.to_string(), v));
    let staged = Staged::new(out)?;
    let mut writer = GgufWriter::create(staged.path(), &metadata, specs)?;
    for (_, hf, pair) in &planned {
        writer.write_tensor(&crate::encode(&pair.a_tensor()?, dtype)?)?;
        // The base weight's rows are reordered for GGUF; B's rows are its output rows.
        let b = hp.hf_to_gguf_rows(hf, pair.b_tensor()?)?;
        writer.write_tensor(&crate::encode(&b, dtype)?)?;
    }
    writer.finish()?;
    staged.commit()?;
    Ok(fs::metadata(out)
        .with_context(|| format!("{}: cannot stat", out.display()))?
        .len())
}

/// The GGUF type that encodes a safetensors float type the same way.
fn ggml_type_of(dtype: Dtype) -> Option<GgmlDType> {
    match dtype {
        Dtype::F32 => Some(GgmlDType::F32),
        Dtype::F16 => Some(GgmlDType::F16),
        Dtype::BF16 => Some(GgmlDType::BF16),
        _ => None,
    }
}

/// Writes `out_dir`: the HF model in `base_dir` with `adapter` merged into its weights (computed
/// in f32, stored in each weight's dtype); every other file and tensor is copied unchanged.
pub fn merge_into(base_dir: &Path, adapter: &Adapter, out_dir: &Path) -> Result<()> {
    adapter.check(out_dir)?;
    if out_dir.canonicalize().ok() == Some(base_dir.canonicalize()?) {
        bail!(
            "{}: is the base directory; merge into another one",
            out_dir.display()
        );
    }
    let tensors = HfTensors::open(base_dir)?;
    // Check every module before writing anything.
    let mut by_shard: BTreeMap<PathBuf, Vec<(String, &LoraPair, GgmlDType)>> = BTreeMap::new();
    for (module, pair) in &adapter.modules {
        let name = format!("{module}.weight");
        if !tensors.contains(&name) {
            bail!(
                "{}: no tensor {name} (the adapter's module {module}) in its safetensors",
                base_dir.display()
            );
        }
        let (file, _, dtype) = tensors.location(&name)?;
        let Some(ggml) = ggml_type_of(dtype) else {
            bail!(
                "{}: tensor {name} has dtype {dtype:?}; merging needs f32, f16 or bf16",
                file.display()
            );
        };
        if let Some(why) = pair.mismatch(&tensors.shape(&name)?, "the base has") {
            bail!("{}: tensor {name}: {why}", file.display());
        }
        by_shard
            .entry(file.to_path_buf())
            .or_default()
            .push((name, pair, ggml));
    }
    let shards: BTreeSet<PathBuf> = tensors
        .names()
        .iter()
        .map(|n| tensors.file_of(n).to_path_buf())
        .collect();

    let staged = Staged::new(out_dir)?;
    let dest = staged.path();
    fs::create_dir_all(dest).with_context(|| format!("{}: cannot create", dest.display()))?;
    let entries =
        fs::read_dir(base_dir).with_context(|| format!("{}: cannot list", base_dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("{}: cannot list", base_dir.display()))?
            .path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let weights = path.extension().is_some_and(|e| e == "safetensors");
        let hidden = name.as_deref().is_none_or(|n| n.starts_with('.'));
        if path.is_file() && !hidden && (!weights || shards.contains(&path)) {
            let to = dest.join(path.file_name().expect("a listed file has a name"));
            fs::copy(&path, &to)
                .with_context(|| format!("{}: cannot copy to {}", path.display(), to.display()))?;
        }
    }
    // A merged weight keeps its dtype and shape, so it overwrites its own bytes in the copy.
    let scale = adapter.scale();
    for (shard, targets) in &by_shard {
        let to = dest.join(shard.file_name().expect("a shard has a name"));
        let io = |e: std::io::Error| anyhow!("{}: cannot write: {e}", to.display());
        let mut file = OpenOptions::new().write(true).open(&to).map_err(io)?;
        for (name, pair, ggml) in targets {
            let merged = (tensors.load_f32(name)? + pair.delta(scale)?)?;
            let bytes = crate::encode(&merged, *ggml)
                .with_context(|| format!("{}: tensor {name}", shard.display()))?;
            let (_, range, _) = tensors.location(name)?;
            if bytes.len() as u64 != range.end - range.start {
                bail!(
                    "{}: tensor {name}: merged bytes do not fill its span",
                    shard.display()
                );
            }
            file.seek(SeekFrom::Start(range.start)).map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
    }
    staged.commit()?;
    Ok(())
}
