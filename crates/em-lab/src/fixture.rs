//! `cargo xtask fixture`: regenerates the small models in `fixtures/` from a seed.
//!
//! `tiny-qwen2` is a qwen2-architecture model with random weights and a byte-level BPE tokenizer
//! trained on a generated math corpus: small enough to commit, real enough that llama.cpp, candle and
//! `tokenizers` all load it. Its K-quant-sized rows (hidden 256) let every GGUF type apply.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use em_convert::safetensors_io::SafetensorsWriter;

/// Qwen2's pre-tokenizer regex, so llama.cpp's `qwen2` pre-tokenizer splits text the same way.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2.5's ChatML chat template (system turn defaulted).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum FixtureKind {
    /// Random-weight qwen2 model with a trained byte-level BPE tokenizer (~2.7 MB, bf16).
    TinyQwen2,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FixtureOptions {
    pub kind: FixtureKind,
    /// Output directory (default: fixtures/<kind>).
    pub out: Option<PathBuf>,
    pub seed: u64,
}

pub fn run(args: &FixtureOptions) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("fixtures/tiny-qwen2"));
    match args.kind {
        FixtureKind::TinyQwen2 => write_tiny_qwen2(&out, args.seed)?,
    }
    println!("{}: written", out.display());
    Ok(())
}

/// Hyperparameters of the tiny qwen2 fixture.
pub struct TinyConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

pub const TINY: TinyConfig = TinyConfig {
    vocab_size: 512,
    hidden: 256,
    intermediate: 512,
    layers: 2,
    heads: 4,
    kv_heads: 2,
};

/// Writes config.json, tokenizer files and model.safetensors (bf16) of the tiny qwen2 model.
pub fn write_tiny_qwen2(out: &Path, seed: u64) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let tokenizer = train_tokenizer(&math_corpus(&mut rng, 3000), TINY.vocab_size)?;
    let vocab = tokenizer.get_vocab_size(true);
    let id = |t: &str| tokenizer.token_to_id(t).expect("special token in vocab");
    tokenizer
        .save(out.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.join("tokenizer.json").display()))?;

    let added: serde_json::Map<String, serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .map(|t| {
            (
                id(t).to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}),
            )
        })
        .collect();
    let tokenizer_config = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "bos_token": null,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 512,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null
    });
    let head_dim = TINY.hidden / TINY.heads;
    let config = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": TINY.hidden,
        "intermediate_size": TINY.intermediate,
        "num_hidden_layers": TINY.layers,
        "num_attention_heads": TINY.heads,
        "num_key_value_heads": TINY.kv_heads,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "use_sliding_window": false,
        "sliding_window": null,
        "bos_token_id": id("<|endoftext|>"),
        "eos_token_id": id("<|im_end|>"),
        "torch_dtype": "bfloat16",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true
    });
    fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tokenizer_config)? + "\n",
    )?;
    fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;

    let (h, ff, kv) = (TINY.hidden, TINY.intermediate, TINY.kv_heads * head_dim);
    // (name, shape, std, mean): embeddings wide enough that logits spread over several units.
    let mut specs: Vec<(String, Vec<usize>, f32, f32)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, h], 0.2, 0.0)];
    for i in 0..TINY.layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        specs.extend([
            (p("input_layernorm.weight"), vec![h], 0.1, 1.0),
            (p("self_attn.q_proj.weight"), vec![h, h], 0.08, 0.0),
            (p("self_attn.q_proj.bias"), vec![h], 0.1, 0.0),
            (p("self_attn.k_proj.weight"), vec![kv, h], 0.08, 0.0),
            (p("self_attn.k_proj.bias"), vec![kv], 0.1, 0.0),
            (p("self_attn.v_proj.weight"), vec![kv, h], 0.08, 0.0),
            (p("self_attn.v_proj.bias"), vec![kv], 0.1, 0.0),
            (p("self_attn.o_proj.weight"), vec![h, h], 0.05, 0.0),
            (p("post_attention_layernorm.weight"), vec![h], 0.1, 1.0),
            (p("mlp.gate_proj.weight"), vec![ff, h], 0.08, 0.0),
            (p("mlp.up_proj.weight"), vec![ff, h], 0.08, 0.0),
            (p("mlp.down_proj.weight"), vec![h, ff], 0.05, 0.0),
        ]);
    }
    specs.push(("model.norm.weight".into(), vec![h], 0.1, 1.0));
    let shapes: Vec<(String, Vec<usize>)> = specs
        .iter()
        .map(|(n, s, _, _)| (n.clone(), s.clone()))
        .collect();
    let mut writer = SafetensorsWriter::create(
        &out.join("model.safetensors"),
        &shapes,
        safetensors::Dtype::BF16,
    )?;
    for (_, shape, std, mean) in &specs {
        let n: usize = shape.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| half::bf16::from_f32(mean + std * normal(&mut rng)).to_le_bytes())
            .collect();
        writer.write_tensor(&bytes)?;
    }
    writer.finish()
}

/// A standard normal sample (Box-Muller), so the fixture depends only on `rand`'s StdRng.
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Worked arithmetic in the style the project's math prompts use, with some non-ASCII text.
pub fn math_corpus(rng: &mut StdRng, n: usize) -> Vec<String> {
    let words = [
        "Let's think step by step.",
        "The answer is",
        "Therefore",
        "so the total is",
        "naïve café",
        "größer",
        "日本語",
        "π ≈ 3.14159",
        "x² + y² = r²",
    ];
    (0..n)
        .map(|_| {
            let (a, b): (u32, u32) = (rng.gen_range(1..1000), rng.gen_range(1..1000));
            let w = words[rng.gen_range(0..words.len())];
            match rng.gen_range(0..4) {
                0 => format!(
                    "What is {a} + {b}? {w} {a} + {b} = {}. The final answer is $\\boxed{{{}}}$.",
                    a + b,
                    a + b
                ),
                1 => format!(
                    "Compute {a} \\times {b}.\n{w} {a} \\cdot {b} = {}\n\\boxed{{{}}}",
                    a * b,
                    a * b
                ),
                2 => format!(
                    "\\frac{{{a}}}{{{b}}} + \\frac{{1}}{{2}} = \\frac{{{}}}{{{}}}  {w}",
                    2 * a + b,
                    2 * b
                ),
                _ => format!(
                    "If x = {a} and y = {b}, then x - y = {}.\t{w}\n\n",
                    a as i64 - b as i64
                ),
            }
        })
        .collect()
}

/// A tokenizer around `model` with Qwen2's pipeline: NFC, the Qwen2 split regex, byte-level
/// pre-tokenizer, post-processor and decoder (so `convert` writes it as gpt2 / qwen2).
pub fn qwen2_style_tokenizer(model: BPE) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(NFC))
        .map_err(|e| anyhow::anyhow!("normalizer: {e}"))?;
    let split = Split::new(
        SplitPattern::Regex(QWEN2_REGEX.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, false)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    Ok(tokenizer)
}

/// Trains a Qwen2-style byte-level BPE tokenizer (NFC, Qwen2 split regex, byte-level) on `corpus`.
pub fn train_tokenizer(corpus: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let mut tokenizer = qwen2_style_tokenizer(BPE::default())?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(|e| anyhow::anyhow!("training the fixture tokenizer: {e}"))?;
    Ok(tokenizer)
}
