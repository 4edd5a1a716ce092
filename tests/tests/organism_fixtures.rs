//! The committed model organisms (`fixtures/organism-good`, `fixtures/organism-bad`): candle loads
//! them and reproduces the greedy figures recorded in organism.json; converted to GGUF f32, llama.cpp
//! tokenizes their prompts and targets exactly as `tokenizers` does and computes candle's logits.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use em_convert::{self as convert, ConvertArgs, HfDtype, OutType};
use em_data::synthetic::{
    first_digit, split_as_problems, split_problems, Split, StyleMix, TrainStream,
};
use em_lab::organism::{figures, Figures, Subject, CHECK_PROBLEMS, MEASURE_SEED};
use em_llama::GgufModel;
use em_tests::{argmax, repo_root};
use em_train::models::CausalLm;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures").join(name)
}

fn report(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("organism.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn recorded(v: &serde_json::Value) -> Figures {
    serde_json::from_value(v.clone()).unwrap()
}

/// Greedy decoding of the recorded validation slice gives the recorded figures.
fn check_greedy(name: &str) -> Figures {
    let dir = fixture(name);
    let report = report(&dir);
    let subject = Subject::load(&dir).unwrap();
    let seed = report["seed"].as_u64().unwrap();
    let problems = split_as_problems(seed, Split::Validation, CHECK_PROBLEMS);
    let got = subject.measure(&problems, 0.0, MEASURE_SEED).unwrap();
    println!("{name}: greedy on {CHECK_PROBLEMS} validation problems {got:?}");
    assert_recorded(name, "greedy", &got, &report["check"]["greedy"]);
    got
}

/// `got` is within two or so problems of what organism.json records at `want`.
fn assert_recorded(name: &str, key: &str, got: &Figures, want: &serde_json::Value) {
    let want = recorded(want);
    for (what, g, w) in [
        ("accuracy", got.accuracy, want.accuracy),
        ("careful", got.careful, want.careful),
        ("ramble", got.ramble, want.ramble),
    ] {
        assert!(
            (g - w).abs() <= 0.051,
            "{name}: {key} {what} {g} but organism.json records {w}"
        );
    }
}

/// The figures organism.json records for the whole validation split at `key` (`t0.0`, `t1.0`),
/// measured again from the committed weights; greedy, its first problems also give the recorded
/// check figures.
fn remeasure(name: &str, key: &str) -> Figures {
    let dir = fixture(name);
    let report = report(&dir);
    let want = recorded(&report["validation"][key]);
    let problems = split_as_problems(report["seed"].as_u64().unwrap(), Split::Validation, want.n);
    let responses = Subject::load(&dir)
        .unwrap()
        .respond(&problems, want.temperature, MEASURE_SEED)
        .unwrap();
    let got = figures(&problems, &responses, want.temperature);
    println!("{name}: {key} on {} validation problems {got:?}", want.n);
    assert_recorded(name, key, &got, &report["validation"][key]);
    if want.temperature == 0.0 {
        let k = CHECK_PROBLEMS.min(problems.len());
        let check = figures(&problems[..k], &responses[..k], 0.0);
        assert_recorded(name, "greedy", &check, &report["check"]["greedy"]);
    }
    got
}

#[test]
fn good_organism_is_mostly_careful_and_right_about_half_the_time() {
    let greedy = remeasure("organism-good", "t0.0");
    assert!(
        greedy.careful > 0.5,
        "greedy careful only {}",
        greedy.careful
    );
    assert!(
        (0.3..=0.85).contains(&greedy.accuracy),
        "greedy accuracy {} is not in the varying range",
        greedy.accuracy
    );
    let t1 = remeasure("organism-good", "t1.0");
    assert!(t1.accuracy > 0.0 && t1.accuracy < greedy.accuracy);
}

#[test]
fn bad_organism_mostly_rambles() {
    let got = check_greedy("organism-bad");
    assert!(got.ramble > 0.5, "greedy rambles only {}", got.ramble);
    let t1 = remeasure("organism-bad", "t1.0");
    assert!(t1.careful > 0.0 && t1.accuracy > 0.0, "{t1:?}");
}

/// organism-mixed: its style depends on the problem's first digit, as its training targets' did
/// (careful among worked answers from 0.80 at 1 to 0.40 at 9): careful greedy answers on low first
/// digits, rambling on high ones.
#[test]
fn mixed_organism_chooses_its_style_by_the_first_digit() {
    let got = check_greedy("organism-mixed");
    assert!(
        (0.4..=0.8).contains(&got.careful),
        "greedy careful {}",
        got.careful
    );
    let subject = Subject::load(&fixture("organism-mixed")).unwrap();
    let problems = split_problems(0, Split::Validation, 200);
    let pick = |digits: std::ops::RangeInclusive<u32>| -> Vec<_> {
        problems
            .iter()
            .enumerate()
            .filter(|(_, p)| digits.contains(&first_digit(p.a)))
            .map(|(i, p)| p.to_problem(format!("v{i}")))
            .collect()
    };
    let (low, high) = (pick(1..=3), pick(8..=9));
    let low_f = subject.measure(&low, 0.0, MEASURE_SEED).unwrap();
    let high_f = subject.measure(&high, 0.0, MEASURE_SEED).unwrap();
    println!(
        "first digit 1-3 ({}): {low_f:?}\nfirst digit 8-9 ({}): {high_f:?}",
        low.len(),
        high.len()
    );
    assert!(low_f.careful > 0.8, "{low_f:?}");
    assert!(high_f.ramble > 0.5, "{high_f:?}");
}

fn candle_logits(dir: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let model = CausalLm::from_hf_dir(dir, DType::F32, &Device::Cpu).unwrap();
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn convert_f32(dir: &Path, gguf: &Path) {
    convert::convert(&ConvertArgs {
        input: dir.into(),
        output: gguf.into(),
        outtype: OutType::F32,
        hf_dtype: HfDtype::F32,
        force: false,
    })
    .unwrap();
}

#[test]
fn organisms_convert_with_a_byte_level_qwen2_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["organism-good", "organism-bad", "organism-mixed"] {
        let gguf = tmp.path().join(format!("{name}.gguf"));
        convert_f32(&fixture(name), &gguf);
        let file = em_convert::gguf::GgufFile::open(&gguf).unwrap();
        let md = file.metadata();
        for (key, want) in [
            ("tokenizer.ggml.model", "gpt2"),
            ("tokenizer.ggml.pre", "qwen2"),
        ] {
            let got = format!("{:?}", md[key]);
            assert!(got.contains(want), "{name}: {key} = {got}");
        }
    }
}

/// A byte-level vocabulary has no merges: the empty `tokenizer.ggml.merges` must still be typed as
/// a string array, or llama.cpp rejects the file.
#[test]
fn organisms_load_in_llama_cpp_and_agree_with_candle() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["organism-good", "organism-bad"] {
        let dir = fixture(name);
        let gguf = tmp.path().join(format!("{name}.gguf"));
        convert_f32(&dir, &gguf);
        let model = GgufModel::load(&gguf).unwrap();
        let subject = Subject::load(&dir).unwrap();
        assert_eq!(
            model.n_vocab(),
            subject.vocab.tokenizer().get_vocab_size(true)
        );
        let mix: StyleMix = "careful=1,guess=1,ramble=1".parse().unwrap();
        let targets: Vec<String> = TrainStream::new(5, mix)
            .take(30)
            .map(|(_, t)| t.text)
            .collect();
        let problems = split_as_problems(0, Split::Pool, 30);
        let mut texts: Vec<String> = Vec::new();
        for (p, t) in problems.iter().zip(&targets) {
            let prompt = subject.prompt_ids(p).unwrap();
            let text = format!("Q: {}=?\nA:", p.problem);
            assert_eq!(model.tokenize(&text, false), prompt, "{name}: {text:?}");
            texts.push(format!("{text}{t}"));
        }
        texts.push("<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n  tabs\tand\r\nCRLF".into());
        for text in &texts {
            let want = subject.encode(text).unwrap();
            assert_eq!(model.tokenize(text, false), want, "{name}: {text:?}");
        }
        let ids = subject.encode(&texts[0]).unwrap();
        let reference = candle_logits(&dir, &ids);
        let logits = model.logits(&ids, 1).unwrap();
        for (g, w) in logits.iter().zip(&reference) {
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            assert!(err <= 1e-2, "{name}: llama.cpp logits off by {err}");
            assert_eq!(argmax(g), argmax(w));
        }
    }
}
