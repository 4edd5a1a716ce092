//! What an evaluation is asked to do: [`EvalOptions`] (the command line's settings), the
//! [`Decoding`] shared by every setting, and each [`Setting`] (model or baseline, temperature,
//! samples, EM-INF) with the file-name tag of its results.

use std::path::PathBuf;

use em_convert::OutType;
use em_sampler::EmInf;

use crate::prompt::PromptOptions;

/// What to evaluate and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EvalOptions {
    /// A .gguf file, or an HF directory (converted with --quant first).
    pub model: PathBuf,
    /// GGUF type when --model (or --baseline) is an HF directory.
    pub quant: OutType,
    /// Comma-separated suites: math500, gsm8k, minerva, olympiadbench, amc23, aime24, aime25, svamp,
    /// mawps, asdiv, math, or paths to JSONL/JSON files.
    pub suites: Vec<String>,
    /// Output directory (per-item JSONL, summary.json, summary.md).
    pub out: PathBuf,
    /// Only the first N items of each suite.
    pub limit: Option<usize>,
    /// Sampling temperature; 0 is greedy (the default, as the toolkit evaluates).
    pub temperature: f32,
    /// Samples per item (avg@n and pass@n when > 1).
    pub n: usize,
    pub top_p: f32,
    pub max_new_tokens: usize,
    #[serde(flatten)]
    pub prompt: PromptOptions,
    /// A LoRA GGUF (`adapter.gguf` of a `train --adapter lora` run) that llama.cpp applies to
    /// `--model`, which must then be the base GGUF; the manifest records the adapter as the model
    /// and the base with the backend.
    pub adapter: Option<PathBuf>,
    /// A baseline for the paired comparison: a model (.gguf or HF directory), evaluated here
    /// without `--adapter`, or a finished eval folder of the same suites and settings, whose
    /// per-item results are reused (its low-temperature settings are not re-run then).
    pub baseline: Option<PathBuf>,
    /// The baseline's own LoRA GGUF, applied to `--baseline` (a base GGUF).
    pub baseline_adapter: Option<PathBuf>,
    /// Further temperatures at which to run the baseline (0 = greedy), since plain low-temperature
    /// sampling may beat what EM gains.
    pub baseline_temperatures: Vec<f32>,
    pub seed: u64,
    /// Decode the model with EM-INF, inference-time entropy minimisation of each step's logits
    /// (`steps=5,lr=1,kl=0.1`, or `default`); llama.cpp backend only.
    pub em_inf: Option<EmInf>,
    /// Also run the baseline with EM-INF (at the model's temperature): the training-free
    /// counterpart of EM, next to it.
    pub baseline_em_inf: Option<EmInf>,
    /// Replace an output directory that holds another run.
    pub fresh: bool,
}

/// How every item is prompted and decoded, whatever the setting's temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoding {
    pub prompt: PromptOptions,
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl EvalOptions {
    /// The decoding settings of this evaluation.
    pub fn decoding(&self) -> Decoding {
        Decoding {
            prompt: self.prompt.clone(),
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        }
    }

    /// The model's setting: `model` at the asked temperature, one sample when greedy.
    pub fn model_setting(&self) -> Setting {
        let mut setting = Setting {
            label: "model".into(),
            temperature: self.temperature,
            n: self.n,
            em_inf: self.em_inf,
        };
        if setting.temperature <= 0.0 {
            setting.n = 1;
        }
        setting
    }
}

/// One setting of a run: which model, at which temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub label: String,
    pub temperature: f32,
    pub n: usize,
    /// Inference-time entropy minimisation of each decoding step (EM-INF), or none.
    pub em_inf: Option<EmInf>,
}

impl Setting {
    /// The file-name tag of this setting, e.g. `model.greedy` or `model.t0.5-n4`.
    pub fn tag(&self) -> String {
        let decoding = if self.temperature <= 0.0 {
            "greedy".to_string()
        } else {
            format!("t{}-n{}", self.temperature, self.n)
        };
        match &self.em_inf {
            Some(e) => format!(
                "{}.{decoding}-eminf{}-lr{}-kl{}",
                self.label, e.steps, e.lr, e.max_kl
            ),
            None => format!("{}.{decoding}", self.label),
        }
    }
}
