//! Causal grouped-query attention in one op with its own backward pass.
//!
//! Per (sequence, query head), blocks of query rows meet only the keys they can see; the
//! probabilities live one block at a time, the op keeps each row's log-sum-exp and its backward
//! pass recomputes them (FlashAttention's scheme, on the CPU's caches). No `[s, s]` tensor is
//! stored for the backward pass, no mask tensor is added, and the heads' `[b, s, h, d]` layout is
//! read and written in place, without the transposes the composed op copies.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{contiguous, cpu_tensor, fusable, par_rows, with_values, Real, Rows};

/// Query rows per block.
const BLOCK: usize = 64;

/// `softmax(scale · q·kᵀ + mask)·v` for `q` `[b, s, h, d]` and `k`, `v` `[b, s, kv, d]`, as
/// `[b, s, h, d]`: causal, each query seeing at most the `window` latest keys (itself included)
/// when a window is given; query head `i` reads key/value head `i / (h / kv)` (HF `repeat_kv`).
///
/// `None` off the CPU and for dtypes other than f32/f64: the caller composes the op there.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Option<Tensor>> {
    if !fusable(q) {
        return Ok(None);
    }
    let (b, s, h, d) = q.dims4()?;
    let (kb, ks, kv, kd) = k.dims4()?;
    if k.dims() != v.dims() || (kb, ks, kd) != (b, s, d) || kv == 0 || h % kv != 0 {
        candle_core::bail!(
            "causal attention: q {:?}, k {:?}, v {:?} do not fit [b, s, h, d] and [b, s, kv, d] \
             with kv dividing h",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!("causal attention: q, k and v must share a dtype");
    }
    if window == Some(0) {
        candle_core::bail!("causal attention: a window of 0 keys");
    }
    let op = CausalAttention {
        geometry: Geometry {
            b,
            s,
            h,
            kv,
            d,
            scale,
            window,
        },
        log_sum_exp: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
        .map(Some)
}

/// Query–key scores [`causal_attention`] computes per head of a sequence of `s` positions (its
/// blocks skip keys no row of theirs sees): for counting its FLOPs.
pub fn scores_computed(s: usize, window: Option<usize>) -> usize {
    let g = Geometry {
        b: 1,
        s,
        h: 1,
        kv: 1,
        d: 1,
        scale: 1.0,
        window,
    };
    (0..s)
        .step_by(BLOCK)
        .map(|i0| {
            let (rows, _, keys) = g.block(i0);
            rows * keys
        })
        .sum()
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    s: usize,
    h: usize,
    kv: usize,
    d: usize,
    scale: f64,
    window: Option<usize>,
}

impl Geometry {
    /// The first key query `i` sees.
    fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }

    /// Offset of (sequence `bi`, head `hh`)'s first query row in `[b, s, h, d]`.
    fn q_offset(&self, bi: usize, hh: usize) -> usize {
        (bi * self.s * self.h + hh) * self.d
    }

    /// Offset of the first key row that query head `hh` of sequence `bi` reads.
    fn kv_offset(&self, bi: usize, hh: usize) -> usize {
        (bi * self.s * self.kv + hh / (self.h / self.kv)) * self.d
    }

    fn q_stride(&self) -> usize {
        self.h * self.d
    }

    fn kv_stride(&self) -> usize {
        self.kv * self.d
    }

    /// `(rows, first key, keys)` of the block of queries starting at `i0`.
    fn block(&self, i0: usize) -> (usize, usize, usize) {
        let i1 = (i0 + BLOCK).min(self.s);
        let c0 = self.first_key(i0);
        (i1 - i0, c0, i1 - c0)
    }
}

/// A matrix operand: first element, row stride, column stride.
type Operand<T> = (*const T, usize, usize);

/// `dst = (accumulate ? dst : 0) + lhs·rhs` with `dst` `[m, n]` at (pointer, row stride), on
/// the calling thread (the kernels run one task per thread).
///
/// # Safety
/// Every operand addresses valid memory for its shape and strides, `dst` exclusively.
unsafe fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize),
    accumulate: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
) {
    let one = T::one();
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        1,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        one,
        one,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Probabilities of the block at `i0` of task (`bi`, `hh`) in `p` (`[rows, keys]`, zero where
/// masked), from each row's log-sum-exp when given, else by a softmax that writes it there.
fn block_probabilities<T: Real>(
    g: &Geometry,
    (q, k): (&[T], &[T]),
    (bi, hh, i0): (usize, usize, usize),
    p: &mut [T],
    lse: &mut [T],
    known_lse: bool,
) {
    let (rows, c0, nc) = g.block(i0);
    let (qs, ks) = (g.q_stride(), g.kv_stride());
    // SAFETY: the block's query rows and keys lie inside q and k; p holds rows·nc values.
    unsafe {
        matmul(
            (rows, nc, g.d),
            (p.as_mut_ptr(), nc),
            false,
            (q.as_ptr().add(g.q_offset(bi, hh) + i0 * qs), qs, 1),
            (k.as_ptr().add(g.kv_offset(bi, hh) + c0 * ks), 1, ks),
        )
    };
    let scale = T::from(g.scale).unwrap_or_else(T::one);
    super::vectorized(
        #[inline(always)]
        || {
            for (r, row) in p.chunks_exact_mut(nc).enumerate() {
                let i = i0 + r;
                let (lo, hi) = (g.first_key(i) - c0, i + 1 - c0);
                row[..lo].fill(T::zero());
                row[hi..].fill(T::zero());
                let seen = &mut row[lo..hi];
                if known_lse {
                    let l = lse[i];
                    seen.iter_mut()
                        .for_each(|x| *x = (*x * scale - l).exp_fast());
                    continue;
                }
                let max = super::max_of(seen, |x| x * scale);
                seen.iter_mut()
                    .for_each(|x| *x = (*x * scale - max).exp_fast());
                let sum = T::from(super::sum_f64(seen, |x| x)).unwrap_or_else(T::nan);
                let inv = sum.recip();
                seen.iter_mut().for_each(|x| *x *= inv);
                lse[i] = max + sum.ln();
            }
        },
    );
}

/// The output `[b, s, h, d]` and each (sequence, head)'s row log-sum-exps `[b, h, s]`.
fn forward<T: Real>(g: &Geometry, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
    let mut out = vec![T::zero(); q.len()];
    let mut lse = vec![T::zero(); g.b * g.h * g.s];
    let (out_ptr, lse_ptr) = (Rows(out.as_mut_ptr()), Rows(lse.as_mut_ptr()));
    let (qs, ks) = (g.q_stride(), g.kv_stride());
    super::for_chunks(g.b * g.h, g.s * g.s * g.d, |tasks| {
        let mut p = vec![T::zero(); BLOCK * g.s];
        for task in tasks {
            let (bi, hh) = (task / g.h, task % g.h);
            // SAFETY: row `task` of the log-sum-exps belongs to this task alone.
            let lse_row = unsafe { lse_ptr.row(task, g.s) };
            for i0 in (0..g.s).step_by(BLOCK) {
                let (rows, c0, nc) = g.block(i0);
                let p = &mut p[..rows * nc];
                block_probabilities(g, (q, k), (bi, hh, i0), p, lse_row, false);
                // SAFETY: the output rows of head `hh` in this block are written by this task
                // only; v holds the block's keys.
                unsafe {
                    matmul(
                        (rows, g.d, nc),
                        (out_ptr.ptr().add(g.q_offset(bi, hh) + i0 * qs), qs),
                        false,
                        (p.as_ptr(), nc, 1),
                        (v.as_ptr().add(g.kv_offset(bi, hh) + c0 * ks), ks, 1),
                    )
                };
            }
        }
    });
    (out, lse)
}

/// The gradients of q, k and v from the output's gradient `d_o`.
fn backward<T: Real>(
    g: &Geometry,
    (q, k, v): (&[T], &[T], &[T]),
    (o, d_o, lse): (&[T], &[T], &[T]),
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (qs, ks, d) = (g.q_stride(), g.kv_stride(), g.d);
    let per_head = g.s * d;
    let mut dq = vec![T::zero(); q.len()];
    // Each query head's share of its key/value head's gradient, `[b, h, s, d]`, summed below.
    let mut dk_heads = vec![T::zero(); g.b * g.h * per_head];
    let mut dv_heads = vec![T::zero(); g.b * g.h * per_head];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Rows(dq.as_mut_ptr()),
        Rows(dk_heads.as_mut_ptr()),
        Rows(dv_heads.as_mut_ptr()),
    );
    let scale = T::from(g.scale).unwrap_or_else(T::one);
    super::for_chunks(g.b * g.h, g.s * g.s * g.d, |tasks| {
        let mut p = vec![T::zero(); BLOCK * g.s];
        let mut ds = vec![T::zero(); BLOCK * g.s];
        let mut lse_row = vec![T::zero(); g.s];
        for task in tasks {
            let (bi, hh) = (task / g.h, task % g.h);
            let (qo, ko) = (g.q_offset(bi, hh), g.kv_offset(bi, hh));
            lse_row.copy_from_slice(&lse[task * g.s..(task + 1) * g.s]);
            for i0 in (0..g.s).step_by(BLOCK) {
                let (rows, c0, nc) = g.block(i0);
                let (p, ds) = (&mut p[..rows * nc], &mut ds[..rows * nc]);
                block_probabilities(g, (q, k), (bi, hh, i0), p, &mut lse_row, true);
                let d_o_block = (d_o.as_ptr().wrapping_add(qo + i0 * qs), qs, 1);
                // SAFETY (all four products): the block's rows of head `hh` in q, o, d_o and dq,
                // its keys in k, v and this task's own [s, d] slices of dk_heads and dv_heads
                // lie inside their buffers; dq's rows and the slices belong to this task alone.
                unsafe {
                    // dV += Pᵀ·dO
                    matmul(
                        (nc, d, rows),
                        (dv_ptr.ptr().add(task * per_head + c0 * d), d),
                        true,
                        (p.as_ptr(), 1, nc),
                        d_o_block,
                    );
                    // dP = dO·Vᵀ
                    matmul(
                        (rows, nc, d),
                        (ds.as_mut_ptr(), nc),
                        false,
                        d_o_block,
                        (v.as_ptr().add(ko + c0 * ks), 1, ks),
                    );
                }
                // dS = P ⊙ (dP − ⟨dO, O⟩) · scale, the softmax's backward by rows.
                for (r, (ds_row, p_row)) in
                    ds.chunks_exact_mut(nc).zip(p.chunks_exact(nc)).enumerate()
                {
                    let at = qo + (i0 + r) * qs;
                    let delta = d_o[at..at + d]
                        .iter()
                        .zip(&o[at..at + d])
                        .fold(T::zero(), |acc, (&a, &b)| acc + a * b);
                    for (x, &pv) in ds_row.iter_mut().zip(p_row) {
                        *x = pv * (*x - delta) * scale;
                    }
                }
                unsafe {
                    // dQ = dS·K
                    matmul(
                        (rows, d, nc),
                        (dq_ptr.ptr().add(qo + i0 * qs), qs),
                        false,
                        (ds.as_ptr(), nc, 1),
                        (k.as_ptr().add(ko + c0 * ks), ks, 1),
                    );
                    // dK += dSᵀ·Q
                    matmul(
                        (nc, d, rows),
                        (dk_ptr.ptr().add(task * per_head + c0 * d), d),
                        true,
                        (ds.as_ptr(), 1, nc),
                        (q.as_ptr().add(qo + i0 * qs), qs, 1),
                    );
                }
            }
        }
    });
    // Key/value head j's gradient is the sum over the query heads that read it.
    let rep = g.h / g.kv;
    let fold = |heads: &[T]| {
        par_rows(g.b * g.s * g.kv * d, g.kv * d, |row, out: &mut [T]| {
            let (bi, j) = (row / g.s, row % g.s);
            for (kvh, dst) in out.chunks_exact_mut(d).enumerate() {
                for hh in kvh * rep..(kvh + 1) * rep {
                    let at = ((bi * g.h + hh) * g.s + j) * d;
                    for (x, &y) in dst.iter_mut().zip(&heads[at..at + d]) {
                        *x += y;
                    }
                }
            }
        })
    };
    let (dk, dv) = (fold(&dk_heads), fold(&dv_heads));
    (dq, dk, dv)
}

struct CausalAttention {
    geometry: Geometry,
    /// The forward pass's row log-sum-exps, for the backward pass.
    log_sum_exp: Mutex<Option<CpuStorage>>,
}

impl CausalAttention {
    fn forward_as<T: Real>(
        &self,
        (q, lq): (&CpuStorage, &Layout),
        (k, lk): (&CpuStorage, &Layout),
        (v, lv): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let name = "causal attention";
        let (q, k, v) = (
            contiguous(q.as_slice::<T>()?, lq, name)?,
            contiguous(k.as_slice::<T>()?, lk, name)?,
            contiguous(v.as_slice::<T>()?, lv, name)?,
        );
        let (out, lse) = forward(&self.geometry, q, k, v);
        if let Ok(mut saved) = self.log_sum_exp.lock() {
            *saved = Some(T::to_cpu_storage_owned(lse));
        }
        Ok((T::to_cpu_storage_owned(out), lq.shape().clone()))
    }

    fn backward_as<T: Real>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .log_sum_exp
            .lock()
            .map_err(|_| candle_core::Error::Msg("causal attention: poisoned lock".into()))?;
        let Some(lse) = saved.as_ref() else {
            candle_core::bail!("causal attention: backward pass before the forward pass");
        };
        let lse = lse.as_slice::<T>()?;
        let (dq, dk, dv) = with_values::<T, _>(&[q, k, v, o, d_o], "attention backward", |x| {
            Ok(backward(
                &self.geometry,
                (x[0], x[1], x[2]),
                (x[3], x[4], lse),
            ))
        })?;
        Ok((
            Some(cpu_tensor(dq, q.shape())?),
            Some(cpu_tensor(dk, k.shape())?),
            Some(cpu_tensor(dv, v.shape())?),
        ))
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match q {
            CpuStorage::F32(_) => self.forward_as::<f32>((q, lq), (k, lk), (v, lv)),
            CpuStorage::F64(_) => self.forward_as::<f64>((q, lq), (k, lk), (v, lv)),
            _ => candle_core::bail!("causal attention: f32 and f64 only"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d_o = d_o.contiguous()?;
        match q.dtype() {
            candle_core::DType::F32 => self.backward_as::<f32>((q, k, v), o, &d_o),
            candle_core::DType::F64 => self.backward_as::<f64>((q, k, v), o, &d_o),
            dtype => candle_core::bail!("causal attention: {dtype:?} has no backward pass"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::testing::max_diff;
    use candle_core::{DType, Device, Var, D};

    /// The composed op the model runs off the CPU: heads transposed, K/V repeated, an additive
    /// mask, candle-nn's softmax.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (_, s, h, _) = q.dims4()?;
        let rep = h / k.dim(2)?;
        let heads = |t: &Tensor| -> Result<Tensor> {
            let t = t.transpose(1, 2)?.contiguous()?;
            if rep == 1 {
                return Ok(t);
            }
            let (b, kv, s, d) = t.dims4()?;
            t.unsqueeze(2)?
                .broadcast_as((b, kv, rep, s, d))?
                .reshape((b, kv * rep, s, d))
        };
        let (qh, kh, vh) = (q.transpose(1, 2)?.contiguous()?, heads(k)?, heads(v)?);
        let mask = crate::layers::attention_mask(s, window, q.dtype(), q.device())?;
        let scores = (qh.matmul(&kh.t()?)? * scale)?.broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        probs.matmul(&vh)?.transpose(1, 2)?.contiguous()
    }

    /// q `[2, s, 4, 8]`, k and v `[2, s, 2, 8]` and a weight on the output, random.
    fn inputs(s: usize, dtype: DType) -> Result<[Tensor; 4]> {
        let r = |shape: (usize, usize, usize, usize)| {
            Tensor::randn(0f64, 1.0, shape, &Device::Cpu)?.to_dtype(dtype)
        };
        Ok([
            r((2, s, 4, 8))?,
            r((2, s, 2, 8))?,
            r((2, s, 2, 8))?,
            r((2, s, 4, 8))?,
        ])
    }

    #[test]
    fn output_and_gradients_equal_the_composed_op() -> Result<()> {
        // 70 positions: two query blocks; a window shorter and one longer than a block.
        for window in [None, Some(5), Some(66)] {
            for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
                let [q, k, v, w] = inputs(70, dtype)?;
                let (q, k, v) = (
                    Var::from_tensor(&q)?,
                    Var::from_tensor(&k)?,
                    Var::from_tensor(&v)?,
                );
                let fused = causal_attention(&q, &k, &v, 0.35, window)?.expect("fused on the CPU");
                let reference = composed(&q, &k, &v, 0.35, window)?;
                assert!(
                    max_diff(&fused, &reference)? < tol,
                    "{dtype:?} {window:?} forward"
                );
                let gf = (fused * &w)?.sum_all()?.backward()?;
                let gr = (reference * &w)?.sum_all()?.backward()?;
                for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                    let (a, b) = (gf.get(x).unwrap(), gr.get(x).unwrap());
                    assert!(
                        max_diff(a, b)? < tol,
                        "{dtype:?} {window:?} d{name}: {}",
                        max_diff(a, b)?
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_in_f64() -> Result<()> {
        let [q, k, v, w] = inputs(67, DType::F64)?;
        let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<f64> {
            let out = causal_attention(q, k, v, 0.5, Some(40))?.expect("fused");
            (out * &w)?.sum_all()?.to_scalar::<f64>()
        };
        let vars = [
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        ];
        let out = causal_attention(&vars[0], &vars[1], &vars[2], 0.5, Some(40))?.expect("fused");
        let grads = (out * &w)?.sum_all()?.backward()?;
        let h = 1e-6;
        for which in 0..3 {
            let analytic: Vec<f64> = grads.get(&vars[which]).unwrap().flatten_all()?.to_vec1()?;
            let base = [&q, &k, &v][which];
            let values: Vec<f64> = base.flatten_all()?.to_vec1()?;
            for i in (0..values.len()).step_by(97) {
                let bump = |delta: f64| -> Result<f64> {
                    let mut moved = values.clone();
                    moved[i] += delta;
                    let t = Tensor::from_vec(moved, base.shape(), &Device::Cpu)?;
                    let mut args = [q.clone(), k.clone(), v.clone()];
                    args[which] = t;
                    loss(&args[0], &args[1], &args[2])
                };
                let numeric = (bump(h)? - bump(-h)?) / (2.0 * h);
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
    fn mismatched_heads_are_refused() -> Result<()> {
        let q = Tensor::zeros((1, 4, 3, 8), DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((1, 4, 2, 8), DType::F32, &Device::Cpu)?;
        let err = causal_attention(&q, &k, &k, 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kv dividing h"), "{err}");
        Ok(())
    }
}
