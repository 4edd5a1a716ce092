//! Fuzz targets for every reader of user files: one function per target hands arbitrary bytes to
//! the project's real reader, then to whatever consumes what it read. None may panic, hang or
//! allocate much more than the input; errors are expected and ignored.
//!
//! `fuzz/` runs the targets under libFuzzer (cargo-fuzz), `tests/replay.rs` runs the corpus in
//! `corpus/<target>/` and seeded mutations of it in `cargo test`, and [`seeds`] writes that corpus.

pub mod seeds;

/// Every fuzz binary and the replay test render chat templates under a memory budget, as `xtask`
/// does.
#[global_allocator]
static ALLOC: em_alloc::BudgetAlloc = em_alloc::BudgetAlloc;

/// The memory budget of one fuzzed render: far above what the seed conversations need, and small
/// because a render over budget keeps what it held for the life of the process.
pub const TEMPLATE_MEMORY: usize = 256 << 10;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Device;
use em_convert::arch::Hparams;
use em_convert::safetensors_io::HfTensors;
use serde_json::Value as Json;

/// A fuzz target: any bytes, no panic.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` and `corpus/<name>/` call it.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("safetensors_index", safetensors_index),
    ("tokenizer_json", tokenizer_json),
    ("config", config),
    ("chat_template", chat_template),
    ("suite", suite),
    ("pool", pool),
    ("grader", grader),
];

/// A GGUF file: the header reader, every tensor read and dequantized, the hyperparameters and the
/// tokenizer rebuilt from the metadata, and, when those succeed, the whole GGUF -> HF conversion.
pub fn gguf(data: &[u8]) {
    let origin = Path::new("fuzz.gguf");
    let mut file = Cursor::new(data);
    let Ok(content) = em_convert::gguf::read_header(&mut file, origin) else {
        return;
    };
    for name in content.tensor_infos.keys() {
        if let Ok(q) = content.tensor(&mut file, name, &Device::Cpu) {
            let _ = q.dequantize(&Device::Cpu);
        }
    }
    let has_output = content.tensor_infos.contains_key("output.weight");
    let hparams = Hparams::from_gguf(&content.metadata, has_output, origin);
    if let Ok(hp) = &hparams {
        for name in content.tensor_infos.keys() {
            if let Some(hf) = hp.gguf_to_hf_name(name) {
                let _ = hp.expected_shape(&hf);
            }
        }
        let _ = hp.required_hf_names();
        let _ = hp.to_hf_config(None, None, None, "float32");
    }
    let tokenizer = em_convert::tokenizer::gguf_to_hf(&content.metadata);
    if let Ok((tokenizer_json, _)) = &tokenizer {
        let _ = tokenizers::Tokenizer::from_str(&tokenizer_json.to_string());
    }
    if hparams.is_ok() && tokenizer.is_ok() {
        let dir = Scratch::new();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, data).expect("em-fuzz: cannot write to the scratch directory");
        let _ = em_convert::gguf_to_hf(&path, &dir.path().join("hf"), em_convert::HfDtype::Bf16);
    }
}

/// `model.safetensors` of an HF directory, through the converter's reader (every tensor's shape,
/// location and values) and candle's loader, which the trainer uses.
pub fn safetensors(data: &[u8]) {
    let dir = Scratch::new();
    let path = dir.write("model.safetensors", data);
    read_hf_tensors(dir.path());
    let _ = candle_core::safetensors::load(&path, &Device::Cpu);
}

/// `model.safetensors.index.json` beside two valid shards ([`seeds::shards`]).
pub fn safetensors_index(data: &[u8]) {
    let dir = Scratch::new();
    for (name, bytes) in seeds::shards() {
        dir.write(name, bytes);
    }
    dir.write("model.safetensors.index.json", data);
    read_hf_tensors(dir.path());
}

fn read_hf_tensors(dir: &Path) {
    let Ok(tensors) = HfTensors::open(dir) else {
        return;
    };
    for name in tensors.names() {
        let _ = tensors.shape(&name);
        let _ = tensors.n_bytes(&name);
        let _ = tensors.location(&name);
        let _ = tensors.load_f32(&name);
    }
}

/// `tokenizer.json`, and after the first NUL byte, if any, `tokenizer_config.json`: the HF -> GGUF
/// tokenizer conversion, and the tokenizers library's load that the pipeline uses.
pub fn tokenizer_json(data: &[u8]) {
    let (tokenizer, config) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], Some(&data[nul + 1..])),
        None => (data, None),
    };
    let dir = Scratch::new();
    let tokenizer_path = dir.write("tokenizer.json", tokenizer);
    let config_path = config.map(|c| dir.write("tokenizer_config.json", c));
    let _ = em_convert::tokenizer::hf_to_gguf(&tokenizer_path, config_path.as_deref(), "qwen2");
    let _ = em_convert::tokenizer::load_hf_tokenizer(&tokenizer_path);
}

/// config.json: the bytes as the file, and the bytes as edits of a valid config of one
/// architecture ([`seeds::edited_config`]), which reach the checks past the parse.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        read_config(text);
    }
    read_config(&seeds::edited_config(data).to_string());
}

fn read_config(text: &str) {
    let origin = Path::new("fuzz/config.json");
    if let Ok(config) = em_config::ModelConfig::from_json_str(text, origin) {
        let _ = Hparams::from_model_config(&config, origin);
    }
    if let Ok(json) = serde_json::from_str::<Json>(text) {
        let _ = Hparams::from_hf_config(&json, origin);
    }
}

/// A chat template (the bytes, as UTF-8 with replacement) rendered over one of a few
/// conversations.
pub fn chat_template(data: &[u8]) {
    let template = em_data::ChatTemplate {
        template: String::from_utf8_lossy(data).into_owned(),
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
    };
    let conversations = seeds::conversations();
    let _ = template.render_within(
        &conversations[data.len() % conversations.len()],
        TEMPLATE_MEMORY,
    );
}

/// A suite file, read as `.jsonl` and as `.json`.
pub fn suite(data: &[u8]) {
    // The path-based loader refuses non-UTF-8 files before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = em_data::parse_suite(text, Path::new("fuzz/suite.jsonl"));
    let _ = em_data::parse_suite(text, Path::new("fuzz/math/test.json"));
}

/// A screening pool, read as `.jsonl` and as `.json`.
pub fn pool(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = em_data::parse_pool(text, Path::new("fuzz/pool.jsonl"));
    let _ = em_data::parse_pool(text, Path::new("fuzz/pool.json"));
}

/// A response and a gold answer (split at the first tab): extraction, grading, equivalence both
/// ways and the plurality of answers.
pub fn grader(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (response, gold) = text.split_once('\t').unwrap_or((&text, ""));
    let pred = em_grade::extract_answer(response);
    let _ = em_grade::last_boxed(response);
    let _ = em_grade::grade(response, &[gold.to_string()]);
    let _ = em_grade::is_equivalent(response, gold);
    let _ = em_grade::is_equivalent(gold, response);
    let _ = em_grade::plurality(&[pred.clone(), Some(gold.to_string()), pred]);
}

/// A directory of its own for one run of a target (under /dev/shm where there is one), removed
/// when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "em-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("em-fuzz: cannot create {}: {e}", dir.display()));
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes)
            .unwrap_or_else(|e| panic!("em-fuzz: cannot write {}: {e}", path.display()));
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
