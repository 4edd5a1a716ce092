//! Sums written into the accumulator's own storage: `acc += aᵀ·b` (the LM head's weight gradient
//! summed over row chunks without a fresh `[vocab, hidden]` tensor, and a second one for the sum,
//! per chunk) and `acc += g` (a micro-batch's gradient added to the update's in one pass).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// Adds `g` to `acc` in place on the CPU in f32/f64, both contiguous, of one shape and dtype,
/// spread over candle's thread pool. Returns `false`, touching nothing, elsewhere.
pub fn add_in_place(acc: &Tensor, g: &Tensor) -> Result<bool> {
    if !acc.device().is_cpu()
        || !matches!(
            acc.dtype(),
            candle_core::DType::F32 | candle_core::DType::F64
        )
    {
        return Ok(false);
    }
    if acc.shape() != g.shape() || acc.dtype() != g.dtype() || !acc.is_contiguous() {
        candle_core::bail!(
            "add_in_place: acc {:?} {:?} and g {:?} {:?}",
            acc.dims(),
            acc.dtype(),
            g.dims(),
            g.dtype()
        );
    }
    acc.inplace_op2(&g.contiguous()?, &AddInPlace)?;
    Ok(true)
}

struct AddInPlace;

fn add_chunks<T: Copy + Send + Sync + std::ops::AddAssign>(dst: &mut [T], src: &[T]) {
    crate::fused::par_in_place(dst, |lo, d| {
        d.iter_mut().zip(&src[lo..]).for_each(|(a, &b)| *a += b)
    });
}

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((d0, d1)), Some((s0, s1_end))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add_in_place: an operand is not contiguous");
        };
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(g)) => add_chunks(&mut d[d0..d1], &g[s0..s1_end]),
            (CpuStorage::F64(d), CpuStorage::F64(g)) => add_chunks(&mut d[d0..d1], &g[s0..s1_end]),
            _ => candle_core::bail!("add_in_place: f32 or f64, both the same"),
        }
        Ok(())
    }
}

/// Adds `aᵀ·b` to `acc` in place: `acc` `[m, n]`, `a` `[k, m]`, `b` `[k, n]`, all contiguous and
/// of `acc`'s dtype (f32 or f64), on one device.
pub fn add_transposed_product(acc: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    let (m, n) = acc.dims2()?;
    let (k, am) = a.dims2()?;
    let (bk, bn) = b.dims2()?;
    if am != m || bk != k || bn != n {
        candle_core::bail!(
            "add_transposed_product: acc {:?}, a {:?}, b {:?} do not fit acc += aᵀ·b",
            acc.dims(),
            a.dims(),
            b.dims()
        );
    }
    if a.dtype() != acc.dtype() || b.dtype() != acc.dtype() {
        candle_core::bail!("add_transposed_product: operands must share acc's dtype");
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    acc.inplace_op3(&a, &b, &TransposedProduct { m, n, k })
}

struct TransposedProduct {
    m: usize,
    n: usize,
    k: usize,
}

fn contiguous_from<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("add_transposed_product: operand is not contiguous"),
    }
}

impl TransposedProduct {
    /// # Safety
    /// `dst` holds `m·n`, `a` `k·m`, `b` `k·n` elements, row-major.
    unsafe fn run<T: 'static + Copy>(&self, dst: &mut [T], a: &[T], b: &[T], one: T) {
        let (m, n, k) = (self.m, self.n, self.k);
        let parallelism = crate::fused::gemm_parallelism();
        // dst[i, j] = 1·dst[i, j] + 1·Σ_t a[t, i]·b[t, j]; the lhs is aᵀ (row stride 1, column
        // stride m).
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            m as isize,
            1,
            b.as_ptr(),
            1,
            n as isize,
            one,
            one,
            false,
            false,
            false,
            parallelism,
        )
    }
}

impl InplaceOp3 for TransposedProduct {
    fn name(&self) -> &'static str {
        "add-transposed-product"
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
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("add_transposed_product: acc is not contiguous");
        };
        match (s1, s2, s3) {
            (CpuStorage::F32(d), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let (a, b) = (contiguous_from(a, l2)?, contiguous_from(b, l3)?);
                // SAFETY: add_transposed_product checked every shape against m, n, k.
                unsafe { self.run(&mut d[start..end], a, b, 1f32) };
                Ok(())
            }
            (CpuStorage::F64(d), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let (a, b) = (contiguous_from(a, l2)?, contiguous_from(b, l3)?);
                // SAFETY: as above.
                unsafe { self.run(&mut d[start..end], a, b, 1f64) };
                Ok(())
            }
            _ => candle_core::bail!("add_transposed_product: only f32 and f64 accumulate"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
        use candle_core::DType;
        let offsets = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("add_transposed_product: operand is not contiguous".into())
            })
        };
        let ((d0, d1), (a0, a1), (b0, b1)) = (offsets(l1)?, offsets(l2)?, offsets(l3)?);
        let (m, n, k) = (self.m as i32, self.n as i32, self.k as i32);
        // Row-major acc [m, n] is column-major accᵀ [n, m] = accᵀ + bᵀ·a: cuBLAS gets b as
        // an n×k matrix (no transpose) and a, stored k×m row-major, transposed.
        let blas = s1.device.cublas_handle();
        macro_rules! gemm_for {
            ($t:ty, $one:expr) => {{
                let cfg = GemmConfig::<$t> {
                    transa: cublasOperation_t::CUBLAS_OP_N,
                    transb: cublasOperation_t::CUBLAS_OP_T,
                    m: n,
                    n: m,
                    k,
                    alpha: $one,
                    lda: n,
                    ldb: m,
                    beta: $one,
                    ldc: n,
                };
                let a = s2.as_cuda_slice::<$t>()?.slice(a0..a1);
                let b = s3.as_cuda_slice::<$t>()?.slice(b0..b1);
                let mut d = s1.as_cuda_slice_mut::<$t>()?.slice_mut(d0..d1);
                // SAFETY: shapes checked by add_transposed_product; views cover exactly them.
                unsafe { blas.gemm(cfg, &b, &a, &mut d) }
                    .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
            }};
        }
        match s1.dtype() {
            DType::F32 => gemm_for!(f32, 1.0f32),
            DType::F64 => gemm_for!(f64, 1.0f64),
            d => candle_core::bail!("add_transposed_product: unsupported dtype {d:?}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn adds_the_transposed_product_in_place() -> Result<()> {
        let dev = Device::Cpu;
        let acc = Tensor::arange(0f64, 12.0, &dev)?.reshape((3, 4))?;
        let before = acc.clone().copy()?;
        let a = (Tensor::arange(0f64, 15.0, &dev)?.reshape((5, 3))? * 0.5)?;
        let b = (Tensor::arange(0f64, 20.0, &dev)?.reshape((5, 4))? - 3.0)?;
        add_transposed_product(&acc, &a, &b)?;
        let want = (before + a.t()?.matmul(&b)?)?;
        let diff = (acc - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert_eq!(diff, 0.0);
        let bad = add_transposed_product(&Tensor::zeros((3, 4), DType::F64, &dev)?, &b, &a);
        assert!(bad.is_err());
        Ok(())
    }

    #[test]
    fn adds_in_place_across_chunks() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * (1 << 16) + 17;
        let acc = Tensor::arange(0f32, n as f32, &dev)?;
        let g = (Tensor::arange(0f32, n as f32, &dev)? * 0.5)?;
        let want = (acc.copy()? + &g)?;
        assert!(add_in_place(&acc, &g)?);
        assert_eq!((acc - want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let wrong = Tensor::zeros(5, DType::F32, &dev)?;
        assert!(add_in_place(&wrong, &g).is_err());
        Ok(())
    }
}
