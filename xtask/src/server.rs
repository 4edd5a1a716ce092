//! A real OpenAI-compatible server for the tests and benchmarks: llama-cpp-python's
//! `llama_cpp.server`, installed by `.ci/install-llama-server.sh` into a venv under the cache dir,
//! serving one GGUF on a free port of 127.0.0.1. Dropping the handle kills the server.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `start` waits for the model to load and `/v1/models` to answer.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The venv python that has `llama_cpp.server`: `EM_LLAMA_SERVER_PYTHON`, else
/// `${EM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/oneshot-em}/llama-server-venv/bin/python`
/// (where the install script puts it). None when that file does not exist.
pub fn server_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EM_LLAMA_SERVER_PYTHON") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    Some(em_pipeline::assets::cache_dir().join("llama-server-venv/bin/python"))
        .filter(|p| p.exists())
}

/// A running `llama_cpp.server` child process.
pub struct LlamaCppServer {
    child: Child,
    port: u16,
    log_dir: PathBuf,
}

impl LlamaCppServer {
    /// Serves `gguf` under the model name `alias`, CPU, 2 threads, n_ctx 2048, seed 0, flash
    /// attention on (without it, logits depend on how much of the prompt the server reuses from
    /// its KV cache, so identical requests can give different greedy text). Returns once
    /// GET /v1/models answers 200; on failure the error carries the tail of the server's log.
    pub fn start(gguf: &Path, alias: &str) -> Result<Self, String> {
        Self::start_with_threads(gguf, alias, 2)
    }

    /// As [`LlamaCppServer::start`], with `threads` CPU threads.
    pub fn start_with_threads(gguf: &Path, alias: &str, threads: usize) -> Result<Self, String> {
        let python = server_python().ok_or(
            "no llama-cpp-python server venv: run .ci/install-llama-server.sh \
             or set EM_LLAMA_SERVER_PYTHON",
        )?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?
            .port();
        let log_dir =
            std::env::temp_dir().join(format!("em-llama-server-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
        let log_path = log_dir.join("server.log");
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        #[rustfmt::skip]
        let args = [
            "-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", &port.to_string(),
            "--model_alias", alias, "--n_ctx", "2048", "--n_threads", &threads.to_string(), "--n_threads_batch", &threads.to_string(),
            "--seed", "0", "--n_gpu_layers", "0", "--flash_attn", "true",
        ];
        let child = Command::new(&python)
            .args(args)
            .arg("--model")
            .arg(gguf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", python.display()))?;
        let mut server = LlamaCppServer {
            child,
            port,
            log_dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "llama_cpp.server exited ({status}) before answering; log:\n{}",
                    server.log_tail()
                ));
            }
            let probe = em_openai::OpenAiConfig {
                dialect: em_openai::Dialect::LlamaCppPython,
                prompt_format: em_openai::PromptFormat::Text,
                ..em_openai::OpenAiConfig::new(server.base_url(), alias.to_string())
            };
            if em_openai::OpenAiSampler::new(probe).is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "llama_cpp.server did not answer GET /v1/models within {}s; log:\n{}",
                    START_TIMEOUT.as_secs(),
                    server.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `http://127.0.0.1:PORT/v1`, the base URL an OpenAI client takes.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The last 40 lines of the server's stdout and stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for LlamaCppServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.log_dir);
    }
}
