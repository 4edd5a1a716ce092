//! Tokenizer conversion between Hugging Face tokenizer files and GGUF tokenizer metadata.
//!
//! Two tokenizer families are supported, matching what llama.cpp can run:
//!
//! * byte-level BPE (`model.type == "BPE"` with a `ByteLevel` pre-tokenizer or decoder: GPT-2,
//!   Llama 3, Qwen2, SmolLM2) <-> `tokenizer.ggml.model = "gpt2"`;
//! * SentencePiece-style BPE (`model.type == "BPE"` with `byte_fallback` and `▁` whitespace
//!   escaping, as Gemma 3 uses) <-> `tokenizer.ggml.model = "llama"` (llama.cpp's SPM vocab).
//!
//! Metadata value types are the ones gguf-py writes and llama.cpp checks: tokens/merges are arrays
//! of strings, token types arrays of i32, scores arrays of f32, special token ids u32, flags bool.
//!
//! ## `tokenizer.ggml.pre`
//! llama.cpp selects its pre-tokenizer regex from this string, so it is derived from the
//! tokenizer.json `pre_tokenizer` (see [`PRE_TOKENIZERS`]):
//!
//! | tokenizer.json pre_tokenizer                                       | pre         |
//! |--------------------------------------------------------------------|-------------|
//! | `ByteLevel` (use_regex = true, add_prefix_space = false)           | `gpt-2`     |
//! | `Sequence[Split(GPT-2 regex), ByteLevel(use_regex=false)]`         | `gpt-2`     |
//! | `Sequence[Split(Llama 3 regex, \p{N}{1,3}), ByteLevel(false)]`     | `llama-bpe` |
//! | `Sequence[Split(Qwen2 regex, \p{N}), ByteLevel(false)]`            | `qwen2`     |
//! | `Sequence[Digits(individual), ByteLevel(use_regex=true)]`          | `smollm` (`starcoder` when tokenizer_config says `clean_up_tokenization_spaces: true`) |
//!
//! SmolLM/SmolLM2 and StarCoder share the same pre-tokenizer (single digits, then the GPT-2 regex);
//! llama.cpp's two names differ only in `clean_spaces` on detokenization, which is exactly HF's
//! `clean_up_tokenization_spaces`. Anything else is an error: llama.cpp would split text
//! differently and silently produce other token ids. `arch` is not used to guess a default.
//!
//! ## SentencePiece scores and merges
//! llama.cpp's SPM tokenizer merges the adjacent pair whose merged piece has the highest score.
//! HF's BPE applies the listed merge of lowest rank. Going HF -> GGUF we only have tokenizer.json
//! (no tokenizer.model), so scores are derived: if the vocab order of the normal pieces agrees with
//! the order in which merges first produce them (true for every SentencePiece-derived
//! tokenizer.json, Gemma 3 included), the score of a normal piece is `-(its index among normal
//! pieces)`, which reproduces Gemma 3's real scores exactly; otherwise it is `-(rank of the first
//! merge producing it)` and pieces no merge produces score below all of those. Control and
//! user-defined tokens score -1000 and byte tokens 0, as llama.cpp's converter writes them.
//! GGUF -> HF rebuilds merges the way HF's SentencePiece extractor does: every split of a normal
//! piece into two normal pieces is a merge; merges are ordered by the merged piece's score
//! (descending, ties by id), then by the ids of the left and right parts. This is O(V * L) lookups.

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

pub type Metadata = Vec<(String, Value)>;

/// llama.cpp token types (`llama_token_type`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_UNKNOWN: i32 = 2;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;
pub const TOKEN_BYTE: i32 = 6;

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// llama.cpp's rewrites of the case-insensitive group (accepted as equivalent on input).
const LLAMA3_REGEX_CPP: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX_CPP: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Split regexes (a single `Split` followed by `ByteLevel(use_regex=false)`) and the llama.cpp
/// `tokenizer.ggml.pre` each corresponds to.
pub const PRE_TOKENIZERS: &[(&str, &str)] = &[
    (LLAMA3_REGEX, "llama-bpe"),
    (LLAMA3_REGEX_CPP, "llama-bpe"),
    (QWEN2_REGEX, "qwen2"),
    (QWEN2_REGEX_CPP, "qwen2"),
    (GPT2_REGEX, "gpt-2"),
];

/// `tokenizer.ggml.pre` values `gguf_to_hf` can turn back into a tokenizer.json pre-tokenizer.
const KNOWN_PRE: &[&str] = &[
    "gpt-2",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
    "deepseek-r1-qwen",
    "smollm",
    "starcoder",
];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: file not found", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: malformed JSON at line {line}, column {column}: {msg}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },
    #[error("{}: unsupported tokenizer model type {kind:?} (only BPE, byte-level or SentencePiece-style, can be converted to GGUF)", path.display())]
    UnsupportedModel { path: PathBuf, kind: String },
    #[error("{}: the pre-tokenizer is not one llama.cpp knows ({detail}); known: byte-level BPE with the GPT-2, Llama 3 or Qwen2 split regex, or single digits + GPT-2 (SmolLM/StarCoder)", path.display())]
    UnknownPreTokenizer { path: PathBuf, detail: String },
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    #[error("GGUF metadata: missing key {0}")]
    MissingKey(String),
    #[error("GGUF metadata: wrong type for key {key} (expected {expected}, found {found})")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("GGUF metadata: {0}")]
    InvalidGguf(String),
}

type Result<T> = std::result::Result<T, TokenizerError>;

fn one_line(s: &str) -> String {
    s.replace('\r', "\\r").replace('\n', "\\n")
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TokenizerError::NotFound {
            path: path.to_path_buf(),
        },
        _ => TokenizerError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

fn json_error(path: &Path, e: &serde_json::Error) -> TokenizerError {
    TokenizerError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        msg: one_line(&e.to_string()),
    }
}

fn read_json(path: &Path) -> Result<Json> {
    serde_json::from_str(&read_text(path)?).map_err(|e| json_error(path, &e))
}

/// Loads `tokenizer.json` with the tokenizers library, which the samplers and analyses use. The
/// text is checked to be JSON first: the library (0.23) panics on a syntax error inside some
/// sections, its decoder among them. Errors name the file.
pub fn load_hf_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = read_text(path)?;
    let json: Json = serde_json::from_str(&text).map_err(|e| json_error(path, &e))?;
    // tokenizers 0.23 panics building a BPE whose merge's right part is shorter than the
    // continuing-subword prefix (it subtracts the lengths).
    let model = &json["model"];
    if let Some(prefix) = model["continuing_subword_prefix"].as_str() {
        let short = model["merges"].as_array().into_iter().flatten().find(|m| {
            let right = match m {
                Json::String(s) => s.split_once(' ').map(|(_, b)| b),
                Json::Array(parts) => parts.get(1).and_then(Json::as_str),
                _ => None,
            };
            right.is_some_and(|b| b.len() < prefix.len())
        });
        if let Some(m) = short {
            return Err(TokenizerError::Invalid {
                path: path.to_path_buf(),
                msg: format!("merge {m} is shorter than the continuing_subword_prefix {prefix:?}"),
            });
        }
    }
    // Any other panic of the library is an error too, not an abort of the command.
    std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
        .unwrap_or_else(|_| Err("the tokenizers library panicked on it".into()))
        .map_err(|e| TokenizerError::Invalid {
            path: path.to_path_buf(),
            msg: format!(
                "the tokenizers library cannot load it: {}",
                one_line(&e.to_string())
            ),
        })
}

/// A token given in tokenizer_config.json as `"<s>"` or `{"content": "<s>", ...}`.
fn token_content(v: &Json) -> Option<&str> {
    match v {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// gguf-py's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// Every object in a (possibly nested `Sequence`) component, depth first.
fn flatten<'a>(v: &'a Json, key: &str, out: &mut Vec<&'a Json>) {
    if v.get("type").and_then(Json::as_str) == Some("Sequence") {
        if let Some(items) = v.get(key).and_then(Json::as_array) {
            for it in items {
                flatten(it, key, out);
            }
        }
    } else if v.is_object() {
        out.push(v);
    }
}

fn ty(v: &Json) -> &str {
    v.get("type").and_then(Json::as_str).unwrap_or("")
}

fn flag(v: &Json, key: &str, default: bool) -> bool {
    v.get(key).and_then(Json::as_bool).unwrap_or(default)
}

fn split_regex(v: &Json) -> Option<&str> {
    let p = v.get("pattern")?;
    p.get("Regex")
        .or_else(|| p.get("String"))
        .and_then(Json::as_str)
}

/// Decide `tokenizer.ggml.pre` from a byte-level tokenizer.json pre_tokenizer.
fn detect_pre(path: &Path, pre: &Json, clean_spaces: bool) -> Result<&'static str> {
    let mut parts = Vec::new();
    flatten(pre, "pretokenizers", &mut parts);
    let unknown = |detail: String| TokenizerError::UnknownPreTokenizer {
        path: path.to_path_buf(),
        detail: one_line(&detail),
    };
    let kinds: Vec<&str> = parts.iter().map(|p| ty(p)).collect();
    match kinds.as_slice() {
        ["ByteLevel"] => {
            let bl = parts[0];
            if flag(bl, "add_prefix_space", true) {
                return Err(unknown("ByteLevel with add_prefix_space = true".into()));
            }
            if !flag(bl, "use_regex", true) {
                return Err(unknown("ByteLevel without any split regex".into()));
            }
            Ok("gpt-2")
        }
        ["Digits", "ByteLevel"] => {
            let (d, bl) = (parts[0], parts[1]);
            if !flag(d, "individual_digits", false)
                || !flag(bl, "use_regex", true)
                || flag(bl, "add_prefix_space", true)
            {
                return Err(unknown(format!("{pre}")));
            }
            Ok(if clean_spaces { "starcoder" } else { "smollm" })
        }
        ["Split", "ByteLevel"] => {
            let (s, bl) = (parts[0], parts[1]);
            if flag(bl, "use_regex", true) || flag(bl, "add_prefix_space", true) {
                return Err(unknown(
                    "Split followed by ByteLevel with use_regex or add_prefix_space".into(),
                ));
            }
            if s.get("behavior")
                .and_then(Json::as_str)
                .unwrap_or("Isolated")
                != "Isolated"
                || flag(s, "invert", false)
            {
                return Err(unknown("Split behaviour is not Isolated".into()));
            }
            let re = split_regex(s).unwrap_or("");
            PRE_TOKENIZERS
                .iter()
                .find(|(r, _)| *r == re)
                .map(|(_, p)| *p)
                .ok_or_else(|| unknown(format!("split regex {re:?}")))
        }
        [] => Err(unknown("no pre_tokenizer".into())),
        other => Err(unknown(format!("components {other:?}"))),
    }
}

/// HF tokenizer files -> GGUF tokenizer metadata (tokenizer.ggml.* and tokenizer.chat_template).
pub fn hf_to_gguf(
    tokenizer_json: &Path,
    tokenizer_config_json: Option<&Path>,
    arch: &str,
) -> std::result::Result<Metadata, TokenizerError> {
    let _ = arch; // no architecture-specific defaults: see the module docs
    let path = tokenizer_json;
    let tj = read_json(path)?;
    let cfg = match tokenizer_config_json {
        Some(p) => Some(read_json(p)?),
        None => None,
    };
    let invalid = |msg: String| TokenizerError::Invalid {
        path: path.to_path_buf(),
        msg,
    };

    let model = tj
        .get("model")
        .filter(|m| m.is_object())
        .ok_or_else(|| invalid("no \"model\" object".into()))?;
    let kind = match model.get("type").and_then(Json::as_str) {
        Some(k) => k.to_string(),
        None if model.get("merges").is_some() => "BPE".to_string(),
        None => return Err(invalid("model has no \"type\"".into())),
    };
    if kind != "BPE" {
        return Err(TokenizerError::UnsupportedModel {
            path: path.to_path_buf(),
            kind,
        });
    }

    // Flavour: byte-level BPE or SentencePiece-style BPE.
    let null = Json::Null;
    let pre_tok = tj.get("pre_tokenizer").unwrap_or(&null);
    let decoder = tj.get("decoder").unwrap_or(&null);
    let normalizer = tj.get("normalizer").unwrap_or(&null);
    let mut comps = Vec::new();
    flatten(pre_tok, "pretokenizers", &mut comps);
    flatten(decoder, "decoders", &mut comps);
    let byte_level = comps.iter().any(|c| ty(c) == "ByteLevel");
    let byte_fallback = flag(model, "byte_fallback", false);
    let text_all = format!("{normalizer}{pre_tok}{decoder}");
    let spm = !byte_level && (byte_fallback || text_all.contains('▁'));
    if !byte_level && !spm {
        return Err(invalid(
            "BPE tokenizer is neither byte-level (ByteLevel pre-tokenizer/decoder) nor SentencePiece-style (byte_fallback, ▁ whitespace)".into(),
        ));
    }

    // id -> token, and added-token flags.
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| invalid("model.vocab is not an object".into()))?;
    let mut by_id: HashMap<u32, String> = HashMap::with_capacity(vocab.len());
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .filter(|&i| i < u32::MAX as u64)
            .ok_or_else(|| {
                invalid(format!(
                    "model.vocab id of {:?} is not a token id",
                    one_line(tok)
                ))
            })?;
        if let Some(prev) = by_id.insert(id as u32, tok.clone()) {
            return Err(invalid(format!(
                "model.vocab gives id {id} to both {:?} and {:?}",
                one_line(&prev),
                one_line(tok)
            )));
        }
    }
    let mut added: HashMap<u32, bool> = HashMap::new(); // id -> special
    if let Some(list) = tj.get("added_tokens").and_then(Json::as_array) {
        for at in list {
            let (Some(id), Some(content)) = (
                at.get("id")
                    .and_then(Json::as_u64)
                    .filter(|&i| i < u32::MAX as u64),
                at.get("content").and_then(Json::as_str),
            ) else {
                return Err(invalid(format!(
                    "malformed added_tokens entry {}",
                    one_line(&at.to_string())
                )));
            };
            let special = flag(at, "special", false);
            by_id.insert(id as u32, content.to_string());
            added.insert(id as u32, special);
        }
    }
    // tokenizer_config's added_tokens_decoder may mark more tokens special.
    if let Some(dec) = cfg
        .as_ref()
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(Json::as_object)
    {
        for (id, at) in dec {
            if let (Ok(id), Some(content)) =
                (id.parse::<u32>(), at.get("content").and_then(Json::as_str))
            {
                if by_id.get(&id).map(String::as_str) == Some(content) {
                    let e = added.entry(id).or_insert(false);
                    *e |= flag(at, "special", false);
                }
            }
        }
    }
    let n = by_id.keys().max().map_or(0, |&m| m as usize + 1);
    if n == 0 {
        return Err(invalid("empty vocabulary".into()));
    }
    // Every unused id below the largest becomes a placeholder token: real tokenizers leave a few,
    // and a lone id of 4 billion must not make billions.
    let unused = n - by_id.len();
    if unused > by_id.len() + (1 << 16) {
        return Err(invalid(format!(
            "token ids run to {} but only {} are used; the {unused} unused ids would each need a placeholder token",
            n - 1,
            by_id.len()
        )));
    }
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n as u32 {
        match by_id.get(&id) {
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(TOKEN_UNUSED);
            }
            Some(t) => {
                let ttype = match added.get(&id) {
                    Some(&special) if special || looks_special(t) => TOKEN_CONTROL,
                    Some(_) => TOKEN_USER_DEFINED,
                    None if spm && byte_fallback && is_byte_token(t) => TOKEN_BYTE,
                    None => TOKEN_NORMAL,
                };
                // llama.cpp's SPM converter un-escapes user-defined pieces.
                let t = if spm && ttype == TOKEN_USER_DEFINED {
                    t.replace('▁', " ")
                } else {
                    t.clone()
                };
                tokens.push(t);
                types.push(ttype);
            }
        }
    }
    {
        let mut seen = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if let Some(j) = seen.insert(t.as_str(), i) {
                return Err(invalid(format!("token {:?} appears twice (ids {j} and {i}); llama.cpp rejects duplicate tokens", one_line(t))));
            }
        }
    }

    // merges: "a b" strings or [a, b] pairs in tokenizer.json
    let mut merges: Vec<(String, String)> = Vec::new();
    if let Some(list) = model.get("merges").and_then(Json::as_array) {
        merges.reserve(list.len());
        for m in list {
            let pair = match m {
                Json::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Json::Array(p) => match p.as_slice() {
                    [Json::String(a), Json::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            let Some(pair) = pair else {
                return Err(invalid(format!(
                    "malformed merge {}",
                    one_line(&m.to_string())
                )));
            };
            if !spm && (pair.0.contains(' ') || pair.1.contains(' ')) {
                return Err(invalid(format!(
                    "merge [{:?}, {:?}] contains a space, which GGUF merges cannot hold",
                    pair.0, pair.1
                )));
            }
            merges.push(pair);
        }
    } else if !spm {
        return Err(invalid("model.merges is missing".into()));
    }

    // special tokens
    let find = |content: &str| -> Option<u32> {
        // added tokens take precedence over vocab entries with the same text
        let mut best = None;
        for (&id, t) in &by_id {
            if t == content && (best.is_none() || added.contains_key(&id)) {
                best = Some(id);
            }
        }
        best
    };
    let cfg_tok = |key: &str| {
        cfg.as_ref()
            .and_then(|c| c.get(key))
            .and_then(token_content)
            .map(str::to_string)
    };
    let mut ids: Vec<(&str, Option<u32>)> = Vec::new();
    let cfg_id = |key: &str, what: &str| -> Result<Option<u32>> {
        match cfg_tok(key) {
            None => Ok(None),
            Some(c) => find(&c).map(Some).ok_or_else(|| TokenizerError::Invalid {
                path: tokenizer_config_json
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                msg: format!(
                    "{what} {:?} is not in the vocabulary of {}",
                    one_line(&c),
                    path.display()
                ),
            }),
        }
    };
    // post-processor (TemplateProcessing) specials, as gguf-py reads them
    let mut tp_first: Option<u32> = None;
    let mut tp_last: Option<u32> = None;
    if let Some(pp) = tj.get("post_processor").filter(|p| p.is_object()) {
        let mut procs = Vec::new();
        flatten(pp, "processors", &mut procs);
        for p in procs {
            if ty(p) == "TemplateProcessing" {
                let single = p.get("single").and_then(Json::as_array);
                let sp_id = |item: Option<&Json>| -> Option<u32> {
                    let name = item?.get("SpecialToken")?.get("id")?.as_str()?;
                    let st = p.get("special_tokens")?.get(name)?;
                    st.get("ids")
                        .and_then(Json::as_array)
                        .and_then(|a| a.first())
                        .and_then(Json::as_u64)
                        .map(|x| x as u32)
                        .or_else(|| find(name))
                };
                if let Some(single) = single {
                    tp_first = sp_id(single.first());
                    tp_last = if single.len() > 1 {
                        sp_id(single.last())
                    } else {
                        None
                    };
                }
            }
        }
    }
    let bos = cfg_id("bos_token", "bos_token")?;
    let eos = cfg_id("eos_token", "eos_token")?;
    let unk = cfg_id("unk_token", "unk_token")?.or_else(|| {
        model
            .get("unk_token")
            .and_then(Json::as_str)
            .and_then(&find)
    });
    let pad = cfg_id("pad_token", "pad_token")?;
    let bos = bos.or(tp_first);
    let eos = eos.or(tp_last);
    ids.push(("tokenizer.ggml.bos_token_id", bos));
    ids.push(("tokenizer.ggml.eos_token_id", eos));
    ids.push(("tokenizer.ggml.unknown_token_id", unk));
    ids.push(("tokenizer.ggml.padding_token_id", pad));

    let cfg_bool = |key: &str| {
        cfg.as_ref()
            .and_then(|c| c.get(key))
            .and_then(Json::as_bool)
    };
    let add_bos = cfg_bool("add_bos_token").or_else(|| match (tp_first, bos) {
        (Some(f), Some(b)) => Some(f == b),
        (None, _)
            if tj
                .get("post_processor")
                .is_some_and(|p| ty(p) == "TemplateProcessing") =>
        {
            Some(false)
        }
        _ => None,
    });
    let add_eos = cfg_bool("add_eos_token").or(match (tp_last, eos) {
        (Some(l), Some(e)) => Some(l == e),
        _ => None,
    });

    // chat template: tokenizer_config (string or list of {name, template}), else chat_template.jinja
    let mut templates: Vec<(String, String)> = Vec::new();
    match cfg.as_ref().and_then(|c| c.get("chat_template")) {
        Some(Json::String(s)) => templates.push(("default".into(), s.clone())),
        Some(Json::Array(list)) => {
            for t in list {
                if let (Some(name), Some(tmpl)) = (
                    t.get("name").and_then(Json::as_str),
                    t.get("template").and_then(Json::as_str),
                ) {
                    templates.push((name.to_string(), tmpl.to_string()));
                }
            }
        }
        _ => {}
    }
    if templates.is_empty() {
        let dir = tokenizer_config_json
            .unwrap_or(path)
            .parent()
            .unwrap_or(Path::new("."));
        let jinja = dir.join("chat_template.jinja");
        if let Ok(s) = std::fs::read_to_string(&jinja) {
            templates.push(("default".into(), s));
        }
    }

    let s = |x: &str| Value::String(x.to_string());
    let mut md: Metadata = Vec::new();
    if spm {
        let scores = spm_scores(&tokens, &types, &merges);
        let add_prefix = {
            let mut ns = Vec::new();
            flatten(normalizer, "normalizers", &mut ns);
            let mut ps = Vec::new();
            flatten(pre_tok, "pretokenizers", &mut ps);
            ns.iter()
                .any(|c| ty(c) == "Prepend" && c.get("prepend").and_then(Json::as_str) == Some("▁"))
                || ps.iter().any(|c| {
                    ty(c) == "Metaspace"
                        && (flag(c, "add_prefix_space", false)
                            || matches!(
                                c.get("prepend_scheme").and_then(Json::as_str),
                                Some("always") | Some("first")
                            ))
                })
        };
        md.push(("tokenizer.ggml.model".into(), s("llama")));
        md.push(("tokenizer.ggml.pre".into(), s("default")));
        md.push((
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ));
        md.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ));
        md.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ));
        push_ids(&mut md, &ids);
        if let Some(b) = add_bos {
            md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
        }
        if let Some(e) = add_eos {
            md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(e)));
        }
        md.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(add_prefix),
        ));
    } else {
        let clean = cfg_bool("clean_up_tokenization_spaces").unwrap_or(false);
        let pre = detect_pre(path, pre_tok, clean)?;
        md.push(("tokenizer.ggml.model".into(), s("gpt2")));
        md.push(("tokenizer.ggml.pre".into(), s(pre)));
        md.push((
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ));
        md.push((
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ));
        md.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(
                merges
                    .into_iter()
                    .map(|(a, b)| Value::String(format!("{a} {b}")))
                    .collect(),
            ),
        ));
        push_ids(&mut md, &ids);
        if let Some(b) = add_bos {
            md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(b)));
        }
        if let Some(e) = add_eos {
            md.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(e)));
        }
    }
    for (name, tmpl) in templates {
        let key = if name == "default" {
            "tokenizer.chat_template".to_string()
        } else {
            format!("tokenizer.chat_template.{name}")
        };
        md.push((key, Value::String(tmpl)));
    }
    Ok(md)
}

fn push_ids(md: &mut Metadata, ids: &[(&str, Option<u32>)]) {
    for (k, v) in ids {
        if let Some(v) = v {
            md.push((k.to_string(), Value::U32(*v)));
        }
    }
}

/// Scores for a SentencePiece-style vocab derived from tokenizer.json (see module docs).
fn spm_scores(tokens: &[String], types: &[i32], merges: &[(String, String)]) -> Vec<f32> {
    let mut first_merge: HashMap<String, usize> = HashMap::new();
    for (rank, (a, b)) in merges.iter().enumerate() {
        first_merge.entry(format!("{a}{b}")).or_insert(rank);
    }
    // normal pieces in id order; are their first-merge ranks increasing?
    let mut last = None;
    let mut consistent = true;
    for (t, &ty) in tokens.iter().zip(types) {
        if ty != TOKEN_NORMAL {
            continue;
        }
        if let Some(&r) = first_merge.get(t) {
            if last.is_some_and(|l| r < l) {
                consistent = false;
                break;
            }
            last = Some(r);
        }
    }
    let n_merges = merges.len() as f32;
    let mut normal_idx = 0f32;
    tokens
        .iter()
        .zip(types)
        .map(|(t, &ty)| match ty {
            TOKEN_NORMAL => {
                let s = if consistent {
                    -normal_idx
                } else {
                    match first_merge.get(t) {
                        Some(&r) => -(r as f32),
                        None => -(n_merges + normal_idx),
                    }
                };
                normal_idx += 1.0;
                s
            }
            TOKEN_BYTE => 0.0,
            _ => -1000.0,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// GGUF -> HF

fn type_name(v: &Value) -> String {
    match v {
        Value::U8(_) => "u8".into(),
        Value::I8(_) => "i8".into(),
        Value::U16(_) => "u16".into(),
        Value::I16(_) => "i16".into(),
        Value::U32(_) => "u32".into(),
        Value::I32(_) => "i32".into(),
        Value::U64(_) => "u64".into(),
        Value::I64(_) => "i64".into(),
        Value::F32(_) => "f32".into(),
        Value::F64(_) => "f64".into(),
        Value::Bool(_) => "bool".into(),
        Value::String(_) => "string".into(),
        Value::Array(a) => match a.first() {
            Some(x) => format!("array of {}", type_name(x)),
            None => "empty array".into(),
        },
    }
}

fn wrong(key: &str, expected: &'static str, v: &Value) -> TokenizerError {
    TokenizerError::WrongType {
        key: key.to_string(),
        expected,
        found: type_name(v),
    }
}

fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong(key, "string", v)),
    }
}

fn get_strings<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<Vec<&'a str>>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.as_str()),
                v => Err(TokenizerError::WrongType {
                    key: key.to_string(),
                    expected: "array of strings",
                    found: format!("array containing {}", type_name(v)),
                }),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(v) => Err(wrong(key, "array of strings", v)),
    }
}

fn get_numbers(
    md: &HashMap<String, Value>,
    key: &str,
    expected: &'static str,
) -> Result<Option<Vec<f64>>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::I32(v) => Ok(*v as f64),
                Value::F32(v) => Ok(*v as f64),
                Value::U32(v) => Ok(*v as f64),
                Value::I64(v) => Ok(*v as f64),
                Value::F64(v) => Ok(*v),
                Value::U8(v) => Ok(*v as f64),
                Value::I8(v) => Ok(*v as f64),
                Value::U16(v) => Ok(*v as f64),
                Value::I16(v) => Ok(*v as f64),
                Value::U64(v) => Ok(*v as f64),
                v => Err(TokenizerError::WrongType {
                    key: key.to_string(),
                    expected,
                    found: format!("array containing {}", type_name(v)),
                }),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(v) => Err(wrong(key, expected, v)),
    }
}

fn get_id(md: &HashMap<String, Value>, key: &str, n: usize) -> Result<Option<u32>> {
    let id = match md.get(key) {
        None => return Ok(None),
        Some(Value::U32(v)) => *v as i64,
        Some(Value::I32(v)) => *v as i64,
        Some(Value::U64(v)) => *v as i64,
        Some(Value::I64(v)) => *v,
        Some(v) => return Err(wrong(key, "u32", v)),
    };
    if id < 0 || id as usize >= n {
        // llama.cpp ignores out-of-range special ids too
        return Ok(None);
    }
    Ok(Some(id as u32))
}

fn get_bool(md: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong(key, "bool", v)),
    }
}

/// The tokenizer.json pre_tokenizer llama.cpp's `tokenizer.ggml.pre` stands for.
fn hf_pre_tokenizer(pre: &str) -> Option<Json> {
    let bl = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            bl(false)
        ]})
    };
    Some(match pre {
        "gpt-2" => bl(true),
        "llama-bpe" | "llama3" | "llama-v3" => split(LLAMA3_REGEX),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_REGEX),
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            bl(true)
        ]}),
        _ => return None,
    })
}

fn added_token_json(id: usize, content: &str, special: bool) -> Json {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// GGUF metadata -> (tokenizer.json, tokenizer_config.json) contents as serde_json::Value, loadable
/// by `tokenizers::Tokenizer::from_str` and by transformers' AutoTokenizer, tokenizing identically
/// to the original.
pub fn gguf_to_hf(
    metadata: &HashMap<String, Value>,
) -> std::result::Result<(Json, Json), TokenizerError> {
    let md = metadata;
    let model_kind = get_str(md, "tokenizer.ggml.model")?
        .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.model".into()))?;
    let spm = match model_kind {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(TokenizerError::InvalidGguf(format!(
                "tokenizer.ggml.model {other:?} is not supported (only \"gpt2\" and \"llama\")"
            )))
        }
    };
    let tokens = get_strings(md, "tokenizer.ggml.tokens")?
        .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.tokens".into()))?;
    let n = tokens.len();
    if n == 0 {
        return Err(TokenizerError::InvalidGguf(
            "tokenizer.ggml.tokens is empty".into(),
        ));
    }
    let types: Vec<i32> = match get_numbers(md, "tokenizer.ggml.token_type", "array of i32")? {
        Some(t) if t.len() != n => {
            return Err(TokenizerError::InvalidGguf(format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                t.len()
            )))
        }
        Some(t) => t.into_iter().map(|x| x as i32).collect(),
        None => vec![TOKEN_NORMAL; n],
    };
    let scores: Option<Vec<f64>> = match get_numbers(md, "tokenizer.ggml.scores", "array of f32")? {
        Some(s) if s.len() != n => {
            return Err(TokenizerError::InvalidGguf(format!(
                "tokenizer.ggml.scores has {} entries for {n} tokens",
                s.len()
            )))
        }
        s => s,
    };
    let bos = get_id(md, "tokenizer.ggml.bos_token_id", n)?;
    let eos = get_id(md, "tokenizer.ggml.eos_token_id", n)?;
    let unk = get_id(md, "tokenizer.ggml.unknown_token_id", n)?;
    let pad = get_id(md, "tokenizer.ggml.padding_token_id", n)?;
    // llama.cpp's defaults when the keys are absent: SPM and the Llama 3 pre-tokenizer add bos
    let add_bos_key = get_bool(md, "tokenizer.ggml.add_bos_token")?;
    let add_eos_key = get_bool(md, "tokenizer.ggml.add_eos_token")?;
    let pre_default_bos = matches!(
        get_str(md, "tokenizer.ggml.pre").ok().flatten(),
        Some("llama-bpe" | "llama3" | "llama-v3")
    );
    let add_bos = add_bos_key.unwrap_or(spm || pre_default_bos);
    let add_eos = add_eos_key.unwrap_or(false);
    let add_prefix = get_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(spm);
    let chat_template = get_str(md, "tokenizer.chat_template")?;
    let pre = get_str(md, "tokenizer.ggml.pre")?;

    {
        let mut seen = HashSet::with_capacity(n);
        for t in &tokens {
            if !seen.insert(*t) {
                return Err(TokenizerError::InvalidGguf(format!(
                    "duplicate token {:?} in tokenizer.ggml.tokens",
                    one_line(t)
                )));
            }
        }
    }

    // vocab (gap fillers "[PAD{id}]" of type UNUSED are left out, as in the HF original)
    let is_gap = |i: usize| types[i] == TOKEN_UNUSED && tokens[i] == format!("[PAD{i}]");
    let mut vocab = Map::with_capacity(n);
    let mut added = Vec::new();
    let mut added_decoder = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        if is_gap(i) {
            continue;
        }
        vocab.insert(t.to_string(), json!(i));
        let special = match types[i] {
            TOKEN_CONTROL | TOKEN_UNKNOWN => Some(true),
            TOKEN_USER_DEFINED => Some(false),
            _ => None,
        };
        if let Some(special) = special {
            added.push(added_token_json(i, t, special));
            added_decoder.insert(
                i.to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": special}),
            );
        }
    }

    let merges: Vec<(String, String)> = if spm {
        spm_merges(&tokens, &types, scores.as_deref())
    } else {
        let m = get_strings(md, "tokenizer.ggml.merges")?
            .ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.merges".into()))?;
        m.iter()
            .map(|s| {
                // llama.cpp splits at the first space after the first byte
                let pos = s
                    .char_indices()
                    .skip(1)
                    .find(|(_, c)| *c == ' ')
                    .map(|(p, _)| p);
                match pos {
                    Some(p) => Ok((s[..p].to_string(), s[p + 1..].to_string())),
                    None => Err(TokenizerError::InvalidGguf(format!(
                        "merge {:?} in tokenizer.ggml.merges has no space",
                        one_line(s)
                    ))),
                }
            })
            .collect::<Result<_>>()?
    };
    let any_space = merges
        .iter()
        .any(|(a, b)| a.contains(' ') || b.contains(' '));
    let merges_json: Vec<Json> = merges
        .iter()
        .map(|(a, b)| {
            if any_space {
                json!([a, b])
            } else {
                json!(format!("{a} {b}"))
            }
        })
        .collect();

    let name = |id: Option<u32>| id.map(|i| tokens[i as usize].to_string());
    let template = |with_bos: bool, with_eos: bool| -> Json {
        let mut specials = Map::new();
        let bos_t = name(bos).filter(|_| with_bos);
        let eos_t = name(eos).filter(|_| with_eos);
        let part = |seq: &str, type_id: u32| -> Vec<Json> {
            let mut out = Vec::new();
            if let Some(b) = &bos_t {
                out.push(json!({"SpecialToken": {"id": b, "type_id": type_id}}));
            }
            out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some(e) = &eos_t {
                out.push(json!({"SpecialToken": {"id": e, "type_id": type_id}}));
            }
            out
        };
        let single = part("A", 0);
        let mut pair = part("A", 0);
        pair.extend(part("B", 1));
        for (t, id) in [(bos_t, bos), (eos_t, eos)] {
            if let (Some(t), Some(id)) = (t, id) {
                specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
            }
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    };
    let with_bos = add_bos && bos.is_some();
    let with_eos = add_eos && eos.is_some();

    let (pre_label, clean) = if spm {
        ("default", false)
    } else {
        let pre = pre.ok_or_else(|| TokenizerError::MissingKey("tokenizer.ggml.pre".into()))?;
        (pre, !matches!(pre, "qwen2" | "deepseek-r1-qwen" | "smollm"))
    };

    let tokenizer_json = if spm {
        let mut normalizers = Vec::new();
        if add_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": if with_bos || with_eos { template(with_bos, with_eos) } else { Json::Null },
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": name(unk),
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges_json
            }
        })
    } else {
        let pre_json = hf_pre_tokenizer(pre_label).ok_or_else(|| {
            TokenizerError::InvalidGguf(format!(
                "tokenizer.ggml.pre {pre_label:?} has no known HF pre-tokenizer (supported: {})",
                KNOWN_PRE.join(", ")
            ))
        })?;
        let ignore_merges = matches!(pre_label, "llama-bpe" | "llama3" | "llama-v3");
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_json,
            "post_processor": if with_bos || with_eos { template(with_bos, with_eos) } else {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                "vocab": vocab, "merges": merges_json
            }
        })
    };

    let mut cfg = Map::new();
    // written when the GGUF says so or when they take effect, so that hf_to_gguf gives the keys back
    if add_bos_key.is_some() || add_bos {
        cfg.insert("add_bos_token".into(), json!(add_bos));
    }
    if add_eos_key.is_some() || add_eos {
        cfg.insert("add_eos_token".into(), json!(add_eos));
    }
    if !spm {
        cfg.insert("add_prefix_space".into(), json!(false));
    }
    cfg.insert("added_tokens_decoder".into(), Json::Object(added_decoder));
    for (key, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("pad_token", pad),
        ("unk_token", unk),
    ] {
        cfg.insert(key.into(), name(id).map_or(Json::Null, Json::String));
    }
    if let Some(t) = chat_template {
        cfg.insert("chat_template".into(), json!(t));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), json!(clean));
    let ctx = get_str(md, "general.architecture")
        .ok()
        .flatten()
        .and_then(|a| md.get(&format!("{a}.context_length")))
        .and_then(|v| match v {
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I32(x) if *x > 0 => Some(*x as u64),
            _ => None,
        });
    if let Some(c) = ctx {
        cfg.insert("model_max_length".into(), json!(c));
    }
    if spm {
        cfg.insert("legacy".into(), json!(false));
        cfg.insert("spaces_between_special_tokens".into(), json!(false));
    }
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok((tokenizer_json, Json::Object(cfg)))
}

/// HF-SentencePiece-extractor-style merges from an SPM vocab (see module docs).
fn spm_merges(tokens: &[&str], types: &[i32], scores: Option<&[f64]>) -> Vec<(String, String)> {
    let normal: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TOKEN_NORMAL)
        .map(|(i, t)| (*t, i))
        .collect();
    let score = |i: usize| scores.map_or(-(i as f64), |s| s[i]);
    let mut order: Vec<usize> = normal.values().copied().collect();
    order.sort_by(|&a, &b| {
        score(b)
            .partial_cmp(&score(a))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    // Look a split up only where both halves have the length of some piece: hashing every prefix
    // of every piece is quadratic in a piece's length, which a hostile GGUF makes megabytes.
    let longest = normal.keys().map(|t| t.len()).max().unwrap_or(0);
    let mut has_length = vec![false; longest + 1];
    for t in normal.keys() {
        has_length[t.len()] = true;
    }
    let mut out = Vec::new();
    let mut local: Vec<(usize, usize)> = Vec::new();
    for i in order {
        let piece = tokens[i];
        local.clear();
        for (pos, _) in piece.char_indices().skip(1) {
            if !(has_length[pos] && has_length[piece.len() - pos]) {
                continue;
            }
            if let (Some(&l), Some(&r)) = (normal.get(&piece[..pos]), normal.get(&piece[pos..])) {
                local.push((l, r));
            }
        }
        local.sort_unstable();
        out.extend(
            local
                .iter()
                .map(|&(l, r)| (tokens[l].to_string(), tokens[r].to_string())),
        );
    }
    out
}

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;
