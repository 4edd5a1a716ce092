//! Screening the pool and the prompt each rule picks: `majority-right` (needs labels),
//! `agreement` (label-free) and `majority-wrong` (the worst prompt, on purpose).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use em_convert::OutType;
use em_pipeline::screen::{self, PromptResult, Rule, ScreenOptions};
use em_pipeline::Result;
use em_store::write_atomic;

use super::phases::Phases;
use super::Demo;
use crate::organism;

/// A prompt trained on, with the rules that picked it and its screening figures.
pub(super) struct Chosen {
    pub(super) rules: Vec<&'static str>,
    pub(super) result: PromptResult,
    /// Its pool line, alone in a JSONL file.
    pub(super) file: PathBuf,
}

/// Screens the pool and picks a prompt by each rule (a prompt two rules pick is trained once);
/// notes what screening found.
pub(super) fn screen_and_choose(
    demo: &Demo,
    phases: &mut Phases,
    notes: &mut Vec<String>,
) -> Result<Vec<Chosen>> {
    let screen_args = screen_options(demo);
    let screen_dir = screen_args.out.clone();
    let screened = screen::run(&screen_args, demo.backend)?;
    phases.lap("screen");
    let chosen = choose(demo, &screened, &screen_dir, notes)?;
    for c in &chosen {
        notes.push(screening_note(c, screened.len(), demo.plan.k));
    }
    if chosen.is_empty() {
        bail!("screening found no prompt under any rule");
    }
    Ok(chosen)
}

/// The demo's screen of its pool, in `<dir>/screen`.
pub(super) fn screen_options(demo: &Demo) -> ScreenOptions {
    // The organisms write one character a token: a repetition penalty would punish every
    // repeated digit of a worked sum, so it is off (the reference's 1.15 suits real tokenizers).
    ScreenOptions {
        k: demo.plan.k,
        max_new_tokens: demo.plan.max_new_tokens,
        repetition_penalty: 1.0,
        prompt: organism::prompt_options(),
        quant: OutType::F32,
        ..ScreenOptions::reference(
            demo.subject.clone(),
            demo.data.pool_path.clone(),
            demo.dir.join("screen"),
        )
    }
}

/// The prompt of each rule, its pool line written to `<screen_dir>/chosen-<rule>.jsonl`.
fn choose(
    demo: &Demo,
    screened: &[PromptResult],
    screen_dir: &Path,
    notes: &mut Vec<String>,
) -> Result<Vec<Chosen>> {
    let raw: Vec<String> = std::fs::read_to_string(&demo.data.pool_path)?
        .lines()
        .map(String::from)
        .collect();
    let mut chosen: Vec<Chosen> = vec![];
    for (label, rule) in [
        ("majority-right", Rule::MajorityRight),
        ("agreement", Rule::Agreement),
        ("majority-wrong", Rule::MajorityWrong),
    ] {
        let Some(r) = screen::choose(screened, rule) else {
            notes.push(format!(
                "screen: rule {label} finds no qualifying prompt among {}",
                screened.len()
            ));
            continue;
        };
        if let Some(c) = chosen.iter_mut().find(|c| c.result.id == r.id) {
            c.rules.push(label);
            continue;
        }
        let line = demo
            .data
            .pool
            .iter()
            .position(|p| p.id == r.id)
            .map(|i| raw[i].clone())
            .context("a chosen prompt is in the pool")?;
        let file = screen_dir.join(format!("chosen-{label}.jsonl"));
        write_atomic(&file, format!("{line}\n"))?;
        chosen.push(Chosen {
            rules: vec![label],
            result: r.clone(),
            file,
        });
    }
    Ok(chosen)
}

/// What screening found for one chosen prompt, among `screened` prompts of `k` samples each.
fn screening_note(c: &Chosen, screened: usize, k: usize) -> String {
    let (answer, share) = c.result.agreement();
    format!(
        "screen ({} prompts × {}): {} picks {}: pass {}/{} [{:.2}, {:.2}], majority answer {} held by {:.2}, answered-and-stopped {:.2}",
        screened,
        k,
        c.rules.join(" and "),
        c.result.id,
        c.result.correct,
        c.result.n,
        c.result.ci95.0,
        c.result.ci95.1,
        answer.as_deref().unwrap_or("(none)"),
        share,
        c.result.terminated()
    )
}
