//! What a screen is asked to do: [`ScreenOptions`] (the command line's settings, with the
//! reference defaults) and the [`settings`] a rerun must share.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::ranking::Rule;
use crate::prompt::PromptOptions;
use crate::Backend;

/// What to screen and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScreenOptions {
    /// The model to screen with (the base model to be trained): a GGUF or an HF directory.
    pub model: PathBuf,
    /// Prompt pool: a file in the pool format (`{id, prompt: [messages], answer}` per line), or
    /// the name of a pool the project carries: `dsr` (the 1209-problem DeepScaleR subset the
    /// reference screens) or `pi1`.
    pub pool: PathBuf,
    /// Answers sampled per prompt.
    pub k: usize,
    /// Output directory (created; rerun the same command to resume).
    pub out: PathBuf,
    /// Only the first N prompts of the pool.
    pub limit: Option<usize>,
    /// Most new tokens per answer.
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub repetition_penalty: f32,
    /// Base seed; each prompt's samples are seeded from it and the prompt id.
    pub seed: u64,
    #[serde(flatten)]
    pub prompt: PromptOptions,
    /// Selection rule for `chosen.jsonl`.
    pub rule: Rule,
    /// Also keep every response text in the per-prompt lines.
    pub keep_responses: bool,
    /// Sample with EM-INF, inference-time entropy minimisation of each step's logits
    /// (`steps=5,lr=1,kl=0.1`, or `default`); llama.cpp backend only.
    pub em_inf: Option<em_sampler::EmInf>,
    /// GGUF type when --model is an HF directory (converted once into the output directory).
    pub quant: em_convert::OutType,
    /// Replace an output directory that holds another run.
    pub fresh: bool,
    /// Stop after this many newly screened prompts, as if killed (for resume tests).
    pub stop_after: Option<usize>,
}

impl ScreenOptions {
    /// The reference settings (the command line's defaults; a test keeps them equal).
    pub fn reference(model: PathBuf, pool: PathBuf, out: PathBuf) -> Self {
        Self {
            model,
            pool,
            k: 8,
            out,
            limit: None,
            max_new_tokens: 512,
            temperature: 0.5,
            top_p: 0.95,
            repetition_penalty: 1.15,
            seed: 15,
            prompt: PromptOptions::default(),
            rule: Rule::Variance,
            keep_responses: false,
            em_inf: None,
            quant: em_convert::OutType::F16,
            fresh: false,
            stop_after: None,
        }
    }
}

/// The settings that change a screen's results (the manifest's `settings`).
pub fn settings(args: &ScreenOptions, backend: &dyn Backend) -> Value {
    let mut v = json!({
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "prompt": args.prompt,
        "quant": if args.model.is_dir() { format!("{:?}", args.quant).to_lowercase() } else { "as given".into() },
        "backend": backend.identity(),
    });
    // Recorded only when on, so that screens made before the option existed still resume.
    if let Some(e) = args.em_inf {
        v["em_inf"] = json!(e);
    }
    v
}
