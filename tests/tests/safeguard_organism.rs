//! The label-free safeguard on a real run: EM on organism-mixed's worst prompt at a high learning
//! rate makes the model ramble; the safeguard (watching unlabeled held-out prompts) stops the run,
//! and `final/` holds exactly the weights of the last update whose round passed — the checkpoint a
//! `warn` run of the same seeds writes at that step.

use std::path::Path;

use em_data::synthetic::{split_as_problems, Split};
use em_lab::organism;
use em_pipeline::train::{self, OnAlarm, RefreshType, TrainOptions};
use serde_json::{json, Value};

fn write_pool(problems: &[em_data::Problem], path: &Path, answers: bool) {
    let text: String = problems
        .iter()
        .map(|p| {
            let mut v = json!({"id": p.id, "prompt": p.messages});
            if answers {
                v["answer"] = json!(p.answers[0]);
            }
            format!("{v}\n")
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let t =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut v: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(n, t)| {
            let t = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap();
            (n, t.to_vec1().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn the_safeguard_stops_a_run_that_makes_the_model_ramble() {
    let tmp = tempfile::tempdir().unwrap();
    let subject = em_tests::repo_root().join("fixtures/organism-mixed");
    let pool = split_as_problems(0, Split::Pool, 232);
    // organism-pool-31: the majority-wrong prompt with the most variance at k = 16 (the demo's
    // screen); 4 of 16 right, and most of its samples ramble.
    let prompt = tmp.path().join("prompt.jsonl");
    write_pool(&pool[31..32], &prompt, true);
    let watch = tmp.path().join("watch.jsonl");
    write_pool(&pool[200..], &watch, false);
    let args = |out: &str, on_alarm: OnAlarm| TrainOptions {
        update: train::UpdateSettings {
            steps: 10,
            micro_batch: 16,
            lr: 1e-4,
            ..Default::default()
        },
        sampling: train::SampleSettings {
            samples: 64,
            max_new_tokens: organism::MAX_NEW_TOKENS,
            repetition_penalty: 1.0,
            ..Default::default()
        },
        refresh_type: RefreshType::F32,
        prompt_options: organism::prompt_options(),
        safeguard: train::WatchSettings {
            watch: Some(watch.clone()),
            on_alarm,
            ..Default::default()
        },
        checkpoints: train::CheckpointSettings {
            save_every: (on_alarm == OnAlarm::Warn).then_some(1),
            keep_last: 10,
        },
        ..TrainOptions::reference(subject.clone(), prompt.clone(), tmp.path().join(out))
    };
    let backend = xtask::backends::llama_default();
    let stop = args("stop", OnAlarm::Stop);
    let final_dir = train::run(&stop, &backend).unwrap().unwrap();
    let decision: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("stop/safeguard.json")).unwrap(),
    )
    .unwrap();
    println!("{decision}");
    assert_eq!(decision["decision"], "stop");
    let good = decision["final_weights_step"].as_u64().unwrap() as usize;
    let alarm = decision["alarm_weights_step"].as_u64().unwrap() as usize;
    assert!(alarm < 10 && good < alarm, "{decision}");
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("answered share fell"),
        "{decision}"
    );
    // The decision is in metrics.jsonl, with every signal and its threshold.
    let metrics = std::fs::read_to_string(tmp.path().join("stop/metrics.jsonl")).unwrap();
    let last: Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["safeguard"]["decision"], "stop");
    assert!(
        last["watch"]["answered"].as_f64().unwrap()
            < last["watch"]["answered_step0"].as_f64().unwrap()
    );

    // The same seeds in warn mode train on; its checkpoint at `good` is the stopped run's final.
    let warn = TrainOptions {
        stop_after: Some(good),
        ..args("warn", OnAlarm::Warn)
    };
    train::run(&warn, &backend).unwrap();
    if good > 0 {
        let checkpoint = tmp.path().join(format!("warn/checkpoint-{good}"));
        assert_eq!(weights(&final_dir), weights(&checkpoint));
    }
    // A rerun of the stopped run finds it ended.
    assert_eq!(train::run(&stop, &backend).unwrap().unwrap(), final_dir);

    // Interrupted just before the alarming round and resumed: the resumed run's own weights were
    // never judged, so it falls back to its newest earlier checkpoint, which with a checkpoint
    // every update is the uninterrupted run's choice.
    let mut interrupted = args("resumed", OnAlarm::Stop);
    interrupted.checkpoints.save_every = Some(1);
    interrupted.stop_after = Some(alarm);
    assert!(train::run(&interrupted, &backend).unwrap().is_none());
    let resumed = TrainOptions {
        stop_after: None,
        ..interrupted
    };
    let resumed_final = train::run(&resumed, &backend).unwrap().unwrap();
    let again: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("resumed/safeguard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(again["alarm_weights_step"], decision["alarm_weights_step"]);
    assert_eq!(again["final_weights_step"], good);
    assert_eq!(weights(&resumed_final), weights(&final_dir));
}
