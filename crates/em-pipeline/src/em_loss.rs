//! The EM loss of METHOD.md and its gradient for given token sequences, for
//! checking numerics against another implementation (e.g. PyTorch/transformers in f32).
//!
//! Input: `{"temperature": τ, "sequences": [{"prompt_ids": [..], "response_ids": [..]}, ..]}`.
//! Output: the last line of stdout is `{"loss": <f64>, "n_tokens": <int>}` (token mean over all
//! response tokens of all sequences); `--grads-out` writes each parameter's gradient under its HF
//! name (a tied LM head appears once, as `model.embed_tokens.weight`, as in PyTorch).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use em_train::models::CausalLm;
use em_train::{accumulate_em_gradients, EmOptions, Gradients, Sequence};
use serde::Deserialize;

/// Float type the model runs in.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelDtype {
    F32,
    F64,
    Bf16,
}

impl ModelDtype {
    pub fn dtype(self) -> DType {
        match self {
            ModelDtype::F32 => DType::F32,
            ModelDtype::F64 => DType::F64,
            ModelDtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct EmLossArgs {
    /// HF model directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON file: {"temperature": τ, "sequences": [{"prompt_ids": [..], "response_ids": [..]}, ..]}.
    #[arg(long)]
    pub input: PathBuf,
    /// Write every parameter's gradient (HF names) to this safetensors file.
    #[arg(long)]
    pub grads_out: Option<PathBuf>,
    /// Float type of the computation (gradients are written in f32, f64 for f64).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: ModelDtype,
    /// Sequences per forward/backward pass (the result does not depend on it).
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Train the `pad_token_id` row of the input embedding through the input path too (by
    /// default it gets none there, as transformers' `padding_idx` rules).
    #[arg(long)]
    pub train_pad_row: bool,
}

/// The input file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmLossInput {
    pub temperature: f64,
    pub sequences: Vec<Sequence>,
}

/// Reads and checks an input file; errors name the file (and the line for malformed JSON).
pub fn read_input(path: &Path) -> Result<EmLossInput> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let input: EmLossInput = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: bad input at line {}, column {}: {}",
            path.display(),
            e.line(),
            e.column(),
            strip_position(&e.to_string())
        )
    })?;
    if !(input.temperature.is_finite() && input.temperature > 0.0) {
        bail!(
            "{}: temperature {} is not a finite number > 0",
            path.display(),
            input.temperature
        );
    }
    if input.sequences.is_empty() {
        bail!("{}: no sequences", path.display());
    }
    Ok(input)
}

fn strip_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |i| &message[..i])
}

/// Loss (token mean), response tokens and gradients of `input` on `model`.
pub fn compute(
    model: &CausalLm,
    input: &EmLossInput,
    micro_batch: usize,
) -> Result<(f64, usize, Gradients), em_train::TrainError> {
    let n: usize = input.sequences.iter().map(|s| s.response_ids.len()).sum();
    let options = EmOptions::new(input.temperature, micro_batch, model.config().vocab_size);
    let mut grads = Gradients::new(model.parameters());
    let stats = accumulate_em_gradients(
        model,
        &input.sequences,
        &options,
        1.0 / n.max(1) as f64,
        &mut grads,
    )?;
    Ok((stats.entropy_sum / n.max(1) as f64, stats.n_tokens, grads))
}

/// Writes gradients to a safetensors file, under a temporary name renamed when complete.
pub fn save_gradients(grads: &Gradients, path: &Path) -> Result<()> {
    let tensors: std::collections::HashMap<String, Tensor> = grads
        .named_tensors()
        .context("collecting gradients")?
        .into_iter()
        .collect();
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

pub fn run(args: &EmLossArgs) -> Result<()> {
    let input = read_input(&args.input)?;
    let mut model = CausalLm::from_hf_dir(&args.model, args.dtype.dtype(), &Device::Cpu)?;
    if args.train_pad_row {
        model.set_padding_idx(None);
    }
    let (loss, n_tokens, grads) = compute(&model, &input, args.micro_batch)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
    if let Some(path) = &args.grads_out {
        save_gradients(&grads, path)?;
        eprintln!(
            "gradients of {} parameters -> {}",
            model.parameters().len(),
            path.display()
        );
    }
    println!(
        "{}",
        serde_json::json!({ "loss": loss, "n_tokens": n_tokens })
    );
    Ok(())
}
