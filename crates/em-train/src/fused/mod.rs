//! Fused CPU kernels with their own backward, for ops candle composes from several passes over
//! memory. Each runs on the CPU in f32 and f64 with its work spread over candle's thread pool, and
//! falls back to the composed op off the CPU and for other dtypes, so a CUDA build runs what it
//! ran before. Every kernel is checked against the composed op and finite differences. The
//! optimizer's passes (`optimizer.rs`: gradient norm, clip scaling, AdamW) are here too, fused
//! in place, without a backward pass.

mod attention;
mod entropy;
mod linear;
mod optimizer;
mod rms_norm;
mod rope;
mod simd;
mod softmax;
mod swiglu;

pub use attention::{causal_attention, scores_computed};
pub use entropy::entropy_rows;
pub use linear::linear;
pub(crate) use optimizer::par_in_place;
pub use optimizer::{adamw_in_place, scale_in_place, sum_of_squares, AdamWStep};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub(crate) use simd::{max_of, sum2_f64, sum_f64, vectorized};
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

use candle_core::{
    CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};

/// The float types the fused kernels run in.
pub(crate) trait Real:
    num_traits::Float + WithDType + Default + Send + Sync + 'static
{
    /// `eˣ`: for f32 in arithmetic a loop vectorizes ([`simd::exp_f32`], within 2 ulp), for
    /// f64 libm's.
    fn exp_fast(self) -> Self;
}
impl Real for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        simd::exp_f32(self)
    }
}
impl Real for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

/// Whether `x` takes the fused path: on the CPU, in f32 or f64.
pub(crate) fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// A fused op of two tensors, written once for any [`Real`]; [`Fused2`] makes it a candle
/// [`CustomOp2`] that dispatches on the dtype.
pub(crate) trait Kernel2: Send + Sync + 'static {
    /// The op's name in errors.
    const NAME: &'static str;

    /// The output for the operands' storages, of type `T`.
    fn forward<T: Real>(
        &self,
        a: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)>;

    /// The operands' gradients from the output's gradient `g` (contiguous), of type `T`.
    fn backward<T: Real>(
        &self,
        a: &Tensor,
        b: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// A [`Kernel2`] as a candle op.
pub(crate) struct Fused2<K>(pub K);

impl<K: Kernel2> CustomOp2 for Fused2<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match a {
            CpuStorage::F32(_) => self.0.forward::<f32>((a, la), (b, lb)),
            CpuStorage::F64(_) => self.0.forward::<f64>((a, la), (b, lb)),
            _ => candle_core::bail!("{}: f32 and f64 only", K::NAME),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        match a.dtype() {
            DType::F32 => self.0.backward::<f32>(a, b, &g),
            DType::F64 => self.0.backward::<f64>(a, b, &g),
            dtype => candle_core::bail!("{}: {dtype:?} has no backward pass", K::NAME),
        }
    }
}

/// Calls `f` with the contiguous CPU values of `tensors` (each must be contiguous and of `T`).
fn with_values<T: Real, R>(
    tensors: &[&Tensor],
    op: &str,
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("{op}: a tensor is not on the CPU");
        };
        slices.push(contiguous(cpu.as_slice::<T>()?, layout, op)?);
    }
    f(&slices)
}

/// A CPU tensor of `shape` holding `values`.
fn cpu_tensor<T: Real>(values: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// A pointer the pool's workers write disjoint rows through.
#[derive(Clone, Copy)]
struct Rows<T>(*mut T);
unsafe impl<T> Send for Rows<T> {}
unsafe impl<T> Sync for Rows<T> {}

impl<T> Rows<T> {
    /// The buffer's first element.
    fn ptr(&self) -> *mut T {
        self.0
    }

    /// Row `r` of width `n`.
    ///
    /// # Safety
    /// The row lies inside the buffer, and no other reference to it is alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize, n: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(r * n), n)
    }
}

/// Below this many values of work a kernel runs on the calling thread: handing it to the pool
/// costs more than it saves (candle's own element-wise ops draw the line at 64 K too).
const PARALLEL_MIN: usize = 1 << 16;

thread_local! {
    /// Whether this thread belongs to a [`training_pool`].
    static IN_TRAINING_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A pool of `threads` threads to train on beside other work (`pool.install(|| …)`): the fused
/// ops' passes and products started on its threads run on them alone, not on candle's pool,
/// whose threads span every core and spin while they wait. Every item of a pass is computed
/// alone, so the numbers do not depend on the pool.
pub fn training_pool(
    threads: usize,
) -> std::result::Result<rayon::ThreadPool, rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .start_handler(|_| IN_TRAINING_POOL.with(|p| p.set(true)))
        .build()
}

/// The threads a product may use here: those of the [`training_pool`] this thread belongs to,
/// else candle's.
pub(crate) fn gemm_parallelism() -> gemm::Parallelism {
    let threads = if IN_TRAINING_POOL.with(|p| p.get()) {
        rayon::current_num_threads()
    } else {
        candle_core::utils::get_num_threads()
    };
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// Runs `f` over chunks of `0..items` on candle's thread pool (or the [`training_pool`] this
/// thread belongs to), or over all of them on the calling thread when `items · work_per_item` is
/// below [`PARALLEL_MIN`].
pub(crate) fn for_chunks(
    items: usize,
    work_per_item: usize,
    f: impl Fn(std::ops::Range<usize>) + Sync,
) {
    if items.saturating_mul(work_per_item) < PARALLEL_MIN {
        f(0..items);
        return;
    }
    let pool = candle_core::utils::barrier_pool();
    if IN_TRAINING_POOL.with(|p| p.get()) {
        // The chunks candle's pool hands out, one call each: a kernel that reduces over its
        // chunks (the norm's weight gradient) sums the same partials in the same order.
        use rayon::prelude::*;
        let chunk = items.div_ceil((pool.n_workers() + 1) * 8).max(1);
        (0..items.div_ceil(chunk))
            .into_par_iter()
            .for_each(|c| f(c * chunk..items.min((c + 1) * chunk)));
        return;
    }
    pool.execute_chunked(items, f);
}

/// Runs `f(row, out_row)` over the `len / n` rows of an output of `len` values, in parallel.
fn par_rows<T: Copy + Default + Send + Sync>(
    len: usize,
    n: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); len];
    let rows = len.checked_div(n).unwrap_or(0);
    let ptr = Rows(out.as_mut_ptr());
    for_chunks(rows, n, |range| {
        for r in range {
            // SAFETY: each row index is handed to exactly one call, rows do not overlap, and
            // `out` outlives the pool's execution.
            f(r, unsafe { ptr.row(r, n) });
        }
    });
    out
}

/// The contiguous values of `storage` under `layout`.
fn contiguous<'a, T>(values: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{op}: the input is not contiguous"),
    }
}

/// What the kernels' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Result, Tensor};

    fn max_abs(t: &Tensor) -> Result<f64> {
        t.abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    }

    /// `max |a − b|`.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        max_abs(&(a - b)?)
    }

    /// `max |a − b| / (1 + max |b|)`.
    pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok(max_diff(a, b)? / (1.0 + max_abs(b)?))
    }
}

#[cfg(test)]
mod training_pool_tests {
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// Norm → linear → SwiGLU, forward and backward, large enough that every pass and product
    /// splits: the output and every gradient, flattened.
    fn block(x: &Var, norm: &Var, w: &Var) -> Result<Vec<Vec<f32>>> {
        let h = super::rms_norm::rms_norm(x.as_tensor(), norm.as_tensor(), 1e-6, false)?
            .expect("fused on the CPU");
        let y = super::linear::linear(&h, w.as_tensor(), None, None)?.expect("fused on the CPU");
        let (gate, up) = (y.narrow(1, 0, 384)?, y.narrow(1, 384, 384)?);
        let out = super::swiglu::swiglu(&gate, &up)?.expect("fused on the CPU");
        let grads = out.sqr()?.sum_all()?.backward()?;
        let mut all = vec![out.flatten_all()?.to_vec1::<f32>()?];
        for v in [x, norm, w] {
            all.push(grads.get(v).expect("a gradient").flatten_all()?.to_vec1()?);
        }
        Ok(all)
    }

    /// Training on a pool of its own (beside other work) changes where the work runs, not one
    /// bit of what it computes.
    #[test]
    fn a_training_pool_changes_no_number() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (256, 512), &dev)?)?;
        let norm = Var::from_tensor(&Tensor::randn(1f32, 0.1, 512, &dev)?)?;
        let w = Var::from_tensor(&(Tensor::randn(0f32, 0.05, (768, 512), &dev)?))?;
        assert_eq!(x.dtype(), DType::F32);
        let shared = block(&x, &norm, &w)?;
        for threads in [1, 3] {
            let pool = super::training_pool(threads).expect("a pool");
            let own = pool.install(|| block(&x, &norm, &w))?;
            for (i, (a, b)) in own.iter().zip(&shared).enumerate() {
                let n = a.iter().zip(b).filter(|(p, q)| p != q).count();
                assert_eq!(
                    n,
                    0,
                    "{threads} threads: output {i}: {n} of {} values changed",
                    a.len()
                );
            }
        }
        Ok(())
    }
}
