//! Continuous batching with shared prompt prefixes over one llama.cpp context.
//!
//! Each of `parallel` slots is a llama.cpp sequence with its own KV stream. A request's prompt is
//! decoded once, in one slot; its other samples get that slot's KV copied (`llama_memory_seq_cp`,
//! applied at the start of the next decode) and its last-position logits, kept per request. Every
//! step decodes one new token for every live sample, plus the prompts of newly admitted requests,
//! in as few `llama_decode` calls as the batch size allows; a slot whose sample ends is refilled
//! with the next (request, sample) before the next step, reusing its own KV when it already holds
//! that request's prompt.

use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::rc::Rc;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use em_sampler::maths::{pick, Picked, Rng, Scratch, Seen};
use em_sampler::{
    Event, FinishReason, Prompt, Request, RunStats, Sample, Sampler, SamplerError, TokenStats,
};

use crate::{backend, default_threads, Adapter, GgufModel};

/// How the engine runs llama.cpp.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// CPU threads for llama.cpp (default: [`default_threads`]).
    pub threads: i32,
    /// Sequences decoded together (slots of the continuous batch).
    pub parallel: usize,
    /// Decode each prompt once and share it among its samples; off, every sample decodes its own.
    pub shared_prefix: bool,
    /// Most tokens given to one `llama_decode` call.
    pub n_batch: u32,
    /// Largest per-sequence context to allocate (default: the model's training context).
    pub max_context: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            parallel: 8,
            shared_prefix: true,
            n_batch: 512,
            max_context: None,
        }
    }
}

/// The llama.cpp sampler: one model, one context sized from the batch and reused between calls.
pub struct Engine<'m> {
    model: &'m GgufModel,
    adapter: Option<Adapter>,
    config: EngineConfig,
    ctx: Option<(LlamaContext<'m>, usize, u32)>,
    /// One per thread that draws tokens (see [`draw_all`]).
    scratches: Vec<Scratch>,
}

struct ReqState {
    prompt: Vec<u32>,
    seen: Seen,
    logits: Option<Rc<Vec<f32>>>,
    samples: Vec<Option<Sample>>,
    done: usize,
}

struct Live {
    req: usize,
    index: usize,
    rng: Rng,
    seen: Seen,
    tokens: Vec<u32>,
    bytes: Vec<u8>,
    stats: Option<TokenStats>,
    /// Last drawn token, not yet decoded.
    pending: u32,
}

enum State {
    Idle,
    /// Decoding the prompt of (request, sample) this step.
    Prefill {
        req: usize,
        index: usize,
    },
    /// Waits for the prompt being decoded in slot `from` this step, then copies it.
    Await {
        req: usize,
        index: usize,
        from: usize,
    },
    Live(Box<Live>),
}

struct Slot {
    state: State,
    /// The request whose prompt this slot's KV holds at positions 0..len, if any.
    holds: Option<usize>,
    /// The last-position logits of the prompt this slot decoded (unshared mode).
    logits: Option<Rc<Vec<f32>>>,
}

enum Want {
    Gen(usize),
    PromptEnd(usize),
}

impl<'m> Engine<'m> {
    pub fn new(model: &'m GgufModel, config: EngineConfig) -> Self {
        Self {
            model,
            adapter: None,
            config,
            ctx: None,
            scratches: Vec::new(),
        }
    }

    /// The engine drawing from `model` with the LoRA `adapter` applied (loaded by
    /// [`GgufModel::load_adapter`] on the same model).
    pub fn with_adapter(model: &'m GgufModel, adapter: Adapter, config: EngineConfig) -> Self {
        Self {
            adapter: Some(adapter),
            ..Self::new(model, config)
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn err(&self, message: impl Into<String>) -> SamplerError {
        SamplerError::backend(self.model.path().display(), message)
    }

    fn tokenize_all(&self, requests: &[Request]) -> Result<Vec<Vec<u32>>, SamplerError> {
        let n_vocab = self.model.n_vocab();
        let limit = self
            .config
            .max_context
            .unwrap_or_else(|| self.model.inner().n_ctx_train()) as usize;
        let mut out = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let bad = |message: String| SamplerError::Request {
                at: self.model.path().display().to_string(),
                request: i,
                message,
            };
            r.params.check().map_err(bad)?;
            if r.n_samples == 0 {
                return Err(bad("n_samples is 0".into()));
            }
            let tokens = match &r.prompt {
                Prompt::Text(t) => self.model.tokenize(t, true),
                Prompt::Tokens(t) | Prompt::Rendered { tokens: t, .. } => t.clone(),
            };
            if tokens.is_empty() {
                return Err(bad("the prompt is empty".into()));
            }
            if let Some(t) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(bad(format!(
                    "token id {t} is outside the vocabulary of {n_vocab}"
                )));
            }
            let need = tokens.len() + r.params.max_new_tokens;
            if need > limit {
                return Err(bad(format!(
                    "prompt of {} tokens + max_new_tokens {} = {need} exceeds the context of {limit} tokens per sequence",
                    tokens.len(),
                    r.params.max_new_tokens
                )));
            }
            out.push(tokens);
        }
        Ok(out)
    }

    /// A context with `parallel` sequences of at least `per_seq` cells each (reused if big enough).
    fn ensure_context(&mut self, parallel: usize, per_seq: u32) -> Result<(), SamplerError> {
        if let Some((_, p, s)) = &self.ctx {
            if *p == parallel && *s >= per_seq {
                let (ctx, _, _) = self.ctx.as_mut().expect("checked");
                ctx.clear_kv_cache();
                return Ok(());
            }
        }
        self.ctx = None;
        let n_ctx = per_seq as usize * parallel;
        let n_batch = self.config.n_batch.max(parallel as u32);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx as u32))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch.min(512))
            .with_n_seq_max(parallel as u32)
            .with_kv_unified(false)
            .with_swa_full(true)
            .with_n_threads(self.config.threads)
            .with_n_threads_batch(self.config.threads);
        let mut ctx = self
            .model
            .inner()
            .new_context(backend()?, params)
            .map_err(|e| {
                self.err(format!(
                    "cannot create a context of {n_ctx} tokens for {parallel} sequences: {e}"
                ))
            })?;
        if let Some(a) = self.adapter.as_mut() {
            a.apply(&mut ctx)?;
        }
        let got = ctx.n_ctx() as usize / parallel;
        if got < per_seq as usize {
            return Err(self.err(format!(
                "llama.cpp gave {got} cells per sequence, {per_seq} needed"
            )));
        }
        self.ctx = Some((ctx, parallel, per_seq));
        Ok(())
    }
}

impl Sampler for Engine<'_> {
    fn describe(&self) -> String {
        match &self.adapter {
            Some(a) => format!(
                "llama.cpp in-process: {} with the adapter {}",
                self.model.path().display(),
                a.path().display()
            ),
            None => format!("llama.cpp in-process: {}", self.model.path().display()),
        }
    }

    fn generate(
        &mut self,
        requests: &[Request],
        on_event: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<RunStats, SamplerError> {
        let start = Instant::now();
        let mut stats = RunStats::default();
        if requests.is_empty() {
            return Ok(stats);
        }
        let prompts = self.tokenize_all(requests)?;
        let n_vocab = self.model.n_vocab();
        let total: usize = requests.iter().map(|r| r.n_samples).sum();
        let parallel = self.config.parallel.max(1).min(total);
        let need = requests
            .iter()
            .zip(&prompts)
            .map(|(r, p)| p.len() + r.params.max_new_tokens)
            .max()
            .unwrap_or(1);
        let per_seq = (need as u32).next_multiple_of(256);
        self.ensure_context(parallel, per_seq)?;
        let shared = self.config.shared_prefix;
        let n_batch = self.config.n_batch.max(parallel as u32) as usize;
        let model = self.model;
        let vocab = model.inner().vocab();
        let path = model.path().to_path_buf();
        let run_err = |m: String| SamplerError::backend(path.display(), m);
        let (ctx, _, _) = self.ctx.as_mut().expect("context created above");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.scratches.resize_with(cores, Scratch::default);
        let scratches = &mut self.scratches[..];

        let mut reqs: Vec<ReqState> = prompts
            .into_iter()
            .zip(requests)
            .map(|(prompt, r)| {
                let mut seen = Seen::new(n_vocab);
                prompt.iter().for_each(|&t| seen.insert(t));
                stats.prompt_tokens_unshared += (prompt.len() * r.n_samples) as u64;
                ReqState {
                    prompt,
                    seen,
                    logits: None,
                    samples: vec![None; r.n_samples],
                    done: 0,
                }
            })
            .collect();
        let mut slots: Vec<Slot> = (0..parallel)
            .map(|_| Slot {
                state: State::Idle,
                holds: None,
                logits: None,
            })
            .collect();
        let mut next = (0usize, 0usize); // next (request, sample) to admit
        let mut batch = LlamaBatch::new(n_batch, 1);
        let mut piece = Vec::new();

        let mut finished: Vec<usize> = Vec::new();
        let mut stopped = false;
        let mut ctx_run = Ctx {
            requests,
            vocab: &vocab,
            scratches,
            piece: &mut piece,
            finished: &mut finished,
            samples_done: 0,
        };

        loop {
            // Admission: every idle slot takes the next (request, sample).
            for s in 0..parallel {
                if !matches!(slots[s].state, State::Idle) || next.0 >= requests.len() {
                    continue;
                }
                let (req, index) = next;
                next.1 += 1;
                if next.1 == requests[req].n_samples {
                    next = (req + 1, 0);
                }
                let plen = reqs[req].prompt.len() as u32;
                if shared && slots[s].holds == Some(req) {
                    ctx.clear_kv_cache_seq(Some(s as u32), Some(plen), None).map_err(|e| run_err(e.to_string()))?;
                } else if let Some(from) = shared.then(|| (0..parallel).find(|&o| slots[o].holds == Some(req))).flatten() {
                    ctx.copy_kv_cache_seq(from as i32, s as i32, None, None).map_err(|e| run_err(e.to_string()))?;
                    ctx.clear_kv_cache_seq(Some(s as u32), Some(plen), None).map_err(|e| run_err(e.to_string()))?;
                    slots[s].holds = Some(req);
                } else if let Some(from) = shared
                    .then(|| (0..parallel).find(|&o| matches!(slots[o].state, State::Prefill { req: r, .. } if r == req)))
                    .flatten()
                {
                    slots[s].state = State::Await { req, index, from };
                    continue;
                } else {
                    ctx.clear_kv_cache_seq(Some(s as u32), None, None).map_err(|e| run_err(e.to_string()))?;
                    slots[s].holds = None;
                    slots[s].state = State::Prefill { req, index };
                    continue;
                }
                let logits = reqs[req]
                    .logits
                    .clone()
                    .expect("a slot holding a prompt has its logits");
                slots[s].state = ctx_run.start(req, index, &logits, &mut reqs, &mut stats);
            }

            // What to decode this step: one token per live sample, then whole prompts.
            let mut entries: Vec<(u32, i32, usize, Option<Want>)> = Vec::new();
            for (s, slot) in slots.iter().enumerate() {
                if let State::Live(l) = &slot.state {
                    let pos = reqs[l.req].prompt.len() + l.tokens.len() - 1;
                    entries.push((l.pending, pos as i32, s, Some(Want::Gen(s))));
                }
            }
            for (s, slot) in slots.iter().enumerate() {
                if let State::Prefill { req, .. } = slot.state {
                    let p = &reqs[req].prompt;
                    for (i, &t) in p.iter().enumerate() {
                        let want = (i + 1 == p.len()).then_some(Want::PromptEnd(s));
                        entries.push((t, i as i32, s, want));
                    }
                    stats.prompt_tokens += p.len() as u64;
                }
            }
            if entries.is_empty() {
                break;
            }

            for chunk in entries.chunks(n_batch) {
                batch.clear();
                for &(t, pos, s, ref want) in chunk {
                    batch
                        .add(LlamaToken(t as i32), pos, &[s as i32], want.is_some())
                        .map_err(|e| run_err(e.to_string()))?;
                }
                let t0 = Instant::now();
                ctx.decode(&mut batch)
                    .map_err(|e| run_err(format!("llama_decode: {e}")))?;
                stats.decode_time += t0.elapsed();
                // The live samples' next tokens, drawn together (across the cores when the
                // vocabulary makes it worth it), then each sample moves on in slot order.
                let mut live_here = vec![];
                for (i, (_, _, _, want)) in chunk.iter().enumerate() {
                    if let Some(Want::Gen(s)) = want {
                        let State::Live(live) =
                            std::mem::replace(&mut slots[*s].state, State::Idle)
                        else {
                            unreachable!("only live slots decode generated tokens")
                        };
                        live_here.push((*s, live, ctx.get_logits_ith(i as i32)));
                    }
                }
                let t1 = Instant::now();
                let picks = ctx_run.draw_all(&mut live_here);
                stats.sample_time += t1.elapsed();
                for ((s, live, _), picked) in live_here.into_iter().zip(picks) {
                    slots[s].state = ctx_run.advance(live, picked, &mut reqs, &mut stats);
                }
                for (i, (_, _, _, want)) in chunk.iter().enumerate() {
                    match want {
                        Some(Want::Gen(_)) => {}
                        Some(Want::PromptEnd(s)) => {
                            let logits = Rc::new(ctx.get_logits_ith(i as i32).to_vec());
                            let State::Prefill { req, .. } = slots[*s].state else {
                                unreachable!()
                            };
                            if shared {
                                reqs[req].logits = Some(logits.clone());
                                slots[*s].holds = Some(req);
                            }
                            slots[*s].logits = Some(logits);
                        }
                        None => {}
                    }
                }
            }
            stats.steps += 1;

            // Samples whose prompt was decoded this step start now.
            #[allow(clippy::needless_range_loop)] // `s` is also the llama.cpp sequence id
            for s in 0..parallel {
                let (req, index, logits) = match slots[s].state {
                    State::Prefill { req, index } => {
                        (req, index, slots[s].logits.take().expect("decoded"))
                    }
                    State::Await { req, index, from } => {
                        ctx.copy_kv_cache_seq(from as i32, s as i32, None, None)
                            .map_err(|e| run_err(e.to_string()))?;
                        slots[s].holds = Some(req);
                        (req, index, reqs[req].logits.clone().expect("decoded"))
                    }
                    _ => continue,
                };
                slots[s].state = ctx_run.start(req, index, &logits, &mut reqs, &mut stats);
            }

            // Finished requests go out, in the order they finish.
            for req in ctx_run.finished.drain(..) {
                let r = &mut reqs[req];
                let samples: Vec<Sample> = r.samples.drain(..).map(|s| s.expect("done")).collect();
                r.logits = None;
                if on_event(Event::RequestDone {
                    request: req,
                    samples,
                })
                .is_break()
                {
                    stopped = true;
                }
            }
            let step = Event::Step {
                samples_done: ctx_run.samples_done,
                generated_tokens: stats.generated_tokens,
                prompt_tokens: stats.prompt_tokens,
                elapsed: start.elapsed(),
            };
            if on_event(step).is_break() || stopped {
                break;
            }
        }
        stats.elapsed = start.elapsed();
        Ok(stats)
    }
}

/// What starting and advancing a sample needs besides the slot.
struct Ctx<'a, 'v> {
    requests: &'a [Request],
    vocab: &'a llama_cpp_2::vocab::LlamaVocab<'v>,
    scratches: &'a mut [Scratch],
    piece: &'a mut Vec<u8>,
    /// Requests whose last sample just ended.
    finished: &'a mut Vec<usize>,
    /// Samples ended so far.
    samples_done: u64,
}

impl Ctx<'_, '_> {
    /// Starts sample `index` of `req` from its prompt's last logits; returns the slot's state.
    fn start(
        &mut self,
        req: usize,
        index: usize,
        logits: &[f32],
        reqs: &mut [ReqState],
        stats: &mut RunStats,
    ) -> State {
        let r = &self.requests[req];
        let live = Box::new(Live {
            req,
            index,
            rng: Rng::new(r.params.seed, index as u64),
            seen: reqs[req].seen.clone(),
            tokens: Vec::new(),
            bytes: Vec::new(),
            stats: r.params.logprobs.then(TokenStats::default),
            pending: 0,
        });
        let mut one = [(0, live, logits)];
        let t0 = Instant::now();
        let picked = self.draw_all(&mut one)[0];
        stats.sample_time += t0.elapsed();
        let [(_, live, _)] = one;
        self.advance(live, picked, reqs, stats)
    }

    /// The next token of each live sample from its logits ([`draw_all`]).
    fn draw_all(&mut self, live: &mut [(usize, Box<Live>, &[f32])]) -> Vec<Picked> {
        draw_all(self.requests, self.scratches, live, DRAW_PER_THREAD_MIN)
    }

    /// Moves `live` on by its drawn token; returns the slot's state (Idle when it ended).
    fn advance(
        &mut self,
        mut live: Box<Live>,
        picked: Picked,
        reqs: &mut [ReqState],
        stats: &mut RunStats,
    ) -> State {
        let t0 = Instant::now();
        let p = &self.requests[live.req].params;
        let token = picked.token;
        live.tokens.push(token);
        live.seen.insert(token);
        stats.generated_tokens += 1;
        if let Some(s) = &mut live.stats {
            s.logprobs.push(picked.logprob);
            s.entropies.push(picked.entropy);
            s.full_entropies.push(picked.full_entropy);
        }
        let mut finish = None;
        if !p.ignore_eos && self.vocab.is_eog(LlamaToken(token as i32)) {
            finish = Some(FinishReason::Eos);
        } else {
            self.piece.clear();
            self.vocab
                .token_to_piece_into(LlamaToken(token as i32), self.piece, true, None);
            let before = live.bytes.len();
            live.bytes.extend_from_slice(self.piece);
            let mut first: Option<(usize, &String)> = None;
            for stop in &p.stop {
                let from = before.saturating_sub(stop.len() - 1);
                if let Some(at) = find(&live.bytes[from..], stop.as_bytes()) {
                    if first.is_none_or(|(f, _)| from + at < f) {
                        first = Some((from + at, stop));
                    }
                }
            }
            if let Some((at, stop)) = first {
                live.bytes.truncate(at);
                finish = Some(FinishReason::Stop(stop.clone()));
            }
        }
        if finish.is_none() && live.tokens.len() >= p.max_new_tokens {
            finish = Some(FinishReason::Length);
        }
        let state = match finish {
            None => {
                live.pending = token;
                State::Live(live)
            }
            Some(finish) => {
                let Live {
                    req,
                    index,
                    tokens,
                    bytes,
                    stats: token_stats,
                    ..
                } = *live;
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let r = &mut reqs[req];
                r.samples[index] = Some(Sample {
                    request: req,
                    index,
                    text,
                    n_tokens: tokens.len(),
                    tokens,
                    finish,
                    stats: token_stats,
                });
                r.done += 1;
                self.samples_done += 1;
                if r.done == r.samples.len() {
                    self.finished.push(req);
                }
                State::Idle
            }
        };
        stats.sample_time += t0.elapsed();
        state
    }
}

/// The fewest logits a thread of [`draw_all`] draws from: below that, a thread costs more than
/// it saves (one decode step of SmolLM2's 8 samples, 393 K logits, takes two).
const DRAW_PER_THREAD_MIN: usize = 1 << 17;

/// The next token of each live sample (slot, sample, its logits), one thread per scratch at
/// most, each drawing from `per_thread_min` logits at least. Each sample draws from its own
/// random stream, so splitting them among threads changes no draw.
fn draw_all(
    requests: &[Request],
    scratches: &mut [Scratch],
    live: &mut [(usize, Box<Live>, &[f32])],
    per_thread_min: usize,
) -> Vec<Picked> {
    let draw = |(_, live, logits): &mut (usize, Box<Live>, &[f32]), scratch: &mut Scratch| {
        let p = &requests[live.req].params;
        pick(logits, p, live.seen.ids(), &mut live.rng, scratch)
    };
    let logits: usize = live.iter().map(|l| l.2.len()).sum();
    let threads = scratches.len().min(logits / per_thread_min.max(1)).max(1);
    if threads == 1 {
        let scratch = &mut scratches[0];
        return live.iter_mut().map(|l| draw(l, scratch)).collect();
    }
    let per = live.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut parts = live.chunks_mut(per).zip(scratches.iter_mut());
        let (first, scratch) = parts.next().expect("at least one sample");
        let others: Vec<_> = parts
            .map(|(part, scratch)| {
                scope.spawn(move || {
                    part.iter_mut()
                        .map(|l| draw(l, scratch))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut picks: Vec<Picked> = first.iter_mut().map(|l| draw(l, scratch)).collect();
        for h in others {
            picks.extend(h.join().expect("a drawing thread panicked"));
        }
        picks
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use em_sampler::SamplingParams;

    /// Ten samples of `requests`, each with its own stream and tokens seen, and their logits
    /// (boxed, as the engine holds them).
    #[allow(clippy::vec_box)]
    fn lives(requests: &[Request], n_vocab: usize) -> (Vec<Box<Live>>, Vec<Vec<f32>>) {
        let mut noise = Rng::new(7, 0);
        (0..10)
            .map(|i| {
                let req = i % requests.len();
                let mut seen = Seen::new(n_vocab);
                for t in 0..20 {
                    seen.insert(((i * 37 + t * 101) % n_vocab) as u32);
                }
                let logits = (0..n_vocab)
                    .map(|_| (noise.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 16.0 - 4.0)
                    .collect();
                let live = Box::new(Live {
                    req,
                    index: i,
                    rng: Rng::new(requests[req].params.seed, i as u64),
                    seen,
                    tokens: vec![],
                    bytes: vec![],
                    stats: None,
                    pending: 0,
                });
                (live, logits)
            })
            .unzip()
    }

    /// Drawing a step's samples on several threads gives every sample the token, log-prob and
    /// entropies it draws on one, and leaves its stream where one thread leaves it (three steps).
    #[test]
    fn threads_change_no_draw() {
        let n_vocab = 4096;
        let request = |seed, top_p| Request {
            prompt: em_sampler::Prompt::Tokens(vec![1]),
            n_samples: 5,
            params: SamplingParams {
                top_p,
                ..SamplingParams::reference(8, seed)
            },
        };
        let requests = [request(3, 0.95), request(11, 1.0)];
        let run = |threads: usize, per_thread_min: usize| {
            let (mut boxes, logits) = lives(&requests, n_vocab);
            let mut scratches: Vec<Scratch> = (0..threads).map(|_| Scratch::default()).collect();
            let mut picks = vec![];
            for _ in 0..3 {
                let mut live: Vec<(usize, Box<Live>, &[f32])> = boxes
                    .drain(..)
                    .zip(&logits)
                    .map(|(l, g)| (0, l, g.as_slice()))
                    .collect();
                picks.push(draw_all(
                    &requests,
                    &mut scratches,
                    &mut live,
                    per_thread_min,
                ));
                boxes = live.into_iter().map(|(_, l, _)| l).collect();
            }
            picks
        };
        let one = run(1, 1);
        assert!(one.iter().flatten().any(|p| p.token != one[0][0].token));
        assert_eq!(run(3, 1), one);
        assert_eq!(run(4, 1 << 30), one, "below the threshold: one thread");
    }
}
