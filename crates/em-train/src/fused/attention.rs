//! Causal grouped-query attention in one op with its own backward pass.
//!
//! Per (sequence, key/value head), blocks of query rows of every query head that reads that
//! key/value head meet, in one product, only the keys they can see; the probabilities live one
//! block at a time, the op keeps each row's log-sum-exp and its backward pass recomputes them
//! (FlashAttention's scheme, on the CPU's caches). Grouping the query heads of a key/value head
//! makes each product `rep` times taller against the same keys, and lets the backward pass sum
//! their key/value gradients inside its products. No `[s, s]` tensor is stored for the backward
//! pass, no mask tensor is added, and the heads' `[b, s, h, d]` layout is read and written in
//! place, without the transposes the composed op copies.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{contiguous, cpu_tensor, fusable, par_rows, with_values, Real, Rows};

/// Query rows per block (of each query head of a group). 128 rather than 64: fewer, taller
/// products, 8 % faster on SmolLM2's shapes although the diagonal blocks' masked halves grow.
const BLOCK: usize = 128;

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

    /// Query heads per key/value head.
    fn rep(&self) -> usize {
        self.h / self.kv
    }

    /// Offset of key/value head `grp`'s first row in sequence `bi`.
    fn kv_offset(&self, bi: usize, grp: usize) -> usize {
        (bi * self.s * self.kv + grp) * self.d
    }

    /// Offset of query row `i` of query head `r` of group `grp` in sequence `bi`.
    fn q_row(&self, bi: usize, grp: usize, r: usize, i: usize) -> usize {
        self.q_offset(bi, grp * self.rep() + r) + i * self.q_stride()
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

/// Copies the `rows` query rows from `i0` of every query head of group `grp` of sequence `bi`
/// out of `[b, s, h, d]` `x` into `dst` `[rep · rows, d]`, head by head.
fn gather<T: Real>(
    g: &Geometry,
    x: &[T],
    (bi, grp, i0, rows): (usize, usize, usize, usize),
    dst: &mut [T],
) {
    let d = g.d;
    for r in 0..g.rep() {
        for il in 0..rows {
            let at = g.q_row(bi, grp, r, i0 + il);
            let t = r * rows + il;
            dst[t * d..(t + 1) * d].copy_from_slice(&x[at..at + d]);
        }
    }
}

/// Writes `src` `[rep · rows, d]` back to the rows [`gather`] took them from, in `[b, s, h, d]`
/// at `x`.
///
/// # Safety
/// `x` holds `[b, s, h, d]`, and no other reference to these rows is alive.
unsafe fn scatter<T: Real>(
    g: &Geometry,
    x: Rows<T>,
    (bi, grp, i0, rows): (usize, usize, usize, usize),
    src: &[T],
) {
    let d = g.d;
    for r in 0..g.rep() {
        for il in 0..rows {
            let t = r * rows + il;
            let dst = std::slice::from_raw_parts_mut(x.ptr().add(g.q_row(bi, grp, r, i0 + il)), d);
            dst.copy_from_slice(&src[t * d..(t + 1) * d]);
        }
    }
}

/// Probabilities `p` (`[rep · rows, keys]`, zero where masked) of the block of query rows `qb`
/// (gathered, `[rep · rows, d]`) of group (`bi`, `grp`) from `i0`, from each row's log-sum-exp in
/// `lse` (the group's `[rep, s]`) when `known_lse`, else by a softmax that writes it there.
fn block_probabilities<T: Real>(
    g: &Geometry,
    (qb, k): (&[T], &[T]),
    (bi, grp, i0): (usize, usize, usize),
    p: &mut [T],
    lse: &mut [T],
    known_lse: bool,
) {
    let (rows, c0, nc) = g.block(i0);
    let ks = g.kv_stride();
    // SAFETY: the block's gathered rows lie in qb and its keys inside k; p holds rep·rows·nc.
    unsafe {
        matmul(
            (g.rep() * rows, nc, g.d),
            (p.as_mut_ptr(), nc),
            false,
            (qb.as_ptr(), g.d, 1),
            (k.as_ptr().add(g.kv_offset(bi, grp) + c0 * ks), 1, ks),
        )
    };
    let scale = T::from(g.scale).unwrap_or_else(T::one);
    super::vectorized(
        #[inline(always)]
        || {
            for (t, row) in p.chunks_exact_mut(nc).enumerate() {
                let (r, i) = (t / rows, i0 + t % rows);
                let (lo, hi) = (g.first_key(i) - c0, i + 1 - c0);
                row[..lo].fill(T::zero());
                row[hi..].fill(T::zero());
                let seen = &mut row[lo..hi];
                let l = &mut lse[r * g.s + i];
                if known_lse {
                    let l = *l;
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
                *l = max + sum.ln();
            }
        },
    );
}

/// The output `[b, s, h, d]` and each (sequence, head)'s row log-sum-exps `[b, h, s]`. One task
/// per (sequence, key/value head, block of query rows): they write disjoint rows.
fn forward<T: Real>(g: &Geometry, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
    let mut out = vec![T::zero(); q.len()];
    let mut lse = vec![T::zero(); g.b * g.h * g.s];
    let (out_ptr, lse_ptr) = (Rows(out.as_mut_ptr()), Rows(lse.as_mut_ptr()));
    let (ks, rep, d) = (g.kv_stride(), g.rep(), g.d);
    let blocks = g.s.div_ceil(BLOCK);
    super::for_chunks(g.b * g.kv * blocks, BLOCK * g.s * d * rep, |tasks| {
        let mut qb = vec![T::zero(); rep * BLOCK * d];
        let mut p = vec![T::zero(); rep * BLOCK * g.s];
        let mut ob = vec![T::zero(); rep * BLOCK * d];
        let mut lse_rows = vec![T::zero(); rep * g.s];
        for task in tasks {
            let (group, i0) = (task / blocks, (task % blocks) * BLOCK);
            let (bi, grp) = (group / g.kv, group % g.kv);
            let (rows, c0, nc) = g.block(i0);
            let (qb, p, ob) = (
                &mut qb[..rep * rows * d],
                &mut p[..rep * rows * nc],
                &mut ob[..rep * rows * d],
            );
            gather(g, q, (bi, grp, i0, rows), qb);
            block_probabilities(g, (qb, k), (bi, grp, i0), p, &mut lse_rows, false);
            for r in 0..rep {
                for i in i0..i0 + rows {
                    // SAFETY: this block's positions of the group's log-sum-exp rows belong to
                    // this task alone.
                    unsafe {
                        *lse_ptr.ptr().add((group * rep + r) * g.s + i) = lse_rows[r * g.s + i]
                    };
                }
            }
            // SAFETY: ob holds the block's rep·rows output rows; v holds its keys.
            unsafe {
                matmul(
                    (rep * rows, d, nc),
                    (ob.as_mut_ptr(), d),
                    false,
                    (p.as_ptr(), nc, 1),
                    (v.as_ptr().add(g.kv_offset(bi, grp) + c0 * ks), ks, 1),
                );
                // SAFETY: this block's output rows of the group's heads belong to this task.
                scatter(g, out_ptr, (bi, grp, i0, rows), ob);
            }
        }
    });
    (out, lse)
}

/// The gradients of q, k and v from the output's gradient `d_o`. One task per (sequence,
/// key/value head, part), a part taking every `parts`-th block of query rows, so that even one
/// sequence with one key/value head keeps every thread busy; each task sums its key/value
/// gradient in a `[s, d]` of its own, and the parts are added at the end.
fn backward<T: Real>(
    g: &Geometry,
    (q, k, v): (&[T], &[T], &[T]),
    (o, d_o, lse): (&[T], &[T], &[T]),
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (ks, rep, d) = (g.kv_stride(), g.rep(), g.d);
    let blocks = g.s.div_ceil(BLOCK);
    let groups = g.b * g.kv;
    let threads = candle_core::utils::get_num_threads().max(1);
    let parts = (2 * threads).div_ceil(groups).clamp(1, blocks);
    let per_part = g.s * d;
    let mut dq = vec![T::zero(); q.len()];
    let mut dk_parts = vec![T::zero(); groups * parts * per_part];
    let mut dv_parts = vec![T::zero(); groups * parts * per_part];
    let (dq_ptr, dk_ptr, dv_ptr) = (
        Rows(dq.as_mut_ptr()),
        Rows(dk_parts.as_mut_ptr()),
        Rows(dv_parts.as_mut_ptr()),
    );
    let scale = T::from(g.scale).unwrap_or_else(T::one);
    super::for_chunks(groups * parts, g.s * g.s * d * rep / parts, |tasks| {
        let tall = rep * BLOCK;
        let (mut qb, mut dob, mut dqb) = (
            vec![T::zero(); tall * d],
            vec![T::zero(); tall * d],
            vec![T::zero(); tall * d],
        );
        let (mut p, mut ds) = (vec![T::zero(); tall * g.s], vec![T::zero(); tall * g.s]);
        let mut delta = vec![T::zero(); tall];
        for task in tasks {
            let (group, part) = (task / parts, task % parts);
            let (bi, grp) = (group / g.kv, group % g.kv);
            let ko = g.kv_offset(bi, grp);
            // The group's log-sum-exps, read only (the probabilities are recomputed from them).
            let mut lse_rows = lse[group * rep * g.s..(group + 1) * rep * g.s].to_vec();
            for i0 in (part * BLOCK..g.s).step_by(parts * BLOCK) {
                let (rows, c0, nc) = g.block(i0);
                let m = rep * rows;
                let (qb, dob, dqb) = (&mut qb[..m * d], &mut dob[..m * d], &mut dqb[..m * d]);
                let (p, ds, delta) = (&mut p[..m * nc], &mut ds[..m * nc], &mut delta[..m]);
                gather(g, q, (bi, grp, i0, rows), qb);
                gather(g, d_o, (bi, grp, i0, rows), dob);
                // ⟨dO, O⟩ per row, the softmax backward's shift.
                for (t, dl) in delta.iter_mut().enumerate() {
                    let at = g.q_row(bi, grp, t / rows, i0 + t % rows);
                    *dl = T::from(super::sum2_f64(
                        &dob[t * d..(t + 1) * d],
                        &o[at..at + d],
                        |a, b| a * b,
                    ))
                    .unwrap_or_else(T::nan);
                }
                block_probabilities(g, (qb, k), (bi, grp, i0), p, &mut lse_rows, true);
                // SAFETY (all four products): the gathered blocks hold m rows, the keys lie in
                // k and v, and this task's own [s, d] parts of dk and dv hold rows c0..c0 + nc.
                let (dk_part, dv_part) = unsafe {
                    (
                        dk_ptr.ptr().add(task * per_part + c0 * d),
                        dv_ptr.ptr().add(task * per_part + c0 * d),
                    )
                };
                unsafe {
                    // dV += Pᵀ·dO
                    matmul(
                        (nc, d, m),
                        (dv_part, d),
                        true,
                        (p.as_ptr(), 1, nc),
                        (dob.as_ptr(), d, 1),
                    );
                    // dP = dO·Vᵀ
                    matmul(
                        (m, nc, d),
                        (ds.as_mut_ptr(), nc),
                        false,
                        (dob.as_ptr(), d, 1),
                        (v.as_ptr().add(ko + c0 * ks), 1, ks),
                    );
                }
                // dS = P ⊙ (dP − ⟨dO, O⟩) · scale, the softmax's backward by rows.
                super::vectorized(
                    #[inline(always)]
                    || {
                        for ((ds_row, p_row), &dl) in ds
                            .chunks_exact_mut(nc)
                            .zip(p.chunks_exact(nc))
                            .zip(delta.iter())
                        {
                            for (x, &pv) in ds_row.iter_mut().zip(p_row) {
                                *x = pv * (*x - dl) * scale;
                            }
                        }
                    },
                );
                unsafe {
                    // dQ = dS·K
                    matmul(
                        (m, d, nc),
                        (dqb.as_mut_ptr(), d),
                        false,
                        (ds.as_ptr(), nc, 1),
                        (k.as_ptr().add(ko + c0 * ks), ks, 1),
                    );
                    // dK += dSᵀ·Q
                    matmul(
                        (nc, d, m),
                        (dk_part, d),
                        true,
                        (ds.as_ptr(), 1, nc),
                        (qb.as_ptr(), d, 1),
                    );
                    // SAFETY: this block's rows of the group's heads in dq belong to this task.
                    scatter(g, dq_ptr, (bi, grp, i0, rows), dqb);
                }
            }
        }
    });
    // Key/value head grp's gradient is the sum of its parts.
    let fold = |parts_buf: &[T]| {
        par_rows(g.b * g.s * g.kv * d, g.kv * d, |row, out: &mut [T]| {
            let (bi, j) = (row / g.s, row % g.s);
            for (grp, dst) in out.chunks_exact_mut(d).enumerate() {
                for part in 0..parts {
                    let at = ((bi * g.kv + grp) * parts + part) * per_part + j * d;
                    for (x, &y) in dst.iter_mut().zip(&parts_buf[at..at + d]) {
                        *x += y;
                    }
                }
            }
        })
    };
    let (dk, dv) = (fold(&dk_parts), fold(&dv_parts));
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
        // 150 positions: two query blocks; a window shorter and one longer than a block.
        for window in [None, Some(5), Some(130)] {
            for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
                let [q, k, v, w] = inputs(150, dtype)?;
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

    /// One sequence with one key/value head: the backward pass splits its blocks into parts
    /// (each with its own key/value gradient) to keep the threads busy, and adds them up.
    #[test]
    fn one_key_value_head_of_one_sequence_splits_into_parts() -> Result<()> {
        let r = |shape: (usize, usize, usize, usize)| Tensor::randn(0f64, 1.0, shape, &Device::Cpu);
        let (q, k, v, w) = (
            r((1, 150, 4, 8))?,
            r((1, 150, 1, 8))?,
            r((1, 150, 1, 8))?,
            r((1, 150, 4, 8))?,
        );
        let (q, k, v) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        let fused = causal_attention(&q, &k, &v, 0.3, None)?.expect("fused on the CPU");
        let reference = composed(&q, &k, &v, 0.3, None)?;
        assert!(max_diff(&fused, &reference)? < 1e-12);
        let gf = (fused * &w)?.sum_all()?.backward()?;
        let gr = (reference * &w)?.sum_all()?.backward()?;
        for x in [&q, &k, &v] {
            assert!(max_diff(gf.get(x).unwrap(), gr.get(x).unwrap())? < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences_in_f64() -> Result<()> {
        let [q, k, v, w] = inputs(131, DType::F64)?;
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
