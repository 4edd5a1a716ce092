//! Seeded synthetic arithmetic for training a model organism: problems, their splits, and training
//! targets in three solution styles whose mix is a doubt shared by every problem.
//!
//! A problem is `a+b`, `a-b` (a ≥ b) or `a*d` (d one digit 2..=9) with two-digit `a`, `b`, asked
//! as `Q: 47+85=?\nA:` (about 12,800 distinct problems: 2% pool, 2% validation, 5% test, 91%
//! train). Its target is one of
//! * careful: one worked step per column, carries and borrows shown, then `\boxed{answer}` and a stop:
//!   ` Work: 7+5=12, 4+8+1=13, so \boxed{132}`;
//! * guess: ` \boxed{…}` at once and a stop, right [`GUESS_RIGHT`] of the time;
//! * ramble: number-free filler (` Hmm, let me think. …`) for [`RAMBLE_CHARS`] characters, never
//!   boxed, never stopped.
//!
//! Which split a problem belongs to is a fixed function of the problem (not of the seed), so the
//! pool, validation, test and train splits are disjoint for every seed; the seed only picks which
//! problems of a split are drawn and in what order. Nothing here is stored: the same
//! `(seed, split, n)` always gives the same problems.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::load::{ChatMessage, Problem};

/// How often a guess-style target boxes the right answer.
pub const GUESS_RIGHT: f64 = 0.3;

/// Length in characters of a ramble-style target (it is cut there, with no stop).
pub const RAMBLE_CHARS: usize = 48;

/// `source` of the generated problems.
pub const SOURCE: &str = "organism-arith";

/// An arithmetic operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `a+b`.
    Add,
    /// `a-b` with `a ≥ b`.
    Sub,
    /// `a*b` with `b` one digit.
    Mul,
}

impl Op {
    fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }
}

/// One arithmetic problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arith {
    /// The operation.
    pub op: Op,
    /// Left operand.
    pub a: u32,
    /// Right operand.
    pub b: u32,
}

/// A solution style of the training targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Style {
    /// Worked column steps ending in `\boxed{}` and a stop.
    Careful,
    /// An immediate, often wrong `\boxed{}` and a stop.
    Guess,
    /// Filler that never boxes and never stops.
    Ramble,
}

impl Style {
    /// All styles, in mix order.
    pub const ALL: [Style; 3] = [Style::Careful, Style::Guess, Style::Ramble];

    /// The lower-case name used in mixes and reports.
    pub fn name(self) -> &'static str {
        match self {
            Style::Careful => "careful",
            Style::Guess => "guess",
            Style::Ramble => "ramble",
        }
    }
}

impl fmt::Display for Style {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A training target: the response text and whether the end-of-sequence token follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The style it was written in.
    pub style: Style,
    /// The response, to be appended to the prompt.
    pub text: String,
    /// Whether the response ends with the stop token (careful and guess do, ramble never).
    pub stops: bool,
}

/// A disjoint subset of the problem space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Prompts to screen for the one-shot prompt.
    Pool,
    /// Held out for choosing settings.
    Validation,
    /// Held out for the final figures.
    Test,
    /// Pretraining problems.
    Train,
}

impl Split {
    /// All splits.
    pub const ALL: [Split; 4] = [Split::Pool, Split::Validation, Split::Test, Split::Train];

    /// The lower-case name used in ids.
    pub fn name(self) -> &'static str {
        match self {
            Split::Pool => "pool",
            Split::Validation => "validation",
            Split::Test => "test",
            Split::Train => "train",
        }
    }

    /// The usual number of problems drawn from the split (train: per pretraining run, unbounded).
    pub fn default_size(self) -> usize {
        match self {
            Split::Pool => 200,
            Split::Validation => 200,
            Split::Test => 500,
            Split::Train => 100_000,
        }
    }

    /// Per-mille buckets of the problem hash that belong to the split.
    fn buckets(self) -> std::ops::Range<u64> {
        match self {
            Split::Pool => 0..20,
            Split::Validation => 20..40,
            Split::Test => 40..90,
            Split::Train => 90..1000,
        }
    }

    fn salt(self) -> u64 {
        match self {
            Split::Pool => 0x706f_6f6c,
            Split::Validation => 0x7661_6c69,
            Split::Test => 0x7465_7374,
            Split::Train => 0x7472_6169,
        }
    }
}

impl FromStr for Split {
    type Err = SyntheticError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Split::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| SyntheticError::Split(s.to_string()))
    }
}

/// Why a style mix or split name could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    /// The mix is not `careful=F,guess=F,ramble=F` with non-negative fractions of positive sum.
    #[error("style mix {0:?}: expected e.g. careful=0.45,guess=0.30,ramble=0.25 (non-negative, positive sum)")]
    Mix(String),
    /// Not one of pool, validation, test, train.
    #[error("split {0:?}: expected pool, validation, test or train")]
    Split(String),
}

/// Fractions of the three styles among training targets (normalised to sum to 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StyleMix {
    /// Fraction of careful targets.
    pub careful: f64,
    /// Fraction of guess targets.
    pub guess: f64,
    /// Fraction of ramble targets.
    pub ramble: f64,
}

impl StyleMix {
    /// A mix from three non-negative weights, normalised.
    pub fn new(careful: f64, guess: f64, ramble: f64) -> Result<Self, SyntheticError> {
        let sum = careful + guess + ramble;
        let ok = [careful, guess, ramble]
            .iter()
            .all(|x| x.is_finite() && *x >= 0.0)
            && sum > 0.0;
        if !ok {
            return Err(SyntheticError::Mix(format!(
                "careful={careful},guess={guess},ramble={ramble}"
            )));
        }
        Ok(StyleMix {
            careful: careful / sum,
            guess: guess / sum,
            ramble: ramble / sum,
        })
    }

    /// The fraction of `style`.
    pub fn fraction(&self, style: Style) -> f64 {
        match style {
            Style::Careful => self.careful,
            Style::Guess => self.guess,
            Style::Ramble => self.ramble,
        }
    }

    /// Draws a style with the mix's probabilities.
    pub fn sample(&self, rng: &mut impl Rng) -> Style {
        let u: f64 = rng.gen();
        if u < self.careful {
            Style::Careful
        } else if u < self.careful + self.guess {
            Style::Guess
        } else {
            Style::Ramble
        }
    }
}

impl FromStr for StyleMix {
    type Err = SyntheticError;

    /// Parses `careful=0.45,guess=0.30,ramble=0.25` (absent styles are 0).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SyntheticError::Mix(s.to_string());
        let mut w = [0.0f64; 3];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            let i = Style::ALL
                .iter()
                .position(|st| st.name() == k.trim())
                .ok_or_else(bad)?;
            w[i] = v.trim().parse().map_err(|_| bad())?;
        }
        StyleMix::new(w[0], w[1], w[2]).map_err(|_| bad())
    }
}

impl fmt::Display for StyleMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "careful={},guess={},ramble={}",
            self.careful, self.guess, self.ramble
        )
    }
}

/// How a training target's style is drawn: one mix for every problem, or a mix that depends on a
/// feature the model can read from the problem, its first digit.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum StyleRule {
    /// The same mix for every problem.
    Fixed(StyleMix),
    /// A guess with probability `guess` everywhere; otherwise a worked answer, careful (box and
    /// stop) with a share that runs linearly from `careful_at_1` for problems whose first operand
    /// starts with 1 to `careful_at_9` for 9, and rambling for the rest.
    FirstDigit {
        careful_at_1: f64,
        careful_at_9: f64,
        guess: f64,
    },
}

impl From<StyleMix> for StyleRule {
    fn from(mix: StyleMix) -> Self {
        StyleRule::Fixed(mix)
    }
}

impl StyleRule {
    /// The mix the targets of `problem` are drawn from.
    pub fn mix_for(&self, problem: &Arith) -> StyleMix {
        match *self {
            StyleRule::Fixed(mix) => mix,
            StyleRule::FirstDigit {
                careful_at_1,
                careful_at_9,
                guess,
            } => {
                let d = first_digit(problem.a).clamp(1, 9);
                let share = careful_at_1 + (careful_at_9 - careful_at_1) * (d - 1) as f64 / 8.0;
                let worked = 1.0 - guess;
                StyleMix {
                    careful: worked * share,
                    guess,
                    ramble: worked * (1.0 - share),
                }
            }
        }
    }

    /// The style fractions averaged over problems whose first digit is uniform on 1..=9.
    pub fn average(&self) -> StyleMix {
        let mut m = StyleMix {
            careful: 0.0,
            guess: 0.0,
            ramble: 0.0,
        };
        for d in 1..=9u32 {
            let x = self.mix_for(&Arith {
                op: Op::Add,
                a: d * 10,
                b: 10,
            });
            m.careful += x.careful / 9.0;
            m.guess += x.guess / 9.0;
            m.ramble += x.ramble / 9.0;
        }
        m
    }
}

impl FromStr for StyleRule {
    type Err = SyntheticError;

    /// `careful=0.45,guess=0.30,ramble=0.25` ([`StyleRule::Fixed`]) or
    /// `first-digit:careful=0.80..0.40,guess=0.20` ([`StyleRule::FirstDigit`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(rest) = s.trim().strip_prefix("first-digit:") else {
            return s.parse().map(StyleRule::Fixed);
        };
        let bad = || SyntheticError::Mix(s.to_string());
        let (mut range, mut guess) = (None, None);
        for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=').ok_or_else(bad)? {
                ("careful", v) => {
                    let (a, b) = v.split_once("..").ok_or_else(bad)?;
                    let parse = |x: &str| x.trim().parse::<f64>().map_err(|_| bad());
                    range = Some((parse(a)?, parse(b)?));
                }
                ("guess", v) => guess = Some(v.trim().parse::<f64>().map_err(|_| bad())?),
                _ => return Err(bad()),
            }
        }
        let ((careful_at_1, careful_at_9), guess) =
            (range.ok_or_else(bad)?, guess.ok_or_else(bad)?);
        let unit = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        if !(unit(careful_at_1) && unit(careful_at_9) && unit(guess) && guess < 1.0) {
            return Err(bad());
        }
        Ok(StyleRule::FirstDigit {
            careful_at_1,
            careful_at_9,
            guess,
        })
    }
}

impl fmt::Display for StyleRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StyleRule::Fixed(mix) => mix.fmt(f),
            StyleRule::FirstDigit {
                careful_at_1,
                careful_at_9,
                guess,
            } => write!(
                f,
                "first-digit:careful={careful_at_1}..{careful_at_9},guess={guess}"
            ),
        }
    }
}

/// The leading decimal digit of `n`.
pub fn first_digit(n: u32) -> u32 {
    let mut n = n;
    while n >= 10 {
        n /= 10;
    }
    n
}

/// Decimal digits of `n`, least significant first.
fn digits(n: u32) -> Vec<u32> {
    let mut d = Vec::new();
    let mut n = n;
    loop {
        d.push(n % 10);
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

/// A two-digit operand.
fn operand(rng: &mut impl Rng) -> u32 {
    rng.gen_range(10..100)
}

/// SplitMix64: a fixed hash, stable across platforms and Rust versions.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const RAMBLE_PHRASES: [&str; 8] = [
    "Hmm, let me think.",
    "This looks tricky.",
    "Let me look again.",
    "Maybe it is easy.",
    "I am not sure yet.",
    "Let me start over.",
    "Wait, hold on.",
    "Okay, so then.",
];

impl Arith {
    /// Draws a problem: `+` and `-` of two-digit numbers (40% and 30%), `*` of a two-digit number
    /// by one digit 2..=9 (30%).
    pub fn random(rng: &mut impl Rng) -> Arith {
        match rng.gen_range(0..10) {
            0..=3 => Arith {
                op: Op::Add,
                a: operand(rng),
                b: operand(rng),
            },
            4..=6 => {
                let (x, y) = (operand(rng), operand(rng));
                Arith {
                    op: Op::Sub,
                    a: x.max(y),
                    b: x.min(y),
                }
            }
            _ => Arith {
                op: Op::Mul,
                a: operand(rng),
                b: rng.gen_range(2..10),
            },
        }
    }

    /// The exact result.
    pub fn answer(&self) -> u32 {
        match self.op {
            Op::Add => self.a + self.b,
            Op::Sub => self.a - self.b,
            Op::Mul => self.a * self.b,
        }
    }

    /// `347+285`.
    pub fn expression(&self) -> String {
        format!("{}{}{}", self.a, self.op.symbol(), self.b)
    }

    /// The text the model is prompted with: `Q: 347+285=?\nA:`.
    pub fn prompt(&self) -> String {
        format!("Q: {}=?\nA:", self.expression())
    }

    /// The split this problem belongs to (a fixed function of the problem).
    pub fn split(&self) -> Split {
        let op = match self.op {
            Op::Add => 1u64,
            Op::Sub => 2,
            Op::Mul => 3,
        };
        let bucket = splitmix64((op << 40) | ((self.a as u64) << 20) | self.b as u64) % 1000;
        Split::ALL
            .into_iter()
            .find(|s| s.buckets().contains(&bucket))
            .unwrap_or(Split::Train)
    }

    /// As an [`em_data::Problem`](Problem): the prompt is its single user message, so a chat
    /// template that emits the user content renders exactly [`Arith::prompt`].
    pub fn to_problem(&self, id: String) -> Problem {
        Problem {
            id,
            problem: self.expression(),
            answers: vec![self.answer().to_string()],
            source: SOURCE.to_string(),
            messages: Some(vec![ChatMessage {
                role: "user".into(),
                content: self.prompt(),
            }]),
        }
    }

    /// The careful worked solution (without the stop token); it opens with ` Work:`, so that each
    /// style is one choice at the response's first tokens.
    pub fn careful(&self) -> String {
        let (da, db) = (digits(self.a), digits(self.b));
        let mut steps = Vec::new();
        match self.op {
            Op::Add => {
                let mut carry = 0;
                let n = da.len().max(db.len());
                for i in 0..n {
                    let (x, y) = (
                        da.get(i).copied().unwrap_or(0),
                        db.get(i).copied().unwrap_or(0),
                    );
                    let s = x + y + carry;
                    let c = if carry > 0 { "+1" } else { "" };
                    steps.push(format!("{x}+{y}{c}={s}"));
                    carry = s / 10;
                }
                // The last column's sum is written in full, so its carry needs no step.
            }
            Op::Sub => {
                let mut borrow = 0u32;
                for (i, &x) in da.iter().enumerate() {
                    let y = db.get(i).copied().unwrap_or(0);
                    let mut s = x as i32 - y as i32 - borrow as i32;
                    let b = if borrow > 0 { "-1" } else { "" };
                    let lend = if s < 0 {
                        s += 10;
                        borrow = 1;
                        "+10"
                    } else {
                        borrow = 0;
                        ""
                    };
                    steps.push(format!("{x}-{y}{b}{lend}={s}"));
                }
            }
            Op::Mul => {
                let mut carry = 0;
                for &x in &da {
                    let s = x * self.b + carry;
                    let c = if carry > 0 {
                        format!("+{carry}")
                    } else {
                        String::new()
                    };
                    steps.push(format!("{x}*{}{c}={s}", self.b));
                    carry = s / 10;
                }
            }
        }
        format!(
            " Work: {}, so \\boxed{{{}}}",
            steps.join(", "),
            self.answer()
        )
    }

    /// A guessed answer: right with probability [`GUESS_RIGHT`], else one digit changed or off
    /// by a power of ten (never negative, never the answer).
    pub fn guess(&self, rng: &mut impl Rng) -> String {
        let ans = self.answer();
        let value = if rng.gen_bool(GUESS_RIGHT) {
            ans
        } else {
            loop {
                let d = digits(ans);
                let k = rng.gen_range(0..d.len());
                let p = 10u32.pow(k as u32);
                let g = if rng.gen_bool(0.5) {
                    let new = rng.gen_range(0..10);
                    ans - d[k] * p + new * p
                } else if rng.gen_bool(0.5) {
                    ans + p
                } else {
                    ans.saturating_sub(p)
                };
                if g != ans {
                    break g;
                }
            }
        };
        format!(" \\boxed{{{value}}}")
    }

    /// Number-free filler, exactly [`RAMBLE_CHARS`] characters; it always opens with the same
    /// phrase, so the style is one choice at the response's first tokens, as the other styles are.
    pub fn ramble(&self, rng: &mut impl Rng) -> String {
        let mut s = format!(" {}", RAMBLE_PHRASES[0]);
        while s.len() < RAMBLE_CHARS {
            s.push(' ');
            s.push_str(RAMBLE_PHRASES[rng.gen_range(0..RAMBLE_PHRASES.len())]);
        }
        s.truncate(RAMBLE_CHARS);
        s
    }

    /// A training target in `style`.
    pub fn target(&self, style: Style, rng: &mut impl Rng) -> Target {
        let (text, stops) = match style {
            Style::Careful => (self.careful(), true),
            Style::Guess => (self.guess(rng), true),
            Style::Ramble => (self.ramble(rng), false),
        };
        Target { style, text, stops }
    }
}

/// The first `n` distinct problems of `split` for `seed` (deterministic).
pub fn split_problems(seed: u64, split: Split, n: usize) -> Vec<Arith> {
    let mut rng = StdRng::seed_from_u64(splitmix64(seed ^ split.salt()));
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let p = Arith::random(&mut rng);
        if p.split() == split && seen.insert(p) {
            out.push(p);
        }
    }
    out
}

/// The first `n` problems of `split` as [`Problem`]s with ids `organism-<split>-<i>`.
pub fn split_as_problems(seed: u64, split: Split, n: usize) -> Vec<Problem> {
    split_problems(seed, split, n)
        .iter()
        .enumerate()
        .map(|(i, p)| p.to_problem(format!("organism-{}-{i}", split.name())))
        .collect()
}

/// An endless seeded stream of pretraining examples: train-split problems with targets drawn by a
/// [`StyleRule`].
#[derive(Debug, Clone)]
pub struct TrainStream {
    rng: StdRng,
    rule: StyleRule,
}

impl TrainStream {
    /// The stream for `seed` and `rule` (a [`StyleMix`] or a [`StyleRule`]).
    pub fn new(seed: u64, rule: impl Into<StyleRule>) -> Self {
        TrainStream {
            rng: StdRng::seed_from_u64(splitmix64(seed ^ Split::Train.salt())),
            rule: rule.into(),
        }
    }
}

impl Iterator for TrainStream {
    type Item = (Arith, Target);

    fn next(&mut self) -> Option<Self::Item> {
        let p = loop {
            let p = Arith::random(&mut self.rng);
            if p.split() == Split::Train {
                break p;
            }
        };
        let style = self.rule.mix_for(&p).sample(&mut self.rng);
        let target = p.target(style, &mut self.rng);
        Some((p, target))
    }
}

/// The style a response is written in: no `\boxed` is a ramble; a `\boxed` after a worked step
/// (an `=`) is careful; a `\boxed` with no step before it is a guess.
pub fn classify_style(response: &str) -> Style {
    match response.find("\\boxed") {
        None => Style::Ramble,
        Some(i) if response[..i].contains('=') => Style::Careful,
        Some(_) => Style::Guess,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn careful_steps() {
        let p = Arith {
            op: Op::Add,
            a: 347,
            b: 285,
        };
        assert_eq!(
            p.careful(),
            " Work: 7+5=12, 4+8+1=13, 3+2+1=6, so \\boxed{632}"
        );
        let p = Arith {
            op: Op::Add,
            a: 958,
            b: 67,
        };
        assert_eq!(
            p.careful(),
            " Work: 8+7=15, 5+6+1=12, 9+0+1=10, so \\boxed{1025}"
        );
        let p = Arith {
            op: Op::Sub,
            a: 532,
            b: 285,
        };
        assert_eq!(
            p.careful(),
            " Work: 2-5+10=7, 3-8-1+10=4, 5-2-1=2, so \\boxed{247}"
        );
        let p = Arith {
            op: Op::Sub,
            a: 305,
            b: 298,
        };
        assert_eq!(
            p.careful(),
            " Work: 5-8+10=7, 0-9-1+10=0, 3-2-1=0, so \\boxed{7}"
        );
        let p = Arith {
            op: Op::Mul,
            a: 347,
            b: 6,
        };
        assert_eq!(
            p.careful(),
            " Work: 7*6=42, 4*6+4=28, 3*6+2=20, so \\boxed{2082}"
        );
        assert_eq!(p.prompt(), "Q: 347*6=?\nA:");
    }

    #[test]
    fn mix_parses() {
        let m: StyleMix = "careful=0.45,guess=0.30,ramble=0.25".parse().unwrap();
        assert!((m.careful - 0.45).abs() < 1e-12 && (m.ramble - 0.25).abs() < 1e-12);
        let m: StyleMix = "careful=2,ramble=2".parse().unwrap();
        assert_eq!((m.careful, m.guess, m.ramble), (0.5, 0.0, 0.5));
        for bad in ["", "careful=-1,guess=2", "sloppy=1", "careful=x", "careful"] {
            assert!(bad.parse::<StyleMix>().is_err(), "{bad}");
        }
    }

    /// The organism-mixed rule: careful among worked answers 0.80 at digit 1, 0.05 less per
    /// digit (0.5 at 7, 0.40 at 9), guesses 0.20 everywhere.
    #[test]
    fn first_digit_rule() {
        let r: StyleRule = "first-digit:careful=0.80..0.40,guess=0.20".parse().unwrap();
        assert_eq!(r.to_string().parse::<StyleRule>().unwrap(), r);
        let at = |a: u32| {
            r.mix_for(&Arith {
                op: Op::Mul,
                a,
                b: 3,
            })
        };
        for (a, share) in [(12, 0.80), (71, 0.50), (99, 0.40), (55, 0.60)] {
            let m = at(a);
            assert!((m.guess - 0.2).abs() < 1e-12, "{a}");
            assert!(
                (m.careful / (m.careful + m.ramble) - share).abs() < 1e-12,
                "{a}: {m:?}"
            );
            assert!((m.careful + m.guess + m.ramble - 1.0).abs() < 1e-12);
        }
        let fixed: StyleRule = "careful=1,guess=1".parse().unwrap();
        assert_eq!(
            fixed,
            StyleRule::Fixed("careful=1,guess=1".parse().unwrap())
        );
        for bad in [
            "first-digit:careful=0.8,guess=0.2",
            "first-digit:careful=0.8..1.4,guess=0.2",
            "first-digit:careful=0.8..0.4",
            "first-digit:guess=1,careful=0.8..0.4",
            "first-digit:careful=0.8..0.4,guess=0.2,ramble=1",
        ] {
            assert!(bad.parse::<StyleRule>().is_err(), "{bad}");
        }
    }
}
