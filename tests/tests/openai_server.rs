//! The OpenAI-compatible backend against a real server: llama-cpp-python's server (llama.cpp
//! underneath) serving the fetched SmolLM2 GGUF. The same screen through the server and in-process
//! gives pass rates within each other's intervals, and greedy evaluation of the same (f32) weights
//! gives the same answers.
//! Skips locally without the server venv or the model; fails in CI (`EM_REQUIRE_ASSETS=1`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use em_openai::{Dialect, OpenAiConfig, PromptFormat};
use em_pipeline::eval::{self, EvalOptions};
use em_pipeline::prompt::{PromptOptions, Style};
use em_pipeline::screen::{self, ScreenOptions};
use em_tests::asset;
use xtask::backends::{LlamaBackend, ServerBackend};
use xtask::server::{server_python, LlamaCppServer};

fn server_or_skip() -> Option<()> {
    em_testkit::available(
        server_python().is_some(),
        "the llama-cpp-python server venv",
        "run `bash .ci/install-llama-server.sh`",
    )
    .then_some(())
}

fn server_backend(server: &LlamaCppServer, format: PromptFormat) -> ServerBackend {
    ServerBackend {
        config: OpenAiConfig {
            concurrency: 1,
            timeout: Duration::from_secs(120),
            dialect: Dialect::LlamaCppPython,
            prompt_format: format,
            ..OpenAiConfig::new(server.base_url(), "smollm2".into())
        },
    }
}

fn local() -> LlamaBackend {
    LlamaBackend::new(em_llama::EngineConfig {
        parallel: 4,
        ..Default::default()
    })
}

fn screen_args(model: &Path, out: PathBuf) -> ScreenOptions {
    ScreenOptions {
        k: 3,
        limit: Some(4),
        max_new_tokens: 48,
        repetition_penalty: 1.0,
        prompt: PromptOptions {
            style: Style::Chat,
            ..Default::default()
        },
        keep_responses: true,
        ..ScreenOptions::reference(model.into(), PathBuf::from("dsr"), out)
    }
}

fn eval_args(model: &Path, out: PathBuf) -> EvalOptions {
    EvalOptions {
        model: model.into(),
        quant: em_convert::OutType::F16,
        suites: vec!["gsm8k".into()],
        out,
        limit: Some(4),
        temperature: 0.0,
        n: 1,
        top_p: 0.95,
        max_new_tokens: 48,
        prompt: PromptOptions::default(),
        baseline: None,
        adapter: None,
        baseline_adapter: None,
        baseline_temperatures: vec![],
        seed: 0,
        em_inf: None,
        baseline_em_inf: None,
        fresh: false,
    }
}

/// (id, response) of every item, by id (items are written in the order they finish).
fn responses(path: &Path) -> Vec<(String, String)> {
    let mut items: Vec<(String, String)> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().into(),
                v["samples"][0]["response"].as_str().unwrap().into(),
            )
        })
        .collect();
    items.sort();
    items
}

#[test]
fn screen_and_greedy_eval_through_a_real_server_match_in_process() {
    let Some(model) = asset(
        em_pipeline::assets::smollm2_path(&em_pipeline::assets::cache_dir()),
        "smollm2-135m",
    ) else {
        return;
    };
    if server_or_skip().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();

    // Greedy: the same weights give the same answers through the server and in-process. The weights
    // are the Q4_1 model's, dequantized to f32: quantized kernels round activations differently with
    // the batch shape and llama.cpp version (docs/openai-servers.md), f32 ones only reorder sums.
    // Such reordering can still flip a near-exact tie, so an answer may differ only where the two
    // best next tokens are within `TIE` logits of each other in llama.cpp's own logits.
    let f32_model = tmp.path().join("smollm2.f32.gguf");
    em_convert::gguf_to_hf(&model, &tmp.path().join("hf"), em_convert::HfDtype::F32).unwrap();
    em_convert::hf_to_gguf(&tmp.path().join("hf"), &f32_model, em_convert::OutType::F32).unwrap();
    let server = LlamaCppServer::start(&f32_model, "smollm2").unwrap_or_else(|e| panic!("{e}"));
    let one = |out: &str, limit: usize| EvalOptions {
        limit: Some(limit),
        max_new_tokens: 96,
        ..eval_args(&f32_model, tmp.path().join(out))
    };
    eval::run(&one("local", 6), &local()).unwrap();
    let here = responses(&tmp.path().join("local/gsm8k.model.greedy.jsonl"));
    eval::run(
        &one("server", 6),
        &server_backend(&server, PromptFormat::Text),
    )
    .unwrap();
    let there = responses(&tmp.path().join("server/gsm8k.model.greedy.jsonl"));
    eval::run(
        &one("server-again", 6),
        &server_backend(&server, PromptFormat::Text),
    )
    .unwrap();
    let again = responses(&tmp.path().join("server-again/gsm8k.model.greedy.jsonl"));
    assert_eq!(
        there, again,
        "greedy answers through the server are not repeatable"
    );
    assert_eq!(there.len(), 6);
    assert_eq!(here.len(), 6);
    let identical = here.iter().zip(&there).filter(|(a, b)| a == b).count();
    eprintln!("greedy answers identical in-process and through the server (f32 weights): {identical} of {}", here.len());
    let weights = em_llama::GgufModel::load(&f32_model).unwrap();
    let renderer =
        em_pipeline::prompt::PromptRenderer::new(&weights, &PromptOptions::default()).unwrap();
    let problems = &eval::load_suites(&["gsm8k".into()], Some(6)).unwrap()[0].2;
    for ((id, a), (_, b)) in here.iter().zip(&there) {
        assert!(
            !b.trim().is_empty(),
            "{id}: empty answer through the server"
        );
        if a == b {
            continue;
        }
        const TIE: f32 = 0.02;
        let common: String = a
            .chars()
            .zip(b.chars())
            .take_while(|(x, y)| x == y)
            .map(|(x, _)| x)
            .collect();
        let problem = problems.iter().find(|p| &p.id == id).unwrap();
        let mut tokens = renderer.render(problem).unwrap().ids;
        tokens.extend(weights.tokenize(&common, false));
        let logits = weights.logits(&tokens, 2).unwrap().pop().unwrap();
        let mut sorted = logits.clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        let margin = sorted[0] - sorted[1];
        eprintln!("  {id}: answers part after {} characters, where the two best logits are {margin:.4} apart", common.chars().count());
        assert!(
            margin < TIE,
            "{id}: greedy answers differ after {common:?} although the best next token leads by {margin} logits"
        );
    }
    drop(server);

    // Sampled runs use the fetched Q4_1 model itself.
    let server = LlamaCppServer::start(&model, "smollm2").unwrap_or_else(|e| panic!("{e}"));
    let e = eval::run(
        &EvalOptions {
            limit: Some(1),
            ..eval_args(&model, tmp.path().join("ids"))
        },
        &server_backend(&server, PromptFormat::Tokens),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("text prompts only") && !e.contains('\n'), "{e}");

    // Sampled: the same screen through both gives pass rates within each other's intervals.
    let local_screen = screen::run(
        &screen_args(&model, tmp.path().join("screen-local")),
        &local(),
    )
    .unwrap();
    let server_screen = screen::run(
        &screen_args(&model, tmp.path().join("screen-server")),
        &server_backend(&server, PromptFormat::Text),
    )
    .unwrap();
    assert_eq!(local_screen.len(), 4);
    assert_eq!(server_screen.len(), 4);
    for a in &local_screen {
        let b = server_screen
            .iter()
            .find(|b| b.id == a.id)
            .expect("same prompts");
        assert_eq!(b.n, 3);
        assert!(
            a.ci95.0 <= b.pass_rate + 1e-9 && b.pass_rate <= a.ci95.1 + 1e-9,
            "{}: server pass rate {} outside the in-process interval {:?}",
            a.id,
            b.pass_rate,
            a.ci95
        );
        assert!(b.mean_length > 0.0);
    }
    // A run through the server does not mix with one in-process.
    let e = screen::run(
        &screen_args(&model, tmp.path().join("screen-local")),
        &server_backend(&server, PromptFormat::Text),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("settings.backend"), "{e}");
}
