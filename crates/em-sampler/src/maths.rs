//! The sampling math over one logit vector, in Rust: HF's repetition penalty, temperature, top-k,
//! top-p, min-p, a seeded draw, and the log-prob and entropy of the distribution drawn from.

use crate::request::SamplingParams;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            ..SamplingParams::default()
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
}
