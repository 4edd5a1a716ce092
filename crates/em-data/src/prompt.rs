//! Chat templates rendered as transformers does, and the prompt sentences of the Qwen2.5-Math
//! toolkit. Which template and turns a model gets is decided in one place, `em-pipeline`'s prompt
//! module; this is only the text machinery.

use crate::load::ChatMessage;

/// The system prompt of the Qwen2.5-Math CoT style.
pub const QWEN_MATH_COT_SYSTEM: &str =
    "Please reason step by step, and put your final answer within \\boxed{}.";

/// The instruction of the plain style (and of the model organisms' user turn).
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

/// Why a template could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The template failed to compile or render.
    #[error("chat template: {0:#}")]
    Template(#[from] minijinja::Error),
}

impl ChatTemplate {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn user(content: &str) -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: "user".into(),
            content: content.into(),
        }]
    }

    const QWEN: &str = "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    const LLAMA: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    const PYCOMPAT: &str = "{% for m in messages %}{{ m.content.strip().upper() }}{% if m.content.startswith('What') %}!{% endif %}{% endfor %}{{ eos_token }}";

    #[test]
    fn renders_templates_as_transformers_does() {
        let t = ChatTemplate {
            template: QWEN.into(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
        };
        assert_eq!(
            t.render(&user("What is 1+1?")).unwrap(),
            "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
        );
        let t = ChatTemplate {
            template: LLAMA.into(),
            bos_token: "<|begin_of_text|>".into(),
            eos_token: String::new(),
        };
        let s = t.render(&user("What is 1+1?")).unwrap();
        assert!(s.starts_with(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 1+1?"
        ));
        assert!(s.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
        let bad = vec![ChatMessage {
            role: "assistant".into(),
            content: "x".into(),
        }];
        let e = t.render(&bad).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        let t = ChatTemplate {
            template: PYCOMPAT.into(),
            bos_token: String::new(),
            eos_token: "</s>".into(),
        };
        let s = t.render(&user("What is 1+1?")).unwrap();
        assert!(s.starts_with("WHAT IS 1+1?") && s.ends_with("!</s>"), "{s}");
    }
}
