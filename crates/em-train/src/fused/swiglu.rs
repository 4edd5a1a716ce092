//! SwiGLU's product `silu(gate) · up` with its own backward pass.

use std::ops::Range;

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

use super::{contiguous, cpu_tensor, fusable, with_values, Fused2, Kernel2, Real, Rows};

/// Elements per task.
const CHUNK: usize = 1 << 14;

/// `silu(gate) · up` elementwise, for `gate` and `up` of one shape: one pass forward, one pass
/// backward for both gradients, where candle composes four and eight.
///
/// `None` off the CPU and for dtypes other than f32/f64: the caller composes the op there.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !fusable(gate) {
        return Ok(None);
    }
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    if gate.dtype() != up.dtype() {
        candle_core::bail!("swiglu: gate is {:?}, up {:?}", gate.dtype(), up.dtype());
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Fused2(SwiGlu))
        .map(Some)
}

/// Runs `f` over consecutive ranges of `0..len`, of whole chunks of `CHUNK` values each but the
/// last, in parallel.
fn par_chunks(len: usize, f: impl Fn(Range<usize>) + Sync) {
    super::for_chunks(len.div_ceil(CHUNK), CHUNK, |chunks| {
        f(chunks.start * CHUNK..len.min(chunks.end * CHUNK))
    });
}

/// The values `range` of the buffer behind `ptr`.
///
/// # Safety
/// The range lies inside the buffer, and no other reference to it is alive.
unsafe fn part<'a, T>(ptr: Rows<T>, range: &Range<usize>) -> &'a mut [T] {
    std::slice::from_raw_parts_mut(ptr.ptr().add(range.start), range.len())
}

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).exp_fast()).recip()
}

fn forward<T: Real>(gate: &[T], up: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); gate.len()];
    let ptr = Rows(out.as_mut_ptr());
    par_chunks(gate.len(), |range| {
        // SAFETY: the ranges are disjoint and inside `out`, which outlives the pool's execution.
        let y = unsafe { part(ptr, &range) };
        let (gate, up) = (&gate[range.clone()], &up[range]);
        super::vectorized(
            #[inline(always)]
            || {
                for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
                    *y = g * sigmoid(g) * u;
                }
            },
        );
    });
    out
}

/// The gradients of gate and up from the output's gradient `d`.
fn backward<T: Real>(gate: &[T], up: &[T], d: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut d_gate, mut d_up) = (vec![T::zero(); gate.len()], vec![T::zero(); gate.len()]);
    let (gate_ptr, up_ptr) = (Rows(d_gate.as_mut_ptr()), Rows(d_up.as_mut_ptr()));
    par_chunks(gate.len(), |range| {
        // SAFETY: the ranges are disjoint and inside both buffers, which outlive the pool's
        // execution.
        let (dg, du) = unsafe { (part(gate_ptr, &range), part(up_ptr, &range)) };
        let (gate, up, d) = (&gate[range.clone()], &up[range.clone()], &d[range]);
        super::vectorized(
            #[inline(always)]
            || {
                let inputs = gate.iter().zip(up).zip(d);
                for ((dg, du), ((&g, &u), &d)) in dg.iter_mut().zip(du).zip(inputs) {
                    let s = sigmoid(g);
                    *dg = d * u * s * (T::one() + g * (T::one() - s));
                    *du = d * g * s;
                }
            },
        );
    });
    (d_gate, d_up)
}

struct SwiGlu;

impl Kernel2 for SwiGlu {
    const NAME: &'static str = "swiglu";

    fn forward<T: Real>(
        &self,
        (gate, lg): (&CpuStorage, &Layout),
        (up, lu): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let gate = contiguous(gate.as_slice::<T>()?, lg, "swiglu")?;
        let up = contiguous(up.as_slice::<T>()?, lu, "swiglu")?;
        if gate.len() != up.len() {
            candle_core::bail!("swiglu: gate and up differ in size");
        }
        Ok((
            T::to_cpu_storage_owned(forward(gate, up)),
            lg.shape().clone(),
        ))
    }

    fn backward<T: Real>(
        &self,
        gate: &Tensor,
        up: &Tensor,
        d: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_values::<T, _>(&[gate, up, d], "swiglu backward", |v| {
            Ok(backward(v[0], v[1], v[2]))
        })?;
        Ok((
            Some(cpu_tensor(dg, gate.shape())?),
            Some(cpu_tensor(du, up.shape())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::rel_diff;
    use candle_core::DType;
    use candle_core::{Device, Var};

    /// gate, up and a weight on the output, `[3, 100, 67]` (20 100 values: two chunks), random.
    fn inputs(dtype: DType) -> Result<[Tensor; 3]> {
        let r = |std: f64| Tensor::randn(0f64, std, (3, 100, 67), &Device::Cpu)?.to_dtype(dtype);
        Ok([r(3.0)?, r(1.0)?, r(1.0)?])
    }

    #[test]
    fn forward_and_gradients_equal_the_composed_op() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            let [gate, up, w] = inputs(dtype)?;
            let (gate, up) = (Var::from_tensor(&gate)?, Var::from_tensor(&up)?);
            let fused = swiglu(&gate, &up)?.expect("fused on the CPU");
            let reference = (gate.silu()? * up.as_tensor())?;
            assert!(rel_diff(&fused, &reference)? < tol, "{dtype:?} forward");
            let gf = (fused * &w)?.sum_all()?.backward()?;
            let gr = (reference * &w)?.sum_all()?.backward()?;
            for (name, v) in [("gate", &gate), ("up", &up)] {
                let (a, b) = (gf.get(v).unwrap(), gr.get(v).unwrap());
                assert!(
                    rel_diff(a, b)? < tol,
                    "{dtype:?} d{name}: {}",
                    rel_diff(a, b)?
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_in_f64() -> Result<()> {
        let [gate, up, w] = inputs(DType::F64)?;
        let vars = [Var::from_tensor(&gate)?, Var::from_tensor(&up)?];
        let grads = (swiglu(&vars[0], &vars[1])?.expect("fused") * &w)?
            .sum_all()?
            .backward()?;
        let h = 1e-6;
        for which in 0..2 {
            let analytic: Vec<f64> = grads.get(&vars[which]).unwrap().flatten_all()?.to_vec1()?;
            let base = [&gate, &up][which];
            let values: Vec<f64> = base.flatten_all()?.to_vec1()?;
            for i in (0..values.len()).step_by(331) {
                let bump = |delta: f64| -> Result<Tensor> {
                    let mut moved = values.clone();
                    moved[i] += delta;
                    let mut args = [gate.clone(), up.clone()];
                    args[which] = Tensor::from_vec(moved, base.shape(), &Device::Cpu)?;
                    Ok(swiglu(&args[0], &args[1])?.expect("fused"))
                };
                // The outputs' difference first: the loss's rounding would swamp 1e-7.
                let diff = ((bump(h)? - bump(-h)?)? * &w)?.sum_all()?;
                let numeric = diff.to_scalar::<f64>()? / (2.0 * h);
                assert!(
                    (numeric - analytic[i]).abs() < 1e-7 * (1.0 + numeric.abs()),
                    "input {which} element {i}: {numeric} vs {}",
                    analytic[i]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_refused() -> Result<()> {
        let gate = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?;
        let up = Tensor::zeros((5, 2), DType::F32, &Device::Cpu)?;
        let err = swiglu(&gate, &up).unwrap_err().to_string();
        assert!(err.contains("swiglu: gate"), "{err}");
        Ok(())
    }
}
