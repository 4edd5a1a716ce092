//! Before anything runs: the subject found from any working directory, the output directory
//! claimed for this run, and the synthetic splits written as JSONL.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use em_data::synthetic::{split_as_problems, Split};
use em_data::Problem;
use em_pipeline::{Backend, Result};
use em_store::{write_atomic, Manifest};
use serde_json::json;

use super::{DemoOptions, Plan, Schedule};

/// The splits of one run, and the files the pipeline's stages read.
pub(super) struct Data {
    /// The screening pool.
    pub(super) pool: Vec<Problem>,
    pub(super) validation: Vec<Problem>,
    pub(super) test: Vec<Problem>,
    /// `data/pool.jsonl`.
    pub(super) pool_path: PathBuf,
    /// `data/watch.jsonl`: the safeguard's prompts, without answers.
    pub(super) watch_path: PathBuf,
}

/// The subject's model directory and its name.
pub(super) fn find_subject(args: &DemoOptions) -> Result<(PathBuf, String)> {
    // The default subject is a repository path: find it from any working directory.
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(&args.subject);
    let subject = if !args.subject.exists() && args.subject.is_relative() && in_repo.exists() {
        in_repo
    } else {
        args.subject.clone()
    };
    if !subject.join("config.json").is_file() {
        bail!(
            "{}: not a model directory (expected an organism from `cargo xtask organism`)",
            subject.display()
        );
    }
    let name = subject
        .file_name()
        .map_or("subject".into(), |n| n.to_string_lossy().into_owned());
    Ok((subject, name))
}

/// Creates `<out>/<name>` and claims it for this run (its manifest); returns it.
pub(super) fn claim(
    args: &DemoOptions,
    backend: &dyn Backend,
    plan: &Plan,
    schedule: &Schedule,
    subject: &Path,
    name: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("{}: cannot create", args.out.display()))?;
    let dir = args.out.join(name);
    let (lrs, seeds) = (&schedule.lrs, schedule.seeds);
    // The adapter's runs live in their own directories (`<rule>/lora-r<rank>/`), each recording
    // its settings: a LoRA demo reuses a full one's runs, so the adapter is not in this identity.
    let mut manifest = Manifest::new(
        "demo",
        em_store::model_identity(subject)?,
        json!({ "plan": plan, "lrs": lrs, "seeds": seeds, "data_seed": args.data_seed, "backend": backend.identity() }),
    );
    manifest.info = json!({ "tool": em_pipeline::TOOL });
    manifest.claim(&dir, args.fresh)?;
    Ok(dir)
}

/// Writes the pool, the evaluation splits and the safeguard's prompts under `<dir>/data`.
pub(super) fn write_splits(dir: &Path, plan: &Plan, data_seed: u64) -> Result<Data> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let mut pool = split_as_problems(data_seed, Split::Pool, plan.pool + plan.watch);
    let watch = pool.split_off(plan.pool);
    let validation = split_as_problems(data_seed, Split::Validation, plan.validation);
    let test = split_as_problems(data_seed, Split::Test, plan.test);
    let pool_path = data.join("pool.jsonl");
    write_pool(&pool, &pool_path)?;
    // The evaluation splits too, in the same format, for `cargo xtask eval --suites FILE`.
    write_pool(&validation, &data.join("validation.jsonl"))?;
    write_pool(&test, &data.join("test.jsonl"))?;
    // The safeguard never reads labels: its prompts are written without answers.
    let watch_path = data.join("watch.jsonl");
    write_pool(
        &watch
            .iter()
            .map(|p| Problem {
                answers: vec![],
                ..p.clone()
            })
            .collect::<Vec<_>>(),
        &watch_path,
    )?;
    Ok(Data {
        pool,
        validation,
        test,
        pool_path,
        watch_path,
    })
}

fn write_pool(problems: &[Problem], path: &Path) -> Result<()> {
    let mut text = String::new();
    for p in problems {
        let messages = p.messages.clone().unwrap_or_default();
        let mut line = json!({"id": p.id, "prompt": messages, "data_source": p.source});
        if let Some(a) = p.answers.first() {
            line["answer"] = json!(a);
        }
        text += &format!("{line}\n");
    }
    Ok(write_atomic(path, &text)?)
}
