//! `cargo xtask convert`: the command line over `em-convert`.

use std::path::PathBuf;

use anyhow::Result;
use em_convert::{HfDtype, OutType};

#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// An HF model directory (-> GGUF) or a .gguf file (-> HF directory).
    pub input: PathBuf,
    /// The .gguf file or the directory to write.
    #[arg(long, short)]
    pub output: PathBuf,
    /// GGUF tensor type, when writing GGUF.
    #[arg(long, value_enum, default_value = "f16")]
    pub outtype: OutType,
    /// Safetensors float type, when writing an HF directory.
    #[arg(long, value_enum, default_value = "f32")]
    pub hf_dtype: HfDtype,
    /// Replace the output if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let report = em_convert::convert(&em_convert::ConvertArgs {
        input: args.input.clone(),
        output: args.output.clone(),
        outtype: args.outtype,
        hf_dtype: args.hf_dtype,
        force: args.force,
    })?;
    for (name, wanted, got) in &report.fallbacks {
        eprintln!("note: {name}: row length does not fit {wanted:?}; stored as {got:?} (llama.cpp's fallback)");
    }
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    for (key, value) in &report.defaults_applied {
        eprintln!("note: config.json has no \"{key}\"; used transformers' class default {value}");
    }
    println!(
        "{}: {} tensors, {:.1} MB",
        args.output.display(),
        report.tensors,
        report.bytes_out as f64 / 1e6
    );
    Ok(())
}
