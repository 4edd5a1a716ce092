//! Tests of the EM objective: which logits it reads, its value against a direct computation, its
//! gradient against finite differences in f64 through tiny models of each architecture, and the
//! independence of the result from micro-batching and logit chunking.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use em_train::lora::{AdapterSource, LoraConfig};
use em_train::models::{tensor_shapes, Architecture, CausalLm, ModelConfig};
use em_train::objective::select_predicting;
use em_train::{
    accumulate_em_gradients, accumulate_em_gradients_observed, em_loss, predicting_positions,
    AdamWConfig, EmOptions, Gradients, Pass, Sequence, TrainConfig, Trainer,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const VOCAB: usize = 11;
const TAU: f64 = 0.5;

fn tiny_configs() -> Vec<(&'static str, Value)> {
    vec![
        (
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
            "llama tied, explicit head_dim",
            json!({
                "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 6, "tie_word_embeddings": true,
                "rope_theta": 100.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 64
            }),
        ),
        (
            "gemma3 tied, softcaps",
            json!({
                "model_type": "gemma3_text", "vocab_size": VOCAB, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 6, "query_pre_attn_scalar": 7,
                "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"],
                "rope_theta": 1000.0, "rope_local_base_freq": 50.0,
                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 64
            }),
        ),
    ]
}

fn model(raw: &Value, dtype: DType, seed: u64) -> CausalLm {
    let cfg = ModelConfig::from_value(raw.clone(), Path::new("test config")).unwrap();
    CausalLm::from_tensors(&cfg, random_weights(&cfg, seed), dtype, &Device::Cpu).unwrap()
}

/// Random weights for `cfg`: norms near their identity, the rest uniform.
fn random_weights(cfg: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let gemma = cfg.architecture == Architecture::Gemma3;
    let tensors: HashMap<String, Tensor> = tensor_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let data: Vec<f64> = (0..n)
                .map(|_| {
                    let u: f64 = rng.gen_range(-1.0..1.0);
                    match (norm, gemma) {
                        (true, true) => 0.3 * u,
                        (true, false) => 1.0 + 0.3 * u,
                        _ => 0.6 * u,
                    }
                })
                .collect();
            (name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap())
        })
        .collect();
    tensors
}

/// Three sequences of different prompt and response lengths, so micro-batches need padding.
fn sequences() -> Vec<Sequence> {
    vec![
        Sequence {
            prompt_ids: vec![1, 4, 7],
            response_ids: vec![2, 9, 3, 5],
        },
        Sequence {
            prompt_ids: vec![10, 3],
            response_ids: vec![0],
        },
        Sequence {
            prompt_ids: vec![6, 6, 2, 8, 1],
            response_ids: vec![4, 10],
        },
    ]
}

fn options(micro_batch: usize, chunk: usize, recompute: bool) -> EmOptions {
    EmOptions {
        temperature: TAU,
        micro_batch,
        logit_chunk_rows: chunk,
        recompute,
    }
}

/// The largest absolute difference between two tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// (loss, gradients) of the token mean over all response tokens.
fn loss_and_grads(model: &CausalLm, seqs: &[Sequence], opts: &EmOptions) -> (f64, Gradients) {
    let n: usize = seqs.iter().map(|s| s.response_ids.len()).sum();
    let mut grads = Gradients::new(model.parameters());
    let stats = accumulate_em_gradients(model, seqs, opts, 1.0 / n as f64, &mut grads).unwrap();
    assert_eq!(stats.n_tokens, n);
    (stats.entropy_sum / n as f64, grads)
}

fn loss_only(model: &CausalLm, seqs: &[Sequence], opts: &EmOptions) -> f64 {
    loss_and_grads(model, seqs, opts).0
}

/// Progress comes as a forward then a backward pass per micro-batch, in order, with or without
/// recomputation, and observing changes nothing in the result.
#[test]
fn an_update_reports_each_forward_and_backward_pass() {
    let (_, raw) = &tiny_configs()[0];
    let m = model(raw, DType::F64, 3);
    let seqs = sequences();
    for recompute in [true, false] {
        let opts = options(2, 4, recompute);
        let mut passes = Vec::new();
        let mut grads = Gradients::new(m.parameters());
        let stats =
            accumulate_em_gradients_observed(&m, &seqs, &opts, 0.25, &mut grads, &mut |p| {
                passes.push(p)
            })
            .unwrap();
        let pass = |micro_batch, backward| Pass {
            micro_batch,
            micro_batches: 2,
            backward,
        };
        assert_eq!(
            passes,
            [pass(1, false), pass(1, true), pass(2, false), pass(2, true)],
            "recompute {recompute}"
        );
        let mut plain = Gradients::new(m.parameters());
        let unobserved = accumulate_em_gradients(&m, &seqs, &opts, 0.25, &mut plain).unwrap();
        assert_eq!(stats.entropy_sum, unobserved.entropy_sum);
        assert_eq!(plain.global_norm().unwrap(), grads.global_norm().unwrap());
    }
}

#[test]
fn predicting_positions_are_last_prompt_through_second_to_last_response() {
    assert_eq!(predicting_positions(5, 3), 4..7);
    assert_eq!(predicting_positions(1, 1), 0..1);
}

/// The mask reads exactly positions prompt_len-1 ..= prompt_len+resp_len-2 of each sequence:
/// changing any other position's logits (the prompt-only ones, the one after the last response
/// token, the padding) leaves the loss unchanged, changing any of those changes it.
#[test]
fn loss_reads_exactly_the_response_predicting_logits() {
    let seqs = sequences();
    let t = seqs.iter().map(Sequence::len).max().unwrap();
    let b = seqs.len();
    let mut rng = StdRng::seed_from_u64(7);
    let base: Vec<f64> = (0..b * t * VOCAB)
        .map(|_| rng.gen_range(-3.0..3.0))
        .collect();
    let loss_of = |data: &[f64]| -> f64 {
        let logits = Tensor::from_vec(data.to_vec(), (b, t, VOCAB), &Device::Cpu).unwrap();
        let rows = select_predicting(&logits, &seqs).unwrap();
        em_loss(&rows, TAU).unwrap().to_scalar::<f64>().unwrap()
    };
    let l0 = loss_of(&base);
    for (i, s) in seqs.iter().enumerate() {
        let (p, r) = (s.prompt_ids.len(), s.response_ids.len());
        for pos in 0..t {
            let mut data = base.clone();
            for v in 0..VOCAB {
                data[(i * t + pos) * VOCAB + v] += 0.7 * (v as f64 - 4.0);
            }
            let changed = (loss_of(&data) - l0).abs() > 1e-12;
            let reads = (p - 1..=p + r - 2).contains(&pos);
            assert_eq!(
                changed, reads,
                "sequence {i} (prompt {p}, response {r}): position {pos} read = {changed}"
            );
        }
    }
}

/// Entropy at τ of a row of logits, straight from the definition.
fn entropy_direct(row: &[f64], tau: f64) -> f64 {
    let z: Vec<f64> = row.iter().map(|x| x / tau).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = z.iter().map(|x| (x - m).exp()).sum();
    z.iter()
        .map(|x| {
            let p = (x - m).exp() / sum;
            -p * p.ln()
        })
        .sum()
}

/// The loss equals the mean of per-position entropies from a plain forward of each sequence alone.
#[test]
fn loss_equals_direct_entropy_of_each_sequence_alone() {
    for (label, raw) in tiny_configs() {
        let m = model(&raw, DType::F64, 3);
        let seqs = sequences();
        let (mut total, mut n) = (0.0, 0);
        for s in &seqs {
            let ids: Vec<u32> = s
                .prompt_ids
                .iter()
                .chain(&s.response_ids)
                .copied()
                .collect();
            let len = ids.len();
            let input = Tensor::from_vec(ids, (1, len), &Device::Cpu).unwrap();
            let logits = m.forward(&input).unwrap().squeeze(0).unwrap();
            let rows = logits.to_vec2::<f64>().unwrap();
            for pos in predicting_positions(s.prompt_ids.len(), s.response_ids.len()) {
                total += entropy_direct(&rows[pos], TAU);
                n += 1;
            }
        }
        let direct = total / n as f64;
        let ours = loss_only(&m, &seqs, &options(2, 3, true));
        assert!(
            (ours - direct).abs() < 1e-12,
            "{label}: {ours} vs direct {direct}"
        );
    }
}

/// Micro-batch size and logit chunking change neither the loss nor the gradients.
#[test]
fn micro_batching_and_chunking_do_not_change_the_result() {
    let m = model(&tiny_configs()[0].1, DType::F64, 5);
    let seqs = sequences();
    let (l_ref, g_ref) = loss_and_grads(&m, &seqs, &options(3, 1000, false));
    for opts in [
        options(1, 1, false),
        options(2, 2, false),
        options(3, 1, true),
    ] {
        let (l, g) = loss_and_grads(&m, &seqs, &opts);
        assert!((l - l_ref).abs() < 1e-13, "{opts:?}: loss {l} vs {l_ref}");
        for ((name, _, a), (_, _, b)) in g.iter().zip(g_ref.iter()) {
            let diff = max_diff(a.unwrap(), b.unwrap());
            assert!(diff < 1e-13, "{opts:?}: {name} differs by {diff}");
        }
    }
}

/// Recomputing each decoder layer in the backward pass (only layer inputs kept) gives the
/// gradients of the one backward through the whole graph, in f64, for every architecture, and
/// for every parameter: embeddings through the input path, every layer, the final norm, the head.
#[test]
fn recomputed_layers_give_the_same_gradients() {
    let seqs = sequences();
    for (k, (label, raw)) in tiny_configs().into_iter().enumerate() {
        let m = model(&raw, DType::F64, 40 + k as u64);
        let (l_full, g_full) = loss_and_grads(&m, &seqs, &options(2, 3, false));
        let (l_re, g_re) = loss_and_grads(&m, &seqs, &options(2, 3, true));
        assert!(
            (l_full - l_re).abs() < 1e-13,
            "{label}: loss {l_re} vs {l_full}"
        );
        let mut worst = 0.0f64;
        for ((name, _, a), (_, _, b)) in g_full.iter().zip(g_re.iter()) {
            let (a, b) = (a.unwrap(), b.unwrap());
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(scale > 0.0, "{label}: zero gradient for {name}");
            let rel = max_diff(a, b) / scale;
            assert!(
                rel < 1e-12,
                "{label}: {name} differs by {rel:.2e} (relative)"
            );
            worst = worst.max(rel);
        }
        eprintln!("{label}: recompute vs one backward, max relative difference {worst:.2e}");
    }
}

/// A rank-2 adapter on every linear layer of each tiny model, both factors random (a fresh
/// adapter's zero B would leave A without a gradient).
fn adapted(raw: &Value, seed: u64) -> CausalLm {
    let cfg = ModelConfig::from_value(raw.clone(), Path::new("test config")).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 3.0,
        ..LoraConfig::default()
    };
    let mut rng = StdRng::seed_from_u64(seed + 1000);
    let mut factors = HashMap::new();
    for (name, shape) in tensor_shapes(&cfg) {
        let Some(prefix) = name.strip_suffix(".weight") else {
            continue;
        };
        if !lora.targets_module(prefix) {
            continue;
        }
        let (a, b) = em_train::lora::peft_names(prefix);
        for (n, dims) in [(a, [2, shape[1]]), (b, [shape[0], 2])] {
            let data: Vec<f64> = (0..dims[0] * dims[1])
                .map(|_| rng.gen_range(-0.5..0.5))
                .collect();
            factors.insert(
                n,
                Tensor::from_vec(data, (dims[0], dims[1]), &Device::Cpu).unwrap(),
            );
        }
    }
    CausalLm::from_tensors_with_adapter(
        &cfg,
        random_weights(&cfg, seed),
        DType::F64,
        &Device::Cpu,
        lora,
        AdapterSource::Tensors {
            tensors: factors,
            origin: "test factors".into(),
        },
    )
    .unwrap()
}

/// Only the adapter's factors are parameters, every one gets a gradient that central
/// differences confirm, with and without recomputed layers; a fresh adapter (B = 0) leaves the
/// base model's logits exactly as they were.
#[test]
fn adapter_gradients_match_finite_differences() {
    let seqs = sequences();
    for (k, (label, raw)) in tiny_configs().into_iter().enumerate() {
        let m = adapted(&raw, 60 + k as u64);
        let layers = m.config().num_hidden_layers;
        let params = m.parameters();
        assert_eq!(params.len(), layers * 7 * 2, "{label}");
        assert!(params.iter().all(|(n, _)| n.contains(".lora_")), "{label}");
        let (l_re, g_re) = loss_and_grads(&m, &seqs, &options(2, 3, true));
        let (l_full, g_full) = loss_and_grads(&m, &seqs, &options(3, 64, false));
        assert!((l_re - l_full).abs() < 1e-13, "{label}");
        let mut rng = StdRng::seed_from_u64(70 + k as u64);
        let eps = 1e-6;
        let (mut worst, mut checked) = (0.0f64, 0);
        for ((name, var, g), (_, _, g2)) in g_re.iter().zip(g_full.iter()) {
            let g = g.unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
            assert!(
                max_diff(g, g2.unwrap()) < 1e-12,
                "{label}: {name}: recompute differs"
            );
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(
                g.iter().any(|x| *x != 0.0),
                "{label}: zero gradient for {name}"
            );
            let values = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in [0, rng.gen_range(0..g.len()), g.len() - 1] {
                set_entry(var, &values, i, values[i] + eps);
                let plus = loss_only(&m, &seqs, &options(2, 3, true));
                set_entry(var, &values, i, values[i] - eps);
                let minus = loss_only(&m, &seqs, &options(2, 3, true));
                set_entry(var, &values, i, values[i]);
                let fd = (plus - minus) / (2.0 * eps);
                let rel = (g[i] - fd).abs() / g[i].abs().max(fd.abs()).max(1e-3);
                assert!(
                    rel <= 1e-6,
                    "{label}: {name}[{i}]: autograd {} vs finite difference {fd} (rel {rel:.2e})",
                    g[i]
                );
                worst = worst.max(rel);
                checked += 1;
            }
        }
        eprintln!("{label}: adapter, {checked} entries, max relative error {worst:.2e}");

        let cfg = m.config().clone();
        let base = CausalLm::from_tensors(
            &cfg,
            random_weights(&cfg, 60 + k as u64),
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        let fresh = CausalLm::from_tensors_with_adapter(
            &cfg,
            random_weights(&cfg, 60 + k as u64),
            DType::F64,
            &Device::Cpu,
            LoraConfig::default(),
            AdapterSource::Init { seed: 3 },
        )
        .unwrap();
        let ids = Tensor::new(&[[1u32, 4, 7, 2, 9]], &Device::Cpu).unwrap();
        let d = max_diff(&base.forward(&ids).unwrap(), &fresh.forward(&ids).unwrap());
        assert_eq!(d, 0.0, "{label}: a fresh adapter changes the logits by {d}");
    }
}

fn set_entry(var: &Var, values: &[f64], index: usize, value: f64) {
    let mut v = values.to_vec();
    v[index] = value;
    var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu).unwrap())
        .unwrap();
}

/// Autograd through the chunked LM head and the trunk against central differences of the loss,
/// on the largest-gradient entry and random entries of every parameter, for each architecture.
#[test]
fn em_loss_gradients_match_finite_differences() {
    let seqs = sequences();
    let opts = options(2, 3, true);
    for (k, (label, raw)) in tiny_configs().into_iter().enumerate() {
        let m = model(&raw, DType::F64, 20 + k as u64);
        let (_, grads) = loss_and_grads(&m, &seqs, &opts);
        let mut rng = StdRng::seed_from_u64(30 + k as u64);
        let eps = 1e-6;
        let (mut worst, mut checked) = (0.0f64, 0);
        for (name, var, g) in grads.iter() {
            let g = g
                .unwrap_or_else(|| panic!("{label}: no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert!(
                g.iter().any(|x| *x != 0.0),
                "{label}: zero gradient for {name}"
            );
            let values = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let largest = (0..g.len())
                .max_by(|&i, &j| g[i].abs().total_cmp(&g[j].abs()))
                .unwrap();
            let mut entries = vec![largest];
            entries.extend((0..4).map(|_| rng.gen_range(0..g.len())));
            for &i in &entries {
                set_entry(var, &values, i, values[i] + eps);
                let plus = loss_only(&m, &seqs, &opts);
                set_entry(var, &values, i, values[i] - eps);
                let minus = loss_only(&m, &seqs, &opts);
                set_entry(var, &values, i, values[i]);
                let fd = (plus - minus) / (2.0 * eps);
                // Floor of 1e-3 on the denominator: central differences at eps = 1e-6 carry
                // ~1e-10 of rounding noise, so for near-zero entries only the absolute error counts.
                let rel = (g[i] - fd).abs() / g[i].abs().max(fd.abs()).max(1e-3);
                assert!(
                    rel <= 1e-6,
                    "{label}: {name}[{i}]: autograd {} vs finite difference {fd} (rel {rel:.2e})",
                    g[i]
                );
                worst = worst.max(rel);
                checked += 1;
            }
        }
        eprintln!("{label}: {checked} entries, max relative error {worst:.2e}");
    }
}

/// An update lowers the loss on the same responses; bad sequences are refused with their index.
#[test]
fn an_update_lowers_the_entropy_and_bad_input_is_named() {
    let m = model(&tiny_configs()[1].1, DType::F32, 9);
    let config = TrainConfig {
        optimizer: AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
        max_grad_norm: 1.0,
        em: options(2, 4, true),
    };
    let mut trainer = Trainer::new(m, config);
    let seqs = sequences();
    let first = trainer.update(&seqs).unwrap();
    let second = trainer.update(&seqs).unwrap();
    assert!(second.loss < first.loss, "{second:?} vs {first:?}");
    assert!(first.grad_norm > 0.0 && first.n_tokens == 7);

    let mut bad = seqs.clone();
    bad[1].response_ids.clear();
    let e = trainer.update(&bad).unwrap_err().to_string();
    assert_eq!(e, "sequence 1: empty response");
    bad[1].response_ids = vec![VOCAB as u32];
    let e = trainer.update(&bad).unwrap_err().to_string();
    assert_eq!(
        e,
        "sequence 1: token id 11 is not below the vocabulary size 11"
    );
}

/// transformers' `padding_idx`: with `pad_token_id` set, the input embedding's row of that token
/// gets no gradient through the lookup. Everything else is unchanged; an untied model's row gets
/// none at all, a tied model's keeps its LM-head part.
#[test]
fn the_pad_row_gets_no_gradient_through_the_input_path() {
    const PAD: usize = 6; // twice in the third prompt
    for (label, mut raw) in tiny_configs().into_iter().take(2) {
        raw["pad_token_id"] = json!(PAD);
        let ruled = model(&raw, DType::F64, 3);
        assert_eq!(ruled.config().pad_token_id, Some(PAD as u32));
        let mut free = ruled.clone();
        free.set_padding_idx(None);
        let opts = options(2, 5, true);
        let (loss_ruled, g_ruled) = loss_and_grads(&ruled, &sequences(), &opts);
        let (loss_free, g_free) = loss_and_grads(&free, &sequences(), &opts);
        assert_eq!(
            loss_ruled, loss_free,
            "{label}: the forward pass is the same"
        );
        let tied = raw["tie_word_embeddings"] == json!(true);
        for (name, _, g) in g_ruled.iter() {
            let a = g.unwrap().to_dtype(DType::F64).unwrap();
            let b = g_free.get(name).unwrap().to_dtype(DType::F64).unwrap();
            if name != "model.embed_tokens.weight" {
                let (a, b) = (
                    a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                );
                assert_eq!(a, b, "{label}: {name}");
                continue;
            }
            let rows = |t: &Tensor| t.to_vec2::<f64>().unwrap();
            let (a, b) = (rows(&a), rows(&b));
            for (i, (ra, rb)) in a.iter().zip(&b).enumerate() {
                if i != PAD {
                    assert_eq!(ra, rb, "{label}: row {i}");
                }
            }
            let norm = |r: &[f64]| r.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!(
                norm(&b[PAD]) > 0.0,
                "{label}: without the rule the pad row trains"
            );
            assert_ne!(a[PAD], b[PAD], "{label}: the rule changes the pad row");
            if tied {
                assert!(
                    norm(&a[PAD]) > 0.0,
                    "{label}: the tied LM head still trains the pad row"
                );
            } else {
                assert_eq!(
                    norm(&a[PAD]),
                    0.0,
                    "{label}: untied, the pad row gets nothing"
                );
            }
        }
    }
}

/// The written-out entropy gradient the LM head uses equals autograd's through `entropy`, in f64,
/// on rows with a dominant logit, flat rows and everything between.
#[test]
fn entropy_gradient_is_autograds() {
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, vocab) = (6, 13);
    let values: Vec<f64> = (0..rows * vocab)
        .map(|i| {
            let spread = [0.01, 0.5, 2.0, 8.0, 30.0, 1.0][i / vocab];
            spread * rng.gen_range(-1.0..1.0)
        })
        .collect();
    let z = Var::from_vec(values, (rows, vocab), &Device::Cpu).unwrap();
    let want_sum = em_train::entropy(z.as_tensor(), TAU)
        .unwrap()
        .sum_all()
        .unwrap();
    let want_grad = want_sum
        .backward()
        .unwrap()
        .get(z.as_tensor())
        .unwrap()
        .clone();
    let (sum, grad) = em_train::objective::entropy_sum_and_grad(z.as_tensor(), TAU).unwrap();
    let (a, b) = (
        sum.to_scalar::<f64>().unwrap(),
        want_sum.to_scalar::<f64>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-13 * b.abs(), "entropy {a} vs {b}");
    let scale = want_grad
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let diff = max_diff(&grad, &want_grad);
    assert!(
        diff <= 1e-13 * scale,
        "gradient off by {diff:.2e} (scale {scale:.2e})"
    );
}
