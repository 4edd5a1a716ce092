//! Drives a sampler over many requests: a progress bar, and each finished request handed on
//! (to be graded and stored) as it arrives.

use std::ops::ControlFlow;
use std::sync::LazyLock;

use em_sampler::{Event, Request, RunStats, Sample, Sampler};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::Result;

/// Every bar of the process, drawn together: a run's step bar stays above the bar of the step's
/// sampling or update instead of the two overwriting one line.
static BARS: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

fn bars_hidden() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("EM_NO_PROGRESS").is_some()
}

fn shown(bar: ProgressBar) -> ProgressBar {
    if bars_hidden() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
        bar
    } else {
        BARS.add(bar)
    }
}

/// A progress bar over `len` units of which `done` are already done; hidden in CI.
pub fn progress_bar(len: u64, done: u64, unit: &str, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_position(done);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{msg}}, ETA {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    shown(bar)
}

/// The bar over a run's steps (its message the last step's figures); hidden in CI and off a
/// terminal, where [`say`] prints each step's line instead.
pub fn steps_bar(len: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::new(len).with_position(done);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed} {msg}")
            .expect("valid template"),
    );
    let bar = shown(bar);
    bar.tick();
    bar
}

/// Prints a line to stderr above the bars, which are redrawn below it.
pub fn say(line: &str) {
    BARS.suspend(|| eprintln!("{line}"));
}

/// What a sampling bar counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// Finished requests (many prompts).
    Requests,
    /// Finished responses (one prompt, many samples).
    Responses,
}

/// Samples `requests`, calling `on_done(request, samples)` once per finished request; it returns
/// `Ok(false)` to stop early. An error from `on_done` stops the run and is returned. The bar
/// counts what `count` says.
pub fn sample_each(
    sampler: &mut dyn Sampler,
    requests: &[Request],
    bar: &ProgressBar,
    count: Count,
    on_done: &mut dyn FnMut(usize, Vec<Sample>) -> Result<bool>,
) -> Result<RunStats> {
    let mut failure = None;
    let stats = sampler.generate(requests, &mut |event| match event {
        Event::RequestDone { request, samples } => match on_done(request, samples) {
            Ok(go_on) => {
                if count == Count::Requests {
                    bar.inc(1);
                }
                if go_on {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            }
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        },
        Event::Step {
            samples_done,
            generated_tokens,
            elapsed,
            ..
        } => {
            if count == Count::Responses {
                bar.set_position(samples_done);
            }
            let secs = elapsed.as_secs_f64().max(1e-9);
            bar.set_message(format!("{:.1} tok/s", generated_tokens as f64 / secs));
            ControlFlow::Continue(())
        }
    })?;
    bar.finish_and_clear();
    match failure {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}
