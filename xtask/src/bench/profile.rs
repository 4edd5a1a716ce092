//! `bench em-step --profile`: where an update's CPU time goes, by the kernel each sample was in,
//! sampled with Linux `perf` attached to this process for the timed updates (no rebuild, no
//! instrumentation; `perf` must be on PATH and allowed to attach).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// What a sample's leaf symbol was doing, in the order the table prints.
pub const CATEGORIES: [&str; 11] = [
    "matmul (gemm)",
    "em-train's own kernels (LM head, entropy, frozen matmul, AdamW)",
    "elementwise binary (add, mul, …)",
    "elementwise unary (exp, silu, affine, …)",
    "reductions (sum, max)",
    "softmax",
    "layout copies (strided copy, cat, index)",
    "masking and comparisons",
    "memory (allocation, zeroing, page faults)",
    "thread pool (barrier waits, idle workers, scheduling)",
    "other",
];

/// The category of a sample whose leaf was `symbol` in `dso`.
pub fn categorize(dso: &str, symbol: &str) -> &'static str {
    let s = symbol.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| s.contains(n));
    if has(&["gemm"]) {
        CATEGORIES[0]
    } else if has(&["em_train"]) {
        CATEGORIES[1]
    } else if has(&["binary_map", "binaryop", "bin_op"]) {
        CATEGORIES[2]
    } else if has(&[
        "unary_map",
        "unaryop",
        "affine",
        "powf",
        "elu",
        "expf",
        "logf",
        "tanh",
    ]) {
        CATEGORIES[3]
    } else if has(&["reduce", "sum_impl", "fast_max", "fast_sum"]) {
        CATEGORIES[4]
    } else if has(&["softmax"]) {
        CATEGORIES[5]
    } else if has(&[
        "copy_strided",
        "copy2d",
        "index_select",
        "gather",
        "index_add",
        "scatter",
        "cat_contiguous",
        "transpose",
    ]) {
        CATEGORIES[6]
    } else if has(&["where_cond", "cmp", "wcond"]) {
        CATEGORIES[7]
    } else if has(&[
        "barrier",
        "begin_short_backtrace",
        "call_trampoline",
        "rayon",
        "crossbeam",
        "futex",
        "sched_yield",
        "spin",
        "park",
    ]) {
        CATEGORIES[9]
    } else if dso.contains("kernel")
        || has(&[
            "malloc", "free", "memset", "memcpy", "memmove", "alloc", "realloc", "mmap", "munmap",
            "madvise", "page",
        ])
    {
        CATEGORIES[8]
    } else {
        CATEGORIES[10]
    }
}

/// Shares by category (fractions summing to 1) from `perf report --stdio` lines
/// (`  12.34%  xtask  [.] symbol`), and the largest symbols left in "other" with their shares.
pub fn shares(report: &str) -> (BTreeMap<&'static str, f64>, Vec<(String, f64)>) {
    let mut by: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut other: Vec<(String, f64)> = vec![];
    let mut total = 0.0;
    for line in report.lines() {
        let line = line.trim();
        let Some((pct, rest)) = line.split_once('%') else {
            continue;
        };
        let Ok(pct) = pct.trim().parse::<f64>() else {
            continue;
        };
        let rest = rest.trim();
        let (dso, symbol) = match rest.split_once("[.]").or_else(|| rest.split_once("[k]")) {
            Some((dso, symbol)) if rest.contains("[k]") && !rest.contains("[.]") => {
                (format!("{} kernel", dso.trim()), symbol.trim().to_string())
            }
            Some((dso, symbol)) => (dso.trim().to_string(), symbol.trim().to_string()),
            None => continue,
        };
        // perf pads the symbol column; what follows the padding is not part of the name.
        let symbol = match symbol.split_once("   ") {
            Some((name, _)) => name.trim().to_string(),
            None => symbol,
        };
        let category = categorize(&dso, &symbol);
        *by.entry(category).or_default() += pct;
        if category == CATEGORIES[10] {
            other.push((symbol, pct));
        }
        total += pct;
    }
    if total > 0.0 {
        by.values_mut().for_each(|v| *v /= total);
        other.iter_mut().for_each(|(_, v)| *v /= total);
    }
    other.sort_by(|a, b| b.1.total_cmp(&a.1));
    other.truncate(3);
    (by, other)
}

/// Shares by category, and the largest symbols of "other".
pub type Shares = (BTreeMap<&'static str, f64>, Vec<(String, f64)>);

/// `perf record` attached to this process until [`Recording::finish`].
pub struct Recording {
    child: Child,
    data: PathBuf,
    cpu0: f64,
}

/// Seconds of CPU this process has used (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, r)| r.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

impl Recording {
    /// Starts sampling this process at 499 Hz into `work/perf-<label>.data`.
    pub fn start(work: &Path, label: &str) -> Result<Self> {
        let data = work.join(format!("perf-{label}.data"));
        let child = Command::new("perf")
            .args(["record", "-q", "-F", "499", "-o"])
            .arg(&data)
            .args(["-p", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("--profile needs Linux `perf` on PATH (apt-get install linux-perf)")?;
        // perf attaches asynchronously; give it a moment before the timed work starts.
        std::thread::sleep(std::time::Duration::from_millis(300));
        Ok(Self {
            child,
            data,
            cpu0: cpu_seconds(),
        })
    }

    /// Stops sampling; the shares by category and the CPU seconds used meanwhile.
    pub fn finish(self) -> Result<(Shares, f64)> {
        let cpu = cpu_seconds() - self.cpu0;
        // SIGINT makes perf write a complete file.
        // SAFETY: signals the perf child this recording spawned and still owns.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out = self.child.wait_with_output()?;
        if !self.data.is_file() {
            bail!(
                "perf record wrote no {}: {}",
                self.data.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "dso,symbol",
                "-i",
            ])
            .arg(&self.data)
            .output()
            .context("perf report")?;
        let _ = std::fs::remove_file(&self.data);
        let text = String::from_utf8_lossy(&report.stdout);
        let by = shares(&text);
        if by.0.is_empty() {
            bail!(
                "perf report gave no samples: {}",
                String::from_utf8_lossy(&report.stderr).trim()
            );
        }
        Ok((by, cpu))
    }
}

/// Prints the profile of `updates` timed updates that took `wall` seconds in all, with the
/// matmuls' FLOP/s (`flops` per update) against the per-core peak.
pub fn print(
    label: &str,
    (by, other): &Shares,
    cpu: f64,
    wall: f64,
    updates: usize,
    flops: f64,
    peak_per_core: Option<f64>,
) {
    let per_update = cpu / updates.max(1) as f64;
    println!(
        "profile of {label}: {updates} updates, {:.1} s wall, {cpu:.1} CPU s ({:.2} cores busy on average)",
        wall,
        cpu / wall.max(1e-9)
    );
    println!("| where the CPU time went | share | CPU s / update |");
    println!("|---|---|---|");
    for c in CATEGORIES {
        if let Some(s) = by.get(c) {
            println!("| {c} | {:.1}% | {:.2} |", 100.0 * s, s * per_update);
        }
    }
    if !other.is_empty() {
        let names: Vec<String> = other
            .iter()
            .map(|(n, v)| format!("{n} {:.1}%", 100.0 * v))
            .collect();
        println!("largest in other: {}", names.join("; "));
    }
    let gemm = by.get(CATEGORIES[0]).copied().unwrap_or(0.0) * per_update;
    if gemm > 0.0 {
        let rate = flops / gemm / 1e9;
        println!(
            "matmuls: {:.2} TFLOP per update in {gemm:.2} CPU s = {rate:.1} GFLOP/s per busy core{}",
            flops / 1e12,
            peak_per_core.map_or(String::new(), |p| format!(
                ", {:.0}% of the per-core peak {p:.0}",
                100.0 * rate / p
            ))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_lines_fall_into_their_categories() {
        let report = "\
# Samples: 10K of event 'cpu-clock'
#
    50.00%  xtask              [.] gemm_f32::microkernel::x86::avx512::matmul_16_4
    10.00%  xtask              [.] candle_core::cpu_backend::utils::binary_map
     5.00%  xtask              [.] candle_core::cpu_backend::utils::unary_map
     5.00%  xtask              [.] candle_core::cpu_backend::copy_strided_src_
     5.00%  [kernel.kallsyms]  [k] clear_page_erms
     5.00%  xtask              [.] <candle_core::utils::BarrierGuard as core::ops::drop::Drop>::drop
    10.00%  xtask              [.] em_train::objective::entropy_chunk
     5.00%  libc.so.6          [.] __memmove_avx512_unaligned_erms
     5.00%  xtask              [.] something_else
";
        let (by, other) = shares(report);
        assert_eq!(other, [("something_else".to_string(), 0.05)]);
        let close = |c: usize, want: f64| {
            let got = by.get(CATEGORIES[c]).copied().unwrap_or(0.0);
            assert!(
                (got - want).abs() < 1e-9,
                "{}: {got} vs {want}",
                CATEGORIES[c]
            );
        };
        close(0, 0.5);
        close(1, 0.1);
        close(2, 0.1);
        close(3, 0.05);
        close(6, 0.05);
        close(8, 0.10);
        close(9, 0.05);
        close(10, 0.05);
        assert!((by.values().sum::<f64>() - 1.0).abs() < 1e-9);
    }
}
