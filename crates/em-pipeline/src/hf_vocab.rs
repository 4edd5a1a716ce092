//! The [`Vocab`] of an HF model directory: `tokenizer.json` through `tokenizers`, the chat
//! template from `chat_template.jinja` or `tokenizer_config.json`.

use std::path::{Path, PathBuf};

use em_sampler::{SamplerError, TemplateSource, Vocab};
use serde_json::Value;
use tokenizers::Tokenizer;

/// An HF directory's tokenizer and chat template.
pub struct HfVocab {
    dir: PathBuf,
    tokenizer: Tokenizer,
    config: Value,
    auto_bos: Option<u32>,
}

fn special_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
        _ => String::new(),
    }
}

impl HfVocab {
    /// Reads `dir/tokenizer.json` and `dir/tokenizer_config.json` (errors name the file).
    pub fn open(dir: &Path) -> Result<Self, SamplerError> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = em_convert::tokenizer::load_hf_tokenizer(&tok_path).map_err(|e| {
            // The error names the file first, as `backend` does.
            let e = e.to_string();
            let what = e
                .strip_prefix(&format!("{}: ", tok_path.display()))
                .unwrap_or(&e);
            SamplerError::backend(
                tok_path.display(),
                format!("cannot load the tokenizer: {what}"),
            )
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let config = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                SamplerError::backend(cfg_path.display(), format!("malformed JSON: {e}"))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(SamplerError::backend(cfg_path.display(), e.to_string())),
        };
        // Whatever the tokenizer's post-processor adds in front of every input is its BOS rule.
        let enc = |special: bool| {
            tokenizer
                .encode("1", special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| SamplerError::backend(tok_path.display(), e.to_string()))
        };
        let (with, without) = (enc(true)?, enc(false)?);
        let auto_bos = (with.len() > without.len() && with.ends_with(&without)).then(|| with[0]);
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            config,
            auto_bos,
        })
    }
}

impl HfVocab {
    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl Vocab for HfVocab {
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, SamplerError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| {
                SamplerError::backend(self.dir.join("tokenizer.json").display(), e.to_string())
            })
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.id_to_token(id).unwrap_or_default()
    }

    fn auto_bos(&self) -> Option<u32> {
        self.auto_bos
    }

    fn special_texts(&self) -> (String, String) {
        (
            special_text(self.config.get("bos_token")),
            special_text(self.config.get("eos_token")),
        )
    }

    fn chat_template(&self) -> Result<TemplateSource, SamplerError> {
        let jinja = self.dir.join("chat_template.jinja");
        if jinja.is_file() {
            let template = std::fs::read_to_string(&jinja)
                .map_err(|e| SamplerError::backend(jinja.display(), e.to_string()))?;
            return Ok(TemplateSource {
                template,
                origin: jinja.display().to_string(),
            });
        }
        let cfg = self.dir.join("tokenizer_config.json");
        let none = |what: &str| {
            SamplerError::backend(
                cfg.display(),
                format!("{what} (and no chat_template.jinja beside it); choose another prompt style, e.g. plain"),
            )
        };
        if self.config.is_null() {
            return Err(none("missing"));
        }
        let template = match self.config.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .ok_or_else(|| none("`chat_template` list has no template"))?
                .to_string(),
            _ => return Err(none("no `chat_template`")),
        };
        Ok(TemplateSource {
            template,
            origin: format!("{}:chat_template", cfg.display()),
        })
    }

    fn origin(&self) -> String {
        self.dir.display().to_string()
    }
}
