//! Pretraining from scratch with next-token cross-entropy, and plain decoding to measure the result:
//! how the project grows its own small subject (a "model organism") to run one-shot EM on.
//!
//! The loss counts only the target tokens of each example, never its prompt. Decoding runs the
//! whole sequence for every new token (the models have no KV cache), which is fine for a model of a
//! few million parameters and responses of under a hundred tokens.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::models::{tensor_shapes, CausalLm, ModelConfig, ModelError};

/// One training sequence: the prompt (no loss) and the target that follows it (loss on every
/// token, the stop token included when the target has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Target token ids.
    pub target: Vec<u32>,
}

/// A freshly initialised model of `config`: N(0, 0.02) matrices and embeddings (output and down
/// projections scaled by `1/sqrt(2·layers)`), unit norms, zero biases; the same for the same seed.
pub fn init_model(
    config: &ModelConfig,
    seed: u64,
    device: &Device,
) -> std::result::Result<CausalLm, ModelError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let depth_scale = 1.0 / (2.0 * config.num_hidden_layers.max(1) as f32).sqrt();
    let mut tensors = HashMap::new();
    for (name, shape) in tensor_shapes(config) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            let std = if name.contains("o_proj") || name.contains("down_proj") {
                0.02 * depth_scale
            } else {
                0.02
            };
            (0..n).map(|_| std * normal(&mut rng)).collect()
        };
        let t = Tensor::from_vec(data, shape, device).map_err(|source| ModelError::Candle {
            context: format!("initialising {name}"),
            source,
        })?;
        tensors.insert(name, t);
    }
    CausalLm::from_tensors(config, tensors, DType::F32, device)
}

/// A standard normal sample (Box-Muller), so initialisation depends only on `rand`'s StdRng.
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Mean cross-entropy (nats per target token) of `model` on `examples`, right-padded with `pad`.
pub fn batch_loss(model: &CausalLm, examples: &[Example], pad: u32) -> Result<Tensor> {
    let device = model
        .parameters()
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let len = examples
        .iter()
        .map(|e| e.prompt.len() + e.target.len())
        .max()
        .unwrap_or(0);
    let vocab = model.config().vocab_size;
    let n_targets: usize = examples.iter().map(|e| e.target.len()).sum();
    if len < 2 || n_targets == 0 {
        candle_core::bail!("batch_loss: no target tokens");
    }
    let mut ids = vec![pad; examples.len() * len];
    // weights[b, t, v] = 1/n at the token each target position predicts.
    let mut weights = vec![0f32; examples.len() * len * vocab];
    let w = 1.0 / n_targets as f32;
    for (b, e) in examples.iter().enumerate() {
        let row = &mut ids[b * len..(b + 1) * len];
        for (i, &t) in e.prompt.iter().chain(&e.target).enumerate() {
            row[i] = t;
        }
        for (j, &t) in e.target.iter().enumerate() {
            // The logit that predicts target token j (a first token with no prompt has none).
            if let Some(pos) = (e.prompt.len() + j).checked_sub(1) {
                weights[(b * len + pos) * vocab + t as usize] = w;
            }
        }
    }
    let input = Tensor::from_vec(ids, (examples.len(), len), &device)?;
    let weights = Tensor::from_vec(weights, (examples.len(), len, vocab), &device)?;
    let logits = model.forward(&input)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    (logp * weights)?.sum_all()?.neg()
}

/// Settings of a pretraining run.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainConfig {
    /// Optimizer updates.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps to the peak.
    pub warmup: usize,
    /// The cosine schedule ends at `lr · final_lr_fraction`.
    pub final_lr_fraction: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (none when 0).
    pub grad_clip: f64,
    /// Padding token id (never a target).
    pub pad: u32,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            steps: 1000,
            lr: 3e-3,
            warmup: 50,
            final_lr_fraction: 0.1,
            weight_decay: 0.01,
            grad_clip: 1.0,
            pad: 0,
        }
    }
}

impl PretrainConfig {
    /// The learning rate of update `step` (0-based): linear warm-up, then cosine decay.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = self.lr * self.final_lr_fraction;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What one update did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// 1-based update number.
    pub step: usize,
    /// Training loss before the update (nats per target token).
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Seconds since training started.
    pub elapsed: f64,
}

/// Trains every parameter of `model` with AdamW for up to `config.steps` updates on the batches
/// `next_batch(step)` returns; `on_step` sees each update's statistics and the model after it, and
/// stops training early by returning `false`.
pub fn pretrain(
    model: &CausalLm,
    config: &PretrainConfig,
    mut next_batch: impl FnMut(usize) -> Vec<Example>,
    mut on_step: impl FnMut(&StepStats, &CausalLm) -> Result<bool>,
) -> Result<Vec<StepStats>> {
    let vars: Vec<Var> = model.parameters().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: config.lr,
            weight_decay: config.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let start = Instant::now();
    let mut history = Vec::with_capacity(config.steps);
    for step in 0..config.steps {
        let lr = config.lr_at(step);
        opt.set_learning_rate(lr);
        let batch = next_batch(step);
        let loss = batch_loss(model, &batch, config.pad)?;
        let mut grads = loss.backward()?;
        let mut sq = 0f32;
        for v in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            }
        }
        let grad_norm = sq.sqrt();
        if config.grad_clip > 0.0 && grad_norm as f64 > config.grad_clip {
            let scale = config.grad_clip / grad_norm as f64;
            for v in &vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * scale)?);
                }
            }
        }
        opt.step(&grads)?;
        let stats = StepStats {
            step: step + 1,
            loss: loss.to_scalar::<f32>()?,
            lr,
            grad_norm,
            elapsed: start.elapsed().as_secs_f64(),
        };
        let go_on = on_step(&stats, model)?;
        history.push(stats);
        if !go_on {
            break;
        }
    }
    Ok(history)
}

/// How to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    /// At most this many new tokens per prompt.
    pub max_new_tokens: usize,
    /// 0 for greedy (argmax), else the softmax temperature.
    pub temperature: f64,
    /// Tokens that end a response (not included in it).
    pub stop: Vec<u32>,
    /// Padding token id for batching.
    pub pad: u32,
    /// Prompts decoded together (rows of one forward pass).
    pub batch_size: usize,
}

/// One decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The new tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// Whether a stop token ended it (else it hit `max_new_tokens`).
    pub stopped: bool,
}

/// Decodes a response for every prompt (greedy or sampled with `rng`; deterministic for a seed).
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    decoding: &Decoding,
    rng: &mut StdRng,
) -> Result<Vec<Generation>> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(decoding.batch_size.max(1)) {
        out.extend(generate_batch(model, chunk, decoding, rng)?);
    }
    Ok(out)
}

fn generate_batch(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    decoding: &Decoding,
    rng: &mut StdRng,
) -> Result<Vec<Generation>> {
    let device = model
        .parameters()
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut gens: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            tokens: Vec::new(),
            stopped: false,
        })
        .collect();
    for _ in 0..decoding.max_new_tokens {
        let active: Vec<usize> = (0..seqs.len()).filter(|&i| !gens[i].stopped).collect();
        if active.is_empty() {
            break;
        }
        let len = active.iter().map(|&i| seqs[i].len()).max().unwrap_or(1);
        let mut ids = vec![decoding.pad; active.len() * len];
        for (r, &i) in active.iter().enumerate() {
            ids[r * len..r * len + seqs[i].len()].copy_from_slice(&seqs[i]);
        }
        let input = Tensor::from_vec(ids, (active.len(), len), &device)?;
        // Right padding never reaches earlier positions under the causal mask.
        let hidden = model.hidden_states(&input)?;
        let last: Vec<Tensor> = active
            .iter()
            .enumerate()
            .map(|(r, &i)| hidden.i((r, seqs[i].len() - 1)))
            .collect::<Result<_>>()?;
        let logits = model
            .logits_from_hidden(&Tensor::stack(&last, 0)?)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (&i, z) in active.iter().zip(&logits) {
            let t = pick(z, decoding.temperature, rng);
            if decoding.stop.contains(&t) {
                gens[i].stopped = true;
            } else {
                gens[i].tokens.push(t);
                seqs[i].push(t);
            }
        }
    }
    Ok(gens)
}

/// Argmax at temperature 0, else a draw from `softmax(z / temperature)`.
fn pick(z: &[f32], temperature: f64, rng: &mut StdRng) -> u32 {
    let argmax = z
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0;
    if temperature <= 0.0 {
        return argmax as u32;
    }
    let m = z[argmax] as f64;
    let p: Vec<f64> = z
        .iter()
        .map(|&x| ((x as f64 - m) / temperature).exp())
        .collect();
    let mut u = rng.gen::<f64>() * p.iter().sum::<f64>();
    for (i, &q) in p.iter().enumerate() {
        if u < q {
            return i as u32;
        }
        u -= q;
    }
    argmax as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        let raw = serde_json::json!({
            "model_type": "qwen2", "vocab_size": 16, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "tie_word_embeddings": true, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0
        });
        ModelConfig::from_value(raw, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn learns_a_fixed_continuation_and_decodes_it() {
        let config = tiny();
        let model = init_model(&config, 0, &Device::Cpu).unwrap();
        let again = init_model(&config, 0, &Device::Cpu).unwrap();
        let (a, b) = (&model.parameters()[1].1, &again.parameters()[1].1);
        let diff = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "seeded init");
        // Prompt [1, 2] (or [3]) -> 5 6 7 then stop (15); the prompt itself is never a target.
        let batch = vec![
            Example {
                prompt: vec![1, 2],
                target: vec![5, 6, 7, 15],
            },
            Example {
                prompt: vec![3],
                target: vec![9, 15],
            },
        ];
        let cfg = PretrainConfig {
            steps: 150,
            lr: 1e-2,
            warmup: 5,
            pad: 0,
            ..PretrainConfig::default()
        };
        let hist = pretrain(&model, &cfg, |_| batch.clone(), |_, _| Ok(true)).unwrap();
        assert!(hist.last().unwrap().loss < 0.05, "{:?}", hist.last());
        let dec = Decoding {
            max_new_tokens: 8,
            temperature: 0.0,
            stop: vec![15],
            pad: 0,
            batch_size: 2,
        };
        let mut rng = StdRng::seed_from_u64(0);
        let g = generate(&model, &[vec![1, 2], vec![3]], &dec, &mut rng).unwrap();
        assert_eq!(g[0].tokens, vec![5, 6, 7]);
        assert_eq!(g[1].tokens, vec![9]);
        assert!(g[0].stopped && g[1].stopped);
    }
}
