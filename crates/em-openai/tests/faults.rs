//! `OpenAiSampler` against a fake OpenAI-compatible server on 127.0.0.1 that answers each call as
//! a script says: dropped connections, 5xx, 429 with `Retry-After`, hangs past the client timeout,
//! malformed JSON, refusals, wrong model names, then success.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use em_openai::{sample_seed, Dialect, OpenAiConfig, OpenAiSampler, PromptFormat};
use em_sampler::{Event, FinishReason, Prompt, Request, Sample, Sampler, SamplingParams};
use serde_json::{json, Value};

/// Longest a fake server lives: a guard in case a test never drops it (tests take seconds).
const LIFETIME: Duration = Duration::from_secs(300);
/// How long the fake server sits on a call it hangs: far past the client's 5 s timeout, so a
/// retry that comes sooner than half of it was cut by the timeout, however loaded the machine.
const HANG: Duration = Duration::from_secs(60);

/// One call the fake server received.
#[derive(Clone, Debug)]
struct Call {
    path: String,
    headers: HashMap<String, String>,
    body: Value,
    at: Instant,
}

/// What the fake server does with a call.
enum Reply {
    /// Status, extra headers, body.
    Http(u16, Vec<(&'static str, String)>, String),
    /// Close the connection without answering.
    Drop,
    /// Wait this long, then close without answering.
    Hang(Duration),
    /// Send the head of a 200 and half its body, then close.
    Partial,
}

fn json_reply(status: u16, body: Value) -> Reply {
    Reply::Http(status, Vec::new(), body.to_string())
}

/// The script: the call, and how many identical calls (same path and body) came before it.
type Script = dyn Fn(&Call, usize) -> Reply + Send + Sync;

struct Fake {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Fake {
    /// Serves `/v1/models` (listing `m`) and hands every other call to `script`.
    fn start(script: impl Fn(&Call, usize) -> Reply + Send + Sync + 'static) -> Fake {
        Fake::with_models(&["m"], script)
    }

    fn with_models(
        models: &[&str],
        script: impl Fn(&Call, usize) -> Reply + Send + Sync + 'static,
    ) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let list = json!({
            "object": "list",
            "data": models.iter().map(|m| json!({"id": m, "object": "model"})).collect::<Vec<_>>(),
        });
        let script: Arc<Script> = Arc::new(script);
        let accept = {
            let (calls, stop) = (Arc::clone(&calls), Arc::clone(&stop));
            thread::spawn(move || {
                let end = Instant::now() + LIFETIME;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (calls, script, list) =
                                (Arc::clone(&calls), Arc::clone(&script), list.clone());
                            thread::spawn(move || serve(stream, &calls, &*script, &list));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => break,
                    }
                }
            })
        };
        Fake {
            url,
            calls,
            stop,
            accept: Some(accept),
        }
    }

    /// The calls to `/v1/completions` so far.
    fn completions(&self) -> Vec<Call> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.path == "/v1/completions")
            .cloned()
            .collect()
    }

    fn config(&self) -> OpenAiConfig {
        OpenAiConfig {
            concurrency: 3,
            // Calls the script answers take milliseconds; only a hang reaches this.
            timeout: Duration::from_secs(5),
            max_retries: 3,
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(2),
            ..OpenAiConfig::new(self.url.clone(), "m".into())
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
    }
}

/// Reads one request from `stream` and answers it (one request per connection).
fn serve(mut stream: TcpStream, calls: &Mutex<Vec<Call>>, script: &Script, models: &Value) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Value =
        serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
    let call = Call {
        path,
        headers,
        body,
        at: Instant::now(),
    };
    let reply = if call.path == "/v1/models" {
        json_reply(200, models.clone())
    } else {
        let mut calls = calls.lock().unwrap();
        let before = calls
            .iter()
            .filter(|c| c.path == call.path && c.body == call.body)
            .count();
        calls.push(call.clone());
        drop(calls);
        script(&call, before)
    };
    match reply {
        Reply::Drop => {}
        Reply::Hang(d) => thread::sleep(d),
        Reply::Partial => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n";
            let _ = stream.write_all(format!("{head}{{\"choices\": [").as_bytes());
        }
        Reply::Http(status, extra, body) => {
            let mut out = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in extra {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            out.push_str(&body);
            let _ = stream.write_all(out.as_bytes());
        }
    }
}

/// A vLLM-style success.
fn completion(text: &str, finish: &str, stop_reason: Value, ids: &[u32]) -> Value {
    json!({
        "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                     "stop_reason": stop_reason, "token_ids": ids}],
        "usage": {"prompt_tokens": 1, "completion_tokens": ids.len(), "total_tokens": 1 + ids.len()},
    })
}

/// Which (request, sample) a call is: the prompt is `[100 + request]`, the seed the sample's.
fn job(call: &Call, seed: u64) -> (usize, usize) {
    let r = call.body["prompt"][0].as_u64().unwrap() as usize - 100;
    let sent = call.body["seed"].as_u64().unwrap();
    let s = (0..64).find(|&s| sample_seed(seed, s) == sent).unwrap();
    (r, s)
}

fn requests(n: usize, samples: usize, seed: u64) -> Vec<Request> {
    let params = SamplingParams {
        stop: vec!["</s>".into()],
        ..SamplingParams::reference(8, seed)
    };
    (0..n)
        .map(|r| Request {
            prompt: Prompt::Tokens(vec![100 + r as u32]),
            n_samples: samples,
            params: params.clone(),
        })
        .collect()
}

/// Every event of one `generate` call.
fn run(
    sampler: &mut OpenAiSampler,
    reqs: &[Request],
) -> (Result<em_sampler::RunStats, String>, Vec<Event>) {
    let mut events = Vec::new();
    let out = sampler.generate(reqs, &mut |e| {
        events.push(e);
        ControlFlow::Continue(())
    });
    (out.map_err(|e| e.to_string()), events)
}

fn done(events: &[Event]) -> Vec<(usize, Vec<Sample>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::RequestDone { request, samples } => Some((*request, samples.clone())),
            Event::Step { .. } => None,
        })
        .collect()
}

#[test]
fn transient_faults_are_retried_and_every_sample_comes_once() {
    const SEED: u64 = 42;
    let fake = Fake::start(|call, before| {
        let (r, s) = job(call, SEED);
        match (r, s, before) {
            (0, 0, 0) => Reply::Drop,
            (0, 1, 0) => json_reply(500, json!({"error": {"message": "boom"}})),
            (0, 2, 0) => Reply::Http(429, vec![("Retry-After", "1".into())], "{}".into()),
            (1, 0, 0) => Reply::Hang(HANG),
            (1, 1, 0 | 1) => json_reply(503, json!({"message": "busy"})),
            (1, 2, 0) => Reply::Partial,
            _ => {
                let text = format!("r{r}s{s}");
                let ids = [r as u32, s as u32];
                json_reply(
                    200,
                    match s {
                        0 => completion(&text, "stop", json!("</s>"), &ids),
                        1 => completion(&text, "length", Value::Null, &ids),
                        _ => completion(&text, "stop", json!(7), &ids),
                    },
                )
            }
        }
    });
    let mut sampler = OpenAiSampler::new(fake.config()).unwrap();
    let reqs = requests(2, 3, SEED);
    let started = Instant::now();
    let (stats, events) = run(&mut sampler, &reqs);
    let stats = stats.unwrap();
    eprintln!(
        "six faults retried in {:.2?} (a 5 s timeout and a 1 s Retry-After among them)",
        started.elapsed()
    );

    let calls = fake.completions();
    assert_eq!(
        calls.len(),
        6 + 7,
        "one retry each for five faults, two for (1, 1)"
    );
    assert_eq!(stats.steps, 13);
    assert_eq!(stats.generated_tokens, 12);

    let mut done = done(&events);
    assert_eq!(done.len(), 2, "each request reported once");
    done.sort_by_key(|(r, _)| *r);
    for (r, samples) in &done {
        let got: Vec<(usize, usize, &str)> = samples
            .iter()
            .map(|x| (x.request, x.index, x.text.as_str()))
            .collect();
        let want: Vec<(usize, usize, String)> =
            (0..3).map(|s| (*r, s, format!("r{r}s{s}"))).collect();
        let want: Vec<(usize, usize, &str)> =
            want.iter().map(|(a, b, c)| (*a, *b, c.as_str())).collect();
        assert_eq!(got, want);
        assert_eq!(samples[0].finish, FinishReason::Stop("</s>".into()));
        assert_eq!(samples[1].finish, FinishReason::Length);
        assert_eq!(samples[2].finish, FinishReason::Eos);
        assert_eq!(samples[1].tokens, [*r as u32, 1]);
        assert!(samples.iter().all(|x| x.stats.is_none()));
    }
    let steps = events
        .iter()
        .filter(|e| matches!(e, Event::Step { .. }))
        .count();
    assert_eq!(steps, 6);

    // The 429 said "Retry-After: 1": its retry came no sooner.
    let times: Vec<Instant> = calls
        .iter()
        .filter(|c| job(c, SEED) == (0, 2))
        .map(|c| c.at)
        .collect();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= Duration::from_millis(950),
        "{:?}",
        times[1] - times[0]
    );
    // The hang was cut by the client timeout (5 s), not waited out (60 s).
    let times: Vec<Instant> = calls
        .iter()
        .filter(|c| job(c, SEED) == (1, 0))
        .map(|c| c.at)
        .collect();
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] < HANG / 2, "{:?}", times[1] - times[0]);
}

#[test]
fn persistent_5xx_gives_up_with_one_line() {
    let fake = Fake::start(|_, _| json_reply(503, json!({"error": {"message": "over\nloaded"}})));
    let config = OpenAiConfig {
        max_retries: 2,
        ..fake.config()
    };
    let mut sampler = OpenAiSampler::new(config).unwrap();
    let (out, events) = run(&mut sampler, &requests(1, 1, 0));
    assert_eq!(
        out.unwrap_err(),
        format!(
            "{}/v1/completions: 3 attempts failed; the last: HTTP 503: over loaded",
            fake.url
        )
    );
    assert_eq!(fake.completions().len(), 3);
    assert!(done(&events).is_empty());
}

#[test]
fn refusals_and_defects_fail_at_once() {
    let cases: [(Reply, &str); 4] = [
        (
            json_reply(404, json!({"error": {"message": "The model `m` does not exist.", "type": "NotFoundError", "code": 404}})),
            "/v1/completions: HTTP 404: The model `m` does not exist.",
        ),
        (
            json_reply(400, json!({"object": "error", "message": "This model's maximum context length is 8 tokens.", "code": 400})),
            "/v1/completions: request 0: HTTP 400: This model's maximum context length is 8 tokens.",
        ),
        (
            Reply::Http(200, Vec::new(), "{\"choices\": [".into()),
            "/v1/completions: malformed response (EOF while parsing a list at line 1 column 13): `{\"choices\": [`",
        ),
        (
            json_reply(200, json!({"model": "other", "choices": [{"text": "x", "finish_reason": "stop"}]})),
            "/v1/completions: the response is from model `other`, not `m`",
        ),
    ];
    for (reply, want) in cases {
        let reply = Mutex::new(Some(reply));
        let fake = Fake::start(move |_, _| reply.lock().unwrap().take().unwrap_or(Reply::Drop));
        let mut sampler = OpenAiSampler::new(fake.config()).unwrap();
        let (out, _) = run(&mut sampler, &requests(1, 1, 0));
        assert_eq!(out.unwrap_err(), format!("{}{want}", fake.url));
        assert_eq!(fake.completions().len(), 1, "{want}: not retried");
    }
}

#[test]
fn the_constructor_checks_the_served_model() {
    let fake = Fake::with_models(&["a", "b"], |_, _| Reply::Drop);
    let e = OpenAiSampler::new(fake.config()).err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "{}/v1/models: the server does not serve `m`; it serves: a, b",
            fake.url
        )
    );
    let fake = Fake::with_models(&["m"], |_, _| Reply::Drop);
    let config = OpenAiConfig {
        base_url: format!("{}/v1/", fake.url),
        ..fake.config()
    };
    let sampler = OpenAiSampler::new(config).unwrap();
    assert_eq!(
        sampler.describe(),
        format!("OpenAI-compatible server {} (m)", fake.url)
    );
}

#[test]
fn connection_refused_names_the_url() {
    let url = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let e = OpenAiSampler::new(OpenAiConfig::new(url.clone(), "m".into()))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        e,
        format!("{url}/v1/models: cannot connect: connection refused")
    );
}

#[test]
fn break_stops_handing_out_work() {
    let fake = Fake::start(|call, _| {
        thread::sleep(Duration::from_millis(50));
        let (r, _) = job(call, 0);
        json_reply(
            200,
            completion(&format!("r{r}"), "length", Value::Null, &[1]),
        )
    });
    let config = OpenAiConfig {
        concurrency: 1,
        ..fake.config()
    };
    let mut sampler = OpenAiSampler::new(config).unwrap();
    let reqs = requests(8, 1, 0);
    let mut reported = Vec::new();
    let stats = sampler
        .generate(&reqs, &mut |e| match e {
            Event::RequestDone { request, .. } => {
                reported.push(request);
                ControlFlow::Break(())
            }
            Event::Step { .. } => ControlFlow::Continue(()),
        })
        .unwrap();
    assert_eq!(reported.len(), 1);
    assert_eq!(stats.steps, 1);
    thread::sleep(Duration::from_millis(300));
    let calls = fake.completions().len();
    assert!(
        calls <= 2,
        "{calls} calls: at most the one in flight after the break"
    );
}

#[test]
fn each_dialect_sends_its_field_names() {
    for dialect in [
        Dialect::Vllm,
        Dialect::Sglang,
        Dialect::LlamaServer,
        Dialect::LlamaCppPython,
    ] {
        let fake = Fake::start(move |_, _| {
            let choice = match dialect {
                Dialect::Vllm => {
                    json!({"text": "ab", "finish_reason": "stop", "stop_reason": "</s>",
                    "token_ids": [5, 6], "logprobs": {"tokens": ["token_id:5", "token_id:6"],
                    "token_logprobs": [-0.5, -0.25], "text_offset": [0, 1], "top_logprobs": null}})
                }
                Dialect::Sglang => {
                    json!({"text": "ab", "finish_reason": "stop", "matched_stop": "</s>",
                    "token_ids": [5, 6], "logprobs": {"tokens": ["a", "b"],
                    "token_logprobs": [-0.5, -0.25], "text_offset": [0, 1], "top_logprobs": [null, null]}})
                }
                Dialect::LlamaServer => {
                    json!({"text": "ab", "finish_reason": "stop", "logprobs": {"content": [
                    {"id": 5, "token": "a", "bytes": [97], "prob": 0.5, "top_probs": []},
                    {"id": 6, "token": "b", "bytes": [98], "prob": 1.0, "top_probs": []}]}})
                }
                Dialect::LlamaCppPython => {
                    json!({"text": "ab", "finish_reason": "stop", "logprobs": {
                    "tokens": ["a", "b"], "token_logprobs": [-0.5, -0.25], "text_offset": [0, 1],
                    "top_logprobs": [{"a": -0.5}, {"b": -0.25}]}})
                }
            };
            json_reply(
                200,
                json!({"model": "m", "choices": [choice],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
            )
        });
        let format = match dialect {
            Dialect::LlamaCppPython => PromptFormat::Text,
            _ => PromptFormat::Tokens,
        };
        let config = OpenAiConfig {
            dialect,
            prompt_format: format,
            api_key: Some("sk-test".into()),
            ..fake.config()
        };
        let mut sampler = OpenAiSampler::new(config).unwrap();
        let params = SamplingParams {
            logprobs: true,
            ignore_eos: dialect != Dialect::LlamaCppPython,
            stop: vec!["</s>".into()],
            ..SamplingParams::reference(32, 9)
        };
        let req = Request {
            prompt: Prompt::Rendered {
                text: "<s>q".into(),
                tokens: vec![1, 2, 3],
            },
            n_samples: 1,
            params,
        };
        let (out, events) = run(&mut sampler, std::slice::from_ref(&req));
        out.unwrap();
        let calls = fake.completions();
        assert_eq!(calls.len(), 1, "{dialect:?}");
        let (body, headers) = (&calls[0].body, &calls[0].headers);
        assert_eq!(headers["authorization"], "Bearer sk-test");
        assert_eq!(headers["content-type"], "application/json");
        let has = |k: &str| body.get(k).is_some();
        for k in [
            "model",
            "prompt",
            "n",
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "stop",
            "seed",
        ] {
            assert!(has(k), "{dialect:?}: {k} missing from {body}");
        }
        assert_eq!(body["seed"], sample_seed(9, 0));
        assert_eq!(body["max_tokens"], 32);
        assert_eq!(body["stop"], json!(["</s>"]));
        let sample = &done(&events)[0].1[0];
        let logprobs = &sample.stats.as_ref().unwrap().logprobs;
        match dialect {
            Dialect::Vllm | Dialect::Sglang => {
                assert_eq!(body["prompt"], json!([1, 2, 3]));
                assert_eq!(body["top_k"], -1);
                assert_eq!(body["repetition_penalty"], 1.15);
                assert_eq!(body["ignore_eos"], true);
                assert_eq!(body["logprobs"], 0);
                assert!(!has("repeat_penalty"));
                assert_eq!(has("return_tokens_as_token_ids"), dialect == Dialect::Vllm);
                assert_eq!(sample.tokens, [5, 6]);
                assert_eq!(sample.finish, FinishReason::Stop("</s>".into()));
                assert_eq!(logprobs, &[-0.5, -0.25]);
            }
            Dialect::LlamaServer => {
                assert_eq!(body["prompt"], json!([1, 2, 3]));
                assert_eq!(body["top_k"], 0);
                assert_eq!(body["repeat_penalty"], 1.15);
                assert_eq!(body["repeat_last_n"], 3 + 32);
                assert_eq!(body["ignore_eos"], true);
                assert_eq!(body["n_probs"], 1);
                assert_eq!(body["post_sampling_probs"], true);
                assert_eq!(body["samplers"][1], "temperature");
                assert!(!has("repetition_penalty"));
                assert_eq!(sample.tokens, [5, 6]);
                assert_eq!(sample.finish, FinishReason::Eos);
                assert_eq!(logprobs, &[0.5f32.ln(), 0.0]);
            }
            Dialect::LlamaCppPython => {
                assert_eq!(body["prompt"], "<s>q");
                assert_eq!(body["top_k"], 0);
                assert_eq!(body["repeat_penalty"], 1.15);
                assert_eq!(body["logprobs"], 0);
                assert!(!has("ignore_eos") && !has("repetition_penalty"));
                assert!(sample.tokens.is_empty());
                assert_eq!(logprobs, &[-0.5, -0.25]);
            }
        }
        assert!(sample.stats.as_ref().unwrap().entropies.is_empty());
    }
}

#[test]
fn unservable_requests_fail_before_any_call() {
    let fake = Fake::start(|_, _| Reply::Drop);
    let config = OpenAiConfig {
        prompt_format: PromptFormat::Text,
        ..fake.config()
    };
    let mut sampler = OpenAiSampler::new(config).unwrap();
    let mut reqs = requests(2, 1, 0);
    reqs[0].prompt = Prompt::Text("fine".into());
    let (out, _) = run(&mut sampler, &reqs);
    assert_eq!(
        out.unwrap_err(),
        format!(
            "{}/v1/completions: request 1: the prompt has token ids only, but the prompt format is text",
            fake.url
        )
    );
    let fake2 = Fake::start(|_, _| Reply::Drop);
    let config = OpenAiConfig {
        dialect: Dialect::LlamaCppPython,
        ..fake2.config()
    };
    let e = OpenAiSampler::new(config).err().unwrap().to_string();
    assert!(
        e.contains("llama-cpp-python takes text prompts only"),
        "{e}"
    );
    let config = OpenAiConfig {
        dialect: Dialect::LlamaCppPython,
        prompt_format: PromptFormat::Text,
        ..fake2.config()
    };
    let mut sampler = OpenAiSampler::new(config).unwrap();
    let mut reqs = requests(1, 1, 0);
    reqs[0].prompt = Prompt::Text("x".into());
    reqs[0].params.ignore_eos = true;
    let (out, _) = run(&mut sampler, &reqs);
    assert_eq!(
        out.unwrap_err(),
        format!(
            "{}/v1/completions: request 0: ignore_eos is not supported by llama-cpp-python",
            fake2.url
        )
    );
    assert!(fake.completions().is_empty() && fake2.completions().is_empty());
}

#[test]
fn llama_cpp_python_validation_errors_are_not_retried() {
    // llama-cpp-python sends its schema's refusals as 500, with a traceback.
    let message = "1 validation error:\n  {'type': 'greater_than_equal', 'loc': ('body', 'top_k')}\n\n  File \"app.py\", line 264";
    let fake = Fake::start(move |_, _| {
        json_reply(
            500,
            json!({"error": {"message": message, "type": "internal_server_error"}}),
        )
    });
    let config = OpenAiConfig {
        dialect: Dialect::LlamaCppPython,
        prompt_format: PromptFormat::Text,
        ..fake.config()
    };
    let mut sampler = OpenAiSampler::new(config).unwrap();
    let mut reqs = requests(1, 1, 0);
    reqs[0].prompt = Prompt::Text("x".into());
    let (out, _) = run(&mut sampler, &reqs);
    assert_eq!(
        out.unwrap_err(),
        format!(
            "{}/v1/completions: request 0: HTTP 500: 1 validation error: {{'type': 'greater_than_equal', 'loc': ('body', 'top_k')}} File \"app.py\", line 264",
            fake.url
        )
    );
    assert_eq!(fake.completions().len(), 1);
}
