//! The label-free safeguard of a training run: a small held-out set of unlabeled prompts, sampled
//! from the weights being trained every `--watch-every` updates, and a verdict on what those
//! samples do.
//!
//! Entropy falls and answer agreement rises under EM whether it helps or hurts: they are the
//! objective, not a warning. What separates the two is whether the model still *finishes*: the
//! share of responses that stop by themselves with a parseable final answer, their length and
//! repetition, and how many held-out prompts lose the majority answer they had before training.
//! Thresholds come from the step-0 sampling noise: two rounds of the base model with different
//! seeds give binomial and standard errors and a drift count that sampling alone produces. Later
//! rounds reuse the first round's seed (common random numbers), so what moves is the model.

use std::path::Path;

use em_sampler::{FinishReason, Request, Sample, SamplingParams};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::prompt::RenderedPrompt;
use crate::{Backend, Result};

/// Standard errors a signal may move the wrong way before the safeguard acts.
pub const Z: f64 = 2.5;

/// What one round of held-out samples shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    /// Updates the sampled weights had taken.
    pub weights_step: usize,
    /// Responses in the round.
    pub n: usize,
    /// Share of responses that ended by themselves (not at the token limit) with a final answer.
    pub answered: f64,
    /// Mean and standard deviation of the response length, tokens.
    pub length: f64,
    pub length_sd: f64,
    /// Mean share of repeated token 4-grams within a response, and its standard deviation.
    pub repetition: f64,
    pub repetition_sd: f64,
    /// Each prompt's majority answer (held by more than half its samples), or none.
    pub majority: Vec<Option<String>>,
    /// Each prompt's share of responses that ended by themselves with a final answer (empty in
    /// rounds recorded before it was kept).
    #[serde(default)]
    pub answered_each: Vec<f64>,
}

/// Share of a response's token 4-grams that repeat an earlier one of the same response.
pub fn repetition(tokens: &[u32]) -> f64 {
    if tokens.len() < 5 {
        return 0.0;
    }
    let grams: Vec<&[u32]> = tokens.windows(4).collect();
    let mut seen = std::collections::HashSet::with_capacity(grams.len());
    let repeats = grams.iter().filter(|g| !seen.insert(**g)).count();
    repeats as f64 / grams.len() as f64
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, v.sqrt())
}

impl Round {
    /// The round of `samples` (per prompt) drawn from weights after `weights_step` updates.
    pub fn from_samples(weights_step: usize, samples: &[Vec<Sample>]) -> Self {
        let all: Vec<&Sample> = samples.iter().flatten().collect();
        let preds: Vec<Vec<Option<String>>> = samples
            .iter()
            .map(|p| {
                p.iter()
                    .map(|s| em_grade::extract_answer(&s.text))
                    .collect()
            })
            .collect();
        let done = |s: &Sample, pred: &Option<String>| {
            !matches!(s.finish, FinishReason::Length) && pred.is_some()
        };
        let answered_each: Vec<f64> = samples
            .iter()
            .zip(&preds)
            .map(|(p, pr)| {
                let k = p.iter().zip(pr).filter(|(s, pred)| done(s, pred)).count();
                k as f64 / p.len().max(1) as f64
            })
            .collect();
        let answered = all
            .iter()
            .zip(preds.iter().flatten())
            .filter(|(s, pred)| done(s, pred))
            .count();
        let lens: Vec<f64> = all.iter().map(|s| s.n_tokens as f64).collect();
        let reps: Vec<f64> = all.iter().map(|s| repetition(&s.tokens)).collect();
        let (length, length_sd) = mean_sd(&lens);
        let (rep, rep_sd) = mean_sd(&reps);
        let majority = preds
            .iter()
            .map(|p| {
                em_grade::plurality(p)
                    .filter(|(_, c)| 2 * c > p.len())
                    .map(|(a, _)| a)
            })
            .collect();
        Round {
            weights_step,
            n: all.len(),
            answered: answered as f64 / all.len().max(1) as f64,
            length,
            length_sd,
            repetition: rep,
            repetition_sd: rep_sd,
            majority,
            answered_each,
        }
    }

    /// Prompts whose majority answer in `reference` is no longer their majority answer here.
    pub fn drifted_from(&self, reference: &Round) -> usize {
        reference
            .majority
            .iter()
            .zip(&self.majority)
            .filter(|(r, now)| match (r, now) {
                (Some(r), Some(n)) => !(r == n || em_grade::is_equivalent(n, r)),
                (Some(_), None) => true,
                (None, _) => false,
            })
            .count()
    }
}

/// The step-0 reference: a round of the base model, and the noise a second seed shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub round: Round,
    /// The same base model sampled with another seed.
    pub replicate: Round,
}

/// Tolerances derived from the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Largest fall of the answered share, absolute.
    pub answered_drop: f64,
    /// Largest rise of the mean length, tokens.
    pub length_rise: f64,
    /// Largest rise of the mean repetition.
    pub repetition_rise: f64,
    /// Most prompts that may lose their step-0 majority answer.
    pub drift: usize,
}

impl std::fmt::Display for Thresholds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the answered share may fall by {:.3}, mean length rise by {:.1} tokens, repetition \
             rise by {:.3}, and {} held-out majority answer{} may change",
            self.answered_drop,
            self.length_rise,
            self.repetition_rise,
            self.drift,
            if self.drift == 1 { "" } else { "s" }
        )
    }
}

impl Baseline {
    /// `Z` standard errors of each signal (binomial for the answered share, the responses' own
    /// spread for length and repetition), and never less than the two step-0 seeds differ by; the
    /// drift allowed is twice what the second seed shows, plus two.
    pub fn thresholds(&self) -> Thresholds {
        let (r, b) = (&self.round, &self.replicate);
        let m = r.n.max(1) as f64;
        let a = r.answered.clamp(1.0 / m, 1.0 - 1.0 / m);
        let se = (a * (1.0 - a) / m).sqrt();
        let noise_drift = b.drifted_from(r);
        Thresholds {
            answered_drop: (Z * se).max((r.answered - b.answered).abs()),
            length_rise: (Z * r.length_sd / m.sqrt()).max((r.length - b.length).abs()),
            repetition_rise: (Z * r.repetition_sd / m.sqrt())
                .max((r.repetition - b.repetition).abs()),
            drift: 2 * noise_drift + 2,
        }
    }
}

/// The safeguard's reading of one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Why it acts, or none.
    pub alarm: Option<String>,
    /// Every signal, its step-0 value and its threshold (for metrics.jsonl).
    pub signals: Value,
}

/// Rounds of steady decline that count as a trend (with [`Baseline::trend_drop`]).
pub const TREND_ROUNDS: usize = 3;

impl Baseline {
    /// The fall over [`TREND_ROUNDS`] falling rounds that counts as a trend: one binomial standard
    /// error of the step-0 answered share (a level fall needs [`Z`] of them).
    pub fn trend_drop(&self) -> f64 {
        self.thresholds().answered_drop / Z
    }
}

/// Judges `round` against the baseline, `earlier` being the answered shares of this run's rounds
/// since step 0 (not counting the step-0 reference). It acts when the answered share falls beyond
/// its threshold; or when it has fallen in each of the last [`TREND_ROUNDS`] rounds, below its
/// step-0 value, by one standard error in all (the later rounds share the step-0 seed, so a model
/// that does not change gives the same share, and a steady fall is the model's); or when length
/// and repetition both rise beyond theirs; or when more prompts than the threshold lose their
/// step-0 majority answer while the answered share has not risen (a model that helps changes
/// answers too, but finishes more often).
pub fn judge(baseline: &Baseline, round: &Round, earlier: &[f64]) -> Verdict {
    let t = baseline.thresholds();
    let b = &baseline.round;
    let drift = round.drifted_from(b);
    let answered_fell = b.answered - round.answered > t.answered_drop;
    let mut recent: Vec<f64> = std::iter::once(b.answered)
        .chain(earlier.iter().copied())
        .chain(std::iter::once(round.answered))
        .collect();
    recent.drain(..recent.len().saturating_sub(TREND_ROUNDS + 1));
    let trend = recent.len() == TREND_ROUNDS + 1
        && recent.windows(2).all(|w| w[1] < w[0])
        && round.answered < b.answered
        && recent[0] - round.answered >= baseline.trend_drop();
    let longer = round.length - b.length > t.length_rise;
    let repetitive = round.repetition - b.repetition > t.repetition_rise;
    let drifted = drift > t.drift && round.answered <= b.answered;
    let mut reasons = vec![];
    if answered_fell {
        reasons.push(format!(
            "answered share fell from {:.3} to {:.3} (threshold −{:.3})",
            b.answered, round.answered, t.answered_drop
        ));
    }
    if trend && !answered_fell {
        reasons.push(format!(
            "answered share fell in each of the last {TREND_ROUNDS} rounds, {:.3} → {:.3} (trend threshold −{:.3})",
            recent[0],
            round.answered,
            baseline.trend_drop()
        ));
    }
    if longer && repetitive {
        reasons.push(format!(
            "responses grew longer ({:.1} → {:.1} tokens, threshold +{:.1}) and more repetitive ({:.3} → {:.3}, threshold +{:.3})",
            b.length, round.length, t.length_rise, b.repetition, round.repetition, t.repetition_rise
        ));
    }
    if drifted {
        reasons.push(format!(
            "{drift} of {} held-out prompts lost their step-0 majority answer (threshold {}) while the answered share did not rise",
            b.majority.len(),
            t.drift
        ));
    }
    Verdict {
        alarm: (!reasons.is_empty()).then(|| reasons.join("; ")),
        signals: json!({
            "weights_step": round.weights_step,
            "answered": round.answered, "answered_step0": b.answered, "answered_drop_max": t.answered_drop,
            "length": round.length, "length_step0": b.length, "length_rise_max": t.length_rise,
            "repetition": round.repetition, "repetition_step0": b.repetition, "repetition_rise_max": t.repetition_rise,
            "drifted": drift, "drift_max": t.drift, "prompts": b.majority.len(), "responses": round.n,
            "trend": trend, "trend_drop_min": baseline.trend_drop(),
        }),
    }
}

/// Samples `k` responses to each watched prompt from the GGUF at `gguf`.
pub fn sample_round(
    backend: &dyn Backend,
    gguf: &Path,
    prompts: &[RenderedPrompt],
    k: usize,
    params: &SamplingParams,
) -> Result<Vec<Vec<Sample>>> {
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.to_prompt(),
            n_samples: k,
            params: SamplingParams {
                seed: crate::item_seed(params.seed, &format!("watch-{i}")),
                ..params.clone()
            },
        })
        .collect();
    let mut out = vec![vec![]; requests.len()];
    backend.with_sampler(gguf, &mut |sampler| {
        let bar = crate::drive::progress_bar(requests.len() as u64, 0, "prompts", "watch");
        crate::drive::sample_each(
            sampler,
            &requests,
            &bar,
            crate::drive::Count::Requests,
            &mut |i, samples| {
                out[i] = samples;
                Ok(true)
            },
        )?;
        Ok(())
    })?;
    if let Some(i) = out.iter().position(|s| s.len() != k) {
        anyhow::bail!(
            "{}: the sampler returned {} of {k} responses for watched prompt {i}",
            gguf.display(),
            out[i].len()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_read_as_a_sentence() {
        let t = Thresholds {
            answered_drop: 0.09935053686218653,
            length_rise: 2.370378584915661,
            repetition_rise: 0.0123,
            drift: 1,
        };
        assert_eq!(
            t.to_string(),
            "the answered share may fall by 0.099, mean length rise by 2.4 tokens, repetition \
             rise by 0.012, and 1 held-out majority answer may change"
        );
    }

    fn sample(text: &str, n_tokens: usize, finish: FinishReason) -> Sample {
        Sample {
            text: text.into(),
            tokens: (0..n_tokens as u32).collect(),
            n_tokens,
            finish,
            request: 0,
            index: 0,
            stats: None,
        }
    }

    /// `answered` of 8 prompts × 4 samples answer `\boxed{i}`; the rest ramble to the limit.
    fn round(step: usize, answered_per_prompt: usize) -> Round {
        let samples: Vec<Vec<Sample>> = (0..8)
            .map(|i| {
                (0..4)
                    .map(|j| {
                        if j < answered_per_prompt {
                            sample(&format!("so \\boxed{{{i}}}"), 20, FinishReason::Eos)
                        } else {
                            sample("Hmm, let me think.", 48, FinishReason::Length)
                        }
                    })
                    .collect()
            })
            .collect();
        Round::from_samples(step, &samples)
    }

    #[test]
    fn repetition_counts_repeated_four_grams() {
        assert_eq!(repetition(&[1, 2, 3, 4, 5, 6]), 0.0);
        // 1 2 3 4 1 2 3 4: grams 1234 2341 3412 4123 1234 → one repeat of five.
        assert!((repetition(&[1, 2, 3, 4, 1, 2, 3, 4]) - 0.2).abs() < 1e-12);
    }

    #[test]
    fn a_model_that_stops_finishing_is_stopped_and_one_that_finishes_more_is_not() {
        let baseline = Baseline {
            round: round(0, 3),
            replicate: round(0, 3),
        };
        // Fewer finished answers: from 0.75 to 0.25, every prompt's majority lost.
        let worse = judge(&baseline, &round(3, 1), &[]);
        let why = worse.alarm.expect("an alarm");
        assert!(why.contains("answered share fell"), "{why}");
        assert!(why.contains("lost their step-0 majority"), "{why}");
        // More finished answers: no alarm, though the distribution moved.
        assert_eq!(judge(&baseline, &round(3, 4), &[]).alarm, None);
        // The base model itself: no alarm.
        assert_eq!(judge(&baseline, &round(0, 3), &[]).alarm, None);
        assert_eq!(worse.signals["drifted"], 8);
    }

    /// A steady fall is caught before the level threshold; flat or rising shares are not.
    #[test]
    fn a_steady_fall_of_the_answered_share_is_a_trend() {
        let baseline = Baseline {
            round: round(0, 3),
            replicate: round(0, 3),
        };
        let mut now = round(4, 3);
        // 0.75 at step 0; se = sqrt(0.75 · 0.25 / 32) = 0.077; level threshold 0.19.
        now.answered = 0.65;
        let v = judge(&baseline, &now, &[0.73, 0.70]);
        assert!(v.alarm.unwrap().contains("each of the last 3 rounds"));
        // Too small in all.
        now.answered = 0.70;
        assert_eq!(judge(&baseline, &now, &[0.74, 0.72]).alarm, None);
        // Not falling every round.
        now.answered = 0.65;
        assert_eq!(judge(&baseline, &now, &[0.73, 0.73]).alarm, None);
        // Too few rounds yet.
        assert_eq!(judge(&baseline, &now, &[0.70]).alarm, None);
        // Only the last three rounds count.
        assert!(judge(&baseline, &now, &[0.80, 0.74, 0.72, 0.70])
            .alarm
            .is_some());
    }

    #[test]
    fn thresholds_follow_the_step0_noise() {
        let quiet = Baseline {
            round: round(0, 2),
            replicate: round(0, 2),
        };
        let noisy = Baseline {
            round: round(0, 2),
            replicate: round(0, 4),
        };
        let (q, n) = (quiet.thresholds(), noisy.thresholds());
        // Binomial: 2.5 · sqrt(0.5 · 0.5 / 32).
        assert!((q.answered_drop - 2.5 * (0.25f64 / 32.0).sqrt()).abs() < 1e-12);
        assert_eq!(n.answered_drop, 0.5);
        assert_eq!(q.drift, 2);
        assert!(n.drift >= q.drift);
    }
}
