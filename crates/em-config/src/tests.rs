//! Real configurations in both transformers layouts, required keys, and recorded defaults.

use std::path::Path;

use serde_json::{json, Value};

use super::*;

fn resolve(raw: &Value) -> ModelConfig {
    ModelConfig::from_value(raw.clone(), Path::new("test/config.json"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn resolve_err(raw: &Value) -> ConfigError {
    match ModelConfig::from_value(raw.clone(), Path::new("test/config.json")) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

fn without(raw: &Value, keys: &[&str]) -> Value {
    let mut v = raw.clone();
    for k in keys {
        v.as_object_mut().unwrap().remove(*k);
    }
    v
}

fn with(raw: &Value, extra: Value) -> Value {
    let mut v = raw.clone();
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// SmolLM2-135M-Instruct's config.json as transformers 4.42 wrote it.
fn smollm2_v4() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "max_position_embeddings": 8192, "mlp_bias": false, "model_type": "llama",
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
        "rope_theta": 100000, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3", "use_cache": true, "vocab_size": 49152
    })
}

/// The same model as transformers 5 writes it: `rope_parameters` and `dtype`.
fn smollm2_v5() -> Value {
    with(
        &without(
            &smollm2_v4(),
            &["rope_theta", "rope_scaling", "torch_dtype"],
        ),
        json!({
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
            "dtype": "bfloat16", "transformers_version": "5.0.0"
        }),
    )
}

fn llama31_v4() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
        "torch_dtype": "bfloat16"
    })
}

fn llama31_v5() -> Value {
    with(
        &without(
            &llama31_v4(),
            &["rope_theta", "rope_scaling", "torch_dtype"],
        ),
        json!({
            "rope_parameters": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
                "rope_type": "llama3"},
            "dtype": "bfloat16"
        }),
    )
}

/// Qwen2.5-Math-1.5B's config.json (transformers 4.x).
fn qwen_math_v4() -> Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
        "intermediate_size": 8960, "max_position_embeddings": 4096, "max_window_layers": 21,
        "model_type": "qwen2", "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "sliding_window": 4096, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
    })
}

/// As transformers 5 writes it: explicit `layer_types`, the unused window nulled.
fn qwen_math_v5() -> Value {
    with(
        &without(&qwen_math_v4(), &["rope_theta", "torch_dtype"]),
        json!({
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "layer_types": vec!["full_attention"; 28], "sliding_window": null,
            "dtype": "bfloat16"
        }),
    )
}

/// gemma-3-270m's config.json (transformers 4.x); it has no `tie_word_embeddings`.
fn gemma_v4() -> Value {
    let mut types = vec!["sliding_attention"; 18];
    for i in [5, 11, 17] {
        types[i] = "full_attention";
    }
    json!({
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
        "attn_logit_softcapping": null, "final_logit_softcapping": null, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640, "intermediate_size": 2048,
        "layer_types": types, "max_position_embeddings": 32768, "model_type": "gemma3_text",
        "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
        "rope_scaling": null, "rope_theta": 1000000.0, "sliding_window": 512,
        "torch_dtype": "bfloat16", "use_bidirectional_attention": false, "vocab_size": 262144
    })
}

/// As transformers 5 writes it: one `rope_parameters` entry per layer type.
fn gemma_v5() -> Value {
    with(
        &without(
            &gemma_v4(),
            &[
                "rope_theta",
                "rope_scaling",
                "rope_local_base_freq",
                "torch_dtype",
            ],
        ),
        json!({
            "rope_parameters": {
                "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}
            },
            "dtype": "bfloat16"
        }),
    )
}

#[test]
fn transformers_4_and_5_layouts_resolve_to_equal_configs() {
    let linear_v4 = with(
        &gemma_v4(),
        json!({"rope_scaling": {"factor": 8.0, "rope_type": "linear"}}),
    );
    let linear_v5 = with(
        &gemma_v5(),
        json!({"rope_parameters": {
            "full_attention": {"factor": 8.0, "rope_theta": 1000000.0, "rope_type": "linear"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}
        }}),
    );
    for (label, v4, v5) in [
        ("llama (SmolLM2)", smollm2_v4(), smollm2_v5()),
        ("llama 3.1 rope", llama31_v4(), llama31_v5()),
        ("qwen2", qwen_math_v4(), qwen_math_v5()),
        ("gemma3", gemma_v4(), gemma_v5()),
        ("gemma3 linear rope", linear_v4, linear_v5),
    ] {
        let (a, b) = (resolve(&v4), resolve(&v5));
        assert_eq!(a, b, "{label}");
        assert_ne!(a.raw, b.raw, "{label}: the twins should differ as text");
        assert_eq!(a.dtype.as_deref(), Some("bfloat16"), "{label}");
    }
}

#[test]
fn resolved_values_are_the_models() {
    // The trap of METHOD.md: SmolLM2's base is 100000, in either layout.
    for raw in [smollm2_v4(), smollm2_v5()] {
        let c = resolve(&raw);
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.rope.theta, 100_000.0);
        assert_eq!(c.rope.scaling, None);
        assert_eq!((c.head_dim, c.num_key_value_heads), (64, 3));
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.mlp_bias);
        assert_eq!(c.defaults_applied, vec![("head_dim".into(), "64".into())]);
    }
    let c = resolve(&llama31_v5());
    assert_eq!(
        c.rope.scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
    assert_eq!(c.rope.theta, 500_000.0);

    let c = resolve(&qwen_math_v5());
    assert_eq!((c.head_dim, c.num_key_value_heads), (128, 2));
    assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    assert!(c.layer_windows.iter().all(Option::is_none));

    let c = resolve(&gemma_v5());
    assert_eq!((c.rope.theta, c.local_rope.theta), (1e6, 1e4));
    let globals: Vec<usize> = (0..18).filter(|&i| c.layer_windows[i].is_none()).collect();
    assert_eq!(globals, vec![5, 11, 17]);
    assert!(c.layer_windows.iter().flatten().all(|&w| w == 512));
    assert_eq!(
        c.defaults_applied,
        vec![("tie_word_embeddings".into(), "true".into())]
    );
    // The older form with sliding_window_pattern gives the same layers.
    let old = with(
        &without(&gemma_v4(), &["layer_types"]),
        json!({"sliding_window_pattern": 6}),
    );
    assert_eq!(resolve(&old).layer_windows, c.layer_windows);
}

#[test]
fn every_required_key_is_an_error_naming_it_and_the_file() {
    let common = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "rms_norm_eps",
        "max_position_embeddings",
    ];
    for (raw, extra) in [
        (smollm2_v4(), &[][..]),
        (qwen_math_v4(), &[][..]),
        (gemma_v4(), &["sliding_window"][..]),
    ] {
        for key in common.iter().chain(extra) {
            let mut nulled = raw.clone();
            nulled[*key] = Value::Null;
            for removed in [without(&raw, &[key]), nulled] {
                let e = resolve_err(&removed);
                assert!(
                    matches!(&e, ConfigError::MissingKey { key: k, .. } if k == key),
                    "{key}: {e}"
                );
                let msg = e.to_string();
                assert!(msg.contains(&format!("\"{key}\"")), "{msg}");
                assert!(msg.contains("test/config.json"), "{msg}");
            }
        }
    }
}

#[test]
fn a_missing_rope_base_is_an_error_in_either_layout() {
    let cases = [
        (without(&smollm2_v4(), &["rope_theta"]), "rope_theta"),
        (
            with(
                &smollm2_v5(),
                json!({"rope_parameters": {"rope_type": "default"}}),
            ),
            "rope_theta",
        ),
        (without(&qwen_math_v4(), &["rope_theta"]), "rope_theta"),
        (without(&gemma_v4(), &["rope_theta"]), "rope_theta"),
        (
            without(&gemma_v4(), &["rope_local_base_freq"]),
            "rope_local_base_freq",
        ),
        (
            with(
                &gemma_v5(),
                json!({"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {}}}),
            ),
            "rope_local_base_freq",
        ),
    ];
    for (raw, key) in cases {
        let e = resolve_err(&raw);
        let msg = e.to_string();
        assert!(
            matches!(&e, ConfigError::MissingKey { key: k, .. } if k == key),
            "{msg}"
        );
        assert!(
            msg.contains(key) && msg.contains("rope_parameters"),
            "{msg}"
        );
    }
}

#[test]
fn missing_keys_name_the_file_they_were_read_from() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    for (raw, key) in [
        (without(&smollm2_v4(), &["rope_theta"]), "rope_theta"),
        (without(&smollm2_v5(), &["rms_norm_eps"]), "rms_norm_eps"),
    ] {
        std::fs::write(&path, serde_json::to_string_pretty(&raw).unwrap()).unwrap();
        let e = ModelConfig::from_file(&path).unwrap_err();
        assert_eq!(e.path(), path);
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("missing required key \"{key}\"")),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}

#[test]
fn contradicting_layouts_are_an_error() {
    let both = with(&smollm2_v5(), json!({"rope_theta": 10000.0}));
    let msg = resolve_err(&both).to_string();
    assert!(
        msg.contains("disagree") && msg.contains("rope_theta"),
        "{msg}"
    );
    // Agreeing duplicates are fine.
    let agree = with(&smollm2_v5(), json!({"rope_theta": 100000}));
    assert_eq!(resolve(&agree), resolve(&smollm2_v5()));

    let both = with(
        &llama31_v5(),
        json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    );
    let msg = resolve_err(&both).to_string();
    assert!(msg.contains("disagree"), "{msg}");
}

#[test]
fn class_defaults_are_applied_and_recorded() {
    let bare_llama = json!({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 2, "num_attention_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 64
    });
    let c = resolve(&bare_llama);
    let expected: Vec<(String, String)> = [
        ("num_key_value_heads", "2"),
        ("head_dim", "4"),
        ("hidden_act", "silu"),
        ("tie_word_embeddings", "false"),
        ("attention_bias", "false"),
        ("mlp_bias", "false"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(c.defaults_applied, expected);
    assert_eq!(c.default_applied("head_dim"), Some("4"));
    assert_eq!(c.default_applied("rope_theta"), None);

    // Qwen2Config: an absent num_key_value_heads is 32, a null one the query heads.
    let qwen = with(
        &bare_llama,
        json!({"model_type": "qwen2", "num_attention_heads": 32, "hidden_size": 64}),
    );
    let c = resolve(&qwen);
    assert_eq!(c.num_key_value_heads, 32);
    let qwen8 = with(
        &qwen,
        json!({"num_attention_heads": 8, "num_key_value_heads": null}),
    );
    assert_eq!(resolve(&qwen8).num_key_value_heads, 8);
    assert_eq!(
        resolve(&qwen8).default_applied("num_key_value_heads"),
        Some("8")
    );
    // A sliding window only reads its defaults when it is switched on.
    assert_eq!(resolve(&qwen).default_applied("sliding_window"), None);
    let sliding = with(
        &qwen,
        json!({"use_sliding_window": true, "num_hidden_layers": 30}),
    );
    let c = resolve(&sliding);
    assert_eq!(c.default_applied("sliding_window"), Some("4096"));
    assert_eq!(c.default_applied("max_window_layers"), Some("28"));
    assert_eq!(c.layer_windows[27], None);
    assert_eq!(c.layer_windows[28], Some(4096));

    let bare_gemma = with(
        &bare_llama,
        json!({"model_type": "gemma3_text", "num_hidden_layers": 6, "sliding_window": 4,
               "rope_local_base_freq": 10000.0, "num_attention_heads": 4}),
    );
    let c = resolve(&bare_gemma);
    for (key, value) in [
        ("num_key_value_heads", "4"),
        ("head_dim", "256"),
        ("hidden_activation", "gelu_pytorch_tanh"),
        ("tie_word_embeddings", "true"),
        ("attention_bias", "false"),
        ("query_pre_attn_scalar", "256"),
        ("sliding_window_pattern", "6"),
    ] {
        assert_eq!(c.default_applied(key), Some(value), "{key}");
    }
    assert_eq!(c.layer_windows.iter().filter(|w| w.is_none()).count(), 1);
    // Nothing is recorded for a file that says everything.
    let complete = with(&llama31_v4(), json!({"head_dim": 128}));
    assert!(resolve(&complete).defaults_applied.is_empty());
}

#[test]
fn errors_name_the_file_and_the_fault() {
    let origin = Path::new("dir/config.json");
    let e = ModelConfig::from_json_str("{\n  \"model_type\": \"qwen2\",\n  oops\n}", origin)
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("malformed JSON in dir/config.json at line 3, column 3"),
        "{e}"
    );
    let text = serde_json::to_string_pretty(&with(&qwen_math_v4(), json!({"hidden_size": "big"})))
        .unwrap();
    let msg = ModelConfig::from_json_str(&text, origin)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("invalid configuration in dir/config.json: invalid type: string \"big\"")
            && msg.contains("at line"),
        "{msg}"
    );
    let msg = resolve_err(&with(&qwen_math_v4(), json!({"model_type": "mamba"}))).to_string();
    assert_eq!(
        msg,
        "unsupported architecture: model_type \"mamba\" in test/config.json (supported: qwen2, qwen3, llama, mistral, gemma3_text; dense models only)"
    );
    let msg = resolve_err(&with(
        &qwen_math_v4(),
        json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    ))
    .to_string();
    assert_eq!(
        msg,
        "unsupported configuration in test/config.json: rope scaling type \"yarn\""
    );
    let msg = resolve_err(&with(&gemma_v4(), json!({"text_config": {}}))).to_string();
    assert!(msg.contains("multimodal Gemma3"), "{msg}");
    let msg = resolve_err(&with(&qwen_math_v4(), json!({"num_key_value_heads": 5}))).to_string();
    assert!(
        msg.contains(
            "num_attention_heads (12) must be a positive multiple of num_key_value_heads (5)"
        ),
        "{msg}"
    );
}

#[test]
fn sizes_a_file_claims_are_bounded_before_anything_is_built_from_them() {
    for raw in [qwen_math_v4(), smollm2_v4(), gemma_v4()] {
        let raw = without(&raw, &["layer_types"]);
        let msg = resolve_err(&with(
            &raw,
            json!({"num_hidden_layers": 1_000_000_000_000u64}),
        ))
        .to_string();
        assert!(
            msg.contains("num_hidden_layers (1000000000000) is more than 65536"),
            "{msg}"
        );
    }
    let msg = resolve_err(&with(&qwen_math_v4(), json!({"hidden_size": u64::MAX}))).to_string();
    assert!(
        msg.contains("hidden_size (18446744073709551615) is more than"),
        "{msg}"
    );
}

#[test]
fn deserialises_straight_from_json_keeping_the_raw_value() {
    let c: ModelConfig = serde_json::from_value(llama31_v4()).unwrap();
    assert_eq!(c.raw, llama31_v4());
    assert_eq!(c, resolve(&llama31_v5()));
}

/// Qwen3-0.6B's config.json (transformers 4.51): q/k norms, an explicit head_dim that is not
/// hidden/heads, no biases, tied head.
fn qwen3_0_6b() -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000,
        "sliding_window": null, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false,
        "vocab_size": 151936
    })
}

#[test]
fn qwen3_reads_its_head_norms_and_head_dim_and_refuses_moe() {
    let c = resolve(&qwen3_0_6b());
    assert_eq!(c.architecture, Architecture::Qwen3);
    assert!(c.qk_norm && !c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
    assert_eq!((c.head_dim, c.num_key_value_heads), (128, 8));
    assert_eq!(c.layer_windows, vec![None; 28]);
    assert!(c.defaults_applied.is_empty(), "{:?}", c.defaults_applied);
    // Qwen3Config's head_dim default is 128, not hidden / heads.
    let c = resolve(&without(
        &with(&qwen3_0_6b(), json!({"hidden_size": 512})),
        &["head_dim"],
    ));
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.default_applied("head_dim"), Some("128"));
    let c = resolve(&with(&qwen3_0_6b(), json!({"attention_bias": true})));
    assert!(c.qkv_bias && c.o_bias);
    let e = resolve_err(&with(&qwen3_0_6b(), json!({"model_type": "qwen3_moe"})));
    assert!(
        e.to_string().contains("\"qwen3_moe\"") && e.to_string().contains("dense models only"),
        "{e}"
    );
}

/// Mistral-7B-v0.1's config.json: a 4096-token sliding window on every layer.
fn mistral_7b_v01() -> Value {
    json!({
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
        "vocab_size": 32000
    })
}

#[test]
fn mistral_windows_every_layer_and_records_the_default_window() {
    let c = resolve(&mistral_7b_v01());
    assert_eq!(c.architecture, Architecture::Mistral);
    assert_eq!(c.layer_windows, vec![Some(4096); 32]);
    assert!(!c.qk_norm && !c.qkv_bias && !c.mlp_bias);
    assert_eq!(c.head_dim, 128);
    // v0.2 and later write null: full attention.
    let c = resolve(&with(&mistral_7b_v01(), json!({"sliding_window": null})));
    assert_eq!(c.layer_windows, vec![None; 32]);
    // Absent: MistralConfig's 4096, recorded.
    let c = resolve(&without(&mistral_7b_v01(), &["sliding_window"]));
    assert_eq!(c.layer_windows, vec![Some(4096); 32]);
    assert_eq!(c.default_applied("sliding_window"), Some("4096"));
    let c = resolve(&without(&mistral_7b_v01(), &["num_key_value_heads"]));
    assert_eq!(c.default_applied("num_key_value_heads"), Some("8"));
}
