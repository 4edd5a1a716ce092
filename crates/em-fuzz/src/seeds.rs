//! The seed corpus: small valid inputs for every target, made with the project's own writers where
//! it has them (GGUF, safetensors), and the structure-aware config edits of the `config` target.
//!
//! `corpus/<target>/` holds what [`for_target`] returns; regenerate it with
//! `EM_FUZZ_WRITE_CORPUS=1 cargo test --release -p em-fuzz --test replay write_corpus -- --ignored`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use em_convert::arch::{Arch, GgufArch, Hparams};
use em_convert::gguf::{GgufWriter, TensorSpec};
use em_convert::safetensors_io::{Dtype, SafetensorsWriter};
use em_data::ChatMessage;
use serde_json::{json, Value as Json};

use crate::Scratch;

/// One seed: a file name (no extension: `.gitignore` drops `*.gguf`) and its bytes.
pub type Seed = (String, Vec<u8>);

/// The seeds of `target` (a name in [`crate::TARGETS`]).
pub fn for_target(target: &str) -> Vec<Seed> {
    match target {
        "gguf" => gguf_seeds(),
        "safetensors" => safetensors_seeds(),
        "safetensors_index" => index_seeds(),
        "tokenizer_json" => tokenizer_seeds(),
        "config" => config_seeds(),
        "chat_template" => template_seeds(),
        "suite" => suite_seeds(),
        "pool" => pool_seeds(),
        "grader" => grader_seeds(),
        other => panic!("em-fuzz: no target {other}"),
    }
}

/// Writes every target's seeds under `root/<target>/`; returns how many files it wrote.
pub fn write_corpus(root: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for (target, _) in crate::TARGETS {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in for_target(target) {
            std::fs::write(dir.join(name), bytes)?;
            n += 1;
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// config.json

/// The architectures' tiny configs, in the order [`edited_config`]'s first byte picks them.
const ARCHS: [Arch; 5] = [
    Arch::Qwen2,
    Arch::Llama,
    Arch::Gemma3,
    Arch::Qwen3,
    Arch::Mistral,
];

/// A valid config.json of `arch` with tiny sizes (every dimension a multiple of 32, so the
/// GGUF seeds can quantize it).
pub fn tiny_config(arch: Arch) -> Json {
    let mut c = json!({
        "vocab_size": 8, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "torch_dtype": "float32"
    });
    let extra = match arch {
        Arch::Qwen2 => json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "hidden_act": "silu", "tie_word_embeddings": true, "use_sliding_window": false}),
        Arch::Llama => json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "hidden_act": "silu", "tie_word_embeddings": false, "attention_bias": false}),
        Arch::Gemma3 => json!({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16,
            "sliding_window": 4, "sliding_window_pattern": 2, "rope_local_base_freq": 10000.0,
            "tie_word_embeddings": true}),
        Arch::Qwen3 => json!({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
            "hidden_act": "silu", "tie_word_embeddings": true, "attention_bias": false}),
        Arch::Mistral => json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
            "hidden_act": "silu", "tie_word_embeddings": false, "sliding_window": 4}),
    };
    for (k, v) in extra.as_object().expect("an object") {
        c[k] = v.clone();
    }
    c
}

/// The keys [`edited_config`] edits; dots reach into objects.
const CONFIG_KEYS: &[&str] = &[
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "layer_types",
    "torch_dtype",
    "dtype",
    "pad_token_id",
    "hidden_act",
    "hidden_activation",
    "attention_bias",
    "mlp_bias",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "sliding_window_pattern",
    "query_pre_attn_scalar",
    "rope_local_base_freq",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_bidirectional_attention",
    "text_config",
    "rope_scaling.rope_type",
    "rope_scaling.factor",
    "rope_scaling.original_max_position_embeddings",
    "rope_scaling.low_freq_factor",
    "rope_scaling.high_freq_factor",
    "rope_parameters.rope_theta",
    "rope_parameters.rope_type",
    "rope_parameters.factor",
    "rope_parameters.full_attention",
    "rope_parameters.sliding_attention",
    "rope_parameters.full_attention.rope_theta",
    "rope_parameters.sliding_attention.rope_theta",
    "rope_parameters.full_attention.rope_type",
];

const STRINGS: &[&str] = &[
    "silu",
    "gelu",
    "gelu_pytorch_tanh",
    "relu",
    "default",
    "linear",
    "llama3",
    "yarn",
    "dynamic",
    "full_attention",
    "sliding_attention",
    "bfloat16",
    "float32",
    "float16",
    "qwen2",
    "llama",
    "gemma3_text",
    "gemma3",
    "mamba",
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
    "Gemma3ForCausalLM",
    "",
    "big",
];

fn ints() -> [Json; 22] {
    [
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(4),
        json!(16),
        json!(28),
        json!(32),
        json!(62),
        json!(255),
        json!(4096),
        json!(65536),
        json!(65537),
        json!(u32::MAX),
        json!(u32::MAX as u64 + 1),
        json!(1_000_000_000_000u64),
        json!(1u64 << 53),
        json!(u64::MAX),
        json!(-1),
        json!(i64::MIN),
        json!(1.5),
        json!(1e12),
    ]
}

const FLOATS: &[f64] = &[
    0.0,
    -0.0,
    1e-6,
    1e-30,
    0.5,
    1.0,
    4.0,
    8.0,
    16.0,
    10000.0,
    1e6,
    1e308,
    -1.0,
    f64::MAX,
    f64::MIN_POSITIVE,
];

/// Reads edit values from bytes; every byte past the end reads as 0.
struct Bytes<'a>(std::slice::Iter<'a, u8>);

impl Bytes<'_> {
    fn next(&mut self) -> usize {
        self.0.next().copied().unwrap_or(0) as usize
    }

    fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.next() % from.len()].clone()
    }

    fn float(&mut self) -> Json {
        json!(self.pick(FLOATS))
    }

    fn rope(&mut self) -> Json {
        json!({
            "rope_type": self.pick(STRINGS),
            "factor": self.float(),
            "rope_theta": self.float(),
            "low_freq_factor": self.float(),
            "high_freq_factor": self.float(),
            "original_max_position_embeddings": self.pick(&ints()),
        })
    }

    /// A value, or None to remove the key.
    fn value(&mut self) -> Option<Json> {
        Some(match self.next() % 13 {
            0 => return None,
            1 => Json::Null,
            2 => json!(self.next() % 2 == 1),
            3 => json!(self.next()),
            4 => self.pick(&ints()),
            5 => self.float(),
            6 => json!(self.pick(STRINGS)),
            7 => {
                let (len, pattern) = (self.next() % 40, self.next());
                let types: Vec<&str> = (0..len)
                    .map(|i| {
                        if pattern >> (i % 8) & 1 == 1 {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                json!(types)
            }
            8 => self.rope(),
            9 => json!({"full_attention": self.rope(), "sliding_attention": self.rope()}),
            10 => {
                let len = self.next() % 4;
                Json::Array((0..len).map(|_| self.pick(&ints())).collect())
            }
            11 => json!([self.pick(STRINGS)]),
            _ => {
                let len = self.next() % 16;
                let bytes: Vec<u8> = (0..len).map(|_| self.next() as u8).collect();
                json!(String::from_utf8_lossy(&bytes))
            }
        })
    }
}

/// A valid config.json of one architecture (the first byte picks it) edited by the rest: each
/// edit is a byte naming a key of [`CONFIG_KEYS`] and bytes choosing its value (or its removal)
/// from boundary values, layer-type lists and rope objects.
pub fn edited_config(data: &[u8]) -> Json {
    let mut bytes = Bytes(data.iter());
    let mut config = tiny_config(ARCHS[bytes.next() % ARCHS.len()]);
    while bytes.0.len() > 0 {
        let key = bytes.pick(CONFIG_KEYS);
        let value = bytes.value();
        set_path(&mut config, key, value);
    }
    config
}

/// Sets (or with None removes) the value at a dotted path, making objects on the way.
fn set_path(root: &mut Json, path: &str, value: Option<Json>) {
    let mut node = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if !node.is_object() {
            *node = json!({});
        }
        let object = node.as_object_mut().expect("made an object above");
        if parts.peek().is_none() {
            match value {
                Some(v) => {
                    object.insert(part.to_string(), v);
                }
                None => {
                    object.remove(part);
                }
            }
            return;
        }
        node = object.entry(part).or_insert_with(|| json!({}));
    }
}

fn config_seeds() -> Vec<Seed> {
    let mut seeds: Vec<Seed> = ARCHS
        .iter()
        .map(|&arch| {
            let text = serde_json::to_string_pretty(&tiny_config(arch)).expect("JSON");
            (format!("{}-tiny.json", arch.gguf_name()), text.into_bytes())
        })
        .collect();
    // Real models' files as transformers writes them (sizes of Qwen2.5-Math-1.5B, SmolLM2-135M,
    // gemma-3-270m), in the 4.x and the 5.x layout.
    let real = [
        (
            "qwen2.5-math-v4.json",
            json!({"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643,
            "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
            "intermediate_size": 8960, "max_position_embeddings": 4096, "max_window_layers": 21,
            "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_cache": true,
            "use_sliding_window": false, "vocab_size": 151936}),
        ),
        (
            "smollm2-v5.json",
            json!({"architectures": ["LlamaForCausalLM"], "attention_bias": false,
            "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
            "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
            "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
            "pad_token_id": 2, "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
            "tie_word_embeddings": true, "dtype": "bfloat16", "vocab_size": 49152}),
        ),
        (
            "gemma3-270m-v5.json",
            json!({"architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
            "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
            "intermediate_size": 2048, "layer_types": ["sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
            "num_hidden_layers": 6, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-06, "sliding_window": 512, "dtype": "bfloat16", "vocab_size": 262144,
            "rope_parameters": {"full_attention": {"rope_theta": 1000000.0, "rope_type": "linear", "factor": 8.0},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}}),
        ),
    ];
    for (name, config) in real {
        let text = serde_json::to_string_pretty(&config).expect("JSON");
        seeds.push((name.to_string(), text.into_bytes()));
    }
    let mut llama3 = tiny_config(Arch::Llama);
    llama3["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
    seeds.push((
        "llama-rope-llama3.json".into(),
        serde_json::to_vec_pretty(&llama3).expect("JSON"),
    ));
    for (name, text) in fixture_files("config.json") {
        seeds.push((format!("fixture-{name}.json"), text));
    }
    // Edits: a sliding-window qwen2, gemma's per-layer ropes, 10^12 layers.
    seeds.push(("edits-qwen2-window".into(), vec![0, 23, 2, 1, 24, 3, 8]));
    seeds.push((
        "edits-gemma3-rope".into(),
        vec![2, 14, 9, 3, 6, 4, 9, 5, 7, 9],
    ));
    seeds.push(("edits-llama-layers".into(), vec![1, 5, 4, 15]));
    seeds
}

/// `fixtures/<model>/<file>` of every fixture that has it, deduplicated, by model name.
fn fixture_files(file: &str) -> Vec<(String, Vec<u8>)> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let mut found: Vec<(String, Vec<u8>)> = vec![];
    let mut dirs: Vec<_> = std::fs::read_dir(&fixtures)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    for dir in dirs {
        let Ok(bytes) = std::fs::read(dir.join(file)) else {
            continue;
        };
        if found.iter().all(|(_, b)| *b != bytes) {
            let name = dir
                .file_name()
                .expect("a name")
                .to_string_lossy()
                .into_owned();
            found.push((name, bytes));
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// Byte-level BPE (`gpt2`) tokenizer metadata of 8 tokens, with a chat template.
fn gpt2_tokenizer() -> Vec<(String, Value)> {
    let tokens = [
        "!",
        "a",
        "b",
        "ab",
        "Ġ",
        "Ġa",
        "<|endoftext|>",
        "<|im_start|>",
    ];
    let strings =
        |xs: &[&str]| Value::Array(xs.iter().map(|s| Value::String(s.to_string())).collect());
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array([1, 1, 1, 1, 1, 1, 3, 3].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.merges".into(), strings(&["a b", "Ġ a"])),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(6)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(6)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(QWEN_TEMPLATE.into()),
        ),
    ]
}

/// SentencePiece-style (`llama`) tokenizer metadata of 8 tokens, with scores.
fn spm_tokenizer() -> Vec<(String, Value)> {
    let tokens = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab"];
    vec![
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                tokens
                    .iter()
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array([2, 3, 3, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(
                [0., 0., 0., -1., -2., -3., -4., -5.]
                    .map(Value::F32)
                    .to_vec(),
            ),
        ),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(LLAMA_TEMPLATE.into()),
        ),
    ]
}

/// A complete GGUF of `arch`'s tiny config: every tensor the architecture needs, of type `dtype`
/// where the shape allows it (F32 otherwise, and for vectors, as llama.cpp stores norms).
pub fn tiny_gguf(arch: Arch, dtype: GgmlDType, tokenizer: Vec<(String, Value)>) -> Vec<u8> {
    let origin = Path::new("seed/config.json");
    let hp = Hparams::from_hf_config(&tiny_config(arch), origin).expect("the tiny config is valid");
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.gguf_name().into()),
        ),
        (
            "general.name".to_string(),
            Value::String("em-fuzz seed".into()),
        ),
    ];
    metadata.extend(hp.to_gguf_metadata());
    metadata.extend(tokenizer);
    let mut tensors: Vec<(TensorSpec, Vec<u8>)> = vec![];
    for hf in hp.required_hf_names() {
        let shape = hp
            .expected_shape(&hf)
            .expect("a required tensor has a shape");
        let block = dtype.block_size();
        let dtype = if shape.len() > 1 && shape[shape.len() - 1].is_multiple_of(block) {
            dtype
        } else {
            GgmlDType::F32
        };
        let bytes = tensor_bytes(&shape, dtype);
        let name = hp
            .hf_to_gguf_name(&hf)
            .expect("a required tensor has a GGUF name");
        tensors.push((TensorSpec { name, shape, dtype }, bytes));
    }
    let dir = Scratch::new();
    let path = dir.path().join("seed.gguf");
    let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut writer = GgufWriter::create(&path, &metadata, specs).expect("write the seed GGUF");
    for (_, bytes) in &tensors {
        writer.write_tensor(bytes).expect("write a seed tensor");
    }
    writer.finish().expect("finish the seed GGUF");
    std::fs::read(&path).expect("read the seed GGUF back")
}

/// Deterministic values in [-0.5, 0.5) of `shape`, as `dtype` stores them.
fn tensor_bytes(shape: &[usize], dtype: GgmlDType) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| (i * 7919 % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let t = Tensor::from_vec(values, shape, &Device::Cpu).expect("a tensor");
    let q = QTensor::quantize(&t, dtype).expect("quantize a seed tensor");
    q.data().expect("quantized bytes").into_owned()
}

fn gguf_seeds() -> Vec<Seed> {
    let qwen2 = tiny_gguf(Arch::Qwen2, GgmlDType::F32, gpt2_tokenizer());
    let mut seeds = vec![
        ("qwen2-f32-gpt2".to_string(), qwen2.clone()),
        (
            "llama-q8_0-spm".to_string(),
            tiny_gguf(Arch::Llama, GgmlDType::Q8_0, spm_tokenizer()),
        ),
        (
            "gemma3-f16-spm".to_string(),
            tiny_gguf(Arch::Gemma3, GgmlDType::F16, spm_tokenizer()),
        ),
        (
            "qwen2-q4_0-no-tokenizer".to_string(),
            tiny_gguf(Arch::Qwen2, GgmlDType::Q4_0, vec![]),
        ),
    ];
    // The header alone, claiming 10^12 tensors.
    let mut many = qwen2[..24].to_vec();
    many[8..16].copy_from_slice(&1_000_000_000_000u64.to_le_bytes());
    seeds.push(("header-claims-1e12-tensors".into(), many));
    seeds
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// The shards [`crate::safetensors_index`] puts beside the index: four tensors in two files.
pub fn shards() -> &'static [(&'static str, Vec<u8>)] {
    static SHARDS: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    SHARDS.get_or_init(|| {
        vec![
            (
                "model-00001-of-00002.safetensors",
                safetensors_file(&[("a", vec![2, 3]), ("b", vec![4])], Dtype::F32),
            ),
            (
                "model-00002-of-00002.safetensors",
                safetensors_file(&[("c", vec![2, 2]), ("d", vec![0])], Dtype::BF16),
            ),
        ]
    })
}

/// A safetensors file written by the project's writer.
fn safetensors_file(specs: &[(&str, Vec<usize>)], dtype: Dtype) -> Vec<u8> {
    let dir = Scratch::new();
    let path = dir.path().join("seed.safetensors");
    let specs: Vec<(String, Vec<usize>)> = specs
        .iter()
        .map(|(n, s)| (n.to_string(), s.clone()))
        .collect();
    let mut writer = SafetensorsWriter::create(&path, &specs, dtype).expect("a seed writer");
    let elem = if dtype == Dtype::F32 { 4 } else { 2 };
    for (_, shape) in &specs {
        let n = shape.iter().product::<usize>() * elem;
        writer
            .write_tensor(&(0..n).map(|i| (i * 37 % 251) as u8).collect::<Vec<_>>())
            .expect("a seed tensor");
    }
    writer.finish().expect("finish a seed file");
    std::fs::read(&path).expect("read the seed back")
}

/// A safetensors file from a header and data, by hand (for dtypes the writer refuses).
fn safetensors_by_hand(header: Json, data: &[u8]) -> Vec<u8> {
    let header = header.to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

fn safetensors_seeds() -> Vec<Seed> {
    let mut seeds: Vec<Seed> = shards()
        .iter()
        .map(|(name, bytes)| {
            (
                name.trim_end_matches(".safetensors").to_string(),
                bytes.clone(),
            )
        })
        .collect();
    seeds.push((
        "f16-matrix".into(),
        safetensors_file(&[("model.embed_tokens.weight", vec![3, 4])], Dtype::F16),
    ));
    seeds.push((
        "i64-and-f64".into(),
        safetensors_by_hand(
            json!({"__metadata__": {"format": "pt"},
                "ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
                "x": {"dtype": "F64", "shape": [1, 1], "data_offsets": [16, 24]}}),
            &[1u8; 24],
        ),
    ));
    seeds.push((
        "metadata-only".into(),
        safetensors_by_hand(json!({"__metadata__": {"format": "pt"}}), &[]),
    ));
    seeds
}

fn index_seeds() -> Vec<Seed> {
    let [(first, _), (second, _)] = shards() else {
        unreachable!("two shards")
    };
    let index = |weight_map: Json| {
        serde_json::to_vec_pretty(
            &json!({"metadata": {"total_size": 40}, "weight_map": weight_map}),
        )
        .expect("JSON")
    };
    vec![
        (
            "two-shards.json".into(),
            index(json!({"a": first, "b": first, "c": second, "d": second})),
        ),
        ("one-shard.json".into(), index(json!({"a": first}))),
        (
            "missing-shard.json".into(),
            index(json!({"a": "model-00003-of-00003.safetensors"})),
        ),
        // Regressions: shards outside the directory were opened (a pipe would block forever).
        (
            "shard-outside.json".into(),
            index(json!({"a": "../x.safetensors"})),
        ),
        (
            "shard-device.json".into(),
            index(json!({"a": "/dev/stdin"})),
        ),
        ("no-weight-map.json".into(), b"{\"metadata\": {}}".to_vec()),
    ]
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json

fn tokenizer_seeds() -> Vec<Seed> {
    let byte_level = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 6, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {"!": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġa": 5, "<|endoftext|>": 6},
            "merges": ["a b", "Ġ a"]}
    });
    let config = json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": QWEN_TEMPLATE, "added_tokens_decoder": {"6": {"content": "<|endoftext|>", "special": true}}});
    let with_config = |tokenizer: &Json, config: &Json| {
        let mut bytes = serde_json::to_vec(tokenizer).expect("JSON");
        bytes.push(0);
        bytes.extend(serde_json::to_vec(config).expect("JSON"));
        bytes
    };
    let mut seeds = vec![
        (
            "byte-level-qwen2.json".to_string(),
            serde_json::to_vec_pretty(&byte_level).expect("JSON"),
        ),
        (
            "byte-level-with-config".to_string(),
            with_config(&byte_level, &config),
        ),
    ];
    // The GGUF seeds' tokenizers rebuilt as HF files (SentencePiece-style among them).
    for (name, md) in [
        ("from-gguf-gpt2", gpt2_tokenizer()),
        ("from-gguf-spm", spm_tokenizer()),
    ] {
        let md: HashMap<String, Value> = md.into_iter().collect();
        let (tokenizer, config) = em_convert::tokenizer::gguf_to_hf(&md).expect("seed tokenizer");
        seeds.push((name.to_string(), with_config(&tokenizer, &config)));
    }
    for (model, bytes) in fixture_files("tokenizer.json") {
        seeds.push((format!("fixture-{model}.json"), bytes));
    }
    seeds
}

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// ---------------------------------------------------------------------------------------------
// chat templates

const QWEN_TEMPLATE: &str = "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

const LLAMA_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// The conversations [`crate::chat_template`] renders (the input's length picks one).
pub fn conversations() -> &'static [Vec<ChatMessage>] {
    static CONVERSATIONS: OnceLock<Vec<Vec<ChatMessage>>> = OnceLock::new();
    let turn = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
    };
    CONVERSATIONS.get_or_init(|| {
        vec![
            vec![turn("user", "What is 1+1?")],
            vec![
                turn("system", em_data::QWEN_MATH_COT_SYSTEM),
                turn("user", "Solve $x^2 = 4$."),
                turn("assistant", "$x = \\pm 2$"),
                turn("user", "{{ and }} are not template syntax here <|im_end|>"),
            ],
            vec![turn("assistant", "out of turn"), turn("tool", "")],
            vec![],
        ]
    })
}

fn template_seeds() -> Vec<Seed> {
    let mut seeds: Vec<Seed> = vec![
        ("qwen25-math".into(), QWEN_TEMPLATE.into()),
        ("llama3".into(), LLAMA_TEMPLATE.into()),
        (
            "pycompat".into(),
            "{% for m in messages %}{{ m.content.strip().upper() }}{% if m.content.startswith('What') %}!{% endif %}{% endfor %}{{ eos_token }}".into(),
        ),
        (
            "gemma".into(),
            "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}".into(),
        ),
        (
            "namespace-and-filters".into(),
            "{% set ns = namespace(n=0, last='') %}{% for m in messages|selectattr('role', 'equalto', 'user') %}{% set ns.n = ns.n + 1 %}{% set ns.last = m.content %}{% endfor %}{{ ns.n }}:{{ ns.last|tojson }}{{ messages|map(attribute='role')|join(',') }}{{ messages|length }}{% if tools is defined %}{{ tools|tojson }}{% endif %}{{ strftime_now('%Y') }}".into(),
        ),
        (
            "macro".into(),
            "{% macro turn(m) %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endmacro %}{% for m in messages %}{{ turn(m) }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into(),
        ),
        // Regressions for the renderer's limits: steps, depth, output.
        (
            "loop-forever".into(),
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}".into(),
        ),
        (
            "recursion".into(),
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}".into(),
        ),
        (
            "huge-output".into(),
            "{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}".into(),
        ),
        // Values that grow past the memory budget within the step budget.
        (
            "grow-by-recursion".into(),
            "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f(messages[0].content * 10000, 20) }}".into(),
        ),
        (
            "grow-by-join".into(),
            "{% set a = range(100000)|join('xyz') %}{{ range(100000)|join(a)|length }}".into(),
        ),
        ("syntax-error".into(), "{% for m in messages %}{{ m.content ".into()),
    ];
    for (model, bytes) in fixture_files("tokenizer_config.json") {
        let config: Json = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
        if let Some(t) = config.get("chat_template").and_then(Json::as_str) {
            if seeds.iter().all(|(_, s)| s != t.as_bytes()) {
                seeds.push((format!("fixture-{model}"), t.as_bytes().to_vec()));
            }
        }
    }
    seeds
}

// ---------------------------------------------------------------------------------------------
// suites, pools, grader strings

fn suite_seeds() -> Vec<Seed> {
    let lines = [
        r#"{"id": "a", "problem": "1+1?", "answer": "2"}"#,
        r#"{"question": "Q", "answer": "so\n#### 1,250"}"#,
        r#"{"problem": "P", "solution": "x \\boxed{\\frac{1}{2}}"}"#,
        r#"{"question": "Q", "final_answer": ["$3$"], "id": 7, "is_multiple_answer": false, "unit": null}"#,
        r#"{"Body": "B", "Question": "Q?", "Answer": 145.0}"#,
        r#"{"body": "B.", "question": "Q?", "answer": "9 (apples)", "formula": "7+2=9"}"#,
        r#"{"input": "I", "target": 2.5}"#,
        r#"{"question": "AMC", "answer": 27, "data_source": "amc23", "unique_id": "x"}"#,
    ];
    vec![
        ("every-format.jsonl".into(), lines.join("\n").into_bytes()),
        ("math500-line.jsonl".into(), lines[0].as_bytes().to_vec()),
        (
            "array.json".into(),
            format!("[{}, {}]", lines[0], lines[2]).into_bytes(),
        ),
        (
            "data-object.json".into(),
            format!("{{\"data\": [{}]}}", lines[3]).into_bytes(),
        ),
        (
            "nested-empty-answer.jsonl".into(),
            br#"{"problem": "x", "answer": [[]]}"#.to_vec(),
        ),
    ]
}

fn pool_seeds() -> Vec<Seed> {
    let lines = [
        r#"{"id": "dsr-124", "prompt": [{"role": "user", "content": "Find x. Let's think step by step and output the final answer within \\boxed{}."}], "answer": "12.8", "data_source": "deepscaler"}"#,
        r#"{"id": "p2", "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "answer": ["1", "2"]}"#,
        r#"{"id": "p3", "prompt": [{"role": "user", "content": "no label"}], "answer": ""}"#,
        r#"{"prompt": [{"role": "user", "content": "Q"}]}"#,
    ];
    vec![
        ("dsr-like.jsonl".into(), lines.join("\n").into_bytes()),
        ("one-line.jsonl".into(), lines[0].as_bytes().to_vec()),
        (
            "array.json".into(),
            format!("[{}, {}]", lines[1], lines[3]).into_bytes(),
        ),
    ]
}

fn grader_seeds() -> Vec<Seed> {
    let pairs = [
        "The answer is \\boxed{\\frac{1}{2}}.\t0.5",
        "\\boxed{3}\t3",
        "So $x = 2$ or $x = -2$.\t\\pm 2",
        "#### 1,250\t1250",
        "\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}\t(1,2)",
        "\\boxed{\\frac{\\sqrt{2}}{2}}\t\\frac{1}{\\sqrt2}",
        "The final answer is $\\boxed{(-\\infty, 3]}$\t(-\\infty,3]",
        "\\boxed{10\\%}\t0.1",
        "\\boxed{\\dfrac{3}{4}}\t0.75",
        "\\boxed{2^{10}}\t1024",
        "The answer is (B)\tB",
        "\\boxed{x^2+2x+1}\t(x+1)^2",
        "\\boxed{\\{1,2\\}}\t\\{2,1\\}",
        "\\boxed{90^\\circ}\t90",
        "\\boxed{12.8}\t\\frac{64}{5}",
        "no answer here\t7",
    ];
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("pair-{i:02}"), p.as_bytes().to_vec()))
        .collect()
}
