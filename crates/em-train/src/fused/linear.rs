//! A dense layer's product `x·Wᵀ` with its own backward pass: the weight's gradient `gᵀ·x` is
//! formed directly as `[out, in]`, where candle's matmul backward forms `[in, out]` and adds it
//! through the transpose (a strided pass and a weight-sized temporary per projection). The
//! forward pass can also hand back a product recorded earlier for the same input instead of
//! computing it again (the recomputation of a layer for its backward pass), and the backward pass
//! can add the weight's gradient straight into the update's accumulator (a sink) instead of
//! handing it to candle, which would zero a weight-sized tensor, add the gradient to it, and leave
//! the sum to be added to the accumulator once more.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::{contiguous, cpu_tensor, fusable, with_values, Fused2, Kernel2, Real};

/// `x·wᵀ` for `x` `[rows, in]` and `w` `[out, in]`, as `[rows, out]`; with `recorded`, the
/// product an earlier pass computed for this same `x` and `w` (`[rows, out]`), copied instead of
/// computed. Gradients flow to both operands; with `sink` (`w`'s shape and dtype, contiguous), the
/// backward pass adds `w`'s gradient to it in place and hands candle none for `w`.
///
/// `None` off the CPU and for dtypes other than f32/f64: the caller composes the op there.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    recorded: Option<&Tensor>,
    sink: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !fusable(x) {
        return Ok(None);
    }
    let (rows, k) = x.dims2()?;
    let (out, wk) = w.dims2()?;
    if wk != k || w.dtype() != x.dtype() {
        candle_core::bail!(
            "linear: x {:?} {:?} does not fit w {:?} {:?}",
            x.dims(),
            x.dtype(),
            w.dims(),
            w.dtype()
        );
    }
    if let Some(r) = recorded {
        if r.dims() != [rows, out] || r.dtype() != x.dtype() {
            candle_core::bail!(
                "linear: a recorded product {:?} for x {:?} and w {:?}",
                r.dims(),
                x.dims(),
                w.dims()
            );
        }
    }
    if let Some(acc) = sink {
        if acc.dims() != w.dims() || acc.dtype() != w.dtype() || !acc.is_contiguous() {
            candle_core::bail!(
                "linear: a gradient sink {:?} {:?} for w {:?} {:?}",
                acc.dims(),
                acc.dtype(),
                w.dims(),
                w.dtype()
            );
        }
    }
    let op = Linear {
        recorded: recorded.map(|r| r.detach()),
        sink: sink.cloned(),
    };
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Fused2(op))
        .map(Some)
}

struct Linear {
    recorded: Option<Tensor>,
    sink: Option<Tensor>,
}

/// `dst[m, n] = lhs[m, k]·rhs[k, n]`, operands as (values, row stride, column stride), over
/// candle's thread count.
fn product<T: Real>(
    (m, n, k): (usize, usize, usize),
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
) -> Vec<T> {
    let mut dst = vec![T::zero(); m * n];
    let parallelism = super::gemm_parallelism();
    // SAFETY: the callers pass operands whose strides address `m·k` and `k·n` values inside
    // their slices; dst holds m·n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    };
    dst
}

impl Kernel2 for Linear {
    const NAME: &'static str = "linear";

    fn forward<T: Real>(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (w, lw): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = lx.shape().dims2()?;
        let out = lw.shape().dims2()?.0;
        if let Some(r) = &self.recorded {
            let values = r.flatten_all()?.to_vec1::<T>()?;
            return Ok((T::to_cpu_storage_owned(values), (rows, out).into()));
        }
        let (x, w) = (
            contiguous(x.as_slice::<T>()?, lx, "linear")?,
            contiguous(w.as_slice::<T>()?, lw, "linear")?,
        );
        // wᵀ[i, j] = w[j, i]: row stride 1, column stride k.
        let y = product((rows, out, k), (x, k, 1), (w, 1, k));
        Ok((T::to_cpu_storage_owned(y), (rows, out).into()))
    }

    fn backward<T: Real>(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, k) = x.dims2()?;
        let out = w.dim(0)?;
        let trains_w = w.is_variable() || w.track_op();
        if let (Some(acc), true) = (&self.sink, trains_w) {
            crate::accumulate::add_transposed_product(acc, g, x)?;
        }
        let trains_w = trains_w && self.sink.is_none();
        let (dx, dw) = with_values::<T, _>(&[x, w, g], "linear backward", |v| {
            let (x, w, g) = (v[0], v[1], v[2]);
            let dx = product((rows, k, out), (g, out, 1), (w, k, 1));
            // gᵀ[i, r] = g[r, i]: row stride 1, column stride out.
            let dw = trains_w.then(|| product((out, k, rows), (g, 1, out), (x, k, 1)));
            Ok((dx, dw))
        })?;
        Ok((
            Some(cpu_tensor(dx, (rows, k))?),
            dw.map(|dw| cpu_tensor(dw, (out, k))).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::max_diff;
    use candle_core::DType;
    use candle_core::{Device, Var};

    fn inputs(dtype: DType) -> Result<[Tensor; 3]> {
        let r =
            |shape: (usize, usize)| Tensor::randn(0f64, 1.0, shape, &Device::Cpu)?.to_dtype(dtype);
        Ok([r((37, 29))?, r((23, 29))?, r((37, 23))?])
    }

    #[test]
    fn product_and_gradients_equal_candles_matmul() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-12)] {
            let [x, w, out_w] = inputs(dtype)?;
            let (x, w) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
            let fused = linear(&x, &w, None, None)?.expect("fused on the CPU");
            let composed = x.matmul(&w.t()?)?;
            assert!(max_diff(&fused, &composed)? < tol, "{dtype:?} forward");
            let gf = (fused * &out_w)?.sum_all()?.backward()?;
            let gc = (composed * &out_w)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &w)] {
                let (a, b) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b)? < tol, "{dtype:?} d{name}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_recorded_product_is_replayed_with_the_same_gradients() -> Result<()> {
        let [x, w, out_w] = inputs(DType::F64)?;
        let (x, w) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
        let computed = linear(&x, &w, None, None)?.expect("fused");
        // A marked recording proves the forward pass copies it rather than recomputing.
        let marked = (computed.detach() + 1.0)?;
        let replayed = linear(&x, &w, Some(&marked), None)?.expect("fused");
        assert_eq!(max_diff(&replayed, &marked)?, 0.0);
        let ga = (computed * &out_w)?.sum_all()?.backward()?;
        let gb = (replayed * &out_w)?.sum_all()?.backward()?;
        for v in [&x, &w] {
            assert_eq!(max_diff(ga.get(v).unwrap(), gb.get(v).unwrap())?, 0.0);
        }
        let wrong = Tensor::zeros((36, 23), DType::F64, &Device::Cpu)?;
        let err = linear(&x, &w, Some(&wrong), None).unwrap_err().to_string();
        assert!(err.contains("recorded product"), "{err}");
        Ok(())
    }

    #[test]
    fn a_sink_receives_the_weight_gradient_in_place() -> Result<()> {
        let [x, w, out_w] = inputs(DType::F32)?;
        let (x, w) = (Var::from_tensor(&x)?, Var::from_tensor(&w)?);
        let plain = (linear(&x, &w, None, None)?.expect("fused") * &out_w)?
            .sum_all()?
            .backward()?;
        let before = Tensor::randn(0f32, 1.0, w.shape(), &Device::Cpu)?;
        let sink = before.copy()?;
        let sunk = (linear(&x, &w, None, Some(&sink))?.expect("fused") * &out_w)?
            .sum_all()?
            .backward()?;
        assert!(sunk.get(&w).is_none(), "candle gets no gradient for w");
        let added = (&sink - &before)?;
        assert!(max_diff(&added, plain.get(&w).unwrap())? < 1e-5);
        assert_eq!(
            max_diff(sunk.get(&x).unwrap(), plain.get(&x).unwrap())?,
            0.0
        );
        let wrong = Tensor::zeros((29, 23), DType::F32, &Device::Cpu)?;
        let err = linear(&x, &w, None, Some(&wrong)).unwrap_err().to_string();
        assert!(err.contains("gradient sink"), "{err}");
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_in_f64() -> Result<()> {
        let [x0, w0, out_w] = inputs(DType::F64)?;
        let loss = |x: &Tensor, w: &Tensor| -> Result<f64> {
            (linear(x, w, None, None)?.expect("fused") * &out_w)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let (x, w) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
        let grads = (linear(&x, &w, None, None)?.expect("fused") * &out_w)?
            .sum_all()?
            .backward()?;
        let h = 1e-6;
        for (which, base) in [(0, &x0), (1, &w0)] {
            let var = if which == 0 { &x } else { &w };
            let analytic: Vec<f64> = grads.get(var).unwrap().flatten_all()?.to_vec1()?;
            let values: Vec<f64> = base.flatten_all()?.to_vec1()?;
            for i in (0..values.len()).step_by(41) {
                let bump = |d: f64| -> Result<f64> {
                    let mut v = values.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, base.shape(), &Device::Cpu)?;
                    if which == 0 {
                        loss(&t, &w0)
                    } else {
                        loss(&x0, &t)
                    }
                };
                let numeric = (bump(h)? - bump(-h)?) / (2.0 * h);
                // The loss sums ~850 products; rounding in it, over 2h, allows ~1e-7.
                assert!(
                    (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "operand {which} element {i}: {numeric} vs {}",
                    analytic[i]
                );
            }
        }
        Ok(())
    }
}
