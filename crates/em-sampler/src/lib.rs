//! What a sampler is, with no backend: the [`Sampler`] trait, the requests it takes and the samples
//! it returns, the [`Vocab`] a prompt is tokenized with, and the sampling maths (HF `generate`'s
//! order: repetition penalty → temperature → top-k → top-p → min-p, one seeded stream per sample).
//!
//! Architecture invariant: no backend here. llama.cpp (`em-llama`) and OpenAI-compatible servers
//! (`em-openai`) implement these traits; screening, evaluation and training (`em-pipeline`) only
//! know them.

pub mod maths;
pub mod request;

pub use request::{
    EmInf, FinishReason, Prompt, Request, Sample, SamplingParams, TokenStats, EVAL_STOP,
};

use std::ops::ControlFlow;
use std::time::Duration;

/// Why sampling failed; `at` names the model file or the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// The model could not be loaded or the server not reached or used.
    #[error("{at}: {message}")]
    Backend { at: String, message: String },
    /// One request cannot be served as asked (too long, bad settings, refused by the server).
    #[error("{at}: request {request}: {message}")]
    Request {
        at: String,
        request: usize,
        message: String,
    },
}

impl SamplerError {
    /// A backend error at `at`.
    pub fn backend(at: impl std::fmt::Display, message: impl Into<String>) -> Self {
        Self::Backend {
            at: at.to_string(),
            message: message.into(),
        }
    }
}

/// Something that draws samples: llama.cpp in-process, or a fleet of servers.
pub trait Sampler {
    /// Samples every request; calls `on_event` as requests finish and as tokens are produced, and
    /// stops early (returning what was done) when it answers `Break`. Every request is reported
    /// exactly once through [`Event::RequestDone`] unless the call stops early or fails.
    fn generate(
        &mut self,
        requests: &[Request],
        on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<RunStats, SamplerError>;

    /// All samples, by request then sample index.
    fn generate_all(&mut self, requests: &[Request]) -> Result<Vec<Vec<Sample>>, SamplerError> {
        let mut out: Vec<Vec<Sample>> = vec![Vec::new(); requests.len()];
        self.generate(requests, &mut |e| {
            if let Event::RequestDone { request, samples } = e {
                out[request] = samples;
            }
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// Where the samples come from (a GGUF path, a server URL and model name), for messages.
    fn describe(&self) -> String;
}

/// Progress of a [`Sampler::generate`] call.
#[derive(Debug)]
pub enum Event {
    /// Every sample of request `request`, in sample order.
    RequestDone {
        request: usize,
        samples: Vec<Sample>,
    },
    /// Progress; the totals so far.
    Step {
        /// Samples finished (of every request).
        samples_done: u64,
        generated_tokens: u64,
        prompt_tokens: u64,
        elapsed: Duration,
    },
}

/// Totals of one [`Sampler::generate`] call.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    /// Tokens sampled (each sample's tokens, EOS included).
    pub generated_tokens: u64,
    /// Prompt tokens the backend decoded (as reported by a server, where it reports them).
    pub prompt_tokens: u64,
    /// Prompt tokens it would have decoded without prefix sharing (prompt length × samples).
    pub prompt_tokens_unshared: u64,
    /// Wall time of the whole call.
    pub elapsed: Duration,
    /// Time inside the backend's forward passes (in-process backends).
    pub decode_time: Duration,
    /// Time in the Rust sampling maths and detokenisation (in-process backends).
    pub sample_time: Duration,
    /// Decode steps, or requests sent to a server.
    pub steps: u64,
}

/// Where a chat template was read from, and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateSource {
    /// Jinja source.
    pub template: String,
    /// The file and key it came from (`M.gguf:tokenizer.chat_template`, `dir/tokenizer_config.json`).
    pub origin: String,
}

/// A model's tokenizer as prompt rendering needs it: text to ids, its BOS rule, its chat template.
pub trait Vocab {
    /// Token ids of `text` with special tokens parsed and nothing added.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, SamplerError>;
    /// The text of token `id`, special tokens rendered.
    fn token_text(&self, id: u32) -> String;
    /// The BOS token id the model's tokenizer prepends to every input, if it prepends one.
    fn auto_bos(&self) -> Option<u32>;
    /// `bos_token` and `eos_token` as the chat template sees them (empty when the model has none).
    fn special_texts(&self) -> (String, String);
    /// The model's own chat template, or why there is none (an error naming the file).
    fn chat_template(&self) -> Result<TemplateSource, SamplerError>;
    /// The model file or directory, for messages.
    fn origin(&self) -> String;
}
