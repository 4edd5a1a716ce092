//! The baselines the sampling benchmarks run beside ours: llama.cpp's own batched tool
//! (`../shared/bench/llamacpp-anchor`, built from the llama.cpp sources llama-cpp-sys-2 vendors),
//! and the small helpers the benchmarks share.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

pub(super) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .with_context(|| format!("{name}={v} is not a valid value")),
        Err(_) => Ok(default),
    }
}

pub(super) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

pub(super) fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().next().unwrap_or("?").to_string())
        .unwrap_or_default()
}

/// The llama.cpp sources vendored by the llama-cpp-sys-2 version in Cargo.lock.
pub(super) fn llama_src() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LLAMA_SRC") {
        return Ok(p.into());
    }
    let lock_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let lock = std::fs::read_to_string(&lock_path)
        .with_context(|| format!("{}: cannot read", lock_path.display()))?;
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"llama-cpp-sys-2\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string())
        .with_context(|| format!("{}: no llama-cpp-sys-2 package", lock_path.display()))?;
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let registry = home.join("registry/src");
    for entry in std::fs::read_dir(&registry)
        .with_context(|| format!("{}: cannot read", registry.display()))?
    {
        let dir = entry?
            .path()
            .join(format!("llama-cpp-sys-2-{version}/llama.cpp"));
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    bail!(
        "llama-cpp-sys-2-{version}/llama.cpp not found under {} (run `cargo fetch`)",
        registry.display()
    )
}

/// The anchor binary, built (cmake, as llama-cpp-sys-2 builds llama.cpp) when absent.
pub(super) fn anchor_binary(work: &Path) -> Result<PathBuf> {
    let build = work.join("llamacpp-anchor-build");
    let bin = build.join("anchor-batched-bench");
    if bin.is_file() {
        return Ok(bin);
    }
    let anchor = std::env::var_os("EM_ANCHOR_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/llamacpp-anchor")
        });
    if !anchor.join("batched_bench.cpp").is_file() {
        bail!(
            "{}: no batched_bench.cpp (set EM_ANCHOR_DIR)",
            anchor.display()
        );
    }
    let src = llama_src()?;
    eprintln!(
        "bench sample: building the llama.cpp anchor from {} (several minutes)",
        src.display()
    );
    let flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=OFF",
        "-DGGML_OPENMP=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
    ];
    let status = Command::new("cmake")
        .arg("-S")
        .arg(&anchor)
        .arg("-B")
        .arg(&build)
        .arg(format!("-DLLAMA_SRC={}", src.display()))
        .args(flags)
        .status()
        .context("cannot run cmake (apt-get install cmake clang)")?;
    if !status.success() {
        bail!("cmake configure of {} failed", anchor.display());
    }
    let jobs = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let status = Command::new("cmake")
        .args(["--build"])
        .arg(&build)
        .args(["--target", "anchor-batched-bench", "-j", &jobs])
        .status()
        .context("cannot run cmake --build")?;
    if !status.success() || !bin.is_file() {
        bail!("building {} failed", bin.display());
    }
    Ok(bin)
}

/// One anchor run: (prompt seconds, generation tokens/s).
pub(super) fn run_anchor(
    bin: &Path,
    model: &Path,
    threads: i32,
    b: usize,
    pp: usize,
    tg: usize,
    shared: bool,
) -> Result<(f64, f64)> {
    let mut cmd = Command::new(bin);
    cmd.arg("-m").arg(model).args([
        "-t",
        &threads.to_string(),
        "-npp",
        &pp.to_string(),
        "-ntg",
        &tg.to_string(),
    ]);
    cmd.args(["-npl", &b.to_string(), "-r", "1"]);
    if shared {
        cmd.arg("-pps");
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the anchor printed no result")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    let get = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("anchor result lacks {k}: {line}"))
    };
    Ok((get("t_pp")?, get("speed_tg")?))
}
