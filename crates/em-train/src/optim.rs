//! AdamW exactly as PyTorch's `torch.optim.AdamW` (single-tensor path) computes it, with its state
//! saved to and restored from safetensors so that a resumed run continues bit for bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::objective::{accumulate_dtype, ctx, Gradients, TrainError};

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

/// AdamW's state: the step count and both moments of every parameter (by HF name).
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    step: u64,
    moments: HashMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// Fresh state: step 0, zero moments.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Updates taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of every parameter of `grads` (a parameter without a gradient gets a zero one,
    /// as PyTorch skips only parameters whose `.grad` is None; every parameter here gets one):
    ///
    /// `p ← p(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
    pub fn step(&mut self, grads: &Gradients) -> Result<(), TrainError> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.betas.0.powi(t);
        let bc2_sqrt = (1.0 - c.betas.1.powi(t)).sqrt();
        let step_size = c.lr / bc1;
        for (name, var, g) in grads.iter() {
            let moments = self.moments.remove(name);
            let k = Coefficients {
                decay: 1.0 - c.lr * c.weight_decay,
                betas: c.betas,
                step_size,
                bc2_sqrt,
                eps: c.eps,
            };
            let updated = match accumulate_dtype(var.dtype()) {
                DType::F64 => update_typed::<f64>(var, g, moments, &k),
                _ => update_typed::<f32>(var, g, moments, &k),
            };
            let mv = ctx(updated, &format!("AdamW update of {name}"))?;
            self.moments.insert(name.to_string(), mv);
        }
        Ok(())
    }

    /// Writes the moments (`exp_avg.NAME`, `exp_avg_sq.NAME`) and the step to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, (m, v)) in &self.moments {
            tensors.insert(format!("exp_avg.{name}"), m.clone());
            tensors.insert(format!("exp_avg_sq.{name}"), v.clone());
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
        let mut moments = HashMap::new();
        for (key, m) in &tensors {
            if let Some(name) = key.strip_prefix("exp_avg.") {
                let v = tensors
                    .get(&format!("exp_avg_sq.{name}"))
                    .ok_or_else(|| bad(format!("exp_avg.{name} without exp_avg_sq.{name}")))?;
                moments.insert(name.to_string(), (m.clone(), v.clone()));
            }
        }
        Ok(Self {
            config,
            step: step as u64,
            moments,
        })
    }

    /// Checks that the state has a moment of the right shape for every parameter of `grads`
    /// (or none at all, before the first step).
    pub fn check_fits(
        &self,
        params: &[(String, candle_core::Var)],
        path: &Path,
    ) -> Result<(), TrainError> {
        if self.step == 0 {
            return Ok(());
        }
        for (name, var) in params {
            match self.moments.get(name) {
                Some((m, _)) if m.dims() == var.dims() => {}
                Some((m, _)) => {
                    return Err(TrainError::BadState {
                        path: path.display().to_string(),
                        message: format!(
                            "moment of {name} has shape {:?}, the parameter {:?}",
                            m.dims(),
                            var.dims()
                        ),
                    })
                }
                None => {
                    return Err(TrainError::BadState {
                        path: path.display().to_string(),
                        message: format!("no moments for parameter {name}"),
                    })
                }
            }
        }
        Ok(())
    }
}

/// The per-step constants of the update.
struct Coefficients {
    decay: f64,
    betas: (f64, f64),
    step_size: f64,
    bc2_sqrt: f64,
    eps: f64,
}

/// Element types moments are kept in; arithmetic is done in f64 and rounded once.
trait Elem: candle_core::WithDType {
    fn to64(self) -> f64;
    fn from64(x: f64) -> Self;
}

impl Elem for f32 {
    fn to64(self) -> f64 {
        self as f64
    }
    fn from64(x: f64) -> Self {
        x as f32
    }
}

impl Elem for f64 {
    fn to64(self) -> f64 {
        self
    }
    fn from64(x: f64) -> Self {
        x
    }
}

/// Updates one parameter in a single pass over its values; returns its new moments.
fn update_typed<T: Elem>(
    var: &candle_core::Var,
    g: Option<&Tensor>,
    moments: Option<(Tensor, Tensor)>,
    k: &Coefficients,
) -> candle_core::Result<(Tensor, Tensor)> {
    let shape = var.shape().clone();
    let device = var.device().clone();
    let flat = |t: &Tensor| -> candle_core::Result<Vec<T>> {
        t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()
    };
    let mut p = flat(var.as_tensor())?;
    let n = p.len();
    let g = match g {
        Some(g) => flat(g)?,
        None => vec![T::from64(0.0); n],
    };
    let (mut m, mut v) = match moments {
        Some((m, v)) => (flat(&m)?, flat(&v)?),
        None => (vec![T::from64(0.0); n], vec![T::from64(0.0); n]),
    };
    let (b1, b2) = k.betas;
    for i in 0..n {
        let gi = g[i].to64();
        let mi = b1 * m[i].to64() + (1.0 - b1) * gi;
        let vi = b2 * v[i].to64() + (1.0 - b2) * gi * gi;
        let denom = vi.sqrt() / k.bc2_sqrt + k.eps;
        p[i] = T::from64(p[i].to64() * k.decay - k.step_size * mi / denom);
        m[i] = T::from64(mi);
        v[i] = T::from64(vi);
    }
    var.set(&Tensor::from_vec(p, shape.clone(), &device)?.to_dtype(var.dtype())?)?;
    Ok((
        Tensor::from_vec(m, shape.clone(), &device)?,
        Tensor::from_vec(v, shape, &device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
