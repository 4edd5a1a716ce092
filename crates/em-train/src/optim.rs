//! AdamW exactly as PyTorch's `torch.optim.AdamW` (single-tensor path) computes it, with its state
//! saved to and restored from safetensors so that a resumed run continues bit for bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::grads::{accumulate_dtype, ctx, pieces, Gradients, TrainError};

/// AdamW hyper-parameters (PyTorch's defaults except the learning rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// ε, added after the square root.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-5,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// How weights stored in bf16 or f16 are updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// An f32 master copy of each such weight takes the update; the weight is its rounding. This
    /// is what mixed-precision training (DeepSpeed, the reference) does, and what [`AdamW::new`]
    /// uses.
    Master,
    /// The update is added to the stored weight and rounded in place: any step below half a bf16
    /// ulp is lost. Only for measuring that loss; the trainer never uses it.
    PlainRounding,
}

/// One parameter's state: both moments (f32, f64 for f64 weights) and, for a bf16/f16 weight
/// under [`Precision::Master`], its f32 master copy.
#[derive(Debug)]
struct State {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Option<Tensor>,
}

/// AdamW's state: the step count and every parameter's moments (and master weights), by HF name.
/// The update runs as tensor operations on the parameters' device.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    precision: Precision,
    step: u64,
    state: HashMap<String, State>,
}

impl AdamW {
    /// Fresh state: step 0, zero moments, f32 master copies of bf16/f16 weights.
    pub fn new(config: AdamWConfig) -> Self {
        Self::with_precision(config, Precision::Master)
    }

    /// Fresh state with the given treatment of bf16/f16 weights.
    pub fn with_precision(config: AdamWConfig, precision: Precision) -> Self {
        Self {
            config,
            precision,
            step: 0,
            state: HashMap::new(),
        }
    }

    /// Updates taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The f32 master copy of parameter `name`, if it has one.
    pub fn master(&self, name: &str) -> Option<&Tensor> {
        self.state.get(name).and_then(|s| s.master.as_ref())
    }

    /// One update of every parameter of `grads` (a parameter without a gradient gets a zero one,
    /// as PyTorch skips only parameters whose `.grad` is None; every parameter here gets one),
    /// in PyTorch's order of operations:
    ///
    /// `p ← p(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
    pub fn step(&mut self, grads: &Gradients) -> Result<(), TrainError> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let k = Coefficients {
            decay: 1.0 - c.lr * c.weight_decay,
            betas: c.betas,
            step_size: c.lr / (1.0 - c.betas.0.powi(t)),
            bc2_sqrt: (1.0 - c.betas.1.powi(t)).sqrt(),
            eps: c.eps,
        };
        for (name, var, g) in grads.iter() {
            let state = self.state.remove(name);
            let updated = update(var, g, state, &k, self.precision);
            let state = ctx(updated, &format!("AdamW update of {name}"))?;
            self.state.insert(name.to_string(), state);
        }
        Ok(())
    }

    /// Writes the moments (`exp_avg.NAME`, `exp_avg_sq.NAME`), master weights (`master.NAME`) and
    /// the step to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, s) in &self.state {
            tensors.insert(format!("exp_avg.{name}"), s.exp_avg.clone());
            tensors.insert(format!("exp_avg_sq.{name}"), s.exp_avg_sq.clone());
            if let Some(m) = &s.master {
                tensors.insert(format!("master.{name}"), m.clone());
            }
        }
        let step = ctx(
            Tensor::new(&[self.step as i64], &Device::Cpu),
            "saving the step",
        )?;
        tensors.insert("step".to_string(), step);
        ctx(
            candle_core::safetensors::save(&tensors, path),
            &format!("writing {}", path.display()),
        )
    }

    /// Reads state written by [`AdamW::save`] onto `device`, with hyper-parameters `config`.
    pub fn load(path: &Path, config: AdamWConfig, device: &Device) -> Result<Self, TrainError> {
        let bad = |message: String| TrainError::BadState {
            path: path.display().to_string(),
            message,
        };
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|e| bad(e.to_string()))?;
        let step = tensors
            .get("step")
            .and_then(|t| t.to_dtype(DType::I64).ok())
            .and_then(|t| t.to_vec1::<i64>().ok())
            .and_then(|v| v.first().copied())
            .ok_or_else(|| bad("no `step` tensor".to_string()))?;
        let mut state = HashMap::new();
        for (key, m) in &tensors {
            if let Some(name) = key.strip_prefix("exp_avg.") {
                let v = tensors
                    .get(&format!("exp_avg_sq.{name}"))
                    .ok_or_else(|| bad(format!("exp_avg.{name} without exp_avg_sq.{name}")))?;
                let master = tensors.get(&format!("master.{name}")).cloned();
                state.insert(
                    name.to_string(),
                    State {
                        exp_avg: m.clone(),
                        exp_avg_sq: v.clone(),
                        master,
                    },
                );
            }
        }
        Ok(Self {
            config,
            precision: Precision::Master,
            step: step as u64,
            state,
        })
    }

    /// Checks that the state has moments of the right shape for every parameter of `params` and
    /// a master copy for each bf16/f16 one (or no state at all, before the first step).
    pub fn check_fits(
        &self,
        params: &[(String, candle_core::Var)],
        path: &Path,
    ) -> Result<(), TrainError> {
        if self.step == 0 {
            return Ok(());
        }
        let bad = |message: String| TrainError::BadState {
            path: path.display().to_string(),
            message,
        };
        for (name, var) in params {
            let Some(s) = self.state.get(name) else {
                return Err(bad(format!("no moments for parameter {name}")));
            };
            if s.exp_avg.dims() != var.dims() {
                return Err(bad(format!(
                    "moment of {name} has shape {:?}, the parameter {:?}",
                    s.exp_avg.dims(),
                    var.dims()
                )));
            }
            if needs_master(var.dtype()) && s.master.is_none() {
                return Err(bad(format!(
                    "no f32 master weights for the {:?} parameter {name}",
                    var.dtype()
                )));
            }
        }
        Ok(())
    }
}

/// Whether weights of `dtype` are updated through an f32 master copy.
fn needs_master(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The per-step constants of the update.
struct Coefficients {
    decay: f64,
    betas: (f64, f64),
    step_size: f64,
    bc2_sqrt: f64,
    eps: f64,
}

/// Updates one parameter on its device, piece by piece in place; returns its state.
fn update(
    var: &candle_core::Var,
    g: Option<&Tensor>,
    state: Option<State>,
    k: &Coefficients,
    precision: Precision,
) -> candle_core::Result<State> {
    let dtype = accumulate_dtype(var.dtype());
    let master = needs_master(var.dtype()) && precision == Precision::Master;
    let zeros = || Tensor::zeros(var.shape(), dtype, var.device());
    let state = match state {
        Some(s) => s,
        None => State {
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
            master: if master {
                Some(var.as_tensor().to_dtype(dtype)?.copy()?)
            } else {
                None
            },
        },
    };
    let weight = var.as_tensor().flatten_all()?;
    let master_flat = match &state.master {
        Some(m) if master => Some(m.flatten_all()?),
        _ => None,
    };
    let (m_flat, v_flat) = (
        state.exp_avg.flatten_all()?,
        state.exp_avg_sq.flatten_all()?,
    );
    if let (Some(g), None) = (g, &master_flat) {
        let fused = crate::fused::AdamWStep {
            decay: k.decay,
            betas: k.betas,
            step_size: k.step_size,
            bc2_sqrt: k.bc2_sqrt,
            eps: k.eps,
        };
        if crate::fused::adamw_in_place(
            var.as_tensor(),
            g,
            &state.exp_avg,
            &state.exp_avg_sq,
            &fused,
        )? {
            return Ok(state);
        }
    }
    let g_flat = g.map(|g| g.flatten_all()).transpose()?;
    let (b1, b2) = k.betas;
    for (start, len) in pieces(weight.elem_count()) {
        let p = match &master_flat {
            Some(mf) => mf.narrow(0, start, len)?,
            None => weight.narrow(0, start, len)?.to_dtype(dtype)?,
        };
        let g = match &g_flat {
            Some(g) => g.narrow(0, start, len)?.to_dtype(dtype)?,
            None => p.zeros_like()?,
        };
        let m = m_flat.narrow(0, start, len)?;
        let v = v_flat.narrow(0, start, len)?;
        let p = p.affine(k.decay, 0.0)?;
        let m = (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
        let v = (v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
        let denom = v.sqrt()?.affine(1.0 / k.bc2_sqrt, k.eps)?;
        let p = (p - (&m / denom)?.affine(k.step_size, 0.0)?)?;
        m_flat.slice_set(&m, 0, start)?;
        v_flat.slice_set(&v, 0, start)?;
        if let Some(mf) = &master_flat {
            mf.slice_set(&p, 0, start)?;
        }
        weight.slice_set(&p.to_dtype(var.dtype())?, 0, start)?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grads::PIECE;
    use candle_core::Var;

    fn grads_for(var: &Var, g: &[f64]) -> Gradients {
        // A gradient store is built by a backward pass: Σ g·p has gradient g.
        let gt = Tensor::new(g, &Device::Cpu).unwrap();
        let loss = (var.as_tensor() * gt).unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        let mut grads = Gradients::new(vec![("w".to_string(), var.clone())]);
        grads.add(&store).unwrap();
        grads
    }

    /// Two steps against values computed by hand with PyTorch's formulas.
    #[test]
    fn two_steps_match_pytorch_formulas() {
        let p0 = [1.0f64, -2.0, 0.5];
        let g1 = [0.1f64, -0.3, 0.0];
        let g2 = [-0.2f64, 0.1, 0.05];
        let var = Var::new(&p0, &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            betas: (0.9, 0.99),
            eps: 1e-3,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg);
        // Reference, written out scalar by scalar.
        let (mut p, mut m, mut v) = (p0.to_vec(), [0.0; 3], [0.0; 3]);
        for (t, g) in [g1, g2].iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..3 {
                p[i] *= 1.0 - 0.1 * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
                let bc1 = 1.0 - 0.9f64.powi(t);
                let bc2 = 1.0 - 0.99f64.powi(t);
                p[i] -= 0.1 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-3);
            }
            opt.step(&grads_for(&var, g)).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f64>().unwrap();
        for i in 0..3 {
            assert!((got[i] - p[i]).abs() < 1e-15, "{i}: {} vs {}", got[i], p[i]);
        }
        // Step 1 alone, first entry: m = 0.01, m/(1−β₁) = 0.1, √v/√(1−β₂) = 0.1,
        // so p = 1·(1 − 0.01) − 0.1 · 0.1 / (0.1 + 1e-3).
        let mut opt1 = AdamW::new(cfg);
        let var1 = Var::new(&p0, &Device::Cpu).unwrap();
        opt1.step(&grads_for(&var1, &g1)).unwrap();
        let first = var1.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!(
            (first - (0.99 - 0.1 * 0.1 / 0.101)).abs() < 1e-15,
            "{first}"
        );
    }

    /// A tensor of several pieces gets, bit for bit, the update of the whole-tensor formula.
    #[test]
    fn pieces_do_not_change_the_update() {
        let n = 2 * PIECE + 3;
        let p0 = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
        let g = Tensor::randn(0f32, 1e-2, n, &Device::Cpu).unwrap();
        let var = Var::from_tensor(&p0).unwrap();
        let cfg = AdamWConfig::default();
        let mut opt = AdamW::new(cfg);
        let (mut p, mut m, mut v) = (
            p0.copy().unwrap(),
            g.zeros_like().unwrap(),
            g.zeros_like().unwrap(),
        );
        let (b1, b2) = cfg.betas;
        for t in 1..=2 {
            let loss = (var.as_tensor() * &g).unwrap().sum_all().unwrap();
            let mut grads = Gradients::new(vec![("w".to_string(), var.clone())]);
            grads.add(&loss.backward().unwrap()).unwrap();
            opt.step(&grads).unwrap();
            let step_size = cfg.lr / (1.0 - b1.powi(t));
            let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
            p = p.affine(1.0 - cfg.lr * cfg.weight_decay, 0.0).unwrap();
            m = (m.affine(b1, 0.0).unwrap() + g.affine(1.0 - b1, 0.0).unwrap()).unwrap();
            v = (v.affine(b2, 0.0).unwrap() + g.sqr().unwrap().affine(1.0 - b2, 0.0).unwrap())
                .unwrap();
            let denom = v.sqrt().unwrap().affine(1.0 / bc2_sqrt, cfg.eps).unwrap();
            p = (p - (&m / denom).unwrap().affine(step_size, 0.0).unwrap()).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(got, p.to_vec1::<f32>().unwrap());
        assert_ne!(got, p0.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn state_round_trips_through_safetensors() {
        let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        let g = Gradients::new(vec![("w".to_string(), var.clone())]);
        opt.step(&g).unwrap();
        let dir = std::env::temp_dir().join(format!("em-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optimizer.safetensors");
        opt.save(&path).unwrap();
        let back = AdamW::load(&path, AdamWConfig::default(), &Device::Cpu).unwrap();
        assert_eq!(back.step_count(), 1);
        back.check_fits(&[("w".to_string(), var)], &path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// With the same gradients, a bf16 weight's master copy follows exactly the f32 weight's path,
    /// and the stored bf16 weight is its rounding; rounded in place, steps of 1e-5 are lost.
    #[test]
    fn master_weights_take_the_f32_update_exactly() {
        let p0 = [0.5f32, -0.25, 1.0, 0.0078125];
        let g = Tensor::new(&[0.3f32, -0.1, 0.0, 2.0], &Device::Cpu).unwrap();
        let config = AdamWConfig {
            lr: 1e-5,
            ..AdamWConfig::default()
        };
        let run = |dtype: DType, precision: Precision| {
            let var = Var::from_tensor(
                &Tensor::new(&p0, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let mut opt = AdamW::with_precision(config, precision);
            for _ in 0..5 {
                let loss = (var.as_tensor().to_dtype(DType::F32).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let mut grads = Gradients::new(vec![("w".to_string(), var.clone())]);
                grads.add(&loss.backward().unwrap()).unwrap();
                opt.step(&grads).unwrap();
            }
            (var, opt)
        };
        let (full, _) = run(DType::F32, Precision::Master);
        let (half, opt) = run(DType::BF16, Precision::Master);
        let (plain, _) = run(DType::BF16, Precision::PlainRounding);
        let full = full.as_tensor().to_vec1::<f32>().unwrap();
        let master = opt.master("w").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(master, full);
        let stored = half
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rounded: Vec<f32> = full
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(stored, rounded);
        let plain = plain
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            plain, p0,
            "5 steps of 1e-5 are below half a bf16 ulp of these weights"
        );
        assert_ne!(full, p0);
    }
}
