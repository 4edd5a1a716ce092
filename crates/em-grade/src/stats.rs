//! Intervals for accuracies and pass rates, so every printed accuracy carries its uncertainty.

/// The 95% Wilson score interval of `successes` out of `n` (0..1 when n is 0).
pub fn wilson_interval(successes: usize, n: usize) -> (f64, f64) {
    wilson_interval_p(successes as f64 / n.max(1) as f64, n)
}

/// The 95% Wilson interval of a proportion `p` observed over `n` items (p may be fractional, e.g.
/// an average over several samples per item).
pub fn wilson_interval_p(p: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n = n as f64;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    let lo = if p <= 0.0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if p >= 1.0 {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

/// Mean and normal-approximation 95% interval of per-item scores (e.g. avg@n per item).
pub fn mean_interval(scores: &[f64]) -> (f64, f64, f64) {
    let n = scores.len();
    if n == 0 {
        return (0.0, 0.0, 1.0);
    }
    let mean = scores.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, mean, mean);
    }
    let var = scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = 1.959_963_984_540_054 * (var / n as f64).sqrt();
    (mean, mean - half, mean + half)
}

/// Paired difference `a - b` of per-item scores: mean and its 95% interval.
pub fn paired_difference(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    mean_interval(&d)
}

/// Exact two-sided McNemar p-value from the discordant counts: `b` items only the first system
/// got right, `c` only the second (a binomial test of b against Bin(b + c, 1/2)).
pub fn mcnemar_exact_p(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X <= k) for X ~ Bin(n, 1/2), summed in log space to stay finite for large n.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_published_values() {
        // 4 of 8: the interval METHOD.md warns about is wide.
        let (lo, hi) = wilson_interval(4, 8);
        assert!(
            (lo - 0.2152).abs() < 1e-3 && (hi - 0.7848).abs() < 1e-3,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(0, 10);
        assert!(lo == 0.0 && (hi - 0.2775).abs() < 1e-3, "{hi}");
        let (lo, hi) = wilson_interval(81, 263);
        assert!(
            (lo - 0.2553).abs() < 1e-3 && (hi - 0.3662).abs() < 1e-3,
            "{lo} {hi}"
        );
    }

    #[test]
    fn mcnemar_matches_the_binomial_test() {
        // b=1, c=6: 2 * P(X<=1 | n=7) = 2 * 8/128 = 0.125.
        assert!((mcnemar_exact_p(1, 6) - 0.125).abs() < 1e-12);
        assert!((mcnemar_exact_p(6, 1) - 0.125).abs() < 1e-12);
        assert_eq!(mcnemar_exact_p(0, 0), 1.0);
        assert_eq!(mcnemar_exact_p(5, 5), 1.0);
        // b=0, c=10: 2 / 1024.
        assert!((mcnemar_exact_p(0, 10) - 2.0 / 1024.0).abs() < 1e-12);
        assert!(mcnemar_exact_p(400, 600) < 1e-9);
    }

    #[test]
    fn paired_difference_of_identical_systems_is_zero() {
        let a = [1.0, 0.0, 1.0, 1.0];
        assert_eq!(paired_difference(&a, &a), (0.0, 0.0, 0.0));
        let (d, lo, hi) = paired_difference(&[1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, 0.0, 0.0]);
        assert!((d - 0.5).abs() < 1e-12 && lo < d && d < hi);
    }
}
