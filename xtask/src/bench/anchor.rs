//! The baseline the sampling benchmarks run beside ours: the project's llama.cpp anchor
//! (`bench/llamacpp-anchor`, a llama.h-only tool following llama.cpp's batched-bench, embedded in
//! this binary and built from the llama.cpp sources llama-cpp-sys-2 vendors), and the small
//! helpers the benchmarks share.

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

/// The anchor's sources, written into the benchmark's work directory before it is built.
const ANCHOR_CMAKE: &str = include_str!("../../../bench/llamacpp-anchor/CMakeLists.txt");
const ANCHOR_CPP: &str = include_str!("../../../bench/llamacpp-anchor/batched_bench.cpp");

/// The workspace's lock file as this binary was built with it: the llama-cpp-sys-2 version the
/// engine links, whose sources the anchor is built from.
const CARGO_LOCK: &str = include_str!("../../../Cargo.lock");

/// The llama-cpp-sys-2 version in `lock`.
fn llama_sys_version(lock: &str) -> Option<&str> {
    lock.split("[[package]]")
        .find(|p| p.contains("name = \"llama-cpp-sys-2\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"'))
}

/// The llama.cpp sources vendored by the llama-cpp-sys-2 version this binary was built with
/// (`LLAMA_SRC` overrides).
pub(super) fn llama_src() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LLAMA_SRC") {
        return Ok(p.into());
    }
    let version = llama_sys_version(CARGO_LOCK)
        .context("the embedded Cargo.lock has no llama-cpp-sys-2 package")?;
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

/// Writes `contents` to `path` unless it already holds them (so that cmake rebuilds nothing
/// that did not change).
fn write_if_changed(path: &Path, contents: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(());
    }
    std::fs::write(path, contents).with_context(|| format!("{}: cannot write", path.display()))
}

/// The anchor binary under `work`, built (cmake, as llama-cpp-sys-2 builds llama.cpp) when absent
/// or when the embedded sources or the llama.cpp sources differ from those it was built from.
pub(super) fn anchor_binary(work: &Path) -> Result<PathBuf> {
    let anchor = work.join("llamacpp-anchor");
    let build = work.join("llamacpp-anchor-build");
    let bin = build.join("anchor-batched-bench");
    let src = llama_src()?;
    // What the binary was built from; written once a build succeeds.
    let stamp_path = build.join("anchor-built-from.txt");
    let stamp = format!("{}\n{ANCHOR_CMAKE}\n{ANCHOR_CPP}", src.display());
    if bin.is_file() && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(bin);
    }
    std::fs::create_dir_all(&anchor)
        .with_context(|| format!("{}: cannot create", anchor.display()))?;
    write_if_changed(&anchor.join("CMakeLists.txt"), ANCHOR_CMAKE)?;
    write_if_changed(&anchor.join("batched_bench.cpp"), ANCHOR_CPP)?;
    eprintln!(
        "bench: building the llama.cpp anchor from {} (several minutes)",
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
    std::fs::write(&stamp_path, stamp)
        .with_context(|| format!("{}: cannot write", stamp_path.display()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_lock_names_llama_cpp_sys() {
        let version = llama_sys_version(CARGO_LOCK).expect("llama-cpp-sys-2 in Cargo.lock");
        assert!(
            version.split('.').all(|p| p.parse::<u32>().is_ok()),
            "{version}"
        );
        assert_eq!(llama_sys_version("[[package]]\nname = \"x\"\n"), None);
    }
}
