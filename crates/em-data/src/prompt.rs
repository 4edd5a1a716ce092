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

/// Most template instructions one render may run: far above any real chat template (a few
/// thousand for a long conversation), low enough that a template that loops stops within a second.
pub const MAX_TEMPLATE_STEPS: u64 = 1_000_000;
/// Deepest nesting of loops, conditions, macro calls and includes while rendering (minijinja's
/// default is 500, which a 2 MiB thread stack may not hold).
pub const MAX_TEMPLATE_DEPTH: usize = 100;
/// Longest rendered prompt, in bytes.
pub const MAX_RENDERED_BYTES: usize = 4 << 20;
/// Most memory one render may hold (minijinja has no bound on a value's size: a template can double
/// a string a few dozen times within its steps). Enforced where the binary installs
/// [`em_alloc::BudgetAlloc`]; a real template holds a few times its output.
pub const MAX_TEMPLATE_MEMORY: usize = 64 << 20;

/// Why a template could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The template failed to compile or render.
    #[error("chat template: {0:#}")]
    Template(#[from] minijinja::Error),
    /// The template ran out of its [`MAX_TEMPLATE_STEPS`].
    #[error("chat template: rendering takes more than {MAX_TEMPLATE_STEPS} steps (a loop that does not end?)")]
    TooManySteps,
    /// The template nests deeper than [`MAX_TEMPLATE_DEPTH`] (or than minijinja's parser allows).
    #[error(
        "chat template: nested deeper than {MAX_TEMPLATE_DEPTH} levels (unbounded recursion?)"
    )]
    TooDeep,
    /// The rendered text would exceed [`MAX_RENDERED_BYTES`].
    #[error("chat template: the rendered prompt exceeds {MAX_RENDERED_BYTES} bytes")]
    TooLong,
    /// Rendering would hold more than its memory budget ([`MAX_TEMPLATE_MEMORY`] by default).
    #[error("chat template: rendering needs more than {} MiB of memory (a value that grows without bound?)", limit >> 20)]
    TooMuchMemory {
        /// The budget, in bytes.
        limit: usize,
    },
    /// minijinja panicked, or no thread could be started to render on.
    #[error("chat template: rendering failed: {0}")]
    Failed(String),
}

impl PromptError {
    /// The limit a minijinja error reports, if it is one, else the error itself.
    fn from_render(e: minijinja::Error, output_full: bool) -> Self {
        let detail = e.detail().unwrap_or("");
        if output_full {
            Self::TooLong
        } else if e.kind() == minijinja::ErrorKind::OutOfFuel {
            Self::TooManySteps
        } else if detail.contains("recursion limit") {
            Self::TooDeep
        } else {
            Self::Template(e)
        }
    }
}

/// An output that refuses to grow past [`MAX_RENDERED_BYTES`].
struct BoundedOutput {
    text: Vec<u8>,
    full: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > MAX_RENDERED_BYTES {
            self.full = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fill minijinja's lazily built tables here, not on a bounded thread that may never return (and
/// would leave them locked).
fn warm_up_minijinja() {
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| {
        let _ = minijinja::Environment::new().render_str("{{ 1 }}{{ 'a'|upper }}", ());
    });
}

impl ChatTemplate {
    /// Render `messages` with `add_generation_prompt`, as `transformers` does, on a thread that
    /// may hold at most [`MAX_TEMPLATE_MEMORY`].
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, PromptError> {
        self.render_within(messages, MAX_TEMPLATE_MEMORY)
    }

    /// [`render`](Self::render) with another memory budget, in bytes. A render that exceeds it
    /// leaves its thread blocked, holding up to the budget, for good (see `em_alloc`).
    pub fn render_within(
        &self,
        messages: &[ChatMessage],
        max_memory: usize,
    ) -> Result<String, PromptError> {
        warm_up_minijinja();
        let template = self.clone();
        let messages = messages.to_vec();
        match em_alloc::run_bounded(max_memory, move || template.render_unbounded(&messages)) {
            Ok(rendered) => rendered,
            Err(em_alloc::Error::OverBudget { limit }) => Err(PromptError::TooMuchMemory { limit }),
            Err(e) => Err(PromptError::Failed(e.to_string())),
        }
    }

    fn render_unbounded(&self, messages: &[ChatMessage]) -> Result<String, PromptError> {
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
        env.set_fuel(Some(MAX_TEMPLATE_STEPS));
        env.set_recursion_limit(MAX_TEMPLATE_DEPTH);
        env.add_template("chat", &self.template).map_err(|e| {
            if e.detail().is_some_and(|d| d.contains("recursion limit")) {
                PromptError::TooDeep
            } else {
                PromptError::Template(e)
            }
        })?;
        let tmpl = env.get_template("chat")?;
        let mut out = BoundedOutput {
            text: Vec::new(),
            full: false,
        };
        let rendered = tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                tools => minijinja::Value::UNDEFINED,
            },
            &mut out,
        );
        if let Err(e) = rendered {
            return Err(PromptError::from_render(e, out.full));
        }
        // Every piece minijinja writes is a whole &str, so this is never lossy.
        Ok(String::from_utf8_lossy(&out.text).into_owned())
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

    #[test]
    fn hostile_templates_stop_with_one_line_errors() {
        let render = |template: &str| {
            let t = ChatTemplate {
                template: template.into(),
                bos_token: String::new(),
                eos_token: String::new(),
            };
            // The step, depth and output budgets stop these in milliseconds; on a thread, so that
            // one that does not stop fails after a generous wait instead of stalling the run.
            let (done, finished) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = done.send(t.render(&user("x")).map_err(|e| e.to_string()));
            });
            let hang = std::time::Duration::from_secs(300);
            let e = match finished.recv_timeout(hang) {
                Ok(out) => out.unwrap_err(),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{template}: still rendering after {hang:?}")
                }
                Err(e) => panic!("{template}: the render thread ended without a result: {e}"),
            };
            assert!(!e.contains('\n'), "{e}");
            e
        };
        // 10^15 iterations that output nothing.
        let e = render("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}");
        assert!(e.contains("more than 1000000 steps"), "{e}");
        // A macro that calls itself forever.
        let e = render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
        assert!(e.contains("nested deeper than 100"), "{e}");
        // Nesting the parser refuses.
        let e = render(&("{% if true %}".repeat(400) + &"{% endif %}".repeat(400)));
        assert!(e.contains("nested deeper"), "{e}");
        // 100 MB of output from a few steps.
        let e = render("{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}");
        assert!(e.contains("exceeds 4194304 bytes"), "{e}");
    }
}
