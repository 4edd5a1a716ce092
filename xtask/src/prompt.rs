//! `cargo xtask prompt`: what a model will see for each problem, as text and token ids.

use std::path::PathBuf;

use anyhow::{bail, Result};
use em_pipeline::prompt::{PromptOptions, PromptRenderer};

use crate::flags::PromptFlags;

#[derive(clap::Args, Debug, Clone)]
pub struct PromptArgs {
    /// A .gguf file or an HF directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A suite name or file (as `eval --suites` takes).
    #[arg(long, conflicts_with = "pool")]
    pub suite: Option<String>,
    /// A prompt pool (as `screen --pool` and `train --prompt` take).
    #[arg(long)]
    pub pool: Option<PathBuf>,
    #[command(flatten)]
    pub prompt: PromptFlags,
    /// Only the first N problems.
    #[arg(long, default_value_t = 3)]
    pub limit: usize,
    /// One JSON object per line (`id`, `messages`, `text`, `ids`) instead of the readable form.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &PromptArgs) -> Result<()> {
    let mut problems = match (&args.suite, &args.pool) {
        (Some(suite), None) => em_data::load_suite(em_pipeline::assets::suite_path(suite)?)?,
        (None, Some(pool)) => em_data::load_pool(em_pipeline::assets::pool_path(pool)?)?,
        _ => bail!("give --suite or --pool"),
    };
    problems.truncate(args.limit);
    let options: PromptOptions = crate::flags::options(&args.prompt)?;
    let backend = crate::backends::llama_default();
    em_pipeline::with_vocab(&backend, &args.model, &mut |vocab| {
        let renderer = PromptRenderer::new(vocab, &options)?;
        if !args.json {
            println!("style: {}", renderer.description);
        }
        for p in &problems {
            let r = renderer.render(p)?;
            if args.json {
                let messages = renderer.messages(p);
                println!(
                    "{}",
                    serde_json::json!({"id": p.id, "messages": messages, "text": r.text, "ids": r.ids})
                );
            } else {
                println!(
                    "--- {} ({} tokens)\n{}\n{:?}",
                    p.id,
                    r.ids.len(),
                    r.text,
                    r.ids
                );
            }
        }
        Ok(())
    })
}
