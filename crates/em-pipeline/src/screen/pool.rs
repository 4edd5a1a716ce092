//! The pool a screen ranks: [`Pool::load`] reads it (the first `--limit` records, checked for
//! repeated ids and, where the rule needs them, gold answers), keeps each record in the pool's own
//! format for `chosen.jsonl`, and renders every prompt for the model.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use em_data::Problem;
use serde_json::Value;

use super::options::ScreenOptions;
use super::ranking::PromptResult;
use crate::prompt::{PromptRenderer, RenderedPrompt};
use crate::{Backend, Result};

/// The pool as screened.
pub struct Pool {
    /// The pool file.
    pub path: PathBuf,
    /// Its problems (the first `--limit`).
    pub problems: Vec<Problem>,
    /// Each problem's record in the pool's own format, to write the chosen one.
    pub raw: Vec<String>,
    /// Each problem's prompt, rendered for the model.
    pub prompts: Vec<RenderedPrompt>,
    /// The prompt style, as the renderer describes it.
    pub style: String,
}

impl Pool {
    /// Loads and checks `args.pool` and renders its prompts for `args.model`.
    pub fn load(args: &ScreenOptions, backend: &dyn Backend) -> Result<Self> {
        let path = crate::assets::pool_path(&args.pool)?;
        let mut problems = em_data::load_pool(&path)?;
        let mut raw = raw_records(&path, &problems)?;
        if let Some(n) = args.limit {
            problems.truncate(n);
            raw.truncate(n);
        }
        check_problems(&path, &problems, args)?;
        let (prompts, style) = render(&path, &problems, args, backend)?;
        Ok(Pool {
            path,
            problems,
            raw,
            prompts,
            style,
        })
    }

    /// The indices of the problems not among `done`, in pool order.
    pub fn todo(&self, done: &[PromptResult]) -> Vec<usize> {
        let done: HashSet<&str> = done.iter().map(|r| r.id.as_str()).collect();
        (0..self.problems.len())
            .filter(|&i| !done.contains(self.problems[i].id.as_str()))
            .collect()
    }
}

/// Refuses a pool with a repeated id, or a problem without gold answers under a rule that grades.
fn check_problems(path: &Path, problems: &[Problem], args: &ScreenOptions) -> Result<()> {
    let mut ids = HashSet::new();
    if let Some(p) = problems.iter().find(|p| !ids.insert(p.id.as_str())) {
        bail!("{}: prompt id {} appears twice", path.display(), p.id);
    }
    if let Some(p) = problems
        .iter()
        .find(|p| args.rule.needs_labels() && p.answers.is_empty())
    {
        bail!(
            "{}: prompt {} has no gold answer to grade against (rule {:?} needs one; `--rule agreement` does not)",
            path.display(),
            p.id,
            args.rule
        );
    }
    Ok(())
}

/// Every problem's prompt rendered for the model, and the prompt style.
fn render(
    path: &Path,
    problems: &[Problem],
    args: &ScreenOptions,
    backend: &dyn Backend,
) -> Result<(Vec<RenderedPrompt>, String)> {
    let mut rendered = Vec::with_capacity(problems.len());
    let mut style = String::new();
    crate::with_vocab(backend, &args.model, &mut |vocab| {
        let renderer = PromptRenderer::new(vocab, &args.prompt)?;
        style = renderer.description.clone();
        rendered = renderer.render_all(problems, path)?;
        Ok(())
    })?;
    Ok((rendered, style))
}

/// The pool's own records, by id, to write the chosen prompt in the pool's format.
fn raw_records(path: &Path, problems: &[Problem]) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let same = lines.len() == problems.len()
        && lines.iter().zip(problems).all(|(l, p)| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("id").cloned())
                .is_none_or(|id| id == p.id.as_str())
        });
    if same {
        Ok(lines.into_iter().map(String::from).collect())
    } else {
        problems
            .iter()
            .map(|p| serde_json::to_string(p).context("serialise a problem"))
            .collect()
    }
}
