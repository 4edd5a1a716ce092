//! What makes the fused kernels' inner loops vectorize. The crate is compiled for baseline x86-64
//! (SSE2, no FMA) so that a build runs on any x86-64 CPU; [`vectorized`] runs a loop compiled for
//! AVX2 and FMA where the CPU has them, as the gemm crate does for its own kernels. `exp` of f32
//! is libm's `expf`, a call per value that no loop around it can vectorize; [`exp_f32`] is the
//! same function in arithmetic that vectorizes. Sums that must not lose precision go through
//! [`sum_f64`]: lanes of the value type over short blocks, each block added in f64.

use candle_core::WithDType;

use super::Real;

/// Runs `f` compiled for AVX2 and FMA where this CPU has them, as is otherwise.
///
/// Only what is inlined into `f` gets the wider instructions: the loops it runs should be in
/// `f` itself or in functions marked `#[inline(always)]`.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: both features were detected on this CPU.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `eˣ` in f32, within 2 ulp of the exact value, in branch-free arithmetic: Cody–Waite range
/// reduction `x = n·ln 2 + r` and Cephes' degree-6 polynomial for `eʳ` on `|r| ≤ ln 2 / 2`.
/// Below −87 it returns 0 (the exact value is under 1.7e-38, where f32 is subnormal), above 88
/// infinity; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ from its exponent bits; n lies in [−125, 127] after the clamp.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let out = y * two_n;
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        out
    }
}

/// `Σ f(xᵢ)` in f64: sixteen lanes of `T` over blocks of 256 values, each block's lanes added in
/// f64, so that the lanes vectorize and no lane adds more than 16 terms before the f64 sum.
#[inline(always)]
pub(crate) fn sum_f64<T: Real>(xs: &[T], f: impl Fn(T) -> T) -> f64 {
    sum2_f64(xs, xs, |a, _| f(a))
}

/// `Σ f(aᵢ, bᵢ)` over the common length of `a` and `b`, summed as [`sum_f64`] sums. (Plain
/// loops: an iterator adaptor's `fold` would be a function of its own, compiled without the
/// caller's AVX2.)
#[inline(always)]
pub(crate) fn sum2_f64<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    let n = a.len().min(b.len());
    let mut total = 0f64;
    let mut start = 0;
    while start < n {
        let end = n.min(start + 256);
        let mut lanes = [T::zero(); 16];
        let full = start + (end - start) / 16 * 16;
        let mut i = start;
        while i < full {
            let (ga, gb) = (&a[i..i + 16], &b[i..i + 16]);
            for l in 0..16 {
                lanes[l] += f(ga[l], gb[l]);
            }
            i += 16;
        }
        for l in lanes {
            total += WithDType::to_f64(l);
        }
        for k in full..end {
            total += WithDType::to_f64(f(a[k], b[k]));
        }
        start = end;
    }
    total
}

/// `max f(xᵢ)` (−∞ for none), over sixteen lanes so that it vectorizes.
#[inline(always)]
pub(crate) fn max_of<T: Real>(xs: &[T], f: impl Fn(T) -> T) -> T {
    let mut lanes = [T::neg_infinity(); 16];
    let full = xs.len() / 16 * 16;
    let mut i = 0;
    while i < full {
        let group = &xs[i..i + 16];
        for l in 0..16 {
            let v = f(group[l]);
            lanes[l] = if v > lanes[l] { v } else { lanes[l] };
        }
        i += 16;
    }
    let mut max = T::neg_infinity();
    for v in lanes {
        max = if v > max { v } else { max };
    }
    for &x in &xs[full..] {
        let v = f(x);
        max = if v > max { v } else { max };
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp();
            let got = vectorized(|| exp_f32(x)) as f64;
            // One ulp of the exact value in f32.
            let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((got - exact).abs() / ulp);
            x += 0.001_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        for (x, want) in [(0.0f32, 1.0f32), (-100.0, 0.0), (100.0, f32::INFINITY)] {
            assert_eq!(exp_f32(x), want, "exp({x})");
        }
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn sums_lose_no_more_than_sixteen_term_f32_sums() {
        let xs: Vec<f32> = (0..100_007).map(|i| 1.0 + (i % 97) as f32 * 1e-3).collect();
        // The squares as f32 computes them, summed exactly enough in f64.
        let exact: f64 = xs.iter().map(|&v| (v * v) as f64).sum();
        let got = vectorized(|| sum_f64(&xs, |v| v * v));
        assert!(
            (got - exact).abs() <= 16.0 * f32::EPSILON as f64 * exact,
            "{got} vs {exact}"
        );
        let pairs = vectorized(|| sum2_f64(&xs, &xs[1..], |a, b| a * b));
        let exact: f64 = xs.iter().zip(&xs[1..]).map(|(&a, &b)| (a * b) as f64).sum();
        assert!((pairs - exact).abs() <= 16.0 * f32::EPSILON as f64 * exact);
        assert_eq!(max_of(&xs, |v| -v), -1.0);
        assert_eq!(max_of::<f32>(&[], |v| v), f32::NEG_INFINITY);
    }
}
