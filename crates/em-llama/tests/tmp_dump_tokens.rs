//! TEMPORARY (removed after use): dumps the engine's samples, to compare two builds bit for bit.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use em_convert::{ConvertArgs, HfDtype, OutType};
use em_llama::{Engine, EngineConfig, GgufModel};
use em_sampler::{Request, Sampler, SamplingParams};

fn tiny() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("em-llama-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = dir.join("tiny.gguf");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen2");
    em_convert::convert(&ConvertArgs {
        input: root,
        output: output.clone(),
        outtype: OutType::F32,
        hf_dtype: HfDtype::F32,
        force: true,
    })
    .unwrap();
    output
}

const PROMPTS: [&str; 3] = [
    "<|im_start|>user\nWhat is 12 + 30? Let's think step by step.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nFind x if 2x = 8.<|im_end|>\n<|im_start|>assistant\n",
    "The final answer is",
];

fn dump(model: &GgufModel, out: &mut String, max_new: usize, n: usize) {
    let sets = [
        SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            repetition_penalty: 1.15,
            max_new_tokens: max_new,
            seed: 3,
            logprobs: true,
            ..SamplingParams::default()
        },
        SamplingParams {
            stop: vec!["e".into(), "\n".into()],
            ..SamplingParams::reference(max_new, 9)
        },
        SamplingParams::greedy(max_new),
    ];
    for params in sets {
        let reqs: Vec<Request> = PROMPTS
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
            .collect();
        for (parallel, shared, threads) in [
            (4, true, 1),
            (2, true, 1),
            (7, true, 1),
            (15, true, 1),
            (4, false, 1),
            (15, false, 1),
            (8, true, 2),
        ] {
            let config = EngineConfig {
                threads,
                parallel,
                shared_prefix: shared,
                ..EngineConfig::default()
            };
            let res = Engine::new(model, config).generate_all(&reqs).unwrap();
            writeln!(out, "== parallel {parallel} shared {shared} threads {threads}").unwrap();
            for r in &res {
                for s in r {
                    let lp: Vec<u32> = s
                        .stats
                        .as_ref()
                        .map(|t| {
                            t.logprobs
                                .iter()
                                .chain(&t.entropies)
                                .chain(&t.full_entropies)
                                .map(|x| x.to_bits())
                                .collect()
                        })
                        .unwrap_or_default();
                    writeln!(
                        out,
                        "{} {} {:?} {:?} {:?} {:?}",
                        s.request, s.index, s.tokens, s.finish, s.text, lp
                    )
                    .unwrap();
                }
            }
        }
    }
}

#[test]
fn dump_samples() {
    let Some(path) = std::env::var_os("EM_LLAMA_DUMP") else {
        return;
    };
    let mut out = String::new();
    let model = GgufModel::load(&tiny()).unwrap();
    dump(&model, &mut out, 40, 5);
    let smol = Path::new("/root/.cache/oneshot-em/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smol.is_file() {
        let model = GgufModel::load(smol).unwrap();
        dump(&model, &mut out, 12, 3);
    }
    std::fs::write(path, out).unwrap();
}
