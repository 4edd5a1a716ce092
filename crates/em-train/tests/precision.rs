//! Mixed precision: 10 EM updates at lr 2e-5 of the bf16 `tiny-qwen2` fixture from the same
//! samples, in f32, in bf16 with f32 master weights, and in bf16 rounded in place. The master run
//! tracks the f32 run; plain rounding loses most updates (half a bf16 ulp is ~2e-5 already at
//! |w| ≈ 0.005).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use em_train::models::CausalLm;
use em_train::optim::{AdamW, Precision};
use em_train::{
    accumulate_em_gradients, AdamWConfig, EmOptions, Gradients, Sequence, TrainConfig, Trainer,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen2")
}

fn samples(vocab: u32) -> Vec<Sequence> {
    let mut rng = StdRng::seed_from_u64(7);
    let prompt: Vec<u32> = (0..12).map(|_| rng.gen_range(3..vocab)).collect();
    (0..8)
        .map(|_| Sequence {
            prompt_ids: prompt.clone(),
            response_ids: (0..24).map(|_| rng.gen_range(3..vocab)).collect(),
        })
        .collect()
}

/// Every weight, flattened in parameter order, as f32.
fn flat(model: &CausalLm) -> Vec<f32> {
    model
        .parameters()
        .iter()
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap()
        })
        .collect()
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Runs 10 updates; returns the trainer.
fn train(dtype: DType, precision: Precision) -> Trainer {
    let model = CausalLm::from_hf_dir(&fixture(), dtype, &Device::Cpu).unwrap();
    let vocab = model.config().vocab_size;
    let config = TrainConfig {
        optimizer: AdamWConfig {
            lr: 2e-5,
            ..AdamWConfig::default()
        },
        max_grad_norm: 1.0,
        em: EmOptions::new(0.5, 4, vocab),
    };
    let mut trainer = Trainer::new(model, config);
    trainer.optimizer = AdamW::with_precision(config.optimizer, precision);
    let seqs = samples(vocab as u32);
    for _ in 0..10 {
        trainer.update(&seqs).unwrap();
    }
    trainer
}

fn first_gradient_error() -> f64 {
    let grads = |dtype| {
        let model = CausalLm::from_hf_dir(&fixture(), dtype, &Device::Cpu).unwrap();
        let vocab = model.config().vocab_size;
        let seqs = samples(vocab as u32);
        let mut g = Gradients::new(model.parameters());
        accumulate_em_gradients(&model, &seqs, &EmOptions::new(0.5, 4, vocab), 1.0, &mut g)
            .unwrap();
        g.named_tensors()
            .unwrap()
            .into_iter()
            .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect::<Vec<f32>>()
    };
    let (a, b) = (grads(DType::BF16), grads(DType::F32));
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn bf16_with_master_weights_tracks_f32_and_plain_rounding_loses_updates() {
    let start = flat(&CausalLm::from_hf_dir(&fixture(), DType::F32, &Device::Cpu).unwrap());
    assert!(start.iter().all(|&w| bf16(w) == w), "the fixture is bf16");
    let full = flat(&train(DType::F32, Precision::Master).model);
    let master_run = train(DType::BF16, Precision::Master);
    let plain = flat(&train(DType::BF16, Precision::PlainRounding).model);
    let master: Vec<f32> = master_run
        .model
        .parameters()
        .iter()
        .flat_map(|(name, _)| {
            let m: &Tensor = master_run.optimizer.master(name).expect("a master copy");
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect();
    let stored = flat(&master_run.model);
    assert_eq!(master.len(), start.len());
    assert!(
        stored.iter().zip(&master).all(|(&s, &m)| s == bf16(m)),
        "the stored bf16 weights are the master weights rounded"
    );

    // Relative error of the parameter change against the f32 run's.
    let rel = |run: &[f32]| {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for ((&r, &f), &s) in run.iter().zip(&full).zip(&start) {
            let (dr, df) = ((r - s) as f64, (f - s) as f64);
            num += (dr - df) * (dr - df);
            den += df * df;
        }
        (num / den).sqrt()
    };
    let changed = |run: &[f32]| {
        run.iter()
            .zip(&start)
            .filter(|(&r, &s)| bf16(r) != s)
            .count() as f64
            / start.len() as f64
    };
    let (f32_changed, master_changed, plain_changed) =
        (changed(&full), changed(&stored), changed(&plain));
    let (master_err, plain_err) = (rel(&master), rel(&plain));
    eprintln!(
        "10 updates at lr 2e-5, {} weights: bf16 value changed for {:.1}% (f32 run), {:.1}% (bf16 + f32 master), {:.1}% (bf16 rounded in place)",
        start.len(),
        100.0 * f32_changed,
        100.0 * master_changed,
        100.0 * plain_changed
    );
    eprintln!(
        "relative error of the weight change against the f32 run: {master_err:.3} (master), {plain_err:.3} (rounded in place)"
    );
    // What remains of the master run's error is the bf16 forward and backward, not the update:
    // Adam turns the noisy sign of tiny gradients into full ±lr steps.
    eprintln!(
        "relative error of the first update's gradient, bf16 against f32: {:.3}",
        first_gradient_error()
    );
    assert!(
        master_err < 0.5,
        "master weights drift from f32: {master_err}"
    );
    assert!(
        (master_changed - f32_changed).abs() < 0.2 * f32_changed,
        "{master_changed} vs {f32_changed}"
    );
    assert!(
        plain_changed < 0.5 * f32_changed && plain_err > 2.0 * master_err,
        "plain rounding should lose most updates: {plain_changed} changed, error {plain_err}"
    );
}
