//! Screening the pool and the prompt each rule picks: `majority-right` and `variance` (need
//! labels), `trial` (label-free: `select`'s trials of the `doubt` rule's first candidates)
//! and `majority-wrong` (the worst prompt, on purpose), and with `--random-prompts` some prompts
//! drawn at random.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use em_convert::OutType;
use em_pipeline::screen::{self, PromptResult, Rule, ScreenOptions};
use em_pipeline::select::{self, SelectOptions};
use em_pipeline::train::RefreshType;
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
    random: usize,
    phases: &mut Phases,
    notes: &mut Vec<String>,
) -> Result<Vec<Chosen>> {
    let screen_args = screen_options(demo);
    let screen_dir = screen_args.out.clone();
    let screened = screen::run(&screen_args, demo.backend)?;
    phases.lap("screen");
    let chosen = choose(demo, &screened, &screen_dir, random, notes)?;
    phases.lap("trials");
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

/// Labels of the random prompts (`--random-prompts`, at most this many).
const RANDOM: [&str; 9] = [
    "random-1", "random-2", "random-3", "random-4", "random-5", "random-6", "random-7", "random-8",
    "random-9",
];

/// The trial rule's `select` settings: its candidates are the first of the label-free
/// `doubt` rule, each trained for a few updates through a LoRA adapter and judged on the
/// safeguard's held-out prompts (`<dir>/select`, its own manifest).
pub(super) fn trial_options(demo: &Demo) -> SelectOptions {
    let quick = demo.quick;
    let mut o = SelectOptions::reference(
        demo.subject.clone(),
        demo.data.pool_path.clone(),
        demo.data.watch_path.clone(),
        demo.dir.join("select"),
    );
    o.k = demo.plan.k;
    o.by = Rule::Doubt;
    o.candidates = if quick { 2 } else { 8 };
    if quick {
        o.trial_samples = 8;
    }
    // One pass per update: the organism is tiny.
    o.micro_batch = o.trial_samples;
    o.held_out_limit = demo.plan.watch;
    o.refresh_type = RefreshType::F32;
    o.max_new_tokens = demo.plan.max_new_tokens;
    o.repetition_penalty = 1.0;
    o.prompt = organism::prompt_options();
    o
}

/// The trial rule's pick (None where no candidate is predicted to help), with a note of the
/// trials and their cost.
fn trial_pick<'a>(
    demo: &Demo,
    screened: &'a [PromptResult],
    raw: &[String],
    notes: &mut Vec<String>,
) -> Result<Option<&'a PromptResult>> {
    let o = trial_options(demo);
    select::claim(&o, demo.backend)?;
    let selection = select::try_candidates(&o, demo.backend, screened, &demo.data.pool, raw)?;
    let calls: Vec<String> = selection
        .ranking
        .iter()
        .map(|c| {
            let p = &c.prediction;
            format!(
                "{} {:+.3} [{:+.3}, {:+.3}] {}",
                c.id, p.effect, p.effect_ci95.0, p.effect_ci95.1, p.call
            )
        })
        .collect();
    notes.push(format!(
        "trial ({} candidates by doubt, {} updates × {} responses each, LoRA lr {:e}, judged by the held-out answered-and-stopped share against the base's, paired over {} prompts): {}; {}; the trials took {:.1} s",
        selection.ranking.len(),
        o.trial_steps,
        o.trial_samples,
        o.trial_lr,
        o.held_out_limit,
        calls.join(", "),
        match &selection.chosen {
            Some(id) => format!("picks {id}"),
            None => "no candidate is predicted to help: the rule declines".into(),
        },
        selection.trials_seconds,
    ));
    Ok(selection
        .chosen
        .as_ref()
        .and_then(|id| screened.iter().find(|r| &r.id == id)))
}

/// The prompt of each rule, its pool line written to `<screen_dir>/chosen-<rule>.jsonl`: the
/// screen's rules, the trial rule, and `random` prompts drawn with a fixed seed.
fn choose(
    demo: &Demo,
    screened: &[PromptResult],
    screen_dir: &Path,
    random: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<Chosen>> {
    let raw: Vec<String> = std::fs::read_to_string(&demo.data.pool_path)?
        .lines()
        .map(String::from)
        .collect();
    if random > RANDOM.len() {
        bail!("--random-prompts {random}: at most {}", RANDOM.len());
    }
    let mut picks: Vec<(&'static str, Option<&PromptResult>)> = vec![
        (
            "majority-right",
            screen::choose(screened, Rule::MajorityRight),
        ),
        ("variance", screen::choose(screened, Rule::Variance)),
        ("trial", trial_pick(demo, screened, &raw, notes)?),
        (
            "majority-wrong",
            screen::choose(screened, Rule::MajorityWrong),
        ),
    ];
    // Random prompts: a seeded shuffle of the screened pool, the first `random`.
    let mut order: Vec<&PromptResult> = screened.iter().collect();
    // FNV-1a of ids that differ in their last digits differs in its low bits alone: mixed
    // through splitmix64 before sorting, or neighbouring ids would sort together.
    order.sort_by_key(|r| em_pipeline::train::step_seed(em_pipeline::item_seed(17, &r.id), 0));
    picks.extend(
        RANDOM
            .iter()
            .zip(order)
            .take(random)
            .map(|(l, r)| (*l, Some(r))),
    );
    let mut chosen: Vec<Chosen> = vec![];
    for (label, pick) in picks {
        let Some(r) = pick else {
            if label != "trial" {
                notes.push(format!(
                    "screen: rule {label} finds no qualifying prompt among {}",
                    screened.len()
                ));
            }
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
