//! config.json in the transformers 4.x and 5.x layouts converts to the same GGUF, a config
//! without a key that changes the model is refused, and the config written back from a GGUF
//! reads as the model it came from.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use em_config::ModelConfig;
use em_convert::{convert, gguf_metadata, ConvertArgs, HfDtype, OutType};
use serde_json::{json, Value as Json};

/// A base other than 10000, the value a reader that ignores `rope_parameters` would invent.
const ROPE_BASE: f64 = 100_000.0;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen2")
}

fn fixture_config() -> Json {
    serde_json::from_str(&fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap()
}

/// A copy of the fixture under `parent/tiny-qwen2` (the same directory name, hence the same
/// `general.name`) with `config` as its config.json.
fn fixture_with(parent: &Path, config: &Json) -> PathBuf {
    let dir = parent.join("tiny-qwen2");
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(fixture()).unwrap().flatten() {
        fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    dir
}

/// The fixture's config as transformers 4.x writes it, with [`ROPE_BASE`].
fn v4() -> Json {
    let mut c = fixture_config();
    c["rope_theta"] = json!(ROPE_BASE);
    c["rope_scaling"] = Json::Null;
    c
}

/// The same as transformers 5 writes it: `rope_parameters`, `dtype`, explicit `layer_types`.
fn v5() -> Json {
    let mut c = v4();
    let o = c.as_object_mut().unwrap();
    o.remove("rope_theta");
    o.remove("rope_scaling");
    let dtype = o.remove("torch_dtype").unwrap();
    o.insert("dtype".into(), dtype);
    o.insert(
        "rope_parameters".into(),
        json!({"rope_theta": ROPE_BASE, "rope_type": "default"}),
    );
    o.insert(
        "layer_types".into(),
        json!(["full_attention", "full_attention"]),
    );
    o.insert("transformers_version".into(), json!("5.0.0"));
    c
}

fn args(input: &Path, output: &Path) -> ConvertArgs {
    ConvertArgs {
        input: input.into(),
        output: output.into(),
        outtype: OutType::F32,
        hf_dtype: HfDtype::F32,
        force: false,
    }
}

#[test]
fn transformers_4_and_5_configs_convert_to_byte_identical_ggufs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = vec![];
    for (label, config) in [("v4", v4()), ("v5", v5())] {
        let dir = fixture_with(&tmp.path().join(label), &config);
        let out = tmp.path().join(format!("{label}.gguf"));
        let report = convert(&args(&dir, &out)).unwrap();
        // The fixture says everything but head_dim, which Qwen2 derives.
        assert_eq!(
            report.defaults_applied,
            vec![("head_dim".to_string(), "64".to_string())],
            "{label}"
        );
        let md = gguf_metadata(&out).unwrap();
        assert!(
            matches!(md["qwen2.rope.freq_base"], Value::F32(b) if b == ROPE_BASE as f32),
            "{label}: rope base {:?}",
            md["qwen2.rope.freq_base"]
        );
        files.push(fs::read(&out).unwrap());
    }
    assert!(
        files[0] == files[1],
        "the 4.x and 5.x configs gave different GGUFs"
    );
}

#[test]
fn a_config_missing_a_model_key_is_refused_naming_the_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (label, config, key) in [
        ("no-theta-v4", v4(), "rope_theta"),
        ("no-theta-v5", v5(), "rope_theta"),
        ("no-eps", v4(), "rms_norm_eps"),
    ] {
        let mut config = config;
        let o = config.as_object_mut().unwrap();
        o.remove(key);
        if let Some(p) = o.get_mut("rope_parameters") {
            p.as_object_mut().unwrap().remove(key);
        }
        let dir = fixture_with(&tmp.path().join(label), &config);
        let out = tmp.path().join(format!("{label}.gguf"));
        let msg = format!("{:#}", convert(&args(&dir, &out)).unwrap_err());
        assert!(msg.contains(&format!("\"{key}\"")), "{label}: {msg}");
        let file = dir.join("config.json");
        assert!(msg.contains(&file.display().to_string()), "{label}: {msg}");
        assert!(!out.exists(), "{label}: output left behind");
    }
}

#[test]
fn the_config_written_from_a_gguf_reads_back_as_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture_with(&tmp.path().join("src"), &v5());
    let gguf = tmp.path().join("m.gguf");
    convert(&args(&dir, &gguf)).unwrap();
    let hf = tmp.path().join("hf");
    let report = convert(&args(&gguf, &hf)).unwrap();
    assert!(report.defaults_applied.is_empty());

    let original = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let mut back = ModelConfig::from_file(&hf.join("config.json")).unwrap();
    assert!(
        back.defaults_applied.is_empty(),
        "{:?}",
        back.defaults_applied
    );
    assert_eq!(back.dtype.as_deref(), Some("float32"));
    back.defaults_applied = original.defaults_applied.clone();
    back.dtype = original.dtype.clone();
    // A GGUF keeps only the tokenizer's pad token (here id 0, the fixture's `pad_token`), and the
    // HF side gets it as `pad_token_id`, which decides transformers' `padding_idx`.
    assert_eq!(original.pad_token_id, None);
    assert_eq!(back.pad_token_id, Some(0));
    back.pad_token_id = None;
    assert_eq!(back, original);
}
