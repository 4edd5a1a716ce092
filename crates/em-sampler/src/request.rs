//! What callers ask for (requests and sampling settings) and what they get back (samples).

use serde::{Deserialize, Serialize};

/// The evaluation stop strings of METHOD.md (Qwen2.5-Math toolkit).
pub const EVAL_STOP: [&str; 3] = ["<|im_end|>", "<|endoftext|>", "</s>"];

/// How to draw the next token. `Default` is plain sampling at temperature 1 with nothing truncated.
///
/// The logits go through these steps in Hugging Face `generate`'s order (its logits processors,
/// then its warpers): repetition penalty → temperature → top-k → top-p → min-p, then one draw from
/// what is left, renormalised. Temperature 0 (or `greedy`) takes the argmax of the penalised logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Divides the logits; 0 means greedy.
    pub temperature: f32,
    /// Keep the most likely tokens whose mass, counted from the top, reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// HF's `repetition_penalty` (1 = off): every token id present in the prompt or generated so far
    /// has its logit divided by the penalty if positive, multiplied by it if not.
    pub repetition_penalty: f32,
    /// At most this many generated tokens per sample (the EOS token counts).
    pub max_new_tokens: usize,
    /// A sample ends at the first of these strings; its text stops before it.
    pub stop: Vec<String>,
    /// With the sample's index, seeds the sample's own random stream.
    pub seed: u64,
    /// Argmax decoding whatever the temperature.
    pub greedy: bool,
    /// Treat end-of-generation tokens as text and go on to `max_new_tokens` (benchmarks).
    pub ignore_eos: bool,
    /// Return per-token log-probs and entropies.
    pub logprobs: bool,
    /// Inference-time entropy minimisation of each step's logits before the draw (off: `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub em_inf: Option<EmInf>,
}

/// EM-INF (Agarwal et al. 2025, "The Unreasonable Effectiveness of Entropy Minimization in LLM
/// Reasoning"): before each draw, `steps` gradient steps of size `lr` on the step's own
/// temperature-scaled logits lower the entropy of their softmax, on a leash: the adjusted
/// distribution q stays within `max_kl` nats of the model's p (KL(q‖p)); a step that would cross
/// the bound is cut back onto it and ends the descent. No weights change.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmInf {
    /// Gradient steps per decoding step (0: the model's own distribution).
    pub steps: usize,
    /// Step size on the logits (nats per unit gradient).
    pub lr: f32,
    /// Bound on KL(q‖p), nats.
    pub max_kl: f32,
}

impl EmInf {
    /// The settings `--em-inf` uses when given without values: 5 steps of 1.0, KL at most 0.1.
    pub const DEFAULT: EmInf = EmInf {
        steps: 5,
        lr: 1.0,
        max_kl: 0.1,
    };
}

impl std::fmt::Display for EmInf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "steps={},lr={},kl={}", self.steps, self.lr, self.max_kl)
    }
}

impl std::str::FromStr for EmInf {
    type Err = String;

    /// `steps=5,lr=1,kl=0.1` (absent keys take [`EmInf::DEFAULT`]'s values; `default` alone too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            |why: &str| format!("EM-INF settings {s:?}: {why} (expected e.g. steps=5,lr=1,kl=0.1)");
        let mut e = EmInf::DEFAULT;
        for part in s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "default")
        {
            let (k, v) = part.split_once('=').ok_or_else(|| bad("no `=`"))?;
            match k.trim() {
                "steps" => e.steps = v.trim().parse().map_err(|_| bad("steps is not a count"))?,
                "lr" => e.lr = v.trim().parse().map_err(|_| bad("lr is not a number"))?,
                "kl" => e.max_kl = v.trim().parse().map_err(|_| bad("kl is not a number"))?,
                other => return Err(bad(&format!("unknown key {other:?}"))),
            }
        }
        e.check().map_err(|why| bad(&why))?;
        Ok(e)
    }
}

impl EmInf {
    /// The first setting out of range, as a sentence.
    pub fn check(&self) -> Result<(), String> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("EM-INF lr {} is not a finite number > 0", self.lr));
        }
        if !(self.max_kl.is_finite() && self.max_kl >= 0.0) {
            return Err(format!(
                "EM-INF kl bound {} is not a finite number ≥ 0",
                self.max_kl
            ));
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            max_new_tokens: 256,
            stop: Vec::new(),
            seed: 0,
            greedy: false,
            ignore_eos: false,
            logprobs: false,
            em_inf: None,
        }
    }
}

impl SamplingParams {
    /// The reference's sampling settings (METHOD.md): T = 0.5, top-p 0.95, repetition penalty 1.15.
    pub fn reference(max_new_tokens: usize, seed: u64) -> Self {
        Self {
            temperature: 0.5,
            top_p: 0.95,
            repetition_penalty: 1.15,
            max_new_tokens,
            seed,
            ..Self::default()
        }
    }

    /// Greedy decoding with the evaluation stop strings of METHOD.md.
    pub fn greedy(max_new_tokens: usize) -> Self {
        let stop = EVAL_STOP.map(String::from).to_vec();
        Self {
            temperature: 0.0,
            greedy: true,
            max_new_tokens,
            stop,
            ..Self::default()
        }
    }

    /// True when this draws the argmax.
    pub fn is_greedy(&self) -> bool {
        self.greedy || self.temperature <= 0.0
    }

    /// The first setting out of range, as a sentence.
    pub fn check(&self) -> Result<(), String> {
        let bad = |what: &str| Err(what.to_string());
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(&format!(
                "temperature {} is not a finite number ≥ 0",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(&format!("top_p {} is not in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(&format!("min_p {} is not in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(&format!(
                "repetition_penalty {} is not a finite number > 0",
                self.repetition_penalty
            ));
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens is 0");
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("a stop string is empty");
        }
        if let Some(e) = &self.em_inf {
            e.check()?;
        }
        Ok(())
    }
}

/// A prompt as text (tokenized with the model's BOS rule, special tokens parsed), as token ids, or
/// both: a prompt rendered for the model, whose ids are what an in-process backend decodes and
/// whose text is the same prompt for servers that take only text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Rendered { text: String, tokens: Vec<u32> },
}

impl Prompt {
    /// The token ids, where the prompt has them.
    pub fn tokens(&self) -> Option<&[u32]> {
        match self {
            Prompt::Text(_) => None,
            Prompt::Tokens(t) | Prompt::Rendered { tokens: t, .. } => Some(t),
        }
    }

    /// The text, where the prompt has it.
    pub fn text(&self) -> Option<&str> {
        match self {
            Prompt::Text(t) | Prompt::Rendered { text: t, .. } => Some(t),
            Prompt::Tokens(_) => None,
        }
    }
}

/// `n_samples` answers to one prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub prompt: Prompt,
    pub n_samples: usize,
    pub params: SamplingParams,
}

impl Request {
    /// A request for `n_samples` answers to `text`.
    pub fn text(text: impl Into<String>, n_samples: usize, params: SamplingParams) -> Self {
        Self {
            prompt: Prompt::Text(text.into()),
            n_samples,
            params,
        }
    }
}

/// Why a sample ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-generation token (kept as the last token id, not in the text).
    Eos,
    /// The text reached this stop string (the token that completed it is the last token id).
    Stop(String),
    /// `max_new_tokens` were generated.
    Length,
}

/// One answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Index of the request in the slice given to the sampler.
    pub request: usize,
    /// Index of this sample within its request (it seeds the sample's random stream).
    pub index: usize,
    /// Decoded text, special tokens rendered, cut before a stop string, without the EOS token.
    pub text: String,
    /// Every generated token id, the EOS or stop-completing token included; empty from servers
    /// that do not return ids.
    pub tokens: Vec<u32>,
    /// How many tokens were generated (the ids' count, or the server's `completion_tokens`).
    pub n_tokens: usize,
    pub finish: FinishReason,
    /// With `logprobs`: per token, statistics of the distribution it was drawn from.
    pub stats: Option<TokenStats>,
}

/// Per generated token, with `logprobs` on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenStats {
    /// ln q(token) under the final sampling distribution q (after truncation, renormalised).
    pub logprobs: Vec<f32>,
    /// Entropy of q in nats (0 in greedy mode).
    pub entropies: Vec<f32>,
    /// Entropy of softmax(penalised logits / T) over the whole vocabulary before truncation, the
    /// quantity EM minimises (T = 1 in greedy mode).
    pub full_entropies: Vec<f32>,
}

impl Sample {
    /// Mean of `entropies`, if log-probs were asked for and a token was generated.
    pub fn mean_entropy(&self) -> Option<f64> {
        let s = self.stats.as_ref()?;
        (!s.entropies.is_empty())
            .then(|| s.entropies.iter().map(|&x| x as f64).sum::<f64>() / s.entropies.len() as f64)
    }
}
