//! The batched, prefix-sharing sampler on the tiny fixture (random weights, gibberish text):
//! reproducible by seed whatever the batch, the same tokens with and without prefix sharing,
//! stop strings and max tokens honoured, errors that name the file.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::OnceLock;

use em_convert::{self as convert, ConvertArgs, HfDtype, OutType};
use em_llama::{Engine, EngineConfig, GgufModel};
use em_sampler::{FinishReason, Request, Sample, Sampler, SamplingParams};
use em_tests::{argmax, tiny_qwen2};

/// The fixture as an f32 GGUF, converted once per test binary.
fn gguf() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("tiny.gguf");
        let args = ConvertArgs {
            input: tiny_qwen2(),
            output,
            outtype: OutType::F32,
            hf_dtype: HfDtype::F32,
            force: false,
        };
        convert::convert(&args).expect("convert the tiny fixture");
        dir
    });
    dir.path().join("tiny.gguf")
}

const PROMPTS: [&str; 3] = [
    "<|im_start|>user\nWhat is 12 + 30? Let's think step by step.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nFind x if 2x = 8.<|im_end|>\n<|im_start|>assistant\n",
    "The final answer is",
];

fn requests(params: &SamplingParams, n: usize) -> Vec<Request> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Request::text(
                *p,
                n,
                SamplingParams {
                    seed: params.seed + i as u64,
                    ..params.clone()
                },
            )
        })
        .collect()
}

fn run(model: &GgufModel, config: EngineConfig, reqs: &[Request]) -> Vec<Vec<Sample>> {
    Engine::new(model, config).generate_all(reqs).unwrap()
}

fn config(parallel: usize, shared_prefix: bool) -> EngineConfig {
    EngineConfig {
        threads: 1,
        parallel,
        shared_prefix,
        ..EngineConfig::default()
    }
}

fn tokens(out: &[Vec<Sample>]) -> Vec<Vec<Vec<u32>>> {
    out.iter()
        .map(|r| r.iter().map(|s| s.tokens.clone()).collect())
        .collect()
}

#[test]
fn same_seed_same_samples_whatever_the_batch_and_prefix_sharing() {
    let model = GgufModel::load(&gguf()).unwrap();
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        repetition_penalty: 1.15,
        max_new_tokens: 40,
        seed: 3,
        logprobs: true,
        ..SamplingParams::default()
    };
    let reqs = requests(&params, 5);
    let reference = run(&model, config(4, true), &reqs);
    assert_eq!(reference.len(), 3);
    for (r, samples) in reference.iter().enumerate() {
        assert_eq!(samples.len(), 5);
        for (i, s) in samples.iter().enumerate() {
            assert_eq!((s.request, s.index), (r, i));
            let stats = s.stats.as_ref().unwrap();
            assert_eq!(stats.logprobs.len(), s.tokens.len());
            assert_eq!(stats.entropies.len(), s.tokens.len());
            assert!(stats.logprobs.iter().all(|&l| l <= 0.0 && l.is_finite()));
            assert!(stats
                .entropies
                .iter()
                .zip(&stats.full_entropies)
                .all(|(h, f)| *h >= 0.0 && *h <= f + 1e-4));
        }
    }
    let distinct: std::collections::HashSet<_> =
        reference[0].iter().map(|s| s.tokens.clone()).collect();
    assert!(
        distinct.len() > 1,
        "samples of one prompt should differ at T = 0.9"
    );

    // The same seed again, then other batch sizes, then every sample evaluating its own prompt.
    // (Not a one-slot engine: llama.cpp's CPU kernels for a one-token batch round differently from
    // those for several tokens, entropies moved by ~1e-3 on this fixture, which can flip a draw.)
    let again = run(&model, config(4, true), &reqs);
    assert_eq!(
        again, reference,
        "same seed, same config, different samples"
    );
    for (parallel, shared) in [
        (2, true),
        (7, true),
        (15, true),
        (4, false),
        (2, false),
        (15, false),
    ] {
        let other = run(&model, config(parallel, shared), &reqs);
        assert_eq!(
            tokens(&other),
            tokens(&reference),
            "parallel {parallel}, shared prefix {shared}"
        );
        let texts = |o: &[Vec<Sample>]| {
            o.iter()
                .flatten()
                .map(|s| s.text.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(&other), texts(&reference));
    }

    // A different seed gives different samples.
    let other = run(
        &model,
        config(4, true),
        &requests(
            &SamplingParams {
                seed: 99,
                ..params.clone()
            },
            5,
        ),
    );
    assert_ne!(tokens(&other), tokens(&reference));
}

#[test]
fn shared_prefix_decodes_each_prompt_once() {
    let model = GgufModel::load(&gguf()).unwrap();
    let reqs = requests(
        &SamplingParams {
            max_new_tokens: 8,
            ..SamplingParams::default()
        },
        6,
    );
    let prompt_lens: Vec<u64> = PROMPTS
        .iter()
        .map(|p| model.tokenize(p, true).len() as u64)
        .collect();
    let mut engine = Engine::new(&model, config(4, true));
    let stats = engine
        .generate(&reqs, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(
        stats.prompt_tokens_unshared,
        prompt_lens.iter().sum::<u64>() * 6
    );
    // With 4 slots and 6 samples a prompt is decoded at most twice (once per wave of slots).
    assert!(
        stats.prompt_tokens <= 2 * prompt_lens.iter().sum::<u64>(),
        "{stats:?}"
    );
    let mut unshared = Engine::new(&model, config(4, false));
    assert_eq!(
        unshared
            .generate(&reqs, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .prompt_tokens,
        stats.prompt_tokens_unshared
    );
}

#[test]
fn greedy_follows_the_single_sequence_logits() {
    let model = GgufModel::load(&gguf()).unwrap();
    let reqs = requests(&SamplingParams::greedy(12), 3);
    let out = run(&model, config(8, true), &reqs);
    for (prompt, samples) in PROMPTS.iter().zip(&out) {
        assert!(
            samples.iter().all(|s| s.tokens == samples[0].tokens),
            "greedy samples differ"
        );
        // Replay with one sequence and no batching: every greedy token is the argmax.
        let mut ids = model.tokenize(prompt, true);
        for &t in &samples[0].tokens {
            let logits = model.logits(&ids, 1).unwrap();
            assert_eq!(argmax(logits.last().unwrap()) as u32, t);
            ids.push(t);
        }
    }
}

#[test]
fn max_tokens_and_stop_strings_end_samples_where_they_should() {
    let model = GgufModel::load(&gguf()).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: 30,
        seed: 5,
        ..SamplingParams::default()
    };
    let reqs = requests(&params, 4);
    let free = run(&model, config(4, true), &reqs);
    for s in free.iter().flatten() {
        match s.finish {
            FinishReason::Length => assert_eq!(s.tokens.len(), 30),
            FinishReason::Eos => assert!(s.tokens.len() <= 30),
            FinishReason::Stop(_) => panic!("no stop strings were given"),
        }
    }
    let short = run(
        &model,
        config(4, true),
        &requests(
            &SamplingParams {
                max_new_tokens: 7,
                ..params.clone()
            },
            4,
        ),
    );
    for (a, b) in short.iter().flatten().zip(free.iter().flatten()) {
        assert!(
            a.tokens.len() <= 7 && b.tokens.starts_with(&a.tokens),
            "max_new_tokens changed the draws"
        );
        if a.tokens.len() == 7 {
            assert!(
                a.finish == FinishReason::Length
                    || b.finish == FinishReason::Eos && b.tokens.len() == 7
            );
        }
    }

    // A stop string taken from the middle of a long sample's text ends it right there.
    let long = free
        .iter()
        .flatten()
        .filter(|s| s.text.chars().count() > 20)
        .max_by_key(|s| s.text.len())
        .expect("a long sample");
    let chars: Vec<char> = long.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let at = long.text.find(&stop).unwrap();
    let mut reqs_stop = requests(&params, 4);
    reqs_stop[long.request].params.stop = vec!["never-appears".into(), stop.clone()];
    let stopped = &run(&model, config(4, true), &reqs_stop)[long.request][long.index];
    assert_eq!(stopped.finish, FinishReason::Stop(stop.clone()));
    assert_eq!(
        stopped.text,
        long.text[..at],
        "text must end right before the stop string"
    );
    assert!(
        long.tokens.starts_with(&stopped.tokens),
        "tokens must be a prefix of the unstopped run"
    );
    // The last token completed the stop string: without it, the text does not contain it yet.
    let vocab = model.inner().vocab();
    let without_last: Vec<u8> = stopped.tokens[..stopped.tokens.len() - 1]
        .iter()
        .flat_map(|&t| vocab.token_to_piece(llama_cpp_2::token::LlamaToken(t as i32), true, None))
        .collect();
    assert!(!String::from_utf8_lossy(&without_last).contains(&stop));
}

#[test]
fn requests_that_cannot_fit_are_refused_with_the_file_named() {
    let model = GgufModel::load(&gguf()).unwrap();
    let reqs = vec![Request::text(
        PROMPTS[2],
        1,
        SamplingParams {
            max_new_tokens: 600,
            ..SamplingParams::default()
        },
    )];
    let err = Engine::new(&model, config(2, true))
        .generate_all(&reqs)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny.gguf")
            && err.contains("request 0")
            && err.contains("exceeds the context of 512"),
        "{err}"
    );
    let bad = vec![Request::text(
        PROMPTS[2],
        1,
        SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        },
    )];
    let err = Engine::new(&model, config(2, true))
        .generate_all(&bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tiny.gguf") && err.contains("top_p"), "{err}");
    let err = GgufModel::load(std::path::Path::new("/nonexistent/m.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/m.gguf"), "{err}");
}
