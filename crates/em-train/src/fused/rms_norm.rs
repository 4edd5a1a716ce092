//! RMS normalisation over the last dimension with its own backward pass.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::{contiguous, cpu_tensor, fusable, par_rows, with_values, Fused2, Kernel2, Real, Rows};

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension `n` of `x`, with `w` the `[n]`
/// `weight`, or `1 + weight` when `unit_offset` (Gemma).
///
/// `None` off the CPU and for dtypes other than f32/f64: the caller composes the op there.
pub fn rms_norm(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    unit_offset: bool,
) -> Result<Option<Tensor>> {
    if !fusable(x) {
        return Ok(None);
    }
    let Some(&n) = x.dims().last() else {
        candle_core::bail!("rms norm: x is a scalar");
    };
    if weight.dims() != [n] {
        candle_core::bail!(
            "rms norm: weight {:?} does not fit x {:?}",
            weight.dims(),
            x.dims()
        );
    }
    if weight.dtype() != x.dtype() {
        candle_core::bail!(
            "rms norm: x is {:?}, weight {:?}",
            x.dtype(),
            weight.dtype()
        );
    }
    let op = RmsNorm { eps, unit_offset };
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Fused2(op))
        .map(Some)
}

/// `1 / sqrt(mean(row²) + eps)`.
#[inline(always)]
fn inv_rms<T: Real>(row: &[T], eps: T) -> T {
    let sq = T::from(super::sum_f64(row, |v| v * v)).unwrap_or_else(T::nan);
    let n = T::from(row.len()).unwrap_or_else(T::one);
    (sq / n + eps).sqrt().recip()
}

/// The normalised rows of `x`, scaled by `w` (the effective weight, offset applied).
fn forward<T: Real>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    let n = w.len();
    par_rows(x.len(), n, |r, y: &mut [T]| {
        let row = &x[r * n..(r + 1) * n];
        super::vectorized(
            #[inline(always)]
            || {
                let inv = inv_rms(row, eps);
                for ((y, &v), &w) in y.iter_mut().zip(row).zip(w) {
                    *y = v * inv * w;
                }
            },
        )
    })
}

/// The gradient of x and, when `want_dw`, of the weight, from the output's gradient `g`.
fn backward<T: Real>(x: &[T], w: &[T], g: &[T], eps: T, want_dw: bool) -> (Vec<T>, Option<Vec<T>>) {
    let n = w.len();
    let rows = x.len().checked_div(n).unwrap_or(0);
    let mut dx = vec![T::zero(); x.len()];
    let dx_ptr = Rows(dx.as_mut_ptr());
    // Each chunk's share of the weight's gradient, keyed by its first row so the sum below runs
    // in the same order every time.
    let partials = Mutex::new(Vec::new());
    let inv_n = T::from(n).unwrap_or_else(T::one).recip();
    super::for_chunks(rows, n, |range| {
        let mut dw = vec![T::zero(); if want_dw { n } else { 0 }];
        let first = range.start;
        super::vectorized(
            #[inline(always)]
            || {
                let mut gw = vec![T::zero(); n];
                for r in range {
                    let (xr, gr) = (&x[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
                    let inv = inv_rms(xr, eps);
                    // Σ g·w·x over the row, with w folded into g first.
                    for ((gw, &gv), &wv) in gw.iter_mut().zip(gr).zip(w) {
                        *gw = gv * wv;
                    }
                    let dot = T::from(super::sum2_f64(&gw, xr, |a, b| a * b))
                        .unwrap_or_else(T::nan)
                        * inv
                        * inv_n;
                    // SAFETY: each row index is handed to exactly one call, rows do not
                    // overlap, and `dx` outlives the pool's execution.
                    let out = unsafe { dx_ptr.row(r, n) };
                    for ((d, &xv), &gwv) in out.iter_mut().zip(xr).zip(&gw) {
                        *d = inv * (gwv - xv * inv * dot);
                    }
                    for ((acc, &xv), &gv) in dw.iter_mut().zip(xr).zip(gr) {
                        *acc += gv * xv * inv;
                    }
                }
            },
        );
        if want_dw {
            let mut partials = partials.lock().unwrap_or_else(PoisonError::into_inner);
            partials.push((first, dw));
        }
    });
    if !want_dw {
        return (dx, None);
    }
    let mut partials = partials
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    partials.sort_unstable_by_key(|(first, _)| *first);
    let mut dw = vec![T::zero(); n];
    for (_, part) in &partials {
        for (acc, &v) in dw.iter_mut().zip(part) {
            *acc += v;
        }
    }
    (dx, Some(dw))
}

struct RmsNorm {
    eps: f64,
    unit_offset: bool,
}

impl RmsNorm {
    fn eps<T: Real>(&self) -> T {
        T::from(self.eps).unwrap_or_else(T::zero)
    }

    /// The weight the rows are multiplied by: `weight`, or `1 + weight` with the unit offset.
    fn scales<T: Real>(&self, weight: &[T]) -> Vec<T> {
        let offset = if self.unit_offset {
            T::one()
        } else {
            T::zero()
        };
        weight.iter().map(|&w| offset + w).collect()
    }
}

impl Kernel2 for RmsNorm {
    const NAME: &'static str = "rms norm";

    fn forward<T: Real>(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (w, lw): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let name = "rms norm";
        let x = contiguous(x.as_slice::<T>()?, lx, name)?;
        let w = contiguous(w.as_slice::<T>()?, lw, name)?;
        let out = forward(x, &self.scales(w), self.eps());
        Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
    }

    fn backward<T: Real>(
        &self,
        x: &Tensor,
        weight: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (eps, want_dw) = (self.eps(), weight.is_variable() || weight.track_op());
        let (dx, dw) = with_values::<T, _>(&[x, weight, g], "rms norm backward", |v| {
            Ok(backward(v[0], &self.scales(v[1]), v[2], eps, want_dw))
        })?;
        let dw = dw.map(|dw| cpu_tensor(dw, weight.shape())).transpose()?;
        Ok((Some(cpu_tensor(dx, x.shape())?), dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::rel_diff;
    use crate::layers::RmsNorm as Composed;
    use candle_core::DType;
    use candle_core::{Device, Var};

    fn composed(x: &Tensor, w: &Tensor, unit_offset: bool) -> Result<Tensor> {
        let norm = if unit_offset {
            Composed::new_unit_offset(w.clone(), 1e-5)
        } else {
            Composed::new(w.clone(), 1e-5)
        };
        norm.forward_composed(x)
    }

    /// x `[3, 100, 41]` (300 rows), a weight `[41]` and a weight on the output, random.
    fn inputs(dtype: DType) -> Result<[Tensor; 3]> {
        let r = |shape: &[usize]| Tensor::randn(0f64, 1.0, shape, &Device::Cpu)?.to_dtype(dtype);
        Ok([r(&[3, 100, 41])?, r(&[41])?, r(&[3, 100, 41])?])
    }

    #[test]
    fn forward_and_gradients_equal_the_composed_norm() -> Result<()> {
        for unit_offset in [false, true] {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
                let [x, w, out_w] = inputs(dtype)?;
                let (x, w) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
                let fused = rms_norm(&x, &w, 1e-5, unit_offset)?.expect("fused on the CPU");
                let reference = composed(&x, &w, unit_offset)?;
                let what = format!("{dtype:?} unit offset {unit_offset}");
                assert!(rel_diff(&fused, &reference)? < tol, "{what} forward");
                let gf = (fused * &out_w)?.sum_all()?.backward()?;
                let gr = (reference * &out_w)?.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("weight", &w)] {
                    let (a, b) = (gf.get(v).unwrap(), gr.get(v).unwrap());
                    assert!(rel_diff(a, b)? < tol, "{what} d{name}: {}", rel_diff(a, b)?);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_constant_weight_gets_no_gradient() -> Result<()> {
        let [x, w, out_w] = inputs(DType::F64)?;
        let x = Var::from_tensor(&x)?;
        let fused = rms_norm(&x, &w, 1e-5, false)?.expect("fused on the CPU");
        let grads = (fused * &out_w)?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none());
        let reference = (composed(&x, &w, false)? * &out_w)?.sum_all()?.backward()?;
        assert!(rel_diff(grads.get(&x).unwrap(), reference.get(&x).unwrap())? < 1e-12);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_in_f64() -> Result<()> {
        for unit_offset in [false, true] {
            let [x, w, out_w] = inputs(DType::F64)?;
            let out = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
                Ok(rms_norm(x, w, 1e-5, unit_offset)?.expect("fused"))
            };
            let vars = [Var::from_tensor(&x)?, Var::from_tensor(&w)?];
            let grads = (out(&vars[0], &vars[1])? * &out_w)?.sum_all()?.backward()?;
            let h = 1e-6;
            for (which, step) in [(0, 97), (1, 3)] {
                let analytic: Vec<f64> =
                    grads.get(&vars[which]).unwrap().flatten_all()?.to_vec1()?;
                let base = [&x, &w][which];
                let values: Vec<f64> = base.flatten_all()?.to_vec1()?;
                for i in (0..values.len()).step_by(step) {
                    let bump = |delta: f64| -> Result<Tensor> {
                        let mut moved = values.clone();
                        moved[i] += delta;
                        let mut args = [x.clone(), w.clone()];
                        args[which] = Tensor::from_vec(moved, base.shape(), &Device::Cpu)?;
                        out(&args[0], &args[1])
                    };
                    // The outputs' difference first: the loss's rounding would swamp 1e-7.
                    let diff = ((bump(h)? - bump(-h)?)? * &out_w)?.sum_all()?;
                    let numeric = diff.to_scalar::<f64>()? / (2.0 * h);
                    assert!(
                        (numeric - analytic[i]).abs() < 1e-7 * (1.0 + numeric.abs()),
                        "unit offset {unit_offset} input {which} element {i}: {numeric} vs {}",
                        analytic[i]
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_weight_of_the_wrong_width_is_refused() -> Result<()> {
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let err = rms_norm(&x, &w, 1e-6, false).unwrap_err().to_string();
        assert!(err.contains("rms norm: weight"), "{err}");
        Ok(())
    }
}
