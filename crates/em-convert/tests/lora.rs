//! LoRA adapters: PEFT directories round-trip bit for bit and refuse what they cannot hold; the
//! LoRA GGUF has llama.cpp's names, shapes and row order; merging adds `alpha/r · B·A` to exactly
//! the targeted weights; and merge-then-convert equals convert-then-apply-the-GGUF-adapter.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use em_config::ModelConfig;
use em_convert::arch::Hparams;
use em_convert::gguf::GgufFile;
use em_convert::lora::{
    merge_into, read_peft_dir, write_lora_gguf, write_peft_dir, Adapter, LoraGgufType, LoraPair,
};
use em_convert::safetensors_io::{Dtype, HfTensors, SafetensorsWriter};
use em_convert::{hf_to_gguf, OutType};
use serde_json::{json, Value as Json};

/// SplitMix64 values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen2")
}

fn tiny_config(model_type: &str) -> Json {
    json!({"model_type": model_type, "vocab_size": 384, "hidden_size": 8,
        "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": false, "hidden_act": "silu"})
}

fn model_config(raw: &Json) -> ModelConfig {
    ModelConfig::from_value(raw.clone(), Path::new("config.json")).unwrap()
}

/// Every linear module of every layer, with its [out, in] shape from `hp`.
fn linear_modules(hp: &Hparams) -> Vec<(String, usize, usize)> {
    (0..hp.num_layers)
        .flat_map(|i| {
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ]
            .map(|m| format!("model.layers.{i}.{m}"))
        })
        .map(|m| {
            let s = hp.expected_shape(&format!("{m}.weight")).unwrap();
            (m, s[0], s[1])
        })
        .collect()
}

fn random_adapter(modules: &[(String, usize, usize)], rank: usize, seed: u64) -> Adapter {
    let mut rng = Rng(seed);
    Adapter {
        rank,
        alpha: 2.0 * rank as f64,
        target_modules: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
        base_model: Some("org/tiny".into()),
        modules: modules
            .iter()
            .map(|(m, out, inp)| {
                let pair = LoraPair {
                    a: rng.vec(rank * inp),
                    b: rng.vec(out * rank),
                    rank,
                    in_features: *inp,
                    out_features: *out,
                };
                (m.clone(), pair)
            })
            .collect(),
    }
}

fn hp_of(raw: &Json) -> Hparams {
    Hparams::from_hf_config(raw, Path::new("config.json")).unwrap()
}

/// The first few modules of a tiny qwen2, for the PEFT tests.
fn small_adapter() -> Adapter {
    let modules = linear_modules(&hp_of(&tiny_config("qwen2")));
    random_adapter(&modules[..3], 2, 7)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn peft_directory_round_trips_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    let mut adapter = small_adapter();
    // Values that a lossy path would change.
    let pair = adapter.modules.values_mut().next().unwrap();
    pair.a[0] = -0.0;
    pair.a[1] = f32::MIN_POSITIVE / 8.0;
    pair.b[0] = 1.0 + f32::EPSILON;
    write_peft_dir(&adapter, &dir).unwrap();
    let back = read_peft_dir(&dir).unwrap();
    assert_eq!(back, adapter);
    for (m, p) in &adapter.modules {
        assert_eq!(bits(&back.modules[m].a), bits(&p.a), "{m}");
        assert_eq!(bits(&back.modules[m].b), bits(&p.b), "{m}");
    }
    // What PEFT reads: the config keys and the tensor names and shapes.
    let config: Json =
        serde_json::from_str(&fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 2);
    assert_eq!(config["lora_alpha"], 4.0);
    assert_eq!(config["use_dora"], false);
    assert_eq!(config["base_model_name_or_path"], "org/tiny");
    assert_eq!(
        config["target_modules"],
        json!(["q_proj", "k_proj", "v_proj"])
    );
    let st = HfTensors::open_files(vec![dir.join("adapter_model.safetensors")]).unwrap();
    let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    assert_eq!(st.shape(name).unwrap(), vec![8, 2]);
    assert_eq!(st.names().len(), 6);
    // Rewriting replaces the directory whole and leaves no staging files beside it.
    write_peft_dir(&back, &dir).unwrap();
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// A tensor written by hand: name, shape, values.
type RawTensor = (String, Vec<usize>, Vec<f32>);

/// Writes a PEFT directory by hand: `config` and tensors `(name, shape, values)` in `dtype`.
fn write_raw_peft(dir: &Path, config: &Json, tensors: &[RawTensor], dtype: Dtype) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let specs: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s, _)| (n.clone(), s.clone()))
        .collect();
    let path = dir.join("adapter_model.safetensors");
    let mut w = SafetensorsWriter::create(&path, &specs, dtype).unwrap();
    for (_, _, v) in tensors {
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        };
        w.write_tensor(&bytes).unwrap();
    }
    w.finish().unwrap();
}

fn lora_config(r: usize) -> Json {
    json!({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"],
        "use_dora": false, "use_rslora": false, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": null, "bias": "none"})
}

#[test]
fn peft_names_with_an_adapter_name_and_half_precision_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let (a, b) = (rng.vec(2 * 8), rng.vec(4 * 2));
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = tmp.path().join(format!("{dtype:?}"));
        let m = "base_model.model.model.layers.1.self_attn.k_proj";
        write_raw_peft(
            &dir,
            &lora_config(2),
            &[
                (format!("{m}.lora_A.default.weight"), vec![2, 8], a.clone()),
                (format!("{m}.lora_B.default.weight"), vec![4, 2], b.clone()),
            ],
            dtype,
        );
        let adapter = read_peft_dir(&dir).unwrap();
        assert_eq!(
            (adapter.rank, adapter.alpha, adapter.base_model),
            (2, 16.0, None)
        );
        let pair = &adapter.modules["model.layers.1.self_attn.k_proj"];
        assert_eq!((pair.in_features, pair.out_features), (8, 4));
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| match dtype {
                    Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
                    _ => half::f16::from_f32(x).to_f32(),
                })
                .collect()
        };
        assert_eq!(pair.a, round(&a));
        assert_eq!(pair.b, round(&b));
    }
}

#[test]
fn bad_peft_directories_are_one_line_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let m = "base_model.model.model.layers.0.self_attn.q_proj";
    let good = || {
        vec![
            (format!("{m}.lora_A.weight"), vec![2, 8], vec![0.5; 16]),
            (format!("{m}.lora_B.weight"), vec![8, 2], vec![0.25; 16]),
        ]
    };
    let with = |key: &str, v: Json| {
        let mut c = lora_config(2);
        c[key] = v;
        c
    };
    let without = |key: &str| {
        let mut c = lora_config(2);
        c.as_object_mut().unwrap().remove(key);
        c
    };
    let cfg = "adapter_config.json";
    let st = "adapter_model.safetensors";
    let cases: Vec<(&str, Json, Vec<RawTensor>, &str, &str)> = vec![
        (
            "peft-type",
            with("peft_type", json!("IA3")),
            good(),
            cfg,
            "only LORA adapters",
        ),
        (
            "no-peft-type",
            without("peft_type"),
            good(),
            cfg,
            "missing \"peft_type\"",
        ),
        (
            "dora",
            with("use_dora", json!(true)),
            good(),
            cfg,
            "use_dora is true: DoRA is not supported",
        ),
        (
            "rslora",
            with("use_rslora", json!(true)),
            good(),
            cfg,
            "use_rslora is true",
        ),
        (
            "rank-pattern",
            with("rank_pattern", json!({"q_proj": 4})),
            good(),
            cfg,
            "rank_pattern is not empty",
        ),
        (
            "alpha-pattern",
            with("alpha_pattern", json!({"q_proj": 4})),
            good(),
            cfg,
            "alpha_pattern is not empty",
        ),
        ("no-r", without("r"), good(), cfg, "missing \"r\""),
        (
            "zero-r",
            with("r", json!(0)),
            good(),
            cfg,
            "\"r\" must be a positive integer",
        ),
        (
            "no-alpha",
            without("lora_alpha"),
            good(),
            cfg,
            "missing \"lora_alpha\"",
        ),
        (
            "alone",
            lora_config(2),
            good()[..1].to_vec(),
            st,
            "q_proj.lora_A.weight has no lora_B beside it",
        ),
        (
            "b-alone",
            lora_config(2),
            good()[1..].to_vec(),
            st,
            "q_proj.lora_B.weight has no lora_A beside it",
        ),
        (
            "rank",
            lora_config(4),
            good(),
            st,
            "has shape [2, 8], adapter_config.json says r = 4",
        ),
        (
            "b-rank",
            lora_config(2),
            vec![
                good()[0].clone(),
                (format!("{m}.lora_B.weight"), vec![8, 4], vec![0.0; 32]),
            ],
            st,
            "lora_B.weight has shape [8, 4], adapter_config.json says r = 2",
        ),
        (
            "not-lora",
            lora_config(2),
            vec![(
                "base_model.model.model.norm.weight".into(),
                vec![8],
                vec![1.0; 8],
            )],
            st,
            "tensor base_model.model.model.norm.weight is not a LoRA factor",
        ),
        (
            "dora-vector",
            lora_config(2),
            vec![(
                format!("{m}.lora_magnitude_vector.default.weight"),
                vec![8],
                vec![1.0; 8],
            )],
            st,
            "is not a LoRA factor",
        ),
    ];
    let check = |dir: &Path, file: &str, expected: &str| {
        let err = read_peft_dir(dir).unwrap_err().to_string();
        let at = format!("{}: ", dir.join(file).display());
        assert!(err.starts_with(&at), "{err}");
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
        assert!(!err.contains('\n'), "{err:?}");
    };
    for (name, config, tensors, file, expected) in cases {
        let dir = tmp.path().join(name);
        write_raw_peft(&dir, &config, &tensors, Dtype::F32);
        check(&dir, file, expected);
    }
    // Files missing or malformed.
    let dir = tmp.path().join("files");
    fs::create_dir_all(&dir).unwrap();
    check(&dir, cfg, "missing");
    fs::write(dir.join(cfg), "{\"peft_type\": \"LORA\", ").unwrap();
    check(&dir, cfg, "malformed JSON");
    fs::write(dir.join(cfg), lora_config(2).to_string()).unwrap();
    check(&dir, st, "missing");
    fs::write(dir.join(st), b"not safetensors").unwrap();
    check(&dir, st, "not a valid safetensors file");
}

fn gguf_values(file: &mut GgufFile, name: &str) -> Vec<f32> {
    file.tensor(name)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// ggml's ne of a tensor (innermost first).
fn ne(file: &GgufFile, name: &str) -> Vec<usize> {
    let mut dims = file.content.tensor_infos[name].shape.dims().to_vec();
    dims.reverse();
    dims
}

/// Row-major `[n, k] · [k, m]`, accumulated in order (the same for every row).
fn matmul(x: &[f32], y: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            let mut acc = 0f32;
            for t in 0..k {
                acc += x[i * k + t] * y[t * m + j];
            }
            out[i * m + j] = acc;
        }
    }
    out
}

#[test]
fn lora_gguf_has_llama_cpp_metadata_names_shapes_and_values() {
    let raw = tiny_config("qwen2");
    let (config, hp) = (model_config(&raw), hp_of(&raw));
    let adapter = random_adapter(&linear_modules(&hp), 3, 11);
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [LoraGgufType::F32, LoraGgufType::F16] {
        let out = tmp.path().join(format!("lora-{dtype:?}.gguf"));
        let size = write_lora_gguf(&adapter, &config, &out, dtype).unwrap();
        assert_eq!(size, fs::metadata(&out).unwrap().len());
        let mut file = GgufFile::open(&out).unwrap();
        let md = file.metadata();
        let s = |k: &str| md[k].to_string().unwrap().clone();
        assert_eq!(s("general.type"), "adapter");
        assert_eq!(s("general.architecture"), "qwen2");
        assert_eq!(s("adapter.type"), "lora");
        assert_eq!(md["adapter.lora.alpha"].to_f32().unwrap(), 6.0);
        assert_eq!(file.tensor_names().len(), 2 * adapter.modules.len());
        let name = "blk.1.ffn_down.weight";
        assert!(file
            .tensor_names()
            .iter()
            .any(|n| n == &format!("{name}.lora_a")));
        // Shapes as llama-adapter.cpp checks them against the base (ne: in, out).
        assert_eq!(ne(&file, &format!("{name}.lora_a")), vec![12, 3]);
        assert_eq!(ne(&file, &format!("{name}.lora_b")), vec![3, 8]);
        let round = |v: &[f32]| -> Vec<f32> {
            match dtype {
                LoraGgufType::F32 => v.to_vec(),
                LoraGgufType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
            }
        };
        for (module, pair) in &adapter.modules {
            let base = hp.hf_to_gguf_name(&format!("{module}.weight")).unwrap();
            // qwen2 reorders no rows: both factors are stored as given.
            assert_eq!(
                gguf_values(&mut file, &format!("{base}.lora_a")),
                round(&pair.a)
            );
            assert_eq!(
                gguf_values(&mut file, &format!("{base}.lora_b")),
                round(&pair.b)
            );
        }
    }
}

#[test]
fn llama_lora_b_rows_are_permuted_as_the_base_weight_is() {
    let raw = tiny_config("llama");
    let hp = hp_of(&raw);
    let (rank, head_dim) = (3, hp.head_dim);
    let adapter = random_adapter(&linear_modules(&hp), rank, 5);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora.gguf");
    write_lora_gguf(&adapter, &model_config(&raw), &out, LoraGgufType::F32).unwrap();
    let mut file = GgufFile::open(&out).unwrap();
    assert_eq!(
        file.metadata()["general.architecture"].to_string().unwrap(),
        "llama"
    );
    for (module, gguf, heads) in [
        ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", 2),
        ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", 1),
    ] {
        let pair = &adapter.modules[module];
        let out_features = pair.out_features;
        assert_eq!(out_features, heads * head_dim);
        let b = gguf_values(&mut file, &format!("{gguf}.lora_b"));
        let a = gguf_values(&mut file, &format!("{gguf}.lora_a"));
        assert_eq!(a, pair.a, "lora_a is not permuted");
        // llama.cpp's order: GGUF row h·d + 2i + j is HF row h·d + j·d/2 + i.
        for h in 0..heads {
            for i in 0..head_dim / 2 {
                for j in 0..2 {
                    let (g, f) = (
                        h * head_dim + 2 * i + j,
                        h * head_dim + j * head_dim / 2 + i,
                    );
                    assert_eq!(
                        b[g * rank..(g + 1) * rank],
                        pair.b[f * rank..(f + 1) * rank]
                    );
                }
            }
        }
        // permute(B·A) == permute(B)·A, with the base weight's own permutation.
        let ba = matmul(&pair.b, &pair.a, out_features, rank, pair.in_features);
        let ba = Tensor::from_vec(ba, (out_features, pair.in_features), &Device::Cpu).unwrap();
        let want = hp
            .hf_to_gguf_values(&format!("{module}.weight"), ba)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(matmul(&b, &a, out_features, rank, pair.in_features), want);
        assert_ne!(b, pair.b);
    }
    let v = &adapter.modules["model.layers.0.self_attn.v_proj"];
    assert_eq!(gguf_values(&mut file, "blk.0.attn_v.weight.lora_b"), v.b);
}

#[test]
fn lora_gguf_refuses_modules_the_base_does_not_have() {
    let raw = tiny_config("llama");
    let hp = hp_of(&raw);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora.gguf");
    let modules = linear_modules(&hp);
    let mut tied = raw.clone();
    tied["tie_word_embeddings"] = json!(true);
    for (module, out_f, in_f, config, expected) in [
        ("model.layers.2.self_attn.q_proj", 8, 8, &raw, "is not a tensor of a llama model"),
        ("model.layers.0.self_attn.q_rope", 8, 8, &raw, "is not a tensor of a llama model"),
        ("model.layers.0.input_layernorm", 8, 8, &raw, "not a linear layer"),
        ("model.layers.0.self_attn.k_proj", 8, 8, &raw, "the adapter's factors imply shape [8, 8], the base's config.json implies for model.layers.0.self_attn.k_proj.weight [4, 8]"),
        ("lm_head", 384, 8, &tied, "ties the LM head"),
        ("model.embed_tokens", 384, 8, &raw, "embedding is not supported"),
    ] {
        let mut adapter = random_adapter(&modules[..1], 2, 1);
        adapter.modules.insert(
            module.into(),
            LoraPair { a: vec![0.0; 2 * in_f], b: vec![0.0; out_f * 2], rank: 2, in_features: in_f, out_features: out_f },
        );
        let err = write_lora_gguf(&adapter, &model_config(config), &out, LoraGgufType::F16)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("{}: module {module}: ", out.display())), "{err}");
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
        assert!(!out.exists());
    }
    // Factors that disagree with their own dimensions.
    let mut adapter = random_adapter(&modules[..1], 2, 1);
    adapter.modules.values_mut().next().unwrap().b.pop();
    let err = write_lora_gguf(&adapter, &model_config(&raw), &out, LoraGgufType::F32).unwrap_err();
    assert!(err.to_string().contains("lora_B 15"), "{err}");
}

/// An HF directory of random weights for `raw` (every tensor `hp` requires), in `dtype`, in two
/// shards with an index, beside the fixture's tokenizer files.
fn write_hf_dir(dir: &Path, raw: &Json, dtype: Dtype, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    let hp = hp_of(raw);
    let mut rng = Rng(seed);
    fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(raw).unwrap(),
    )
    .unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
    fs::write(
        dir.join("generation_config.json"),
        "{\"bos_token_id\": 0}\n",
    )
    .unwrap();
    let names = hp.required_hf_names();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let specs: Vec<(String, Vec<usize>)> = part
            .iter()
            .map(|n| (n.clone(), hp.expected_shape(n).unwrap()))
            .collect();
        let mut w = SafetensorsWriter::create(&dir.join(&file), &specs, dtype).unwrap();
        for (name, shape) in &specs {
            let v = rng.vec(shape.iter().product());
            let bytes: Vec<u8> = match dtype {
                Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            };
            w.write_tensor(&bytes).unwrap();
            weight_map.insert(name.clone(), json!(file));
        }
        w.finish().unwrap();
    }
    fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
}

/// A tensor's bytes as stored in its file.
fn raw_bytes(t: &HfTensors, name: &str) -> Vec<u8> {
    let (file, range, _) = t.location(name).unwrap();
    fs::read(file).unwrap()[range.start as usize..range.end as usize].to_vec()
}

#[test]
fn merge_adds_the_scaled_product_to_the_targeted_weights_only() {
    let raw = tiny_config("qwen2");
    let hp = hp_of(&raw);
    let tmp = tempfile::tempdir().unwrap();
    let modules: Vec<_> = linear_modules(&hp).into_iter().step_by(2).collect();
    let adapter = random_adapter(&modules, 4, 9);
    let scale = adapter.scale();
    for dtype in [Dtype::F32, Dtype::BF16] {
        let base = tmp.path().join(format!("base-{dtype:?}"));
        let out = tmp.path().join(format!("merged-{dtype:?}"));
        write_hf_dir(&base, &raw, dtype, 21);
        merge_into(&base, &adapter, &out).unwrap();
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "model.safetensors.index.json",
        ] {
            assert_eq!(
                fs::read(base.join(f)).unwrap(),
                fs::read(out.join(f)).unwrap(),
                "{f}"
            );
        }
        let (b, m) = (
            HfTensors::open(&base).unwrap(),
            HfTensors::open(&out).unwrap(),
        );
        assert_eq!(b.names(), m.names());
        let mut changed = 0;
        for name in b.names() {
            assert_eq!(m.location(&name).unwrap().2, dtype);
            let Some(pair) = name
                .strip_suffix(".weight")
                .and_then(|k| adapter.modules.get(k))
            else {
                assert_eq!(raw_bytes(&b, &name), raw_bytes(&m, &name), "{name} changed");
                continue;
            };
            changed += 1;
            let w = b
                .load_f32(&name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = m
                .load_f32(&name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (o, i, r) = (pair.out_features, pair.in_features, pair.rank);
            let mut moved = 0;
            for row in 0..o {
                for col in 0..i {
                    let d: f64 = (0..r)
                        .map(|t| pair.b[row * r + t] as f64 * pair.a[t * i + col] as f64)
                        .sum();
                    let exact = w[row * i + col] as f64 + scale * d;
                    let g = got[row * i + col] as f64;
                    let tol = match dtype {
                        Dtype::F32 => 1e-6 * (1.0 + exact.abs()),
                        _ => exact.abs() / 256.0 + 1e-6,
                    };
                    assert!(
                        (g - exact).abs() <= tol,
                        "{name}[{row},{col}]: {g} vs {exact}"
                    );
                    moved += usize::from(got[row * i + col] != w[row * i + col]);
                }
            }
            assert!(moved > o * i / 2, "{name}: the update was lost");
        }
        assert_eq!(changed, adapter.modules.len());
    }
}

#[test]
fn merge_refuses_missing_modules_and_other_shapes() {
    let raw = tiny_config("qwen2");
    let hp = hp_of(&raw);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    write_hf_dir(&base, &raw, Dtype::F32, 1);
    let out = tmp.path().join("merged");
    let mut adapter = random_adapter(&linear_modules(&hp)[..1], 2, 1);
    let extra = |out_f: usize, in_f: usize| LoraPair {
        a: vec![0.0; 2 * in_f],
        b: vec![0.0; out_f * 2],
        rank: 2,
        in_features: in_f,
        out_features: out_f,
    };
    adapter
        .modules
        .insert("model.layers.9.mlp.up_proj".into(), extra(12, 8));
    let err = merge_into(&base, &adapter, &out).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "{}: no tensor model.layers.9.mlp.up_proj.weight",
            base.display()
        )),
        "{err}"
    );
    adapter.modules.remove("model.layers.9.mlp.up_proj");
    adapter
        .modules
        .insert("model.layers.1.mlp.up_proj".into(), extra(8, 12));
    let err = merge_into(&base, &adapter, &out).unwrap_err().to_string();
    let shard = HfTensors::open(&base)
        .unwrap()
        .file_of("model.layers.1.mlp.up_proj.weight")
        .display()
        .to_string();
    assert!(err.starts_with(&format!("{shard}: tensor model.layers.1.mlp.up_proj.weight: the adapter's factors imply shape [8, 12], the base has [12, 8]")), "{err}");
    assert!(!out.exists());
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "nothing staged is left"
    );
}

/// The GGUF of the merged model equals the base GGUF plus `alpha/r · B·A` from the LoRA GGUF,
/// computed as llama.cpp applies an adapter, for llama (whose Q/K rows are permuted).
#[test]
fn merging_then_converting_equals_converting_then_applying_the_lora_gguf() {
    let raw = tiny_config("llama");
    let hp = hp_of(&raw);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    write_hf_dir(&base, &raw, Dtype::F32, 17);
    let adapter = random_adapter(&linear_modules(&hp), 2, 23);
    let merged = tmp.path().join("merged");
    merge_into(&base, &adapter, &merged).unwrap();
    let (base_gguf, merged_gguf, lora_gguf) = (
        tmp.path().join("base.gguf"),
        tmp.path().join("merged.gguf"),
        tmp.path().join("lora.gguf"),
    );
    hf_to_gguf(&base, &base_gguf, OutType::F32).unwrap();
    hf_to_gguf(&merged, &merged_gguf, OutType::F32).unwrap();
    write_lora_gguf(&adapter, &model_config(&raw), &lora_gguf, LoraGgufType::F32).unwrap();
    let (mut b, mut m, mut l) = (
        GgufFile::open(&base_gguf).unwrap(),
        GgufFile::open(&merged_gguf).unwrap(),
        GgufFile::open(&lora_gguf).unwrap(),
    );
    let base_arch = b.metadata()["general.architecture"]
        .to_string()
        .unwrap()
        .clone();
    assert_eq!(
        l.metadata()["general.architecture"].to_string().unwrap(),
        &base_arch
    );
    let alpha = l.metadata()["adapter.lora.alpha"].to_f32().unwrap() as f64;
    let mut pairs = 0;
    for name in l.tensor_names() {
        let Some(target) = name.strip_suffix(".lora_a") else {
            continue;
        };
        pairs += 1;
        // llama-adapter.cpp's checks against the base tensor.
        let (wa, wb, w) = (
            ne(&l, &name),
            ne(&l, &format!("{target}.lora_b")),
            ne(&b, target),
        );
        assert_eq!((w[0], w[1], wa[1]), (wa[0], wb[1], wb[0]), "{target}");
        let (inp, rank, out) = (wa[0], wa[1], wb[1]);
        let a = gguf_values(&mut l, &name);
        let lb = gguf_values(&mut l, &format!("{target}.lora_b"));
        let w0 = gguf_values(&mut b, target);
        let w1 = gguf_values(&mut m, target);
        let delta = matmul(&lb, &a, out, rank, inp);
        for k in 0..w0.len() {
            let want = w0[k] as f64 + alpha / rank as f64 * delta[k] as f64;
            assert!(
                (w1[k] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{target}[{k}]"
            );
        }
    }
    assert_eq!(pairs, adapter.modules.len());
    // Tensors the adapter does not touch are the same in both conversions.
    assert_eq!(
        gguf_values(&mut b, "output_norm.weight"),
        gguf_values(&mut m, "output_norm.weight")
    );
}
