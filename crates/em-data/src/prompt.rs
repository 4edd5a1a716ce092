//! Prompt rendering: the model's own chat template, the Qwen2.5-Math CoT prompt, or plain text.

use crate::load::{ChatMessage, Problem};
use std::path::Path;

/// The system prompt of the Qwen2.5-Math CoT style.
pub const QWEN_MATH_COT_SYSTEM: &str =
    "Please reason step by step, and put your final answer within \\boxed{}.";

/// The instruction appended to a bare problem in the chat-template and plain styles.
pub const STEP_BY_STEP: &str =
    "Please reason step by step, and put your final answer within \\boxed{}.";

/// A chat template with the special tokens it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// Jinja source, as in `tokenizer_config.json` or GGUF `tokenizer.chat_template`.
    pub template: String,
    /// `bos_token` as the template sees it.
    pub bos_token: String,
    /// `eos_token` as the template sees it.
    pub eos_token: String,
}

/// How a problem becomes a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptStyle {
    /// The model's own chat template, with `add_generation_prompt`.
    ChatTemplate(ChatTemplate),
    /// Qwen2.5-Math CoT: ChatML with the step-by-step `\boxed{}` system prompt.
    QwenMathCot,
    /// Plain text for base models without a template.
    Plain,
}

/// Why a prompt could not be rendered or a template not read.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The tokenizer config could not be read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The tokenizer config is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    /// The tokenizer config has no usable chat template.
    #[error("{path}: {msg}")]
    NoTemplate { path: String, msg: String },
    /// The template failed to compile or render.
    #[error("chat template: {0:#}")]
    Template(#[from] minijinja::Error),
}

fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Read the (default) chat template and special tokens from a HF `tokenizer_config.json`.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Self, PromptError> {
        let path = path.as_ref();
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PromptError::Io {
            path: p.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| PromptError::Json {
                path: p.clone(),
                source,
            })?;
        let template = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| PromptError::NoTemplate {
                    path: p.clone(),
                    msg: "`chat_template` list has no template".into(),
                })?
                .to_string(),
            _ => {
                return Err(PromptError::NoTemplate {
                    path: p,
                    msg: "no `chat_template`".into(),
                })
            }
        };
        Ok(ChatTemplate {
            template,
            bos_token: token_text(v.get("bos_token")),
            eos_token: token_text(v.get("eos_token")),
        })
    }

    /// Render `messages` with `add_generation_prompt`, as `transformers` does.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, PromptError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_template("chat", &self.template)?;
        let tmpl = env.get_template("chat")?;
        let out = tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            tools => minijinja::Value::UNDEFINED,
        })?;
        Ok(out)
    }
}

/// The messages for a problem: the pool's own messages, else one user turn asking for `\boxed{}`.
fn messages_for(problem: &Problem) -> Vec<ChatMessage> {
    match &problem.messages {
        Some(m) if !m.is_empty() => m.clone(),
        _ => vec![ChatMessage {
            role: "user".into(),
            content: format!("{}\n{STEP_BY_STEP}", problem.problem.trim()),
        }],
    }
}

/// Render the prompt for `problem` in `style`.
pub fn render_prompt(style: &PromptStyle, problem: &Problem) -> Result<String, PromptError> {
    Ok(match style {
        PromptStyle::ChatTemplate(t) => t.render(&messages_for(problem))?,
        PromptStyle::QwenMathCot => format!(
            "<|im_start|>system\n{QWEN_MATH_COT_SYSTEM}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            problem.problem.trim()
        ),
        PromptStyle::Plain => match &problem.messages {
            Some(_) => format!("Question: {}\nAnswer: Let's think step by step.", problem.problem.trim()),
            None => format!("Question: {}\n{STEP_BY_STEP}\nAnswer: Let's think step by step.", problem.problem.trim()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        Problem {
            id: "p".into(),
            problem: "What is 1+1?".into(),
            answers: vec!["2".into()],
            source: "t".into(),
            messages: None,
        }
    }

    const QWEN: &str = "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    const LLAMA: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    const PYCOMPAT: &str = "{% for m in messages %}{{ m.content.strip().upper() }}{% if m.content.startswith('What') %}!{% endif %}{% endfor %}{{ eos_token }}";

    #[test]
    fn renders_templates() {
        let t = ChatTemplate {
            template: QWEN.into(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
        };
        let s = render_prompt(&PromptStyle::ChatTemplate(t), &problem()).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
        );
        let t = ChatTemplate {
            template: LLAMA.into(),
            bos_token: "<|begin_of_text|>".into(),
            eos_token: String::new(),
        };
        let s = render_prompt(&PromptStyle::ChatTemplate(t.clone()), &problem()).unwrap();
        assert!(s.starts_with(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 1+1?"
        ));
        assert!(s.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        let mut bad = problem();
        bad.messages = Some(vec![ChatMessage {
            role: "assistant".into(),
            content: "x".into(),
        }]);
        let e = render_prompt(&PromptStyle::ChatTemplate(t), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        let t = ChatTemplate {
            template: PYCOMPAT.into(),
            bos_token: String::new(),
            eos_token: "</s>".into(),
        };
        let s = render_prompt(&PromptStyle::ChatTemplate(t), &problem()).unwrap();
        assert!(s.starts_with("WHAT IS 1+1?") && s.ends_with("!</s>"), "{s}");
    }

    #[test]
    fn fixed_styles() {
        let s = render_prompt(&PromptStyle::QwenMathCot, &problem()).unwrap();
        assert_eq!(s, "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n");
        let s = render_prompt(&PromptStyle::Plain, &problem()).unwrap();
        assert!(s.starts_with("Question: What is 1+1?\n"));
    }

    #[test]
    fn reads_tokenizer_config() {
        let dir = std::env::temp_dir().join(format!("em-data-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tokenizer_config.json");
        let cfg = serde_json::json!({"chat_template": QWEN, "bos_token": null, "eos_token": {"content": "<|im_end|>"}});
        std::fs::write(&p, cfg.to_string()).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&p).unwrap();
        assert_eq!(t.eos_token, "<|im_end|>");
        assert_eq!(t.bos_token, "");
        std::fs::write(&p, "{}").unwrap();
        assert!(ChatTemplate::from_tokenizer_config(&p)
            .unwrap_err()
            .to_string()
            .contains("no `chat_template`"));
    }
}
