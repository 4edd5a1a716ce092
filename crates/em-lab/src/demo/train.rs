//! One EM run of the demo and what it leaves: a chosen prompt under one training (full or an
//! adapter), trained in the safeguard's `warn` mode with a checkpoint after every update, its
//! result as a model directory, and its first alarm.

use std::path::{Path, PathBuf};

use anyhow::Context;
use em_pipeline::train::{
    self, AdapterOptions, CheckpointSettings, OnAlarm, RefreshType, SampleSettings, TrainOptions,
    UpdateSettings, WatchSettings,
};
use em_pipeline::Result;
use em_store::JsonlStore;
use em_train::lora::LoraConfig;
use serde_json::Value;

use super::prompts::Chosen;
use super::{Demo, Schedule};
use crate::organism;

/// A chosen prompt under one training: where its runs live and what they try.
pub(super) struct Arm<'a> {
    pub(super) chosen: &'a Chosen,
    /// `None` for full fine-tuning, or the adapter.
    pub(super) training: &'a Option<LoraConfig>,
    /// The first rule that picked the prompt.
    pub(super) tag: &'static str,
    /// `<rule>` or `<rule>/lora-r<rank>`, under the demo's directory.
    pub(super) runs_dir: String,
    /// The learning rates tried on validation.
    pub(super) lrs: &'a [f64],
    /// The training in titles: empty for full fine-tuning, else `<adapter>, `.
    pub(super) kind: String,
    /// Training seeds at the chosen learning rate.
    pub(super) seeds: usize,
    /// Every training of the demo, in order.
    pub(super) trainings: &'a [Option<LoraConfig>],
}

impl<'a> Arm<'a> {
    pub(super) fn new(
        chosen: &'a Chosen,
        training: &'a Option<LoraConfig>,
        schedule: &'a Schedule,
    ) -> Self {
        let tag = chosen.rules[0];
        let (runs_dir, lrs, kind) = match training {
            None => (tag.to_string(), &schedule.lrs, String::new()),
            Some(l) => (
                format!("{tag}/lora-r{}", l.rank),
                &schedule.lora_lrs,
                format!("{}, ", training_name(training.as_ref())),
            ),
        };
        Arm {
            chosen,
            training,
            tag,
            runs_dir,
            lrs,
            kind,
            seeds: schedule.seeds,
            trainings: &schedule.trainings,
        }
    }
}

/// EM training of the subject on the arm's prompt (resumes if `out` holds the run), the
/// safeguard watching in `warn` mode, a checkpoint after every update; returns the final model.
pub(super) fn train_em(demo: &Demo, arm: &Arm, out: &Path, lr: f64, seed: u64) -> Result<PathBuf> {
    let plan = &demo.plan;
    let args = TrainOptions {
        adapter: arm
            .training
            .as_ref()
            .map(AdapterOptions::of)
            .unwrap_or_default(),
        checkpoints: CheckpointSettings {
            save_every: Some(1),
            keep_last: plan.steps,
        },
        safeguard: WatchSettings {
            watch: Some(demo.data.watch_path.clone()),
            watch_limit: plan.watch,
            watch_samples: plan.watch_samples,
            watch_every: 1,
            on_alarm: OnAlarm::Warn,
        },
        ..organism_run(demo, &arm.chosen.file, out, lr, seed)
    };
    let trained = train::run(&args, demo.backend)?
        .with_context(|| format!("{}: training did not finish", out.display()))?;
    as_model(&demo.subject, &trained)
}

/// The demo's EM run of the subject on `prompt` at `lr`, seeded by `seed`, in `out`: the plan's
/// updates and responses, the organisms' sampling settings, no safeguard, a checkpoint after the
/// last update.
pub(super) fn organism_run(
    demo: &Demo,
    prompt: &Path,
    out: &Path,
    lr: f64,
    seed: u64,
) -> TrainOptions {
    let plan = &demo.plan;
    let reference = TrainOptions::reference(demo.subject.clone(), prompt.into(), out.into());
    TrainOptions {
        sampling: SampleSettings {
            samples: plan.samples_per_update,
            seed: 15 + seed,
            max_new_tokens: plan.max_new_tokens,
            // No repetition penalty for character-level organisms (see the screen).
            repetition_penalty: 1.0,
            ..reference.sampling.clone()
        },
        update: UpdateSettings {
            steps: plan.steps,
            // One pass per update: the organism is tiny, and the gradient does not depend on it.
            micro_batch: plan.samples_per_update,
            lr,
            ..reference.update.clone()
        },
        // The organisms are tiny: sampling exactly the f32 weights being trained costs nothing.
        refresh_type: RefreshType::F32,
        prompt_options: organism::prompt_options(),
        ..reference
    }
}

/// `trained` as an HF model directory: itself, or a PEFT adapter merged into `subject` (once, in
/// `<trained>-merged`), which sampling, evaluation and analysis take as any model.
pub(super) fn as_model(subject: &Path, trained: &Path) -> Result<PathBuf> {
    if !trained.join("adapter_config.json").is_file() {
        return Ok(trained.to_path_buf());
    }
    let mut name = trained.file_name().unwrap_or_default().to_os_string();
    name.push("-merged");
    let merged = trained.with_file_name(name);
    // The merge is written atomically: a config.json there is a whole merge.
    if !merged.join("config.json").is_file() {
        let adapter = em_convert::lora::read_peft_dir(trained)?;
        em_convert::lora::merge_into(subject, &adapter, &merged)?;
    }
    Ok(merged)
}

/// The weights step and reason of a run's first alarm, from its metrics.
pub(super) fn first_alarm(metrics: &Path) -> Result<Option<(usize, String)>> {
    Ok(JsonlStore::<Value>::read(metrics)?
        .into_iter()
        .find_map(|v| {
            let reason = v.get("safeguard")?.get("reason")?.as_str()?.to_string();
            let step = v.get("watch")?.get("weights_step")?.as_u64()? as usize;
            Some((step, reason))
        }))
}

/// "full", or the adapter's name.
pub(super) fn training_name(lora: Option<&LoraConfig>) -> String {
    match lora {
        None => "full".into(),
        Some(l) => format!("LoRA r{} α{}", l.rank, l.alpha),
    }
}
