//! The optimizer's passes over every parameter, in place on the CPU in f32/f64 and spread over
//! candle's thread pool: the gradients' squared norm, their scaling by the clip coefficient, and
//! AdamW's update. The composed ops make a pass and a temporary per operation (about a dozen for
//! AdamW), on one piece at a time; these make one pass per tensor written. Each returns `None` or
//! `false`, touching nothing, where it does not apply, and the caller composes the op there.

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use super::{contiguous, for_chunks, fusable, with_values, Real, Rows};

/// Values per task.
const UNIT: usize = 1 << 16;

/// Runs `f(offset, chunk)` over `dst` in chunks of [`UNIT`] values, in parallel.
pub(crate) fn par_in_place<T: Send>(dst: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let len = dst.len();
    let ptr = Rows(dst.as_mut_ptr());
    for_chunks(len.div_ceil(UNIT), UNIT, |range| {
        for unit in range {
            let (lo, hi) = (unit * UNIT, len.min((unit + 1) * UNIT));
            // SAFETY: each unit's range [lo, hi) of dst is handed to that unit alone.
            let chunk = unsafe { std::slice::from_raw_parts_mut(ptr.ptr().add(lo), hi - lo) };
            f(lo, chunk);
        }
    });
}

/// The contiguous values of a destination storage.
fn contiguous_mut<'a, T>(values: &'a mut [T], layout: &Layout, op: &str) -> Result<&'a mut [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut values[start..end]),
        None => candle_core::bail!("{op}: the destination is not contiguous"),
    }
}

/// `Σ x²` in f64, summed in an order fixed by the length alone (the same for any thread count).
/// `None` off the CPU and for dtypes other than f32/f64.
pub fn sum_of_squares(x: &Tensor) -> Result<Option<f64>> {
    if !fusable(x) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    match x.dtype() {
        DType::F32 => with_values::<f32, _>(&[&x], "sum of squares", |v| Ok(squares(v[0]))),
        _ => with_values::<f64, _>(&[&x], "sum of squares", |v| Ok(squares(v[0]))),
    }
    .map(Some)
}

fn squares<T: Real>(x: &[T]) -> f64 {
    let units = x.len().div_ceil(UNIT);
    let mut partial = vec![0f64; units];
    let out = Rows(partial.as_mut_ptr());
    for_chunks(units, UNIT, |range| {
        for unit in range {
            let chunk = &x[unit * UNIT..x.len().min((unit + 1) * UNIT)];
            let sum = super::vectorized(
                #[inline(always)]
                || super::sum_f64(chunk, |v| v * v),
            );
            // SAFETY: entry `unit` belongs to this unit alone.
            unsafe { out.row(unit, 1)[0] = sum };
        }
    });
    partial.iter().sum()
}

/// Multiplies `x` by `factor` in place. `false`, touching nothing, off the CPU, for dtypes other
/// than f32/f64 and for a tensor that is not contiguous.
pub fn scale_in_place(x: &Tensor, factor: f64) -> Result<bool> {
    if !fusable(x) || !x.is_contiguous() {
        return Ok(false);
    }
    x.inplace_op1(&Scale(factor))?;
    Ok(true)
}

struct Scale(f64);

impl InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "scale-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        fn run<T: Real>(d: &mut [T], factor: f64) {
            let f = T::from(factor).unwrap_or_else(T::nan);
            par_in_place(d, |_, c| c.iter_mut().for_each(|v| *v *= f));
        }
        match s {
            CpuStorage::F32(d) => run(contiguous_mut(d, l, self.name())?, self.0),
            CpuStorage::F64(d) => run(contiguous_mut(d, l, self.name())?, self.0),
            _ => candle_core::bail!("scale-in-place: f32 or f64"),
        }
        Ok(())
    }
}

/// AdamW's constants for one step, as PyTorch's single-tensor AdamW forms them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// `1 − lr·weight_decay`.
    pub decay: f64,
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f64,
    /// `√(1 − β₂ᵗ)`.
    pub bc2_sqrt: f64,
    /// ε.
    pub eps: f64,
}

/// One AdamW step of parameter `p` with gradient `g` and moments `m`, `v`, all in place:
/// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `p ← p(1 − lr·wd) − step_size · m / (√v/√(1−β₂ᵗ) + ε)`,
/// each operation rounded as candle's composed ops round it, so the result is the composed
/// update's bit for bit. `false`, touching nothing, unless all four are contiguous CPU tensors of
/// one shape and of one dtype, f32 or f64, with storages of their own.
pub fn adamw_in_place(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    k: &AdamWStep,
) -> Result<bool> {
    let all = [p, g, m, v];
    if !fusable(p)
        || all
            .iter()
            .any(|t| !t.is_contiguous() || t.dtype() != p.dtype() || t.shape() != p.shape())
        || !all.iter().all(|t| t.device().is_cpu())
    {
        return Ok(false);
    }
    let (b1, b2) = k.betas;
    m.inplace_op2(
        g,
        &Moment {
            beta: b1,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            beta: b2,
            square: true,
        },
    )?;
    p.inplace_op3(m, v, &Step(*k))?;
    Ok(true)
}

/// `m ← β·m + (1−β)·g` (`g²` with `square`).
struct Moment {
    beta: f64,
    square: bool,
}

impl Moment {
    fn run<T: Real>(&self, m: &mut [T], g: &[T]) {
        let (beta, rest) = (T::from(self.beta), T::from(1.0 - self.beta));
        let (beta, rest) = (beta.unwrap_or_else(T::nan), rest.unwrap_or_else(T::nan));
        par_in_place(m, |lo, c| {
            let g = &g[lo..lo + c.len()];
            super::vectorized(
                #[inline(always)]
                || {
                    if self.square {
                        for (m, &g) in c.iter_mut().zip(g) {
                            *m = *m * beta + g * g * rest;
                        }
                    } else {
                        for (m, &g) in c.iter_mut().zip(g) {
                            *m = *m * beta + g * rest;
                        }
                    }
                },
            )
        });
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let name = self.name();
        match (s1, s2) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => {
                self.run(contiguous_mut(m, l1, name)?, contiguous(g, l2, name)?)
            }
            (CpuStorage::F64(m), CpuStorage::F64(g)) => {
                self.run(contiguous_mut(m, l1, name)?, contiguous(g, l2, name)?)
            }
            _ => candle_core::bail!("{name}: f32 or f64, both the same"),
        }
        Ok(())
    }
}

/// `p ← p·decay − step_size · m / (√v · (1/√(1−β₂ᵗ)) + ε)`.
struct Step(AdamWStep);

impl Step {
    fn run<T: Real>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let t = |x: f64| T::from(x).unwrap_or_else(T::nan);
        let k = self.0;
        let (decay, step, inv_bc2, eps) =
            (t(k.decay), t(k.step_size), t(1.0 / k.bc2_sqrt), t(k.eps));
        par_in_place(p, |lo, c| {
            let (m, v) = (&m[lo..lo + c.len()], &v[lo..lo + c.len()]);
            super::vectorized(
                #[inline(always)]
                || {
                    for ((p, &m), &v) in c.iter_mut().zip(m).zip(v) {
                        *p = *p * decay - m / (v.sqrt() * inv_bc2 + eps) * step;
                    }
                },
            )
        });
    }
}

impl InplaceOp3 for Step {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let name = self.name();
        match (s1, s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => self.run(
                contiguous_mut(p, l1, name)?,
                contiguous(m, l2, name)?,
                contiguous(v, l3, name)?,
            ),
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => self.run(
                contiguous_mut(p, l1, name)?,
                contiguous(m, l2, name)?,
                contiguous(v, l3, name)?,
            ),
            _ => candle_core::bail!("{name}: f32 or f64, all the same"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sum_of_squares_equals_the_composed_sum() -> Result<()> {
        for n in [0, 5, 1023, 3 * UNIT + 17] {
            let x = Tensor::randn(0f32, 1.0, n, &Device::Cpu)?;
            let fused = sum_of_squares(&x)?.expect("fused on the CPU");
            let exact: f64 = x
                .to_vec1::<f32>()?
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum();
            assert!(
                (fused - exact).abs() <= 1e-6 * exact.max(1.0),
                "{n}: {fused} vs {exact}"
            );
        }
        let x = Tensor::new(&[3.0f64, 4.0], &Device::Cpu)?;
        assert_eq!(sum_of_squares(&x)?, Some(25.0));
        Ok(())
    }

    #[test]
    fn scaling_in_place_equals_affine() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, 2 * UNIT + 3, &Device::Cpu)?;
        let expected = x.affine(0.37, 0.0)?.to_vec1::<f32>()?;
        assert!(scale_in_place(&x, 0.37)?);
        assert_eq!(x.to_vec1::<f32>()?, expected);
        let strided = Tensor::zeros((3, 4), DType::F32, &Device::Cpu)?.t()?;
        assert!(!scale_in_place(&strided, 2.0)?, "not contiguous: composed");
        Ok(())
    }

    #[test]
    fn a_step_is_the_composed_update_bit_for_bit() -> Result<()> {
        let k = AdamWStep {
            decay: 1.0 - 1e-3 * 0.01,
            betas: (0.9, 0.999),
            step_size: 1e-3 / (1.0 - 0.9f64.powi(3)),
            bc2_sqrt: (1.0 - 0.999f64.powi(3)).sqrt(),
            eps: 1e-8,
        };
        let n = 2 * UNIT + 5;
        let dev = &Device::Cpu;
        let (p, g) = (
            Tensor::randn(0f32, 1.0, n, dev)?,
            Tensor::randn(0f32, 1e-2, n, dev)?,
        );
        let (m, v) = (
            Tensor::randn(0f32, 1e-3, n, dev)?,
            Tensor::randn(0f32, 1e-6, n, dev)?.abs()?,
        );
        let (b1, b2) = k.betas;
        let m1 = (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
        let v1 = (v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
        let denom = v1.sqrt()?.affine(1.0 / k.bc2_sqrt, k.eps)?;
        let p1 = (p.affine(k.decay, 0.0)? - (&m1 / denom)?.affine(k.step_size, 0.0)?)?;
        assert!(adamw_in_place(&p, &g, &m, &v, &k)?);
        assert_eq!(m.to_vec1::<f32>()?, m1.to_vec1::<f32>()?);
        assert_eq!(v.to_vec1::<f32>()?, v1.to_vec1::<f32>()?);
        assert_eq!(p.to_vec1::<f32>()?, p1.to_vec1::<f32>()?);
        let g64 = g.to_dtype(DType::F64)?;
        assert!(
            !adamw_in_place(&p, &g64, &m, &v, &k)?,
            "mixed dtypes: composed"
        );
        Ok(())
    }
}
