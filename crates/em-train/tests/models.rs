//! Tests of the differentiable models on tiny random checkpoints: finite-difference gradient
//! checks in f64, every parameter reached by the backward pass, causal and sliding-window masks,
//! and loading HF directories (single file, sharded, broken).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use em_train::models::{tensor_shapes, Architecture, CausalLm, ModelConfig, ModelError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const VOCAB: usize = 11;

/// Tiny configurations covering every kind of parameter and option.
fn tiny_configs() -> Vec<(&'static str, Value)> {
    vec![
        (
            // Biased q/k/v, untied head, GQA, a sliding window on the upper layer.
            "qwen2 untied, sliding upper layer",
            json!({
                "model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "rope_theta": 100.0, "tie_word_embeddings": false,
                "use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 64
            }),
        ),
        (
            // All biases, llama3 rope scaling, untied head.
            "llama untied, biases, llama3 rope",
            json!({
                "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "rope_theta": 10000.0, "tie_word_embeddings": false,
                "attention_bias": true, "mlp_bias": true, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 64,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
            }),
        ),
        (
            // SmolLM2-like: tied head, explicit head_dim different from hidden / heads.
            "llama tied, explicit head_dim",
            json!({
                "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 6, "tie_word_embeddings": true,
                "rope_theta": 100.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 64
            }),
        ),
        (
            // One sliding and one global layer, window 3 < seq 5, linear scaling on the global
            // rope, query_pre_attn_scalar != head_dim, both soft-caps, tied head.
            "gemma3 tied, layer_types, softcaps",
            json!({
                "model_type": "gemma3_text", "vocab_size": VOCAB, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 6, "query_pre_attn_scalar": 7,
                "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"],
                "rope_theta": 1000.0, "rope_local_base_freq": 50.0,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 64
            }),
        ),
        (
            // Untied head, layer types from sliding_window_pattern.
            "gemma3 untied, sliding_window_pattern",
            json!({
                "model_type": "gemma3_text", "vocab_size": VOCAB, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2, "head_dim": 4, "query_pre_attn_scalar": 4,
                "sliding_window": 2, "sliding_window_pattern": 2, "tie_word_embeddings": false,
                "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 64
            }),
        ),
    ]
}

fn config(raw: &Value) -> ModelConfig {
    ModelConfig::from_value(raw.clone(), Path::new("test config")).expect("valid tiny config")
}

/// Random weights for every tensor `cfg` needs: norms near their identity, the rest uniform.
fn random_tensors(cfg: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let gemma = cfg.architecture == Architecture::Gemma3;
    tensor_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let is_norm = name.ends_with("norm.weight");
            let data: Vec<f64> = (0..n)
                .map(|_| {
                    let u: f64 = rng.gen_range(-1.0..1.0);
                    match (is_norm, gemma) {
                        (true, true) => 0.3 * u,
                        (true, false) => 1.0 + 0.3 * u,
                        (false, _) if name.ends_with("bias") => 0.3 * u,
                        (false, _) => 0.6 * u,
                    }
                })
                .collect();
            let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
            (name, t)
        })
        .collect()
}

fn model(raw: &Value, dtype: DType, seed: u64) -> CausalLm {
    let cfg = config(raw);
    CausalLm::from_tensors(&cfg, random_tensors(&cfg, seed), dtype, &Device::Cpu).unwrap()
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let seq = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), seq), &Device::Cpu).unwrap()
}

/// Scalar objective: a fixed random linear functional of the logits plus a random weighting of
/// their squares, so that the gradient depends on the logits themselves.
struct Objective {
    a: Tensor,
    b: Tensor,
}

impl Objective {
    fn new(shape: &[usize], seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let mut draw = || -> Tensor {
            let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        Self {
            a: draw(),
            b: draw(),
        }
    }

    fn loss(&self, model: &CausalLm, input: &Tensor) -> Tensor {
        let logits = model.forward(input).unwrap().to_dtype(DType::F64).unwrap();
        let lin = (&logits * &self.a).unwrap().sum_all().unwrap();
        let quad = (logits.sqr().unwrap() * &self.b)
            .unwrap()
            .sum_all()
            .unwrap();
        ((lin + (quad * 0.1).unwrap()).unwrap() / 10.0).unwrap()
    }
}

fn input_batch() -> Tensor {
    ids(&[&[1, 4, 7, 2, 9], &[10, 3, 3, 0, 5]])
}

fn read_f64(var: &Var) -> Vec<f64> {
    var.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn set_entry(var: &Var, values: &[f64], index: usize, value: f64) {
    let mut v = values.to_vec();
    v[index] = value;
    let t = Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap();
    var.set(&t).unwrap();
}

/// Compares autograd with central differences on random and largest-gradient entries of every
/// parameter; returns the largest relative error.
fn check_gradients(label: &str, raw: &Value, seed: u64) -> f64 {
    let model = model(raw, DType::F64, seed);
    let input = input_batch();
    let objective = Objective::new(&[2, 5, VOCAB], seed + 1);
    let grads = objective.loss(&model, &input).backward().unwrap();
    let mut rng = StdRng::seed_from_u64(seed + 2);
    let eps = 1e-6;
    let mut worst: f64 = 0.0;
    let mut worst_large: f64 = 0.0;
    let mut checked = 0;
    for (name, var) in model.parameters() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{label}: no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let values = read_f64(&var);
        let largest = (0..grad.len())
            .max_by(|&i, &j| grad[i].abs().total_cmp(&grad[j].abs()))
            .unwrap();
        let mut entries = vec![largest];
        entries.extend((0..6).map(|_| rng.gen_range(0..grad.len())));
        for &i in &entries {
            set_entry(&var, &values, i, values[i] + eps);
            let plus = objective.loss(&model, &input).to_scalar::<f64>().unwrap();
            set_entry(&var, &values, i, values[i] - eps);
            let minus = objective.loss(&model, &input).to_scalar::<f64>().unwrap();
            set_entry(&var, &values, i, values[i]);
            let fd = (plus - minus) / (2.0 * eps);
            // Relative error, with a floor of 1e-3 on the denominator: the rounding noise of a
            // central difference at eps = 1e-6 is ~1e-10 here, so for entries whose gradient is
            // ~0 (e.g. embedding rows no token uses) only the absolute error (≤ 1e-9) is meaningful.
            let rel = (grad[i] - fd).abs() / grad[i].abs().max(fd.abs()).max(1e-3);
            assert!(
                rel <= 1e-6,
                "{label}: {name}[{i}]: autograd {} vs finite difference {fd} (relative error {rel:.2e})",
                grad[i]
            );
            worst = worst.max(rel);
            if grad[i].abs() >= 1e-2 {
                worst_large = worst_large.max(rel);
            }
            checked += 1;
        }
    }
    eprintln!(
        "{label}: {checked} entries, max relative error {worst:.2e} ({worst_large:.2e} where |grad| >= 1e-2)"
    );
    worst
}

#[test]
fn gradients_match_finite_differences_for_every_parameter_kind() {
    for (i, (label, raw)) in tiny_configs().iter().enumerate() {
        check_gradients(label, raw, 100 + i as u64);
    }
}

fn expected_names(cfg: &ModelConfig) -> Vec<String> {
    tensor_shapes(cfg).into_iter().map(|(n, _)| n).collect()
}

#[test]
fn every_parameter_gets_a_nonzero_gradient_in_f64_f32_and_bf16() {
    for (label, raw) in tiny_configs() {
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let model = model(&raw, dtype, 3);
            let names: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names, expected_names(model.config()), "{label}");
            let lm_head = names.iter().any(|n| n == "lm_head.weight");
            assert_eq!(lm_head, !model.config().tie_word_embeddings, "{label}");
            let objective = Objective::new(&[2, 5, VOCAB], 4);
            let grads = objective.loss(&model, &input_batch()).backward().unwrap();
            for (name, var) in model.parameters() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{label} {dtype:?}: no gradient for {name}"));
                assert_eq!(g.dtype(), dtype);
                let max = g
                    .to_dtype(DType::F64)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    max > 0.0 && max.is_finite(),
                    "{label} {dtype:?}: gradient of {name} is {max}"
                );
            }
        }
    }
}

#[test]
fn bf16_and_f32_logits_agree_with_f64() {
    for (label, raw) in tiny_configs() {
        let cfg = config(&raw);
        // About 25 units of roundoff (2^-24 and 2^-8): the f32 run shows ~10 units of error growth.
        for (dtype, tol) in [(DType::F32, 1.5e-6), (DType::BF16, 0.1)] {
            // Weights rounded to `dtype` first, so that only the arithmetic differs.
            let tensors: HashMap<String, Tensor> = random_tensors(&cfg, 5)
                .into_iter()
                .map(|(n, t)| (n, t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap()))
                .collect();
            let reference = CausalLm::from_tensors(&cfg, tensors.clone(), DType::F64, &Device::Cpu)
                .unwrap()
                .forward(&input_batch())
                .unwrap();
            let scale = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let logits = CausalLm::from_tensors(&cfg, tensors, dtype, &Device::Cpu)
                .unwrap()
                .forward(&input_batch())
                .unwrap();
            assert_eq!(logits.dtype(), dtype);
            assert_eq!(logits.dims(), &[2, 5, VOCAB]);
            let diff = (logits.to_dtype(DType::F64).unwrap() - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            eprintln!(
                "{label} {dtype:?}: max |logit difference| {diff:.2e} (max |logit| {scale:.2})"
            );
            assert!(
                diff <= tol * scale,
                "{label} {dtype:?}: max diff {diff}, scale {scale}"
            );
        }
    }
}

#[test]
fn grouped_query_attention_matches_repeated_key_value_heads() {
    // kv head j serves query heads j·rep .. (j+1)·rep, as HF's repeat_kv: a model with 2 kv
    // heads equals one with 4 whose k/v rows repeat those heads in that order.
    let grouped = json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 100.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 64
    });
    let mut full = grouped.clone();
    full["num_key_value_heads"] = json!(4);
    let cfg = config(&grouped);
    let tensors = random_tensors(&cfg, 50);
    let mut repeated = tensors.clone();
    for (name, t) in &tensors {
        if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
            // [2 heads · 2 dims, 8] -> [4 heads · 2 dims, 8] with heads 0,0,1,1.
            let heads = t.reshape((2, 1, 2, 8)).unwrap();
            let heads = Tensor::cat(&[&heads, &heads], 1)
                .unwrap()
                .reshape((8, 8))
                .unwrap();
            repeated.insert(name.clone(), heads);
        }
    }
    let a = CausalLm::from_tensors(&cfg, tensors, DType::F64, &Device::Cpu).unwrap();
    let b = CausalLm::from_tensors(&config(&full), repeated, DType::F64, &Device::Cpu).unwrap();
    let la = a.forward(&input_batch()).unwrap();
    let lb = b.forward(&input_batch()).unwrap();
    let d = (la - lb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12, "grouped and repeated heads differ by {d}");
}

fn logits_rows(model: &CausalLm, tokens: &[u32]) -> Vec<Vec<f64>> {
    model
        .forward(&ids(&[tokens]))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn causal_mask_hides_later_tokens() {
    for (label, raw) in tiny_configs() {
        let model = model(&raw, DType::F64, 9);
        let base = [3u32, 1, 4, 1, 5];
        let base_logits = logits_rows(&model, &base);
        for t in 0..base.len() - 1 {
            let mut changed = base;
            for tok in changed.iter_mut().skip(t + 1) {
                *tok = (*tok + 5) % VOCAB as u32;
            }
            let logits = logits_rows(&model, &changed);
            for p in 0..=t {
                let d = max_diff(&logits[p], &base_logits[p]);
                assert!(
                    d < 1e-12,
                    "{label}: position {p} moved by {d} when tokens > {t} changed"
                );
            }
            let d = max_diff(&logits[t + 1], &base_logits[t + 1]);
            assert!(
                d > 1e-6,
                "{label}: position {} ignores its own token",
                t + 1
            );
        }
    }
}

fn gemma_windowed(layer_types: Value) -> Value {
    json!({
        "model_type": "gemma3_text", "vocab_size": VOCAB, "hidden_size": 8,
        "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4, "query_pre_attn_scalar": 4,
        "sliding_window": 2, "layer_types": layer_types, "rope_theta": 1e6,
        "rope_local_base_freq": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 64
    })
}

#[test]
fn gemma3_sliding_layers_do_not_see_beyond_the_window() {
    // Two sliding layers of window 2: position 7 sees positions 6..=7 in the first layer, whose
    // outputs there saw 5..=7, so tokens 0..=4 cannot matter and token 5 must.
    let model = model(
        &gemma_windowed(json!(["sliding_attention", "sliding_attention"])),
        DType::F64,
        11,
    );
    let base = [1u32, 2, 3, 4, 5, 6, 7, 8];
    let base_logits = logits_rows(&model, &base);
    for far in 0..=4 {
        let mut changed = base;
        changed[far] = 0;
        let logits = logits_rows(&model, &changed);
        let d = max_diff(&logits[7], &base_logits[7]);
        assert!(
            d < 1e-12,
            "token {far} reached position 7 through sliding layers ({d})"
        );
        let d = max_diff(&logits[far + 1], &base_logits[far + 1]);
        assert!(d > 1e-6, "token {far} does not reach position {}", far + 1);
    }
    let mut changed = base;
    changed[5] = 0;
    let d = max_diff(&logits_rows(&model, &changed)[7], &base_logits[7]);
    assert!(d > 1e-6, "token 5 should reach position 7");

    // With a global layer the first token reaches the last position.
    let model = model_global();
    let base_logits = logits_rows(&model, &base);
    let mut changed = base;
    changed[0] = 0;
    let d = max_diff(&logits_rows(&model, &changed)[7], &base_logits[7]);
    assert!(d > 1e-6, "a global layer must see token 0 from position 7");
}

fn model_global() -> CausalLm {
    model(
        &gemma_windowed(json!(["sliding_attention", "full_attention"])),
        DType::F64,
        11,
    )
}

#[test]
fn real_model_configs_resolve_like_transformers() {
    let gemma = json!({
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
        "attn_logit_softcapping": null, "final_logit_softcapping": null, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "intermediate_size": 2048,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
            "full_attention", "sliding_attention", "sliding_attention", "sliding_attention",
            "sliding_attention", "sliding_attention", "full_attention"],
        "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
        "num_hidden_layers": 18, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": null,
        "rope_theta": 1000000.0, "sliding_window": 512, "torch_dtype": "bfloat16",
        "use_bidirectional_attention": false, "vocab_size": 262144
    });
    let c = config(&gemma);
    assert_eq!(c.architecture, Architecture::Gemma3);
    assert!(c.tie_word_embeddings);
    assert_eq!(
        (c.head_dim, c.num_key_value_heads, c.query_pre_attn_scalar),
        (256, 1, 256.0)
    );
    assert_eq!((c.rope.theta, c.local_rope.theta), (1e6, 1e4));
    let globals: Vec<usize> = (0..18).filter(|&i| c.layer_windows[i].is_none()).collect();
    assert_eq!(globals, vec![5, 11, 17]);
    assert!(c.layer_windows.iter().flatten().all(|&w| w == 512));
    // The older form with sliding_window_pattern gives the same layers.
    let mut old = gemma.clone();
    old.as_object_mut().unwrap().remove("layer_types");
    old["sliding_window_pattern"] = json!(6);
    assert_eq!(config(&old).layer_windows, c.layer_windows);
    assert_eq!(tensor_shapes(&c).len(), 1 + 18 * 13 + 1);

    let qwen_math = json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 1536,
        "intermediate_size": 8960, "max_position_embeddings": 4096, "max_window_layers": 21,
        "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096,
        "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_sliding_window": false,
        "vocab_size": 151936
    });
    let c = config(&qwen_math);
    assert_eq!((c.head_dim, c.num_key_value_heads), (128, 2));
    assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    assert!(c.layer_windows.iter().all(Option::is_none));
    assert_eq!(
        tensor_shapes(&c)[1],
        ("model.layers.0.input_layernorm.weight".into(), vec![1536])
    );

    let llama31 = json!({
        "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rope_theta": 500000.0, "vocab_size": 128256,
        "intermediate_size": 14336, "num_hidden_layers": 32, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    });
    let c = config(&llama31);
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.default_applied("head_dim"), Some("128"));
    assert_eq!(c.default_applied("tie_word_embeddings"), Some("false"));
    assert!(!c.tie_word_embeddings && !c.qkv_bias);
    assert!(c.rope.scaling.is_some());
    // Deserialize works straight from JSON too, keeping the raw value.
    let c: ModelConfig = serde_json::from_value(llama31.clone()).unwrap();
    assert_eq!(c.raw, llama31);
}

// ---------------------------------------------------------------- loading from directories

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("em-train-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_config(dir: &Path, raw: &Value) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(raw).unwrap(),
    )
    .unwrap();
}

fn write_safetensors(path: &Path, tensors: &[(&String, &Tensor)]) {
    let data: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| ((*n).clone(), (*t).clone()))
        .collect();
    safetensors::serialize_to_file(data, None, path).unwrap();
}

fn assert_same_logits(a: &CausalLm, b: &CausalLm) {
    let la = a
        .forward(&input_batch())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let lb = b
        .forward(&input_batch())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(la, lb);
}

fn err_string(r: Result<CausalLm, ModelError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hf_directory_round_trips_single_and_sharded() {
    let cpu = Device::Cpu;
    for (i, (label, raw)) in tiny_configs().into_iter().enumerate() {
        let cfg = config(&raw);
        let tensors = random_tensors(&cfg, 20 + i as u64);
        let reference = CausalLm::from_tensors(&cfg, tensors.clone(), DType::F64, &cpu).unwrap();

        let single = TempDir::new(&format!("single{i}"));
        write_config(&single.0, &raw);
        let all: Vec<_> = tensors.iter().collect();
        write_safetensors(&single.0.join("model.safetensors"), &all);
        let loaded = CausalLm::from_hf_dir(&single.0, DType::F64, &cpu).unwrap();
        assert_eq!(loaded.config(), reference.config(), "{label}");
        assert_same_logits(&loaded, &reference);

        let sharded = TempDir::new(&format!("sharded{i}"));
        write_config(&sharded.0, &raw);
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let (first, second) = names.split_at(names.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (file, part) in [
            ("model-00001-of-00002.safetensors", first),
            ("model-00002-of-00002.safetensors", second),
        ] {
            let part: Vec<_> = part.iter().map(|n| (*n, &tensors[*n])).collect();
            write_safetensors(&sharded.0.join(file), &part);
            for (n, _) in part {
                weight_map.insert(n.clone(), json!(file));
            }
        }
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(
            sharded.0.join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let loaded = CausalLm::from_hf_dir(&sharded.0, DType::F64, &cpu).unwrap();
        assert_same_logits(&loaded, &reference);

        // Saving and reloading keeps the weights and the config.
        let saved = TempDir::new(&format!("saved{i}"));
        reference.save_hf_dir(&saved.0, DType::F64).unwrap();
        let reloaded = CausalLm::from_hf_dir(&saved.0, DType::F64, &cpu).unwrap();
        assert_eq!(reloaded.config().raw, raw);
        assert_same_logits(&reloaded, &reference);
    }
}

#[test]
fn checkpoint_in_bf16_loads_into_f32() {
    let (_, raw) = &tiny_configs()[3];
    let cfg = config(raw);
    let tensors: HashMap<String, Tensor> = random_tensors(&cfg, 30)
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let dir = TempDir::new("bf16");
    write_config(&dir.0, raw);
    write_safetensors(
        &dir.0.join("model.safetensors"),
        &tensors.iter().collect::<Vec<_>>(),
    );
    let loaded = CausalLm::from_hf_dir(&dir.0, DType::F32, &Device::Cpu).unwrap();
    let reference = CausalLm::from_tensors(&cfg, tensors, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.dtype(), DType::F32);
    let a = loaded
        .forward(&input_batch())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = reference
        .forward(&input_batch())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_checkpoints_give_errors_that_name_the_file_and_the_fault() {
    let cpu = Device::Cpu;
    let (_, raw) = &tiny_configs()[0];
    let cfg = config(raw);
    let tensors = random_tensors(&cfg, 40);
    let all: Vec<_> = tensors.iter().collect();

    let dir = TempDir::new("bad");
    let d = dir.0.display().to_string();
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert_eq!(msg, format!("missing config.json in {d}"));

    std::fs::write(
        dir.0.join("config.json"),
        "{\n  \"model_type\": \"qwen2\",\n  oops\n}",
    )
    .unwrap();
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert!(
        msg.starts_with(&format!(
            "malformed JSON in {d}/config.json at line 3, column 3"
        )),
        "{msg}"
    );

    write_config(&dir.0, &json!({"model_type": "xyz", "hidden_size": 8}));
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert!(
        msg.starts_with(&format!(
            "unsupported architecture: model_type \"xyz\" in {d}/config.json"
        )),
        "{msg}"
    );

    let mut no_eps = raw.clone();
    no_eps.as_object_mut().unwrap().remove("rms_norm_eps");
    write_config(&dir.0, &no_eps);
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert!(
        msg.starts_with(&format!(
            "missing required key \"rms_norm_eps\" in {d}/config.json"
        )),
        "{msg}"
    );

    let mut typo = raw.clone();
    typo["hidden_size"] = json!("eight");
    write_config(&dir.0, &typo);
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert!(
        msg.starts_with(&format!(
            "invalid configuration in {d}/config.json: invalid type: string \"eight\""
        )),
        "{msg}"
    );
    assert!(msg.contains("at line"), "{msg}");

    let mut bad_heads = raw.clone();
    bad_heads["num_key_value_heads"] = json!(3);
    write_config(&dir.0, &bad_heads);
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert!(
        msg.contains(
            "num_attention_heads (2) must be a positive multiple of num_key_value_heads (3)"
        ),
        "{msg}"
    );

    let mut yarn = raw.clone();
    yarn["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    write_config(&dir.0, &yarn);
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert_eq!(
        msg,
        format!("unsupported configuration in {d}/config.json: rope scaling type \"yarn\"")
    );

    write_config(&dir.0, raw);
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert!(
        msg.starts_with("no model.safetensors") && msg.ends_with(&d),
        "{msg}"
    );

    let missing = "model.layers.1.mlp.up_proj.weight";
    let without: Vec<_> = all
        .iter()
        .copied()
        .filter(|(n, _)| n.as_str() != missing)
        .collect();
    write_safetensors(&dir.0.join("model.safetensors"), &without);
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert_eq!(msg, format!("missing tensor \"{missing}\" in {d}"));

    let transposed = tensors[missing].t().unwrap().contiguous().unwrap();
    let mut wrong = without.clone();
    let name = missing.to_string();
    wrong.push((&name, &transposed));
    write_safetensors(&dir.0.join("model.safetensors"), &wrong);
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert_eq!(
        msg,
        format!("wrong shape [8, 12] (expected [12, 8]) for tensor \"{missing}\" in {d}")
    );

    let mut map = tensors.clone();
    map.remove("lm_head.weight");
    let msg = err_string(CausalLm::from_tensors(&cfg, map, DType::F64, &cpu));
    assert_eq!(msg, "missing tensor \"lm_head.weight\" in the tensor map");

    std::fs::write(dir.0.join("model.safetensors"), b"not a safetensors file").unwrap();
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert!(
        msg.starts_with(&format!(
            "cannot load safetensors file {d}/model.safetensors"
        )),
        "{msg}"
    );

    let index = json!({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(
        dir.0.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let msg = err_string(CausalLm::from_hf_dir(&dir.0, DType::F64, &cpu));
    assert_eq!(
        msg,
        format!("bad shard index {d}/model.safetensors.index.json: shard \"model-00002-of-00002.safetensors\" is not in {d}")
    );
}

#[test]
#[ignore = "timing only: cargo test --release -p em-train -- --ignored --nocapture"]
fn smollm2_135m_sized_forward_backward_timing() {
    let raw = json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192
    });
    let cfg = config(&raw);
    let tensors: HashMap<String, Tensor> = tensor_shapes(&cfg)
        .into_iter()
        .map(|(n, s)| {
            let t = if n.ends_with("norm.weight") {
                Tensor::ones(s, DType::F32, &Device::Cpu)
            } else {
                Tensor::randn(0f32, 0.02, s, &Device::Cpu)
            };
            (n, t.unwrap())
        })
        .collect();
    let model = CausalLm::from_tensors(&cfg, tensors, DType::F32, &Device::Cpu).unwrap();
    let n: usize = model.parameters().iter().map(|(_, v)| v.elem_count()).sum();
    let input = Tensor::zeros((1, 128), DType::U32, &Device::Cpu).unwrap();
    for _ in 0..2 {
        let start = std::time::Instant::now();
        let logits = model.forward(&input).unwrap();
        let fwd = start.elapsed();
        let grads = logits
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(model
            .parameters()
            .iter()
            .all(|(_, v)| grads.get(v.as_tensor()).is_some()));
        eprintln!(
            "{n} parameters, seq 128: forward {fwd:?}, forward+backward {:?}",
            start.elapsed()
        );
    }
}
