//! The EM objective's per-row entropy of a chunk of LM-head logits and its gradient in one kernel:
//! three sweeps over each `[V]` row while it sits in cache, where the composed op makes about a
//! dozen passes over the whole `[rows, V]` chunk and keeps several of its temporaries alive.

use candle_core::{DType, Result, Tensor};

use super::{cpu_tensor, fusable, with_values, Real, Rows};

/// For `logits` `[n, V]` at temperature τ, with `s = z/τ` and `p = softmax(s)`: the sum over rows
/// of the entropy `H = log Σ exp(s) − E_p[s]`, the sum over rows of the largest logit, and
/// `scale · ∂(Σ H)/∂z = −scale · (p/τ)(s − E_p[s])` as `[n, V]` in the logits' dtype.
///
/// `None` off the CPU and for dtypes other than f32/f64: the caller composes the op there.
pub fn entropy_rows(
    logits: &Tensor,
    temperature: f64,
    scale: f64,
) -> Result<Option<(f64, f64, Tensor)>> {
    if !fusable(logits) {
        return Ok(None);
    }
    let (n, v) = logits.dims2()?;
    if temperature.is_nan() || temperature <= 0.0 {
        candle_core::bail!("entropy: temperature {temperature} is not positive");
    }
    let logits = logits.contiguous()?;
    match logits.dtype() {
        DType::F32 => rows_as::<f32>(&logits, (n, v), temperature, scale).map(Some),
        DType::F64 => rows_as::<f64>(&logits, (n, v), temperature, scale).map(Some),
        dtype => candle_core::bail!("entropy: {dtype:?} is not fused"),
    }
}

fn rows_as<T: Real>(
    logits: &Tensor,
    (n, v): (usize, usize),
    temperature: f64,
    scale: f64,
) -> Result<(f64, f64, Tensor)> {
    let (grad, entropies, maxima) = with_values::<T, _>(&[logits], "entropy", |z| {
        Ok(kernel(z[0], v, temperature, scale))
    })?;
    Ok((
        entropies.iter().sum(),
        maxima.iter().sum(),
        cpu_tensor(grad, (n, v))?,
    ))
}

/// The gradient rows and each row's entropy and largest logit (in f64).
fn kernel<T: Real>(
    z: &[T],
    v: usize,
    temperature: f64,
    scale: f64,
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let n = z.len().checked_div(v).unwrap_or(0);
    let mut entropies = vec![0f64; n];
    let mut maxima = vec![0f64; n];
    let (h_out, m_out) = (Rows(entropies.as_mut_ptr()), Rows(maxima.as_mut_ptr()));
    let inv_t = T::from(1.0 / temperature).unwrap_or_else(T::one);
    let coef = T::from(-scale / temperature).unwrap_or_else(T::zero);
    let grad = super::par_rows(z.len(), v, |r, g: &mut [T]| {
        let row = &z[r * v..(r + 1) * v];
        let (h, max) = super::vectorized(
            #[inline(always)]
            || {
                let max = super::max_of(row, |x| x);
                // g holds exp(s − max s) until the last sweep; sums in f64 over the vocabulary.
                for (e, &x) in g.iter_mut().zip(row) {
                    *e = ((x - max) * inv_t).exp_fast();
                }
                let sum = super::sum_f64(g, |e| e);
                // E_p[s − max s].
                let mean_shifted = super::sum2_f64(g, row, |e, x| e * ((x - max) * inv_t)) / sum;
                let (inv_sum, mean) = (
                    T::from(1.0 / sum).unwrap_or_else(T::zero),
                    T::from(mean_shifted).unwrap_or_else(T::zero),
                );
                for (e, &x) in g.iter_mut().zip(row) {
                    *e = coef * *e * inv_sum * ((x - max) * inv_t - mean);
                }
                (sum.ln() - mean_shifted, max)
            },
        );
        // SAFETY: entry r of each per-row output belongs to this row alone.
        unsafe {
            h_out.row(r, 1)[0] = h;
            m_out.row(r, 1)[0] = max.to_f64();
        }
    });
    (grad, entropies, maxima)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::max_diff;
    use candle_core::{Device, D};

    /// The composed computation the objective runs off the CPU.
    fn composed(z: &Tensor, t: f64, scale: f64) -> Result<(f64, f64, Tensor)> {
        let (h, g) = crate::objective::entropy_sum_and_grad_composed(z, t)?;
        let max = z
            .max(D::Minus1)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let h = h.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok((h, max, g.affine(scale, 0.0)?))
    }

    #[test]
    fn values_and_gradient_equal_the_composed_op() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            let z = (Tensor::randn(0f64, 4.0, (37, 3001), &Device::Cpu)? + 2.0)?.to_dtype(dtype)?;
            for t in [0.5, 1.0] {
                let (h, m, g) = entropy_rows(&z, t, 0.01)?.expect("fused on the CPU");
                let (hc, mc, gc) = composed(&z, t, 0.01)?;
                assert!(
                    (h - hc).abs() < tol * hc.abs(),
                    "{dtype:?} τ {t}: H {h} vs {hc}"
                );
                assert!(
                    (m - mc).abs() < tol * mc.abs(),
                    "{dtype:?}: max {m} vs {mc}"
                );
                assert_eq!(g.dtype(), dtype);
                assert!(max_diff(&g, &gc)? < tol * 1e-2, "{dtype:?} τ {t}: gradient");
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_in_f64() -> Result<()> {
        let z0 = Tensor::randn(0f64, 3.0, (3, 50), &Device::Cpu)?;
        let (_, _, g) = entropy_rows(&z0, 0.7, 1.0)?.expect("fused");
        let analytic: Vec<f64> = g.flatten_all()?.to_vec1()?;
        let values: Vec<f64> = z0.flatten_all()?.to_vec1()?;
        let h = 1e-6;
        for i in (0..values.len()).step_by(7) {
            let bump = |d: f64| -> Result<f64> {
                let mut v = values.clone();
                v[i] += d;
                let z = Tensor::from_vec(v, z0.shape(), &Device::Cpu)?;
                Ok(entropy_rows(&z, 0.7, 1.0)?.expect("fused").0)
            };
            let numeric = (bump(h)? - bump(-h)?) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-8,
                "element {i}: {numeric} vs {}",
                analytic[i]
            );
        }
        Ok(())
    }

    #[test]
    fn a_non_positive_temperature_is_refused() -> Result<()> {
        let z = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let err = entropy_rows(&z, 0.0, 1.0).unwrap_err().to_string();
        assert!(err.contains("temperature"), "{err}");
        Ok(())
    }
}
