//! The server backend: [`OpenAiSampler`] implements [`Sampler`] over `/v1/completions` of an
//! OpenAI-compatible server — vLLM, SGLang, llama.cpp's `llama-server` or llama-cpp-python.
//!
//! One call per sample (`n: 1`), seeded with [`sample_seed`] of (request seed, sample index), so a
//! sample does not depend on which other samples share a batch; at most
//! [`OpenAiConfig::concurrency`] calls in flight; connection errors, timeouts, HTTP 408, 429
//! (honouring `Retry-After`) and 5xx are retried with exponential backoff; anything else fails at
//! once with one line naming the endpoint. A retried call yields one sample, and each request is
//! reported once.
//!
//! Plain `http://` needs nothing more; `https://` needs the `tls` feature. The `clap` feature
//! derives `clap::ValueEnum` for [`Dialect`] and [`PromptFormat`].
//!
//! # Field names per [`Dialect`]
//!
//! | setting | vLLM | SGLang | llama-server | llama-cpp-python |
//! | --- | --- | --- | --- | --- |
//! | greedy | `temperature: 0` | `temperature: 0` | `temperature: 0` | `temperature: 0` |
//! | top-k off | `top_k: -1` | `top_k: -1` | `top_k: 0` | `top_k: 0` |
//! | min-p | `min_p` | `min_p` | `min_p` | `min_p` |
//! | repetition penalty | `repetition_penalty` | `repetition_penalty` | `repeat_penalty`, `repeat_last_n` = prompt + new tokens | `repeat_penalty` |
//! | sampler order | server's | server's | `samplers` sent in HF order | server's |
//! | ignore EOS | `ignore_eos` | `ignore_eos` | `ignore_eos` | refused (error) |
//! | log-probs | `logprobs: 0`, `return_tokens_as_token_ids` | `logprobs: 0` | `n_probs: 1`, `post_sampling_probs` | `logprobs: 0` |
//! | generated ids | `return_token_ids` → `token_ids` | `return_token_ids` → `token_ids` | only with log-probs (`logprobs.content[].id`) | never |
//! | stop string reported | `stop_reason` | `matched_stop` | no (reads as EOS) | no (reads as EOS) |
//! | token-id prompts | yes | yes | yes | no (text only) |
//!
//! Every dialect is sent `max_tokens`, `stop`, `seed`, `top_p` and `min_p` explicitly, since the
//! servers' defaults are not neutral (llama-server: top-k 40, top-p 0.95, min-p 0.05;
//! llama-cpp-python also a repeat penalty of 1.1).
//!
//! # What servers do differently from `em_sampler::maths`
//!
//! - Repetition penalty: vLLM penalises prompt and generated tokens, as HF does. llama-server is
//!   sent `repeat_last_n` = prompt + new tokens (it refuses -1, "whole context", since 2025), a
//!   window that holds the prompt and the generation, so it matches HF. SGLang penalises generated tokens only.
//!   llama-cpp-python penalises the last `last_n_tokens_size` tokens (a server setting, default 64).
//! - Order of the truncations: llama-server is sent `samplers` in HF's order (penalties →
//!   temperature → top-k → top-p → min-p). llama-cpp-python applies temperature last (after
//!   top-k, top-p and min-p); vLLM applies min-p before top-k/top-p. SGLang follows HF's order.
//! - Seeds: each server has its own random stream, so a seed reproduces a sample on the same
//!   server and settings only; SGLang honours seeds in its deterministic-inference mode only.
//! - Special tokens: vLLM and SGLang are asked to keep them in the text (`skip_special_tokens:
//!   false`); llama-server (without `--special`) and llama-cpp-python leave them out.
//! - [`Sample::tokens`] is empty where the server does not return the ids (see the table); the
//!   token count is then only in [`RunStats::generated_tokens`] (from the server's `usage`).
//! - [`TokenStats`] holds only `logprobs`, one per token the server reports (llama-cpp-python
//!   includes the tokens of a matched stop string, and no EOS), as the server computes them:
//!   llama-server after its sampler chain (as `em_sampler` does); vLLM from the raw model
//!   distribution unless started with `--logprobs-mode processed_logprobs`; llama-cpp-python from
//!   the raw model distribution. `entropies` and `full_entropies` stay empty: servers do not return
//!   the full distribution.

mod body;
mod http;
mod reply;

use std::fmt;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use em_sampler::{Event, Request, RunStats, Sample, Sampler, SamplerError, TokenStats};
use serde_json::{Map, Value};

use crate::http::{Client, PostError};

/// Which server is behind the URL: its field names for the sampling settings differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Dialect {
    /// vLLM's OpenAI-compatible server.
    Vllm,
    /// SGLang's OpenAI-compatible server.
    Sglang,
    /// llama.cpp's `llama-server`.
    LlamaServer,
    /// llama-cpp-python's `llama_cpp.server`.
    LlamaCppPython,
}

impl Dialect {
    /// The server's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Vllm => "vLLM",
            Dialect::Sglang => "SGLang",
            Dialect::LlamaServer => "llama-server",
            Dialect::LlamaCppPython => "llama-cpp-python",
        }
    }
}

/// How prompts are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PromptFormat {
    /// Token ids, exactly what was rendered (a text-only prompt is sent as its text).
    Tokens,
    /// Text, for servers that take only text (a prompt without text is an error).
    Text,
}

/// Where the server is and how to talk to it.
#[derive(Clone)]
pub struct OpenAiConfig {
    /// `http://host:port` (a trailing `/v1` is accepted and dropped).
    pub base_url: String,
    /// The model name the server serves, as `/v1/models` lists it.
    pub served_model: String,
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Longest one call may take before it is abandoned and retried.
    pub timeout: Duration,
    /// Retries of a call after a connection error, a timeout, HTTP 408, 429 or 5xx.
    pub max_retries: u32,
    /// Wait before the first retry; it doubles with each further retry.
    pub backoff: Duration,
    /// Longest wait between two tries (also caps `Retry-After`).
    pub max_backoff: Duration,
    /// Token ids or text.
    pub prompt_format: PromptFormat,
    /// Which server it is.
    pub dialect: Dialect,
}

impl OpenAiConfig {
    /// Defaults: 4 calls in flight, 600 s per call, 5 retries, backoff 0.5 s doubling up to 30 s,
    /// token-id prompts, vLLM.
    pub fn new(base_url: String, served_model: String) -> Self {
        Self {
            base_url,
            served_model,
            api_key: None,
            concurrency: 4,
            timeout: Duration::from_secs(600),
            max_retries: 5,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            prompt_format: PromptFormat::Tokens,
            dialect: Dialect::Vllm,
        }
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("served_model", &self.served_model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff", &self.backoff)
            .field("max_backoff", &self.max_backoff)
            .field("prompt_format", &self.prompt_format)
            .field("dialect", &self.dialect)
            .finish()
    }
}

/// The seed sent with sample `index` of a request seeded `seed`: the first draw of em-sampler's
/// stream for that sample (`Rng::new(seed, index)`), cut to 31 bits so that every server takes it
/// as is (llama.cpp's seeds are 32-bit and `0xFFFFFFFF` means "random").
pub fn sample_seed(seed: u64, index: usize) -> u64 {
    em_sampler::maths::Rng::new(seed, index as u64).next_u64() >> 33
}

/// A [`Sampler`] over an OpenAI-compatible server.
pub struct OpenAiSampler {
    config: OpenAiConfig,
    client: Client,
}

impl OpenAiSampler {
    /// Connects: checks that `GET /v1/models` lists `served_model` (one try, no retries).
    pub fn new(mut config: OpenAiConfig) -> Result<Self, SamplerError> {
        let base = config.base_url.trim_end_matches('/');
        config.base_url = base.strip_suffix("/v1").unwrap_or(base).to_string();
        if config.dialect == Dialect::LlamaCppPython && config.prompt_format == PromptFormat::Tokens
        {
            return Err(SamplerError::backend(
                &config.base_url,
                format!(
                    "{} takes text prompts only: use prompt format text",
                    config.dialect.name()
                ),
            ));
        }
        let client = Client::new(&config)?;
        let served = client.models()?;
        if !served.iter().any(|m| m == &config.served_model) {
            return Err(SamplerError::backend(
                client.models_url(),
                format!(
                    "the server does not serve `{}`; it serves: {}",
                    config.served_model,
                    if served.is_empty() {
                        "nothing".to_string()
                    } else {
                        served.join(", ")
                    }
                ),
            ));
        }
        Ok(Self { config, client })
    }

    /// The configuration in use (`base_url` without a trailing `/v1`).
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }
}

impl Sampler for OpenAiSampler {
    fn generate(
        &mut self,
        requests: &[Request],
        on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<RunStats, SamplerError> {
        let start = Instant::now();
        let url = self.client.completions_url().to_string();
        let mut prepared = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let refuse = |message: String| SamplerError::Request {
                at: url.clone(),
                request: i,
                message,
            };
            r.params.check().map_err(refuse)?;
            if r.params.em_inf.is_some_and(|e| e.steps > 0) {
                return Err(refuse(
                    "EM-INF adjusts each step's logits in-process; an OpenAI-compatible server \
                     cannot apply it (sample with the llama.cpp backend)"
                        .into(),
                ));
            }
            let body = body::build(
                self.config.dialect,
                self.config.prompt_format,
                &self.config.served_model,
                r,
            )
            .map_err(refuse)?;
            prepared.push(Prepared {
                body,
                seed: r.params.seed,
                stops: r.params.stop.clone(),
                logprobs: r.params.logprobs,
            });
        }
        let jobs: Vec<(usize, usize)> = requests
            .iter()
            .enumerate()
            .flat_map(|(r, req)| (0..req.n_samples).map(move |s| (r, s)))
            .collect();
        let mut stats = RunStats::default();
        let mut slots: Vec<Vec<Option<Sample>>> =
            requests.iter().map(|r| vec![None; r.n_samples]).collect();
        let mut missing: Vec<usize> = requests.iter().map(|r| r.n_samples).collect();

        for (request, r) in requests.iter().enumerate() {
            if r.n_samples == 0 {
                let done = Event::RequestDone {
                    request,
                    samples: Vec::new(),
                };
                if on_event(done).is_break() {
                    stats.elapsed = start.elapsed();
                    return Ok(stats);
                }
            }
        }
        if jobs.is_empty() {
            stats.elapsed = start.elapsed();
            return Ok(stats);
        }

        // Workers are detached: on Break or on an error the caller gets control back at once; the
        // calls in flight finish (or time out) on their own and their results are dropped.
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            served_model: self.config.served_model.clone(),
            prepared,
            jobs,
            next: AtomicUsize::new(0),
            cancel: AtomicBool::new(false),
        });
        let _cancel = CancelOnDrop(Arc::clone(&shared));
        let (tx, rx) = mpsc::channel();
        for w in 0..self.config.concurrency.clamp(1, shared.jobs.len()) {
            let (shared, tx) = (Arc::clone(&shared), tx.clone());
            thread::Builder::new()
                .name(format!("em-openai-{w}"))
                .spawn(move || shared.work(&tx))
                .map_err(|e| SamplerError::backend(&url, format!("cannot start a worker: {e}")))?;
        }
        drop(tx);

        let (mut received, mut stopped) = (0usize, false);
        for (job, outcome) in rx {
            let done = outcome?;
            let (request, index) = shared.jobs[job];
            let slot = &mut slots[request][index];
            debug_assert!(slot.is_none(), "a job is handed out once");
            if slot.is_some() {
                continue;
            }
            received += 1;
            stats.steps += u64::from(done.attempts);
            stats.generated_tokens += done.generated_tokens;
            stats.prompt_tokens += done.prompt_tokens;
            stats.prompt_tokens_unshared += done.prompt_tokens_unshared;
            *slot = Some(done.sample);
            missing[request] -= 1;
            let step = Event::Step {
                samples_done: received as u64,
                generated_tokens: stats.generated_tokens,
                prompt_tokens: stats.prompt_tokens,
                elapsed: start.elapsed(),
            };
            let mut flow = on_event(step);
            if flow.is_continue() && missing[request] == 0 {
                let samples = slots[request].iter_mut().filter_map(Option::take).collect();
                flow = on_event(Event::RequestDone { request, samples });
            }
            if flow.is_break() {
                stopped = true;
                break;
            }
        }
        stats.elapsed = start.elapsed();
        if !stopped && received < shared.jobs.len() {
            return Err(SamplerError::backend(
                &url,
                format!(
                    "a worker stopped early: {} of {} samples came back",
                    received,
                    shared.jobs.len()
                ),
            ));
        }
        Ok(stats)
    }

    fn describe(&self) -> String {
        format!(
            "OpenAI-compatible server {} ({})",
            self.config.base_url, self.config.served_model
        )
    }
}

/// One request, ready to send but for its seed.
struct Prepared {
    body: Map<String, Value>,
    seed: u64,
    stops: Vec<String>,
    logprobs: bool,
}

/// One sample back from the server, with its share of the totals.
struct Done {
    sample: Sample,
    attempts: u32,
    generated_tokens: u64,
    prompt_tokens: u64,
    prompt_tokens_unshared: u64,
}

/// What the workers share: the jobs, the next one to hand out, and the stop flag.
struct Shared {
    client: Client,
    served_model: String,
    prepared: Vec<Prepared>,
    jobs: Vec<(usize, usize)>,
    next: AtomicUsize,
    cancel: AtomicBool,
}

impl Shared {
    /// Takes jobs until none are left or the run is cancelled; one message per job taken.
    fn work(&self, tx: &mpsc::Sender<(usize, Result<Done, SamplerError>)>) {
        while !self.cancel.load(Ordering::Relaxed) {
            let job = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&(request, index)) = self.jobs.get(job) else {
                return;
            };
            let outcome = self.sample(request, index);
            if tx.send((job, outcome)).is_err() {
                return;
            }
        }
    }

    fn sample(&self, request: usize, index: usize) -> Result<Done, SamplerError> {
        let p = &self.prepared[request];
        let url = self.client.completions_url();
        let mut body = p.body.clone();
        body.insert("seed".into(), sample_seed(p.seed, index).into());
        let body = Value::Object(body).to_string();
        let (text, attempts) = self.client.post(&body, &self.cancel).map_err(|e| match e {
            PostError::Refused(r) if r.bad_request => SamplerError::Request {
                at: url.to_string(),
                request,
                message: format!("HTTP {}: {}", r.status, r.message),
            },
            e => SamplerError::backend(url, e.to_string()),
        })?;
        let reply = reply::parse(&text, &self.served_model, &p.stops, p.logprobs)
            .map_err(|message| SamplerError::backend(url, message))?;
        let unshared = reply.prompt_tokens.unwrap_or(0);
        let n_tokens = reply.completion_tokens.unwrap_or(reply.tokens.len() as u64) as usize;
        Ok(Done {
            generated_tokens: reply.completion_tokens.unwrap_or(reply.tokens.len() as u64),
            prompt_tokens: unshared.saturating_sub(reply.cached_tokens),
            prompt_tokens_unshared: unshared,
            attempts,
            sample: Sample {
                request,
                index,
                text: reply.text,
                tokens: reply.tokens,
                n_tokens,
                finish: reply.finish,
                stats: reply.logprobs.map(|logprobs| TokenStats {
                    logprobs,
                    ..TokenStats::default()
                }),
            },
        })
    }
}

/// Stops handing out work when `generate` returns, however it returns.
struct CancelOnDrop(Arc<Shared>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_seeds_follow_em_sampler_and_fit_31_bits() {
        let first = em_sampler::maths::Rng::new(42, 3).next_u64();
        assert_eq!(sample_seed(42, 3), first >> 33);
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|i| sample_seed(7, i)).collect();
        assert_eq!(seeds.len(), 1000);
        assert!(seeds.iter().all(|&s| s < 1 << 31));
        assert_ne!(sample_seed(1, 0), sample_seed(2, 0));
    }

    #[test]
    fn debug_hides_the_api_key() {
        let mut c = OpenAiConfig::new("http://h:1".into(), "m".into());
        c.api_key = Some("sk-secret".into());
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("sk-secret") && shown.contains("redacted"),
            "{shown}"
        );
    }
}
