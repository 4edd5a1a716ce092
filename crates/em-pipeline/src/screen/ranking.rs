//! A screened prompt and the choice among them: [`PromptResult`] (a line of `prompts.jsonl`:
//! pass rate with its interval, variance, entropy, agreement), [`rank`] by variance, and the
//! [`Rule`] that [`choose`] applies to the ranking.

use em_data::Problem;
use em_sampler::Sample;
use serde::{Deserialize, Serialize};

/// Which prompt to choose from the ranking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Highest variance p(1−p); ties: p nearest 0.5, then higher entropy.
    Variance,
    /// Highest variance among prompts whose pass rate is above 0.5 with its 95% interval (EM
    /// amplifies what the majority of its samples does, right or wrong).
    MajorityRight,
    /// No labels: among prompts whose most common final answer is held by a share a above 0.5
    /// with its 95% interval and whose answers mostly terminate, the most doubt a(1−a); ties:
    /// higher entropy. The label-free stand-in for `majority-right`.
    Agreement,
    /// Highest variance among prompts whose pass rate is below 0.5 with its 95% interval: the
    /// prompt EM should *not* be trained on, for demonstrating what it does to a model.
    MajorityWrong,
    /// No labels: among prompts whose answers mostly terminate, the most doubt a(1−a) about the
    /// most common final answer, whatever its share; ties: higher entropy. A wide net: the
    /// candidates `select` tries by default.
    Doubt,
}

impl Rule {
    /// Whether the rule reads gold answers.
    pub fn needs_labels(self) -> bool {
        !matches!(self, Rule::Agreement | Rule::Doubt)
    }
}

/// One screened prompt, a line of `prompts.jsonl`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PromptResult {
    pub id: String,
    pub n: usize,
    pub correct: usize,
    pub pass_rate: f64,
    /// 95% Wilson interval of the pass rate.
    pub ci95: (f64, f64),
    /// p(1−p).
    pub variance: f64,
    /// Token mean of the entropy of the sampling distribution (after top-p), nats; null where the
    /// backend does not report distributions (servers).
    pub mean_entropy: Option<f64>,
    /// Token mean of the full-vocabulary entropy at the sampling temperature (EM's loss), nats.
    pub mean_full_entropy: Option<f64>,
    /// Mean generated tokens per answer.
    pub mean_length: f64,
    /// Extracted answer per sample (null where none, and for an unfinished sample).
    pub answers: Vec<Option<String>>,
    pub correct_each: Vec<bool>,
    pub finish: Vec<String>,
    /// Per sample: it stopped at the token limit without stating a final answer. Such a sample
    /// has no answer and is right for no rule: the toolkit's last-number fallback would grade
    /// whatever number it was computing, often one copied from the question.
    pub unfinished_each: Vec<bool>,
    pub gold: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<Vec<String>>,
}

impl PromptResult {
    /// `problem`'s samples, graded against its gold answers (with every response text when
    /// `keep_responses`).
    pub(super) fn from_samples(
        problem: &Problem,
        samples: &[Sample],
        keep_responses: bool,
    ) -> Self {
        let unfinished_each: Vec<bool> = samples
            .iter()
            .map(|s| {
                s.finish == em_sampler::FinishReason::Length
                    && !em_grade::states_final_answer(&s.text)
            })
            .collect();
        let verdicts: Vec<em_grade::Verdict> = samples
            .iter()
            .zip(&unfinished_each)
            .map(|(s, &unfinished)| match unfinished {
                true => em_grade::Verdict {
                    pred: None,
                    correct: false,
                },
                false => em_grade::grade(&s.text, &problem.answers),
            })
            .collect();
        let n = samples.len();
        let correct = verdicts.iter().filter(|v| v.correct).count();
        let p = correct as f64 / n as f64;
        let (mut h, mut hf, mut tokens, mut with_entropy) = (0.0, 0.0, 0usize, 0usize);
        for s in samples {
            if let Some(st) = s.stats.as_ref().filter(|st| !st.entropies.is_empty()) {
                h += st.entropies.iter().map(|&x| x as f64).sum::<f64>();
                hf += st.full_entropies.iter().map(|&x| x as f64).sum::<f64>();
                with_entropy += st.entropies.len();
            }
            tokens += s.n_tokens;
        }
        let per_token = |x: f64| (with_entropy > 0).then(|| x / with_entropy as f64);
        Self {
            id: problem.id.clone(),
            n,
            correct,
            pass_rate: p,
            ci95: em_grade::wilson_interval(correct, n),
            variance: p * (1.0 - p),
            mean_entropy: per_token(h),
            mean_full_entropy: per_token(hf),
            mean_length: tokens as f64 / n as f64,
            answers: verdicts.iter().map(|v| v.pred.clone()).collect(),
            correct_each: verdicts.iter().map(|v| v.correct).collect(),
            finish: samples
                .iter()
                .map(|s| format!("{:?}", s.finish).to_lowercase())
                .collect(),
            unfinished_each,
            gold: problem.answers.clone(),
            responses: keep_responses.then(|| samples.iter().map(|s| s.text.clone()).collect()),
        }
    }

    /// Majority right with confidence: the lower end of the 95% interval is above 0.5.
    pub fn majority_right(&self) -> bool {
        self.ci95.0 > 0.5
    }

    /// Majority wrong with confidence: the upper end of the 95% interval is below 0.5.
    pub fn majority_wrong(&self) -> bool {
        self.ci95.1 < 0.5
    }

    /// The most common final answer and the share of samples that gave it (0 when none did).
    pub fn agreement(&self) -> (Option<String>, f64) {
        match em_grade::plurality(&self.answers) {
            Some((a, c)) => (Some(a), c as f64 / self.n.max(1) as f64),
            None => (None, 0.0),
        }
    }

    /// The 95% Wilson interval of [`Self::agreement`]'s share.
    pub fn agreement_ci95(&self) -> (f64, f64) {
        let c = em_grade::plurality(&self.answers).map_or(0, |(_, c)| c);
        em_grade::wilson_interval(c, self.n)
    }

    /// Share of samples that stopped at the token limit without a final answer.
    pub fn unfinished(&self) -> f64 {
        self.unfinished_each.iter().filter(|&&u| u).count() as f64 / self.n.max(1) as f64
    }

    /// Samples that stopped at the token limit, with a final answer or without.
    pub fn at_limit(&self) -> usize {
        self.finish
            .iter()
            .filter(|f| f.as_str() == "length")
            .count()
    }

    /// Share of samples that ended by themselves (not at the token limit) with a final answer.
    pub fn terminated(&self) -> f64 {
        let done = self
            .finish
            .iter()
            .zip(&self.answers)
            .filter(|(f, a)| f.as_str() != "length" && a.is_some())
            .count();
        done as f64 / self.n.max(1) as f64
    }

    /// The label-free rule's condition: a confident majority answer, mostly terminated answers.
    pub fn agrees(&self) -> bool {
        self.agreement_ci95().0 > 0.5 && self.terminated() > 0.5
    }
}

/// Highest variance first; ties: pass rate nearest 0.5, then higher entropy, then id.
pub fn rank(results: &mut [PromptResult]) {
    results.sort_by(|a, b| {
        b.variance
            .total_cmp(&a.variance)
            .then(
                (a.pass_rate - 0.5)
                    .abs()
                    .total_cmp(&(b.pass_rate - 0.5).abs()),
            )
            .then(
                b.mean_entropy
                    .unwrap_or(0.0)
                    .total_cmp(&a.mean_entropy.unwrap_or(0.0)),
            )
            .then(a.id.cmp(&b.id))
    });
}

/// The prompt `rule` picks from a ranked list.
pub fn choose(ranked: &[PromptResult], rule: Rule) -> Option<&PromptResult> {
    candidates(ranked, rule, 1).into_iter().next()
}

/// `prompts` by most doubt a(1−a) about their most common answer, ties by higher entropy, then
/// in the order given.
fn by_doubt<'a>(prompts: impl Iterator<Item = &'a PromptResult>) -> Vec<&'a PromptResult> {
    let mut scored: Vec<(&PromptResult, f64)> = prompts
        .map(|r| {
            let a = r.agreement().1;
            (r, a * (1.0 - a))
        })
        .collect();
    scored.sort_by(|(r1, d1), (r2, d2)| {
        d2.total_cmp(d1).then(
            r2.mean_entropy
                .unwrap_or(0.0)
                .total_cmp(&r1.mean_entropy.unwrap_or(0.0)),
        )
    });
    scored.into_iter().map(|(r, _)| r).collect()
}

/// The first `m` prompts in `rule`'s order of preference: the ranking itself (`variance`), the
/// ranking's prompts that qualify (`majority-right`, `majority-wrong`), or by most doubt a(1−a),
/// ties by higher entropy then rank, the prompts that agree (`agreement`) or that mostly
/// terminate (`doubt`).
pub fn candidates(ranked: &[PromptResult], rule: Rule, m: usize) -> Vec<&PromptResult> {
    let mut out: Vec<&PromptResult> = match rule {
        Rule::Variance => ranked.iter().collect(),
        Rule::MajorityRight => ranked.iter().filter(|r| r.majority_right()).collect(),
        Rule::MajorityWrong => ranked.iter().filter(|r| r.majority_wrong()).collect(),
        Rule::Agreement => by_doubt(ranked.iter().filter(|r| r.agrees())),
        Rule::Doubt => by_doubt(ranked.iter().filter(|r| r.terminated() > 0.5)),
    };
    out.truncate(m);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: &str, correct: usize, n: usize, h: f64) -> PromptResult {
        let p = correct as f64 / n as f64;
        PromptResult {
            id: id.into(),
            n,
            correct,
            pass_rate: p,
            ci95: em_grade::wilson_interval(correct, n),
            variance: p * (1.0 - p),
            mean_entropy: Some(h),
            mean_full_entropy: Some(h),
            mean_length: 1.0,
            answers: vec![],
            correct_each: vec![],
            finish: vec![],
            unfinished_each: vec![false; n],
            gold: vec![],
            responses: None,
        }
    }

    #[test]
    fn ranking_and_rules() {
        let mut r = vec![
            result("a", 8, 8, 0.1),
            result("b", 3, 8, 0.5),
            result("c", 5, 8, 0.2),
            result("d", 4, 8, 0.1),
            result("e", 7, 8, 0.9),
        ];
        rank(&mut r);
        let ids: Vec<&str> = r.iter().map(|x| x.id.as_str()).collect();
        // 4/8 first; 3/8 and 5/8 tie on variance and distance to 0.5, so entropy decides.
        assert_eq!(ids, ["d", "b", "c", "e", "a"]);
        assert_eq!(choose(&r, Rule::Variance).unwrap().id, "d");
        assert_eq!(choose(&r, Rule::MajorityRight).unwrap().id, "e");
        assert!(choose(&r[..3], Rule::MajorityRight).is_none());
        assert!(choose(&r, Rule::MajorityWrong).is_none());
        let mut w = r.clone();
        w.push(result("f", 1, 16, 0.3));
        rank(&mut w);
        assert_eq!(choose(&w, Rule::MajorityWrong).unwrap().id, "f");
        let right: Vec<&str> = candidates(&w, Rule::MajorityRight, 8)
            .iter()
            .map(|x| x.id.as_str())
            .collect();
        assert_eq!(right, ["e", "a"]);
    }

    #[test]
    fn a_sample_cut_off_without_a_final_answer_is_right_for_no_rule() {
        let problem: Problem = serde_json::from_value(serde_json::json!({
            "id": "p", "problem": "What year follows 2021?", "answers": ["2022"], "source": "t"
        }))
        .unwrap();
        let sample = |text: &str, finish| Sample {
            request: 0,
            index: 0,
            text: text.into(),
            tokens: vec![],
            n_tokens: 8,
            finish,
            stats: None,
        };
        use em_sampler::FinishReason::{Eos, Length};
        let samples = [
            // Cut off while copying the question's number: right by the fallback, not here.
            sample("Since 2021 was last year and 2022", Length),
            // Cut off after stating the answer: it counts.
            sample("So \\boxed{2022}. Let me also check 2", Length),
            // Ended by itself: the toolkit's convention, last number included, applies.
            sample("It is 2022", Eos),
            sample("It is 2023", Eos),
        ];
        let r = PromptResult::from_samples(&problem, &samples, false);
        assert_eq!(r.unfinished_each, [true, false, false, false]);
        assert_eq!(r.correct_each, [false, true, true, false]);
        assert_eq!(r.answers[0], None);
        assert_eq!((r.correct, r.unfinished(), r.at_limit()), (2, 0.25, 2));
    }

    /// A prompt's samples as (answer, finished by itself).
    fn sampled(id: &str, samples: &[(Option<&str>, bool)], h: f64) -> PromptResult {
        let mut r = result(id, 0, samples.len(), h);
        r.answers = samples.iter().map(|s| s.0.map(String::from)).collect();
        r.finish = samples
            .iter()
            .map(|s| if s.1 { "eos" } else { "length" }.to_string())
            .collect();
        r
    }

    #[test]
    fn agreement_rule_needs_no_labels() {
        let n = |k: usize, x: (Option<&'static str>, bool)| vec![x; k];
        let cat = |parts: Vec<Vec<(Option<&'static str>, bool)>>| parts.concat();
        // 13 of 16 agree: a confident majority with some doubt.
        let a = sampled(
            "a",
            &cat(vec![n(13, (Some("12"), true)), n(3, (Some("15"), true))]),
            0.2,
        );
        // 16 of 16 agree: no doubt at all.
        let b = sampled("b", &n(16, (Some("7"), true)), 0.1);
        // A plurality that is not a confident majority.
        let c = sampled(
            "c",
            &cat(vec![n(8, (Some("3"), true)), n(8, (Some("4"), true))]),
            0.9,
        );
        // Agreeing answers, but most responses run to the token limit without one.
        let d = sampled(
            "d",
            &cat(vec![n(7, (Some("5"), true)), n(9, (None, false))]),
            0.9,
        );
        // 14 of 16, the same answer written two ways.
        let e = sampled(
            "e",
            &cat(vec![
                n(7, (Some("1/2"), true)),
                n(7, (Some("0.5"), true)),
                n(2, (Some("2"), true)),
            ]),
            0.3,
        );
        assert_eq!(a.agreement(), (Some("12".into()), 13.0 / 16.0));
        assert_eq!(d.terminated(), 7.0 / 16.0);
        assert_eq!(e.agreement().1, 14.0 / 16.0);
        assert!(a.agrees() && b.agrees() && e.agrees());
        assert!(!c.agrees() && !d.agrees());
        let all = vec![b, c, d, e, a];
        assert_eq!(choose(&all, Rule::Agreement).unwrap().id, "a");
        assert!(choose(&all[1..3], Rule::Agreement).is_none());
        // In order of doubt: 13/16 (a), 14/16 (e), 16/16 (b); those that do not agree never.
        let ids = |v: Vec<&PromptResult>| v.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(candidates(&all, Rule::Agreement, 8)), ["a", "e", "b"]);
        assert_eq!(ids(candidates(&all, Rule::Agreement, 2)), ["a", "e"]);
        assert_eq!(ids(candidates(&all, Rule::Variance, 2)), ["b", "c"]);
        // Doubt: every prompt that mostly terminates, c (8/16, the most doubt) first; d does not.
        assert_eq!(ids(candidates(&all, Rule::Doubt, 8)), ["c", "a", "e", "b"]);
        assert!(!Rule::Doubt.needs_labels());
        assert!(!Rule::Agreement.needs_labels() && Rule::MajorityRight.needs_labels());
    }
}
