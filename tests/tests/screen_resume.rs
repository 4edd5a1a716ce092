//! `cargo xtask screen` on the tiny fixture: a run interrupted mid-way (and its torn last line)
//! resumes with every prompt screened exactly once; another model, another pool or other settings
//! into the same directory are refused (and `--fresh` replaces); the chosen prompt comes out in
//! the pool's own format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use em_convert::{self as convert, ConvertArgs, HfDtype, OutType};
use em_pipeline::prompt::{PromptOptions, Style};
use em_pipeline::screen::{self, Rule, ScreenOptions};
use em_tests::tiny_qwen2;
use xtask::backends::LlamaBackend;

fn backend() -> LlamaBackend {
    LlamaBackend::new(em_llama::EngineConfig {
        threads: 1,
        parallel: 4,
        ..Default::default()
    })
}

fn fixture_gguf(dir: &Path) -> PathBuf {
    let output = dir.join("tiny.gguf");
    let args = ConvertArgs {
        input: tiny_qwen2(),
        output: output.clone(),
        outtype: OutType::F32,
        hf_dtype: HfDtype::F32,
        force: false,
    };
    convert::convert(&args).expect("convert the tiny fixture");
    output
}

fn pool(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("pool.jsonl");
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "id": format!("q-{i}"),
                "prompt": [{"role": "user", "content": format!("What is {i} + {i}? Let's think step by step and output the final answer within \\boxed{{}}.")}],
                "answer": format!("{}", 2 * i),
                "data_source": "test",
            })
            .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn args(model: &Path, pool: &Path, out: &Path) -> ScreenOptions {
    ScreenOptions {
        model: model.into(),
        pool: pool.into(),
        k: 3,
        out: out.into(),
        limit: Some(7),
        max_new_tokens: 24,
        temperature: 0.5,
        top_p: 0.95,
        repetition_penalty: 1.15,
        seed: 15,
        prompt: PromptOptions {
            style: Style::Plain,
            ..Default::default()
        },
        rule: Rule::Variance,
        keep_responses: true,
        em_inf: None,
        quant: OutType::F32,
        fresh: false,
        stop_after: None,
    }
}

fn ids_in(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn interrupted_screen_resumes_with_every_prompt_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture_gguf(tmp.path());
    let pool = pool(tmp.path(), 9); // screened with --limit 7
    let out = tmp.path().join("screen");

    // First run "killed" after 2 prompts, then a third prompt's line torn half-way by the kill.
    screen::run(
        &ScreenOptions {
            stop_after: Some(2),
            ..args(&model, &pool, &out)
        },
        &backend(),
    )
    .unwrap();
    let prompts = out.join("prompts.jsonl");
    let first = ids_in(&prompts);
    assert_eq!(first.len(), 2);
    assert!(
        !out.join("ranking.json").exists(),
        "an interrupted run must not rank"
    );
    let torn = r#"{"id":"q-6","n":3,"correct":0,"pass_ra"#;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&prompts)
        .and_then(|mut f| std::io::Write::write_all(&mut f, torn.as_bytes()))
        .unwrap();

    // Other settings, another pool or another model into the same directory are refused, naming
    // the manifest and what differs; nothing there is touched.
    let before = std::fs::read(&prompts).unwrap();
    let refused = |a: ScreenOptions| screen::run(&a, &backend()).unwrap_err().to_string();
    let err = refused(ScreenOptions {
        k: 5,
        ..args(&model, &pool, &out)
    });
    assert!(
        err.contains("manifest.json") && err.contains("settings.k: 3 there, 5 now"),
        "{err}"
    );
    let other_pool = tmp.path().join("other");
    std::fs::create_dir(&other_pool).unwrap();
    let other_pool = self::pool(&other_pool, 8);
    let err = refused(args(&model, &other_pool, &out));
    assert!(err.contains("pool: file"), "{err}");
    let other_model = tmp.path().join("other.gguf");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes.extend_from_slice(&[0u8; 32]); // padding after the tensor data: same weights, other file
    std::fs::write(&other_model, bytes).unwrap();
    let err = refused(args(&other_model, &pool, &out));
    assert!(
        err.contains("model: gguf") && err.contains("--fresh"),
        "{err}"
    );
    let err = refused(ScreenOptions {
        prompt: PromptOptions::default(),
        ..args(&model, &pool, &out)
    });
    assert!(err.contains("settings.prompt.style"), "{err}");
    assert_eq!(
        std::fs::read(&prompts).unwrap(),
        before,
        "a refusal must not touch the results"
    );

    // The same command again finishes the job.
    screen::run(&args(&model, &pool, &out), &backend()).unwrap();
    let ids = ids_in(&prompts);
    assert_eq!(&ids[..2], &first[..], "screened prompts were rewritten");
    let mut counts: HashMap<&str, usize> = HashMap::new();
    ids.iter()
        .for_each(|id| *counts.entry(id).or_default() += 1);
    assert_eq!(counts.len(), 7, "{ids:?}");
    assert!(
        counts.values().all(|&c| c == 1),
        "a prompt screened twice: {ids:?}"
    );

    // A third run has nothing left to sample and leaves the results alone.
    screen::run(&args(&model, &pool, &out), &backend()).unwrap();
    assert_eq!(ids_in(&prompts), ids);

    let ranking: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ranking.json")).unwrap()).unwrap();
    assert_eq!(ranking["ranking"].as_array().unwrap().len(), 7);
    assert_eq!(ranking["rule"], "variance");
    let chosen = std::fs::read_to_string(out.join("chosen.jsonl")).unwrap();
    let pool_lines = std::fs::read_to_string(&pool).unwrap();
    assert!(
        pool_lines.lines().any(|l| l == chosen.trim_end()),
        "chosen.jsonl is not a pool line: {chosen}"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&chosen).unwrap()["id"],
        ranking["chosen"]
    );
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&prompts)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["responses"].as_array().unwrap().len(), 3);
    assert_eq!(line["answers"].as_array().unwrap().len(), 3);
    let (lo, hi) = (
        line["ci95"][0].as_f64().unwrap(),
        line["ci95"][1].as_f64().unwrap(),
    );
    let p = line["pass_rate"].as_f64().unwrap();
    assert!(
        lo <= p + 1e-12 && p <= hi + 1e-12 && hi > lo,
        "interval [{lo}, {hi}] around {p}"
    );

    // The gibberish model gets nothing right: no prompt has a confident right majority.
    let err = refused(ScreenOptions {
        rule: Rule::MajorityRight,
        ..args(&model, &pool, &out)
    });
    assert!(err.contains("no prompt qualifies"), "{err}");

    // --fresh replaces the output with a run of the other model.
    screen::run(
        &ScreenOptions {
            fresh: true,
            limit: Some(2),
            ..args(&other_model, &pool, &out)
        },
        &backend(),
    )
    .unwrap();
    assert_eq!(ids_in(&out.join("prompts.jsonl")).len(), 2);
}
