//! Softmax over the last dimension.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::{contiguous, par_rows};

/// Softmax over the last dimension. On the CPU in f32/f64 one pass per row forward (max, exp,
/// sum, scale) and one backward (`y ⊙ (g − ⟨g, y⟩)`), rows spread over candle's thread pool;
/// candle-nn's composed softmax (five passes, four temporaries; its backward more) elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(SoftmaxLastDim)
}

struct SoftmaxLastDim;
struct SoftmaxBackward;

macro_rules! softmax_kernels {
    ($fwd:ident, $bwd:ident, $t:ty) => {
        fn $fwd(x: &[$t], n: usize) -> Vec<$t> {
            par_rows(x.len(), n, |r, y: &mut [$t]| {
                let row = &x[r * n..(r + 1) * n];
                let max = row.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max);
                let mut sum = 0.0 as $t;
                for (y, &v) in y.iter_mut().zip(row) {
                    *y = (v - max).exp();
                    sum += *y;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|y| *y *= inv);
            })
        }

        fn $bwd(y: &[$t], g: &[$t], n: usize) -> Vec<$t> {
            par_rows(y.len(), n, |r, dx: &mut [$t]| {
                let (yr, gr) = (&y[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
                let dot: $t = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((d, &yv), &gv) in dx.iter_mut().zip(yr).zip(gr) {
                    *d = yv * (gv - dot);
                }
            })
        }
    };
}

softmax_kernels!(softmax_f32, softmax_bwd_f32, f32);
softmax_kernels!(softmax_f64, softmax_bwd_f64, f64);

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = layout.shape().dims().last().copied().unwrap_or(1);
        let out = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(softmax_f32(contiguous(v, layout, "softmax")?, n))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(softmax_f64(contiguous(v, layout, "softmax")?, n))
            }
            _ => candle_core::bail!("softmax-last-dim: f32 and f64 only"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-last-dim-backward"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        y_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if y_layout.shape() != g_layout.shape() {
            candle_core::bail!(
                "softmax backward: {:?} against {:?}",
                y_layout.shape(),
                g_layout.shape()
            );
        }
        let n = y_layout.shape().dims().last().copied().unwrap_or(1);
        let name = "softmax backward";
        let out = match (y, g) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(softmax_bwd_f32(
                contiguous(y, y_layout, name)?,
                contiguous(g, g_layout, name)?,
                n,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(softmax_bwd_f64(
                contiguous(y, y_layout, name)?,
                contiguous(g, g_layout, name)?,
                n,
            )),
            _ => candle_core::bail!("softmax backward: f32 or f64, both the same"),
        };
        Ok((out, y_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::max_diff;
    use candle_core::{Device, Var};

    /// Scores with a causal −∞ mask, as attention hands them over.
    fn scores(dtype: DType) -> Result<Tensor> {
        let x = Tensor::randn(0f64, 2.0, (2, 3, 7, 7), &Device::Cpu)?.to_dtype(dtype)?;
        let mask = crate::layers::attention_mask(7, None, dtype, &Device::Cpu)?;
        x.broadcast_add(&mask)
    }

    #[test]
    fn forward_and_gradient_equal_the_composed_softmax() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-14)] {
            let x = Var::from_tensor(&scores(dtype)?)?;
            let w = Tensor::randn(0f64, 1.0, (2, 3, 7, 7), &Device::Cpu)?.to_dtype(dtype)?;
            let fused = softmax_last_dim(x.as_tensor())?;
            let composed = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
            assert!(max_diff(&fused, &composed)? < tol, "{dtype:?} forward");
            let g_fused = (fused * &w)?.sum_all()?.backward()?;
            let g_composed = (composed * &w)?.sum_all()?.backward()?;
            let (a, b) = (g_fused.get(&x).unwrap(), g_composed.get(&x).unwrap());
            assert!(max_diff(a, b)? < tol, "{dtype:?} gradient");
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_in_f64() -> Result<()> {
        let x0 = scores(DType::F64)?;
        let w = Tensor::randn(0f64, 1.0, (2, 3, 7, 7), &Device::Cpu)?;
        let loss = |x: &Tensor| -> Result<f64> {
            (softmax_last_dim(x)? * &w)?.sum_all()?.to_scalar::<f64>()
        };
        let x = Var::from_tensor(&x0)?;
        let grads = (softmax_last_dim(x.as_tensor())? * &w)?
            .sum_all()?
            .backward()?;
        let analytic: Vec<f64> = grads.get(&x).unwrap().flatten_all()?.to_vec1()?;
        let values: Vec<f64> = x0.flatten_all()?.to_vec1()?;
        let h = 1e-6;
        for i in (0..values.len())
            .step_by(5)
            .filter(|&i| values[i].is_finite())
        {
            let bump = |d: f64| -> Result<f64> {
                let mut v = values.clone();
                v[i] += d;
                loss(&Tensor::from_vec(v, x0.shape(), &Device::Cpu)?)
            };
            let numeric = (bump(h)? - bump(-h)?) / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-7,
                "element {i}: {numeric} vs {}",
                analytic[i]
            );
        }
        Ok(())
    }

    #[test]
    fn rows_that_mask_all_but_one_key_put_all_weight_on_it() -> Result<()> {
        let y = softmax_last_dim(&scores(DType::F32)?)?;
        let first: Vec<f32> = y.narrow(2, 0, 1)?.flatten_all()?.to_vec1()?;
        for row in first.chunks(7) {
            assert_eq!(row[0], 1.0);
            assert!(row[1..].iter().all(|&v| v == 0.0));
        }
        Ok(())
    }
}
