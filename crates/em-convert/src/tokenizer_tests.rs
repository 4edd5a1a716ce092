//! Tests for `tokenizer.rs`. The real-model tests read the GGUFs `cargo xtask fetch` puts in the
//! cache; absent, they skip locally and fail under `EM_REQUIRE_ASSETS` (`em_testkit`).

use super::*;
use std::str::FromStr;
use tokenizers::Tokenizer;

const SAMPLES: &[&str] = &[
    "Hello world",
    "Let $x^2 + y^2 = r^2$; then \\frac{\\partial f}{\\partial x} = \\sqrt{2}\\cdot\\pi \\approx 4.44.",
    "naïve café 日本語 🙂",
    "a  \n\n\t b",
    "1234567 3.14159",
    "   leading and trailing   ",
    "It's they'll WE'VE don't",
    "x\r\ny",
];

fn cache_dir() -> PathBuf {
    em_store::cache_dir()
}

fn load_gguf(rel: &str) -> Option<HashMap<String, Value>> {
    let fetch_name = if rel.contains("gemma3") {
        "gemma3-270m"
    } else {
        "smollm2-135m"
    };
    let path = em_testkit::fetched(cache_dir().join(rel), fetch_name)?;
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    Some(content.metadata)
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("em-tok-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_hf(dir: &Path, tj: &Json, cfg: &Json) -> (PathBuf, PathBuf) {
    let a = dir.join("tokenizer.json");
    let b = dir.join("tokenizer_config.json");
    std::fs::write(&a, serde_json::to_string(tj).unwrap()).unwrap();
    std::fs::write(&b, serde_json::to_string_pretty(cfg).unwrap()).unwrap();
    (a, b)
}

fn dbg(v: &Value) -> String {
    format!("{v:?}")
}

fn md_get<'a>(md: &'a Metadata, key: &str) -> Option<&'a Value> {
    md.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// Every `tokenizer.*` key of `orig` must come back identical, except those in `skip`.
fn assert_same_tokenizer_md(orig: &HashMap<String, Value>, back: &Metadata, skip: &[&str]) {
    let mut keys: Vec<&String> = orig
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    keys.sort_by_key(|k| (k.contains("scores"), k.to_string()));
    for k in keys {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let b = md_get(back, k).unwrap_or_else(|| panic!("round trip lost {k}"));
        if let (Value::Array(x), Value::Array(y)) = (&orig[k], b) {
            assert_eq!(x.len(), y.len(), "round trip changed the length of {k}");
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!(
                    dbg(p) == dbg(q),
                    "round trip changed {k}[{i}]: {p:?} -> {q:?}"
                );
            }
        }
        assert!(dbg(&orig[k]) == dbg(b), "round trip changed {k}");
    }
    for (k, _) in back {
        assert!(
            orig.contains_key(k) || skip.contains(&k.as_str()),
            "round trip added {k}"
        );
    }
}

fn check_round_trips(tok: &Tokenizer, specials: &[(&str, u32)]) {
    for s in SAMPLES {
        let enc = tok.encode(*s, false).unwrap();
        let ids = enc.get_ids();
        assert!(!ids.is_empty());
        let dec = tok.decode(ids, false).unwrap();
        assert_eq!(
            &dec,
            s,
            "decode(encode(s)) != s for {s:?}: {:?}",
            enc.get_tokens()
        );
    }
    for (t, id) in specials {
        let text = format!("x{t}y");
        let enc = tok.encode(text.as_str(), false).unwrap();
        assert!(
            enc.get_ids().contains(id),
            "{t} did not encode to {id}: {:?}",
            enc.get_tokens()
        );
        assert_eq!(
            tok.encode(*t, false).unwrap().get_ids(),
            &[*id],
            "{t} is not one token"
        );
    }
}

#[test]
fn smollm2_gguf_to_hf_and_back() {
    let Some(md) = load_gguf("models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let (tj, cfg) = gguf_to_hf(&md).unwrap();
    let tok = Tokenizer::from_str(&tj.to_string()).unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);

    // special tokens are single ids; decode(encode(s)) == s
    check_round_trips(
        &tok,
        &[("<|im_start|>", 1), ("<|im_end|>", 2), ("<|endoftext|>", 0)],
    );

    // ids cross-checked against an independent SmolLM2 tokenizer implementation's self-check
    for (s, want) in [
        ("Hello, we can use", &[19556u32, 28, 392, 416, 722][..]),
        ("Hello world! 123", &[19556, 905, 17, 216, 33, 34, 35]),
        (
            "Café déjà vu.",
            &[51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
        ),
        ("  multiple   spaces", &[216, 2701, 256, 5600]),
        ("\n", &[198]),
    ] {
        assert_eq!(
            tok.encode(s, false).unwrap().get_ids(),
            want,
            "ids for {s:?}"
        );
    }
    // digits are split one by one (smollm pre-tokenizer)
    let ids = tok.encode("1234567", false).unwrap();
    assert_eq!(ids.get_ids().len(), 7);
    // add_bos_token is false in this GGUF: nothing is added
    assert_eq!(
        tok.encode("Hi", true).unwrap().get_ids(),
        tok.encode("Hi", false).unwrap().get_ids()
    );

    assert_eq!(cfg["bos_token"], "<|im_start|>");
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["pad_token"], "<|im_end|>");
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(cfg["model_max_length"], 8192);
    assert!(cfg["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    assert_eq!(cfg["added_tokens_decoder"]["1"]["special"], true);

    // and back to GGUF metadata: identical
    let dir = tmp_dir("smollm2");
    let (a, b) = write_hf(&dir, &tj, &cfg);
    let back = hf_to_gguf(&a, Some(&b), "llama").unwrap();
    assert_same_tokenizer_md(&md, &back, &["tokenizer.ggml.add_space_prefix"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gemma3_gguf_to_hf_and_back() {
    let Some(md) = load_gguf("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let t0 = std::time::Instant::now();
    let (tj, cfg) = gguf_to_hf(&md).unwrap();
    eprintln!(
        "gemma3 gguf_to_hf: {} merges in {:?}",
        tj["model"]["merges"].as_array().unwrap().len(),
        t0.elapsed()
    );
    let tok = Tokenizer::from_str(&tj.to_string()).unwrap();
    assert_eq!(tok.token_to_id("<bos>"), Some(2));
    assert_eq!(tok.token_to_id("<start_of_turn>"), Some(105));
    assert_eq!(tok.token_to_id("<end_of_turn>"), Some(106));
    check_round_trips(
        &tok,
        &[
            ("<start_of_turn>", 105),
            ("<end_of_turn>", 106),
            ("<bos>", 2),
        ],
    );

    let enc = tok.encode("Hello world", false).unwrap();
    assert_eq!(enc.get_tokens(), &["Hello", "▁world"]);
    assert_eq!(enc.get_ids(), &[9259, 1902]);
    let enc = tok.encode(" Hello world", true).unwrap();
    assert_eq!(enc.get_ids(), &[2, 26352, 1902], "bos is added, ▁Hello");
    // byte fallback for characters outside the vocab, and decoding it back
    let rare = "\u{10FFFD}";
    let enc = tok.encode(rare, false).unwrap();
    assert!(
        enc.get_tokens().iter().all(|t| t.starts_with("<0x")),
        "{:?}",
        enc.get_tokens()
    );
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), rare);

    assert_eq!(cfg["bos_token"], "<bos>");
    assert_eq!(cfg["eos_token"], "<eos>");
    assert_eq!(cfg["add_bos_token"], true);

    let dir = tmp_dir("gemma3");
    let (a, b) = write_hf(&dir, &tj, &cfg);
    let back = hf_to_gguf(&a, Some(&b), "gemma3").unwrap();
    // token types, tokens and special ids come back exactly
    assert_same_tokenizer_md(
        &md,
        &back,
        &["tokenizer.ggml.add_sep_token", "tokenizer.ggml.scores"],
    );
    // scores: tokenizer.json has none, the derived ones keep the order of the original ones
    // (SentencePiece's own scores have gaps the vocab cannot tell); others are exact
    let (Value::Array(orig), Some(Value::Array(new))) = (
        &md["tokenizer.ggml.scores"],
        md_get(&back, "tokenizer.ggml.scores"),
    ) else {
        panic!()
    };
    let Value::Array(types) = &md["tokenizer.ggml.token_type"] else {
        panic!()
    };
    let f = |v: &Value| match v {
        Value::F32(x) => *x,
        _ => panic!("scores must be f32"),
    };
    let mut last: Option<(f32, f32)> = None;
    for i in 0..orig.len() {
        if matches!(types[i], Value::I32(TOKEN_NORMAL)) {
            if let Some((po, pn)) = last {
                assert!(
                    (f(&orig[i]) < po) == (f(&new[i]) < pn),
                    "score order differs at {i}"
                );
            }
            last = Some((f(&orig[i]), f(&new[i])));
        } else {
            assert_eq!(f(&orig[i]), f(&new[i]), "score of special token {i}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn train_tiny(regex: &str, pre_kind: &str) -> Tokenizer {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{AddedToken, SplitDelimiterBehavior};
    let mut tok = Tokenizer::new(BPE::default());
    let pre: tokenizers::PreTokenizerWrapper = match pre_kind {
        "split" => Sequence::new(vec![
            Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .unwrap()
            .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        "digits" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        _ => ByteLevel::new(false, true, true).into(),
    };
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainer::builder()
        .vocab_size(400)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(vec![
            AddedToken::from("<|endoftext|>", true),
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
        ])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let corpus = [
        "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
        "Solve x^2 + 3x - 4 = 0: the roots are 1 and -4; sum = -3.",
        "naïve café 日本語 🙂 — unicode text with accents and emoji",
        "def f(x):\n    return x * 2  # comment\n\n\tindented",
    ];
    tok.train(&mut trainer, corpus.iter().map(|s| s.to_string()))
        .unwrap();
    tok.add_tokens([AddedToken::from("<think>", false)])
        .unwrap();
    tok
}

fn tiny_to_gguf(tok: &Tokenizer, name: &str, cfg: Json) -> (Metadata, PathBuf) {
    let dir = tmp_dir(name);
    let a = dir.join("tokenizer.json");
    std::fs::write(&a, tok.to_string(false).unwrap()).unwrap();
    let b = dir.join("tokenizer_config.json");
    std::fs::write(&b, cfg.to_string()).unwrap();
    (hf_to_gguf(&a, Some(&b), "qwen2").unwrap(), dir)
}

#[test]
fn tiny_bpe_qwen2_to_gguf_and_back() {
    let tok = train_tiny(QWEN2_REGEX, "split");
    let cfg = json!({
        "bos_token": null,
        "eos_token": {"content": "<|im_end|>", "special": true},
        "pad_token": "<|endoftext|>",
        "chat_template": [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "T"}],
    });
    let (md, dir) = tiny_to_gguf(&tok, "qwen2", cfg);
    assert_eq!(
        dbg(md_get(&md, "tokenizer.ggml.model").unwrap()),
        dbg(&Value::String("gpt2".into()))
    );
    assert_eq!(
        dbg(md_get(&md, "tokenizer.ggml.pre").unwrap()),
        dbg(&Value::String("qwen2".into()))
    );
    let Some(Value::Array(tokens)) = md_get(&md, "tokenizer.ggml.tokens") else {
        panic!()
    };
    let Some(Value::Array(types)) = md_get(&md, "tokenizer.ggml.token_type") else {
        panic!()
    };
    assert_eq!(tokens.len(), tok.get_vocab_size(true));
    assert!(matches!(&tokens[0], Value::String(s) if s == "<|endoftext|>"));
    assert!(matches!(types[0], Value::I32(TOKEN_CONTROL)));
    let think = tok.token_to_id("<think>").unwrap() as usize;
    assert!(matches!(types[think], Value::I32(TOKEN_USER_DEFINED)));
    assert!(matches!(types[10], Value::I32(TOKEN_NORMAL)));
    let Some(Value::Array(merges)) = md_get(&md, "tokenizer.ggml.merges") else {
        panic!()
    };
    assert!(!merges.is_empty());
    assert!(merges
        .iter()
        .all(|m| matches!(m, Value::String(s) if s.split(' ').count() == 2)));
    assert!(matches!(
        md_get(&md, "tokenizer.ggml.eos_token_id"),
        Some(Value::U32(2))
    ));
    assert!(matches!(
        md_get(&md, "tokenizer.ggml.padding_token_id"),
        Some(Value::U32(0))
    ));
    assert!(md_get(&md, "tokenizer.ggml.bos_token_id").is_none());
    assert!(
        matches!(md_get(&md, "tokenizer.chat_template"), Some(Value::String(s)) if s == "{{ messages }}")
    );
    assert!(
        matches!(md_get(&md, "tokenizer.chat_template.tool_use"), Some(Value::String(s)) if s == "T")
    );

    // back to HF: the rebuilt tokenizer gives the same ids as the trained one
    let map: HashMap<String, Value> = md.into_iter().collect();
    let (tj, _) = gguf_to_hf(&map).unwrap();
    let rebuilt = Tokenizer::from_str(&tj.to_string()).unwrap();
    for s in SAMPLES
        .iter()
        .chain(["<|im_start|>user\nhi<|im_end|>", "a<think>b"].iter())
    {
        assert_eq!(
            rebuilt.encode(*s, false).unwrap().get_ids(),
            tok.encode(*s, false).unwrap().get_ids(),
            "{s:?}"
        );
        let ids = rebuilt.encode(*s, false).unwrap();
        assert_eq!(rebuilt.decode(ids.get_ids(), false).unwrap(), *s);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pre_tokenizer_detection() {
    for (tok, cfg, want) in [
        (train_tiny(LLAMA3_REGEX, "split"), json!({}), "llama-bpe"),
        (train_tiny(GPT2_REGEX, "split"), json!({}), "gpt-2"),
        (train_tiny("", "bytelevel"), json!({}), "gpt-2"),
        (train_tiny("", "digits"), json!({}), "smollm"),
        (
            train_tiny("", "digits"),
            json!({"clean_up_tokenization_spaces": true}),
            "starcoder",
        ),
    ] {
        let (md, dir) = tiny_to_gguf(&tok, want, cfg);
        assert_eq!(
            dbg(md_get(&md, "tokenizer.ggml.pre").unwrap()),
            dbg(&Value::String(want.into()))
        );
        // and each pre comes back to an HF pre-tokenizer that tokenizes identically
        let map: HashMap<String, Value> = md.into_iter().collect();
        let (tj, _) = gguf_to_hf(&map).unwrap();
        let rebuilt = Tokenizer::from_str(&tj.to_string()).unwrap();
        for s in SAMPLES {
            assert_eq!(
                rebuilt.encode(*s, false).unwrap().get_ids(),
                tok.encode(*s, false).unwrap().get_ids(),
                "{want}: {s:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn err_of(tj: &str, name: &str) -> String {
    let dir = tmp_dir(name);
    let a = dir.join("tokenizer.json");
    std::fs::write(&a, tj).unwrap();
    let e = hf_to_gguf(&a, None, "llama").unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!e.contains('\n'), "multi-line error: {e}");
    e
}

#[test]
fn bad_hf_inputs() {
    let e = hf_to_gguf(Path::new("/nonexistent/tokenizer.json"), None, "llama")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/tokenizer.json") && e.contains("not found"),
        "{e}"
    );

    let e = err_of("{\n  \"model\": {\n    \"type\": \"BPE\",,\n}", "malformed");
    assert!(
        e.contains("tokenizer.json") && e.contains("malformed JSON at line 3"),
        "{e}"
    );

    let e = err_of(
        r#"{"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}"#,
        "unigram",
    );
    assert!(
        e.contains("tokenizer.json") && e.contains("unsupported tokenizer model type \"Unigram\""),
        "{e}"
    );
    let e = err_of(
        r#"{"model": {"type": "WordPiece", "vocab": {"a": 0}}}"#,
        "wordpiece",
    );
    assert!(e.contains("\"WordPiece\""), "{e}");

    let weird = json!({
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{L}+\n|x"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "decoder": {"type": "ByteLevel"}
    });
    let e = err_of(&weird.to_string(), "unknownpre");
    assert!(
        e.contains("tokenizer.json") && e.contains("pre-tokenizer is not one llama.cpp knows"),
        "{e}"
    );

    let e = err_of(
        r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}"#,
        "neither",
    );
    assert!(e.contains("neither byte-level"), "{e}");

    // A syntax error inside the decoder, on which the tokenizers library panics.
    let dir = tmp_dir("decoder-syntax");
    let path = dir.join("tokenizer.json");
    std::fs::write(
        &path,
        r#"{"decoder": {"type": "ByteLevel", "trim_offsets": false, "typ, "x": 1}, "model": {}}"#,
    )
    .unwrap();
    let e = load_hf_tokenizer(&path).unwrap_err().to_string();
    let tok = train_tiny(QWEN2_REGEX, "split");
    std::fs::write(&path, tok.to_string(false).unwrap()).unwrap();
    let loaded = load_hf_tokenizer(&path).unwrap();
    assert_eq!(
        loaded.encode("Hello world", false).unwrap().get_ids(),
        tok.encode("Hello world", false).unwrap().get_ids()
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        e.contains("tokenizer.json: malformed JSON at line 1"),
        "{e}"
    );

    // One id of 2^32 - 2: an error, not 4 billion placeholder tokens.
    let e = err_of(
        r#"{"model": {"type": "BPE", "vocab": {"a": 0, "b": 4294967294}, "merges": []},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false}}"#,
        "sparse",
    );
    assert!(
        e.contains("token ids run to 4294967294 but only 2 are used"),
        "{e}"
    );

    // tokenizer_config naming a token the vocab lacks
    let dir = tmp_dir("badcfg");
    let tok = train_tiny(QWEN2_REGEX, "split");
    let a = dir.join("tokenizer.json");
    std::fs::write(&a, tok.to_string(false).unwrap()).unwrap();
    let b = dir.join("tokenizer_config.json");
    std::fs::write(&b, r#"{"bos_token": "<s>"}"#).unwrap();
    let e = hf_to_gguf(&a, Some(&b), "qwen2").unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("bos_token \"<s>\""),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_gguf_inputs() {
    let mut md: HashMap<String, Value> = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    let e = gguf_to_hf(&md).unwrap_err().to_string();
    assert_eq!(e, "GGUF metadata: missing key tokenizer.ggml.tokens");

    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(vec![Value::U32(1)]),
    );
    let e = gguf_to_hf(&md).unwrap_err().to_string();
    assert!(
        e.contains("wrong type for key tokenizer.ggml.tokens (expected array of strings"),
        "{e}"
    );
    md.insert("tokenizer.ggml.tokens".into(), Value::String("a".into()));
    let e = gguf_to_hf(&md).unwrap_err().to_string();
    assert!(
        e.contains(
            "wrong type for key tokenizer.ggml.tokens (expected array of strings, found string)"
        ),
        "{e}"
    );

    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
    );
    let e = gguf_to_hf(&md).unwrap_err().to_string();
    assert!(e.contains("missing key tokenizer.ggml.merges"), "{e}");
    md.insert("tokenizer.ggml.merges".into(), Value::Array(vec![]));
    md.insert(
        "tokenizer.ggml.pre".into(),
        Value::String("tekken-ish".into()),
    );
    let e = gguf_to_hf(&md).unwrap_err().to_string();
    assert!(
        e.contains("\"tekken-ish\" has no known HF pre-tokenizer"),
        "{e}"
    );
    md.insert("tokenizer.ggml.pre".into(), Value::String("qwen2".into()));
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1)]),
    );
    let e = gguf_to_hf(&md).unwrap_err().to_string();
    assert!(e.contains("token_type has 1 entries for 2 tokens"), "{e}");
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1), Value::I32(1)]),
    );
    md.insert(
        "tokenizer.ggml.bos_token_id".into(),
        Value::String("0".into()),
    );
    let e = gguf_to_hf(&md).unwrap_err().to_string();
    assert!(
        e.contains("wrong type for key tokenizer.ggml.bos_token_id (expected u32, found string)"),
        "{e}"
    );
    md.remove("tokenizer.ggml.bos_token_id");
    assert!(gguf_to_hf(&md).is_ok());

    md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let e = gguf_to_hf(&md).unwrap_err().to_string();
    assert!(e.contains("\"bert\" is not supported"), "{e}");
}

/// A direct re-implementation of llama.cpp's SPM tokenizer (special/user-defined partition, then
/// whitespace escaping and score-ordered bigram merging with byte fallback), to check that the
/// BPE tokenizer.json built from a "llama" GGUF gives the ids llama.cpp would.
fn llama_cpp_spm_reference(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    text: &str,
) -> Vec<u32> {
    use std::collections::BinaryHeap;
    let to_id: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let mut specials: Vec<u32> = (0..tokens.len() as u32)
        .filter(|&i| matches!(types[i as usize], TOKEN_CONTROL | TOKEN_USER_DEFINED))
        .collect();
    specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
    // fragments: Ok(raw text) or Err(token id)
    let mut frags: Vec<std::result::Result<String, u32>> = vec![Ok(text.to_string())];
    for &sid in &specials {
        let st = tokens[sid as usize].as_str();
        let mut next = Vec::new();
        for f in frags {
            match f {
                Ok(raw) if raw.contains(st) => {
                    let mut rest = raw.as_str();
                    while let Some(p) = rest.find(st) {
                        if p > 0 {
                            next.push(Ok(rest[..p].to_string()));
                        }
                        next.push(Err(sid));
                        rest = &rest[p + st.len()..];
                    }
                    if !rest.is_empty() {
                        next.push(Ok(rest.to_string()));
                    }
                }
                other => next.push(other),
            }
        }
        frags = next;
    }
    let mut out = Vec::new();
    for f in frags {
        let raw = match f {
            Err(id) => {
                out.push(id);
                continue;
            }
            Ok(raw) => raw.replace(' ', "▁"),
        };
        // symbols: (start, len, prev, next)
        let mut sym: Vec<(usize, usize, isize, isize)> = Vec::new();
        let chars: Vec<(usize, char)> = raw.char_indices().collect();
        for (k, &(pos, c)) in chars.iter().enumerate() {
            let next = if k + 1 == chars.len() {
                -1
            } else {
                k as isize + 1
            };
            sym.push((pos, c.len_utf8(), k as isize - 1, next));
        }
        let mut heap = BinaryHeap::new();
        let mut rev: HashMap<String, (usize, usize)> = HashMap::new();
        let try_add = |l: isize,
                       r: isize,
                       sym: &Vec<(usize, usize, isize, isize)>,
                       heap: &mut BinaryHeap<(i64, std::cmp::Reverse<usize>, usize, usize)>,
                       rev: &mut HashMap<String, (usize, usize)>| {
            if l < 0 || r < 0 {
                return;
            }
            let (l, r) = (l as usize, r as usize);
            let t = &raw[sym[l].0..sym[r].0 + sym[r].1];
            if let Some(&id) = to_id.get(t) {
                heap.push((
                    (scores[id as usize] as f64 * 1000.0) as i64,
                    std::cmp::Reverse(l),
                    r,
                    t.len(),
                ));
                rev.insert(t.to_string(), (l, r));
            }
        };
        for k in 1..sym.len() {
            try_add(k as isize - 1, k as isize, &sym, &mut heap, &mut rev);
        }
        while let Some((_, std::cmp::Reverse(l), r, size)) = heap.pop() {
            if sym[l].1 == 0 || sym[r].1 == 0 || sym[l].1 + sym[r].1 != size {
                continue;
            }
            sym[l].1 += sym[r].1;
            sym[r].1 = 0;
            sym[l].3 = sym[r].3;
            if sym[r].3 >= 0 {
                let n = sym[r].3 as usize;
                sym[n].2 = l as isize;
            }
            let (p, n) = (sym[l].2, sym[l].3);
            try_add(p, l as isize, &sym, &mut heap, &mut rev);
            try_add(l as isize, n, &sym, &mut heap, &mut rev);
        }
        fn reseg(
            raw: &str,
            sym: &[(usize, usize, isize, isize)],
            k: usize,
            to_id: &HashMap<&str, u32>,
            rev: &HashMap<String, (usize, usize)>,
            out: &mut Vec<u32>,
        ) {
            let t = &raw[sym[k].0..sym[k].0 + sym[k].1];
            if let Some(&id) = to_id.get(t) {
                out.push(id);
            } else if let Some(&(l, r)) = rev.get(t) {
                reseg(raw, sym, l, to_id, rev, out);
                reseg(raw, sym, r, to_id, rev, out);
            } else {
                for b in t.bytes() {
                    out.push(to_id[format!("<0x{b:02X}>").as_str()]);
                }
            }
        }
        // note: reseg of a part uses its length at merge time in llama.cpp; parts of a merged
        // symbol keep their own (start, len) because only the left symbol grows
        let mut k = if sym.is_empty() { -1 } else { 0 };
        while k >= 0 {
            reseg(&raw, &sym, k as usize, &to_id, &rev, &mut out);
            k = sym[k as usize].3;
        }
    }
    out
}

#[test]
fn gemma3_rebuilt_matches_llama_cpp_spm_algorithm() {
    let Some(md) = load_gguf("models/gemma3-270m/gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let (tj, _) = gguf_to_hf(&md).unwrap();
    let tok = Tokenizer::from_str(&tj.to_string()).unwrap();
    let Value::Array(t) = &md["tokenizer.ggml.tokens"] else {
        panic!()
    };
    let Value::Array(s) = &md["tokenizer.ggml.scores"] else {
        panic!()
    };
    let Value::Array(ty) = &md["tokenizer.ggml.token_type"] else {
        panic!()
    };
    let tokens: Vec<String> = t
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            _ => panic!(),
        })
        .collect();
    let scores: Vec<f32> = s
        .iter()
        .map(|v| match v {
            Value::F32(x) => *x,
            _ => panic!(),
        })
        .collect();
    let types: Vec<i32> = ty
        .iter()
        .map(|v| match v {
            Value::I32(x) => *x,
            _ => panic!(),
        })
        .collect();
    let extra = [
        "The quick brown fox jumps over the lazy dog.",
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
        "∫_0^∞ e^{-x^2} dx = √π / 2    \t\t  end",
        "Ünïcödé ΑΒΓ кириллица עברית العربية हिन्दी 한국어 ไทย",
        "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm aaaaaaaaaaaaaaaa",
        "<table><tr><td>1</td></tr></table>",
    ];
    let mut mismatches = 0;
    for text in SAMPLES.iter().chain(extra.iter()) {
        let want = llama_cpp_spm_reference(&tokens, &scores, &types, text);
        let got = tok.encode(*text, false).unwrap().get_ids().to_vec();
        if want != got {
            mismatches += 1;
            let show = |ids: &[u32]| {
                ids.iter()
                    .map(|&i| tokens[i as usize].clone())
                    .collect::<Vec<_>>()
            };
            eprintln!(
                "MISMATCH {text:?}\n  llama.cpp-spm {:?}\n  rebuilt       {:?}",
                show(&want),
                show(&got)
            );
        }
    }
    assert_eq!(mismatches, 0);
}

#[test]
fn spm_merges_look_up_only_splits_whose_halves_are_pieces_lengths() {
    // A 1 MB piece: hashing each of its prefixes would take minutes; the length filter skips them.
    let huge = "a".repeat(1 << 20);
    let tokens = ["a", "b", "ab", "ba", "aba", huge.as_str()];
    let types = [TOKEN_NORMAL; 6];
    let scores = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0];
    let merges = spm_merges(&tokens, &types, Some(&scores));
    let pairs: Vec<(&str, &str)> = merges
        .iter()
        .map(|(l, r)| (l.as_str(), r.as_str()))
        .collect();
    // By piece score, then by (left id, right id); the huge piece has no split into pieces.
    assert_eq!(pairs, [("a", "b"), ("b", "a"), ("a", "ba"), ("ab", "a")]);
}
