//! The items of a suite and their results: [`load_suites`], and [`evaluate`], which renders the
//! items still to do, samples them through `drive`, grades each as it arrives and appends it to the
//! per-item JSONL ([`ItemResult`]), resuming from the items already there.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use em_data::Problem;
use em_sampler::{Request, Sample, SamplingParams};
use em_store::{JsonlStore, Manifest};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::options::{Decoding, Setting};
use crate::prompt::{PromptOptions, PromptRenderer, RenderedPrompt};
use crate::{Backend, Result};

/// One item's samples, as written to the per-item JSONL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    /// The rendered prompt text the model was given (absent in folders written before it was
    /// recorded); `analyze logits` reads it with each response.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prompt: String,
    pub gold: Vec<String>,
    pub samples: Vec<SampleResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleResult {
    pub response: String,
    pub pred: Option<String>,
    pub correct: bool,
    pub n_tokens: usize,
    pub finish: String,
}

impl ItemResult {
    /// Fraction of samples correct.
    pub fn score(&self) -> f64 {
        self.samples.iter().filter(|s| s.correct).count() as f64 / self.samples.len().max(1) as f64
    }

    /// `problem`'s samples, each graded against its gold answers.
    fn graded(problem: &Problem, prompt: &str, samples: &[Sample]) -> Self {
        ItemResult {
            id: problem.id.clone(),
            prompt: prompt.to_string(),
            gold: problem.answers.clone(),
            samples: samples
                .iter()
                .map(|s| {
                    let verdict = em_grade::grade(&s.text, &problem.answers);
                    SampleResult {
                        response: s.text.clone(),
                        pred: verdict.pred,
                        correct: verdict.correct,
                        n_tokens: s.n_tokens,
                        finish: format!("{:?}", s.finish).to_lowercase(),
                    }
                })
                .collect(),
        }
    }
}

/// The suites by label, with their files and (limited) problems.
pub fn load_suites(
    names: &[String],
    limit: Option<usize>,
) -> Result<Vec<(String, PathBuf, Vec<Problem>)>> {
    names
        .iter()
        .map(|name| {
            let path = crate::assets::suite_path(name)?;
            let mut problems = em_data::load_suite(&path)?;
            if let Some(n) = limit {
                problems.truncate(n);
            }
            let label = Path::new(name)
                .file_stem()
                .map_or(name.clone(), |s| s.to_string_lossy().into_owned());
            Ok((label, path, problems))
        })
        .collect()
}

/// Evaluates `problems` at `setting` with the model `source` (sampled from `gguf`), appending one
/// JSON line per finished item to `out` and skipping items already there. Returns all items in
/// suite order.
pub fn evaluate(
    backend: &dyn Backend,
    source: &Path,
    gguf: &Path,
    problems: &[Problem],
    setting: &Setting,
    args: &Decoding,
    out: &Path,
) -> Result<Vec<ItemResult>> {
    let (mut store, done) = JsonlStore::<ItemResult>::open(out)?;
    let done_ids: HashSet<String> = done.iter().map(|d| d.id.clone()).collect();
    let todo: Vec<&Problem> = problems
        .iter()
        .filter(|p| !done_ids.contains(&p.id))
        .collect();
    let params = sampling_params(setting, args);
    // A finished suite loads nothing: the model is read only when items remain.
    let rendered = if todo.is_empty() {
        vec![]
    } else {
        render_todo(backend, source, &todo, &problems[0].id, &args.prompt, out)?
    };
    let requests: Vec<Request> = todo
        .iter()
        .zip(&rendered)
        .map(|(p, prompt)| Request {
            prompt: prompt.to_prompt(),
            n_samples: setting.n,
            // Each item gets its own random stream: with one seed for all, sample i of every item
            // would draw the same uniforms and make the same early choices across items.
            params: SamplingParams {
                seed: crate::item_seed(params.seed, &p.id),
                ..params.clone()
            },
        })
        .collect();
    let prefix = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bar =
        crate::drive::progress_bar(problems.len() as u64, done.len() as u64, "items", &prefix);
    let mut new_items: Vec<ItemResult> = vec![];
    if !requests.is_empty() {
        backend.with_sampler(gguf, &mut |sampler| {
            crate::drive::sample_each(
                sampler,
                &requests,
                &bar,
                crate::drive::Count::Requests,
                &mut |request, samples| {
                    let item = ItemResult::graded(todo[request], &rendered[request].text, &samples);
                    store.append(&item)?;
                    new_items.push(item);
                    Ok(true)
                },
            )?;
            Ok(())
        })?;
    }
    let items = in_suite_order(problems, done.into_iter().chain(new_items));
    if items.len() < problems.len() {
        anyhow::bail!(
            "{}: {} of {} items were not evaluated (the sampler stopped early)",
            out.display(),
            problems.len() - items.len(),
            problems.len()
        );
    }
    Ok(items)
}

/// The sampling parameters of `setting` (greedy at temperature 0), before each item's seed.
fn sampling_params(setting: &Setting, args: &Decoding) -> SamplingParams {
    let mut params = SamplingParams::greedy(args.max_new_tokens);
    if setting.temperature > 0.0 {
        params.greedy = false;
        params.temperature = setting.temperature;
        params.top_p = args.top_p;
        params.seed = args.seed;
    }
    params.em_inf = setting.em_inf;
    params
}

/// The prompts of `todo`, rendered for the model `source`, in order. The suite's first problem
/// (`first`), when among them, is noted in the manifest of `out`'s folder.
fn render_todo(
    backend: &dyn Backend,
    source: &Path,
    todo: &[&Problem],
    first: &str,
    options: &PromptOptions,
    out: &Path,
) -> Result<Vec<RenderedPrompt>> {
    let mut rendered = Vec::with_capacity(todo.len());
    crate::with_vocab(backend, source, &mut |vocab| {
        let renderer = PromptRenderer::new(vocab, options)?;
        for p in todo {
            let prompt = renderer
                .render(p)
                .with_context(|| format!("problem {}", p.id))?;
            if p.id == first {
                note_first_prompt(out, p, &prompt)?;
            }
            rendered.push(prompt);
        }
        Ok(())
    })?;
    Ok(rendered)
}

/// What the model saw on the suite's first problem, in the output's manifest (when the output has
/// one; a resumed run wrote it before that problem was done).
fn note_first_prompt(out: &Path, p: &Problem, prompt: &RenderedPrompt) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| d.join("manifest.json").is_file()) {
        let name = out.file_stem().unwrap_or_default().to_string_lossy();
        Manifest::note(
            dir,
            &format!("first_prompt:{name}"),
            json!({"id": p.id, "text": prompt.text, "ids": prompt.ids}),
        )?;
    }
    Ok(())
}

/// The results for `problems`, in their order (one per problem that has one).
pub(super) fn in_suite_order(
    problems: &[Problem],
    results: impl IntoIterator<Item = ItemResult>,
) -> Vec<ItemResult> {
    let mut by_id: HashMap<String, ItemResult> =
        results.into_iter().map(|i| (i.id.clone(), i)).collect();
    problems
        .iter()
        .filter_map(|p| by_id.remove(&p.id))
        .collect()
}
