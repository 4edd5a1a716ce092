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
use em_pipeline::train::ModelDtype;
use em_train::models::CausalLm;
use em_train::{accumulate_em_gradients, EmOptions, Gradients, Sequence};
use serde::Deserialize;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EmLossOptions {
    /// HF model directory (config.json + safetensors).
    pub model: PathBuf,
    /// JSON file: {"temperature": τ, "sequences": [{"prompt_ids": [..], "response_ids": [..]}, ..]}.
    pub input: PathBuf,
    /// Write every parameter's gradient (HF names) to this safetensors file.
    pub grads_out: Option<PathBuf>,
    /// Float type of the computation (gradients are written in f32, f64 for f64).
    pub dtype: ModelDtype,
    /// Sequences per forward/backward pass (the result does not depend on it).
    pub micro_batch: usize,
    /// Train the `pad_token_id` row of the input embedding through the input path too (by
    /// default it gets none there, as transformers' `padding_idx` rules).
    pub train_pad_row: bool,
    /// Where to compute: cpu, cuda or cuda:N (a build with the `cuda` feature).
    pub device: String,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations
    /// (the same gradients, less memory, one more forward pass).
    pub recompute: bool,
    /// Compute again on this device and fail unless the loss agrees to 1e-4 and every gradient
    /// to 1e-3 (relative to the tensor's largest entry), e.g. `--device cuda --check-against cpu`.
    pub check_against: Option<String>,
}

/// Relative tolerances of `--check-against`.
pub const CHECK_LOSS_RTOL: f64 = 1e-4;
pub const CHECK_GRAD_RTOL: f64 = 1e-3;

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
    recompute: bool,
) -> Result<(f64, usize, Gradients), em_train::TrainError> {
    let n: usize = input.sequences.iter().map(|s| s.response_ids.len()).sum();
    let options = EmOptions {
        recompute,
        ..EmOptions::new(input.temperature, micro_batch, model.config().vocab_size)
    };
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

fn load(args: &EmLossOptions, device: &str) -> Result<CausalLm> {
    let device = em_train::parse_device(device)?;
    let mut model = CausalLm::from_hf_dir(&args.model, args.dtype.dtype(), &device)?;
    if args.train_pad_row {
        model.set_padding_idx(None);
    }
    Ok(model)
}

/// The largest per-tensor relative difference `max|a − b| / max|b|` between two gradient sets of
/// one model, with the tensor's name.
pub fn worst_gradient_difference(a: &Gradients, b: &Gradients) -> Result<(f64, String)> {
    let mut worst = (0.0f64, String::new());
    for ((name, _, ga), (_, _, gb)) in a.iter().zip(b.iter()) {
        let (ga, gb) = match (ga, gb) {
            (Some(x), Some(y)) => (
                x.to_device(&Device::Cpu)?.to_dtype(DType::F64)?,
                y.to_device(&Device::Cpu)?.to_dtype(DType::F64)?,
            ),
            (None, None) => continue,
            _ => return Ok((f64::INFINITY, name.to_string())),
        };
        let max = |t: &Tensor| -> Result<f64> { Ok(t.abs()?.max_all()?.to_scalar::<f64>()?) };
        let scale = max(&gb)?;
        let diff = max(&(&ga - &gb)?)?;
        let rel = if scale > 0.0 { diff / scale } else { diff };
        if rel > worst.0 || worst.1.is_empty() {
            worst = (rel, name.to_string());
        }
    }
    Ok(worst)
}

pub fn run(args: &EmLossOptions) -> Result<()> {
    let input = read_input(&args.input)?;
    let model = load(args, &args.device)?;
    let start = std::time::Instant::now();
    let (loss, n_tokens, grads) = compute(&model, &input, args.micro_batch, args.recompute)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(path) = &args.grads_out {
        save_gradients(&grads, path)?;
        eprintln!(
            "gradients of {} parameters -> {}",
            model.parameters().len(),
            path.display()
        );
    }
    let mut report = serde_json::json!({
        "loss": loss, "n_tokens": n_tokens, "device": args.device, "seconds": seconds,
    });
    if let Some(other) = &args.check_against {
        let reference = load(args, other)?;
        let start = std::time::Instant::now();
        let (ref_loss, _, ref_grads) =
            compute(&reference, &input, args.micro_batch, args.recompute)
                .map_err(|e| anyhow::anyhow!("{}: {e}", args.input.display()))?;
        let ref_seconds = start.elapsed().as_secs_f64();
        let loss_rel = (loss - ref_loss).abs() / ref_loss.abs().max(f64::MIN_POSITIVE);
        let (grad_rel, worst) = worst_gradient_difference(&grads, &ref_grads)?;
        report["check"] = serde_json::json!({
            "device": other, "loss": ref_loss, "seconds": ref_seconds,
            "loss_relative_difference": loss_rel,
            "worst_gradient_relative_difference": grad_rel, "worst_gradient": worst,
        });
        println!("{report}");
        if !(loss_rel <= CHECK_LOSS_RTOL && grad_rel <= CHECK_GRAD_RTOL) {
            bail!(
                "{} vs {other}: loss differs by {loss_rel:.2e} (limit {CHECK_LOSS_RTOL:.0e}), \
                 gradient {worst} by {grad_rel:.2e} (limit {CHECK_GRAD_RTOL:.0e})",
                args.device
            );
        }
        return Ok(());
    }
    println!("{report}");
    Ok(())
}
