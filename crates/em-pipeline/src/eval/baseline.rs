//! The baseline of the paired comparison: a model evaluated here at its settings
//! ([`baseline_settings`]: the model's own, lower temperatures, EM-INF), or a finished eval folder
//! ([`Baseline::Folder`]) whose per-item results are checked against this run's suites and
//! settings ([`check_folder`]), read before any sampling ([`read_folder`]) and copied into this
//! output ([`adopt_folder`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use em_data::Problem;
use em_store::{JsonlStore, Manifest};
use serde_json::json;

use super::items::{in_suite_order, ItemResult};
use super::options::{EvalOptions, Setting};
use super::report::Results;
use crate::Result;

/// What the model is compared with.
pub enum Baseline {
    /// A model evaluated here, with its own adapter or none.
    Model {
        path: PathBuf,
        adapter: Option<PathBuf>,
    },
    /// A finished eval output whose model results are reused.
    Folder { dir: PathBuf, manifest: Manifest },
}

impl Baseline {
    /// The baseline at `path` (with the baseline's `adapter`): an eval folder when it holds a
    /// manifest, else a model.
    pub fn resolve(path: &Path, adapter: Option<&Path>) -> Result<Self> {
        let manifest_path = path.join("manifest.json");
        if !(path.is_dir() && manifest_path.is_file()) {
            return Ok(Baseline::Model {
                path: path.to_path_buf(),
                adapter: adapter.map(Path::to_path_buf),
            });
        }
        if let Some(a) = adapter {
            anyhow::bail!(
                "--baseline-adapter {}: --baseline {} is an eval folder, whose results already \
                 say what was evaluated",
                a.display(),
                path.display()
            );
        }
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("{}: cannot read", manifest_path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a manifest", manifest_path.display()))?;
        if manifest.kind != "eval" {
            anyhow::bail!(
                "{}: holds a {} output; --baseline takes a model or an eval folder",
                path.display(),
                manifest.kind
            );
        }
        Ok(Baseline::Folder {
            dir: path.to_path_buf(),
            manifest,
        })
    }

    /// Records the baseline among the inputs of the eval manifest `m`.
    pub fn record(&self, m: &mut Manifest) -> Result<()> {
        match self {
            Baseline::Model { path, adapter } => {
                m.inputs
                    .insert("baseline".into(), em_store::model_identity(path)?);
                if let Some(a) = adapter {
                    m.inputs
                        .insert("baseline_adapter".into(), em_store::file_identity(a)?);
                }
            }
            Baseline::Folder { manifest, .. } => {
                // A folder made under --adapter names the adapter as its model and its base in the
                // backend's identity: recorded as a baseline model with its adapter.
                let base = manifest.settings["backend"].get("adapter_base").cloned();
                match base.and_then(|b| serde_json::from_value::<em_store::Identity>(b).ok()) {
                    Some(base) => {
                        m.inputs.insert("baseline".into(), base);
                        m.inputs
                            .insert("baseline_adapter".into(), manifest.model.clone());
                    }
                    None => {
                        m.inputs.insert("baseline".into(), manifest.model.clone());
                    }
                }
                m.settings["baseline_from"] = json!("eval folder");
            }
        }
        Ok(())
    }
}

/// The settings of an eval output that its model results depend on.
const RESULT_SETTINGS: [&str; 7] = [
    "temperature",
    "n",
    "top_p",
    "max_new_tokens",
    "seed",
    "prompt",
    "em_inf",
];

/// Refuses an eval folder whose model results were not made by the suites and settings of `ours`,
/// naming what differs.
pub fn check_folder(dir: &Path, folder: &Manifest, ours: &Manifest) -> Result<()> {
    let mut differs = vec![];
    for key in RESULT_SETTINGS {
        let (there, now) = (&folder.settings[key], &ours.settings[key]);
        if there != now {
            differs.push(format!("{key}: {there} there, {now} now"));
        }
    }
    for (role, id) in ours.inputs.iter().filter(|(r, _)| r.starts_with("suite:")) {
        match folder.inputs.get(role) {
            Some(t) if t == id => {}
            Some(t) => differs.push(format!("{role}: {t} there, {id} now")),
            None => differs.push(format!("{role}: not evaluated there")),
        }
    }
    if !differs.is_empty() {
        anyhow::bail!(
            "{}: cannot serve as the baseline: {}",
            dir.display(),
            differs.join("; ")
        );
    }
    Ok(())
}

/// The folder's model results at `tag` for each of `suites`, in suite order; refuses a folder
/// that lacks any of them.
pub fn read_folder(
    dir: &Path,
    suites: &[(String, Vec<Problem>)],
    tag: &str,
) -> Result<Vec<(String, Vec<ItemResult>)>> {
    suites
        .iter()
        .map(|(suite, problems)| Ok((suite.clone(), folder_items(dir, suite, tag, problems)?)))
        .collect()
}

/// The folder's model results at `tag` for `problems`, in their order.
fn folder_items(
    dir: &Path,
    suite: &str,
    tag: &str,
    problems: &[Problem],
) -> Result<Vec<ItemResult>> {
    let path = dir.join(format!("{suite}.{tag}.jsonl"));
    if !path.is_file() {
        anyhow::bail!(
            "{}: missing (the eval there did not finish {suite})",
            path.display()
        );
    }
    let (_, done) = JsonlStore::<ItemResult>::open(&path)?;
    let items = in_suite_order(problems, done);
    if items.len() < problems.len() {
        anyhow::bail!(
            "{}: holds {} of the {} items asked for (rerun that eval with a larger --limit)",
            path.display(),
            items.len(),
            problems.len()
        );
    }
    Ok(items)
}

/// Takes the results [`read_folder`] read from `dir` as the baseline's at `setting`: copies them
/// into `out`, so that it holds every result it summarizes, and adds them to `results`.
pub fn adopt_folder(
    out: &Path,
    dir: &Path,
    reused: Vec<(String, Vec<ItemResult>)>,
    setting: &Setting,
    results: &mut Results,
) -> Result<()> {
    for (suite, items) in reused {
        let mut lines = String::new();
        for item in &items {
            lines += &serde_json::to_string(item)?;
            lines.push('\n');
        }
        em_store::write_atomic(&out.join(format!("{suite}.{}.jsonl", setting.tag())), lines)?;
        results.add(&suite, setting, items);
    }
    println!(
        "baseline: per-item results reused from {}; its lower temperatures are not run \
         (evaluate the base model itself for them)",
        dir.display()
    );
    Ok(())
}

/// The baseline's settings: the model's own, the lower temperatures, and EM-INF when asked.
pub fn baseline_settings(args: &EvalOptions, main: &Setting, same: Setting) -> Vec<Setting> {
    let mut settings = vec![same];
    for &t in &args.baseline_temperatures {
        let s = Setting {
            label: "baseline".into(),
            temperature: t,
            n: if t <= 0.0 { 1 } else { args.n },
            em_inf: None,
        };
        if !settings.iter().any(|x| x.tag() == s.tag()) {
            settings.push(s);
        }
    }
    if let Some(e) = args.baseline_em_inf {
        settings.push(Setting {
            label: "baseline".into(),
            em_inf: Some(e),
            ..main.clone()
        });
    }
    settings
}
