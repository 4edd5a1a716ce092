//! Calls to the server over a kept `ureq` agent: one `GET /v1/models`, and `POST
//! /v1/completions` with retries.

use std::fmt;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use em_sampler::SamplerError;
use serde_json::Value;
use ureq::Agent;

use crate::{Dialect, OpenAiConfig};

/// The agent (its pooled connections) and the endpoints; cheap to clone.
#[derive(Clone)]
pub(crate) struct Client {
    agent: Agent,
    auth: Option<String>,
    models_url: String,
    completions_url: String,
    dialect: Dialect,
    timeout: Duration,
    max_retries: u32,
    backoff: Duration,
    max_backoff: Duration,
}

/// Why a `POST` gave no answer to read.
#[derive(Debug)]
pub(crate) enum PostError {
    /// The server refused the request as sent.
    Refused(Refusal),
    /// Every try met a transient fault.
    GaveUp { attempts: u32, cause: String },
    /// Not worth retrying (a bad URL, no TLS for https, …).
    Fatal(String),
    /// The run stopped while this call waited to retry.
    Cancelled,
}

impl fmt::Display for PostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostError::Refused(r) => write!(f, "HTTP {}: {}", r.status, r.message),
            PostError::GaveUp { attempts, cause } => {
                write!(f, "{attempts} attempts failed; the last: {cause}")
            }
            PostError::Fatal(cause) => f.write_str(cause),
            PostError::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// What one try came to.
enum Fault {
    /// Worth another try: connection errors, timeouts, 408, 429, 5xx.
    Transient {
        cause: String,
        retry_after: Option<Duration>,
    },
    Refused(Refusal),
    Fatal(String),
}

/// An answer with HTTP 4xx other than 408 and 429 (or a 500 that means one).
#[derive(Debug)]
pub(crate) struct Refusal {
    pub status: u16,
    pub message: String,
    /// The server objects to the request's settings or prompt: 400, 422, or llama-cpp-python's
    /// validation errors (which it sends as 500).
    pub bad_request: bool,
}

impl Client {
    /// An agent for `config` (its `base_url` already without `/v1`).
    pub fn new(config: &OpenAiConfig) -> Result<Self, SamplerError> {
        let base = &config.base_url;
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(SamplerError::backend(
                base,
                "the base URL must start with http:// or https://",
            ));
        }
        if base.starts_with("https://") && !cfg!(feature = "tls") {
            return Err(SamplerError::backend(
                base,
                "https needs em-openai built with its `tls` feature",
            ));
        }
        let pool = config.concurrency.max(1);
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.timeout))
            .max_idle_connections(pool)
            .max_idle_connections_per_host(pool)
            .user_agent(concat!("em-openai/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self {
            agent,
            auth: config.api_key.as_ref().map(|k| format!("Bearer {k}")),
            models_url: format!("{base}/v1/models"),
            completions_url: format!("{base}/v1/completions"),
            dialect: config.dialect,
            timeout: config.timeout,
            max_retries: config.max_retries,
            backoff: config.backoff,
            max_backoff: config.max_backoff,
        })
    }

    /// `<base_url>/v1/models`.
    pub fn models_url(&self) -> &str {
        &self.models_url
    }

    /// `<base_url>/v1/completions`.
    pub fn completions_url(&self) -> &str {
        &self.completions_url
    }

    /// The ids `/v1/models` lists, in one try (of at most 30 s).
    pub fn models(&self) -> Result<Vec<String>, SamplerError> {
        let at = &self.models_url;
        let timeout = self.timeout.min(Duration::from_secs(30));
        let mut req = self
            .agent
            .get(at)
            .config()
            .timeout_global(Some(timeout))
            .build();
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        let body = match req.call() {
            Ok(resp) => self.read(resp, timeout),
            Err(e) => Err(transport(&e, timeout)),
        };
        let body = body.map_err(|fault| {
            SamplerError::backend(
                at,
                match fault {
                    Fault::Transient { cause, .. } if cause.starts_with("HTTP") => cause,
                    Fault::Transient { cause, .. } => format!("cannot connect: {cause}"),
                    Fault::Refused(r) => format!("HTTP {}: {}", r.status, r.message),
                    Fault::Fatal(cause) => cause,
                },
            )
        })?;
        let v: Value = serde_json::from_str(&body).map_err(|e| {
            SamplerError::backend(at, format!("malformed response ({e}): {}", snippet(&body)))
        })?;
        let Some(data) = v.get("data").and_then(Value::as_array) else {
            return Err(SamplerError::backend(
                at,
                format!("malformed response (no `data` list): {}", snippet(&body)),
            ));
        };
        Ok(data
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str).map(String::from))
            .collect())
    }

    /// Posts `body` to `/v1/completions` until it is answered, retrying transient faults; the
    /// answer's body and the number of tries.
    pub fn post(&self, body: &str, cancel: &AtomicBool) -> Result<(String, u32), PostError> {
        let mut attempt = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(PostError::Cancelled);
            }
            attempt += 1;
            let (cause, retry_after) = match self.post_once(body) {
                Ok(text) => return Ok((text, attempt)),
                Err(Fault::Refused(r)) => return Err(PostError::Refused(r)),
                Err(Fault::Fatal(cause)) => return Err(PostError::Fatal(cause)),
                Err(Fault::Transient { cause, retry_after }) => (cause, retry_after),
            };
            if attempt > self.max_retries {
                return Err(PostError::GaveUp {
                    attempts: attempt,
                    cause,
                });
            }
            let wait = retry_after.unwrap_or_else(|| self.backoff(attempt));
            if !nap(wait.min(self.max_backoff), cancel) {
                return Err(PostError::Cancelled);
            }
        }
    }

    /// The wait before retry number `retry` (1-based): `backoff`, doubling, capped.
    fn backoff(&self, retry: u32) -> Duration {
        self.backoff
            .saturating_mul(1u32 << (retry - 1).min(20))
            .min(self.max_backoff)
    }

    /// The body of a 2xx answer, or the fault its status means.
    fn read(
        &self,
        mut resp: ureq::http::Response<ureq::Body>,
        timeout: Duration,
    ) -> Result<String, Fault> {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| transport(&e, timeout))?;
        let message = || server_message(&text);
        // llama-cpp-python answers a request its schema rejects with 500 "N validation error(s)".
        let invalid = status == 500
            && self.dialect == Dialect::LlamaCppPython
            && message().contains("validation error");
        match status {
            200..=299 => Ok(text),
            408 | 429 | 500..=599 if !invalid => Err(Fault::Transient {
                cause: format!("HTTP {status}: {}", message()),
                retry_after,
            }),
            _ => Err(Fault::Refused(Refusal {
                status,
                message: message(),
                bad_request: invalid || status == 400 || status == 422,
            })),
        }
    }

    fn post_once(&self, body: &str) -> Result<String, Fault> {
        let mut req = self
            .agent
            .post(&self.completions_url)
            .content_type("application/json");
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        match req.send(body) {
            Ok(resp) => self.read(resp, self.timeout),
            Err(e) => Err(transport(&e, self.timeout)),
        }
    }
}

/// A transport error as a fault: connection trouble and timeouts are transient.
fn transport(e: &ureq::Error, timeout: Duration) -> Fault {
    use ureq::Error as E;
    let transient = |cause: String| Fault::Transient {
        cause,
        retry_after: None,
    };
    match e {
        E::Timeout(_) => transient(format!("no answer within {timeout:?}")),
        E::Io(io) => transient(match io.kind() {
            ErrorKind::ConnectionRefused => "connection refused".into(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "connection reset".into(),
            ErrorKind::UnexpectedEof => "connection closed before a complete answer".into(),
            ErrorKind::TimedOut | ErrorKind::WouldBlock => {
                format!("no answer within {timeout:?}")
            }
            _ => one_line(&io.to_string()),
        }),
        E::ConnectionFailed | E::HostNotFound | E::Protocol(_) => {
            transient(one_line(&e.to_string()))
        }
        _ => Fault::Fatal(one_line(&e.to_string())),
    }
}

/// Sleeps `d` unless the run is cancelled first; false if it was.
fn nap(d: Duration, cancel: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// The message of an error body: OpenAI's `error.message`, FastAPI's `detail`, or the text.
pub(crate) fn server_message(body: &str) -> String {
    let v: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(_) => return snippet(body),
    };
    let s = |v: &Value| v.as_str().map(String::from);
    let found = v
        .pointer("/error/message")
        .and_then(s)
        .or_else(|| v.get("error").and_then(s))
        .or_else(|| v.get("message").and_then(s))
        .or_else(|| v.get("detail").and_then(s))
        .or_else(|| {
            let items = v.get("detail")?.as_array()?;
            let each = items.iter().map(|d| {
                let msg = d.get("msg").and_then(Value::as_str).unwrap_or("?");
                match d.get("loc").and_then(Value::as_array) {
                    Some(loc) => {
                        let loc: Vec<String> = loc
                            .iter()
                            .map(|l| l.as_str().map_or(l.to_string(), String::from))
                            .collect();
                        format!("{}: {msg}", loc.join("."))
                    }
                    None => msg.to_string(),
                }
            });
            Some(each.collect::<Vec<_>>().join("; "))
        });
    found.map_or_else(|| snippet(body), |m| cut(&one_line(&m)))
}

/// The start of `text` on one line, quoted, for messages.
pub(crate) fn snippet(text: &str) -> String {
    let line = one_line(text);
    if line.is_empty() {
        return "(empty body)".into();
    }
    format!("`{}`", cut(&line))
}

/// `line` cut to 200 characters, `…` marking a cut.
fn cut(line: &str) -> String {
    match line.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_string(),
    }
}

/// `text` with every run of whitespace (newlines included) made one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages() {
        let openai = r#"{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "code": 404}}"#;
        assert_eq!(server_message(openai), "The model `x` does not exist.");
        let sglang =
            r#"{"object": "error", "message": "bad\nthing", "type": "BadRequest", "code": 400}"#;
        assert_eq!(server_message(sglang), "bad thing");
        let fastapi =
            r#"{"detail": [{"loc": ["body", "top_k"], "msg": "must be >= 0", "type": "x"}]}"#;
        assert_eq!(server_message(fastapi), "body.top_k: must be >= 0");
        assert_eq!(server_message(r#"{"detail": "Not Found"}"#), "Not Found");
        assert_eq!(server_message("oops\n  here"), "`oops here`");
        assert_eq!(server_message(""), "(empty body)");
        let long = "x".repeat(500);
        assert_eq!(snippet(&long).chars().count(), 200 + 3);
        let long = format!(r#"{{"error": {{"message": "{}"}}}}"#, "y".repeat(500));
        assert_eq!(server_message(&long).chars().count(), 200 + 1);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut config = OpenAiConfig::new("http://127.0.0.1:1".into(), "m".into());
        config.backoff = Duration::from_millis(500);
        config.max_backoff = Duration::from_secs(30);
        let c = Client::new(&config).unwrap();
        let waits: Vec<u64> = (1..=9).map(|r| c.backoff(r).as_millis() as u64).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(c.backoff(60), Duration::from_secs(30));
    }

    #[test]
    fn base_url_must_be_http() {
        let e = Client::new(&OpenAiConfig::new("localhost:8000".into(), "m".into()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("http://"), "{e}");
    }
}
