//! Rotary position embedding ("rotate half") on the `[b, s, n, d]` layout, with its own
//! backward pass.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{contiguous, cpu_tensor, fusable, par_rows, with_values, Real};

/// `x·cos + rotate_half(x)·sin` for `x` `[b, s, n, d]` (sequence before heads, as the
/// projections leave it: no transpose) and `cos`, `sin` `[s, d]` from
/// [`crate::layers::RotaryEmbedding::cos_sin`]. Gradients flow to `x` only.
///
/// `None` off the CPU and for dtypes other than f32/f64: the caller composes the op there.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !fusable(x) {
        return Ok(None);
    }
    let &[_, s, n, d] = x.dims() else {
        candle_core::bail!("rope: x {:?} is not [b, s, n, d]", x.dims());
    };
    if d % 2 != 0 || cos.dims() != [s, d] || sin.dims() != [s, d] {
        candle_core::bail!(
            "rope: x {:?}, cos {:?}, sin {:?} do not fit [b, s, n, d] and [s, d] with d even",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    if cos.dtype() != x.dtype() || sin.dtype() != x.dtype() {
        candle_core::bail!("rope: x, cos and sin must share a dtype");
    }
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { s, n, d })
        .map(Some)
}

/// The geometry of `x`: positions, heads and head width.
#[derive(Debug, Clone, Copy)]
struct Rope {
    s: usize,
    n: usize,
    d: usize,
}

impl Rope {
    /// `x`'s rows rotated by the angles of their positions; by the opposite angles when
    /// `transpose`, the backward pass (the rotation's transpose is its inverse).
    fn rotate<T: Real>(&self, x: &[T], cos: &[T], sin: &[T], transpose: bool) -> Vec<T> {
        let (n, d, half) = (self.n, self.d, self.d / 2);
        par_rows(x.len(), d, |r, y: &mut [T]| {
            // Rows run over [b, s, n]: row r sits at position (r / n) % s.
            let at = (r / n) % self.s * d;
            let (c, sn, xr) = (&cos[at..at + d], &sin[at..at + d], &x[r * d..(r + 1) * d]);
            for i in 0..half {
                let (lo, hi) = (xr[i], xr[i + half]);
                if transpose {
                    y[i] = lo * c[i] + hi * sn[i + half];
                    y[i + half] = hi * c[i + half] - lo * sn[i];
                } else {
                    y[i] = lo * c[i] - hi * sn[i];
                    y[i + half] = hi * c[i + half] + lo * sn[i + half];
                }
            }
        })
    }

    fn forward_as<T: Real>(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (cos, lc): (&CpuStorage, &Layout),
        (sin, ls): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.rotate(
            contiguous(x.as_slice::<T>()?, lx, "rope")?,
            contiguous(cos.as_slice::<T>()?, lc, "rope")?,
            contiguous(sin.as_slice::<T>()?, ls, "rope")?,
            false,
        );
        Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
    }

    fn backward_as<T: Real>(&self, cos: &Tensor, sin: &Tensor, g: &Tensor) -> Result<Tensor> {
        let dx = with_values::<T, _>(&[g, cos, sin], "rope backward", |v| {
            Ok(self.rotate(v[0], v[1], v[2], true))
        })?;
        cpu_tensor(dx, g.shape())
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match x {
            CpuStorage::F32(_) => self.forward_as::<f32>((x, lx), (cos, lc), (sin, ls)),
            CpuStorage::F64(_) => self.forward_as::<f64>((x, lx), (cos, lc), (sin, ls)),
            _ => candle_core::bail!("rope: f32 and f64 only"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = match x.dtype() {
            DType::F32 => self.backward_as::<f32>(cos, sin, &g)?,
            DType::F64 => self.backward_as::<f64>(cos, sin, &g)?,
            dtype => candle_core::bail!("rope: {dtype:?} has no backward pass"),
        };
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::rel_diff;
    use crate::layers::{apply_rope, RopeParams, RotaryEmbedding};
    use candle_core::{Device, Var};

    /// The composed op on the heads-first layout, transposed there and back.
    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let heads = x.transpose(1, 2)?.contiguous()?;
        apply_rope(&heads, cos, sin)?.transpose(1, 2)?.contiguous()
    }

    /// x `[2, 25, 6, 18]` (300 rows, halves of 9), its cos and sin, a weight on the output.
    fn inputs(dtype: DType) -> Result<[Tensor; 4]> {
        let params = RopeParams {
            theta: 10_000.0,
            scaling: None,
        };
        let (cos, sin) = RotaryEmbedding::new(18, &params).cos_sin(25, dtype, &Device::Cpu)?;
        let r = || Tensor::randn(0f64, 1.0, (2, 25, 6, 18), &Device::Cpu)?.to_dtype(dtype);
        Ok([r()?, cos, sin, r()?])
    }

    #[test]
    fn forward_and_gradient_equal_the_composed_op() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            let [x, cos, sin, w] = inputs(dtype)?;
            let x = Var::from_tensor(&x)?;
            let fused = rope(&x, &cos, &sin)?.expect("fused on the CPU");
            let reference = composed(&x, &cos, &sin)?;
            assert!(rel_diff(&fused, &reference)? < tol, "{dtype:?} forward");
            let gf = (fused * &w)?.sum_all()?.backward()?;
            let gr = (reference * &w)?.sum_all()?.backward()?;
            let (a, b) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
            assert!(rel_diff(a, b)? < tol, "{dtype:?} dx: {}", rel_diff(a, b)?);
            assert!(gf.get(&cos).is_none() && gf.get(&sin).is_none());
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_in_f64() -> Result<()> {
        let [x, cos, sin, w] = inputs(DType::F64)?;
        let var = Var::from_tensor(&x)?;
        let grads = (rope(&var, &cos, &sin)?.expect("fused") * &w)?
            .sum_all()?
            .backward()?;
        let analytic: Vec<f64> = grads.get(&var).unwrap().flatten_all()?.to_vec1()?;
        let values: Vec<f64> = x.flatten_all()?.to_vec1()?;
        let h = 1e-6;
        for i in (0..values.len()).step_by(97) {
            let bump = |delta: f64| -> Result<Tensor> {
                let mut moved = values.clone();
                moved[i] += delta;
                let moved = Tensor::from_vec(moved, x.shape(), &Device::Cpu)?;
                Ok(rope(&moved, &cos, &sin)?.expect("fused"))
            };
            // The outputs' difference first: the loss's rounding would swamp 1e-7.
            let diff = ((bump(h)? - bump(-h)?)? * &w)?.sum_all()?;
            let numeric = diff.to_scalar::<f64>()? / (2.0 * h);
            assert!(
                (numeric - analytic[i]).abs() < 1e-7 * (1.0 + numeric.abs()),
                "element {i}: {numeric} vs {}",
                analytic[i]
            );
        }
        Ok(())
    }

    #[test]
    fn tables_for_another_length_are_refused() -> Result<()> {
        let x = Tensor::zeros((1, 4, 2, 8), DType::F32, &Device::Cpu)?;
        let table = Tensor::zeros((5, 8), DType::F32, &Device::Cpu)?;
        let err = rope(&x, &table, &table).unwrap_err().to_string();
        assert!(err.contains("rope: x"), "{err}");
        Ok(())
    }
}
