//! The sampling math over one logit vector, in Rust: HF's repetition penalty, temperature, top-k,
//! top-p, min-p, a seeded draw, and the log-prob and entropy of the distribution drawn from.

use crate::request::{EmInf, SamplingParams};

/// Tokens more than this many nats below the best (after temperature) are treated as probability
/// zero: each has less than e^-30 ≈ 1e-13 of the best one's mass, all of them together less than
/// 1e-8 for any vocabulary below 10^5, below f32 resolution of the sums. This keeps every step O(V)
/// with a sort of only the plausible tokens.
const CUTOFF_NATS: f32 = 30.0;

/// A per-sample random stream (SplitMix64): seeded from (request seed, sample index) only, so a
/// sample's draws do not depend on which other samples share its batch.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, index: u64) -> Self {
        let mut s = seed ^ 0x5851_F42D_4C95_7F2D;
        let a = splitmix(&mut s);
        let mut t = index.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ a;
        Self(splitmix(&mut t))
    }

    pub fn next_u64(&mut self) -> u64 {
        splitmix(&mut self.0)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The set of token ids already present (prompt and generated), for the repetition penalty.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    bits: Vec<u64>,
    ids: Vec<u32>,
}

impl Seen {
    pub fn new(n_vocab: usize) -> Self {
        Self {
            bits: vec![0; n_vocab.div_ceil(64)],
            ids: Vec::new(),
        }
    }

    pub fn insert(&mut self, id: u32) {
        let (w, b) = (id as usize / 64, id % 64);
        if let Some(word) = self.bits.get_mut(w) {
            if *word & (1 << b) == 0 {
                *word |= 1 << b;
                self.ids.push(id);
            }
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// The drawn token and, over the distribution it came from, its log-prob and entropies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Picked {
    pub token: u32,
    pub logprob: f32,
    pub entropy: f32,
    pub full_entropy: f32,
}

/// Scratch space reused across steps.
#[derive(Default)]
pub struct Scratch {
    logits: Vec<f32>,
    cand: Vec<(u32, f32)>,
    weights: Vec<f64>,
    em_inf: Vec<f64>,
}

/// What one EM-INF adjustment did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmInfOutcome {
    /// Entropy of softmax(s) before and after, nats.
    pub entropy_before: f64,
    pub entropy_after: f64,
    /// KL(q‖p) of the adjusted q from the original p, nats.
    pub kl: f64,
    /// Gradient steps taken (the last one possibly cut back onto the bound).
    pub steps: usize,
}

/// `log softmax(s)` into `out`; returns the entropy of softmax(s).
fn log_softmax(s: &[f64], out: &mut Vec<f64>) -> f64 {
    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_z = max + s.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    out.clear();
    out.extend(s.iter().map(|x| x - log_z));
    -out.iter().map(|l| l.exp() * l).sum::<f64>()
}

/// KL(softmax(a) ‖ softmax(b)) from log-probabilities.
fn kl(log_q: &[f64], log_p: &[f64]) -> f64 {
    log_q
        .iter()
        .zip(log_p)
        .map(|(q, p)| q.exp() * (q - p))
        .sum::<f64>()
        .max(0.0)
}

/// EM-INF on logits `s` (already divided by the temperature), in place: gradient descent on
/// H(softmax(s)), whose gradient is written out, ∂H/∂s_v = −q_v (log q_v + H), so no autograd.
/// A step that would take KL(q‖p) past `max_kl` is bisected back onto the bound and ends it.
pub fn em_inf(s: &mut [f64], settings: &EmInf) -> EmInfOutcome {
    let mut log_p = Vec::with_capacity(s.len());
    let h0 = log_softmax(s, &mut log_p);
    let (mut log_q, mut trial, mut log_t) = (log_p.clone(), s.to_vec(), Vec::new());
    let mut h = h0;
    let mut outcome = EmInfOutcome {
        entropy_before: h0,
        entropy_after: h0,
        kl: 0.0,
        steps: 0,
    };
    let bound = settings.max_kl as f64;
    let lr = settings.lr as f64;
    let mut grad = vec![0.0; s.len()];
    for _ in 0..settings.steps {
        for (g, lq) in grad.iter_mut().zip(&log_q) {
            *g = -lq.exp() * (lq + h);
        }
        let at = |alpha: f64, trial: &mut Vec<f64>, log_t: &mut Vec<f64>| {
            for ((t, x), g) in trial.iter_mut().zip(s.iter()).zip(&grad) {
                *t = x - alpha * lr * g;
            }
            let h = log_softmax(trial, log_t);
            (h, kl(log_t, &log_p))
        };
        let (mut h_new, mut d) = at(1.0, &mut trial, &mut log_t);
        let crossed = d > bound;
        if crossed {
            // The largest fraction of the step that stays within the bound (0 always does).
            let (mut lo, mut hi) = (0.0, 1.0);
            for _ in 0..40 {
                let mid = 0.5 * (lo + hi);
                if at(mid, &mut trial, &mut log_t).1 <= bound {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            (h_new, d) = at(lo, &mut trial, &mut log_t);
        }
        s.copy_from_slice(&trial);
        std::mem::swap(&mut log_q, &mut log_t);
        h = h_new;
        outcome = EmInfOutcome {
            entropy_after: h,
            kl: d,
            steps: outcome.steps + 1,
            ..outcome
        };
        if crossed {
            break;
        }
    }
    outcome
}

/// HF's repetition penalty in place: logit / p if logit > 0, else logit × p, for each id in `seen`.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Index of the first largest value.
fn argmax(xs: &[f32]) -> usize {
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &x) in xs.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0
}

/// Entropy (nats) of softmax over `w` given as exp(s - max) weights and the shifted logits.
fn entropy(weights: &[f64], shifted: impl Iterator<Item = f32>) -> f32 {
    let z: f64 = weights.iter().sum();
    let mean: f64 = weights
        .iter()
        .zip(shifted)
        .map(|(w, s)| w * s as f64)
        .sum::<f64>()
        / z;
    (z.ln() - mean).max(0.0) as f32
}

/// Drops from `cand` (aligned with `weights`) the tokens top-p cannot keep, so that only the
/// heavy head is ordered: where the tokens of weight at least t hold `need` of the mass, the mass
/// strictly above any lighter token is at least that, and HF's rule drops it. t starts at 1e-3 of
/// the most likely token's weight and falls until that holds (with a margin far above rounding).
fn drop_light_tokens(cand: &mut Vec<(u32, f32)>, weights: &[f64], need: f64) {
    if cand.len() < 256 {
        return;
    }
    let mut t = 1e-3;
    while t > 1e-15 {
        let heavy: f64 = weights.iter().filter(|&&w| w >= t).sum();
        if heavy >= need * (1.0 + 1e-9) {
            let mut w = weights.iter();
            cand.retain(|_| *w.next().expect("aligned") >= t);
            return;
        }
        t *= 1e-3;
    }
}

/// Draws the next token from `logits` under `params` (see [`SamplingParams`] for the order).
pub fn pick(
    logits: &[f32],
    params: &SamplingParams,
    seen: &[u32],
    rng: &mut Rng,
    scratch: &mut Scratch,
) -> Picked {
    let Scratch {
        logits: buf,
        cand,
        weights,
        em_inf: adjusted,
    } = scratch;
    buf.clear();
    buf.extend_from_slice(logits);
    apply_repetition_penalty(buf, seen, params.repetition_penalty);

    let greedy = params.is_greedy();
    let temperature = if greedy { 1.0 } else { params.temperature };
    let best = argmax(buf);
    let max = buf[best] / temperature;

    // The plausible tokens, in vocabulary order; logits shifted so the best is 0.
    cand.clear();
    let floor = max - CUTOFF_NATS;
    // A logit far below the floor is skipped without its division; the rest take the exact test.
    let rough = floor * temperature - (floor * temperature).abs() * 1e-5 - 1e-5;
    for (i, &l) in buf.iter().enumerate() {
        if l < rough {
            continue;
        }
        let s = l / temperature;
        if s >= floor {
            cand.push((i as u32, s - max));
        }
    }
    weights.clear();
    weights.extend(cand.iter().map(|&(_, s)| (s as f64).exp()));
    let full_entropy = entropy(weights, cand.iter().map(|c| c.1));

    let mut best = best;
    if let Some(settings) = params.em_inf.as_ref().filter(|e| e.steps > 0) {
        adjusted.clear();
        adjusted.extend(cand.iter().map(|c| c.1 as f64));
        em_inf(adjusted, settings);
        let top = adjusted.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        for (c, a) in cand.iter_mut().zip(adjusted.iter()) {
            c.1 = (a - top) as f32;
        }
        // The adjusted argmax; ties: the lower id, as `argmax` does.
        best = cand
            .iter()
            .fold(
                (0u32, f32::NEG_INFINITY),
                |b, c| if c.1 > b.1 { *c } else { b },
            )
            .0 as usize;
        weights.clear();
        weights.extend(cand.iter().map(|&(_, s)| (s as f64).exp()));
    }

    if greedy {
        // Continue the random stream anyway, so greedy and sampled steps stay aligned.
        rng.next_u64();
        return Picked {
            token: best as u32,
            logprob: 0.0,
            entropy: 0.0,
            full_entropy,
        };
    }

    // Most likely first; ties: lower id first. Only the head that top-k/top-p look at is ordered.
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let head = |cand: &mut Vec<(u32, f32)>, m: usize| {
        if m < cand.len() {
            cand.select_nth_unstable_by(m - 1, desc);
        }
        cand[..m].sort_unstable_by(desc);
    };
    // top-k
    let mut z: f64 = weights.iter().sum();
    if params.top_k > 0 && params.top_k < cand.len() {
        cand.select_nth_unstable_by(params.top_k - 1, desc);
        cand.truncate(params.top_k);
        z = cand.iter().map(|&(_, s)| (s as f64).exp()).sum();
    }
    let mut keep = cand.len();
    // top-p: keep a token while the mass strictly above it is below top_p (HF's rule), at least one.
    if params.top_p < 1.0 {
        if params.top_k == 0 {
            drop_light_tokens(cand, weights, params.top_p as f64 * z);
        }
        let mut m = cand.len().min(64);
        loop {
            head(cand, m);
            let (mut above, mut n) = (0.0, 0);
            while n < m && (n == 0 || above < params.top_p as f64) {
                above += (cand[n].1 as f64).exp() / z;
                n += 1;
            }
            if n < m || above >= params.top_p as f64 || m == cand.len() {
                keep = n;
                break;
            }
            m = (m * 4).min(cand.len());
        }
    }
    cand.truncate(keep);
    // min-p: relative to the most likely token (weight 1), so the renormalisation does not matter.
    if params.min_p > 0.0 {
        let threshold = (params.min_p as f64).ln() as f32;
        cand.retain(|&(_, s)| s >= threshold);
    }

    weights.clear();
    weights.extend(cand.iter().map(|&(_, s)| (s as f64).exp()));
    let z: f64 = weights.iter().sum();
    let target = rng.uniform() * z;
    let mut acc = 0.0;
    let mut chosen = weights.len() - 1;
    for (j, w) in weights.iter().enumerate() {
        acc += w;
        if target < acc {
            chosen = j;
            break;
        }
    }
    Picked {
        token: cand[chosen].0,
        logprob: (weights[chosen] / z).ln() as f32,
        entropy: entropy(weights, cand.iter().map(|c| c.1)),
        full_entropy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            ..SamplingParams::default()
        }
    }

    /// Logits of a plausible next-token distribution: a few likely tokens and a long tail.
    fn step_logits(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = Rng::new(seed, 0);
        (0..n)
            .map(|i| 4.0 * rng.uniform() - if i < 4 { 0.0 } else { 3.0 })
            .collect()
    }

    #[test]
    fn em_inf_lowers_the_entropy_of_a_step() {
        for seed in 0..20 {
            let mut s = step_logits(50, seed);
            let loose = EmInf {
                steps: 5,
                lr: 1.0,
                max_kl: 10.0,
            };
            let out = em_inf(&mut s, &loose);
            assert_eq!(out.steps, 5);
            assert!(
                out.entropy_after < out.entropy_before - 1e-3,
                "{seed}: {out:?}"
            );
            // The outcome describes the logits left in place.
            let mut log_q = vec![];
            let h = log_softmax(&s, &mut log_q);
            assert!((h - out.entropy_after).abs() < 1e-12);
            // Every single step lowers it too: more steps, lower entropy.
            let mut one = step_logits(50, seed);
            let first = em_inf(&mut one, &EmInf { steps: 1, ..loose });
            assert!(first.entropy_after < first.entropy_before);
            assert!(out.entropy_after < first.entropy_after);
        }
    }

    #[test]
    fn em_inf_stays_on_its_kl_leash() {
        for seed in 0..20 {
            for bound in [0.0f32, 0.01, 0.1] {
                let original = step_logits(50, seed);
                let mut s = original.clone();
                let out = em_inf(
                    &mut s,
                    &EmInf {
                        steps: 50,
                        lr: 5.0,
                        max_kl: bound,
                    },
                );
                let (mut log_p, mut log_q) = (vec![], vec![]);
                log_softmax(&original, &mut log_p);
                log_softmax(&s, &mut log_q);
                let d = kl(&log_q, &log_p);
                assert!(d <= bound as f64 + 1e-9, "{seed} {bound}: kl {d}");
                assert!((d - out.kl).abs() < 1e-12);
                // The descent stopped on the bound, not short of it.
                assert!(out.steps < 50, "{seed} {bound}: {out:?}");
                assert!(d >= bound as f64 * 0.999, "{seed} {bound}: kl {d}");
                assert!(out.entropy_after <= out.entropy_before);
            }
        }
    }

    #[test]
    fn em_inf_with_zero_steps_is_the_plain_draw() {
        let logits: Vec<f32> = step_logits(200, 3).iter().map(|&x| x as f32).collect();
        let zero = EmInf {
            steps: 0,
            ..EmInf::DEFAULT
        };
        for base in [SamplingParams::greedy(8), SamplingParams::reference(8, 7)] {
            let with = SamplingParams {
                em_inf: Some(zero),
                ..base.clone()
            };
            let (mut r1, mut r2) = (Rng::new(7, 1), Rng::new(7, 1));
            let (mut s1, mut s2) = (Scratch::default(), Scratch::default());
            for _ in 0..50 {
                let a = pick(&logits, &base, &[1, 2], &mut r1, &mut s1);
                let b = pick(&logits, &with, &[1, 2], &mut r2, &mut s2);
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn em_inf_sharpens_what_is_drawn() {
        let logits: Vec<f32> = step_logits(200, 5).iter().map(|&x| x as f32).collect();
        let plain = params(1.0);
        let inf = SamplingParams {
            em_inf: Some(EmInf {
                steps: 5,
                lr: 1.0,
                max_kl: 1.0,
            }),
            ..plain.clone()
        };
        let (mut r, mut s) = (Rng::new(0, 0), Scratch::default());
        let a = pick(&logits, &plain, &[], &mut r, &mut s);
        let b = pick(&logits, &inf, &[], &mut r, &mut s);
        // The model's own entropy is reported unchanged; the one drawn from is lower.
        assert_eq!(a.full_entropy, b.full_entropy);
        assert!(
            b.entropy < a.entropy - 0.05,
            "{} vs {}",
            b.entropy,
            a.entropy
        );
        assert!(
            "steps=3,kl=0.5".parse::<EmInf>().unwrap()
                == EmInf {
                    steps: 3,
                    lr: 1.0,
                    max_kl: 0.5
                }
        );
        for bad in ["steps=-1", "lr=0", "kl=-1", "speed=3", "steps"] {
            assert!(bad.parse::<EmInf>().is_err(), "{bad}");
        }
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn greedy_is_argmax_after_penalty() {
        let mut rng = Rng::new(0, 0);
        let mut s = Scratch::default();
        let p = SamplingParams {
            repetition_penalty: 3.0,
            ..SamplingParams::greedy(4)
        };
        assert_eq!(pick(&[3.0, 2.0, 0.0], &p, &[], &mut rng, &mut s).token, 0);
        assert_eq!(pick(&[3.0, 2.0, 0.0], &p, &[0], &mut rng, &mut s).token, 1);
    }

    #[test]
    fn frequencies_match_softmax_at_temperature() {
        let logits = [1.0f32, 0.0, -1.0, 0.5];
        let t = 0.7;
        let z: f64 = logits.iter().map(|&l| ((l / t) as f64).exp()).sum();
        let mut counts = [0usize; 4];
        let mut s = Scratch::default();
        let mut picked = None;
        for i in 0..40_000 {
            let mut rng = Rng::new(7, i);
            let p = pick(&logits, &params(t), &[], &mut rng, &mut s);
            counts[p.token as usize] += 1;
            picked = Some(p);
        }
        for (i, &c) in counts.iter().enumerate() {
            let expected = ((logits[i] / t) as f64).exp() / z;
            assert!(
                (c as f64 / 40_000.0 - expected).abs() < 0.01,
                "token {i}: {c} vs {expected}"
            );
        }
        let h: f64 = logits
            .iter()
            .map(|&l| ((l / t) as f64).exp() / z)
            .map(|p| -p * p.ln())
            .sum();
        let p = picked.unwrap();
        assert!((p.entropy as f64 - h).abs() < 1e-5 && (p.full_entropy as f64 - h).abs() < 1e-5);
    }

    #[test]
    fn truncations_keep_what_hf_keeps() {
        // probabilities 0.5, 0.25, 0.125, 0.125 at T = 1
        let logits = [0.0f32, -(2f32.ln()), -(4f32.ln()), -(4f32.ln())];
        let mut s = Scratch::default();
        let support = |p: SamplingParams, s: &mut Scratch| {
            let mut seen = [false; 4];
            for i in 0..2000 {
                seen[pick(&logits, &p, &[], &mut Rng::new(1, i), s).token as usize] = true;
            }
            seen.iter().filter(|&&x| x).count()
        };
        assert_eq!(
            support(
                SamplingParams {
                    top_k: 2,
                    ..params(1.0)
                },
                &mut s
            ),
            2
        );
        // mass above token 2 is 0.75 < 0.8, so it is kept; above token 3 is 0.875
        assert_eq!(
            support(
                SamplingParams {
                    top_p: 0.8,
                    ..params(1.0)
                },
                &mut s
            ),
            3
        );
        assert_eq!(
            support(
                SamplingParams {
                    top_p: 0.75,
                    ..params(1.0)
                },
                &mut s
            ),
            2
        );
        assert_eq!(
            support(
                SamplingParams {
                    top_p: 0.01,
                    ..params(1.0)
                },
                &mut s
            ),
            1
        );
        assert_eq!(
            support(
                SamplingParams {
                    min_p: 0.3,
                    ..params(1.0)
                },
                &mut s
            ),
            2
        );
        // the kept distribution is renormalised: top-k 2 leaves (2/3, 1/3)
        let p = pick(
            &logits,
            &SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
            &[],
            &mut Rng::new(0, 0),
            &mut s,
        );
        let h = -(2.0f64 / 3.0 * (2.0f64 / 3.0).ln() + 1.0 / 3.0 * (1.0f64 / 3.0).ln());
        assert!((p.entropy as f64 - h).abs() < 1e-6);
        let q = if p.token == 0 {
            2.0f64 / 3.0
        } else {
            1.0 / 3.0
        };
        assert!((p.logprob as f64 - q.ln()).abs() < 1e-6);
    }

    #[test]
    fn streams_differ_by_index_and_repeat_by_seed() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(1, 0).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(Rng::new(1, 0).next_u64(), Rng::new(1, 1).next_u64());
        assert_ne!(Rng::new(1, 0).next_u64(), Rng::new(2, 0).next_u64());
    }

    /// `pick` as it was before its fast paths: the oracle they must match bit for bit.
    fn reference_pick(
        logits: &[f32],
        params: &SamplingParams,
        seen: &[u32],
        rng: &mut Rng,
        scratch: &mut Scratch,
    ) -> Picked {
        let Scratch {
            logits: buf,
            cand,
            weights,
            em_inf: adjusted,
        } = scratch;
        buf.clear();
        buf.extend_from_slice(logits);
        apply_repetition_penalty(buf, seen, params.repetition_penalty);

        let greedy = params.is_greedy();
        let temperature = if greedy { 1.0 } else { params.temperature };
        let best = argmax(buf);
        let max = buf[best] / temperature;

        // The plausible tokens, in vocabulary order; logits shifted so the best is 0.
        cand.clear();
        let floor = max - CUTOFF_NATS;
        for (i, &l) in buf.iter().enumerate() {
            let s = l / temperature;
            if s >= floor {
                cand.push((i as u32, s - max));
            }
        }
        weights.clear();
        weights.extend(cand.iter().map(|&(_, s)| (s as f64).exp()));
        let full_entropy = entropy(weights, cand.iter().map(|c| c.1));

        let mut best = best;
        if let Some(settings) = params.em_inf.as_ref().filter(|e| e.steps > 0) {
            adjusted.clear();
            adjusted.extend(cand.iter().map(|c| c.1 as f64));
            em_inf(adjusted, settings);
            let top = adjusted.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for (c, a) in cand.iter_mut().zip(adjusted.iter()) {
                c.1 = (a - top) as f32;
            }
            // The adjusted argmax; ties: the lower id, as `argmax` does.
            best = cand
                .iter()
                .fold(
                    (0u32, f32::NEG_INFINITY),
                    |b, c| if c.1 > b.1 { *c } else { b },
                )
                .0 as usize;
            weights.clear();
            weights.extend(cand.iter().map(|&(_, s)| (s as f64).exp()));
        }

        if greedy {
            // Continue the random stream anyway, so greedy and sampled steps stay aligned.
            rng.next_u64();
            return Picked {
                token: best as u32,
                logprob: 0.0,
                entropy: 0.0,
                full_entropy,
            };
        }

        // Most likely first; ties: lower id first. Only the head that top-k/top-p look at is ordered.
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let head = |cand: &mut Vec<(u32, f32)>, m: usize| {
            if m < cand.len() {
                cand.select_nth_unstable_by(m - 1, desc);
            }
            cand[..m].sort_unstable_by(desc);
        };
        // top-k
        let mut z: f64 = weights.iter().sum();
        if params.top_k > 0 && params.top_k < cand.len() {
            cand.select_nth_unstable_by(params.top_k - 1, desc);
            cand.truncate(params.top_k);
            z = cand.iter().map(|&(_, s)| (s as f64).exp()).sum();
        }
        let mut keep = cand.len();
        // top-p: keep a token while the mass strictly above it is below top_p (HF's rule), at least one.
        if params.top_p < 1.0 {
            let mut m = cand.len().min(64);
            loop {
                head(cand, m);
                let (mut above, mut n) = (0.0, 0);
                while n < m && (n == 0 || above < params.top_p as f64) {
                    above += (cand[n].1 as f64).exp() / z;
                    n += 1;
                }
                if n < m || above >= params.top_p as f64 || m == cand.len() {
                    keep = n;
                    break;
                }
                m = (m * 4).min(cand.len());
            }
        }
        cand.truncate(keep);
        // min-p: relative to the most likely token (weight 1), so the renormalisation does not matter.
        if params.min_p > 0.0 {
            let threshold = (params.min_p as f64).ln() as f32;
            cand.retain(|&(_, s)| s >= threshold);
        }

        weights.clear();
        weights.extend(cand.iter().map(|&(_, s)| (s as f64).exp()));
        let z: f64 = weights.iter().sum();
        let target = rng.uniform() * z;
        let mut acc = 0.0;
        let mut chosen = weights.len() - 1;
        for (j, w) in weights.iter().enumerate() {
            acc += w;
            if target < acc {
                chosen = j;
                break;
            }
        }
        Picked {
            token: cand[chosen].0,
            logprob: (weights[chosen] / z).ln() as f32,
            entropy: entropy(weights, cand.iter().map(|c| c.1)),
            full_entropy,
        }
    }

    /// The fast paths (the division skipped far below the floor, light tokens dropped before
    /// top-p orders the head) draw what the plain pass drew, bit for bit, on vocabulary-sized
    /// logits: flat ones (every token a candidate) and peaked ones, under every setting mix.
    #[test]
    fn fast_paths_change_no_draw() {
        let mut s1 = Scratch::default();
        let mut s2 = Scratch::default();
        for case in 0..60u64 {
            let mut g = Rng::new(case, 7);
            let spread = [0.5, 3.0, 8.0, 20.0][case as usize % 4];
            let logits: Vec<f32> = (0..49_152)
                .map(|i| (spread * g.uniform()) as f32 + if i % 997 == 0 { 6.0 } else { 0.0 })
                .collect();
            let p = SamplingParams {
                temperature: [0.0, 0.5, 1.0, 0.7][case as usize % 4],
                top_p: [0.95, 1.0, 0.5, 0.9][(case / 4) as usize % 4],
                top_k: [0, 0, 40][case as usize % 3],
                repetition_penalty: [1.15, 1.0][case as usize % 2],
                ..SamplingParams::default()
            };
            let seen = [3u32, 997, 1994, 40_000];
            for draw in 0..4 {
                let a = pick(&logits, &p, &seen, &mut Rng::new(case, draw), &mut s1);
                let b = reference_pick(&logits, &p, &seen, &mut Rng::new(case, draw), &mut s2);
                assert_eq!(a.token, b.token, "case {case} draw {draw}");
                assert_eq!(a.logprob.to_bits(), b.logprob.to_bits(), "case {case}");
                assert_eq!(a.entropy.to_bits(), b.entropy.to_bits(), "case {case}");
                assert_eq!(
                    a.full_entropy.to_bits(),
                    b.full_entropy.to_bits(),
                    "case {case}"
                );
            }
        }
    }
}
