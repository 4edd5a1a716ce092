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

/// Each value's rank from 1, ties given the mean of the ranks they span.
fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut out = vec![0.0; xs.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && xs[order[j + 1]] == xs[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = mean_rank;
        }
        i = j + 1;
    }
    out
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// Spearman's rank correlation of paired observations (ties at their mean rank; NaN when either
/// side is constant or fewer than 2 pairs are given).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "paired observations");
    if x.len() < 2 {
        return f64::NAN;
    }
    pearson(&ranks(x), &ranks(y))
}

/// Spearman's ρ with a 95% percentile bootstrap interval over the pairs (`resamples` draws with
/// replacement, seeded; draws where a side is constant are left out).
pub fn spearman_interval(x: &[f64], y: &[f64], resamples: usize, seed: u64) -> (f64, f64, f64) {
    let rho = spearman(x, y);
    let n = x.len();
    let mut state = seed;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut draws: Vec<f64> = Vec::with_capacity(resamples);
    let (mut bx, mut by) = (vec![0.0; n], vec![0.0; n]);
    for _ in 0..resamples {
        for k in 0..n {
            let i = (next() % n.max(1) as u64) as usize;
            bx[k] = x[i];
            by[k] = y[i];
        }
        let r = spearman(&bx, &by);
        if r.is_finite() {
            draws.push(r);
        }
    }
    if draws.is_empty() {
        return (rho, f64::NAN, f64::NAN);
    }
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((q * (draws.len() - 1) as f64).round() as usize).min(draws.len() - 1)];
    (rho, at(0.025), at(0.975))
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

    #[test]
    fn spearman_matches_known_values() {
        // Monotone but not linear: ρ = 1.
        assert!((spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 8.0, 27.0, 64.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // scipy.stats.spearmanr([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]).statistic == 0.8
        assert!((spearman(&[1., 2., 3., 4., 5.], &[2., 1., 4., 3., 5.]) - 0.8).abs() < 1e-12);
        // With ties: spearmanr([1, 2, 2, 3], [1, 3, 2, 4]).statistic == 0.9486832980505138
        let r = spearman(&[1., 2., 2., 3.], &[1., 3., 2., 4.]);
        assert!((r - 0.948_683_298_050_513_8).abs() < 1e-12, "{r}");
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    fn the_bootstrap_interval_holds_rho_and_narrows_with_more_pairs() {
        let x: Vec<f64> = (0..40).map(f64::from).collect();
        // A noisy increasing relation: ρ well above 0, short of 1.
        let y: Vec<f64> = x.iter().map(|v| v + 12.0 * ((v * 2.7).sin())).collect();
        let (rho, lo, hi) = spearman_interval(&x, &y, 2000, 7);
        assert!(
            lo < rho && rho < hi && lo > 0.0 && hi <= 1.0,
            "{rho} [{lo}, {hi}]"
        );
        let (_, lo10, hi10) = spearman_interval(&x[..10], &y[..10], 2000, 7);
        assert!(hi10 - lo10 > hi - lo);
        // Seeded: the same draws.
        assert_eq!(
            spearman_interval(&x, &y, 500, 3),
            spearman_interval(&x, &y, 500, 3)
        );
    }
}
