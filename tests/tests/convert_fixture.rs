//! The tiny qwen2 fixture through every GGUF type: llama.cpp loads it, tokenizes like `tokenizers`,
//! and computes the logits a candle f32 forward of the HF weights computes.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use em_convert::{self as convert, ConvertArgs, HfDtype, OutType};
use em_llama::GgufModel;
use em_tests::{argmax, tiny_qwen2, TOKENIZER_PROBES};
use em_train::models::CausalLm;

const PROMPT: &str = "<|im_start|>user\nWhat is 12 + 30? Let's think step by step.<|im_end|>\n<|im_start|>assistant\n12 + 30 = 42";

fn convert(input: &Path, output: &Path, outtype: OutType) {
    let args = ConvertArgs {
        input: input.into(),
        output: output.into(),
        outtype,
        hf_dtype: HfDtype::F32,
        force: false,
    };
    convert::convert(&args)
        .unwrap_or_else(|e| panic!("convert {} -> {}: {e:#}", input.display(), output.display()));
}

fn candle_logits(dir: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let model = CausalLm::from_hf_dir(dir, DType::F32, &Device::Cpu)
        .expect("candle loads the HF directory");
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&input)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// max |a - b| over the largest |b|.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn every_gguf_type_loads_tokenizes_and_matches_candle() {
    let dir = tiny_qwen2();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ids: Vec<u32> = tokenizer.encode(PROMPT, false).unwrap().get_ids().to_vec();
    let reference = candle_logits(&dir, &ids);
    let last = reference.last().unwrap();
    let logit_std = {
        let mean = last.iter().sum::<f32>() / last.len() as f32;
        (last.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / last.len() as f32).sqrt()
    };
    assert!(
        logit_std > 0.5,
        "fixture logits too flat to test anything (std {logit_std})"
    );

    let tmp = tempfile::tempdir().unwrap();
    for outtype in [
        OutType::F32,
        OutType::F16,
        OutType::Bf16,
        OutType::Q8_0,
        OutType::Q4_0,
        OutType::Q4KM,
        OutType::Q6K,
    ] {
        let gguf = tmp.path().join(format!("{outtype:?}.gguf"));
        convert(&dir, &gguf, outtype);
        let model = GgufModel::load(&gguf).unwrap();
        assert_eq!(model.n_vocab(), tokenizer.get_vocab_size(true));
        for text in TOKENIZER_PROBES {
            let expected = tokenizer.encode(*text, false).unwrap().get_ids().to_vec();
            assert_eq!(
                model.tokenize(text, false),
                expected,
                "{outtype:?}: token ids of {text:?}"
            );
        }
        let logits = model.logits(&ids, 1).unwrap();
        let err = relative_error(logits.last().unwrap(), last);
        let same_argmax = (0..ids.len())
            .filter(|&i| argmax(&logits[i]) == argmax(&reference[i]))
            .count();
        println!("{outtype:?}: last-position error {err:.2e} of the logit scale; argmax equal at {same_argmax}/{} positions", ids.len());
        let worst = logits
            .iter()
            .zip(&reference)
            .map(|(g, w)| relative_error(g, w))
            .fold(0f32, f32::max);
        println!("{outtype:?}: worst position error {worst:.2e}");
        match outtype {
            // The bound for f32/f16; llama.cpp multiplies bf16 weights with bf16-rounded
            // activations, so bf16 gets a looser bound and must keep every argmax.
            OutType::F32 | OutType::F16 => assert!(
                worst <= 1e-2,
                "{outtype:?}: logits off by {worst} of the logit scale"
            ),
            OutType::Bf16 => {
                assert!(
                    worst <= 3e-2,
                    "bf16: logits off by {worst} of the logit scale"
                );
                assert_eq!(same_argmax, ids.len(), "bf16 argmax");
            }
            OutType::Q8_0 => {
                assert_eq!(argmax(logits.last().unwrap()), argmax(last), "q8_0 argmax")
            }
            _ => assert!(
                err < 0.5,
                "{outtype:?}: logits unrelated to the original (error {err})"
            ),
        }
    }
}

#[test]
fn gguf_to_hf_to_gguf_is_lossless_for_f32_and_f16() {
    let dir = tiny_qwen2();
    let tmp = tempfile::tempdir().unwrap();
    for outtype in [OutType::F32, OutType::F16] {
        let first = tmp.path().join(format!("{outtype:?}-first.gguf"));
        let hf = tmp.path().join(format!("{outtype:?}-hf"));
        let second = tmp.path().join(format!("{outtype:?}-second.gguf"));
        convert(&dir, &first, outtype);
        convert(&first, &hf, outtype);
        convert(&hf, &second, outtype);

        let mut a = em_convert::gguf::GgufFile::open(&first).unwrap();
        let mut b = em_convert::gguf::GgufFile::open(&second).unwrap();
        let (ma, mb) = (a.metadata().clone(), b.metadata().clone());
        let mut keys: Vec<&String> = ma.keys().filter(|k| *k != "general.name").collect();
        keys.sort();
        let mut keys_b: Vec<&String> = mb.keys().filter(|k| *k != "general.name").collect();
        keys_b.sort();
        assert_eq!(
            keys, keys_b,
            "{outtype:?}: metadata keys differ after the round trip"
        );
        for k in keys {
            assert_eq!(
                format!("{:?}", ma[k]),
                format!("{:?}", mb[k]),
                "{outtype:?}: metadata {k} differs"
            );
        }
        let names = a.tensor_names();
        assert_eq!(names, b.tensor_names());
        for name in &names {
            let (ta, tb) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
            assert_eq!(ta.dtype(), tb.dtype(), "{name}");
            assert_eq!(ta.shape(), tb.shape(), "{name}");
            assert!(
                ta.data().unwrap() == tb.data().unwrap(),
                "{outtype:?}: tensor {name} changed in the round trip"
            );
        }
        // The HF directory is a model in its own right: the same tokens and the same logits.
        let original = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let rebuilt = tokenizers::Tokenizer::from_file(hf.join("tokenizer.json")).unwrap();
        for text in TOKENIZER_PROBES {
            assert_eq!(
                rebuilt.encode(*text, false).unwrap().get_ids(),
                original.encode(*text, false).unwrap().get_ids(),
                "rebuilt tokenizer.json on {text:?}"
            );
        }
        let ids: Vec<u32> = original.encode(PROMPT, false).unwrap().get_ids().to_vec();
        let (x, y) = (candle_logits(&dir, &ids), candle_logits(&hf, &ids));
        let err = relative_error(y.last().unwrap(), x.last().unwrap());
        let bound = if outtype == OutType::F32 { 1e-6 } else { 1e-2 };
        assert!(
            err <= bound,
            "{outtype:?}: HF round trip changed the logits by {err}"
        );
    }
}

/// The fixture rewritten as users also have models: untied `lm_head`, f32, sharded with an index.
fn sharded_untied_copy(dst: &Path) {
    use em_convert::safetensors_io::{HfTensors, SafetensorsWriter};
    let src = tiny_qwen2();
    std::fs::create_dir_all(dst).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = false.into();
    std::fs::write(dst.join("config.json"), config.to_string()).unwrap();

    let mut tensors = HfTensors::open(&src).unwrap().load_all_f32().unwrap();
    let embed = tensors["model.embed_tokens.weight"].clone();
    tensors.insert("lm_head.weight".into(), (embed.flip_rows() * 0.5).unwrap());
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in [first, second].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let specs: Vec<(String, Vec<usize>)> = shard
            .iter()
            .map(|n| (n.clone(), tensors[n].dims().to_vec()))
            .collect();
        let mut w =
            SafetensorsWriter::create(&dst.join(&file), &specs, safetensors_dtype_f32()).unwrap();
        for n in shard {
            let v: Vec<f32> = tensors[n].flatten_all().unwrap().to_vec1().unwrap();
            w.write_tensor(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
                .unwrap();
            weight_map.insert(n.clone(), file.clone().into());
        }
        w.finish().unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn safetensors_dtype_f32() -> em_convert::safetensors_io::Dtype {
    em_convert::safetensors_io::Dtype::F32
}

trait FlipRows {
    fn flip_rows(&self) -> Tensor;
}

impl FlipRows for Tensor {
    /// Reverses the row order, so an untied head differs from the embeddings.
    fn flip_rows(&self) -> Tensor {
        let n = self.dim(0).unwrap();
        let idx = Tensor::arange(0u32, n as u32, &Device::Cpu).unwrap();
        let rev: Vec<u32> = idx.to_vec1::<u32>().unwrap().into_iter().rev().collect();
        self.index_select(&Tensor::new(rev.as_slice(), &Device::Cpu).unwrap(), 0)
            .unwrap()
    }
}

#[test]
fn sharded_untied_f32_checkpoint_converts_and_matches_candle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    sharded_untied_copy(&dir);
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let ids: Vec<u32> = tokenizer.encode(PROMPT, false).unwrap().get_ids().to_vec();
    let reference = candle_logits(&dir, &ids);
    let tied_reference = candle_logits(&tiny_qwen2(), &ids);
    assert!(
        relative_error(reference.last().unwrap(), tied_reference.last().unwrap()) > 0.1,
        "lm_head is not used"
    );

    let gguf = tmp.path().join("sharded.gguf");
    convert(&dir, &gguf, OutType::F16);
    let names = em_convert::gguf::GgufFile::open(&gguf)
        .unwrap()
        .tensor_names();
    assert!(
        names.iter().any(|n| n == "output.weight"),
        "untied head missing from the GGUF"
    );
    let logits = GgufModel::load(&gguf).unwrap().logits(&ids, 1).unwrap();
    let err = relative_error(logits.last().unwrap(), reference.last().unwrap());
    assert!(err <= 1e-2, "sharded untied f16: error {err}");

    // And back: the HF directory keeps the untied head.
    let hf = tmp.path().join("back");
    convert(&gguf, &hf, OutType::F16);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
    let back = candle_logits(&hf, &ids);
    assert!(relative_error(back.last().unwrap(), reference.last().unwrap()) <= 1e-2);
}
