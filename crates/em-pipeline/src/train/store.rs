//! What a run keeps on disk: checkpoints (complete HF or PEFT directories, written under a
//! temporary name and renamed), their pruning, the metrics lines a resumed run cuts back, and
//! what a killed run leaves half-written.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::DType;
use em_store::JsonlStore;
use em_train::Trainer;
use serde_json::{json, Value};

use crate::Result;

/// Bytes this process has written so far (`wchar` of /proc/self/io; None where there is none).
pub(crate) fn bytes_written() -> Option<u64> {
    let io = fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Files copied from the starting model into every checkpoint.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
];

/// Writes the current weights as a complete HF directory at `dir` (replaced if present).
pub(crate) fn write_hf_dir(
    trainer: &Trainer,
    source: &Path,
    dir: &Path,
    optimizer: bool,
) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("{}: cannot remove", dir.display()))?;
    }
    if trainer.model.adapter().is_some() {
        // A PEFT adapter directory naming its base, with llama.cpp's form of it beside.
        let base = fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
        let adapter = em_train::lora::to_peft(&trainer.model, Some(base.display().to_string()))?
            .context("an adapter")?;
        em_convert::lora::write_peft_dir(&adapter, dir)?;
        em_store::crash_point("checkpoint.write");
        if optimizer {
            trainer.save_optimizer(dir)?;
        }
        em_convert::lora::write_lora_gguf(
            &adapter,
            trainer.model.config(),
            &dir.join(ADAPTER_GGUF),
            em_convert::lora::LoraGgufType::F32,
        )?;
        return Ok(());
    }
    if optimizer {
        trainer.save(dir)?;
    } else {
        trainer.model.save_hf_dir(dir, trainer.model.dtype())?;
    }
    em_store::crash_point("checkpoint.write");
    // config.json as read, with the dtype the weights are now stored in.
    let config_path = dir.join("config.json");
    let mut config = em_convert::read_json(&config_path)?;
    let dtype = match trainer.model.dtype() {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    };
    // transformers 5 writes `dtype`, 4.x `torch_dtype`: update the one the file uses.
    let key = if config.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    config[key] = json!(dtype);
    fs::write(&config_path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("{}: cannot write", config_path.display()))?;
    for name in TOKENIZER_FILES {
        let from = source.join(name);
        if from.is_file() {
            fs::copy(&from, dir.join(name))
                .with_context(|| format!("{}: cannot copy", from.display()))?;
        }
    }
    Ok(())
}

/// llama.cpp's LoRA GGUF inside an adapter checkpoint or `final/` (for `eval --adapter`).
pub const ADAPTER_GGUF: &str = "adapter.gguf";

/// Writes `dir` under a temporary sibling name and renames it into place when complete.
pub(crate) fn write_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let staged = em_store::Staged::new(dir)?;
    write(staged.path())?;
    Ok(staged.commit()?)
}

/// The checkpoints in `out` (`checkpoint-{step}` directories), newest first.
pub(crate) fn checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
    found
}

/// The latest complete checkpoint of `out` and its step.
pub fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
    checkpoints(out)
        .into_iter()
        .find(|(_, dir)| dir.join("state.json").is_file())
}

/// Removes what a killed run leaves half-written: staged checkpoints and `final`, and the
/// sampling GGUF (written whole again by the first refresh).
pub(crate) fn remove_leftovers(out: &Path) -> Result<()> {
    em_store::remove_stale_staged(out)?;
    let sampling = out.join(".sampling");
    if sampling.exists() {
        fs::remove_dir_all(&sampling)
            .with_context(|| format!("{}: cannot remove", sampling.display()))?;
    }
    Ok(())
}

/// After writing checkpoint `step`: keeps the newest `keep` checkpoints, and the optimizer state
/// only in the newest (a run resumes from there alone).
pub(crate) fn prune_checkpoints(out: &Path, step: usize, keep: usize) -> Result<()> {
    let older = checkpoints(out).into_iter().filter(|(s, _)| *s < step);
    for (i, (_, dir)) in older.enumerate() {
        if i + 1 >= keep.max(1) {
            fs::remove_dir_all(&dir)
                .with_context(|| format!("{}: cannot remove", dir.display()))?;
            continue;
        }
        let optimizer = dir.join(em_train::trainer::OPTIMIZER_FILE);
        if let Some(parent) = optimizer.parent().filter(|p| p.exists()) {
            fs::remove_dir_all(parent)
                .with_context(|| format!("{}: cannot remove", parent.display()))?;
        }
    }
    Ok(())
}

/// Keeps the metrics lines of steps up to `keep_through` (a resumed run redoes the later ones).
pub(crate) fn truncate_metrics(path: &Path, keep_through: usize) -> Result<()> {
    let body: String = JsonlStore::<Value>::read(path)?
        .into_iter()
        .filter(|v| {
            v.get("step")
                .and_then(Value::as_u64)
                .is_some_and(|s| s as usize <= keep_through)
        })
        .map(|v| format!("{v}\n"))
        .collect();
    Ok(em_store::write_atomic(path, body)?)
}

/// The checkpoint stage: `checkpoint-{step}/` with the optimizer state and `state.json`, then the
/// older ones pruned to `keep_last`.
pub fn write_checkpoint(
    out: &Path,
    trainer: &Trainer,
    source: &Path,
    step: usize,
    keep_last: usize,
) -> Result<()> {
    let dir = out.join(format!("checkpoint-{step}"));
    write_atomically(&dir, |tmp| {
        write_hf_dir(trainer, source, tmp, true)?;
        let state = json!({ "step": step });
        fs::write(
            tmp.join("state.json"),
            serde_json::to_string_pretty(&state)? + "\n",
        )?;
        Ok(())
    })?;
    prune_checkpoints(out, step, keep_last)
}

/// Writes the trainer's current weights as `out/final/` and returns its path.
pub fn write_final(out: &Path, trainer: &Trainer, source: &Path) -> Result<PathBuf> {
    let final_dir = out.join("final");
    write_atomically(&final_dir, |tmp| write_hf_dir(trainer, source, tmp, false))?;
    Ok(final_dir)
}
